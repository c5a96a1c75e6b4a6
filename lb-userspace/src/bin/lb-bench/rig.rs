//! The measuring rig: the real lb program loaded (not attached) in a namespace whose routes
//! and static neighbours make its route lookups succeed, plus the wrapper that restores the
//! frame before every run.

use std::{net::SocketAddr, process::Command};

use anyhow::{anyhow, bail, ensure, Context, Result};
use aya::{
    maps::{Array, ProgramArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb::{object::LB_BENCH_OBJECT, testbed::NetNs, Dataplane, LoadOptions};
use lb_common::{
    bench::{
        BenchFrame, BENCH_FRAME_MAP, BENCH_MAX_FRAME, BENCH_PROGS_MAP, BENCH_SB_PROGS_MAP,
        BENCH_TC_PROGS_MAP,
    },
    Counter, VERDICT_COUNT,
};

pub const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xa0];
pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0c];

pub struct Rig {
    pub dp: Dataplane,
    bench: Ebpf,
    /// The decapsulation program backends run.
    decap: Ebpf,
    pub ifindex: u32,
    /// Measure `lb_tc` (the tc program) instead of `lb_xdp`: rows of the fallback mode.
    pub tc: bool,
    /// Measuring a single-buffer XDP program (`lb_decap`): the wrapper pair for those
    /// (`bench_wrap_sb`, `bench_pass_sb`); `lb_xdp` and its bench wrapper are multi-buffer.
    single_buffer: bool,
    /// Kept for its Drop: the namespace goes with the rig.
    _ns: NetNs,
}

/// A measurement: median and spread (10th–90th percentile) of ns per packet over rounds.
#[derive(Clone, Debug)]
pub struct Sample {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    /// What lb's counters showed for the measurement (None: not a measurement of a program
    /// under test, e.g. the floor).
    pub verified: Option<Verified>,
}

/// What lb's counters must show after a measurement, besides exactly one verdict per run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// Counters that must each count every run; the first is the verdict (with exactly one
    /// verdict per run, no other verdict counted any).
    pub each: &'static [Counter],
    /// Counters that together count every run, each run by exactly one of them (none: not
    /// checked).
    pub one_of: &'static [Counter],
    pub flows: NewFlows,
}

/// What a row's runs must do to conntrack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewFlows {
    /// Nothing is checked here (`each` may name `ct_hit`).
    Unchecked,
    /// Every run a new flow that is stored: `ct_miss` = runs, no `ct_hit`, no failed insert.
    /// The unconfirmed table is emptied first and has room for every run.
    Stored,
    /// Every run a new flow at a flood threshold of `rate` new flows per second (per CPU; the
    /// thread is pinned): `ct_miss` = runs, no `ct_hit`, and all are over it
    /// (`ct_flood_skip`) except the first `rate` of each one-second window — at most `rate` ×
    /// (whole seconds the row took + 2).
    Flood { rate: u64 },
}

impl Expect {
    /// Each of `each` counted every run.
    pub const fn each(each: &'static [Counter]) -> Expect {
        Expect {
            each,
            one_of: &[],
            flows: NewFlows::Unchecked,
        }
    }

    /// New flows stored, each counted by `each`.
    pub const fn new_flows(each: &'static [Counter]) -> Expect {
        Expect {
            each,
            one_of: &[],
            flows: NewFlows::Stored,
        }
    }

    /// And every run sent to a backend with the next-hop cache or a route lookup (which
    /// fills it).
    pub const fn routed(self) -> Expect {
        Expect {
            one_of: &[Counter::NextHopCached, Counter::NextHopLookedUp],
            ..self
        }
    }
}

