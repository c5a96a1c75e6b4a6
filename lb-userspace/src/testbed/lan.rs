//! The direct-server-return network: client, gateway and backends on one L2 segment (a bridge
//! in its own namespace), so that backends answer clients directly.
//!
//! ```text
//!              bridge (ns <prefix>-sw)
//!   ┌──────────────┼───────────────┬────────────── …
//!  client        gateway          backend-1        backend-i
//!  10.0.0.2      10.0.0.1         10.0.0.11        10.0.0.(10+i)
//!  fd00::2       fd00::1          fd00::11         fd00::(10+i)
//! ```
//!
//! The client reaches the VIPs through the gateway (static routes); the backends hold the VIPs
//! on their loopback (not answering ARP for them) and, for ipip, run `lb decap`. The gateway
//! has blackhole routes to the client, so a reply that went through it would be lost: a
//! connection that works proves its replies went straight from the backend to the client.

use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};

use super::{NetNs, Servers, Testbed};

/// The gateway's MAC (static on the client, so the blackhole routes never get in the way of
/// neighbour discovery).
const GW_MAC: &str = "02:00:00:00:00:01";

impl Testbed {
    /// Builds the LAN with `n` backends holding `vips` on their loopback, starts their servers
    /// (UDP echo bound to the VIPs too), attaches lb to the gateway's one interface in `mode`
    /// and, if `decap`, `lb decap` to every backend's.
    pub fn new_lan(
        n: usize,
        mode: &str,
        lb_bin: &Path,
        vips: &[IpAddr],
        decap: bool,
    ) -> Result<Testbed> {
        assert!((1..=50).contains(&n));
        let mut tb = Testbed::empty(lb_bin)?;
        let prefix = tb.prefix.clone();
        tb.extra.push(NetNs::new(&format!("{prefix}-sw"))?);
        let sw = &tb.extra[0];
        sw.ip(&["link", "add", "br0", "type", "bridge"])?;
        sw.ip(&["link", "set", "br0", "up"])?;
        super::bridge_port(sw, "pc", &tb.client, "eth0", &["10.0.0.2/24", "fd00::2/64"])?;
        super::bridge_port(
            sw,
            "pg",
            &tb.gateway,
            "eth0",
            &["10.0.0.1/24", "fd00::1/64"],
        )?;
        tb.gateway.ip(&["link", "set", "eth0", "address", GW_MAC])?;
        if mode == "native" {
            // Frames the gateway sends with native XDP_TX go to the bridge port's XDP queue;
            // with only GRO there, they wait for the next ordinary packet (the gateway sends
            // none in DSR), so the port gets an XDP program of its own, as veth expects.
            pass_program_on(sw, "pg", &format!("/sys/fs/bpf/{prefix}-sw"))?;
        }
        tb.gateway.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ])?;
        // Replies through the gateway would die here.
        tb.gateway
            .ip(&["route", "add", "blackhole", "10.0.0.2/32"])?;
        tb.gateway
            .ip(&["-6", "route", "add", "blackhole", "fd00::2/128"])?;
        for (addr, v6) in [("10.0.0.1", false), ("fd00::1", true)] {
            let mut a = vec![];
            if v6 {
                a.push("-6");
            }
            a.extend([
                "neigh",
                "replace",
                addr,
                "lladdr",
                GW_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
            tb.client.ip(&a)?;
        }
        tb.client
            .ip(&["route", "add", "10.100.0.0/16", "via", "10.0.0.1"])?;
        tb.client
            .ip(&["-6", "route", "add", "fd10::/64", "via", "fd00::1"])?;
        for i in 1..=n {
            let ns = NetNs::new(&format!("{prefix}-b{i}"))?;
            let v4 = format!("10.0.0.{}", 10 + i);
            let v6 = format!("fd00::{:x}", 0x10 + i);
            super::bridge_port(
                &tb.extra[0],
                &format!("pb{i}"),
                &ns,
                "eth0",
                &[&format!("{v4}/24"), &format!("{v6}/64")],
            )?;
            // The VIPs live on the loopback; ARP for them is left to the gateway.
            ns.sysctl(&[
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
            ])?;
            for vip in vips {
                let a = if vip.is_ipv4() {
                    format!("{vip}/32")
                } else {
                    format!("{vip}/128")
                };
                let mut args = vec![];
                if vip.is_ipv6() {
                    args.push("-6");
                }
                args.extend(["addr", "add", &a, "dev", "lo"]);
                if vip.is_ipv6() {
                    args.push("nodad");
                }
                ns.ip(&args)?;
            }
            tb.backends.push(super::Backend {
                name: format!("backend-{i}"),
                ns,
                v4: v4.parse().unwrap(),
                v6: v6.parse().unwrap(),
            });
        }
        tb.servers = Some(Servers::start_with(&tb.backends, vips)?);
        tb.lb(&[
            "attach",
            "eth0",
            "--mode",
            mode,
            "--table-capacity",
            "65536",
            "--conntrack-size",
            "65536",
            "--hash-seed",
            super::TEST_HASH_SEED,
        ])?;
        if decap {
            for b in &tb.backends {
                // (lb_decap is XDP only: with lb in tc mode, the backends run it natively.)
                let decap_mode = if mode == "tc" { "native" } else { mode };
                tb.lb_in(
                    &b.ns,
                    &[
                        "decap",
                        "attach",
                        "eth0",
                        "--mode",
                        decap_mode,
                        "--from",
                        "172.16.0.0/16",
                        "--from",
                        "100::/64",
                    ],
                )?;
            }
        }
        // The gateway learns the backends' MACs (dsr-l2 rewrites only the MAC and cannot hand
        // the kernel a packet to resolve one; health checks do this in production).
        for b in &tb.backends {
            for ip in [b.v4, b.v6] {
                tb.gateway
                    .exec(&["ping", "-c", "1", "-W", "2", &ip.to_string()])?;
            }
        }
        Ok(tb)
    }

    /// Runs the real `lb` binary in namespace `ns` with that namespace's own pin directory.
    pub fn lb_in(&self, ns: &NetNs, args: &[&str]) -> Result<String> {
        super::run_lb(&self.lb_bin, ns, &format!("/sys/fs/bpf/{}", ns.name), args)
    }
}

/// Attaches a program that passes everything to `port` in `ns` (native mode) and pins its link
/// under `pin_dir` (removed with the testbed).
fn pass_program_on(ns: &NetNs, port: &str, pin_dir: &str) -> Result<()> {
    let port = port.to_string();
    let pin_dir = pin_dir.to_string();
    super::in_ns(ns, move || -> Result<()> {
        std::fs::create_dir_all(&pin_dir)?;
        let mut ebpf = aya::Ebpf::load(crate::object::LB_BENCH_OBJECT)?;
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut("bench_pass")
            .context("bench_pass missing")?
            .try_into()?;
        prog.load()?;
        let id = prog.attach(&port, aya::programs::XdpMode::Driver)?;
        let link = prog.take_link(id)?;
        aya::programs::links::FdLink::try_from(link)?.pin(format!("{pin_dir}/pass_{port}"))?;
        Ok(())
    })?
}
