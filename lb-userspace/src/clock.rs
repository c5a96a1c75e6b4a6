//! The data plane's clock, read from userspace: flow entries are timed with the kernel's tick
//! counter (`bpf_jiffies64`, which the verifier turns into a single load) times the tick
//! length (`GlobalConf::ns_per_tick`), so the sweep and `lb flows` must read the same counter.
//! Userspace has no direct view of it: the tiny `lb_clock` program, run with
//! BPF_PROG_TEST_RUN, writes it into a frame.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};

use crate::object::LB_CLOCK_OBJECT;

/// The loaded `lb_clock` program, once per process.
static PROBE: Mutex<Option<Ebpf>> = Mutex::new(None);

/// The kernel's tick counter (jiffies), now.
pub fn jiffies() -> Result<u64> {
    Ok(sample()?.0)
}

/// The kernel's tick counter and monotonic clock (ns), read in one run of `lb_clock`.
fn sample() -> Result<(u64, u64)> {
    let mut guard = PROBE.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        crate::privileges::require_for_loading(
            "reading the kernel's clock for flow ages (the lb_clock probe)",
        )?;
        let mut ebpf = Ebpf::load(LB_CLOCK_OBJECT).context("loading the lb_clock object")?;
        let prog: &mut Xdp = ebpf
            .program_mut("lb_clock")
            .context("program lb_clock missing from its object")?
            .try_into()?;
        prog.load().context("loading lb_clock into the kernel")?;
        *guard = Some(ebpf);
    }
    let prog: &mut Xdp = guard
        .as_mut()
        .expect("loaded above")
        .program_mut("lb_clock")
        .expect("loaded above")
        .try_into()?;
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    prog.test_run(TestRunOptions {
        data_in: Some(&frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    })
    .context("running lb_clock (BPF_PROG_TEST_RUN)")?;
    let word = |i: usize| u64::from_le_bytes(out[i..i + 8].try_into().expect("8 bytes"));
    Ok((word(0), word(8)))
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the data plane's clock when `ns_per_tick` is 0.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Now on the data plane's clock, nanoseconds, for a data plane whose tick length is
/// `ns_per_tick` (`GlobalConf::ns_per_tick`; 0: the coarse monotonic clock).
pub fn now_ns(ns_per_tick: u32) -> Result<u64> {
    if ns_per_tick == 0 {
        return Ok(monotonic_coarse_ns());
    }
    Ok(jiffies()? * ns_per_tick as u64)
}

/// Measures the tick length: the kernel's monotonic clock at two tick edges at least 200 ms
/// apart (each read in the same program run as the tick counter, so scheduling delays do not
/// enter), taken as the nearest CONFIG_HZ choice. Measured once per process.
pub fn measure_ns_per_tick() -> Result<u32> {
    static MEASURED: Mutex<Option<u32>> = Mutex::new(None);
    let mut m = MEASURED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = *m {
        return Ok(v);
    }
    let v = measure()?;
    *m = Some(v);
    Ok(v)
}

/// The first sample after the tick counter moves on: the monotonic clock at a tick edge (to
/// within one program run). Bounded: a tick is at most 100 ms (10 Hz) long.
fn at_tick_edge() -> Result<(u64, u64)> {
    let (j0, _) = sample()?;
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        let s = sample()?;
        if s.0 != j0 {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the kernel's tick counter did not move in 500 ms");
        }
    }
}

fn measure() -> Result<u32> {
    let (j0, t0) = at_tick_edge()?;
    std::thread::sleep(Duration::from_millis(200));
    let (j1, t1) = at_tick_edge()?;
    tick_length(j1 - j0, t1 - t0)
}

/// The tick rates kernels are built with (CONFIG_HZ): 100, 250, 300 and 1000 on x86 and arm64,
/// 200 and 500 on some other architectures.
const HZ_CHOICES: [u64; 6] = [100, 200, 250, 300, 500, 1000];

/// ns per tick from `ticks` ticks in `ns` nanoseconds: 10^9 / HZ for the CONFIG_HZ choice
/// within 8 % of the measured rate. Tick edges are not evenly spaced on a tickless kernel
/// (an idle CPU catches up on its ticks late), so a measurement over 200 ms is off by a few
/// per cent; the choices are at least 17 % apart.
fn tick_length(ticks: u64, ns: u64) -> Result<u32> {
    if ticks == 0 || ns == 0 {
        bail!("the kernel's tick counter did not move");
    }
    let measured = ticks as f64 * 1e9 / ns as f64;
    let Some(hz) = HZ_CHOICES
        .iter()
        .copied()
        .find(|hz| (*hz as f64 - measured).abs() <= *hz as f64 * 0.08)
    else {
        bail!("the kernel's tick rate measured {measured:.0} Hz, which is no CONFIG_HZ choice");
    };
    Ok((1_000_000_000 / hz) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_length_is_a_whole_tick_rate() {
        // 50 ticks in 200 ms at 250 Hz, and with an edge a few ms late (seen here: 248 Hz).
        assert_eq!(tick_length(50, 200_003_000).unwrap(), 4_000_000);
        assert_eq!(tick_length(50, 201_600_000).unwrap(), 4_000_000);
        assert_eq!(tick_length(60, 199_990_000).unwrap(), 3_333_333);
        assert_eq!(tick_length(200, 200_001_000).unwrap(), 1_000_000);
        assert_eq!(tick_length(20, 201_000_000).unwrap(), 10_000_000);
        assert!(tick_length(0, 200_000_000).is_err());
        assert!(tick_length(1, 2_000_000_000).is_err());
        assert!(tick_length(80, 200_000_000).is_err()); // 400 Hz: no choice
    }

    #[test]
    fn the_measured_tick_length_matches_the_clock() {
        // Needs BPF (root): the real measurement, twice, agrees with itself and with the
        // kernel's tick counter over a second of the monotonic clock.
        let Ok(t) = measure() else {
            eprintln!("skipped: cannot run lb_clock here");
            return;
        };
        assert_eq!(measure().unwrap(), t);
        let (j0, n0) = sample().unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        let (j1, n1) = sample().unwrap();
        let predicted = (n1 - n0) / t as u64;
        assert!(
            predicted.abs_diff(j1 - j0) <= 1,
            "{predicted} vs {}",
            j1 - j0
        );
    }
}
