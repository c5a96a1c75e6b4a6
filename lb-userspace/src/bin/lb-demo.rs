//! `cargo xtask demo`: lb balancing real connections through a virtual gateway.
//!
//! Builds a client, a gateway and four backends in network namespaces (lb::testbed), drives
//! the real `lb` binary as an operator would, sends real HTTP connections and UDP flows to a
//! VIP, and reports the distribution against the weights; then drains one backend and removes
//! another while long-lived connections are open, and shows what happened to them.
//! Everything is torn down at the end, on failure, and on Ctrl-C.

use std::{
    collections::HashMap, io::Write, net::SocketAddr, path::PathBuf, process::ExitCode,
    time::Instant,
};

use anyhow::{Context, Result};
use clap::Parser;
use lb::testbed::{cleanup_prefix, run_prefix, LineConn, Testbed, HTTP_PORT, LINE_PORT, UDP_PORT};

#[derive(Parser)]
#[command(about = "lb demo: real connections through an XDP load balancer in network namespaces")]
struct Args {
    /// The lb binary (default: next to this one).
    #[arg(long)]
    lb: Option<PathBuf>,
    /// XDP mode for the gateway's interfaces.
    #[arg(long, default_value = "native")]
    mode: String,
    /// HTTP connections in the distribution run.
    #[arg(long, default_value_t = 600)]
    connections: usize,
}

const WEIGHTS: [u32; 4] = [1, 2, 3, 2];
const VIP: &str = "10.100.0.100";

