//! Per-packet cost by path, and how it scales with VIPs, backends and conntrack fill.

use std::net::{IpAddr, SocketAddr};

use anyhow::{ensure, Result};
use etherparse::PacketBuilder;
use lb::{model::flow_key, Vip};
use lb_common::{CtEntry, FlowKey};

/// What the counters must show for each kind of row (verdict first).
const NAT_NEW: Expect = Expect::new_flows(&[Tx, CtMiss, FwdNat]).routed();
const NAT_ESTABLISHED: Expect = Expect::each(&[Tx, CtHit, FwdNat]).routed();

use lb_common::Counter::{self, *};

use crate::rig::{dst_of, endpoints, Expect, NewFlows, Rig, Sample, CLIENT_MAC, GW_MAC};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

pub struct Settings {
    pub repeat: u32,
    pub rounds: usize,
}

/// One measured path.
pub struct PathResult {
    pub name: String,
    pub sample: Sample,
}

/// A TCP frame padded to a multiple of 8 bytes.
pub fn tcp_frame(src: SocketAddr, dst: SocketAddr, syn: bool) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC);
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!(),
    };
    let t = ip.tcp(src.port(), dst.port(), 1, 64240);
    let t = if syn { t.syn() } else { t.ack(1) };
    // Payload so that the frame is a multiple of 8 bytes.
    let hdr = t.size(0);
    let payload = vec![0x61u8; (8 - hdr % 8) % 8 + 8];
    let mut out = Vec::new();
    t.write(&mut out, &payload).unwrap();
    out
}

/// The backend's SYN-ACK (sequence 0, so the client's ACK of `tcp_frame` acknowledges it).
fn synack_frame(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC);
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!(),
    };
    let t = ip.tcp(src.port(), dst.port(), 0, 64240).syn().ack(1);
    let mut out = Vec::new();
    t.write(&mut out, &[]).unwrap();
    out
}

