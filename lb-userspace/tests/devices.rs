//! Correct on every device (issue 16): bulk transfers whose receivers verify every checksum,
//! through lb in its tc fallback mode with the checksum set-up of SETUP-NOTES ("Testing
//! checksums honestly on veth") — senders with TX checksum offload on (partial checksums),
//! GRO on at the gateway and its TX checksum offload off (checksums finished in software at
//! egress), receivers with RX checksum offload off — for NAT and ipip, IPv4 and IPv6; jumbo
//! frames (MTU 9000) through native XDP and tc; and the VLAN tag the kernel keeps aside in tc
//! mode.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use lb::testbed::{
    assert_none, grew,
    spoof::{mac_of, tcp_flags, RawSender, TcpSeg, L2},
    transfer::{exchange, DigestServer},
    wait_for, NetNs, Testbed,
};

const BULK_PORT: u16 = 9200;
/// Bytes moved each way per transfer.
const BULK_BYTES: usize = 20 << 20;
const VIP4: &str = "10.100.0.100";
const VIP6: &str = "fd10::100";
/// The digest server's pattern seed.
const SEED: u64 = 0x5eed_b01c;

fn vip(v6: bool, port: u16) -> SocketAddr {
    SocketAddr::new(if v6 { VIP6 } else { VIP4 }.parse().unwrap(), port)
}

fn ethtool(ns: &NetNs, args: &[&str]) {
    let mut a = vec!["ethtool", "-K"];
    a.extend(args);
    ns.exec(&a)
        .unwrap_or_else(|e| panic!("ethtool {} in {}: {e:#}", args.join(" "), ns.name));
}

fn counters(tb: &Testbed) -> BTreeMap<String, u64> {
    tb.counters().expect("lb stats --json")
}