/// What the counters proved about a measurement.
#[derive(Clone, Debug)]
pub struct Verified {
    /// Runs of the program under test, each counted by exactly one verdict.
    pub runs: u64,
    /// The counters that counted every run, by their `lb stats` names.
    pub counters: String,
    /// New-flow rows: the new flows stored (`ct_miss` − `ct_flood_skip` − `ct_insert_failed`).
    pub new_flows: Option<u64>,
    /// New-flow rows: entries of the unconfirmed conntrack table before and after the row,
    /// and its capacity.
    pub fill: Option<(u64, u64, u64)>,
}

/// Pins the calling thread to one CPU (the first it may run on) until dropped, then restores
/// its CPU set. The wrapper's source-address sequence is per CPU: a thread that moves would
/// replay 5-tuples already in conntrack.
pub struct Pinned {
    old: libc::cpu_set_t,
    pub cpu: usize,
}

impl Pinned {
    pub fn first_cpu() -> Result<Pinned> {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: cpu_set_t is plain data; the kernel fills at most `size` bytes of it.
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        if unsafe { libc::sched_getaffinity(0, size, &mut old) } != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        let cpu = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: i < CPU_SETSIZE.
            .find(|&i| unsafe { libc::CPU_ISSET(i, &old) })
            .ok_or_else(|| anyhow!("no CPU in this thread's affinity mask"))?;
        // SAFETY: as above.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        unsafe { libc::CPU_SET(cpu, &mut one) };
        if unsafe { libc::sched_setaffinity(0, size, &one) } != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
        // SAFETY: sched_getcpu has no preconditions.
        let now = unsafe { libc::sched_getcpu() };
        ensure!(
            now == cpu as i32,
            "pinned to CPU {cpu} but running on {now}"
        );
        Ok(Pinned { old, cpu })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restores the mask read in `first_cpu`.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.old) };
    }
}

/// What a program under test must do with the frame, checked on every round.
pub type Check<'a> = &'a dyn Fn(u32, &[u8]) -> Result<()>;

