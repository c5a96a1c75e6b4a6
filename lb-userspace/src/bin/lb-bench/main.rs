//! `cargo xtask bench`: lb's numbers, written to BENCHMARKS.md (and a chart).
//!
//! Per-packet cost by path (BPF_PROG_TEST_RUN, the frame restored before every run, checked
//! after every round), its scaling with VIPs / backends / conntrack fill, control-plane
//! timings, and end-to-end connections and requests per second against nftables and HAProxy.

mod control;
mod e2e;
mod per_packet;
mod report;
mod rig;
mod scale_cp;

use std::{path::PathBuf, time::Instant};

use anyhow::Result;
use clap::Parser;
use lb_common::DEFAULT_TABLE_SIZE;

use per_packet::{configure, est_and_new, fill_conntrack, paths, Settings};
use rig::Rig;

#[derive(Parser)]
#[command(about = "lb benchmarks")]
pub struct Args {
    /// A smoke run: fewer repetitions, rounds and sizes (under two minutes).
    #[arg(long)]
    pub quick: bool,
    /// The lb binary (default: next to this one).
    #[arg(long)]
    pub lb: Option<PathBuf>,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Skip the end-to-end runs (they need wrk, nftables and haproxy).
    #[arg(long)]
    pub no_e2e: bool,
    /// Skip "Control plane at scale" (about a minute of large configurations).
    #[arg(long)]
    pub no_scale: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let lb_bin = match &args.lb {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("lb"),
    };
    let s = if args.quick {
        Settings {
            repeat: 20_000,
            rounds: 5,
        }
    } else {
        Settings {
            repeat: 50_000,
            rounds: 11,
        }
    };
    let mut rep = report::Report::new(&args, &s);

    // One CPU for every measurement: the wrapper's source-address sequence is per CPU.
    let pinned = rig::Pinned::first_cpu()?;
    eprintln!("per-packet cost by path (pinned to CPU {})…", pinned.cpu);
    // The unconfirmed table is emptied before every new-flow row and holds all of the row's
    // new flows; the confirmed table holds the established flows and the 1M-flow fill.
    let ct_new = ((s.repeat as usize * s.rounds).next_power_of_two() as u32).max(1 << 16);
    let ct = 4 << 20;
    let max_backends = (DEFAULT_TABLE_SIZE / lb::error::MIN_SLOTS_PER_BACKEND) as usize;
    {
        let mut rig = Rig::new(ct, ct_new, 8 * DEFAULT_TABLE_SIZE)?;
        configure(&mut rig, 2, DEFAULT_TABLE_SIZE)?;
        let (floor, results) = paths(&mut rig, &s)?;
        rep.paths(floor, &results);
        let previous = std::fs::read_to_string(&args.out).unwrap_or_default();
        rep.program_sizes(&rig.program_sizes()?, &previous);
        eprintln!("control plane…");
        let sizes: &[usize] = &[10, 100, 1000];
        rep.control(&control::table_times(
            &mut rig,
            sizes,
            if args.quick { 3 } else { 7 },
        )?);
        let (mem, per) = control::conntrack_memory(&rig, ct)?;
        rep.conntrack_memory(ct, mem, per);
    }

    eprintln!("scaling…");
    let mut scaling = Vec::new();
    let vip_counts: &[usize] = if args.quick { &[1, 512] } else { &[1, 64, 512] };
    for &n in vip_counts {
        let mut rig = Rig::new(ct, ct_new, 600 * 251 + 2 * DEFAULT_TABLE_SIZE)?;
        configure(&mut rig, 2, DEFAULT_TABLE_SIZE)?;
        for i in 1..n {
            let v = lb::Vip::new(
                format!("10.101.{}.{}:80", i / 250, 1 + i % 250).parse()?,
                lb::Proto::Tcp,
            );
            rig.dp.maps.add_vip(&v, 251)?;
            rig.dp.maps.set_backends(
                &v,
                &[(format!("10.2.{}.{}:80", i / 250, 1 + i % 250).parse()?, 1)],
            )?;
        }
        let (e, nf) = est_and_new(&mut rig, &s)?;
        scaling.push((format!("{n} VIPs"), e, nf));
    }
    let backend_counts: Vec<usize> = if args.quick {
        vec![2, 1000]
    } else {
        vec![2, 100, 1000, max_backends]
    };
    for &n in &backend_counts {
        let mut rig = Rig::new(ct, ct_new, 8 * DEFAULT_TABLE_SIZE)?;
        configure(&mut rig, n, DEFAULT_TABLE_SIZE)?;
        let (e, nf) = est_and_new(&mut rig, &s)?;
        let label = if n == max_backends {
            format!("{n} backends (the maximum at M = 65537)")
        } else {
            format!("{n} backends")
        };
        scaling.push((label, e, nf));
    }
    for &fill in &[0usize, 1_000_000] {
        if args.quick && fill > 0 {
            continue;
        }
        let mut rig = Rig::new(ct, ct_new, 8 * DEFAULT_TABLE_SIZE)?;
        configure(&mut rig, 2, DEFAULT_TABLE_SIZE)?;
        fill_conntrack(&mut rig, fill)?;
        // The confirmed table's fill as the kernel reports it, not as asked for.
        let held = rig.dp.maps.fill()?.conntrack.0;
        let (e, nf) = est_and_new(&mut rig, &s)?;
        scaling.push((format!("conntrack holding {held} flows"), e, nf));
    }
    rep.scaling(&scaling);
    // The rest runs other processes (lb, wrk, servers), which would inherit the pinning.
    drop(pinned);

    eprintln!("time from `lb backend set` to the first packet on the new table…");
    rep.set_latency(control::set_to_first_packet(&lb_bin)?);

    if !args.no_scale {
        eprintln!("control plane at scale…");
        rep.control_at_scale(&scale_cp::at_scale(&lb_bin, args.quick)?);
    }

    if !args.no_e2e {
        eprintln!("end to end (wrk)…");
        let (rounds, secs) = if args.quick { (1, 2) } else { (3, 5) };
        rep.e2e(&e2e::run(&lb_bin, rounds, secs)?, rounds, secs);
    }
    rep.write(&args.out, started.elapsed())?;
    eprintln!(
        "wrote {} in {:.0} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
