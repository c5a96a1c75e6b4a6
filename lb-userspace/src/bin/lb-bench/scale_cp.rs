//! "Control plane at scale": the real `lb` binary and agent on large configurations — 1,000
//! VIPs of 64 backends each (64,000 backends: the backend array holds 65,536), and one VIP of
//! 10,000 backends — in a namespace of their own (the agent's metrics port is on its
//! loopback).

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb::{
    maglev::{self, TableEntry},
    testbed::{in_ns, NetNs},
};

/// One figure of the section.
pub struct Row {
    pub what: String,
    pub value: String,
    /// What it is measured against (a target), or how it grows.
    pub note: String,
}

/// Large-configuration measurements. `quick`: fewer repetitions, a shorter idle sample.
pub fn at_scale(lb_bin: &Path, quick: bool) -> Result<Vec<Row>> {
    let tag = format!("lbbs{}", std::process::id());
    let ns = NetNs::new(&tag)?;
    ns.ip(&["link", "set", "lo", "up"])?;
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir)?;
    let r = (|| -> Result<Vec<Row>> {
        let mut rows = many_vips(lb_bin, &ns, &dir, &tag, quick)?;
        rows.extend(one_big_vip(lb_bin, &ns, &dir, &tag, quick)?);
        Ok(rows)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    for pin in [format!("{tag}-a"), format!("{tag}-b")] {
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/{pin}"));
    }
    r
}

const VIPS: usize = 1000;
const PER_VIP: usize = 64;

fn config(vips: usize, per_vip: usize, table: u32, changed: Option<(usize, usize)>) -> String {
    let mut out = String::new();
    for v in 0..vips {
        out += &format!(
            "[[vip]]\naddress = \"10.120.{}.{}:80/tcp\"\ntable_size = {table}\n",
            v / 250,
            1 + v % 250
        );
        for b in 0..per_vip {
            let weight = if changed == Some((v, b)) { 3 } else { 1 };
            out += &format!(
                "[[vip.backend]]\naddress = \"{}\"\nweight = {weight}\n",
                backend(v, b)
            );
        }
    }
    out
}

/// Backend `b` of VIP `v`: an address per VIP and backend (250 a port), ports from 8080.
fn backend(v: usize, b: usize) -> String {
    format!(
        "10.{}.{}.{}:{}",
        128 + v / 250,
        v % 250,
        1 + b % 250,
        8080 + b / 250
    )
}

/// Runs `lb` in `ns` with pin directory `pin`; its wall time in ms.
fn lb(lb_bin: &Path, ns: &NetNs, pin: &str, args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    let o = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg(lb_bin)
        .args(args)
        .env("LB_PIN_DIR", format!("/sys/fs/bpf/{pin}"))
        .output()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    ensure!(
        o.status.success(),
        "lb {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(ms)
}

/// `lb backend set VIP BACKEND --weight` `rounds` times, 5 and 1 in turn: each one's ms.
fn reweigh(
    lb_bin: &Path,
    ns: &NetNs,
    pin: &str,
    vip: &str,
    backend: &str,
    rounds: usize,
) -> Result<Vec<f64>> {
    (0..rounds)
        .map(|r| {
            let w = if r % 2 == 0 { "5" } else { "1" };
            lb(
                lb_bin,
                ns,
                pin,
                &["backend", "set", vip, backend, "--weight", w],
            )
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p)
}

fn many_vips(lb_bin: &Path, ns: &NetNs, dir: &Path, tag: &str, quick: bool) -> Result<Vec<Row>> {
    let pin = format!("{tag}-a");
    let empty = write(dir, "empty.toml", "")?;
    let full = write(dir, "full.toml", &config(VIPS, PER_VIP, 1031, None))?;
    let one = write(
        dir,
        "one.toml",
        &config(VIPS, PER_VIP, 1031, Some((500, 7))),
    )?;
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    // Loaded (an empty apply loads the program), then the whole configuration at once.
    lb(lb_bin, ns, &pin, &["apply", "-f", &path(&empty)])?;
    let apply_ms = lb(lb_bin, ns, &pin, &["apply", "-f", &path(&full)])?;
    let rounds = if quick { 3 } else { 7 };
    let mut change = Vec::new();
    for r in 0..rounds {
        let f = if r % 2 == 0 { &one } else { &full };
        change.push(lb(lb_bin, ns, &pin, &["apply", "-f", &path(f)])?);
    }
    let vip = "10.120.2.1:80/tcp"; // VIP 500
    let be = backend(500, 7);
    let set = reweigh(lb_bin, ns, &pin, vip, &be, rounds)?;
    let check_ms = lb(lb_bin, ns, &pin, &["check"])?;

    // The agent on the same state: it adopts it (an apply that changes nothing), serves
    // metrics on the namespace's loopback, then idles.
    let port = 9650;
    let log = dir.join("agent.log");
    let mut agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg(lb_bin)
        .args(["run", "-f", &path(&full), "--poll", "1s"])
        .args(["--metrics", &format!("127.0.0.1:{port}")])
        .env("LB_PIN_DIR", format!("/sys/fs/bpf/{pin}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let r = (|| -> Result<Vec<Row>> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !std::fs::read_to_string(&log)?.contains("configuration applied") {
            ensure!(
                Instant::now() < deadline,
                "the agent did not apply the file"
            );
            ensure!(
                agent.try_wait()?.is_none(),
                "the agent ended: {}",
                std::fs::read_to_string(&log)?
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut scrapes = Vec::new();
        let mut size = 0;
        for _ in 0..rounds {
            let (ms, bytes) = in_ns(ns, || scrape(port))??;
            scrapes.push(ms);
            size = bytes;
        }
        let idle = Duration::from_secs(if quick { 5 } else { 20 });
        let (cpu0, t0) = (cpu_ticks(&agent)?, Instant::now());
        std::thread::sleep(idle);
        let (cpu1, secs) = (cpu_ticks(&agent)?, t0.elapsed().as_secs_f64());
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu_pct = (cpu1 - cpu0) as f64 / hz / secs * 100.0;
        let rss_mib = rss_kib(&agent)? as f64 / 1024.0;
        Ok(vec![
            Row {
                what: format!("`lb apply`, {VIPS} VIPs × {PER_VIP} backends from an empty state"),
                value: format!("{apply_ms:.0} ms"),
                note: format!("{} backends, tables of 1031 slots", VIPS * PER_VIP),
            },
            Row {
                what: "`lb apply` changing one backend's weight (same state)".into(),
                value: format!("{:.0} ms", median(change)),
                note: "median; includes reading and comparing the whole state, and the repair's batched reads".into(),
            },
            Row {
                what: "`lb backend set … --weight` (same state)".into(),
                value: format!("{:.1} ms", median(set)),
                note: "median; the process's whole run".into(),
            },
            Row {
                what: "`lb check` (same state)".into(),
                value: format!("{check_ms:.0} ms"),
                note: "every invariant of every VIP and backend".into(),
            },
            Row {
                what: format!("a `/metrics` scrape ({VIPS} VIPs)"),
                value: format!("{:.0} ms", median(scrapes)),
                note: format!("target ≤ 100 ms; {} KiB page; median", size / 1024),
            },
            Row {
                what: "the idle agent: CPU".into(),
                value: format!("{cpu_pct:.2} %"),
                note: format!(
                    "of one CPU over {} s of 1 s poll ticks; target ≤ 1 %",
                    idle.as_secs()
                ),
            },
            Row {
                what: "the idle agent: memory (RSS)".into(),
                value: format!("{rss_mib:.0} MiB"),
                note: String::new(),
            },
        ])
    })();
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = lb(lb_bin, ns, &pin, &["detach", "--purge"]);
    r
}

fn one_big_vip(lb_bin: &Path, ns: &NetNs, dir: &Path, tag: &str, quick: bool) -> Result<Vec<Row>> {
    const N: usize = 10_000;
    const M: u32 = 131_071; // prime, ≥ 10 slots per backend
    let entries: Vec<TableEntry<u32>> = (0..N)
        .map(|i| TableEntry {
            identity: backend(0, i).into_bytes(),
            weight: 1,
            value: i as u32,
        })
        .collect();
    let rounds = if quick { 3 } else { 7 };
    let build = median(
        (0..rounds)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(maglev::build(&entries, M));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let pin = format!("{tag}-b");
    let full = write(dir, "big.toml", &config(1, N, M, None))?;
    let apply_ms = lb(lb_bin, ns, &pin, &["apply", "-f", full.to_str().unwrap()])?;
    let vip = "10.120.0.1:80/tcp";
    let be = backend(0, 4321);
    let set = reweigh(lb_bin, ns, &pin, vip, &be, rounds)?;
    let _ = lb(lb_bin, ns, &pin, &["detach", "--purge"]);
    Ok(vec![
        Row {
            what: format!("table build, 1 VIP × {N} backends (M = {M})"),
            value: format!("{build:.1} ms"),
            note: "median; the computation alone".into(),
        },
        Row {
            what: format!("`lb apply`, 1 VIP × {N} backends, from an empty state"),
            value: format!("{apply_ms:.0} ms"),
            note: "loading the program included".into(),
        },
        Row {
            what: format!("`lb backend set … --weight`, 1 VIP × {N} backends"),
            value: format!("{:.0} ms", median(set)),
            note: "median; the process's whole run (a new table of 131071 slots)".into(),
        },
    ])
}

/// GET /metrics on the loopback (in the caller's namespace): (ms, bytes).
fn scrape(port: u16) -> Result<(f64, usize)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting to the agent")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
    let mut page = Vec::new();
    s.read_to_end(&mut page)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !page.starts_with(b"HTTP/1.0 200") && !page.starts_with(b"HTTP/1.1 200") {
        bail!(
            "metrics: {}",
            String::from_utf8_lossy(&page[..page.len().min(200)])
        );
    }
    Ok((ms, page.len()))
}

/// The process's user + system CPU time, in clock ticks.
fn cpu_ticks(p: &Child) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.id()))?;
    // After the command name's closing parenthesis: fields 3… (utime, stime: 14, 15).
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// The process's resident memory, KiB.
fn rss_kib(p: &Child) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.id()))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
}
