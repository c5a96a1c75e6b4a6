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
    let mut guard = PROBE.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
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
    Ok(u64::from_le_bytes(out[..8].try_into().expect("8 bytes")))
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

/// The kernel's tick rates (CONFIG_HZ choices).
const HZ_CHOICES: [u64; 4] = [100, 250, 300, 1000];

/// Measures the tick length: ticks counted over at least 200 ms of the monotonic clock, rounded
/// to the nearest CONFIG_HZ choice. Measured once per process.
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

fn measure() -> Result<u32> {
    let (j0, t0) = (jiffies()?, Instant::now());
    std::thread::sleep(Duration::from_millis(200));
    let (j1, t1) = (jiffies()?, Instant::now());
    let hz = (j1 - j0) as f64 / (t1 - t0).as_secs_f64();
    nearest_hz(hz).map(|hz| (1_000_000_000 / hz) as u32)
}

/// The CONFIG_HZ choice a measured tick rate is, if it is within 10 % of one.
fn nearest_hz(measured: f64) -> Result<u64> {
    let best = HZ_CHOICES
        .iter()
        .copied()
        .min_by(|a, b| {
            (*a as f64 - measured)
                .abs()
                .total_cmp(&(*b as f64 - measured).abs())
        })
        .expect("non-empty");
    if (best as f64 - measured).abs() > best as f64 * 0.1 {
        bail!("the kernel's tick rate measured {measured:.0} Hz, which is no CONFIG_HZ choice");
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_rates_round_to_config_hz() {
        assert_eq!(nearest_hz(248.0).unwrap(), 250);
        assert_eq!(nearest_hz(296.0).unwrap(), 300);
        assert_eq!(nearest_hz(1004.0).unwrap(), 1000);
        assert_eq!(nearest_hz(99.0).unwrap(), 100);
        assert!(nearest_hz(500.0).is_err());
    }
}