fn deltas(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    after
        .keys()
        .filter(|k| grew(before, after, k) > 0)
        .map(|k| format!("{k} +{}", grew(before, after, k)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Adds `vip` (with `vip_args`) and the backends at `addrs`.
fn add_vip(tb: &Testbed, vip: SocketAddr, vip_args: &[&str], addrs: &[IpAddr]) {
    let v = format!("{vip}/tcp");
    let mut args = vec!["vip", "add", &v, "--table-size", "251"];
    args.extend(vip_args);
    tb.lb(&args).unwrap();
    for a in addrs {
        let b = SocketAddr::new(*a, vip.port()).to_string();
        tb.lb(&["backend", "add", &v, &b]).unwrap();
    }
}

/// The first backend's digest server on `BULK_PORT`, behind an IPv4 and an IPv6 VIP (added
/// with `vip_args`); returns once the gateway has the backend's neighbours (so that lb, not
/// the gateway's kernel, forwards).
fn serve_bulk(tb: &Testbed, vip_args: &[&str]) -> DigestServer {
    let backend = &tb.backends[0];
    let server = DigestServer::start(&backend.ns, BULK_PORT, BULK_BYTES, BULK_BYTES, SEED)
        .expect("digest server");
    for v6 in [false, true] {
        add_vip(
            tb,
            vip(v6, BULK_PORT),
            vip_args,
            &[if v6 { backend.v6 } else { backend.v4 }],
        );
    }
    for ip in [backend.v4, backend.v6] {
        wait_for(Duration::from_secs(10), &format!("ping {ip}"), || {
            tb.ping(ip)
        });
    }
    server
}

/// Packets and bytes lb has sent on to `vip`'s backends (`lb stats --json`).
fn vip_traffic(tb: &Testbed, vip: SocketAddr) -> (u64, u64) {
    let s = tb.lb_json(&["stats"]).expect("lb stats --json");
    let name = format!("{vip}/tcp");
    s["vips"]
        .as_array()
        .expect("lb stats --json lists VIPs")
        .iter()
        .find(|x| x["vip"] == name.as_str())
        .map_or((0, 0), |x| {
            (
                x["packets"].as_u64().unwrap_or(0),
                x["bytes"].as_u64().unwrap_or(0),
            )
        })
}

/// The transfer to `vip` went through lb in packets larger than the MTU allows on the wire
/// (`min` bytes on average): GSO super-packets, so the test exercised what it is about.
fn big_packets(
    tb: &Testbed,
    vip: SocketAddr,
    before: (u64, u64),
    min: u64,
    what: &str,
) -> Option<String> {
    let after = vip_traffic(tb, vip);
    let (pk, by) = (after.0 - before.0, after.1 - before.1);
    println!("{vip}: lb sent {pk} packets, {by} bytes to the backend");
    if pk == 0 || by / pk < min {
        Some(format!(
            "{vip}: {by} bytes in {pk} packets through lb: no {what}"
        ))
    } else {
        None
    }
}

/// Where each attachment of lb runs, from `lb status --json`.
fn modes(tb: &Testbed) -> Vec<String> {
    let s = tb.lb_json(&["status"]).expect("lb status --json");
    s["attached"]
        .as_array()
        .expect("lb status --json lists attachments")
        .iter()
        .map(|a| {
            format!(
                "{} {}",
                a["iface"].as_str().unwrap(),
                a["mode"].as_str().unwrap()
            )
        })
        .collect()
}

/// One verified transfer each way through `vip` (client in the test bed's client namespace,
/// checksum counters read at the client and `server_ns`); returns the failures, with lb's
/// counters during it (which `check` then judges).
fn transfer(
    tb: &Testbed,
    vip: SocketAddr,
    server_ns: &NetNs,
    check: impl Fn(&BTreeMap<String, u64>, &BTreeMap<String, u64>) -> Vec<String>,
) -> Vec<String> {
    let before = counters(tb);
    let x = exchange(
        &tb.client,
        vip,
        BULK_BYTES,
        SEED,
        &[("client", &tb.client), ("backend", server_ns)],
    )
    .expect("running the transfer");
    let after = counters(tb);
    println!(
        "{vip}: {BULK_BYTES} bytes each way in {:.2?}{}; receivers: {}; lb: {}",
        x.took,
        if x.error.is_none() && x.up_intact && x.down_intact {
            ", both SHA-256 equal"
        } else {
            ""
        },
        x.csum_summary(),
        deltas(&before, &after)
    );
    let mut f = x.failures(&vip.to_string());
    f.extend(check(&before, &after));
    f
}

/// The gateway's own kernel must not have forwarded the flow (lb did, in tc mode: redirects).
fn lb_forwarded(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    fwd: &str,
) -> Vec<String> {
    let mut f = Vec::new();
    if grew(before, after, fwd) == 0 {
        f.push(format!("{fwd} did not grow: lb forwarded nothing"));
    }
    for c in ["pass_no_neigh", "pass_fib_other", "headers_not_linear"] {
        if grew(before, after, c) > 0 {
            f.push(format!("{c} grew by {}", grew(before, after, c)));
        }
    }
    f
}

/// The NAT transfers (IPv4, IPv6) to the first backend's `serve_bulk`: intact, no checksum
/// errors, every packet lb's both ways, in packets of `min` bytes on average (`what`).
fn nat_transfers(tb: &Testbed, min: u64, what: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for v6 in [false, true] {
        let before = vip_traffic(tb, vip(v6, BULK_PORT));
        failures.extend(transfer(
            tb,
            vip(v6, BULK_PORT),
            &tb.backends[0].ns,
            |b, a| {
                let mut f = lb_forwarded(b, a, "fwd_nat");
                if grew(b, a, "rev_nat") == 0 {
                    f.push("rev_nat did not grow: the replies were not lb's".into());
                }
                f
            },
        ));
        failures.extend(big_packets(tb, vip(v6, BULK_PORT), before, min, what));
    }
    failures
}

/// The acceptance test of the fallback, NAT: 20 MB each way, IPv4 and IPv6, sha256 compared,
/// no checksum errors at either end, every packet of the flow rewritten by lb (both ways).
#[test]
fn tc_fallback_nat_transfer() {
    let tb = Testbed::new(1, "tc", Path::new(env!("CARGO_BIN_EXE_lb"))).expect("test bed");
    assert_eq!(modes(&tb), ["g0 tc", "g1 tc"]);
    let backend = &tb.backends[0];
    for ns in [&tb.client, &backend.ns] {
        ethtool(ns, &["eth0", "tx", "on", "rx", "off"]);
    }
    for g in ["g0", "g1"] {
        ethtool(&tb.gateway, &[g, "gro", "on", "tx", "off"]);
    }
    let _server = serve_bulk(&tb, &[]);
    let failures = nat_transfers(&tb, 1514, "GSO packets");
    assert_none(&failures, "NAT transfers through lb in tc mode");
}

/// The same for ipip (DSR: the uploads go through lb, encapsulated — GSO packets too, whose
/// segments the kernel makes after lb, smaller by the outer header; the downloads go straight
/// from the backend).
#[test]
fn tc_fallback_ipip_transfer() {
    let vips: Vec<IpAddr> = vec![VIP4.parse().unwrap(), VIP6.parse().unwrap()];
    let tb = Testbed::new_lan(1, "tc", Path::new(env!("CARGO_BIN_EXE_lb")), &vips, true)
        .expect("LAN test bed");
    assert_eq!(modes(&tb), ["eth0 tc"]);
    let backend = &tb.backends[0];
    for ns in [&tb.client, &backend.ns] {
        ethtool(ns, &["eth0", "tx", "on", "rx", "off"]);
    }
    ethtool(&tb.gateway, &["eth0", "gro", "on", "tx", "off"]);
    let _server = serve_bulk(&tb, &["--forward", "ipip"]);
    let mut failures = Vec::new();
    for v6 in [false, true] {
        let before = vip_traffic(&tb, vip(v6, BULK_PORT));
        failures.extend(transfer(&tb, vip(v6, BULK_PORT), &backend.ns, |b, a| {
            // (A segment too big for the tunnel gets an ICMP answer, `tx_icmp_too_big`, also
            // when its checksum is partial: the client's TCP then sends smaller ones.)
            let mut f = lb_forwarded(b, a, "fwd_ipip");
            if grew(b, a, "drop_too_big") > 0 {
                f.push(format!(
                    "drop_too_big grew by {}",
                    grew(b, a, "drop_too_big")
                ));
            }
            f
        }));
        failures.extend(big_packets(
            &tb,
            vip(v6, BULK_PORT),
            before,
            1514,
            "GSO packets",
        ));
    }
    assert_none(&failures, "ipip transfers through lb in tc mode");
}

/// An MTU of 9000 on every link and the verified transfer (v4, v6) through lb in `mode`, in
/// packets far above 1500 bytes.
fn jumbo_transfer(mode: &str) {
    let tb = Testbed::new(1, mode, Path::new(env!("CARGO_BIN_EXE_lb"))).expect("test bed");
    let backend = &tb.backends[0];
    for (ns, dev) in [
        (&tb.client, "eth0"),
        (&tb.gateway, "g0"),
        (&tb.gateway, "g1"),
        (&backend.ns, "eth0"),
    ] {
        ns.ip(&["link", "set", dev, "mtu", "9000"])
            .unwrap_or_else(|e| panic!("MTU 9000 on {dev} in {}: {e:#}", ns.name));
    }
    for ns in [&tb.client, &backend.ns] {
        ethtool(ns, &["eth0", "rx", "off"]);
    }
    let _server = serve_bulk(&tb, &[]);
    let failures = nat_transfers(&tb, 3000, "jumbo frames");
    assert_none(
        &failures,
        &format!("MTU 9000 transfers through lb in {mode} mode"),
    );
}

/// Native XDP at an MTU of 9000: `lb_xdp` is a multi-buffer program, so it attaches (a
/// single-buffer one is refused above about 3500 bytes on veth), and frames of several buffers
/// each go through it intact.
#[test]
fn jumbo_frames_native_transfer() {
    jumbo_transfer("native");
}

/// The same through the tc program, which takes packets of any size (GSO ones too).
#[test]
fn jumbo_frames_tc_transfer() {
    jumbo_transfer("tc");
}

/// tc mode and a VLAN-tagged frame: the kernel takes the tag off before tc and keeps it aside
/// (`vlan_present`), so the frame lb sees looks untagged. lb must still treat it as tagged: to
/// a backend routed out of another interface, the rewritten packet goes to the kernel
/// (`pass_fib_other`), never a redirect that would carry the client's VLAN tag onto that
/// interface. The same frame untagged is redirected (the control).
#[test]
fn tc_vlan_tag_kept_aside_stays_in_its_vlan() {
    let tb = Testbed::new(1, "tc", Path::new(env!("CARGO_BIN_EXE_lb"))).expect("test bed");
    let backend = &tb.backends[0];
    let v = vip(false, 80);
    add_vip(&tb, v, &[], &[backend.v4]);
    wait_for(Duration::from_secs(10), "ping the backend", || {
        tb.ping(backend.v4)
    });
    let l2 = L2 {
        src: mac_of(&tb.client, "eth0").unwrap(),
        dst: mac_of(&tb.gateway, "g0").unwrap(),
    };
    let mut tx = RawSender::open(&tb.client, "eth0").expect("AF_PACKET socket");
    let client = |port: u16| SocketAddr::new(tb.client_v4, port);
    // One frame; waits (bounded) until lb counted it; returns the counters' growth.
    let mut send = |frame: Vec<u8>| -> BTreeMap<String, u64> {
        let before = counters(&tb);
        tx.send(&frame).expect("sending the frame");
        let mut after = before.clone();
        wait_for(Duration::from_secs(5), "lb to count the frame", || {
            after = counters(&tb);
            grew(&before, &after, "fwd_nat") >= 1
        });
        after
            .keys()
            .map(|k| (k.clone(), grew(&before, &after, k)))
            .collect()
    };
    let plain = l2.tcp(&TcpSeg::new(client(40_100), v, tcp_flags::SYN));
    let d = send(plain);
    assert!(
        d["redirect"] >= 1 && d["pass_fib_other"] == 0,
        "the untagged SYN: {d:?}"
    );
    let mut tagged = l2.tcp(&TcpSeg::new(client(40_101), v, tcp_flags::SYN));
    // 802.1Q, VLAN 100, after the MACs.
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
    let d = send(tagged);
    assert!(
        d["pass_fib_other"] == 1 && d["redirect"] == 0,
        "the tagged SYN must not be redirected to another interface: {d:?}"
    );
}
