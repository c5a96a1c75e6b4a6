//! Property test: 100,000 random and mutated packets through the real program, each checked
//! against a reference model (`common::model`, written from README's verdict table and
//! ARCHITECTURE.md, with its backends from `common::oracle`).
//!
//! The configuration covers NAT (IPv4 and IPv6, TCP and UDP, a backend behind the second
//! interface), dsr-l2, ipip, stateless reverse NAT, ICMP too-big about VIP flows, and every
//! algorithm: maglev, source-hash, random, round robin and least-conn. For every packet: the
//! action and the verdict counter are the model's (exactly one verdict counted), and so are
//! its event counters; an untouched packet is byte for byte the input; a forwarded one goes to
//! the model's backend (exactly, for maglev and source-hash; one of the weighted backends for
//! the others) with the model's MACs, one hop later, with nothing else changed but checksums,
//! which stay valid when they were. The second half runs under a flood threshold low enough to
//! be crossed, where the model allows both answers that the timing decides. Then bursts of new
//! flows to the random and round-robin VIPs check the weight shares. At the end, every
//! backend's active count equals its counted confirmed flows, and each table holds only its
//! kinds of entries.
//!
//! Reproducible: the seed is printed; set LB_RANDOM_SEED to replay one. Without it, `cargo
//! xtask test` runs a fixed seed and one random seed (two tests).

mod common;

use std::net::{IpAddr, SocketAddr};

