//! Control-plane figures: table build and map update times, time from `lb backend set` to the
//! first packet that uses the new table, conntrack memory.

use std::{net::SocketAddr, process::Command, time::Instant};

use anyhow::{ensure, Context, Result};
use lb::{
    maglev::{self, TableEntry},
    Vip,
};

use crate::{
    per_packet::{backend_addr, sa, tcp_frame, VIP4},
    rig::{dst_of, Rig},
};

pub struct BuildTime {
    pub backends: usize,
    pub build_ms: f64,
    pub update_ms: f64,
    pub slots_written: u32,
    pub reweight_ms: f64,
    pub reweight_slots: u32,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Table build (pure computation) and the full map update through the library, M = 65537.
pub fn table_times(rig: &mut Rig, sizes: &[usize], rounds: usize) -> Result<Vec<BuildTime>> {
    let mut out = Vec::new();
    for (k, &n) in sizes.iter().enumerate() {
        let entries: Vec<TableEntry<u32>> = (0..n)
            .map(|i| TableEntry {
                identity: backend_addr(i, false).to_string().into_bytes(),
                weight: 1 + (i % 3) as u32,
                value: i as u32,
            })
            .collect();
        let build_ms = median(
            (0..rounds)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(maglev::build(&entries, 65_537));
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        );
        let vip = Vip::new(format!("10.100.1.{k}:80").parse()?, lb::Proto::Tcp);
        rig.dp.maps.add_vip(&vip, 65_537)?;
        let want: Vec<(SocketAddr, u32)> = (0..n)
            .map(|i| {
                (
                    SocketAddr::new(
                        format!("10.{}.{}.{}", 2 + k, i / 250, 1 + i % 250)
                            .parse()
                            .unwrap(),
                        80,
                    ),
                    1 + (i % 3) as u32,
                )
            })
            .collect();
        let t = Instant::now();
        let c = rig.dp.maps.set_backends(&vip, &want)?;
        let update_ms = t.elapsed().as_secs_f64() * 1e3;
        // One backend's weight, changed back and forth: the median of `rounds` changes.
        let mut rw = want.clone();
        let mut times = Vec::new();
        let mut reweight_slots = 0;
        for r in 0..rounds.max(1) {
            rw[0].1 = if r % 2 == 0 { want[0].1 + 5 } else { want[0].1 };
            let t = Instant::now();
            let c2 = rig.dp.maps.set_backends(&vip, &rw)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            if r == 0 {
                reweight_slots = c2.slots_written;
            }
        }
        let reweight_ms = median(times);
        out.push(BuildTime {
            backends: n,
            build_ms,
            update_ms,
            slots_written: c.slots_written,
            reweight_ms,
            reweight_slots,
        });
        rig.dp.maps.del_vip(&vip)?;
    }
    Ok(out)
}

/// Time from starting `lb backend set` (the real binary, on pinned maps; a drained backend is
/// given almost all the weight) until a new flow is sent to that backend — measured by running packets through the
/// attached program's twin (the same pinned program, via BPF_PROG_TEST_RUN) until it does.
pub fn set_to_first_packet(lb_bin: &std::path::Path) -> Result<(f64, f64)> {
    let pin = format!("/sys/fs/bpf/lbb{}-pin", std::process::id());
    let lb = |args: &[&str]| -> Result<()> {
        let st = Command::new(lb_bin)
            .args(args)
            .env("LB_PIN_DIR", &pin)
            .output()?;
        ensure!(
            st.status.success(),
            "lb {args:?}: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        Ok(())
    };
    let vip = "10.100.0.100:80/tcp";
    lb(&[
        "vip",
        "add",
        vip,
        "--conntrack-size",
        "65536",
        "--table-capacity",
        "131072",
    ])?;
    lb(&["backend", "add", vip, "10.1.1.1:8080"])?;
    let mut prog = aya::programs::Xdp::from_pin(
        format!("{pin}/prog_lb_xdp"),
        aya_obj::programs::XdpAttachType::Interface,
    )?;
    let mut results = Vec::new();
    for round in 0..5u16 {
        let target = format!("10.1.2.{}:8080", round + 1);
        lb(&["backend", "add", vip, &target, "--weight", "0"])?;
        let t = Instant::now();
        let mut child = Command::new(lb_bin)
            .args(["backend", "set", vip, &target, "--weight", "65535"])
            .stdout(std::process::Stdio::null())
            .env("LB_PIN_DIR", &pin)
            .spawn()?;
        let mut seen = None;
        for i in 0..2_000_000u32 {
            // A new flow every time (an old one would stay on its backend via conntrack).
            let client = std::net::SocketAddr::new(
                std::net::Ipv4Addr::from(0x0a00_0000 | (round as u32) << 20 | (i & 0xf_ffff))
                    .into(),
                40000,
            );
            let syn = tcp_frame(client, sa(VIP4), true);
            let (a, out) = crate::rig::run_raw(&mut prog, &syn)?;
            // Any rewrite counts (TX, REDIRECT or PASS to the kernel: the route does not matter).
            if (2..=4).contains(&a) {
                if let Some(d) = dst_of(&out) {
                    if d.ip().to_string().starts_with("10.1.2.") {
                        seen = Some(t.elapsed());
                        break;
                    }
                }
            }
            if t.elapsed().as_secs() > 10 {
                break;
            }
        }
        let cmd_time = {
            child.wait()?;
            t.elapsed()
        };
        let seen = seen.context("the new backend never got the flow")?;
        results.push((seen.as_secs_f64() * 1e3, cmd_time.as_secs_f64() * 1e3));
        lb(&["backend", "del", vip, &format!("10.1.2.{}:8080", round + 1)])?;
    }
    let _ = Command::new(lb_bin)
        .args(["detach", "--purge"])
        .env("LB_PIN_DIR", &pin)
        .output();
    Ok((
        median(results.iter().map(|r| r.0).collect()),
        median(results.iter().map(|r| r.1).collect()),
    ))
}

/// Memory of the conntrack map as the kernel accounts it (bpftool's bytes_memlock), total and
/// per entry of capacity.
pub fn conntrack_memory(rig: &Rig, capacity: u32) -> Result<(f64, f64)> {
    let id = rig.dp.maps.flows.conntrack_map_id()?;
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "id", &id.to_string()])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool map show")?;
    let bytes = v["bytes_memlock"].as_f64().context("no bytes_memlock")?;
    Ok((bytes, bytes / capacity as f64))
}