impl Rig {
    /// Builds the namespace and loads lb. The client (10.0.0.2, fd00::2) is on-link; all
    /// backends (10.1.0.0/16, 10.2.0.0/16, fd01::/64) sit behind a router (10.0.0.254,
    /// fd00::fe), so every route lookup succeeds with two static neighbour entries.
    pub fn new(ct_capacity: u32, ct_new_capacity: u32, table_capacity: u32) -> Result<Rig> {
        let ns = NetNs::new(&format!("lbb{}", std::process::id()))?;
        ns.ip(&[
            "link", "add", "ba", "type", "veth", "peer", "name", "ba-peer",
        ])?;
        ns.ip(&["link", "set", "ba", "address", "02:00:00:00:00:a0"])?;
        ns.ip(&["link", "set", "ba", "up"])?;
        ns.ip(&["link", "set", "ba-peer", "up"])?;
        ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "ba"])?;
        ns.ip(&["-6", "addr", "add", "fd00::1/64", "dev", "ba", "nodad"])?;
        ns.sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        for (ip, mac) in [
            ("10.0.0.2", "02:00:00:00:00:0c"),
            ("fd00::2", "02:00:00:00:00:0c"),
            ("10.0.0.254", "02:00:00:00:00:fe"),
            ("fd00::fe", "02:00:00:00:00:fe"),
            // On-link backends, for dsr-l2.
            ("10.0.0.11", "02:00:00:00:00:11"),
            ("fd00::11", "02:00:00:00:00:11"),
        ] {
            ns.ip(&[
                "neigh",
                "replace",
                ip,
                "lladdr",
                mac,
                "dev",
                "ba",
                "nud",
                "permanent",
            ])?;
        }
        ns.ip(&["route", "add", "10.1.0.0/16", "via", "10.0.0.254"])?;
        ns.ip(&["route", "add", "10.2.0.0/16", "via", "10.0.0.254"])?;
        ns.ip(&["-6", "route", "add", "fd01::/64", "via", "fd00::fe"])?;
        ns.enter()?;
        let dp = Dataplane::load(LoadOptions {
            table_capacity,
            ct_capacity,
            ct_new_capacity,
            hash_seed: Some(lb_common::hash::FLOW_HASH_SEED),
            // No flood threshold: the new-flow rows measure a stored flow; the flood row sets
            // one itself.
            flood_rate: 0,
            // The default next-hop cache.
            nexthop_max_age_ms: 0,
        })?;
        let mut bench = EbpfLoader::new()
            .load(LB_BENCH_OBJECT)
            .context("loading the bench object")?;
        for name in ["bench_wrap", "bench_pass", "bench_wrap_sb", "bench_pass_sb"] {
            let p: &mut Xdp = bench
                .program_mut(name)
                .ok_or_else(|| anyhow!("{name} missing"))?
                .try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        for name in ["bench_wrap_tc", "bench_pass_tc"] {
            let p: &mut SchedClassifier = bench
                .program_mut(name)
                .ok_or_else(|| anyhow!("{name} missing"))?
                .try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        let mut decap = EbpfLoader::new()
            .load(lb::object::LB_DECAP_OBJECT)
            .context("loading the decap object")?;
        let p: &mut Xdp = decap
            .program_mut(lb::object::LB_DECAP_PROGRAM)
            .ok_or_else(|| anyhow!("lb_decap missing"))?
            .try_into()?;
        p.load().context("loading lb_decap")?;
        let ifindex = {
            let out = Command::new("ip")
                .args(["-n", &ns.name, "-o", "link", "show", "ba"])
                .output()?;
            String::from_utf8_lossy(&out.stdout)
                .split(':')
                .next()
                .unwrap()
                .trim()
                .parse()?
        };
        Ok(Rig {
            dp,
            bench,
            decap,
            ifindex,
            tc: false,
            single_buffer: false,
            _ns: ns,
        })
    }

    fn prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut Xdp {
        ebpf.program_mut(name).unwrap().try_into().unwrap()
    }

    /// Runs a program once on `frame`; returns (action, output).
    pub fn run_once(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let (a, out, _) = if self.tc {
            run_tc(self.dp.tc_program(), self.ifindex, frame, 1)?
        } else {
            run(self.dp.program(), self.ifindex, frame, 1)?
        };
        Ok((a, out))
    }

    /// One run of the wrapper or pass program (`bench_wrap`/`bench_pass`, or their tc
    /// versions when measuring `lb_tc`).
    fn run_bench(&mut self, name: &str, frame: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, f64)> {
        if self.single_buffer {
            run(
                Self::prog(&mut self.bench, &format!("{name}_sb")),
                self.ifindex,
                frame,
                repeat,
            )
        } else if self.tc {
            let p: &mut SchedClassifier = self
                .bench
                .program_mut(&format!("{name}_tc"))
                .unwrap()
                .try_into()
                .unwrap();
            run_tc(p, self.ifindex, frame, repeat)
        } else {
            run(
                Self::prog(&mut self.bench, name),
                self.ifindex,
                frame,
                repeat,
            )
        }
    }

    /// Cost of the lb program on `frame`, per packet, restored before every run: the wrapped
    /// run's time, minus the wrapper's own (wrapper → bench_pass), plus the floor (bench_pass
    /// alone). `vary_at`: see `BenchFrame`. `check` is applied to every round's result; lb's
    /// counters, read before and after, must show one verdict per run of lb and what `expect`
    /// says.
    pub fn measure_lb(
        &mut self,
        frame: &[u8],
        vary_at: u32,
        repeat: u32,
        rounds: usize,
        expect: Expect,
        check: Check,
    ) -> Result<Sample> {
        let lb_fd = if self.tc {
            self.dp.tc_program().fd()?.try_clone()?
        } else {
            self.dp.program().fd()?.try_clone()?
        };
        let unconfirmed = lb::state::CtTable::Unconfirmed;
        let fill_before = match expect.flows {
            NewFlows::Unchecked => None,
            _ => {
                self.dp.maps.flows.flush_unconfirmed()?;
                let capacity = self.dp.maps.flows.capacity(unconfirmed)?;
                let runs = repeat.max(1) as u64 * rounds as u64;
                ensure!(
                    capacity >= runs,
                    "the unconfirmed table ({capacity}) has no room for {runs} new flows"
                );
                Some((self.dp.maps.fill()?.conntrack_new.0, capacity))
            }
        };
        let before = self.dp.maps.counters.verdicts()?;
        let started = std::time::Instant::now();
        let (mut sample, runs) = self.measure_fd(&lb_fd, frame, vary_at, repeat, rounds, check)?;
        let after = self.dp.maps.counters.verdicts()?;
        let d = |c: Counter| after[c as usize] - before[c as usize];
        let verdicts: u64 = (0..VERDICT_COUNT as usize)
            .map(|i| after[i] - before[i])
            .sum();
        ensure!(
            verdicts == runs,
            "lb ran {runs} times but counted {verdicts} verdicts"
        );
        let (miss, hit, skip, failed) = (
            d(Counter::CtMiss),
            d(Counter::CtHit),
            d(Counter::CtFloodSkip),
            d(Counter::CtInsertFailed),
        );
        let new_flows = match expect.flows {
            NewFlows::Unchecked => None,
            NewFlows::Stored => {
                ensure!(
                    miss == runs && hit == 0 && skip == 0 && failed == 0,
                    "{runs} new flows: ct_miss {miss}, ct_hit {hit}, ct_flood_skip {skip}, ct_insert_failed {failed}"
                );
                Some(miss)
            }
            NewFlows::Flood { rate } => {
                let windows = started.elapsed().as_secs() + 2;
                ensure!(
                    miss == runs && hit == 0 && failed == 0 && runs - skip <= rate * windows,
                    "{runs} new flows at a flood threshold of {rate}/s: ct_miss {miss}, ct_flood_skip {skip}, ct_hit {hit}, ct_insert_failed {failed} (at most {} may be under the threshold)",
                    rate * windows
                );
                Some(miss - skip)
            }
        };
        let each = expect.each;
        ensure!(!each.is_empty(), "a row must name its verdict counter");
        for c in each {
            ensure!(
                d(*c) == runs,
                "lb ran {runs} times but counted {} {}",
                d(*c),
                lb_common::COUNTER_NAMES[*c as usize]
            );
        }
        let mut counters: Vec<String> = each
            .iter()
            .map(|c| lb_common::COUNTER_NAMES[*c as usize].to_string())
            .collect();
        if !expect.one_of.is_empty() {
            let sum: u64 = expect.one_of.iter().map(|c| d(*c)).sum();
            let parts: Vec<String> = expect
                .one_of
                .iter()
                .map(|c| format!("{} ({})", lb_common::COUNTER_NAMES[*c as usize], d(*c)))
                .collect();
            ensure!(
                sum == runs,
                "lb ran {runs} times but counted {}",
                parts.join(" + ")
            );
            counters.push(parts.join(" + "));
        }
        let fill = match fill_before {
            Some((before, capacity)) => {
                let after = self.dp.maps.fill()?.conntrack_new.0;
                // Every stored flow is still there: none was evicted while the row ran.
                let stored = new_flows.unwrap_or(0);
                ensure!(
                    after - before == stored,
                    "{stored} new flows stored, but the unconfirmed table went from {before} to {after} entries"
                );
                Some((before, after, capacity))
            }
            None => None,
        };
        sample.verified = Some(Verified {
            runs,
            counters: counters.join(", "),
            new_flows,
            fill,
        });
        Ok(sample)
    }

    /// Like `measure_lb`, for the decapsulation program: `counter` must count every run (and
    /// lb none).
    pub fn measure_decap(
        &mut self,
        frame: &[u8],
        repeat: u32,
        rounds: usize,
        counter: lb_common::DecapCounter,
        check: Check,
    ) -> Result<Sample> {
        let fd = Self::prog(&mut self.decap, lb::object::LB_DECAP_PROGRAM)
            .fd()?
            .try_clone()?;
        let counts = |rig: &Rig| -> Result<(u64, u64, u64)> {
            let c = rig.dp.maps.counters.verdicts()?;
            let stats: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(
                rig.decap
                    .map(lb_common::names::DECAP_STATS)
                    .ok_or_else(|| anyhow!("decap stats map missing"))?,
            )?;
            let mut decap = 0;
            for i in 0..lb_common::DECAP_COUNTER_COUNT {
                decap += stats.get(&i, 0)?.iter().sum::<u64>();
            }
            let this = stats.get(&(counter as u32), 0)?.iter().sum::<u64>();
            Ok((c[..VERDICT_COUNT as usize].iter().sum(), decap, this))
        };
        let (lb0, decap0, this0) = counts(self)?;
        // lb_decap is single-buffer (it may run in generic mode): its own wrapper pair.
        self.single_buffer = true;
        let r = self.measure_fd(&fd, frame, 0, repeat, rounds, check);
        self.single_buffer = false;
        let (mut sample, runs) = r?;
        let (lb1, decap1, this1) = counts(self)?;
        ensure!(
            decap1 - decap0 == runs && this1 - this0 == runs && lb1 == lb0,
            "lb_decap ran {runs} times: {} decap verdicts, {} of them {:?}, {} lb verdicts",
            decap1 - decap0,
            this1 - this0,
            counter,
            lb1 - lb0
        );
        sample.verified = Some(Verified {
            runs,
            counters: lb_common::DECAP_COUNTER_NAMES[counter as usize].to_string(),
            new_flows: None,
            fill: None,
        });
        Ok(sample)
    }

    /// Makes `lb_decap` accept `config` (what a backend's `lb decap attach` writes).
    pub fn configure_decap(&mut self, config: &lb::decap::DecapConfig) -> Result<()> {
        config.write(|name| {
            self.decap
                .take_map(name)
                .ok_or_else(|| anyhow!("decap map {name} missing"))
        })
    }

    /// One run of the decapsulation program.
    pub fn run_decap(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let (a, out, _) = run(
            Self::prog(&mut self.decap, lb::object::LB_DECAP_PROGRAM),
            self.ifindex,
            frame,
            1,
        )?;
        Ok((a, out))
    }

    /// Cost of the program `target` on `frame` (see `measure_lb`). Also returns how many
    /// times `target` ran: `repeat` × `rounds` (the wrapper's overhead is measured with
    /// another target; there is no warm-up).
    pub fn measure_fd(
        &mut self,
        target: &aya::programs::ProgramFd,
        frame: &[u8],
        vary_at: u32,
        repeat: u32,
        rounds: usize,
        check: Check,
    ) -> Result<(Sample, u64)> {
        self.set_target(target)?;
        self.set_frame(frame, vary_at)?;
        let mut v = Vec::new();
        for _ in 0..rounds {
            let (a, out, ns) = self.run_bench("bench_wrap", frame, repeat)?;
            check(a, &out)?;
            v.push(ns);
        }
        let overhead = self.wrapper_overhead(frame, repeat, rounds)?;
        // BPF_PROG_TEST_RUN runs a program max(repeat, 1) times.
        let runs = repeat.max(1) as u64 * rounds as u64;
        Ok((stats(&v, -overhead), runs))
    }

    /// The floor: bench_pass alone.
    pub fn floor(&mut self, frame: &[u8], repeat: u32, rounds: usize) -> Result<Sample> {
        let mut v = Vec::new();
        for _ in 0..rounds {
            let (a, _, ns) = self.run_bench("bench_pass", frame, repeat)?;
            if a != 2 {
                bail!("bench_pass returned {a}");
            }
            v.push(ns);
        }
        Ok(stats(&v, 0.0))
    }

    /// What restoring the frame and the tail call cost: (wrapper → pass) − (pass alone).
    fn wrapper_overhead(&mut self, frame: &[u8], repeat: u32, rounds: usize) -> Result<f64> {
        let pass_fd = if self.single_buffer {
            Self::prog(&mut self.bench, "bench_pass_sb")
                .fd()?
                .try_clone()?
        } else if self.tc {
            let p: &mut SchedClassifier = self
                .bench
                .program_mut("bench_pass_tc")
                .unwrap()
                .try_into()?;
            p.fd()?.try_clone()?
        } else {
            Self::prog(&mut self.bench, "bench_pass")
                .fd()?
                .try_clone()?
        };
        self.set_target(&pass_fd)?;
        let mut wrapped = Vec::new();
        for _ in 0..rounds {
            let (_, _, ns) = self.run_bench("bench_wrap", frame, repeat)?;
            wrapped.push(ns);
        }
        let floor = self.floor(frame, repeat, rounds)?;
        Ok(stats(&wrapped, 0.0).median - floor.median)
    }

    fn set_target(&mut self, fd: &aya::programs::ProgramFd) -> Result<()> {
        let map = if self.single_buffer {
            BENCH_SB_PROGS_MAP
        } else if self.tc {
            BENCH_TC_PROGS_MAP
        } else {
            BENCH_PROGS_MAP
        };
        let mut progs: ProgramArray<_> = ProgramArray::try_from(self.bench.map_mut(map).unwrap())?;
        progs.set(0, fd, 0)?;
        Ok(())
    }

    fn set_frame(&mut self, frame: &[u8], vary_at: u32) -> Result<()> {
        if !frame.len().is_multiple_of(8) || frame.len() > BENCH_MAX_FRAME {
            bail!(
                "bench frames must be a multiple of 8 bytes, at most {BENCH_MAX_FRAME} (got {})",
                frame.len()
            );
        }
        let mut f = BenchFrame {
            len: frame.len() as u32,
            vary_at,
            words: [0; BENCH_MAX_FRAME / 8],
        };
        for (i, chunk) in frame.chunks(8).enumerate() {
            f.words[i] = u64::from_ne_bytes(chunk.try_into().unwrap());
        }
        let mut m: Array<_, BenchFrame> =
            Array::try_from(self.bench.map_mut(BENCH_FRAME_MAP).unwrap())?;
        m.set(0, f, 0)?;
        Ok(())
    }
}

