//! End to end through the demo topology: connections/s and requests/s from wrk through lb
//! (native and generic XDP), nftables DNAT (kernel conntrack NAT, like kube-proxy's nftables
//! mode) and HAProxy in TCP mode — same client, same backends, alternating, several rounds.

use std::{collections::HashMap, net::SocketAddr, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use lb::testbed::{Testbed, HTTP_PORT};

pub const SETUPS: [&str; 4] = [
    "lb native XDP",
    "lb generic XDP",
    "nftables DNAT",
    "HAProxy (TCP)",
];

#[derive(Clone, Debug, Default)]
pub struct E2eResult {
    /// setup → per-round values
    pub cps: HashMap<String, Vec<f64>>,
    pub rps: HashMap<String, Vec<f64>>,
    /// machine CPU µs per connection (connection runs)
    pub cpu_us_per_conn: HashMap<String, Vec<f64>>,
}

const VIP: &str = "10.100.0.100";

pub fn run(lb_bin: &std::path::Path, rounds: usize, secs: u32) -> Result<E2eResult> {
    let tb = Testbed::new(3, "native", lb_bin)?;
    let vip = format!("{VIP}:80/tcp");
    tb.lb(&["vip", "add", &vip])?;
    let backends: Vec<SocketAddr> = tb
        .backends
        .iter()
        .map(|b| SocketAddr::new(b.v4, HTTP_PORT))
        .collect();
    for b in &backends {
        tb.lb(&["backend", "add", &vip, &b.to_string()])?;
    }
    tb.lb(&["detach"])?;
    let ifaces: Vec<String> = (0..=backends.len()).map(|i| format!("g{i}")).collect();
    let mut r = E2eResult::default();
    for round in 0..rounds {
        // Alternate the order from round to round.
        let mut order: Vec<&str> = SETUPS.to_vec();
        order.rotate_left(round % SETUPS.len());
        for setup in order {
            let guard = enable(&tb, setup, &ifaces, &backends)?;
            // Warm up (neighbour entries, conntrack), then measure.
            wrk(&tb, 1, false)?;
            let cpu0 = cpu_seconds()?;
            let cps = wrk(&tb, secs, true)?;
            let cpu = cpu_seconds()? - cpu0;
            let rps = wrk(&tb, secs, false)?;
            drop(guard);
            disable(&tb, setup)?;
            eprintln!(
                "  round {}: {setup}: {cps:.0} conn/s, {rps:.0} req/s",
                round + 1
            );
            r.cps.entry(setup.into()).or_default().push(cps);
            r.rps.entry(setup.into()).or_default().push(rps);
            r.cpu_us_per_conn
                .entry(setup.into())
                .or_default()
                .push(cpu * 1e6 / (cps * secs as f64).max(1.0));
        }
    }
    Ok(r)
}

/// A child process to kill when the round ends (HAProxy).
struct Child(Option<std::process::Child>);

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sh(args: &[&str]) -> Result<()> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !o.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

fn enable(tb: &Testbed, setup: &str, ifaces: &[String], backends: &[SocketAddr]) -> Result<Child> {
    let gw = &tb.gateway.name;
    match setup {
        "lb native XDP" | "lb generic XDP" => {
            let mode = if setup.contains("native") {
                "native"
            } else {
                "generic"
            };
            let mut args = vec!["attach"];
            args.extend(ifaces.iter().map(String::as_str));
            args.extend(["--mode", mode]);
            tb.lb(&args)?;
            Ok(Child(None))
        }
        "nftables DNAT" => {
            let map: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {} . {}", b.ip(), b.port()))
                .collect();
            let rules = format!(
                "table ip lbbench {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n  ip daddr {VIP} tcp dport 80 dnat ip to numgen random mod {} map {{ {} }}\n }}\n}}\n",
                backends.len(),
                map.join(", ")
            );
            let file = std::env::temp_dir().join(format!("lbb{}-nft", std::process::id()));
            std::fs::write(&file, rules)?;
            sh(&[
                "ip",
                "netns",
                "exec",
                gw,
                "nft",
                "-f",
                file.to_str().unwrap(),
            ])?;
            Ok(Child(None))
        }
        "HAProxy (TCP)" => {
            sh(&[
                "ip",
                "-n",
                gw,
                "addr",
                "add",
                &format!("{VIP}/32"),
                "dev",
                "lo",
            ])?;
            let servers: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("  server s{i} {b}"))
                .collect();
            let cfg = format!(
                "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\nfrontend f\n  bind {VIP}:80\n  default_backend b\nbackend b\n  balance roundrobin\n{}\n",
                servers.join("\n")
            );
            let file = std::env::temp_dir().join(format!("lbb{}-haproxy.cfg", std::process::id()));
            std::fs::write(&file, cfg)?;
            let child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    gw,
                    "haproxy",
                    "-db",
                    "-f",
                    file.to_str().unwrap(),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting haproxy")?;
            // Wait (bounded) until HAProxy listens.
            let mut child = Child(Some(child));
            for _ in 0..50 {
                if let Some(c) = child.0.as_mut() {
                    if let Some(st) = c.try_wait()? {
                        bail!(
                            "haproxy exited at start ({st}); run `haproxy -c -f {}`",
                            file.display()
                        );
                    }
                }
                let ss = Command::new("ip")
                    .args(["netns", "exec", gw, "ss", "-Hltn", "sport", "=", ":80"])
                    .output()?;
                if !String::from_utf8_lossy(&ss.stdout).trim().is_empty() {
                    return Ok(child);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            bail!("haproxy did not start listening")
        }
        _ => unreachable!(),
    }
}

fn disable(tb: &Testbed, setup: &str) -> Result<()> {
    let gw = &tb.gateway.name;
    match setup {
        "lb native XDP" | "lb generic XDP" => {
            tb.lb(&["detach"])?;
        }
        "nftables DNAT" => sh(&[
            "ip", "netns", "exec", gw, "nft", "delete", "table", "ip", "lbbench",
        ])?,
        "HAProxy (TCP)" => sh(&[
            "ip",
            "-n",
            gw,
            "addr",
            "del",
            &format!("{VIP}/32"),
            "dev",
            "lo",
        ])?,
        _ => unreachable!(),
    }
    Ok(())
}

/// wrk from the client namespace; returns requests per second. With `close`, every request
/// is a new connection (connections per second).
fn wrk(tb: &Testbed, secs: u32, close: bool) -> Result<f64> {
    let url = format!("http://{VIP}:80/");
    let dur = format!("{secs}s");
    let mut args = vec![
        "netns",
        "exec",
        &tb.client.name,
        "wrk",
        "-t1",
        "-c32",
        "-d",
        &dur,
        "--timeout",
        "2s",
    ];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let o = Command::new("ip")
        .args(&args)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&o.stderr));
    }
    if let Some(l) = text.lines().find(|l| l.contains("Socket errors")) {
        eprintln!("  wrk: {}", l.trim());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {text}"))
}

/// Busy CPU seconds of the whole machine so far (all namespaces share it).
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let f: Vec<f64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    let hz = 100.0; // USER_HZ
    Ok(busy / hz)
}
