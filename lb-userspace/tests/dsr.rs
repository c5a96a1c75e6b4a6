//! Direct server return end to end: client, gateway and backends on one L2 segment
//! (lb::testbed LAN), real TCP and UDP, the real `lb` (and `lb decap` on the backends for
//! ipip). The gateway cannot carry replies (blackhole routes to the client), so every working
//! connection proves its replies went straight from the backend.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use lb::testbed::{Testbed, HTTP_PORT, LINE_PORT, UDP_PORT};

const VIP4: &str = "10.100.0.100";
const VIP6: &str = "fd10::100";

fn lan(mode: &str, decap: bool) -> Testbed {
    let vips: Vec<IpAddr> = vec![VIP4.parse().unwrap(), VIP6.parse().unwrap()];
    Testbed::new_lan(3, mode, Path::new(env!("CARGO_BIN_EXE_lb")), &vips, decap)
        .expect("building the LAN testbed")
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn vip4(port: u16) -> SocketAddr {
    sa(VIP4.parse().unwrap(), port)
}

fn vip6(port: u16) -> SocketAddr {
    sa(VIP6.parse().unwrap(), port)
}

/// VIPs for HTTP, the line service and UDP, with backends weighted 1:2:3, in `forward` mode.
fn configure(tb: &Testbed, forward: &str, v6: bool) {
    for (port, proto) in [(HTTP_PORT, "tcp"), (LINE_PORT, "tcp"), (UDP_PORT, "udp")] {
        let v = if v6 { vip6(port) } else { vip4(port) };
        let v = format!("{v}/{proto}");
        tb.lb(&[
            "vip",
            "add",
            &v,
            "--forward",
            forward,
            "--table-size",
            "1009",
        ])
        .unwrap();
        for (b, w) in tb.backends.iter().zip([1, 2, 3]) {
            let addr = if v6 { b.v6 } else { b.v4 };
            tb.lb(&[
                "backend",
                "add",
                &v,
                &sa(addr, port).to_string(),
                "--weight",
                &w.to_string(),
            ])
            .unwrap();
        }
    }
}

/// `n` HTTP connections from fixed source ports 20000.. (so the flows, their hashes and the
/// backends are the same every run): the backend name of each, in port order.
fn shares(tb: &Testbed, vip: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            tb.http_get_from(vip, 20_000 + i as u16)
                .unwrap_or_else(|e| {
                    panic!(
                        "connection {i} to {vip}: {e:#}\n{}",
                        tb.lb(&["stats"]).unwrap_or_default()
                    )
                })
                .0
        })
        .collect()
}

fn table_choices(tb: &Testbed, vip: SocketAddr, n: usize) -> Vec<String> {
    let client = if vip.is_ipv4() {
        tb.client_v4
    } else {
        tb.client_v6
    };
    let clients: Vec<SocketAddr> = (0..n).map(|i| sa(client, 20_000 + i as u16)).collect();
    tb.table_choices(&format!("{vip}/tcp").parse().unwrap(), &clients)
        .unwrap()
}

fn count(names: &[String]) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    for n in names {
        *by.entry(n.clone()).or_insert(0) += 1;
    }
    by
}

/// Every connection was served by the backend the table gives its flow, and the table gives
/// these flows exactly `exact` connections per backend (backend-1, -2, -3).
fn check_shares(got: &[String], want: &[String], exact: [usize; 3]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "connection {i} (port {})", 20_000 + i);
    }
    assert_eq!(got.len(), want.len());
    let by = count(got);
    for (name, w, n) in [
        ("backend-1", 1.0, exact[0]),
        ("backend-2", 2.0, exact[1]),
        ("backend-3", 3.0, exact[2]),
    ] {
        let share = *by.get(name).unwrap_or(&0) as f64 / got.len() as f64;
        println!(
            "{name}: {:.1}% (weight {:.1}%)",
            100.0 * share,
            100.0 * w / 6.0
        );
        assert_eq!(by.get(name).copied().unwrap_or(0), n, "{name}: {by:?}");
    }
}