/// `struct xdp_md` for ctx_in: data, data_end, data_meta, ingress_ifindex, rx_queue, egress.
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let fields = [0u32, len as u32, 0, ifindex, 0, 0];
    let mut b = [0u8; 24];
    for (i, f) in fields.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&f.to_ne_bytes());
    }
    b
}

/// One BPF_PROG_TEST_RUN: (action, output frame, ns per run as the kernel reports it).
fn run(prog: &mut Xdp, ifindex: u32, frame: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, f64)> {
    let mut out = vec![0u8; frame.len() + 256];
    let ctx = xdp_md(frame.len(), ifindex);
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..TestRunOptions::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out, r.duration.as_nanos() as f64))
}

/// `struct __sk_buff` for ctx_in (192 bytes): `ingress_ifindex` (offset 36) and `ifindex` (40).
fn sk_buff(ifindex: u32) -> [u8; 192] {
    let mut b = [0u8; 192];
    b[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    b[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    b
}

/// `run` for a tc program, its action in XDP's terms (TC_ACT_UNSPEC, TC_ACT_OK: XDP_PASS, TC_ACT_SHOT:
/// XDP_DROP, TC_ACT_REDIRECT: XDP_TX — every path measured here goes back out of the
/// interface it came in on).
fn run_tc(
    prog: &mut SchedClassifier,
    ifindex: u32,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, Vec<u8>, f64)> {
    let mut out = vec![0u8; frame.len() + 256];
    let ctx = sk_buff(ifindex);
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..TestRunOptions::default()
    })?;
    out.truncate(r.data_size_out as usize);
    let action = match r.return_value as i32 {
        // TC_ACT_UNSPEC (lb's pass: on to the next program) or TC_ACT_OK (bench_pass_tc).
        -1 | 0 => 2,
        2 => 1,
        7 => 3,
        other => bail!("a tc program returned {other}"),
    };
    Ok((action, out, r.duration.as_nanos() as f64))
}