use common::{
    model::{route, Algo, Mode, Model, Out, Outcome, Route, Service},
    packets::{checksums_ok, endpoints, tag, untag, Spec, Tcp, TPID_8021AD, TPID_8021Q},
    raw::too_big_frame,
    testrun::{action_name, run, run_kind, Kind, XDP_REDIRECT, XDP_TX},
    topology::{pin_to_current_cpu, Gateway, CLIENT_MAC, GW_MAC_A, GW_MAC_B},
};
use etherparse::{SlicedPacket, TransportSlice};
use lb::{CtTable, Vip};
use lb_common::{
    Counter, Timeouts, COUNTER_NAMES, CT_F_COUNTED, CT_F_DIRECT, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT,
    CT_F_RST, CT_F_RST_BACKEND, CT_S_CLOSED, CT_S_CLOSING, CT_S_ESTABLISHED, CT_S_OPENING,
    CT_S_UDP, VERDICT_COUNT,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const PACKETS: usize = 100_000;

/// Sources no real client has: what the data plane must drop (besides the VIP itself).
const MARTIANS_V4: [&str; 8] = [
    "0.0.0.0",
    "0.12.34.56",
    "127.0.0.1",
    "169.254.7.7",
    "224.0.0.5",
    "239.1.2.3",
    "240.1.2.3",
    "255.255.255.255",
];
const MARTIANS_V6: [&str; 5] = ["::", "::1", "fe80::7", "febf::1", "ff02::1"];

/// The configuration: every mode and algorithm. Backends of one VIP sit on one interface
/// (the model predicts the interface before knowing which of them an unhashed pick takes).
fn services() -> Vec<Service> {
    let tcp = |vip: &str, mode, algo, b: &[(&str, u32)]| {
        Service::new(vip.parse().unwrap(), false, mode, algo, b)
    };
    let udp = |vip: &str, b: &[(&str, u32)]| {
        Service::new(vip.parse().unwrap(), true, Mode::Nat, Algo::Maglev, b)
    };
    let mut stateless = tcp(
        "10.100.0.105:80",
        Mode::Nat,
        Algo::Maglev,
        &[("10.1.0.12:8085", 1), ("10.1.0.13:8085", 1)],
    );
    stateless.stateless = true;
    vec![
        tcp(
            "10.100.0.100:80",
            Mode::Nat,
            Algo::Maglev,
            &[("10.1.0.11:8080", 1), ("10.1.0.12:8080", 2)],
        ),
        tcp(
            "10.100.0.106:80",
            Mode::Nat,
            Algo::Maglev,
            &[("10.2.0.21:8080", 1)],
        ),
        udp("10.100.0.100:80", &[("10.1.0.13:5353", 1)]),
        tcp(
            "[fd10::100]:80",
            Mode::Nat,
            Algo::Maglev,
            &[("[fd01::11]:8080", 1), ("[fd01::12]:8080", 1)],
        ),
        udp("[fd10::100]:80", &[("[fd01::13]:5353", 1)]),
        tcp(
            "10.100.0.101:80",
            Mode::Nat,
            Algo::SourceHash(24),
            &[("10.1.0.11:8081", 1), ("10.1.0.12:8081", 3)],
        ),
        tcp(
            "10.100.0.102:80",
            Mode::Nat,
            Algo::Random,
            &[("10.1.0.11:8082", 1), ("10.1.0.13:8082", 3)],
        ),
        tcp(
            "10.100.0.103:80",
            Mode::Nat,
            Algo::RoundRobin,
            &[("10.1.0.12:8083", 1), ("10.1.0.13:8083", 2)],
        ),
        tcp(
            "10.100.0.104:80",
            Mode::Nat,
            Algo::LeastConn,
            &[("10.1.0.11:8084", 1), ("10.1.0.12:8084", 1)],
        ),
        stateless,
        tcp(
            "10.100.0.110:80",
            Mode::DsrL2,
            Algo::Maglev,
            &[("10.1.0.11:80", 1), ("10.1.0.12:80", 1)],
        ),
        tcp(
            "[fd10::110]:80",
            Mode::DsrL2,
            Algo::Maglev,
            &[("[fd01::11]:80", 1), ("[fd01::12]:80", 1)],
        ),
        tcp(
            "10.100.0.120:80",
            Mode::Ipip,
            Algo::Maglev,
            &[("10.1.0.13:80", 1), ("10.1.0.11:80", 1)],
        ),
        tcp(
            "[fd10::120]:80",
            Mode::Ipip,
            Algo::Maglev,
            &[("[fd01::13]:80", 1)],
        ),
    ]
}

/// Configures the gateway as the model says, with timeouts longer than the test.
fn configure(gw: &mut Gateway, model: &Model) {
    let long = Timeouts {
        opening_s: 3600,
        established_s: 3600,
        closing_s: 3600,
        closed_s: 3600,
        udp_s: 3600,
    };
    for s in &model.services {
        let v = Vip::new(
            s.vip,
            if s.udp {
                lb::Proto::Udp
            } else {
                lb::Proto::Tcp
            },
        );
        let m = &mut gw.dp.maps;
        m.add_vip(&v, common::model::TABLE_SIZE).unwrap();
        m.set_forward(
            &v,
            match s.mode {
                Mode::Nat => lb::model::Forward::Nat,
                Mode::DsrL2 => lb::model::Forward::DsrL2,
                Mode::Ipip => lb::model::Forward::Ipip,
            },
        )
        .unwrap();
        m.set_backends(&v, &s.backends).unwrap();
        m.set_algorithm(
            &v,
            match s.algo {
                Algo::Maglev => lb::Algorithm::Maglev,
                Algo::SourceHash(p) => lb::Algorithm::SourceHash { prefix_len: p },
                Algo::Random => lb::Algorithm::Random,
                Algo::RoundRobin => lb::Algorithm::RoundRobin,
                Algo::LeastConn => lb::Algorithm::LeastConn,
            },
        )
        .unwrap();
        if s.stateless {
            m.set_stateless_reverse(&v, true).unwrap();
        }
        m.set_timeouts(&v, long).unwrap();
        // The model's table is the one in the maps (round robin's holds its sequence).
        if s.algo != Algo::RoundRobin {
            let ids: std::collections::HashMap<u32, SocketAddr> = m
                .backends(&v)
                .unwrap()
                .iter()
                .map(|b| (b.id, b.addr))
                .collect();
            let got: Vec<Option<SocketAddr>> = m
                .table(&v)
                .unwrap()
                .iter()
                .map(|id| ids.get(id).copied())
                .collect();
            let want: Vec<Option<SocketAddr>> =
                s.table.iter().map(|i| i.map(|i| s.backends[i].0)).collect();
            assert_eq!(got, want, "{}: the maps' table is not the model's", s.vip);
        }
    }
}

/// An ICMP too-big from a router on the client's side (fragmentation needed, IPv4; packet too
/// big, IPv6) about a packet the VIP sent the client, with this TTL / hop limit.
fn too_big(client: SocketAddr, vip: SocketAddr, udp: bool, ttl: u8) -> Vec<u8> {
    let router: IpAddr = if client.is_ipv4() {
        "10.0.0.2".parse().unwrap()
    } else {
        "fd00::2".parse().unwrap()
    };
    let mut f = too_big_frame(
        GW_MAC_A,
        CLIENT_MAC,
        router,
        vip.ip(),
        1400,
        vip,
        client,
        udp,
    );
    if client.is_ipv4() {
        common::mutate::set_ipv4_u8(&mut f, 8, ttl);
    } else {
        f[HOP_LIMIT_V6] = ttl;
    }
    f
}

fn random_ttl(rng: &mut StdRng) -> u8 {
    match rng.random_range(0..20) {
        0 => 0,
        1..=2 => 1,
        3 => 2,
        4..=7 => rng.random(),
        _ => 64,
    }
}

fn random_addr(rng: &mut StdRng, v6: bool, cfg: &Model) -> SocketAddr {
    // Mostly addresses that matter (VIPs, backends, the client), sometimes anything.
    match rng.random_range(0..10) {
        0..=3 => {
            let s = &cfg.services[rng.random_range(0..cfg.services.len())];
            if s.vip.is_ipv6() == v6 {
                return s.vip;
            }
        }
        4..=5 => {
            let s = &cfg.services[rng.random_range(0..cfg.services.len())];
            let b = s.backends[rng.random_range(0..s.backends.len())].0;
            if b.is_ipv6() == v6 {
                return b;
            }
        }
        _ => {}
    }
    let port = if rng.random_bool(0.3) {
        80
    } else {
        rng.random_range(1..=65535)
    };
    let ip: IpAddr = if v6 {
        if rng.random_bool(0.5) {
            "fd00::2".parse().unwrap()
        } else {
            IpAddr::V6(rng.random::<u128>().into())
        }
    } else if rng.random_bool(0.5) {
        "10.0.0.2".parse().unwrap()
    } else {
        IpAddr::V4(rng.random::<u32>().into())
    };
    SocketAddr::new(ip, port)
}

/// Forwarded flows seen so far (client, VIP, backend, is UDP), for generating more of them,
/// their replies and ICMP errors about them.
type Seen = Vec<(SocketAddr, SocketAddr, SocketAddr, bool)>;

/// Handshakes whose SYN-ACK lb rewrote: (client, VIP, the acknowledgment number that completes
/// them), for generating the client's ACK.
type Handshakes = Vec<(SocketAddr, SocketAddr, u32)>;

/// A generated frame; `pristine`: built as specified and not mutated.
struct Generated {
    frame: Vec<u8>,
    pristine: bool,
}

fn random_packet(rng: &mut StdRng, cfg: &Model, seen: &Seen, handshakes: &Handshakes) -> Generated {
    let v6 = rng.random_bool(0.4);
    let mut src = random_addr(rng, v6, cfg);
    let mut dst = random_addr(rng, v6, cfg);
    let mut force_udp = None;
    let mut flags = [
        Tcp::Syn,
        Tcp::Ack,
        Tcp::SynAck,
        Tcp::Fin,
        Tcp::Rst,
        Tcp::RstAck,
    ][rng.random_range(0..6)];
    let seq = rng.random();
    let mut ack = rng.random();
    let pick = rng.random_range(0..100);
    if !handshakes.is_empty() && pick < 5 {
        // The client's ACK completing a handshake (sometimes off by a little).
        let (client, vip, a) = handshakes[rng.random_range(0..handshakes.len())];
        src = client;
        dst = vip;
        force_udp = Some(false);
        flags = Tcp::Ack;
        ack = a.wrapping_add([0, 0, 0, 1, u32::MAX][rng.random_range(0..5)]);
    } else if !seen.is_empty() && pick < 25 {
        // A reply to a flow lb forwarded (from its backend, or from another of the VIP's).
        let (client, vip, backend, udp) = seen[rng.random_range(0..seen.len())];
        src = backend;
        if rng.random_bool(0.1) {
            let s = cfg
                .services
                .iter()
                .find(|s| s.vip == vip && s.udp == udp)
                .unwrap();
            src = s.backends[rng.random_range(0..s.backends.len())].0;
        }
        dst = client;
        force_udp = Some(udp);
    } else if !seen.is_empty() && pick < 35 {
        // More of a flow lb forwarded, from its client.
        let (client, vip, _, udp) = seen[rng.random_range(0..seen.len())];
        src = client;
        dst = vip;
        force_udp = Some(udp);
    } else if !seen.is_empty() && pick < 38 {
        // An ICMP too-big about a flow lb forwarded, from a router on the client's side.
        let (client, vip, _, udp) = seen[rng.random_range(0..seen.len())];
        if cfg.icmp_ok(vip, udp) {
            let mut f = too_big(client, vip, udp, random_ttl(rng));
            let pristine = rng.random_bool(0.7);
            if !pristine {
                mutate(rng, &mut f);
            }
            return Generated { frame: f, pristine };
        }
    } else if pick < 42 {
        // A martian source.
        let a = if v6 {
            MARTIANS_V6[rng.random_range(0..MARTIANS_V6.len())]
        } else {
            MARTIANS_V4[rng.random_range(0..MARTIANS_V4.len())]
        };
        src = SocketAddr::new(a.parse().unwrap(), src.port());
    } else if pick < 45 {
        src.set_port(0);
    }
    let tcp = match force_udp {
        Some(udp) => !udp,
        None => rng.random_bool(0.6),
    };
    let mut spec = if tcp {
        Spec::tcp(CLIENT_MAC, GW_MAC_A, src, dst, flags).seq_ack(seq, ack)
    } else {
        Spec::udp(CLIENT_MAC, GW_MAC_A, src, dst)
    };
    spec.ttl = random_ttl(rng);
    spec.payload = (0..rng.random_range(0..80)).map(|_| rng.random()).collect();
    if !v6 && rng.random_bool(0.2) {
        let words = rng.random_range(1..=10);
        spec.ipv4_options = vec![1; words * 4]; // NOPs
    }
    let mut f = spec.build();
    let mutations = match rng.random_range(0..10) {
        0..=3 => 0,
        4..=7 => 1,
        _ => rng.random_range(2..=4),
    };
    for _ in 0..mutations {
        mutate(rng, &mut f);
    }
    if f.len() < 14 {
        f.resize(14, 0);
    }
    let pristine = mutations == 0;
    Generated { frame: f, pristine }
}

fn mutate(rng: &mut StdRng, f: &mut Vec<u8>) {
    let len = f.len();
    match rng.random_range(0..11) {
        0 => f.truncate(rng.random_range(14..=len.max(14))),
        1 => {
            let i = rng.random_range(0..len);
            f[i] = rng.random();
        }
        2 if len > 14 => f[14] = (f[14] & 0xf0) | rng.random_range(0..16), // IHL
        3 => {
            // IPv4 total length or IPv6 payload length
            let at = if f[12] == 0x86 { 18 } else { 16 };
            if len > at + 1 {
                let v: u16 = rng.random();
                f[at..at + 2].copy_from_slice(&v.to_be_bytes());
            }
        }
        4 => {
            // TCP data offset / UDP length (assuming no options)
            let l4 = if f[12] == 0x86 { 54 } else { 34 };
            if len > l4 + 13 {
                f[l4 + 12] = rng.random();
                f[l4 + 4] = rng.random();
                f[l4 + 5] = rng.random();
            }
        }
        5 => {
            // TCP flags
            let l4 = if f[12] == 0x86 { 54 } else { 34 };
            if len > l4 + 13 {
                f[l4 + 13] = rng.random();
            }
        }
        6 => {
            // junk after the headers (Ethernet padding, trailers)
            let n = rng.random_range(1..64);
            f.extend((0..n).map(|_| rng.random::<u8>()));
        }
        7 => {
            // fragment bits / IPv6 next header
            if f[12] == 0x86 {
                if len > 20 {
                    f[20] = [0, 43, 44, 60, 58, 6, 17][rng.random_range(0..7)];
                }
            } else if len > 21 {
                f[20] = rng.random();
                f[21] = rng.random();
            }
        }
        8 => {
            let types = [
                [0x08, 0x00],
                [0x86, 0xdd],
                [0x08, 0x06],
                [rng.random(), rng.random()],
            ];
            let t = types[rng.random_range(0..types.len())];
            f[12..14].copy_from_slice(&t);
        }
        9 if len > 14 => {
            // IP version nibble
            f[14] = (rng.random_range(0..16u8) << 4) | (f[14] & 0x0f);
        }
        2 | 9 => {}
        _ => {
            // random bytes from the start of IP on
            let n = rng.random_range(0..48);
            f.truncate(14);
            f.extend((0..n).map(|_| rng.random::<u8>()));
        }
    }
}

/// Byte positions where a rewrite may legitimately differ: MACs, IP addresses, ports,
/// checksums (IPv4 header checksum, L4 checksum) and the TTL / hop limit.
fn allowed_diff(f: &[u8], i: usize) -> bool {
    if i < 12 {
        return true;
    }
    if is_v4(f) {
        let l4 = 14 + ((f[14] & 0x0f) as usize) * 4;
        let proto = f[23];
        let csum = if proto == 6 { l4 + 16 } else { l4 + 6 };
        i == TTL_V4
            || (24..26).contains(&i)
            || (26..34).contains(&i)
            || (l4..l4 + 4).contains(&i)
            || (csum..csum + 2).contains(&i)
    } else {
        let l4 = 54;
        let proto = f[20];
        let csum = if proto == 6 { l4 + 16 } else { l4 + 6 };
        i == HOP_LIMIT_V6
            || (22..54).contains(&i)
            || (l4..l4 + 4).contains(&i)
            || (csum..csum + 2).contains(&i)
    }
}

const TTL_V4: usize = 14 + 8;
const HOP_LIMIT_V6: usize = 14 + 7;

fn is_v4(f: &[u8]) -> bool {
    f[12] == 0x08 && f[13] == 0x00
}

/// The TTL / hop limit of a frame that parses as IP.
fn ttl(f: &[u8]) -> u8 {
    if is_v4(f) {
        f[TTL_V4]
    } else {
        f[HOP_LIMIT_V6]
    }
}

/// The TCP flags, sequence and acknowledgment numbers of a TCP frame.
fn tcp_fields(f: &[u8]) -> Option<(bool, bool, u32)> {
    let p = SlicedPacket::from_ethernet(f).ok()?;
    match p.transport? {
        TransportSlice::Tcp(t) => Some((t.syn(), t.ack(), t.sequence_number())),
        _ => None,
    }
}

/// The MACs a packet sent to `dst` must carry: (destination, source).
fn macs_to(dst: IpAddr) -> Option<([u8; 6], [u8; 6])> {
    match route(dst) {
        Route::A(mac) => Some((mac, GW_MAC_A)),
        Route::B(mac) => Some((mac, GW_MAC_B)),
        _ => None,
    }
}

/// Events the model predicts exactly.
const MODELLED_EVENTS: [Counter; 6] = [
    Counter::RevNat,
    Counter::RevStateless,
    Counter::IcmpToBackend,
    Counter::FwdNat,
    Counter::FwdDsrL2,
    Counter::FwdIpip,
];

/// Checks one packet's result against one outcome; returns the backend it went to (for
/// forwarded packets), or why it is not this outcome.
fn matches(
    o: &Outcome,
    input: &[u8],
    action: u32,
    out: &[u8],
    delta: &[u64],
) -> Result<Option<SocketAddr>, String> {
    if action != o.action || delta[o.verdict as usize] != 1 {
        return Err(format!(
            "expected {} / {}",
            action_name(o.action),
            COUNTER_NAMES[o.verdict as usize]
        ));
    }
    // The events the model knows count exactly when it says (flow-state events depend on
    // what a blind observer cannot know).
    for e in MODELLED_EVENTS {
        let want = o.events.contains(&e) as u64;
        if delta[e as usize] != want {
            return Err(format!(
                "event {} counted {}, expected {want}",
                COUNTER_NAMES[e as usize], delta[e as usize]
            ));
        }
    }
    let same_macs = || out.get(..12) == input.get(..12);
    let want_macs = |dst: IpAddr| -> Result<(), String> {
        match (o.macs.is_some(), macs_to(dst)) {
            (true, Some((d, s))) if out[..6] == d && out[6..12] == s => Ok(()),
            (false, _) if same_macs() => Ok(()),
            _ => Err(format!("wrong MACs for {dst}: {}", hex(&out[..12]))),
        }
    };
    // The IP packet one hop later, as the model expects it rewritten: only these bytes may
    // differ from the input: the MACs, the TTL / hop limit (exactly one less), the addresses
    // and ports the outcome names, and checksums (valid afterwards if they were before).
    let rewritten = |want_src: SocketAddr, want_dst: SocketAddr| -> Result<(), String> {
        if out.len() != input.len() {
            return Err("length changed".into());
        }
        let (src, dst, _) = endpoints(out).ok_or("output does not parse")?;
        if (src, dst) != (want_src, want_dst) {
            return Err(format!("{src} → {dst}, expected {want_src} → {want_dst}"));
        }
        for i in 12..out.len() {
            if out[i] != input[i] && !allowed_diff(input, i) {
                return Err(format!("byte {i} changed"));
            }
        }
        if ttl(input) < 2 || ttl(out) != ttl(input) - 1 {
            return Err(format!("TTL {} became {}", ttl(input), ttl(out)));
        }
        if checksums_ok(input).is_ok() {
            checksums_ok(out).map_err(|e| format!("{e} broken by the rewrite"))?;
        }
        Ok(())
    };
    let (isrc, idst) = endpoints(input).map(|(s, d, _)| (s, d)).unzip();
    match &o.out {
        Out::Untouched => {
            if out != input {
                return Err("changed".into());
            }
            Ok(None)
        }
        Out::Dropped => Ok(None),
        Out::Nat { backend } => {
            let (_, b, _) = endpoints(out).ok_or("output does not parse")?;
            if !backend.allows(b) {
                return Err(format!("backend {b}, expected {backend:?}"));
            }
            rewritten(isrc.unwrap(), b)?;
            want_macs(b.ip())?;
            Ok(Some(b))
        }
        Out::Reply { vip } => {
            rewritten(*vip, idst.unwrap())?;
            want_macs(idst.unwrap().ip())?;
            Ok(None)
        }
        Out::DsrL2 { backend } => {
            // Which backend: the one whose MAC the frame now carries.
            let b = match backend {
                common::model::Pick::Exact(b) => *b,
                common::model::Pick::OneOf(v) => *v
                    .iter()
                    .find(|b| macs_to(b.ip()).is_some_and(|(d, _)| out[..6] == d))
                    .ok_or("no backend's MAC")?,
            };
            if out.len() != input.len() || endpoints(out) != endpoints(input) {
                return Err("dsr-l2 changed the packet".into());
            }
            for i in 12..out.len() {
                let csum = is_v4(input) && (24..26).contains(&i);
                if out[i] != input[i] && !csum && i != TTL_V4 && i != HOP_LIMIT_V6 {
                    return Err(format!("dsr-l2 changed byte {i}"));
                }
            }
            if ttl(out) != ttl(input) - 1 {
                return Err("dsr-l2: TTL not one less".into());
            }
            if checksums_ok(input).is_ok() {
                checksums_ok(out).map_err(|e| format!("{e} broken by dsr-l2"))?;
            }
            want_macs(b.ip())?;
            Ok(Some(b))
        }
        Out::Ipip { backend } => {
            let outer = if is_v4(input) { 20 } else { 40 };
            if out.len() != input.len() + outer || out[12..14] != input[12..14] {
                return Err(format!("not encapsulated ({} bytes)", out.len()));
            }
            let dst: IpAddr = if is_v4(input) {
                <[u8; 4]>::try_from(&out[30..34]).unwrap().into()
            } else {
                <[u8; 16]>::try_from(&out[38..54]).unwrap().into()
            };
            let b = match backend {
                common::model::Pick::Exact(b) => *b,
                common::model::Pick::OneOf(v) => *v
                    .iter()
                    .find(|b| b.ip() == dst)
                    .ok_or("outer destination")?,
            };
            if dst != b.ip() {
                return Err(format!("outer destination {dst}, expected {b}"));
            }
            // The inner packet: the input one hop later.
            let inner = &out[14 + outer..];
            for (i, (x, y)) in inner.iter().zip(&input[14..]).enumerate() {
                let at = i + 14;
                let csum = is_v4(input) && (24..26).contains(&at);
                if x != y && !csum && at != TTL_V4 && at != HOP_LIMIT_V6 {
                    return Err(format!("inner byte {at} changed"));
                }
            }
            want_macs(b.ip())?;
            Ok(Some(b))
        }
        Out::IcmpToBackend { backend } => {
            if out.len() != input.len() {
                return Err("length changed".into());
            }
            let dst: IpAddr = if is_v4(input) {
                <[u8; 4]>::try_from(&out[30..34]).unwrap().into()
            } else {
                <[u8; 16]>::try_from(&out[38..54]).unwrap().into()
            };
            let b = match backend {
                common::model::Pick::Exact(b) => *b,
                common::model::Pick::OneOf(v) => {
                    *v.iter().find(|b| b.ip() == dst).ok_or("ICMP destination")?
                }
            };
            if dst != b.ip() {
                return Err(format!("ICMP to {dst}, expected {b}"));
            }
            want_macs(b.ip())?;
            Ok(Some(b))
        }
    }
}

/// A fixed seed, so that CI always runs this case.
#[test]
fn random_and_mutated_packets_fixed_seed() {
    property(0x6c62_7261_6e64, Kind::Xdp);
}

/// The same packets through `lb_tc` (the same data plane as a tc program): the same model.
#[test]
fn random_and_mutated_packets_tc() {
    property(0x6c62_7261_6e64, Kind::Tc);
}

/// A new seed every run (LB_RANDOM_SEED replays one).
#[test]
fn random_and_mutated_packets_random_seed() {
    let seed: u64 = std::env::var("LB_RANDOM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    property(seed, Kind::Xdp);
}

fn property(seed: u64, kind: Kind) {
    println!("LB_RANDOM_SEED={seed} ({kind:?})");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gw = Gateway::new(if kind == Kind::Xdp {
        "random"
    } else {
        "random-tc"
    });
    // The flood threshold is per CPU: one CPU for every packet.
    pin_to_current_cpu();
    let hash_seed = gw.dp.maps.conf().unwrap().hash_seed;
    let mut model = Model::new(services(), hash_seed);
    configure(&mut gw, &model);
    let ifindex = gw.ifindex_a;
    let start = gw.dp.maps.counters.verdicts().unwrap();
    let mut before = start.clone();
    let (mut forwarded, mut reversed, mut unchanged, mut several) = (0, 0, 0, 0);
    let mut refused = 0u64;
    let mut tagged = 0u64;
    let mut per_kind = std::collections::BTreeMap::<&str, u64>::new();
    let mut seen: Seen = Vec::new();
    let mut handshakes: Handshakes = Vec::new();
    for n in 0..PACKETS {
        if n == PACKETS / 2 {
            // The second half under a flood threshold low enough to be crossed: new flows
            // above it get no entry, and replies without one are matched by the table.
            let conf = gw.dp.maps.conf().unwrap();
            gw.dp
                .maps
                .set_conf(lb_common::GlobalConf {
                    flood_rate: 50,
                    ..conf
                })
                .unwrap();
            model.flood_possible = true;
        }
        let g = random_packet(&mut rng, &model, &seen, &handshakes);
        let mut wire = g.frame;
        // VLAN tags: what lb does with a tagged frame is what it does with the frame without
        // them, the tags kept (the model predicts for the untagged frame) — except a route out
        // of another interface, which the fixtures cover. A tenth of the frames get one or two
        // tags; a mutated frame may have made some of its own.
        let Some((input, tags)) = untag(&wire) else {
            let Some((action, out)) = run_kind(&mut gw.dp, kind, ifindex, &wire) else {
                refused += 1;
                continue;
            };
            let after = gw.dp.maps.counters.verdicts().unwrap();
            assert_eq!(
                after[Counter::PassMalformedEth as usize]
                    - before[Counter::PassMalformedEth as usize],
                1,
                "a frame that ends inside its VLAN tags: {}",
                hex(&wire)
            );
            assert_eq!((action_name(action), &out), ("XDP_PASS", &wire));
            before = after;
            continue;
        };
        let outcomes = model.predict(&input);
        let mut tags = tags;
        if tags.is_empty()
            && wire.len() >= 14
            && rng.random_bool(0.1)
            && outcomes.iter().all(|o| o.verdict != Counter::Redirect)
        {
            let t: Vec<(u16, u16)> = match rng.random_range(0..3) {
                0 => vec![(TPID_8021Q, rng.random())],
                1 => vec![(TPID_8021AD, rng.random())],
                _ => vec![(TPID_8021AD, rng.random()), (TPID_8021Q, rng.random())],
            };
            wire = tag(&wire, &t);
            tags = wire[12..12 + 4 * t.len()].to_vec();
            tagged += 1;
        }
        // (None: a frame too short for the kernel to make a socket buffer of; tc only.)
        let Some((mut action, out)) = run_kind(&mut gw.dp, kind, ifindex, &wire) else {
            refused += 1;
            continue;
        };
        // The output keeps the tags; the model judges it without them.
        let out = if tags.is_empty() {
            out
        } else {
            assert!(
                out.len() >= 12 + tags.len() && out[12..12 + tags.len()] == tags[..],
                "packet {n}: the VLAN tags were not kept: in {}, out {}",
                hex(&wire),
                hex(&out)
            );
            let mut plain = out[..12].to_vec();
            plain.extend(&out[12 + tags.len()..]);
            plain
        };
        let after = gw.dp.maps.counters.verdicts().unwrap();
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        before = after;
        // tc sends a packet back out of its interface with a redirect: what XDP_TX is to the
        // model (the verdict counter says which it was).
        if kind == Kind::Tc && action == XDP_REDIRECT && delta[Counter::Tx as usize] == 1 {
            action = XDP_TX;
        }
        let verdicts: u64 = delta[..VERDICT_COUNT as usize].iter().sum();
        let ctx = || format!("packet {n} (seed {seed}): {}", hex(&input));
        assert_eq!(verdicts, 1, "one verdict per packet: {}", ctx());
        let results: Vec<_> = outcomes
            .iter()
            .map(|o| matches(o, &input, action, &out, &delta))
            .collect();
        let Some(i) = results.iter().position(|r| r.is_ok()) else {
            let counted: Vec<&str> = (0..delta.len())
                .filter(|&i| delta[i] > 0)
                .map(|i| COUNTER_NAMES[i])
                .collect();
            panic!(
                "{}: got {} counting {counted:?}, output {}; the model allows {outcomes:#?}, each refused: {results:?}; the model knows {}",
                ctx(),
                action_name(action),
                hex(&out),
                model.knowledge(&input)
            );
        };
        if outcomes.len() > 1 {
            several += 1;
        }
        let backend = results[i].clone().unwrap();
        *per_kind
            .entry(COUNTER_NAMES[outcomes[i].verdict as usize])
            .or_default() += 1;
        let translated = matches!(outcomes[i].out, Out::Reply { .. });
        model.observe(&input, g.pristine, backend, translated);
        match (&outcomes[i].out, backend) {
            (Out::Reply { vip }, _) => {
                reversed += 1;
                if let Some((true, true, seq)) = tcp_fields(&out) {
                    let client = endpoints(&out).unwrap().1;
                    let h = (client, *vip, seq.wrapping_add(1));
                    if handshakes.len() < 4096 {
                        handshakes.push(h);
                    } else {
                        let i = rng.random_range(0..handshakes.len());
                        handshakes[i] = h;
                    }
                }
            }
            (Out::Untouched, _) => unchanged += 1,
            (_, Some(b)) => {
                forwarded += 1;
                if let Some((src, vip, udp)) = endpoints(&input) {
                    // Keep up to 4096, replacing old ones at random.
                    let f = (src, vip, b, udp);
                    if seen.len() < 4096 {
                        seen.push(f);
                    } else {
                        let i = rng.random_range(0..seen.len());
                        seen[i] = f;
                    }
                }
            }
            _ => {}
        }
    }
    let after = gw.dp.maps.counters.verdicts().unwrap();
    let total: u64 = (0..VERDICT_COUNT as usize)
        .map(|i| after[i] - start[i])
        .sum();
    assert_eq!(
        total,
        PACKETS as u64 - refused,
        "verdict counters sum to the packets sent"
    );
    println!("{tagged} frames sent with VLAN tags");
    assert!(
        tagged > PACKETS as u64 / 20,
        "too few tagged frames: {tagged}"
    );
    if refused > 0 {
        println!("{refused} frames shorter than 60 bytes that the kernel made no socket buffer of");
    }

    shares(&mut gw, &model, &mut rng);
    check_tables(&gw, &model, seed);

    let ev = |c: Counter| after[c as usize] - start[c as usize];
    println!("{PACKETS} packets: {forwarded} forwarded to backends, {reversed} replies rewritten to VIPs, {unchanged} untouched; {several} with more than one answer allowed (timing, or flow state a blind observer cannot know)");
    println!("  verdicts: {per_kind:?}");
    for c in [
        Counter::DropMartian,
        Counter::DropPortZero,
        Counter::PassTtlExceeded,
        Counter::CtConfirmed,
        Counter::CtBadAck,
        Counter::CtRefused,
        Counter::CtReopened,
        Counter::CtFloodSkip,
        Counter::RevStateless,
        Counter::IcmpToBackend,
        Counter::FwdDsrL2,
        Counter::FwdIpip,
        Counter::Redirect,
    ] {
        println!("  {}: {}", COUNTER_NAMES[c as usize], ev(c));
    }
    assert!(
        forwarded > 1000 && reversed > 1000 && unchanged > 1000,
        "the generator must exercise every path"
    );
    for c in [
        Counter::DropMartian,
        Counter::DropPortZero,
        Counter::PassTtlExceeded,
        Counter::CtConfirmed,
        Counter::CtBadAck,
        Counter::CtRefused,
        Counter::CtFloodSkip,
        Counter::RevStateless,
        Counter::IcmpToBackend,
        Counter::FwdDsrL2,
        Counter::FwdIpip,
        Counter::Redirect,
    ] {
        assert!(
            ev(c) > 0,
            "the generator must exercise {}",
            COUNTER_NAMES[c as usize]
        );
    }
}

/// New flows to the random and round-robin VIPs (pristine SYNs from fresh clients, checked
/// against the model like every other packet): each backend's share is its weight's, within
/// five standard deviations for random and exactly (over whole cycles) for round robin.
fn shares(gw: &mut Gateway, model: &Model, rng: &mut StdRng) {
    const FLOWS: u64 = 3000;
    // Below the threshold again: every SYN is stored and selected by the algorithm.
    let conf = gw.dp.maps.conf().unwrap();
    gw.dp
        .maps
        .set_conf(lb_common::GlobalConf {
            flood_rate: 0,
            ..conf
        })
        .unwrap();
    for s in model
        .services
        .iter()
        .filter(|s| matches!(s.algo, Algo::Random | Algo::RoundRobin))
    {
        let mut count = std::collections::HashMap::<SocketAddr, u64>::new();
        for i in 0..FLOWS {
            let client = SocketAddr::new(
                IpAddr::V4([10, 77, (i >> 8) as u8, i as u8].into()),
                rng.random_range(1024..=65535),
            );
            let input = Spec::tcp(CLIENT_MAC, GW_MAC_A, client, s.vip, Tcp::Syn).build();
            let before = gw.dp.maps.counters.verdicts().unwrap();
            let (action, out) = run(gw.dp.program(), gw.ifindex_a, &input);
            let after = gw.dp.maps.counters.verdicts().unwrap();
            let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            let o = &model.predict(&input)[0];
            let b = matches(o, &input, action, &out, &delta)
                .unwrap_or_else(|e| panic!("{} new flow {client}: {e}", s.vip))
                .expect("forwarded");
            *count.entry(b).or_default() += 1;
        }
        let total_w: u32 = s.backends.iter().map(|b| b.1).sum();
        for (b, w) in &s.backends {
            let p = *w as f64 / total_w as f64;
            let got = *count.get(b).unwrap_or(&0) as f64;
            let want = p * FLOWS as f64;
            let tolerance = match s.algo {
                // Whole cycles of the smooth weighted sequence: exact up to one cycle.
                Algo::RoundRobin => total_w as f64,
                _ => 5.0 * (FLOWS as f64 * p * (1.0 - p)).sqrt(),
            };
            assert!(
                (got - want).abs() <= tolerance,
                "{} ({:?}): {b} got {got} of {FLOWS} new flows, weight share {want:.0} ± {tolerance:.0}",
                s.vip,
                s.algo
            );
        }
        println!("{} ({:?}) new-flow shares: {count:?}", s.vip, s.algo);
    }
}

/// Exact active counts, and each table holds only its kinds of entries.
fn check_tables(gw: &Gateway, model: &Model, seed: u64) {
    let flows = gw.dp.maps.flows.list().unwrap();
    for s in &model.services {
        let v = Vip::new(
            s.vip,
            if s.udp {
                lb::Proto::Udp
            } else {
                lb::Proto::Tcp
            },
        );
        for b in gw.dp.maps.backends(&v).unwrap() {
            let counted = flows
                .iter()
                .filter(|f| {
                    f.table == CtTable::Confirmed
                        && f.entry.backend_id == b.id
                        && f.entry.flags & CT_F_COUNTED != 0
                })
                .count() as u64;
            assert_eq!(
                gw.dp.maps.flows.active(b.id).unwrap(),
                counted,
                "active flows of {} = its counted confirmed flows (seed {seed})",
                b.addr
            );
        }
    }
    for f in &flows {
        let e = &f.entry;
        // Marked direct exactly when the flow's VIP forwards without NAT.
        let vip_addr = lb::model::socket_addr(f.key.family, f.key.dst_be, f.key.dport_be)
            .expect("a flow key's family");
        let s = model
            .services
            .iter()
            .find(|s| s.vip == vip_addr && s.udp == (f.key.proto == 17))
            .unwrap_or_else(|| panic!("entry {f:?} of no VIP (seed {seed})"));
        assert_eq!(
            e.flags & CT_F_DIRECT != 0,
            s.mode != Mode::Nat,
            "entry {f:?} of a {:?} VIP: the direct mark (seed {seed})",
            s.mode
        );
        match f.table {
            CtTable::Unconfirmed => assert!(
                (e.state == CT_S_OPENING || e.state == CT_S_UDP) && e.flags & CT_F_COUNTED == 0,
                "unconfirmed entry {f:?} (seed {seed})"
            ),
            CtTable::Confirmed => assert!(
                e.state != CT_S_OPENING
                    && (e.flags & CT_F_COUNTED != 0) == (e.state != CT_S_CLOSED),
                "confirmed entry {f:?}: counted exactly while not closed (seed {seed})"
            ),
        }
        // A confirmed TCP entry's state is what its flags say: closed by FINs both ways or
        // an RST from either side (not undone by a later packet from that side), closing by
        // one FIN, else established.
        if f.table == CtTable::Confirmed && e.state != CT_S_UDP {
            let fins = e.flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND);
            let want = if fins == CT_F_FIN_CLIENT | CT_F_FIN_BACKEND
                || e.flags & (CT_F_RST | CT_F_RST_BACKEND) != 0
            {
                CT_S_CLOSED
            } else if fins != 0 {
                CT_S_CLOSING
            } else {
                CT_S_ESTABLISHED
            };
            assert_eq!(
                e.state, want,
                "confirmed entry {f:?}: state not the one its flags give (seed {seed})"
            );
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