fn dsr_end_to_end(forward: &str, mode: &str) {
    let tb = lan(mode, forward == "ipip");
    configure(&tb, forward, false);
    // Fixed flows (see `shares`) and a fixed seed: each goes to the backend the table gives
    // it, and the shares are the same every run: 94 / 183 / 323 of 600 (15.7 / 30.5 / 53.8 %
    // against weights of 16.7 / 33.3 / 50 %).
    const N: usize = 600;
    let got = shares(&tb, vip4(HTTP_PORT), N);
    check_shares(
        &got,
        &table_choices(&tb, vip4(HTTP_PORT), N),
        [94, 183, 323],
    );

    // Long-lived connections survive backend changes: drain backend-1, add nothing new.
    let mut long: Vec<_> = (0..12)
        .map(|_| tb.open_line(vip4(LINE_PORT)).unwrap())
        .collect();
    let line_vip = format!("{}/tcp", vip4(LINE_PORT));
    let b1 = sa(tb.backends[0].v4, LINE_PORT).to_string();
    tb.lb(&["backend", "set", &line_vip, &b1, "--weight", "0"])
        .unwrap();
    tb.lb(&[
        "backend",
        "set",
        &line_vip,
        &sa(tb.backends[2].v4, LINE_PORT).to_string(),
        "--weight",
        "1",
    ])
    .unwrap();
    for c in &mut long {
        assert_eq!(
            c.ping().unwrap(),
            c.backend,
            "an established connection moved"
        );
    }
    for _ in 0..20 {
        assert_ne!(tb.open_line(vip4(LINE_PORT)).unwrap().backend, "backend-1");
    }

    // UDP: each flow sticks to one backend; every reply comes from the VIP.
    for _ in 0..20 {
        let replies = tb.udp_flow(vip4(UDP_PORT), 3).unwrap();
        assert!(
            replies.iter().all(|(from, _)| *from == vip4(UDP_PORT)),
            "{replies:?}"
        );
        assert!(
            replies.iter().all(|(_, b)| *b == replies[0].1),
            "{replies:?}"
        );
    }

    if forward == "ipip" {
        // A request larger than the path MTU after encapsulation: the gateway answers the
        // first segment with ICMP fragmentation-needed, the client's TCP lowers its MSS.
        let mut c = tb.open_line(vip4(LINE_PORT)).unwrap();
        let big = "x".repeat(6000);
        assert_eq!(c.send_line(&big).unwrap(), c.backend, "large request");
    }

    // The gateway rewrote nothing back: no replies went through it.
    let stats = tb.lb_json(&["stats"]).unwrap();
    let counter = |n: &str| stats["counters"][n].as_u64().unwrap();
    assert_eq!(counter("rev_nat"), 0);
    assert!(counter(&format!("fwd_{}", forward.replace('-', "_"))) > N as u64);
    assert_eq!(counter("fwd_nat"), 0);
    for v in stats["vips"].as_array().unwrap() {
        assert_eq!(v["reply_packets"], 0, "{v}");
    }
    if forward == "ipip" {
        assert!(counter("tx_icmp_too_big") >= 1, "{stats}");
        let d = tb
            .lb_in(&tb.backends[2].ns, &["decap", "status", "--json"])
            .unwrap();
        let d: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert!(d["counters"]["decap_v4_in_v4"].as_u64().unwrap() > 0, "{d}");
    }
    let list = tb.lb(&["vip", "list"]).unwrap();
    assert!(list.contains(forward), "{list}");
}

fn dsr_ipv6(forward: &str, mode: &str) {
    let tb = lan(mode, forward == "ipip");
    configure(&tb, forward, true);
    const N: usize = 120;
    let got = shares(&tb, vip6(HTTP_PORT), N);
    let want = table_choices(&tb, vip6(HTTP_PORT), N);
    assert_eq!(
        got, want,
        "IPv6 connections served by other backends than the table's"
    );
    assert_eq!(count(&got).len(), 3, "{:?}", count(&got));
    let replies = tb.udp_flow(vip6(UDP_PORT), 3).unwrap();
    assert!(
        replies.iter().all(|(from, _)| *from == vip6(UDP_PORT)),
        "{replies:?}"
    );
    if forward == "ipip" {
        let d = tb
            .lb_in(&tb.backends[0].ns, &["decap", "status", "--json"])
            .unwrap();
        let d: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert!(d["counters"]["decap_v6_in_v6"].as_u64().unwrap() > 0, "{d}");
    }
}

#[test]
fn dsr_l2_native() {
    dsr_end_to_end("dsr-l2", "native");
}

#[test]
fn dsr_l2_generic() {
    dsr_end_to_end("dsr-l2", "generic");
}

#[test]
fn ipip_native() {
    dsr_end_to_end("ipip", "native");
}

#[test]
fn ipip_generic() {
    dsr_end_to_end("ipip", "generic");
}

#[test]
fn dsr_l2_ipv6() {
    dsr_ipv6("dsr-l2", "native");
}

#[test]
fn ipip_ipv6() {
    dsr_ipv6("ipip", "native");
}
