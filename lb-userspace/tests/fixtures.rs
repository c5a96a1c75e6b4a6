//! The data plane's specification: a table of input packet → verdict → exact output packet,
//! run in order through the real program with BPF_PROG_TEST_RUN inside a namespace whose
//! routes and neighbours make the route lookups deterministic (see common/topology.rs).
//! Configuration changes between cases are steps of the table too. Counters are checked at the
//! end against what the cases say.

mod common;

use std::{collections::HashMap, net::SocketAddr};

use common::{
    mutate::{fix_ipv4_csum, l4_v4, set_ipv4_u16, set_ipv4_u8, IP},
    packets::{checksums_ok, Mac, Spec, Tcp},
    testrun::{action_name, run, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    topology::{mac_of, Gateway, CLIENT_MAC, GW_MAC_A, GW_MAC_B},
};
use lb::{model::flow_key, Vip};
use lb_common::{Counter, COUNTER_NAMES, VERDICT_COUNT};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn vip(s: &str) -> Vip {
    s.parse().unwrap()
}

/// One row of the table.
struct Case {
    desc: String,
    ingress: u32,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    reason: Counter,
}

struct Table {
    gw: Gateway,
    reasons: Vec<Counter>,
    rows: usize,
}

impl Table {
    fn check(&mut self, c: Case) {
        let prog = self.gw.dp.program();
        let (action, out) = run(prog, c.ingress, &c.input);
        self.rows += 1;
        assert_eq!(
            action_name(action),
            action_name(c.verdict),
            "case {:?}: verdict",
            c.desc
        );
        if out != c.output {
            panic!(
                "case {:?}: output differs\n   got {}\n  want {}",
                c.desc,
                hex(&out),
                hex(&c.output)
            );
        }
        if c.verdict == XDP_TX || c.verdict == XDP_REDIRECT {
            checksums_ok(&out).unwrap_or_else(|e| panic!("case {:?}: {e}", c.desc));
        }
        self.reasons.push(c.reason);
    }

    /// The backend the table gives a new flow from `client` to `vip` now.
    fn predict(&self, client: SocketAddr, v: &Vip) -> SocketAddr {
        self.gw
            .dp
            .maps
            .table_backend(v, &flow_key(client, v))
            .unwrap()
            .expect("table slot has a backend")
            .addr
    }

    /// The backend conntrack holds for an established flow.
    fn predict_existing(&self, client: SocketAddr, v: &Vip) -> SocketAddr {
        let e = self
            .gw
            .dp
            .maps
            .flow(&flow_key(client, v))
            .expect("flow in conntrack");
        self.gw
            .dp
            .maps
            .backends(v)
            .unwrap()
            .into_iter()
            .find(|b| b.id == e.backend_id)
            .unwrap()
            .addr
    }

    /// Case: client → VIP, forwarded to `backend` wherever it is (XDP_TX on interface A,
    /// XDP_REDIRECT to interface B for 10.2.0.21).
    fn forward_to(&mut self, desc: &str, spec: &Spec, backend: SocketAddr) {
        let (smac, verdict, reason) = if backend.ip().to_string() == "10.2.0.21" {
            (GW_MAC_B, XDP_REDIRECT, Counter::Redirect)
        } else {
            (GW_MAC_A, XDP_TX, Counter::Tx)
        };
        self.check(Case {
            desc: desc.into(),
            ingress: self.gw.ifindex_a,
            input: spec.build(),
            verdict,
            output: spec.with(smac, mac_of(backend), spec.src, backend).build(),
            reason,
        });
    }

    /// Case: the frame passes (or is dropped) unchanged.
    fn unchanged(&mut self, desc: &str, input: Vec<u8>, verdict: u32, reason: Counter) {
        self.check(Case {
            desc: desc.into(),
            ingress: self.gw.ifindex_a,
            output: input.clone(),
            input,
            verdict,
            reason,
        });
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn client(port: u16) -> SocketAddr {
    SocketAddr::new("10.0.0.2".parse().unwrap(), port)
}

fn client6(port: u16) -> SocketAddr {
    SocketAddr::new("fd00::2".parse().unwrap(), port)
}

fn syn(src: SocketAddr, dst: SocketAddr) -> Spec {
    Spec::tcp(CLIENT_MAC, GW_MAC_A, src, dst, Tcp::Syn)
}

fn ack(src: SocketAddr, dst: SocketAddr) -> Spec {
    Spec::tcp(CLIENT_MAC, GW_MAC_A, src, dst, Tcp::Ack)
}

fn udp(src: SocketAddr, dst: SocketAddr) -> Spec {
    Spec::udp(CLIENT_MAC, GW_MAC_A, src, dst)
}

#[test]
fn fixture_table() {
    let gw = Gateway::new("fixtures");
    let mut t = Table {
        gw,
        reasons: vec![],
        rows: 0,
    };
    let before = t.gw.dp.maps.counters().unwrap();

    // ---- configuration ----
    let web = vip("10.100.0.100:80/tcp");
    let web6 = vip("[fd10::100]:80/tcp");
    let dns = vip("10.100.0.100:53/udp");
    let dns6 = vip("[fd10::100]:53/udp");
    let far = vip("10.100.0.101:80/tcp"); // backend behind interface B
    let unresolved = vip("10.100.0.102:80/tcp"); // backend without a neighbour entry
    let blackholed = vip("10.100.0.103:80/tcp"); // backend behind a blackhole route
    let empty = vip("10.100.0.104:80/tcp"); // no backends
    let web_backends = [
        sa("10.1.0.11:8080"),
        sa("10.1.0.12:8080"),
        sa("10.1.0.13:8080"),
    ];
    {
        let m = &mut t.gw.dp.maps;
        m.add_vip(&web, 65_537).unwrap();
        for (b, w) in web_backends.iter().zip([1, 2, 3]) {
            m.add_backend(&web, *b, w).unwrap();
        }
        m.add_vip(&web6, 251).unwrap();
        m.set_backends(
            &web6,
            &[(sa("[fd01::11]:8080"), 1), (sa("[fd01::12]:8080"), 1)],
        )
        .unwrap();
        m.add_vip(&dns, 251).unwrap();
        m.add_backend(&dns, sa("10.1.0.11:5353"), 1).unwrap();
        m.add_vip(&dns6, 251).unwrap();
        m.add_backend(&dns6, sa("[fd01::13]:5353"), 1).unwrap();
        m.add_vip(&far, 251).unwrap();
        m.add_backend(&far, sa("10.2.0.21:80"), 1).unwrap();
        m.add_vip(&unresolved, 251).unwrap();
        m.add_backend(&unresolved, sa("10.1.0.99:80"), 1).unwrap();
        m.add_vip(&blackholed, 251).unwrap();
        m.add_backend(&blackholed, sa("10.9.0.1:80"), 1).unwrap();
        m.add_vip(&empty, 251).unwrap();
    }

    // ---- forwarding, IPv4 TCP ----
    let c1 = client(40_001);
    let b1 = t.predict(c1, &web);
    t.forward_to(
        "IPv4 TCP SYN to a VIP → destination rewritten to the chosen backend",
        &syn(c1, web.addr),
        b1,
    );
    t.forward_to(
        "the same flow again (ACK) → same backend, from conntrack",
        &ack(c1, web.addr),
        b1,
    );

    // Many flows, to check the table change below against.
    let mut flows: Vec<(SocketAddr, SocketAddr)> = Vec::new();
    for port in 41_000..41_032 {
        let c = client(port);
        let b = t.predict(c, &web);
        t.forward_to(&format!("new flow from port {port}"), &syn(c, web.addr), b);
        flows.push((c, b));
    }

    // ---- the table changes: established flows keep their backend ----
    {
        let m = &mut t.gw.dp.maps;
        m.set_weight(&web, web_backends[0], 5).unwrap();
        m.set_weight(&web, web_backends[2], 1).unwrap();
        m.add_backend(&web, sa("10.2.0.21:8080"), 4).unwrap();
    }
    let moved = flows
        .iter()
        .filter(|(c, b)| t.predict(*c, &web) != *b)
        .count();
    assert!(
        moved >= 4,
        "the table change moved only {moved} of 32 slots; pick a bigger change"
    );
    for (c, b) in flows.clone() {
        t.forward_to(
            &format!("after the table change, flow from {c} keeps {b}"),
            &ack(c, web.addr),
            b,
        );
    }
    let c2 = client(40_002);
    let b2 = t.predict(c2, &web);
    t.forward_to(
        "a new flow after the change follows the new table",
        &syn(c2, web.addr),
        b2,
    );

    // ---- IPv6, UDP ----
    let c6 = client6(40_003);
    let b6 = t.predict(c6, &web6);
    t.forward_to("IPv6 TCP SYN to a VIP", &syn(c6, web6.addr), b6);
    t.forward_to("IPv6 TCP, same flow", &ack(c6, web6.addr), b6);
    let cu = client(40_004);
    t.forward_to(
        "IPv4 UDP to a VIP",
        &udp(cu, dns.addr),
        sa("10.1.0.11:5353"),
    );
    let mut zero = udp(client(40_005), dns.addr).build();
    let csum_at = l4_v4(&zero) + 6;
    zero[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
    let mut zero_out = udp(client(40_005), sa("10.1.0.11:5353"))
        .with(
            GW_MAC_A,
            mac_of(sa("10.1.0.11:5353")),
            client(40_005),
            sa("10.1.0.11:5353"),
        )
        .build();
    zero_out[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
    t.check(Case {
        desc: "IPv4 UDP without checksum (0) → forwarded, checksum stays 0".into(),
        ingress: t.gw.ifindex_a,
        input: zero,
        verdict: XDP_TX,
        output: zero_out,
        reason: Counter::Tx,
    });
    t.forward_to(
        "IPv6 UDP to a VIP",
        &udp(client6(40_006), dns6.addr),
        sa("[fd01::13]:5353"),
    );

    // ---- IPv4 options ----
    let mut opt = syn(client(40_007), web.addr);
    opt.ipv4_options = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x01]; // router alert, NOPs
    let bo = t.predict(client(40_007), &web);
    assert_eq!(opt.build()[IP] & 0x0f, 7);
    t.forward_to(
        "IPv4 with options (IHL 7) → L4 found after the options, rewritten",
        &opt,
        bo,
    );

    // ---- next hop ----
    let sf = syn(client(40_008), far.addr);
    t.check(Case {
        desc: "backend behind another interface → XDP_REDIRECT with that interface's MAC".into(),
        ingress: t.gw.ifindex_a,
        input: sf.build(),
        verdict: XDP_REDIRECT,
        output: sf
            .with(
                GW_MAC_B,
                mac_of(sa("10.2.0.21:80")),
                sf.src,
                sa("10.2.0.21:80"),
            )
            .build(),
        reason: Counter::Redirect,
    });
    let su = syn(client(40_009), unresolved.addr);
    t.check(Case {
        desc: "backend's MAC unknown → rewritten packet passed to the kernel to resolve it".into(),
        ingress: t.gw.ifindex_a,
        input: su.build(),
        verdict: XDP_PASS,
        output: su
            .with(su.smac, su.dmac, su.src, sa("10.1.0.99:80"))
            .build(),
        reason: Counter::PassNoNeigh,
    });
    let sb = syn(client(40_010), blackholed.addr);
    t.check(Case {
        desc: "backend behind a blackhole route → dropped".into(),
        ingress: t.gw.ifindex_a,
        input: sb.build(),
        verdict: XDP_DROP,
        output: sb.with(sb.smac, sb.dmac, sb.src, sa("10.9.0.1:80")).build(),
        reason: Counter::DropFibUnreachable,
    });
    t.unchanged(
        "VIP without backends → dropped",
        syn(client(40_011), empty.addr).build(),
        XDP_DROP,
        Counter::DropNoBackend,
    );

    // ---- reverse path ----
    let (rc, rb) = flows[0];
    let reply = Spec::tcp(mac_of(rb), GW_MAC_A, rb, rc, Tcp::SynAck);
    t.check(Case {
        desc: "backend's reply → source rewritten back to the VIP".into(),
        ingress: t.gw.ifindex_a,
        input: reply.build(),
        verdict: XDP_TX,
        output: reply.with(GW_MAC_A, CLIENT_MAC, web.addr, rc).build(),
        reason: Counter::Tx,
    });
    let reply6 = Spec::tcp(mac_of(b6), GW_MAC_A, b6, c6, Tcp::Ack);
    t.check(Case {
        desc: "IPv6 backend's reply → source rewritten back to the VIP".into(),
        ingress: t.gw.ifindex_a,
        input: reply6.build(),
        verdict: XDP_TX,
        output: reply6.with(GW_MAC_A, CLIENT_MAC, web6.addr, c6).build(),
        reason: Counter::Tx,
    });
    let reply_udp = Spec::udp(
        mac_of(sa("10.1.0.11:5353")),
        GW_MAC_A,
        sa("10.1.0.11:5353"),
        cu,
    );
    t.check(Case {
        desc: "UDP backend's reply → source rewritten back to the VIP".into(),
        ingress: t.gw.ifindex_a,
        input: reply_udp.build(),
        verdict: XDP_TX,
        output: reply_udp.with(GW_MAC_A, CLIENT_MAC, dns.addr, cu).build(),
        reason: Counter::Tx,
    });
    t.unchanged(
        "from the backend's service port to a client port lb never forwarded (direct traffic to the backend) → untouched",
        Spec::tcp(mac_of(rb), GW_MAC_A, rb, client(45_000), Tcp::SynAck).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.unchanged(
        "backend traffic from another port is not a reply → passes untouched",
        Spec::tcp(mac_of(rb), GW_MAC_A, sa("10.1.0.11:22"), rc, Tcp::Ack).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );

    // ---- not for a VIP: passes byte-identical ----
    t.unchanged(
        "client to a backend address directly → untouched",
        syn(client(40_012), sa("10.1.0.11:8080")).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.unchanged(
        "VIP address, wrong port → untouched",
        syn(client(40_013), sa("10.100.0.100:81")).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.unchanged(
        "VIP address and port, wrong protocol (UDP to a TCP VIP) → untouched",
        udp(client(40_014), web.addr).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.unchanged(
        "IPv6 not for a VIP → untouched",
        syn(client6(40_015), sa("[fd01::11]:8080")).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    let icmp = {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC_A)
            .ipv4([10, 0, 0, 2], [10, 100, 0, 100], 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut out, b"ping")
            .unwrap();
        out
    };
    t.unchanged(
        "ICMP echo to a VIP address → passed",
        icmp,
        XDP_PASS,
        Counter::PassNotTcpUdp,
    );
    let arp = {
        let mut f = etherparse::Ethernet2Header {
            source: CLIENT_MAC,
            destination: [0xff; 6],
            ether_type: etherparse::EtherType::ARP,
        }
        .to_bytes()
        .to_vec();
        f.extend_from_slice(&[0u8; 28]);
        f
    };
    t.unchanged("ARP → passed", arp, XDP_PASS, Counter::PassNotIp);

    // ---- fragments ----
    let mut mf = syn(client(40_016), web.addr).build();
    set_ipv4_u16(&mut mf, 6, 0x2000);
    t.unchanged(
        "IPv4 first fragment (MF) to a VIP → passed, lb does not reassemble",
        mf,
        XDP_PASS,
        Counter::PassFragment,
    );
    let mut later = udp(client(40_017), dns.addr).build();
    set_ipv4_u16(&mut later, 6, 0x0010);
    t.unchanged(
        "IPv4 later fragment (offset 128) → passed",
        later,
        XDP_PASS,
        Counter::PassFragment,
    );
    let mut frag6 = udp(client6(40_018), dns6.addr).build();
    frag6[IP + 6] = 44;
    t.unchanged(
        "IPv6 fragment header → passed",
        frag6,
        XDP_PASS,
        Counter::PassFragment,
    );
    let mut hbh = udp(client6(40_019), dns6.addr).build();
    hbh[IP + 6] = 0;
    t.unchanged(
        "IPv6 hop-by-hop extension header → passed",
        hbh,
        XDP_PASS,
        Counter::PassIpv6Ext,
    );

    // ---- malformed: passed to the kernel, which validates and drops ----
    let good = syn(client(40_020), web.addr).build();
    t.unchanged(
        "Ethernet header only",
        good[..14].to_vec(),
        XDP_PASS,
        Counter::PassMalformedIp,
    );
    t.unchanged(
        "IPv4 header cut at 10 bytes",
        good[..24].to_vec(),
        XDP_PASS,
        Counter::PassMalformedIp,
    );
    t.unchanged(
        "IPv4 total length beyond the frame",
        good[..good.len() - 5].to_vec(),
        XDP_PASS,
        Counter::PassMalformedIp,
    );
    let mut ihl4 = good.clone();
    set_ipv4_u8(&mut ihl4, 0, 0x44);
    t.unchanged("IPv4 IHL 4", ihl4, XDP_PASS, Counter::PassMalformedIp);
    let mut v5 = good.clone();
    set_ipv4_u8(&mut v5, 0, 0x55);
    t.unchanged(
        "IP version 5 in an IPv4 frame",
        v5,
        XDP_PASS,
        Counter::PassMalformedIp,
    );
    let good6 = syn(client6(40_021), web6.addr).build();
    t.unchanged(
        "IPv6 header cut",
        good6[..14 + 30].to_vec(),
        XDP_PASS,
        Counter::PassMalformedIp,
    );
    let mut cut_tcp = good.clone();
    set_ipv4_u16(&mut cut_tcp, 2, 20 + 12);
    cut_tcp.truncate(14 + 32);
    t.unchanged(
        "TCP header cut (12 of 20 bytes)",
        cut_tcp,
        XDP_PASS,
        Counter::PassMalformedL4,
    );
    let mut doff4 = good.clone();
    doff4[l4_v4(&good) + 12] = 0x40;
    t.unchanged(
        "TCP data offset 4",
        doff4,
        XDP_PASS,
        Counter::PassMalformedL4,
    );
    let mut doff15 = good.clone();
    doff15[l4_v4(&good) + 12] = 0xf0;
    t.unchanged(
        "TCP data offset beyond the packet",
        doff15,
        XDP_PASS,
        Counter::PassMalformedL4,
    );
    let mut udp_short = udp(client(40_022), dns.addr).build();
    let at = l4_v4(&udp_short) + 4;
    udp_short[at..at + 2].copy_from_slice(&4u16.to_be_bytes());
    t.unchanged(
        "UDP length 4",
        udp_short,
        XDP_PASS,
        Counter::PassMalformedL4,
    );
    let mut cut_udp = udp(client(40_023), dns.addr).build();
    set_ipv4_u16(&mut cut_udp, 2, 20 + 6);
    cut_udp.truncate(14 + 26);
    fix_ipv4_csum(&mut cut_udp);
    t.unchanged(
        "UDP header cut (6 of 8 bytes)",
        cut_udp,
        XDP_PASS,
        Counter::PassMalformedL4,
    );

    // ---- draining: weight 0 keeps established flows, takes no new ones ----
    let drained = web_backends[0];
    let (dc, _) = *flows
        .iter()
        .find(|(_, b)| *b == drained)
        .expect("some flow is on the backend to drain");
    t.gw.dp.maps.set_weight(&web, drained, 0).unwrap();
    t.forward_to(
        "drained backend keeps its established flow",
        &ack(dc, web.addr),
        drained,
    );
    for port in 42_000..42_064 {
        let c = client(port);
        let b = t.predict(c, &web);
        assert_ne!(
            b, drained,
            "the table still gives a slot to the drained backend"
        );
        t.forward_to(
            &format!("new flow from port {port} avoids the drained backend"),
            &syn(c, web.addr),
            b,
        );
    }

    // ---- removal: a flow whose backend is gone is selected afresh ----
    let removed = web_backends[1];
    let (rmc, _) = *flows
        .iter()
        .find(|(_, b)| *b == removed)
        .expect("some flow is on the backend to remove");
    let stale_before = t.gw.dp.maps.counters().unwrap()[Counter::CtStale as usize];
    t.gw.dp.maps.del_backend(&web, removed).unwrap();
    let nb = t.predict(rmc, &web);
    assert_ne!(nb, removed);
    t.forward_to(
        "flow of a removed backend → selected afresh from the table",
        &ack(rmc, web.addr),
        nb,
    );
    let stale_after = t.gw.dp.maps.counters().unwrap()[Counter::CtStale as usize];
    assert_eq!(
        stale_after - stale_before,
        1,
        "ct_stale counts the re-selection"
    );
    t.unchanged(
        "the removed backend's replies are no longer rewritten",
        Spec::tcp(mac_of(removed), GW_MAC_A, removed, rmc, Tcp::Ack).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );

    // ---- next-hop cache: same output as the route lookup, without the lookup ----
    let nh_before = t.gw.dp.maps.counters().unwrap()[Counter::NextHopCached as usize];
    let rows = lb::nexthop::refresh(&mut t.gw.dp.maps).unwrap();
    let row = |b: &str| rows.iter().find(|r| r.backend == b).unwrap();
    assert_eq!(row("10.1.0.11:8080").dev.as_deref(), Some("fxa"));
    assert_eq!(
        row("10.1.0.11:8080").mac.as_deref(),
        Some("02:00:00:00:01:11")
    );
    assert_eq!(row("10.2.0.21:80").dev.as_deref(), Some("fxb"));
    assert_eq!(
        row("10.1.0.99:80").mac,
        None,
        "no neighbour entry: not cached"
    );
    assert_eq!(row("10.9.0.1:80").mac, None, "blackhole route: not cached");
    let mut cached = 0;
    for port in 43_000..43_016 {
        let c = client(port);
        let b = t.predict(c, &web);
        t.forward_to(
            &format!(
                "cached next hop: new flow from port {port} → exactly as with the route lookup"
            ),
            &syn(c, web.addr),
            b,
        );
        cached += 1;
    }
    let su2 = syn(client(43_100), unresolved.addr);
    t.check(Case {
        desc: "backend not in the cache → route lookup as before (MAC unknown: to the kernel)"
            .into(),
        ingress: t.gw.ifindex_a,
        input: su2.build(),
        verdict: XDP_PASS,
        output: su2
            .with(su2.smac, su2.dmac, su2.src, sa("10.1.0.99:80"))
            .build(),
        reason: Counter::PassNoNeigh,
    });
    // The cache is used as written (egress interface and MACs).
    let far_id = t.gw.dp.maps.backends(&far).unwrap()[0].id;
    t.gw.dp
        .maps
        .set_nexthop(
            far_id,
            t.gw.ifindex_a,
            [2, 0, 0, 0, 0, 0xee],
            [2, 0, 0, 0, 0, 0xdd],
        )
        .unwrap();
    let sf2 = syn(client(43_101), far.addr);
    t.check(Case {
        desc: "cached next hop on the ingress interface → XDP_TX with the cached MACs".into(),
        ingress: t.gw.ifindex_a,
        input: sf2.build(),
        verdict: XDP_TX,
        output: sf2
            .with(
                [2, 0, 0, 0, 0, 0xee],
                [2, 0, 0, 0, 0, 0xdd],
                sf2.src,
                sa("10.2.0.21:80"),
            )
            .build(),
        reason: Counter::Tx,
    });
    cached += 1;
    let nh_after = t.gw.dp.maps.counters().unwrap()[Counter::NextHopCached as usize];
    assert_eq!(
        nh_after - nh_before,
        cached,
        "nexthop_cached counts the cached sends"
    );
    lb::nexthop::clear(&mut t.gw.dp.maps).unwrap();
    let b = t.predict_existing(client(43_000), &web);
    t.forward_to(
        "after clearing the cache → route lookup again",
        &ack(client(43_000), web.addr),
        b,
    );

    // ---- the port filter follows the configuration ----
    {
        use lb_common::{PORT_F_BACKEND, PORT_F_VIP};
        let m = &mut t.gw.dp.maps;
        assert_eq!(m.port_flags(80).unwrap() & PORT_F_VIP, PORT_F_VIP);
        assert_eq!(m.port_flags(53).unwrap(), PORT_F_VIP);
        assert_eq!(m.port_flags(8080).unwrap(), PORT_F_BACKEND);
        assert_eq!(m.port_flags(81).unwrap(), 0);
        m.del_vip(&dns).unwrap();
        assert_eq!(
            m.port_flags(53).unwrap(),
            PORT_F_VIP,
            "the IPv6 DNS VIP still uses 53"
        );
        m.del_vip(&dns6).unwrap();
        assert_eq!(m.port_flags(53).unwrap(), 0);
        assert_eq!(
            m.port_flags(5353).unwrap(),
            0,
            "no backend on 5353 any more"
        );
        assert_eq!(m.port_flags(8080).unwrap(), PORT_F_BACKEND);
    }

    // ---- counters: one verdict per packet, each as the cases say ----
    let after = t.gw.dp.maps.counters().unwrap();
    let mut want: HashMap<usize, u64> = HashMap::new();
    for r in &t.reasons {
        *want.entry(*r as usize).or_default() += 1;
    }
    for i in 0..VERDICT_COUNT as usize {
        assert_eq!(
            after[i] - before[i],
            want.get(&i).copied().unwrap_or(0),
            "counter {}",
            COUNTER_NAMES[i]
        );
    }
    let total: u64 = (0..VERDICT_COUNT as usize)
        .map(|i| after[i] - before[i])
        .sum();
    assert_eq!(
        total, t.rows as u64,
        "verdict counters sum to the packets run"
    );
    assert_eq!(
        after[Counter::RevNat as usize] - before[Counter::RevNat as usize],
        3
    );
    let info = t.gw.dp.maps.vip(&web).unwrap();
    let s = t.gw.dp.maps.vip_stats(info.vip_id).unwrap();
    assert!(
        s.packets > 100 && s.new_flows > 90 && s.rev_packets == 1,
        "{s:?}"
    );
    println!("{} fixture cases passed", t.rows);
}

/// Keeps `Mac` in use for readers of this file: MACs are 6 bytes.
const _: Mac = [0; 6];
