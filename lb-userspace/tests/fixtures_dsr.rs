//! The data plane's specification for direct server return and ICMP: input packet → verdict →
//! exact output packet, through the real programs with BPF_PROG_TEST_RUN (the same fixture
//! gateway as fixtures.rs, plus routes for the cases below):
//! - dsr-l2: only the MACs change; a backend behind a gateway or without a neighbour entry is
//!   refused;
//! - ipip: IPv4 in IPv4, IPv6 in IPv6, IPv4 in IPv6, byte for byte (outer source from the flow
//!   hash, TTL 64, checksums); too big for the egress MTU → ICMP fragmentation-needed /
//!   packet-too-big to the client, or dropped without DF;
//! - ICMP too-big about a VIP flow → the flow's backend, in each mode;
//! - the decapsulation program backends run, on the ipip cases' own output.

mod common;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use aya::programs::Xdp;
use common::{
    packets::{checksums_ok, tag, Mac, Spec, Tcp, SEQ, TPID_8021AD, TPID_8021Q},
    raw::{eth, icmp4, icmp6, ipv4, ipv6, too_big_frame, v4, v6},
    testrun::{action_name, run, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    topology::{mac_of, Gateway, CLIENT_MAC, GW_MAC_A, GW_MAC_B},
};
use lb::{
    model::{flow_key, Forward},
    CtTable, Vip,
};
use lb_common::{
    csum::checksum, Counter, CtEntry, DecapCounter, COUNTER_NAMES, CT_F_COUNTED, CT_F_DIRECT,
    CT_F_RST, CT_S_CLOSED, CT_S_ESTABLISHED, CT_S_OPENING, CT_S_UDP, DECAP_COUNTER_COUNT,
    VERDICT_COUNT,
};

/// The encapsulation hash of `client` → `v` (ipip's outer source and flow label) by the
/// reference implementation (`common::oracle`).
fn ref_hash(client: SocketAddr, v: &Vip, seed: u32) -> u32 {
    common::oracle::encap_hash(client, v.addr, seed)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn vip(s: &str) -> Vip {
    s.parse().unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Outer source address of an ipip packet for a flow with this hash.
fn encap_src(hash: u32, outer_v4: bool) -> Vec<u8> {
    if outer_v4 {
        vec![172, 16, (hash >> 8) as u8, hash as u8]
    } else {
        let mut a = vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        a.extend_from_slice(&hash.to_be_bytes());
        a
    }
}

/// The MAC of a backend: the fixture neighbours, plus the two added here.
fn backend_mac(b: SocketAddr) -> Mac {
    match b.ip().to_string().as_str() {
        "10.1.0.14" | "fd01::14" => [2, 0, 0, 0, 1, 0x14],
        // No neighbour entry: the MACs are the original frame's (patched by the caller).
        "10.1.0.98" => [0; 6],
        _ => mac_of(b),
    }
}

/// `frame` one hop later: the TTL / hop limit of its IP header one less (and the IPv4 header
/// checksum updated), as a router forwards it.
fn hop(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    if f[14] >> 4 == 4 {
        f[14 + 8] -= 1;
        let hl = (f[14] & 0x0f) as usize * 4;
        f[24] = 0;
        f[25] = 0;
        let c = checksum(&f[14..14 + hl]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    } else {
        f[14 + 7] -= 1;
    }
    f
}

/// `frame`'s IP packet, one hop later (the inner packet is forwarded as a router would),
/// encapsulated to `backend`, as lb sends it (MACs to the backend on A).
fn encapsulated(frame: &[u8], backend: SocketAddr, hash: u32) -> Vec<u8> {
    let frame = &hop(frame);
    let inner = &frame[14..];
    let inner_v4 = inner[0] >> 4 == 4;
    // The outer header carries the inner one's DSCP and ECN (RFC 6040, normal mode).
    let traffic_class = if inner_v4 {
        inner[1]
    } else {
        (inner[0] << 4) | (inner[1] >> 4)
    };
    let mut f;
    if backend.is_ipv4() {
        f = eth(backend_mac(backend), GW_MAC_A, 0x0800);
        let src: [u8; 4] = encap_src(hash, true).try_into().unwrap();
        f.extend(ipv4(
            traffic_class,
            20 + inner.len(),
            0,
            true,
            4,
            src,
            v4(backend),
        ));
    } else {
        f = eth(backend_mac(backend), GW_MAC_A, 0x86dd);
        let src: [u8; 16] = encap_src(hash, false).try_into().unwrap();
        let next = if inner_v4 { 4 } else { 41 };
        let mut h = ipv6(hash, inner.len(), next, src, v6(backend));
        h[0] |= traffic_class >> 4;
        h[1] |= traffic_class << 4;
        f.extend(h);
    }
    f.extend_from_slice(inner);
    f
}

/// `frame` with its IP header's traffic class (IPv4 TOS) set to `tc` (the IPv4 header
/// checksum made again).
fn marked(frame: &[u8], tc: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    if f[14] >> 4 == 4 {
        f[15] = tc;
        f[24] = 0;
        f[25] = 0;
        let c = checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    } else {
        f[14] = 0x60 | (tc >> 4);
        f[15] = (tc << 4) | (f[15] & 0x0f);
    }
    f
}

struct Table {
    gw: Gateway,
    reasons: Vec<Counter>,
    rows: usize,
}

impl Table {
    fn check(&mut self, desc: &str, input: &[u8], verdict: u32, output: &[u8], reason: Counter) {
        let prog = self.gw.dp.program();
        let (action, out) = run(prog, self.gw.ifindex_a, input);
        self.rows += 1;
        assert_eq!(
            action_name(action),
            action_name(verdict),
            "case {desc:?}: verdict"
        );
        assert!(
            out == output,
            "case {desc:?}: output differs\n   got {}\n  want {}",
            hex(&out),
            hex(output)
        );
        self.reasons.push(reason);
    }

    fn unchanged(&mut self, desc: &str, input: &[u8], verdict: u32, reason: Counter) {
        self.check(desc, input, verdict, input, reason);
    }

    /// The flow `client` → `v` has exactly one entry: in `table`, with `state`, `flags` and
    /// backend `backend`.
    fn expect_entry(
        &self,
        desc: &str,
        client: SocketAddr,
        v: &Vip,
        (table, state, flags): (CtTable, u8, u64),
        backend: SocketAddr,
    ) {
        let key = flow_key(client, v);
        let got: Vec<(CtTable, CtEntry)> = self
            .gw
            .dp
            .maps
            .flows
            .list()
            .unwrap()
            .into_iter()
            .filter(|f| f.key == key)
            .map(|f| (f.table, f.entry))
            .collect();
        let [(t, e)] = got[..] else {
            panic!("case {desc:?}: want one entry for {client} → {v}, got {got:?}");
        };
        assert_eq!(
            (t, e.state, e.flags),
            (table, state, flags),
            "case {desc:?}: entry of {client} → {v} (table, state, flags)"
        );
        let b = self.backend(v, backend);
        assert_eq!(e.backend_id, b, "case {desc:?}: the entry's backend");
    }

    /// Backend `addr` of `v`: its id.
    fn backend(&self, v: &Vip, addr: SocketAddr) -> u32 {
        self.gw
            .dp
            .maps
            .backends(v)
            .unwrap()
            .into_iter()
            .find(|b| b.addr == addr)
            .unwrap_or_else(|| panic!("{addr} is not a backend of {v}"))
            .id
    }

    fn expect_active(&self, desc: &str, v: &Vip, backend: SocketAddr, n: u64) {
        let id = self.backend(v, backend);
        assert_eq!(
            self.gw.dp.maps.flows.active(id).unwrap(),
            n,
            "case {desc:?}: active flows of {backend}"
        );
    }

    /// How much counter `c` went up since `since`.
    fn delta(&self, since: &[u64], c: Counter) -> u64 {
        self.gw.dp.maps.counters.verdicts().unwrap()[c as usize] - since[c as usize]
    }
}

/// Entries of dsr-l2 / ipip flows: marked direct (their backends answer from the VIP, so
/// nothing from a backend's own address is a reply of them).
const UNCONFIRMED_OPENING: (CtTable, u8, u64) = (CtTable::Unconfirmed, CT_S_OPENING, CT_F_DIRECT);
const UNCONFIRMED_UDP: (CtTable, u8, u64) = (CtTable::Unconfirmed, CT_S_UDP, CT_F_DIRECT);
const ESTABLISHED: (CtTable, u8, u64) = (
    CtTable::Confirmed,
    CT_S_ESTABLISHED,
    CT_F_COUNTED | CT_F_DIRECT,
);
const CONFIRMED_UDP: (CtTable, u8, u64) =
    (CtTable::Confirmed, CT_S_UDP, CT_F_COUNTED | CT_F_DIRECT);

fn client(port: u16) -> SocketAddr {
    SocketAddr::new("10.0.0.2".parse().unwrap(), port)
}

fn client6(port: u16) -> SocketAddr {
    SocketAddr::new("fd00::2".parse().unwrap(), port)
}

fn syn(src: SocketAddr, dst: SocketAddr) -> Spec {
    Spec::tcp(CLIENT_MAC, GW_MAC_A, src, dst, Tcp::Syn)
}

/// `spec` with a payload of `n` bytes.
fn sized(mut spec: Spec, n: usize) -> Spec {
    spec.payload = vec![0x5a; n];
    spec
}

/// What dsr-l2 sends for `spec`: the same packet to `backend`'s MAC from `smac` (the egress
/// interface's), one hop later.
fn l2_out(spec: &Spec, backend: SocketAddr, smac: Mac) -> Vec<u8> {
    Spec {
        dmac: mac_of(backend),
        smac,
        ..spec.clone()
    }
    .hop()
    .build()
}

#[test]
fn dsr_ipip_icmp_and_decap() {
    let gw = Gateway::new("dsr");
    // A network behind a gateway (for "not on link"), and two backends whose routes have a
    // small MTU (for "too big"; the IPv4 route's locked, or forwarding would use the
    // device's).
    gw.ns
        .ip(&["route", "add", "10.3.0.0/24", "via", "10.1.0.13"]);
    gw.ns.ip(&[
        "neigh",
        "replace",
        "10.1.0.14",
        "lladdr",
        "02:00:00:00:01:14",
        "dev",
        "fxa",
        "nud",
        "permanent",
    ]);
    gw.ns.ip(&[
        "route",
        "add",
        "10.1.0.14/32",
        "dev",
        "fxa",
        "mtu",
        "lock",
        "1000",
    ]);
    gw.ns.ip(&[
        "-6",
        "neigh",
        "replace",
        "fd01::14",
        "lladdr",
        "02:00:00:00:01:14",
        "dev",
        "fxa",
        "nud",
        "permanent",
    ]);
    // (IPv6 route lookups take the device's MTU.)
    gw.ns.ip(&["link", "set", "fxa", "mtu", "1400"]);
    let mut t = Table {
        gw,
        reasons: vec![],
        rows: 0,
    };
    let before = t.gw.dp.maps.counters.verdicts().unwrap();
    // Expectations are computed with the seed the data plane has.
    let seed = t.gw.dp.maps.conf().unwrap().hash_seed;

    let l2 = vip("10.100.1.1:80/tcp");
    let l2_6 = vip("[fd10::1]:80/tcp");
    let l2_far = vip("10.100.1.2:80/tcp"); // backend behind interface B
    let l2_gw = vip("10.100.1.3:80/tcp"); // backend behind a gateway
    let l2_noneigh = vip("10.100.1.4:80/tcp"); // backend without a neighbour entry
    let tun = vip("10.100.2.1:80/tcp");
    let tun6 = vip("[fd10::2]:80/tcp");
    let tun46 = vip("10.100.2.2:80/tcp"); // IPv4 VIP, IPv6 backend
    let tun_small = vip("10.100.2.3:80/tcp"); // backend route MTU 1000
    let tun6_small = vip("[fd10::3]:80/tcp"); // backend route MTU 1400
    let tun_noneigh = vip("10.100.2.4:80/tcp"); // backend without a neighbour entry
    let nat = vip("10.100.3.1:80/tcp");
    let nat6 = vip("[fd10::4]:80/tcp");
    let l2_udp = vip("10.100.1.5:53/udp");
    let tun_udp = vip("10.100.2.5:53/udp");
    {
        let m = &mut t.gw.dp.maps;
        let setups: &[(Vip, Forward, &str)] = &[
            (l2, Forward::DsrL2, "10.1.0.11:80"),
            (l2_6, Forward::DsrL2, "[fd01::12]:80"),
            (l2_far, Forward::DsrL2, "10.2.0.21:80"),
            (l2_gw, Forward::DsrL2, "10.3.0.5:80"),
            (l2_noneigh, Forward::DsrL2, "10.1.0.99:80"),
            (tun, Forward::Ipip, "10.1.0.12:80"),
            (tun6, Forward::Ipip, "[fd01::11]:80"),
            (tun46, Forward::Ipip, "[fd01::13]:80"),
            (tun_small, Forward::Ipip, "10.1.0.14:80"),
            (tun6_small, Forward::Ipip, "[fd01::14]:80"),
            (tun_noneigh, Forward::Ipip, "10.1.0.98:80"),
            (nat, Forward::Nat, "10.1.0.13:8080"),
            (nat6, Forward::Nat, "[fd01::11]:8080"),
            (l2_udp, Forward::DsrL2, "10.1.0.11:53"),
            (tun_udp, Forward::Ipip, "10.1.0.12:53"),
        ];
        for (v, f, b) in setups {
            m.add_vip(v, 251).unwrap();
            m.set_forward(v, *f).unwrap();
            m.add_backend(v, sa(b), 1).unwrap();
        }
        // Mode rules: DSR keeps the port; only ipip carries IPv4 in IPv6.
        let e = m.add_backend(&l2, sa("10.1.0.12:8080"), 1).unwrap_err();
        assert!(
            e.to_string().contains("must listen on the VIP's port 80"),
            "{e}"
        );
        let e = m.add_backend(&l2, sa("[fd01::11]:80"), 1).unwrap_err();
        assert!(e.to_string().contains("only ipip"), "{e}");
        let e = m.set_forward(&nat, Forward::DsrL2).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
    }

    // ---- dsr-l2: the MACs change, and the TTL / hop limit as in any forwarding ----
    for (v, c) in [(l2, client(40001)), (l2_6, client6(40002))] {
        let s = syn(c, v.addr);
        let b = t.gw.dp.maps.backends(&v).unwrap()[0].addr;
        t.check(
            &format!("dsr-l2 {v}"),
            &s.build(),
            XDP_TX,
            &l2_out(&s, b, GW_MAC_A),
            Counter::Tx,
        );
        t.expect_entry(
            &format!("dsr-l2 {v}: unconfirmed after the SYN"),
            c,
            &v,
            UNCONFIRMED_OPENING,
            b,
        );
    }
    let s = syn(client(40003), l2_far.addr);
    let out = l2_out(&s, sa("10.2.0.21:80"), GW_MAC_B);
    t.check(
        "dsr-l2 to another interface",
        &s.build(),
        XDP_REDIRECT,
        &out,
        Counter::Redirect,
    );
    // VLAN tags: kept; a dsr-l2 backend must be in the frame's VLAN (reached through the
    // interface it came in on).
    let q100 = [(TPID_8021Q, 100)];
    for (v, c) in [(l2, client(40901)), (l2_6, client6(40902))] {
        let s = syn(c, v.addr);
        let b = t.gw.dp.maps.backends(&v).unwrap()[0].addr;
        t.check(
            &format!("dsr-l2 {v}, 802.1Q-tagged → tag kept"),
            &tag(&s.build(), &q100),
            XDP_TX,
            &tag(&l2_out(&s, b, GW_MAC_A), &q100),
            Counter::Tx,
        );
    }
    t.unchanged(
        "dsr-l2, tagged, backend routed out of another interface (another VLAN) → dropped",
        &tag(&syn(client(40903), l2_far.addr).build(), &q100),
        XDP_DROP,
        Counter::DropNotOnLink,
    );
    t.unchanged(
        "dsr-l2: backend behind a gateway",
        &syn(client(40004), l2_gw.addr).build(),
        XDP_DROP,
        Counter::DropNotOnLink,
    );
    t.unchanged(
        "dsr-l2: backend MAC unknown",
        &syn(client(40005), l2_noneigh.addr).build(),
        XDP_DROP,
        Counter::DropNoNeigh,
    );

    // ---- dsr-l2 flow state: the client's second packet confirms (replies bypass lb) ----
    let (c, b) = (client(40001), sa("10.1.0.11:80"));
    let since = t.gw.dp.maps.counters.verdicts().unwrap();
    let s = syn(c, l2.addr);
    t.check(
        "dsr-l2: SYN retransmitted → same backend, not confirmed",
        &s.build(),
        XDP_TX,
        &l2_out(&s, b, GW_MAC_A),
        Counter::Tx,
    );
    t.expect_entry("dsr-l2: SYN again", c, &l2, UNCONFIRMED_OPENING, b);
    let s = Spec::tcp(CLIENT_MAC, GW_MAC_A, c, l2.addr, Tcp::RstAck);
    t.check(
        "dsr-l2: an RST → not confirmed",
        &s.build(),
        XDP_TX,
        &l2_out(&s, b, GW_MAC_A),
        Counter::Tx,
    );
    t.expect_entry("dsr-l2: RST", c, &l2, UNCONFIRMED_OPENING, b);
    assert_eq!(t.delta(&since, Counter::CtConfirmed), 0);
    t.expect_active("dsr-l2: not confirmed", &l2, b, 0);
    let s = Spec::tcp(CLIENT_MAC, GW_MAC_A, c, l2.addr, Tcp::Ack).seq_ack(SEQ + 1, 0x3000_0001);
    t.check(
        "dsr-l2: the client's ACK → confirmed",
        &s.build(),
        XDP_TX,
        &l2_out(&s, b, GW_MAC_A),
        Counter::Tx,
    );
    t.expect_entry("dsr-l2: ACK", c, &l2, ESTABLISHED, b);
    t.expect_active("dsr-l2: ACK", &l2, b, 1);
    assert_eq!(t.delta(&since, Counter::CtConfirmed), 1);
    // The client's RST (the only side lb sees): closed and off the count at once; the client's
    // next packet shows the flow goes on (a spoofed RST): counted again, once.
    let s = Spec::tcp(CLIENT_MAC, GW_MAC_A, c, l2.addr, Tcp::Rst).seq_ack(0x5eed_0000, 0);
    t.check(
        "dsr-l2: the client's RST on a confirmed flow → same backend, closed, off the count",
        &s.build(),
        XDP_TX,
        &l2_out(&s, b, GW_MAC_A),
        Counter::Tx,
    );
    t.expect_entry(
        "dsr-l2: RST",
        c,
        &l2,
        (CtTable::Confirmed, CT_S_CLOSED, CT_F_RST | CT_F_DIRECT),
        b,
    );
    t.expect_active("dsr-l2: RST", &l2, b, 0);
    let s = Spec::tcp(CLIENT_MAC, GW_MAC_A, c, l2.addr, Tcp::Ack).seq_ack(SEQ + 1, 0x3000_0001);
    for i in 0..2 {
        t.check(
            "dsr-l2: then the client's data → established, counted again once",
            &s.build(),
            XDP_TX,
            &l2_out(&s, b, GW_MAC_A),
            Counter::Tx,
        );
        t.expect_entry(
            &format!("dsr-l2: data {i} after the RST"),
            c,
            &l2,
            ESTABLISHED,
            b,
        );
        t.expect_active(&format!("dsr-l2: data {i} after the RST"), &l2, b, 1);
    }
    assert_eq!(t.delta(&since, Counter::CtConfirmed), 1);
    // A dsr-l2 backend answers from the VIP, never through the gateway: a packet from its own
    // address:port to the client of its flow (a spoofed or misrouted one) is not a reply —
    // not rewritten to the VIP, and it changes nothing (an RST would close the flow).
    for flags in [Tcp::Ack, Tcp::Rst] {
        let own = Spec::tcp(mac_of(b), GW_MAC_A, b, c, flags);
        t.unchanged(
            &format!("dsr-l2: {flags:?} from the backend's own address → not a reply"),
            &own.build(),
            XDP_PASS,
            Counter::PassNotVip,
        );
    }
    t.expect_entry(
        "dsr-l2: after its backend's own packets",
        c,
        &l2,
        ESTABLISHED,
        b,
    );
    t.expect_active("dsr-l2: after its backend's own packets", &l2, b, 1);
    let (c, b) = (client(40006), sa("10.1.0.11:53"));
    let s = Spec::udp(CLIENT_MAC, GW_MAC_A, c, l2_udp.addr);
    t.check(
        "dsr-l2 UDP: first datagram → unconfirmed",
        &s.build(),
        XDP_TX,
        &l2_out(&s, b, GW_MAC_A),
        Counter::Tx,
    );
    t.expect_entry("dsr-l2 UDP: first", c, &l2_udp, UNCONFIRMED_UDP, b);
    t.check(
        "dsr-l2 UDP: second datagram → confirmed",
        &s.build(),
        XDP_TX,
        &l2_out(&s, b, GW_MAC_A),
        Counter::Tx,
    );
    t.expect_entry("dsr-l2 UDP: second", c, &l2_udp, CONFIRMED_UDP, b);
    t.expect_active("dsr-l2 UDP: second", &l2_udp, b, 1);

    // ---- dsr-l2 and TTL ----
    let s = syn(client(40007), l2.addr).ttl(2);
    t.check(
        "dsr-l2: TTL 2 → sent with TTL 1, IPv4 checksum updated",
        &s.build(),
        XDP_TX,
        &l2_out(&s, sa("10.1.0.11:80"), GW_MAC_A),
        Counter::Tx,
    );
    checksums_ok(&l2_out(&s, sa("10.1.0.11:80"), GW_MAC_A)).unwrap();
    t.unchanged(
        "dsr-l2: TTL 1 → to the kernel (time exceeded)",
        &syn(client(40008), l2.addr).ttl(1).build(),
        XDP_PASS,
        Counter::PassTtlExceeded,
    );
    t.unchanged(
        "dsr-l2: IPv6 hop limit 1 → to the kernel",
        &syn(client6(40009), l2_6.addr).ttl(1).build(),
        XDP_PASS,
        Counter::PassTtlExceeded,
    );
    t.unchanged(
        "ipip: TTL 1 → to the kernel, not encapsulated",
        &syn(client(40010), tun.addr).ttl(1).build(),
        XDP_PASS,
        Counter::PassTtlExceeded,
    );
    t.unchanged(
        "ipip: IPv6 hop limit 1 → to the kernel",
        &syn(client6(40010), tun6.addr).ttl(1).build(),
        XDP_PASS,
        Counter::PassTtlExceeded,
    );

    // ---- ipip ----
    let mut encapsulated_frames = Vec::new();
    for (v, c, b) in [
        (tun, client(40011), sa("10.1.0.12:80")),
        (tun6, client6(40012), sa("[fd01::11]:80")),
        (tun46, client(40013), sa("[fd01::13]:80")),
    ] {
        let s = syn(c, v.addr);
        let hash = ref_hash(c, &v, seed);
        let out = encapsulated(&s.build(), b, hash);
        t.check(
            &format!("ipip {v} -> {b}"),
            &s.build(),
            XDP_TX,
            &out,
            Counter::Tx,
        );
        encapsulated_frames.push((hop(&s.build()), out));
        // DSCP EF and ECT(0) on the inner packet: the outer header carries both.
        let c2 = SocketAddr::new(c.ip(), c.port() + 100);
        let input = marked(&syn(c2, v.addr).build(), 0xba);
        let out = encapsulated(&input, b, ref_hash(c2, &v, seed));
        let tc = if b.is_ipv4() {
            out[15]
        } else {
            (out[14] << 4) | (out[15] >> 4)
        };
        assert_eq!(tc, 0xba, "the reference copies the traffic class");
        t.check(
            &format!("ipip {v} -> {b}, DSCP EF and ECT(0) copied to the outer header"),
            &input,
            XDP_TX,
            &out,
            Counter::Tx,
        );
    }
    // Backend MAC unknown: encapsulated and handed to the kernel (which resolves it), still
    // addressed to this host.
    let c = client(40014);
    let s = syn(c, tun_noneigh.addr);
    let mut out = encapsulated(
        &s.build(),
        sa("10.1.0.98:80"),
        ref_hash(c, &tun_noneigh, seed),
    );
    out[0..6].copy_from_slice(&GW_MAC_A);
    out[6..12].copy_from_slice(&CLIENT_MAC);
    t.check(
        "ipip: next hop unresolved → encapsulated, passed to the kernel",
        &s.build(),
        XDP_PASS,
        &out,
        Counter::PassNoNeigh,
    );
    // An established flow: the same backend and outer source again.
    let c = client(40011);
    let a = Spec::tcp(CLIENT_MAC, GW_MAC_A, c, tun.addr, Tcp::Ack);
    let out = encapsulated(&a.build(), sa("10.1.0.12:80"), ref_hash(c, &tun, seed));
    t.check("ipip established", &a.build(), XDP_TX, &out, Counter::Tx);
    // The same flow in QinQ-tagged frames: the outer header goes after the tags.
    let qinq = [(TPID_8021AD, 10), (TPID_8021Q, 100)];
    t.check(
        "ipip established, QinQ-tagged → encapsulated after the tags",
        &tag(&a.build(), &qinq),
        XDP_TX,
        &tag(&out, &qinq),
        Counter::Tx,
    );
    t.expect_entry(
        "ipip: the client's second packet confirms",
        c,
        &tun,
        ESTABLISHED,
        sa("10.1.0.12:80"),
    );
    t.expect_active("ipip confirmed", &tun, sa("10.1.0.12:80"), 1);
    t.expect_entry(
        "ipip IPv6: unconfirmed after the SYN alone",
        client6(40012),
        &tun6,
        UNCONFIRMED_OPENING,
        sa("[fd01::11]:80"),
    );
    let (c, b) = (client(40015), sa("10.1.0.12:53"));
    let s = Spec::udp(CLIENT_MAC, GW_MAC_A, c, tun_udp.addr);
    let out = encapsulated(&s.build(), b, ref_hash(c, &tun_udp, seed));
    t.check(
        "ipip UDP: first datagram → unconfirmed",
        &s.build(),
        XDP_TX,
        &out,
        Counter::Tx,
    );
    t.expect_entry("ipip UDP: first", c, &tun_udp, UNCONFIRMED_UDP, b);
    t.check(
        "ipip UDP: second datagram → confirmed",
        &s.build(),
        XDP_TX,
        &out,
        Counter::Tx,
    );
    t.expect_entry("ipip UDP: second", c, &tun_udp, CONFIRMED_UDP, b);
    t.expect_active("ipip UDP: second", &tun_udp, b, 1);

    // Too big after encapsulation: 20 + 20 + 960 = 1000 fits the route's MTU of 1000 only
    // without the outer header.
    let c = client(40021);
    let fits = sized(syn(c, tun_small.addr), 940); // 980 + 20 = 1000
    let hash = ref_hash(c, &tun_small, seed);
    let out = encapsulated(&fits.build(), sa("10.1.0.14:80"), hash);
    t.check(
        "ipip: exactly the MTU",
        &fits.build(),
        XDP_TX,
        &out,
        Counter::Tx,
    );
    let big = sized(syn(client(40022), tun_small.addr), 941).build();
    let mut want = eth(CLIENT_MAC, GW_MAC_A, 0x0800);
    let m = icmp4(
        3,
        4,
        [0, 0, (980u16 >> 8) as u8, 980u16 as u8],
        &big[14..14 + 28],
    );
    want.extend(ipv4(
        0,
        20 + m.len(),
        0,
        false,
        1,
        v4(tun_small.addr),
        v4(client(0)),
    ));
    want.extend(m);
    t.check(
        "ipip: too big, DF → ICMP fragmentation needed (MTU 980)",
        &big,
        XDP_TX,
        &want,
        Counter::TxIcmpTooBig,
    );
    let mut no_df = big.clone();
    no_df[20] &= !0x40; // clear DF
    let c = checksum(&{
        let mut h = no_df[14..34].to_vec();
        h[10] = 0;
        h[11] = 0;
        h
    });
    no_df[24..26].copy_from_slice(&c.to_be_bytes());
    t.unchanged(
        "ipip: too big without DF → dropped",
        &no_df,
        XDP_DROP,
        Counter::DropTooBig,
    );
    let big6 = sized(syn(client6(40023), tun6_small.addr), 1341).build(); // 40+20+1341 = 1401
    let mut want = eth(CLIENT_MAC, GW_MAC_A, 0x86dd);
    let m = icmp6(
        2,
        1360u32.to_be_bytes(),
        &big6[14..14 + 48],
        v6(tun6_small.addr),
        v6(client6(0)),
    );
    want.extend(ipv6(0, m.len(), 58, v6(tun6_small.addr), v6(client6(0))));
    want.extend(m);
    t.check(
        "ipip: too big → ICMPv6 packet too big (MTU 1360)",
        &big6,
        XDP_TX,
        &want,
        Counter::TxIcmpTooBig,
    );

    // ---- ICMP too-big about a VIP flow → the flow's backend ----
    let router: IpAddr = "10.0.0.7".parse().unwrap();
    // dsr-l2: the message goes as it is, to the backend's MAC.
    let c = client(40033);
    let input = too_big_frame(
        GW_MAC_A,
        CLIENT_MAC,
        router,
        l2.addr.ip(),
        1400,
        l2.addr,
        c,
        false,
    );
    let b = sa("10.1.0.11:80");
    let mut want = hop(&input);
    want[0..6].copy_from_slice(&mac_of(b));
    want[6..12].copy_from_slice(&GW_MAC_A);
    t.check(
        "ICMP too-big for a dsr-l2 flow → its backend's MAC",
        &input,
        XDP_TX,
        &want,
        Counter::Tx,
    );
    // ipip: encapsulated, with the flow's outer source.
    let c = client(40034);
    let input = too_big_frame(
        GW_MAC_A,
        CLIENT_MAC,
        router,
        tun.addr.ip(),
        1400,
        tun.addr,
        c,
        false,
    );
    let want = encapsulated(&input, sa("10.1.0.12:80"), ref_hash(c, &tun, seed));
    t.check(
        "ICMP too-big for an ipip flow → encapsulated to its backend",
        &input,
        XDP_TX,
        &want,
        Counter::Tx,
    );
    // Not about a VIP, and echo: passed.
    let input = too_big_frame(
        GW_MAC_A,
        CLIENT_MAC,
        router,
        "10.0.0.1".parse().unwrap(),
        1400,
        sa("10.0.0.1:80"),
        c,
        false,
    );
    t.unchanged(
        "ICMP too-big not about a VIP",
        &input,
        XDP_PASS,
        Counter::PassNotTcpUdp,
    );
    let mut echo = eth(GW_MAC_A, CLIENT_MAC, 0x0800);
    let m = icmp4(8, 0, [0, 1, 0, 1], b"ping");
    echo.extend(ipv4(
        0,
        20 + m.len(),
        3,
        false,
        1,
        v4(client(0)),
        v4(nat.addr),
    ));
    echo.extend(m);
    t.unchanged(
        "ICMP echo to a VIP: dropped (not lb's; passed on, it would be routed back)",
        &echo,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let input = too_big_frame(
        GW_MAC_A,
        CLIENT_MAC,
        router,
        nat.addr.ip(),
        1400,
        sa("10.0.0.1:80"),
        c,
        false,
    );
    t.unchanged(
        "ICMP too-big to a VIP address about no VIP flow → dropped",
        &input,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );

    // ---- stateless reverse NAT (gateways behind ECMP) ----
    // A reply with no conntrack entry here is the VIP's if it comes from a current member of
    // the VIP (weighted, drained or down; not removed), and it is not addressed to the
    // gateway itself: flows keep their backend through table changes and gateways.
    let ecmp = vip("10.100.4.1:80/tcp");
    let (e1, e2) = (sa("10.1.0.11:7070"), sa("10.1.0.12:7070"));
    {
        let m = &mut t.gw.dp.maps;
        m.add_vip(&ecmp, 251).unwrap();
        m.set_backends(&ecmp, &[(e1, 1), (e2, 1)]).unwrap();
    }
    let predict =
        |t: &Table, c: SocketAddr| common::oracle::hashed_backend(&t.gw.dp.maps, &ecmp, c).unwrap();
    let c = (41000..41100)
        .map(client)
        .find(|c| predict(&t, *c) == e1)
        .unwrap();
    let reply = Spec::tcp(mac_of(e1), GW_MAC_A, e1, c, Tcp::SynAck);
    t.unchanged(
        "tracked VIP: a reply without conntrack is not rewritten",
        &reply.build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.gw.dp.maps.set_stateless_reverse(&ecmp, true).unwrap();
    let out = reply.with(GW_MAC_A, CLIENT_MAC, ecmp.addr, c).hop().build();
    t.check(
        "stateless: the table gives this flow to this backend → rewritten",
        &reply.build(),
        XDP_TX,
        &out,
        Counter::Tx,
    );
    // The table gives this client's flow to e1; e2's reply is of a flow that began before a
    // change (or through another gateway's older table): still the VIP's.
    let other = Spec::tcp(mac_of(e2), GW_MAC_A, e2, c, Tcp::Ack);
    t.check(
        "stateless: another member's reply (the table moved the flow) → rewritten",
        &other.build(),
        XDP_TX,
        &other.with(GW_MAC_A, CLIENT_MAC, ecmp.addr, c).hop().build(),
        Counter::Tx,
    );
    t.gw.dp.maps.set_weight(&ecmp, e2, 0).unwrap();
    t.check(
        "stateless: a drained member's reply → rewritten",
        &other.build(),
        XDP_TX,
        &other.with(GW_MAC_A, CLIENT_MAC, ecmp.addr, c).hop().build(),
        Counter::Tx,
    );
    t.gw.dp.maps.set_health(&ecmp, e2, false).unwrap();
    t.check(
        "stateless: a member that is down → rewritten",
        &other.build(),
        XDP_TX,
        &other.with(GW_MAC_A, CLIENT_MAC, ecmp.addr, c).hop().build(),
        Counter::Tx,
    );
    t.gw.dp.maps.del_backend(&ecmp, e2).unwrap();
    t.unchanged(
        "stateless: a removed backend's packet → untouched (not lb's)",
        &other.build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    let gw_self = sa("10.1.0.1:41000");
    let to_gw = (41000..41200)
        .map(|p| SocketAddr::new(gw_self.ip(), p))
        .find(|c| predict(&t, *c) == e1)
        .unwrap();
    let own = Spec::tcp(mac_of(e1), GW_MAC_A, e1, to_gw, Tcp::SynAck);
    t.unchanged(
        "stateless: a reply to the gateway's own address (its health check) → untouched",
        &own.build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    let e =
        t.gw.dp
            .maps
            .set_algorithm(&ecmp, lb::Algorithm::Random)
            .unwrap_err();
    assert!(e.to_string().contains("maglev or source-hash"), "{e}");

    // ---- counters ----
    let after = t.gw.dp.maps.counters.verdicts().unwrap();
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
    let ev = |c: Counter| after[c as usize] - before[c as usize];
    assert_eq!(
        ev(Counter::FwdDsrL2),
        18,
        "14 dsr-l2 packets (TTL 1 is not forwarded) + 3 tagged + 1 ICMP"
    );
    assert_eq!(
        ev(Counter::FwdIpip),
        16,
        "14 ipip packets (3 of them too big, 3 with DSCP and ECN) + 1 tagged + 1 ICMP"
    );
    assert_eq!(
        ev(Counter::IcmpToBackend),
        2,
        "dsr-l2 and ipip (NAT: below)"
    );
    assert_eq!(ev(Counter::RevNat), 4, "the stateless replies");
    assert_eq!(ev(Counter::RevStateless), 4, "the stateless replies");
    assert_eq!(
        ev(Counter::CtConfirmed),
        4,
        "dsr-l2 and ipip, TCP and UDP, each by the client's second packet"
    );
    assert_eq!(ev(Counter::PassTtlExceeded), 4);

    // ---- the decapsulation program, on the ipip cases' output ----
    let mut decap = aya::EbpfLoader::new()
        .load(lb::object::LB_DECAP_OBJECT)
        .unwrap();
    // What a backend of these VIPs accepts: lb's prefixes, its own addresses, its VIPs.
    let config = lb::decap::DecapConfig {
        from: vec![
            ("172.16.0.0".parse().unwrap(), 16),
            ("100::".parse().unwrap(), 64),
        ],
        local: ["10.1.0.12", "10.1.0.14", "fd01::11", "fd01::13"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect(),
        vips: [tun.addr.ip(), tun6.addr.ip(), tun46.addr.ip()].to_vec(),
    };
    let prog: &mut Xdp = decap.program_mut("lb_decap").unwrap().try_into().unwrap();
    prog.load().unwrap();
    // (Loaded first: the program keeps the maps this takes out of the object.)
    config
        .write(|name| Ok(decap.take_map(name).expect("decap map")))
        .unwrap();
    let prog: &mut Xdp = decap.program_mut("lb_decap").unwrap().try_into().unwrap();
    let mut decap_rows = 0;
    for (original, encapsulated) in &encapsulated_frames {
        let (action, out) = run(prog, 1, encapsulated);
        assert_eq!(action_name(action), "XDP_PASS");
        // The original packet, with the Ethernet header of the encapsulated one.
        let mut want = encapsulated[..12].to_vec();
        want.extend_from_slice(&original[12..]);
        assert_eq!(hex(&out), hex(&want), "decapsulated");
        decap_rows += 1;
    }
    let mut refused = |desc: &str, frame: &[u8]| {
        let (action, out) = run(prog, 1, frame);
        assert_eq!(
            (action_name(action), hex(&out)),
            ("XDP_PASS", hex(frame)),
            "{desc}: passed untouched, never stripped"
        );
        decap_rows += 1;
    };
    let plain = syn(client(1), sa("10.1.0.12:80")).build();
    refused("not encapsulated", &plain);
    // Protocol 4 with an IPv6 packet inside.
    let mut bad = encapsulated_frames[0].1.clone();
    bad[34] = 0x60;
    refused("wrong inner version", &bad);
    // An outer IPv4 header changed at byte `at` (its checksum made again).
    let outer_v4 = |at: usize, v: u8| {
        let mut f = encapsulated_frames[0].1.clone();
        f[at] = v;
        f[24] = 0;
        f[25] = 0;
        let c = checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    // A spoofed outer source outside the gateway prefixes (192.16.x.y).
    refused("foreign outer source", &outer_v4(26, 192));
    // Addressed to another host (10.1.0.99): stripping it would relay the inner packet.
    refused("foreign outer destination", &outer_v4(33, 99));
    // The inner packet is for an address that is not one of this backend's VIPs.
    let mut not_vip = encapsulated_frames[0].1.clone();
    not_vip[34 + 19] = 77;
    refused("inner destination not a VIP", &not_vip);
    let mut not_vip6 = encapsulated_frames
        .iter()
        .find(|(o, _)| o[12..14] == [0x86, 0xdd])
        .unwrap()
        .1
        .clone();
    let last = 14 + 40 + 39; // the inner IPv6 destination's last byte
    not_vip6[last] ^= 0x55;
    refused("IPv6: inner destination not a VIP", &not_vip6);
    // ECN (RFC 6040): a CE mark on the outer header reaches an ECN-capable inner packet...
    let (original, _) = &encapsulated_frames[0];
    let ect0 = marked(original, 0xba);
    let mut ce = encapsulated(&ect0, sa("10.1.0.12:80"), 7);
    ce[15] |= 0x03;
    ce[24] = 0;
    ce[25] = 0;
    let c = checksum(&ce[14..34]);
    ce[24..26].copy_from_slice(&c.to_be_bytes());
    let (action, out) = run(prog, 1, &ce);
    assert_eq!(action_name(action), "XDP_PASS");
    let mut want = ce[..12].to_vec();
    want.extend_from_slice(&[0x08, 0x00]);
    want.extend_from_slice(&ce[34..]);
    let want = marked(&want, 0xbb);
    assert_eq!(hex(&out), hex(&want), "CE carried into the inner header");
    checksums_ok(&out).expect("the inner checksums after the CE mark");
    decap_rows += 1;
    // ... and an inner packet that is not ECN-capable is dropped rather than lose it.
    let mut ce_not_ect = encapsulated(original, sa("10.1.0.12:80"), 7);
    ce_not_ect[15] |= 0x03;
    ce_not_ect[24] = 0;
    ce_not_ect[25] = 0;
    let c = checksum(&ce_not_ect[14..34]);
    ce_not_ect[24..26].copy_from_slice(&c.to_be_bytes());
    let (action, _) = run(prog, 1, &ce_not_ect);
    assert_eq!(action_name(action), "XDP_DROP", "CE on a not-ECT packet");
    decap_rows += 1;
    let map = decap.map("LB_DECAP_STATS_V2").unwrap();
    let stats: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(map).unwrap();
    let n = |c: DecapCounter| -> u64 { stats.get(&(c as u32), 0).unwrap().iter().sum() };
    assert_eq!(n(DecapCounter::DecapV4InV4), 2, "the frame and the CE one");
    assert_eq!(n(DecapCounter::DecapV6InV6), 1);
    assert_eq!(n(DecapCounter::DecapV4InV6), 1);
    assert_eq!(n(DecapCounter::PassNotEncap), 1);
    assert_eq!(n(DecapCounter::PassMalformed), 1);
    assert_eq!(n(DecapCounter::PassForeign), 1);
    assert_eq!(n(DecapCounter::PassNotLocal), 1);
    assert_eq!(n(DecapCounter::PassNotVip), 2);
    assert_eq!(n(DecapCounter::DroppedEcn), 1);
    assert_eq!(DECAP_COUNTER_COUNT, 10);

    // ---- ICMP errors to NAT backends; ICMP errors are forwarded as a router forwards ----
    // (Last: NAT rewrites these messages, and their TTL handling is checked here.)
    let before = t.gw.dp.maps.counters.verdicts().unwrap();
    let rows_before = t.reasons.len();
    let router: IpAddr = "10.0.0.7".parse().unwrap();
    let router6: IpAddr = "fd00::7".parse().unwrap();
    // NAT: establish the flow, then the quoted source becomes the backend's.
    let c = client(40031);
    let s = syn(c, nat.addr);
    let nat_backend = sa("10.1.0.13:8080");
    let out = s
        .with(GW_MAC_A, mac_of(nat_backend), c, nat_backend)
        .hop()
        .build();
    t.check("nat flow", &s.build(), XDP_TX, &out, Counter::Tx);
    let input = too_big_frame(
        GW_MAC_A,
        CLIENT_MAC,
        router,
        nat.addr.ip(),
        1400,
        nat.addr,
        c,
        false,
    );
    // Forwarded as a router would: one hop less.
    let want = hop(&too_big_frame(
        mac_of(nat_backend),
        GW_MAC_A,
        router,
        nat_backend.ip(),
        1400,
        nat_backend,
        c,
        false,
    ));
    t.check(
        "ICMP too-big for a NAT flow → its backend, rewritten",
        &input,
        XDP_TX,
        &want,
        Counter::Tx,
    );
    let c = client6(40032);
    let s = syn(c, nat6.addr);
    let nat6_backend = sa("[fd01::11]:8080");
    let out = s
        .with(GW_MAC_A, mac_of(nat6_backend), c, nat6_backend)
        .hop()
        .build();
    t.check("nat flow v6", &s.build(), XDP_TX, &out, Counter::Tx);
    let input = too_big_frame(
        GW_MAC_A,
        CLIENT_MAC,
        router6,
        nat6.addr.ip(),
        1400,
        nat6.addr,
        c,
        false,
    );
    // Forwarded as a router would: one hop less.
    let want = hop(&too_big_frame(
        mac_of(nat6_backend),
        GW_MAC_A,
        router6,
        nat6_backend.ip(),
        1400,
        nat6_backend,
        c,
        false,
    ));
    t.check(
        "ICMPv6 too-big for a NAT flow → its backend, rewritten",
        &input,
        XDP_TX,
        &want,
        Counter::Tx,
    );
    let c = client(40033);
    let input = too_big_frame(
        GW_MAC_A,
        CLIENT_MAC,
        router,
        l2.addr.ip(),
        1400,
        l2.addr,
        c,
        false,
    );
    let mut ttl1 = input;
    common::mutate::set_ipv4_u8(&mut ttl1, 8, 1);
    t.unchanged(
        "ICMP too-big with TTL 1 for a dsr-l2 flow → to the kernel",
        &ttl1,
        XDP_PASS,
        Counter::PassTtlExceeded,
    );
    let c = client(40031);
    let mut ttl1 = too_big_frame(
        GW_MAC_A,
        CLIENT_MAC,
        router,
        nat.addr.ip(),
        1400,
        nat.addr,
        c,
        false,
    );
    common::mutate::set_ipv4_u8(&mut ttl1, 8, 1);
    t.unchanged(
        "ICMP too-big with TTL 1 for a NAT flow → to the kernel",
        &ttl1,
        XDP_PASS,
        Counter::PassTtlExceeded,
    );
    let c = client(40034);
    let mut ttl1 = too_big_frame(
        GW_MAC_A,
        CLIENT_MAC,
        router,
        tun.addr.ip(),
        1400,
        tun.addr,
        c,
        false,
    );
    common::mutate::set_ipv4_u8(&mut ttl1, 8, 1);
    t.unchanged(
        "ICMP too-big with TTL 1 for an ipip flow → to the kernel",
        &ttl1,
        XDP_PASS,
        Counter::PassTtlExceeded,
    );
    let after = t.gw.dp.maps.counters.verdicts().unwrap();
    let mut want: HashMap<usize, u64> = HashMap::new();
    for r in &t.reasons[rows_before..] {
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
    assert_eq!(
        after[Counter::IcmpToBackend as usize] - before[Counter::IcmpToBackend as usize],
        2,
        "the two NAT messages"
    );
    println!(
        "{} dsr/ipip/icmp cases and {decap_rows} decap cases passed",
        t.rows
    );
}