/// `frame` as a router forwards it: TTL / hop limit one less (IPv4 header checksum updated).
fn one_hop_less(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    if f[12] == 0x86 {
        f[14 + 7] -= 1;
    } else {
        f[14 + 8] -= 1;
        f[24..26].copy_from_slice(&[0, 0]);
        let mut sum = 0u32;
        for w in f[14..34].chunks(2) {
            sum += u16::from_be_bytes([w[0], w[1]]) as u32;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }
    f
}

/// Offset of the last 4 bytes of the source address (varied per run for new flows).
fn vary_at(frame: &[u8]) -> u32 {
    if frame[12] == 0x86 {
        14 + 8 + 12
    } else {
        14 + 12
    }
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub const VIP4: &str = "10.100.0.100:80";
pub const VIP6: &str = "[fd10::100]:80";

/// Configures one v4 and one v6 VIP with `n` backends each (neighbour entries exist for
/// 10.1.x.y and fd01::x).
pub fn configure(rig: &mut Rig, n: usize, table: u32) -> Result<()> {
    for (vip, v6) in [(VIP4, false), (VIP6, true)] {
        let v = Vip::new(sa(vip), lb::Proto::Tcp);
        rig.dp.maps.add_vip(&v, table)?;
        let backends: Vec<(SocketAddr, u32)> = (0..n).map(|i| (backend_addr(i, v6), 1)).collect();
        rig.dp.maps.set_backends(&v, &backends)?;
    }
    Ok(())
}

pub fn backend_addr(i: usize, v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(backend_ip(i, true), 8080)
    } else {
        SocketAddr::new(backend_ip(i, false), 8080)
    }
}

pub fn backend_ip(i: usize, v6: bool) -> IpAddr {
    if v6 {
        format!("fd01::{:x}", i + 16).parse().unwrap()
    } else {
        format!("10.1.{}.{}", 1 + i / 250, 1 + i % 250)
            .parse()
            .unwrap()
    }
}

fn expect_tx_to_backend(rig_vip: SocketAddr) -> impl Fn(u32, &[u8]) -> Result<()> {
    move |a, out| {
        ensure!(a == XDP_TX, "expected XDP_TX, got {a}");
        let d = dst_of(out).ok_or_else(|| anyhow::anyhow!("output does not parse"))?;
        ensure!(
            d != rig_vip && d.port() == 8080,
            "destination {d} is not a backend"
        );
        Ok(())
    }
}

/// A packet lb must pass untouched (its verdict and bytes checked on every round).
fn measure_untouched(
    rig: &mut Rig,
    s: &Settings,
    frame: &[u8],
    what: &str,
    verdict: &'static [Counter],
) -> Result<Sample> {
    let input = frame.to_vec();
    let what = what.to_string();
    let check = move |a: u32, o: &[u8]| -> Result<()> {
        ensure!(a == XDP_PASS && o == input, "{what} must pass untouched");
        Ok(())
    };
    rig.measure_lb(frame, 0, s.repeat, s.rounds, Expect::each(verdict), &check)
}

/// New flows (a new source address every run) from `client` to `vip`, every one of them a
/// conntrack miss (stored, or over the flood threshold: `expect`).
fn measure_new_flow(
    rig: &mut Rig,
    s: &Settings,
    client: SocketAddr,
    vip: SocketAddr,
    expect: Expect,
) -> Result<Sample> {
    let syn = tcp_frame(client, vip, true);
    let check = expect_tx_to_backend(vip);
    rig.measure_lb(&syn, vary_at(&syn), s.repeat, s.rounds, expect, &check)
}

/// Makes `client` → `vip` a confirmed NAT flow the way a real one becomes one: the client's
/// SYN, the backend's SYN-ACK through the reverse path, the client's ACK. Returns the ACK and
/// what the gateway made of it.
fn establish(rig: &mut Rig, client: SocketAddr, vip: SocketAddr) -> Result<(Vec<u8>, Vec<u8>)> {
    let (a, out) = rig.run_once(&tcp_frame(client, vip, true))?;
    ensure!(a == XDP_TX, "SYN {client} → {vip}: got {a}");
    let backend = dst_of(&out).ok_or_else(|| anyhow::anyhow!("SYN output does not parse"))?;
    let (a, _) = rig.run_once(&synack_frame(backend, client))?;
    ensure!(a == XDP_TX, "SYN-ACK {backend} → {client}: got {a}");
    let ack = tcp_frame(client, vip, false);
    let (a, first) = rig.run_once(&ack)?;
    ensure!(a == XDP_TX, "ACK {client} → {vip}: got {a}");
    let v = Vip::new(vip, lb::Proto::Tcp);
    ensure!(
        rig.dp
            .maps
            .flows
            .lookup_in(lb::state::CtTable::Confirmed, &flow_key(client, &v))
            .is_some(),
        "{client} → {vip} was not confirmed by its handshake"
    );
    Ok((ack, first))
}

/// One established (confirmed) flow from `client` to `vip`: every run must give the same bytes
/// as the first packet of the flow did.
fn measure_established(
    rig: &mut Rig,
    s: &Settings,
    client: SocketAddr,
    vip: SocketAddr,
    expect: Expect,
) -> Result<Sample> {
    let (ack, first) = establish(rig, client, vip)?;
    let check = move |a: u32, o: &[u8]| -> Result<()> {
        ensure!(
            a == XDP_TX && o == first,
            "established flow must go to the same backend, same bytes"
        );
        Ok(())
    };
    rig.measure_lb(&ack, 0, s.repeat, s.rounds, expect, &check)
}

/// The paths of the issue: not for a VIP, new flow v4/v6, established v4/v6, reverse NAT,
/// malformed; plus the floor. Adding a path is a few lines here.
pub fn paths(rig: &mut Rig, s: &Settings) -> Result<(Sample, Vec<PathResult>)> {
    let mut out = Vec::new();
    let mut push = |name: String, sample: Sample| out.push(PathResult { name, sample });
    let client4 = sa("10.0.0.2:40000");
    let client6 = sa("[fd00::2]:40000");

    let f = tcp_frame(client4, sa("10.1.1.1:8080"), true);
    push(
        "not for a VIP (pass)".into(),
        measure_untouched(rig, s, &f, "a non-VIP packet", &[PassNotVip])?,
    );
    let f = tcp_frame(client4, sa("10.1.1.1:80"), false);
    push(
        "not for a VIP, to a VIP's port (pass)".into(),
        measure_untouched(rig, s, &f, "a non-VIP packet", &[PassNotVip])?,
    );
    // Malformed: TCP header cut short (IP total length 32), padded to 48 bytes; to an address
    // that is no VIP's (to a VIP's address it would be dropped, `drop_vip_unclaimed`).
    let mut m = tcp_frame(client4, sa("10.1.1.1:8080"), true);
    m[16..18].copy_from_slice(&32u16.to_be_bytes());
    m.truncate(48);
    push(
        "malformed (pass)".into(),
        measure_untouched(rig, s, &m, "a malformed packet", &[PassMalformedL4])?,
    );

    let families = [("IPv4", client4, sa(VIP4)), ("IPv6", client6, sa(VIP6))];
    for (label, client, vip) in families {
        push(
            format!("new flow {label} (TCP SYN, conntrack miss, table)"),
            measure_new_flow(rig, s, client, vip, NAT_NEW)?,
        );
    }
    // The new-flow path of each other scheduling algorithm (maglev is the row above).
    let vip4 = Vip::new(sa(VIP4), lb::Proto::Tcp);
    for algo in [
        lb::Algorithm::Random,
        lb::Algorithm::RoundRobin,
        lb::Algorithm::SourceHash { prefix_len: 0 },
        lb::Algorithm::LeastConn,
    ] {
        rig.dp.maps.set_algorithm(&vip4, algo)?;
        push(
            format!("new flow IPv4, {algo}"),
            measure_new_flow(rig, s, client4, sa(VIP4), NAT_NEW)?,
        );
    }
    rig.dp.maps.set_algorithm(&vip4, lb::Algorithm::Maglev)?;
    // New flows under a sustained flood: every packet is a new flow, all but the first of each
    // second above the threshold (1 new flow per second per CPU), so those are not stored.
    let conf = rig.dp.maps.conf()?;
    rig.dp.maps.set_conf(lb_common::GlobalConf {
        flood_rate: 1,
        ..conf
    })?;
    // Every run over the threshold but the first of each second: checked by the measurement.
    let flood = measure_new_flow(
        rig,
        s,
        client4,
        sa(VIP4),
        Expect {
            flows: NewFlows::Flood { rate: 1 },
            ..NAT_NEW
        },
    )?;
    rig.dp.maps.set_conf(conf)?;
    push(
        "new flow IPv4 under a flood (over the threshold: not stored)".into(),
        flood,
    );
    for (label, client, vip) in families {
        push(
            format!("established {label} (conntrack hit)"),
            measure_established(rig, s, client, vip, NAT_ESTABLISHED)?,
        );
    }

    // Reverse NAT: the backend's reply to the established IPv4 flow.
    let (_, fwd) = rig.run_once(&tcp_frame(client4, sa(VIP4), false))?;
    let backend = dst_of(&fwd).unwrap();
    let reply = tcp_frame(backend, client4, false);
    let check = move |a: u32, o: &[u8]| -> Result<()> {
        ensure!(a == XDP_TX, "reply: expected XDP_TX, got {a}");
        let (src, _) = endpoints(o).ok_or_else(|| anyhow::anyhow!("reply does not parse"))?;
        ensure!(src == sa(VIP4), "reply source {src} is not the VIP");
        Ok(())
    };
    push(
        "reverse NAT IPv4 (reply to the VIP)".into(),
        rig.measure_lb(
            &reply,
            0,
            s.repeat,
            s.rounds,
            Expect::each(&[Tx, RevNat]),
            &check,
        )?,
    );

    // The tc fallback (`lb attach --mode tc`): the same data plane as a tc program.
    rig.tc = true;
    let f = tcp_frame(client4, sa("10.1.1.1:8080"), true);
    let untouched = measure_untouched(rig, s, &f, "a non-VIP packet", &[PassNotVip]);
    let established = [
        ("IPv4", sa("10.0.0.2:43000"), sa(VIP4)),
        ("IPv6", sa("[fd00::2]:43000"), sa(VIP6)),
    ]
    .map(|(label, client, vip)| {
        (
            label,
            measure_established(rig, s, client, vip, NAT_ESTABLISHED),
        )
    });
    let tc_floor = rig.floor(&tcp_frame(client4, sa(VIP4), true), s.repeat, s.rounds);
    rig.tc = false;
    push(
        "floor: tc program that only returns TC_ACT_OK, for the tc rows".into(),
        tc_floor?,
    );
    push("not for a VIP (pass), tc program".into(), untouched?);
    for (label, sample) in established {
        push(format!("established {label}, tc program"), sample?);
    }

    // The same forward paths with the next-hop cache off (`nexthop_max_age_ms = 0`): a
    // route lookup for every packet.
    let conf = rig.dp.maps.conf()?;
    rig.dp.maps.set_conf(lb_common::GlobalConf {
        nexthop_max_age_ms: lb_common::NEXTHOP_CACHE_OFF,
        ..conf
    })?;
    for (label, client, vip) in [
        ("IPv4", sa("10.0.0.2:42000"), sa(VIP4)),
        ("IPv6", sa("[fd00::2]:42000"), sa(VIP6)),
    ] {
        push(
            format!("new flow {label}, no next-hop cache (route lookup)"),
            measure_new_flow(
                rig,
                s,
                client,
                vip,
                Expect::new_flows(&[Tx, CtMiss, FwdNat]),
            )?,
        );
        push(
            format!("established {label}, no next-hop cache (route lookup)"),
            measure_established(rig, s, client, vip, Expect::each(&[Tx, CtHit, FwdNat]))?,
        );
    }
    rig.dp.maps.set_conf(conf)?;

    dsr_paths(rig, s, &mut push)?;

    let floor = rig.floor(&tcp_frame(client4, sa(VIP4), true), s.repeat, s.rounds)?;
    Ok((floor, out))
}

/// dsr-l2 (MAC rewrite to an on-link backend), ipip (encapsulation to a routed backend) and
/// the decapsulation program on the backend side.
fn dsr_paths(rig: &mut Rig, s: &Settings, push: &mut impl FnMut(String, Sample)) -> Result<()> {
    use lb::model::Forward;
    let setups = [
        ("10.100.0.110:80", Forward::DsrL2, "10.0.0.11:80"),
        ("[fd10::110]:80", Forward::DsrL2, "[fd00::11]:80"),
        ("10.100.0.120:80", Forward::Ipip, "10.1.0.5:80"),
        ("[fd10::120]:80", Forward::Ipip, "[fd01::5]:80"),
    ];
    for (vip, fwd, backend) in setups {
        let v = Vip::new(sa(vip), lb::Proto::Tcp);
        rig.dp.maps.add_vip(&v, 251)?;
        rig.dp.maps.set_forward(&v, fwd)?;
        rig.dp.maps.add_backend(&v, sa(backend), 1)?;
    }
    // dsr-l2: only the MACs and the TTL may change (and the source address the wrapper varies,
    // at `vary`).
    let same_packet = |input: Vec<u8>, vary: usize| {
        let input = one_hop_less(&input);
        move |a: u32, o: &[u8]| -> Result<()> {
            ensure!(a == XDP_TX, "dsr-l2: expected XDP_TX, got {a}");
            let same = |r: std::ops::Range<usize>| o.get(r.clone()) == input.get(r);
            let ok = if vary == 0 {
                same(12..input.len())
            } else {
                same(12..vary) && same(vary + 4..input.len())
            };
            ensure!(
                ok && o.len() == input.len(),
                "dsr-l2 changed more than the MACs and the TTL"
            );
            Ok(())
        }
    };
    let c4 = sa("10.0.0.2:43000");
    let syn = tcp_frame(c4, sa("10.100.0.110:80"), true);
    push(
        "new flow IPv4, dsr-l2".into(),
        rig.measure_lb(
            &syn,
            vary_at(&syn),
            s.repeat,
            s.rounds,
            Expect::new_flows(&[Tx, CtMiss, FwdDsrL2]).routed(),
            &same_packet(syn.clone(), vary_at(&syn) as usize),
        )?,
    );
    for (label, client, vip) in [
        ("IPv4", c4, sa("10.100.0.110:80")),
        ("IPv6", sa("[fd00::2]:43000"), sa("[fd10::110]:80")),
    ] {
        let ack = tcp_frame(client, vip, false);
        // The flow's first packet (a mid-flow pick-up: dsr-l2 sees no handshake from the
        // backend) makes the entry every measured run then hits.
        let (a, _) = rig.run_once(&ack)?;
        ensure!(a == XDP_TX, "dsr-l2 {label}: got {a}");
        push(
            format!("established {label}, dsr-l2"),
            rig.measure_lb(
                &ack,
                0,
                s.repeat,
                s.rounds,
                Expect::each(&[Tx, CtHit, FwdDsrL2]).routed(),
                &same_packet(ack.clone(), 0),
            )?,
        );
    }
    // ipip: every output is the first run's (same backend, same outer source).
    let mut encapsulated = Vec::new();
    for (label, client, vip, outer) in [
        ("IPv4 in IPv4", c4, sa("10.100.0.120:80"), 20),
        (
            "IPv6 in IPv6",
            sa("[fd00::2]:43000"),
            sa("[fd10::120]:80"),
            40,
        ),
    ] {
        let ack = tcp_frame(client, vip, false);
        let (a, first) = rig.run_once(&ack)?;
        ensure!(
            a == XDP_TX && first.len() == ack.len() + outer,
            "ipip {label}: got {a}"
        );
        encapsulated.push((label, ack.clone(), first.clone()));
        let check = move |a: u32, o: &[u8]| -> Result<()> {
            ensure!(a == XDP_TX && o == first, "ipip {label}: output changed");
            Ok(())
        };
        push(
            format!("established {label}, ipip"),
            rig.measure_lb(
                &ack,
                0,
                s.repeat,
                s.rounds,
                Expect::each(&[Tx, CtHit, FwdIpip]).routed(),
                &check,
            )?,
        );
    }
    let syn = tcp_frame(c4, sa("10.100.0.120:80"), true);
    let want_len = syn.len() + 20;
    let check = move |a: u32, o: &[u8]| -> Result<()> {
        // Encapsulated: 20 bytes longer, outer destination the backend.
        ensure!(
            a == XDP_TX && o.len() == want_len && o[30..34] == [10, 1, 0, 5],
            "ipip new flow: got {a}"
        );
        Ok(())
    };
    push(
        "new flow IPv4, ipip".into(),
        rig.measure_lb(
            &syn,
            vary_at(&syn),
            s.repeat,
            s.rounds,
            Expect::new_flows(&[Tx, CtMiss, FwdIpip]).routed(),
            &check,
        )?,
    );
    // The backend side: lb decap on what the gateway sent (padded to 8 bytes: trailing bytes
    // after the IP packet are Ethernet padding).
    let decap_counters = [
        lb_common::DecapCounter::DecapV4InV4,
        lb_common::DecapCounter::DecapV6InV6,
    ];
    // What the backend accepts: lb's prefixes, its own address (the outer destination) and
    // its VIPs (the inner destination).
    let mut config = lb::decap::DecapConfig {
        from: vec![
            ("172.16.0.0".parse().unwrap(), 16),
            ("100::".parse().unwrap(), 64),
        ],
        ..Default::default()
    };
    for (_, _, frame) in &encapsulated {
        let (outer, inner) = if frame[12..14] == [0x08, 0x00] {
            let v4 = |at: usize| IpAddr::from(<[u8; 4]>::try_from(&frame[at..at + 4]).unwrap());
            (v4(30), v4(34 + 16))
        } else {
            let v6 = |at: usize| IpAddr::from(<[u8; 16]>::try_from(&frame[at..at + 16]).unwrap());
            (v6(38), v6(54 + 24))
        };
        config.local.push(outer);
        config.vips.push(inner);
    }
    rig.configure_decap(&config)?;
    for ((label, inner, mut frame), counter) in encapsulated.into_iter().zip(decap_counters) {
        while frame.len() % 8 != 0 {
            frame.push(0);
        }
        let (a, first) = rig.run_decap(&frame)?;
        // The gateway forwarded the inner packet one hop on.
        let inner = one_hop_less(&inner);
        ensure!(
            a == XDP_PASS && first[14..14 + inner.len() - 14] == inner[14..],
            "decap {label}: the inner packet did not come out"
        );
        let check = move |a: u32, o: &[u8]| -> Result<()> {
            ensure!(a == XDP_PASS && o == first, "decap {label}: output changed");
            Ok(())
        };
        push(
            format!("decap {label} (backend, lb decap)"),
            rig.measure_decap(&frame, s.repeat, s.rounds, counter, &check)?,
        );
    }
    Ok(())
}

/// Established and new-flow IPv4 cost under a given configuration.
pub fn est_and_new(rig: &mut Rig, s: &Settings) -> Result<(Sample, Sample)> {
    let client = sa("10.0.0.2:41000");
    let est = measure_established(rig, s, client, sa(VIP4), NAT_ESTABLISHED)?;
    let new = measure_new_flow(rig, s, client, sa(VIP4), NAT_NEW)?;
    Ok((est, new))
}

/// Fills conntrack with `n` entries for unrelated flows (to VIP4, backend 0).
pub fn fill_conntrack(rig: &mut Rig, n: usize) -> Result<()> {
    let vip = Vip::new(sa(VIP4), lb::Proto::Tcp);
    let b = rig.dp.maps.backends(&vip)?[0];
    let mut key: FlowKey = flow_key(sa("10.0.0.2:1"), &vip);
    let entry = CtEntry {
        backend_id: b.id,
        generation: 1,
        state: lb_common::CT_S_ESTABLISHED,
        last_seen_ns: lb::sweep::now_ns(&rig.dp.maps)?,
        ..Default::default()
    };
    for i in 0..n as u32 {
        // Clients 172.16.0.0/12-ish, varied in the low bytes.
        key.src_be[0] =
            u32::from_ne_bytes([172, 16 + ((i >> 16) & 0x0f) as u8, (i >> 8) as u8, i as u8]);
        key.sport_be = (1024 + (i % 60_000) as u16).to_be();
        rig.dp.maps.flows.insert_confirmed(&key, &entry)?;
    }
    Ok(())
}
