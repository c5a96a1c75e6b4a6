//! Property test: 100,000 random and mutated packets through the real program.
//!
//! For every packet: the verdict is one of PASS, DROP, TX, REDIRECT (never ABORTED); the frame
//! length never changes; a packet the program changed is a NAT rewrite — destination set to a
//! configured backend of the VIP it was sent to, or source set back to the VIP of the backend it
//! came from — with nothing else changed but MACs, checksums and the TTL / hop limit, which is
//! exactly one less (so it was above 1); a forwarded packet never has a martian source or source
//! port 0; and valid checksums stay valid. An unmutated packet to a VIP is dropped if its source
//! is martian or its port 0, passed unchanged if its TTL is at most 1, and forwarded otherwise.
//! At the end, the verdict counters add up to the number of packets, every backend's active
//! count equals its counted confirmed flows, and each table holds only its kinds of entries.
//!
//! Reproducible: the seed is printed; set LB_RANDOM_SEED to replay one.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::{
    packets::{checksums_ok, Spec, Tcp},
    testrun::{action_name, run, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    topology::{Gateway, CLIENT_MAC, GW_MAC_A},
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb::{CtTable, Vip};
use lb_common::{
    Counter, COUNTER_NAMES, CT_F_COUNTED, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CT_F_RST,
    CT_F_RST_BACKEND, CT_S_CLOSED, CT_S_CLOSING, CT_S_ESTABLISHED, CT_S_OPENING, CT_S_UDP,
    VERDICT_COUNT,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const PACKETS: usize = 100_000;

struct Config {
    /// (VIP, its backends)
    services: Vec<(Vip, Vec<SocketAddr>)>,
}

impl Config {
    fn vip_of_backend(&self, b: SocketAddr, udp: bool) -> Option<&Vip> {
        self.services
            .iter()
            .find(|(v, bs)| (v.proto == lb::Proto::Udp) == udp && bs.contains(&b))
            .map(|(v, _)| v)
    }
}

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

/// Whether `src` is a martian source for a packet to `dst` (written from the list, not
/// from the data plane's code).
fn martian(src: IpAddr, dst: IpAddr) -> bool {
    src == dst
        || match src {
            IpAddr::V4(a) => {
                let o = a.octets();
                o[0] == 0 || o[0] == 127 || o[0] >= 224 || (o[0] == 169 && o[1] == 254)
            }
            IpAddr::V6(a) => {
                a.is_unspecified()
                    || a.is_loopback()
                    || a.is_multicast()
                    || a.segments()[0] & 0xffc0 == 0xfe80
            }
        }
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

fn random_addr(rng: &mut StdRng, v6: bool, cfg: &Config) -> SocketAddr {
    // Mostly addresses that matter (VIPs, backends, the client), sometimes anything.
    match rng.random_range(0..10) {
        0..=3 => {
            let (v, _) = &cfg.services[rng.random_range(0..cfg.services.len())];
            if v.addr.is_ipv6() == v6 {
                return v.addr;
            }
        }
        4..=5 => {
            let (_, bs) = &cfg.services[rng.random_range(0..cfg.services.len())];
            let b = bs[rng.random_range(0..bs.len())];
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

/// Forwarded flows seen so far (client, backend, is UDP), for generating their replies.
type Seen = Vec<(SocketAddr, SocketAddr, bool)>;

/// Handshakes whose SYN-ACK lb rewrote: (client, VIP, the acknowledgment number that completes
/// them), for generating the client's ACK.
type Handshakes = Vec<(SocketAddr, SocketAddr, u32)>;

/// A generated frame; `pristine`: built as specified and not mutated.
struct Generated {
    frame: Vec<u8>,
    pristine: bool,
    spec: Spec,
}

fn random_packet(
    rng: &mut StdRng,
    cfg: &Config,
    seen: &Seen,
    handshakes: &Handshakes,
) -> Generated {
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
        // A reply to a flow lb forwarded.
        let (client, backend, udp) = seen[rng.random_range(0..seen.len())];
        src = backend;
        dst = client;
        force_udp = Some(udp);
    } else if !seen.is_empty() && pick < 35 {
        // More of a flow lb forwarded, from its client.
        let (client, _, udp) = seen[rng.random_range(0..seen.len())];
        let vips: Vec<SocketAddr> = cfg
            .services
            .iter()
            .filter(|(v, _)| {
                (v.proto == lb::Proto::Udp) == udp && v.addr.is_ipv6() == client.is_ipv6()
            })
            .map(|(v, _)| v.addr)
            .collect();
        src = client;
        dst = vips[rng.random_range(0..vips.len())];
        force_udp = Some(udp);
    } else if pick < 40 {
        // A martian source.
        let a = if v6 {
            MARTIANS_V6[rng.random_range(0..MARTIANS_V6.len())]
        } else {
            MARTIANS_V4[rng.random_range(0..MARTIANS_V4.len())]
        };
        src = SocketAddr::new(a.parse().unwrap(), src.port());
    } else if pick < 43 {
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
    Generated {
        frame: f,
        pristine,
        spec,
    }
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

/// (src, dst, proto is UDP) of a frame that parses as IP + TCP/UDP.
fn endpoints(f: &[u8]) -> Option<(SocketAddr, SocketAddr, bool)> {
    let p = SlicedPacket::from_ethernet(f).ok()?;
    let (s, d): (IpAddr, IpAddr) = match p.net? {
        NetSlice::Ipv4(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        NetSlice::Ipv6(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => return None,
    };
    match p.transport? {
        TransportSlice::Tcp(t) => Some((
            SocketAddr::new(s, t.source_port()),
            SocketAddr::new(d, t.destination_port()),
            false,
        )),
        TransportSlice::Udp(u) => Some((
            SocketAddr::new(s, u.source_port()),
            SocketAddr::new(d, u.destination_port()),
            true,
        )),
        _ => None,
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

#[test]
fn random_and_mutated_packets() {
    let seed: u64 = std::env::var("LB_RANDOM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("LB_RANDOM_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut gw = Gateway::new("random");
    let cfg = Config {
        services: vec![
            (
                "10.100.0.100:80/tcp".parse().unwrap(),
                vec![
                    "10.1.0.11:8080".parse().unwrap(),
                    "10.1.0.12:8080".parse().unwrap(),
                ],
            ),
            (
                "10.100.0.100:80/udp".parse().unwrap(),
                vec!["10.1.0.13:5353".parse().unwrap()],
            ),
            (
                "[fd10::100]:80/tcp".parse().unwrap(),
                vec![
                    "[fd01::11]:8080".parse().unwrap(),
                    "[fd01::12]:8080".parse().unwrap(),
                ],
            ),
            (
                "[fd10::100]:80/udp".parse().unwrap(),
                vec!["[fd01::13]:5353".parse().unwrap()],
            ),
        ],
    };
    for (v, bs) in &cfg.services {
        gw.dp.maps.add_vip(v, 251).unwrap();
        let want: Vec<(SocketAddr, u32)> = bs.iter().map(|b| (*b, 1)).collect();
        gw.dp.maps.set_backends(v, &want).unwrap();
    }
    let before = gw.dp.maps.counters().unwrap();
    let ifindex = gw.ifindex_a;
    let (mut forwarded, mut reversed, mut unchanged, mut pristine_to_vip) = (0, 0, 0, 0);
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
        }
        let g = random_packet(&mut rng, &cfg, &seen, &handshakes);
        let input = g.frame;
        let (action, out) = run(gw.dp.program(), ifindex, &input);
        let ctx = || format!("packet {n} (seed {seed}): {}", hex(&input));
        assert!(
            [XDP_PASS, XDP_DROP, XDP_TX, XDP_REDIRECT].contains(&action),
            "verdict {action}: {}",
            ctx()
        );
        assert_eq!(out.len(), input.len(), "length changed: {}", ctx());
        let to_vip = cfg.services.iter().any(|(v, _)| {
            v.addr == g.spec.dst && (v.proto == lb::Proto::Udp) == g.spec.tcp.is_none()
        });
        if g.pristine && to_vip {
            // The checks before any state, in their order: the TTL first (every packet), then
            // the source (no confirmed flow has a martian source or port 0).
            let (want, changed) = if g.spec.ttl <= 1 {
                (XDP_PASS, false)
            } else if g.spec.src.port() == 0 || martian(g.spec.src.ip(), g.spec.dst.ip()) {
                (XDP_DROP, false)
            } else {
                (XDP_TX, true)
            };
            assert_eq!(
                (action_name(action), out != input),
                (action_name(want), changed),
                "{} → {} with TTL {} (verdict, changed): {}",
                g.spec.src,
                g.spec.dst,
                g.spec.ttl,
                ctx()
            );
            pristine_to_vip += 1;
        }
        if out == input {
            assert!(
                action != XDP_TX && action != XDP_REDIRECT,
                "sent unchanged: {}",
                ctx()
            );
            unchanged += 1;
            continue;
        }
        // Changed: it must be a NAT rewrite, one hop later.
        let (isrc, idst, udp) = endpoints(&input)
            .unwrap_or_else(|| panic!("changed a packet that does not parse: {}", ctx()));
        let (osrc, odst, _) =
            endpoints(&out).unwrap_or_else(|| panic!("output does not parse: {}", ctx()));
        for i in 0..out.len() {
            assert!(
                out[i] == input[i] || allowed_diff(&input, i),
                "byte {i} changed: {}",
                ctx()
            );
        }
        let (ttl_in, ttl_out) = (ttl(&input), ttl(&out));
        assert!(
            ttl_in > 1 && ttl_out == ttl_in - 1,
            "TTL {ttl_in} became {ttl_out}: {}",
            ctx()
        );
        if let Some((_, bs)) = cfg
            .services
            .iter()
            .find(|(v, _)| v.addr == idst && (v.proto == lb::Proto::Udp) == udp)
        {
            assert_eq!(osrc, isrc, "client changed: {}", ctx());
            assert!(
                bs.contains(&odst),
                "destination {odst} is not a backend of {idst}: {}",
                ctx()
            );
            assert!(
                !martian(isrc.ip(), idst.ip()),
                "forwarded from a martian source: {}",
                ctx()
            );
            assert_ne!(isrc.port(), 0, "forwarded from port 0: {}", ctx());
            forwarded += 1;
            // Keep up to 4096, replacing old ones at random: replies go to recent flows too.
            if seen.len() < 4096 {
                seen.push((isrc, odst, udp));
            } else {
                let i = rng.random_range(0..seen.len());
                seen[i] = (isrc, odst, udp);
            }
        } else if let Some(v) = cfg.vip_of_backend(isrc, udp) {
            assert_eq!(osrc, v.addr, "reply not rewritten to the VIP: {}", ctx());
            assert_eq!(odst, idst, "reply destination changed: {}", ctx());
            reversed += 1;
            if let Some((true, true, seq)) = tcp_fields(&out) {
                if handshakes.len() < 4096 {
                    handshakes.push((odst, osrc, seq.wrapping_add(1)));
                } else {
                    let i = rng.random_range(0..handshakes.len());
                    handshakes[i] = (odst, osrc, seq.wrapping_add(1));
                }
            }
        } else {
            panic!(
                "changed a packet neither for a VIP nor from a backend: {}",
                ctx()
            );
        }
        if checksums_ok(&input).is_ok() {
            checksums_ok(&out).unwrap_or_else(|e| panic!("{e} broken by the rewrite: {}", ctx()));
        }
    }
    let after = gw.dp.maps.counters().unwrap();
    let total: u64 = (0..VERDICT_COUNT as usize)
        .map(|i| after[i] - before[i])
        .sum();
    assert_eq!(
        total, PACKETS as u64,
        "verdict counters sum to the packets sent"
    );

    // Exact active counts, and each table holds only its kinds of entries.
    let flows = gw.dp.maps.flows().unwrap();
    for (v, _) in &cfg.services {
        for b in gw.dp.maps.backends(v).unwrap() {
            let counted = flows
                .iter()
                .filter(|f| {
                    f.table == CtTable::Confirmed
                        && f.entry.backend_id == b.id
                        && f.entry.flags & CT_F_COUNTED != 0
                })
                .count() as u64;
            assert_eq!(
                gw.dp.maps.active_flows(b.id).unwrap(),
                counted,
                "active flows of {} = its counted confirmed flows (seed {seed})",
                b.addr
            );
        }
    }
    for f in &flows {
        let e = &f.entry;
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
    let rst_closed = flows
        .iter()
        .filter(|f| {
            f.table == CtTable::Confirmed && f.entry.flags & (CT_F_RST | CT_F_RST_BACKEND) != 0
        })
        .count();
    let confirmed = flows
        .iter()
        .filter(|f| f.table == CtTable::Confirmed)
        .count();

    let ev = |c: Counter| after[c as usize] - before[c as usize];
    println!("{PACKETS} packets: {forwarded} forwarded to backends, {reversed} replies rewritten to VIPs, {unchanged} untouched; {pristine_to_vip} unmutated to a VIP; {} flows, {confirmed} confirmed ({rst_closed} closed by an RST)", flows.len());
    for c in [
        Counter::DropMartian,
        Counter::DropPortZero,
        Counter::PassTtlExceeded,
        Counter::CtConfirmed,
        Counter::CtBadAck,
        Counter::CtRefused,
        Counter::CtReopened,
        Counter::CtStale,
        Counter::CtExpired,
        Counter::CtFloodSkip,
        Counter::RevStateless,
    ] {
        println!("  {}: {}", COUNTER_NAMES[c as usize], ev(c));
    }
    assert!(
        forwarded > 1000 && reversed > 1000 && unchanged > 1000 && pristine_to_vip > 1000,
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
    ] {
        assert!(
            ev(c) > 0,
            "the generator must exercise {}",
            COUNTER_NAMES[c as usize]
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