/// One run of any XDP program on `frame` (ingress ifindex 1: loopback).
pub fn run_raw(prog: &mut Xdp, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let (a, out, _) = run(prog, 1, frame, 1)?;
    Ok((a, out))
}

fn stats(v: &[f64], offset: f64) -> Sample {
    let mut s: Vec<f64> = v.iter().map(|x| x + offset).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    Sample {
        median: at(0.5),
        p10: at(0.1),
        p90: at(0.9),
        verified: None,
    }
}

/// Destination of an IPv4/IPv6 TCP/UDP frame.
pub fn dst_of(frame: &[u8]) -> Option<SocketAddr> {
    endpoints(frame).map(|(_, d)| d)
}

/// (source, destination) of an IPv4/IPv6 TCP/UDP frame.
pub fn endpoints(frame: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (s, d): (std::net::IpAddr, std::net::IpAddr) = match p.net? {
        NetSlice::Ipv4(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        NetSlice::Ipv6(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => return None,
    };
    let (sp, dp) = match p.transport? {
        TransportSlice::Tcp(t) => (t.source_port(), t.destination_port()),
        TransportSlice::Udp(u) => (u.source_port(), u.destination_port()),
        _ => return None,
    };
    Some((SocketAddr::new(s, sp), SocketAddr::new(d, dp)))
}

/// What the kernel reports of one loaded program: the instructions the verifier processed (all
/// paths it explored; kernel ≥ 5.16) and the length of the translated program, in BPF
/// instructions. Both are exact and do not depend on the machine's noise.
pub struct ProgramSize {
    pub name: String,
    pub verified: Option<u32>,
    pub xlated: Option<u32>,
}

impl Rig {
    /// The sizes of lb's programs as loaded here: `lb_xdp`, the programs it tail-calls, the
    /// same as tc programs, and the backends' `lb_decap`.
    pub fn program_sizes(&self) -> Result<Vec<ProgramSize>> {
        let mut out = Vec::new();
        let mut one = |name: &str, info: aya::programs::ProgramInfo| -> Result<()> {
            out.push(ProgramSize {
                name: name.to_string(),
                verified: info.verified_instruction_count(),
                xlated: info.size_translated().map(|b| b / 8),
            });
            Ok(())
        };
        let ebpf = &self.dp.ebpf;
        for name in std::iter::once(lb::object::LB_XDP_PROGRAM).chain(lb_common::TAIL_PROGRAMS) {
            let p: &Xdp = ebpf
                .program(name)
                .ok_or_else(|| anyhow!("{name} missing"))?
                .try_into()?;
            one(
                name,
                p.info().with_context(|| format!("reading {name}'s info"))?,
            )?;
        }
        for name in std::iter::once(lb::object::LB_TC_PROGRAM).chain(lb_common::TC_TAIL_PROGRAMS) {
            let p: &SchedClassifier = ebpf
                .program(name)
                .ok_or_else(|| anyhow!("{name} missing"))?
                .try_into()?;
            one(
                name,
                p.info().with_context(|| format!("reading {name}'s info"))?,
            )?;
        }
        let p: &Xdp = self
            .decap
            .program(lb::object::LB_DECAP_PROGRAM)
            .ok_or_else(|| anyhow!("lb_decap missing"))?
            .try_into()?;
        one(
            lb::object::LB_DECAP_PROGRAM,
            p.info().context("reading lb_decap's info")?,
        )?;
        Ok(out)
    }
}