fn main() -> ExitCode {
    let args = Args::parse();
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing down the demo network");
        cleanup_prefix(&run_prefix());
        std::process::exit(130);
    })
    .expect("installing the Ctrl-C handler");
    let started = Instant::now();
    let r = run(&args);
    // The testbed is dropped inside run(); this catches anything left by a panic.
    cleanup_prefix(&run_prefix());
    match r {
        Ok(()) => {
            println!(
                "\ndemo finished in {:.0} s; network torn down",
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(s: &str) {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m==> {s}\x1b[0m");
    } else {
        println!("\n==> {s}");
    }
}

fn lb(tb: &Testbed, args: &[&str]) -> Result<String> {
    println!("  $ lb {}", args.join(" "));
    tb.lb(args)
}

fn progress(done: usize, total: usize) {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return;
    }
    if done.is_multiple_of(20) || done == total {
        print!("\r  {done}/{total}");
        let _ = std::io::stdout().flush();
        if done == total {
            println!();
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let lb_bin = match &args.lb {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("lb"),
    };
    let how = if args.mode == "tc" {
        "the tc program".to_string()
    } else {
        format!("{} XDP", args.mode)
    };
    step(&format!(
        "Building the network: a client, a gateway running lb ({how} on all its interfaces), 4 backends with an HTTP server (:{HTTP_PORT}), a line server (:{LINE_PORT}) and a UDP echo server (:{UDP_PORT})"
    ));
    let tb = Testbed::new(4, &args.mode, &lb_bin).context("building the demo network")?;
    for b in &tb.backends {
        println!("  {:<10} {} / {}", b.name, b.v4, b.v6);
    }
    println!("  client     {} / {}", tb.client_v4, tb.client_v6);

    step("Configuring the VIPs with the lb command, weights 1:2:3:2");
    let http_vip = format!("{VIP}:80/tcp");
    let line_vip = format!("{VIP}:{LINE_PORT}/tcp");
    let udp_vip = format!("{VIP}:53/udp");
    for (vip, port) in [
        (&http_vip, HTTP_PORT),
        (&line_vip, LINE_PORT),
        (&udp_vip, UDP_PORT),
    ] {
        lb(&tb, &["vip", "add", vip])?;
        for (b, w) in tb.backends.iter().zip(WEIGHTS) {
            let addr = SocketAddr::new(b.v4, port).to_string();
            lb(
                &tb,
                &["backend", "add", vip, &addr, "--weight", &w.to_string()],
            )?;
        }
    }
    print!("{}", lb(&tb, &["table", &http_vip])?);

    step(&format!(
        "{} HTTP connections from the client to {VIP}:80",
        args.connections
    ));
    let vip80: SocketAddr = format!("{VIP}:80").parse()?;
    let mut served: HashMap<String, usize> = HashMap::new();
    let mut failed = 0;
    let t = Instant::now();
    for i in 1..=args.connections {
        match tb.http_get(vip80) {
            Ok((name, _)) => *served.entry(name).or_default() += 1,
            Err(_) => failed += 1,
        }
        progress(i, args.connections);
    }
    println!(
        "  {} connections in {:.1} s, {failed} failed",
        args.connections,
        t.elapsed().as_secs_f64()
    );
    report(&tb, &served, args.connections, &WEIGHTS.map(|w| w as f64));

    step(
        "60 UDP flows of 5 datagrams each to {VIP}:53"
            .replace("{VIP}", VIP)
            .as_str(),
    );
    let vip53: SocketAddr = format!("{VIP}:53").parse()?;
    let mut udp_served: HashMap<String, usize> = HashMap::new();
    let mut sticky = 0;
    let mut from_vip = 0;
    for _ in 0..60 {
        let replies = tb.udp_flow(vip53, 5)?;
        if replies.iter().all(|(_, n)| *n == replies[0].1) {
            sticky += 1;
        }
        from_vip += replies.iter().filter(|(f, _)| *f == vip53).count();
        *udp_served.entry(replies[0].1.clone()).or_default() += 1;
    }
    println!("  {sticky}/60 flows stayed on one backend; {from_vip}/300 replies came from {vip53}");
    report(&tb, &udp_served, 60, &WEIGHTS.map(|w| w as f64));

    step("lb stats");
    print!("{}", lb(&tb, &["stats"])?);

    step(&format!(
        "Opening 40 long-lived connections to {VIP}:{LINE_PORT}"
    ));
    let vip_line: SocketAddr = format!("{VIP}:{LINE_PORT}").parse()?;
    let mut conns: Vec<LineConn> = (0..40)
        .map(|_| tb.open_line(vip_line))
        .collect::<Result<_>>()?;
    let mut per: HashMap<String, usize> = HashMap::new();
    for c in &conns {
        *per.entry(c.backend.clone()).or_default() += 1;
    }
    for b in &tb.backends {
        println!(
            "  {:<10} {} connections",
            b.name,
            per.get(&b.name).unwrap_or(&0)
        );
    }

    step("Draining backend-2 (weight 0) and removing backend-3, on every VIP");
    for (vip, port) in [
        (&http_vip, HTTP_PORT),
        (&line_vip, LINE_PORT),
        (&udp_vip, UDP_PORT),
    ] {
        let b2 = SocketAddr::new(tb.backends[1].v4, port).to_string();
        let b3 = SocketAddr::new(tb.backends[2].v4, port).to_string();
        lb(&tb, &["backend", "set", vip, &b2, "--weight", "0"])?;
        lb(&tb, &["backend", "del", vip, &b3])?;
    }

    step("The long-lived connections after the change");
    let mut alive: HashMap<String, (usize, usize)> = HashMap::new();
    for c in conns.iter_mut() {
        let ok = matches!(c.ping(), Ok(ref n) if *n == c.backend);
        let e = alive.entry(c.backend.clone()).or_default();
        e.1 += 1;
        if ok {
            e.0 += 1;
        }
    }
    // Each line says what was measured: all, some or none of the backend's connections
    // still answered from it.
    for b in &tb.backends {
        let (ok, total) = alive.get(&b.name).copied().unwrap_or((0, 0));
        let what = match (b.name.as_str(), ok == total) {
            ("backend-3", _) if ok == 0 => format!(
                "removed: none of its {total} connections answer, its flows were re-balanced and the new backend resets them"
            ),
            ("backend-3", _) => {
                format!("removed: {ok} of its {total} connections still answer from it")
            }
            (name, true) => format!(
                "{}: all {total} established connections continue",
                if name == "backend-2" { "drained" } else { "unchanged" }
            ),
            (name, false) => format!(
                "{}: {} of {total} established connections broke",
                if name == "backend-2" { "drained" } else { "unchanged" },
                total - ok
            ),
        };
        println!("  {:<10} {ok}/{total} still answering   ({what})", b.name);
    }

    let n = args.connections / 2;
    step(&format!("{n} new HTTP connections after the change"));
    let mut served: HashMap<String, usize> = HashMap::new();
    let mut failed = 0;
    for i in 1..=n {
        match tb.http_get(vip80) {
            Ok((name, _)) => *served.entry(name).or_default() += 1,
            Err(_) => failed += 1,
        }
        progress(i, n);
    }
    println!("  {failed} failed");
    report(&tb, &served, n, &[1.0, 0.0, 0.0, 2.0]);
    drop(tb);
    Ok(())
}

/// Table and bar chart of connections per backend against the weights.
fn report(tb: &Testbed, served: &HashMap<String, usize>, total: usize, weights: &[f64]) {
    let sum: f64 = weights.iter().sum();
    println!(
        "\n  {:<10} {:>6} {:>9} {:>7} {:>7}",
        "backend", "weight", "expected", "got", "share"
    );
    for (b, w) in tb.backends.iter().zip(weights) {
        let got = served.get(&b.name).copied().unwrap_or(0);
        let share = 100.0 * got as f64 / total.max(1) as f64;
        let want = 100.0 * w / sum;
        let bar = "█".repeat((share / 2.0).round() as usize);
        println!(
            "  {:<10} {:>6} {:>8.1}% {:>7} {:>6.1}%  {bar}",
            b.name, w, want, got, share
        );
    }
}
