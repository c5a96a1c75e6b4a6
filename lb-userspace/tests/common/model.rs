//! A reference model of the data plane for the property test: for a frame and a configuration,
//! what lb must do — the action, the verdict counter, the event counters, and for a forwarded
//! packet its backend and MACs. Written from README's verdict table, ARCHITECTURE.md and the
//! test topology (`topology.rs`), with its own byte-level parser; it uses neither the data
//! plane's code nor the map layer (backends come from `oracle`).
//!
//! Flow state is modelled only as far as a blind observer can know it: a flow the model saw
//! forwarded (pristine packets, no RST or FIN, while no flood threshold could be crossed) has
//! an entry pinned to its backend; other flows may or may not, and for those the model allows
//! both answers where that matters (a reply translated or not).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use lb_common::Counter;

use super::{
    oracle,
    packets::Mac,
    testrun::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    topology::{GW_MAC_A, GW_MAC_B, NEIGHBOURS},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nat,
    DsrL2,
    Ipip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Maglev,
    SourceHash(u8),
    Random,
    RoundRobin,
    LeastConn,
}

/// A configured VIP.
#[derive(Clone, Debug)]
pub struct Service {
    pub vip: SocketAddr,
    pub udp: bool,
    pub mode: Mode,
    pub algo: Algo,
    pub stateless: bool,
    pub backends: Vec<(SocketAddr, u32)>,
    /// The reference table (backend index per slot).
    pub table: Vec<Option<usize>>,
}

impl Service {
    pub fn new(
        vip: SocketAddr,
        udp: bool,
        mode: Mode,
        algo: Algo,
        backends: &[(&str, u32)],
    ) -> Service {
        let backends: Vec<(SocketAddr, u32)> = backends
            .iter()
            .map(|(a, w)| (a.parse().unwrap(), *w))
            .collect();
        let ids: Vec<(Vec<u8>, u32)> = backends
            .iter()
            .map(|(a, w)| (oracle::identity(*a, udp), *w))
            .collect();
        Service {
            vip,
            udp,
            mode,
            algo,
            stateless: false,
            table: oracle::maglev(&ids, TABLE_SIZE),
            backends,
        }
    }

    /// The backend of a flow from `client` that the VIP's hash decides (None: the algorithm
    /// does not decide by hash alone).
    pub fn hashed(&self, client: SocketAddr, seed: u32) -> Option<SocketAddr> {
        let h = match self.algo {
            Algo::Maglev => oracle::flow_hash(client, self.vip, self.udp, seed),
            Algo::SourceHash(p) => oracle::source_hash(client.ip(), p, seed),
            _ => return None,
        };
        self.table[(h % TABLE_SIZE) as usize].map(|i| self.backends[i].0)
    }

    /// The backend the VIP's table gives a flow by its hash alone (what a reply without an
    /// entry is matched against): the source hash for source-hash, else the flow hash. None
    /// for round robin, whose hashed choice indexes its sequence (not modelled).
    pub fn table_choice(&self, client: SocketAddr, seed: u32) -> Option<SocketAddr> {
        let h = match self.algo {
            Algo::SourceHash(p) => oracle::source_hash(client.ip(), p, seed),
            Algo::RoundRobin => return None,
            _ => oracle::flow_hash(client, self.vip, self.udp, seed),
        };
        self.table[(h % TABLE_SIZE) as usize].map(|i| self.backends[i].0)
    }
}

/// Table size of every VIP in the model's configuration.
pub const TABLE_SIZE: u32 = 251;

/// Where the gateway's routes send a destination (the topology of `topology.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Via interface A (the ingress) to this MAC.
    A(Mac),
    /// Via interface B to this MAC.
    B(Mac),
    /// On a connected subnet, no neighbour entry.
    NoNeigh,
    /// Blackhole route.
    Unreachable,
    /// Local address, broadcast, or no route: not forwarded by XDP.
    Other,
}

pub fn route(dst: IpAddr) -> Route {
    if let Some((_, dev, mac)) = NEIGHBOURS.iter().find(|(a, _, _)| a.parse() == Ok(dst)) {
        return if *dev == "fxa" {
            Route::A(*mac)
        } else {
            Route::B(*mac)
        };
    }
    let local: [IpAddr; 6] = [
        "10.0.0.1".parse().unwrap(),
        "10.1.0.1".parse().unwrap(),
        "10.2.0.1".parse().unwrap(),
        "fd00::1".parse().unwrap(),
        "fd01::1".parse().unwrap(),
        "fd02::1".parse().unwrap(),
    ];
    if local.contains(&dst) {
        return Route::Other;
    }
    match dst {
        IpAddr::V4(a) => {
            let o = a.octets();
            if o[0] == 10 && o[1] == 9 && o[2] == 0 {
                Route::Unreachable
            } else if o[0] == 10 && o[1] <= 2 && o[2] == 0 && o[3] != 255 {
                // On a connected /24 (its .255 is the broadcast address: local; its .0 is an
                // ordinary neighbour to Linux).
                Route::NoNeigh
            } else {
                Route::Other
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if (0xfd00..=0xfd02).contains(&s[0]) && s[1..4] == [0, 0, 0] {
                // fd00::/64, fd01::/64, fd02::/64; their all-zero interface id is the
                // subnet-router anycast address, which is local.
                if s[4..8] == [0, 0, 0, 0] {
                    Route::Other
                } else {
                    Route::NoNeigh
                }
            } else {
                Route::Other
            }
        }
    }
}

/// What a packet must come out as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    /// Not changed at all.
    Untouched,
    /// Dropped after the rewrite (by the route): what the frame holds no longer matters.
    Dropped,
    /// Client → VIP rewritten to the backend (NAT): destination address and port.
    Nat { backend: Pick },
    /// Backend → client rewritten to come from the VIP.
    Reply { vip: SocketAddr },
    /// dsr-l2: the MACs (and TTL) only.
    DsrL2 { backend: Pick },
    /// ipip: encapsulated to the backend.
    Ipip { backend: Pick },
    /// An ICMP too-big about a VIP flow sent to the flow's backend (NAT).
    IcmpToBackend { backend: Pick },
}

/// The backend a forwarded packet must go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pick {
    Exact(SocketAddr),
    /// Any of these (algorithms that do not decide by hash).
    OneOf(Vec<SocketAddr>),
}

impl Pick {
    pub fn allows(&self, b: SocketAddr) -> bool {
        match self {
            Pick::Exact(x) => *x == b,
            Pick::OneOf(v) => v.contains(&b),
        }
    }
}

/// One acceptable outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    /// The verdict counter.
    pub verdict: Counter,
    /// Event counters that must count this packet.
    pub events: Vec<Counter>,
    pub out: Out,
    /// MACs of a sent packet: (destination, source); None: unchanged.
    pub macs: Option<(Mac, Mac)>,
}

fn pass(verdict: Counter) -> Outcome {
    Outcome {
        action: XDP_PASS,
        verdict,
        events: vec![],
        out: Out::Untouched,
        macs: None,
    }
}

fn drop_(verdict: Counter) -> Outcome {
    Outcome {
        action: XDP_DROP,
        verdict,
        events: vec![],
        out: Out::Untouched,
        macs: None,
    }
}

/// A rewritten packet sent where the route to `dst` says (README's verdict table).
fn sent(dst: IpAddr, out: Out, events: Vec<Counter>) -> Outcome {
    let (action, verdict, macs) = match route(dst) {
        Route::A(mac) => (XDP_TX, Counter::Tx, Some((mac, GW_MAC_A))),
        Route::B(mac) => (XDP_REDIRECT, Counter::Redirect, Some((mac, GW_MAC_B))),
        Route::NoNeigh => (XDP_PASS, Counter::PassNoNeigh, None),
        Route::Unreachable => {
            return Outcome {
                action: XDP_DROP,
                verdict: Counter::DropFibUnreachable,
                events,
                out: Out::Dropped,
                macs: None,
            }
        }
        Route::Other => (XDP_PASS, Counter::PassFibOther, None),
    };
    Outcome {
        action,
        verdict,
        events,
        out,
        macs,
    }
}

/// What the model read from a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub udp: bool,
    pub ttl: u8,
    /// TCP flags (0 for UDP).
    pub flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A parsed ICMP too-big: (outer TTL, the quoted packet's source and destination, is UDP).
#[derive(Clone, Copy, Debug)]
pub struct TooBig {
    pub ttl: u8,
    pub quoted_src: SocketAddr,
    pub quoted_dst: SocketAddr,
    pub udp: bool,
}

/// The parse of README's table: a TCP/UDP packet, or the pass verdict and its counter.
pub enum Parse {
    L4(Parsed),
    Icmp(Option<TooBig>),
    Pass(Counter),
}

fn be16(f: &[u8], at: usize) -> usize {
    u16::from_be_bytes([f[at], f[at + 1]]) as usize
}

/// The destination address of an IP packet with a whole IP header (whatever follows it).
pub fn destination(f: &[u8]) -> Option<IpAddr> {
    if f.len() < 14 {
        return None;
    }
    match be16(f, 12) {
        0x0800 if f.len() >= 34 && f[14] >> 4 == 4 => {
            Some(IpAddr::V4(Ipv4Addr::new(f[30], f[31], f[32], f[33])))
        }
        0x86dd if f.len() >= 54 && f[14] >> 4 == 6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(&f[38..54]).unwrap(),
        ))),
        _ => None,
    }
}

pub fn parse(f: &[u8]) -> Parse {
    use Counter::*;
    if f.len() < 14 {
        return Parse::Pass(PassMalformedEth);
    }
    let (src_ip, dst_ip, proto, l4, ip_end, ttl): (IpAddr, IpAddr, u8, usize, usize, u8) =
        match be16(f, 12) {
            0x0800 => {
                if f.len() < 34 {
                    return Parse::Pass(PassMalformedIp);
                }
                let ihl = (f[14] & 0x0f) as usize * 4;
                if f[14] >> 4 != 4 || ihl < 20 {
                    return Parse::Pass(PassMalformedIp);
                }
                let total = be16(f, 16);
                if total < ihl || 14 + total > f.len() {
                    return Parse::Pass(PassMalformedIp);
                }
                if be16(f, 20) & 0x3fff != 0 {
                    return Parse::Pass(PassFragment);
                }
                let a =
                    |at: usize| IpAddr::V4(Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]));
                (a(26), a(30), f[23], 14 + ihl, 14 + total, f[22])
            }
            0x86dd => {
                if f.len() < 54 {
                    return Parse::Pass(PassMalformedIp);
                }
                if f[14] >> 4 != 6 || 54 + be16(f, 18) > f.len() {
                    return Parse::Pass(PassMalformedIp);
                }
                let a = |at: usize| {
                    IpAddr::V6(Ipv6Addr::from(
                        <[u8; 16]>::try_from(&f[at..at + 16]).unwrap(),
                    ))
                };
                match f[20] {
                    6 | 17 | 58 => {}
                    44 => return Parse::Pass(PassFragment),
                    0 | 43 | 60 | 51 | 135 | 139 | 140 => return Parse::Pass(PassIpv6Ext),
                    _ => return Parse::Pass(PassNotTcpUdp),
                }
                (a(22), a(38), f[20], 54, 54 + be16(f, 18), f[21])
            }
            _ => return Parse::Pass(PassNotIp),
        };
    match proto {
        6 => {
            if l4 + 20 > f.len() {
                return Parse::Pass(PassMalformedL4);
            }
            let doff = (f[l4 + 12] >> 4) as usize;
            if doff < 5 || l4 + doff * 4 > ip_end {
                return Parse::Pass(PassMalformedL4);
            }
        }
        17 => {
            if l4 + 8 > f.len() {
                return Parse::Pass(PassMalformedL4);
            }
            let len = be16(f, l4 + 4);
            if len < 8 || l4 + len > ip_end {
                return Parse::Pass(PassMalformedL4);
            }
        }
        1 | 58 => return Parse::Icmp(too_big(f)),
        _ => return Parse::Pass(PassNotTcpUdp),
    }
    Parse::L4(Parsed {
        src: SocketAddr::new(src_ip, be16(f, l4) as u16),
        dst: SocketAddr::new(dst_ip, be16(f, l4 + 2) as u16),
        udp: proto == 17,
        ttl,
        flags: if proto == 6 { f[l4 + 13] } else { 0 },
    })
}

/// An ICMP fragmentation-needed (IPv4, option-less headers) or packet-too-big (IPv6) quoting a
/// TCP/UDP packet.
fn too_big(f: &[u8]) -> Option<TooBig> {
    let at = |i: usize| f.get(i).copied();
    let port = |i: usize| Some(u16::from_be_bytes([at(i)?, at(i + 1)?]));
    if be16(f, 12) == 0x0800 {
        let q = 14 + 28;
        if at(14)? != 0x45 || at(23)? != 1 || at(34)? != 3 || at(35)? != 4 {
            return None;
        }
        if at(q)? != 0x45 || (at(q + 9)? != 6 && at(q + 9)? != 17) {
            return None;
        }
        let (sp, dp) = (port(q + 20)?, port(q + 22)?);
        let a = |i: usize| IpAddr::V4(Ipv4Addr::new(f[i], f[i + 1], f[i + 2], f[i + 3]));
        Some(TooBig {
            ttl: f[22],
            quoted_src: SocketAddr::new(a(q + 12), sp),
            quoted_dst: SocketAddr::new(a(q + 16), dp),
            udp: f[q + 9] == 17,
        })
    } else {
        let q = 14 + 40 + 8;
        if at(54)? != 2 || at(55)? != 0 {
            return None;
        }
        at(q + 39)?;
        if at(q + 6)? != 6 && at(q + 6)? != 17 {
            return None;
        }
        let (sp, dp) = (port(q + 40)?, port(q + 42)?);
        let a = |i: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&f[i..i + 16]).unwrap()));
        Some(TooBig {
            ttl: f[21],
            quoted_src: SocketAddr::new(a(q + 8), sp),
            quoted_dst: SocketAddr::new(a(q + 24), dp),
            udp: f[q + 6] == 17,
        })
    }
}

/// README's martian sources (besides the VIP itself).
pub fn martian(src: IpAddr, dst: IpAddr) -> bool {
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

/// What the model knows of a flow's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// An entry exists, pinned to this backend.
    Entry(SocketAddr),
    /// It may or may not exist.
    Unsure,
}

/// A flow: (client, VIP, is UDP).
pub type FlowId = (SocketAddr, SocketAddr, bool);

pub struct Model {
    pub services: Vec<Service>,
    pub seed: u32,
    flows: HashMap<FlowId, Known>,
    /// Whether the data plane may be over its flood threshold (new flows not stored, replies
    /// without an entry matched by the table).
    pub flood_possible: bool,
}

impl Model {
    pub fn new(services: Vec<Service>, seed: u32) -> Model {
        Model {
            services,
            seed,
            flows: HashMap::new(),
            flood_possible: false,
        }
    }

    fn vip(&self, dst: SocketAddr, udp: bool) -> Option<&Service> {
        self.services.iter().find(|s| s.vip == dst && s.udp == udp)
    }

    /// The service a backend endpoint serves.
    fn service_of_backend(&self, src: SocketAddr, udp: bool) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.udp == udp && s.backends.iter().any(|(b, _)| *b == src))
    }

    /// Every acceptable outcome for `frame` (usually one). README: traffic to a VIP's address
    /// that no VIP claims (another port or protocol, ICMP that is not an error about a VIP
    /// flow, fragments, IPv6 extension headers, a malformed TCP/UDP header) is dropped.
    pub fn predict(&self, frame: &[u8]) -> Vec<Outcome> {
        use Counter::*;
        let to_vip_address =
            destination(frame).is_some_and(|d| self.services.iter().any(|s| s.vip.ip() == d));
        self.predict_claimed(frame)
            .into_iter()
            .map(|o| {
                let unclaimed = matches!(
                    o.verdict,
                    PassFragment | PassIpv6Ext | PassNotTcpUdp | PassMalformedL4 | PassNotVip
                );
                if unclaimed && to_vip_address {
                    drop_(DropVipUnclaimed)
                } else {
                    o
                }
            })
            .collect()
    }

    /// `predict` before the rule for unclaimed traffic to VIP addresses.
    fn predict_claimed(&self, frame: &[u8]) -> Vec<Outcome> {
        use Counter::*;
        let p = match parse(frame) {
            Parse::Pass(c) => return vec![pass(c)],
            Parse::Icmp(m) => return vec![self.icmp(m)],
            Parse::L4(p) => p,
        };
        if let Some(s) = self.vip(p.dst, p.udp) {
            if p.ttl <= 1 {
                return vec![pass(PassTtlExceeded)];
            }
            if p.src.port() == 0 {
                return vec![drop_(DropPortZero)];
            }
            if martian(p.src.ip(), p.dst.ip()) {
                return vec![drop_(DropMartian)];
            }
            let syn = !p.udp && p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            let pick = self.pick(s, p.src, !p.udp && !syn, syn);
            // Where the packet goes depends on the backend; all of a pick's backends are on
            // the same interface in the model's configuration (checked by the property test).
            let any = match &pick {
                Pick::Exact(b) => *b,
                Pick::OneOf(v) => v[0],
            };
            return vec![match s.mode {
                Mode::Nat => sent(any.ip(), Out::Nat { backend: pick }, vec![FwdNat]),
                Mode::DsrL2 => sent(any.ip(), Out::DsrL2 { backend: pick }, vec![FwdDsrL2]),
                Mode::Ipip => sent(any.ip(), Out::Ipip { backend: pick }, vec![FwdIpip]),
            }];
        }
        // From a backend's service endpoint (any mode): with no hop left, to the kernel; from
        // a NAT backend, a reply if its flow is tracked to it.
        let Some(s) = self.service_of_backend(p.src, p.udp) else {
            return vec![pass(PassNotVip)];
        };
        if p.ttl <= 1 {
            return vec![pass(PassTtlExceeded)];
        }
        if s.mode != Mode::Nat {
            return vec![pass(PassNotVip)];
        }
        let flow = (p.dst, s.vip, p.udp);
        let translated = sent(p.dst.ip(), Out::Reply { vip: s.vip }, vec![RevNat]);
        let stateless = {
            let mut o = translated.clone();
            o.events.push(RevStateless);
            o
        };
        // Without an entry, a reply is the VIP's if its backend is a member of the VIP (it is:
        // it was found as one) and it is not addressed to the gateway itself.
        let member = route(p.dst.ip()) != Route::Other;
        match self.flows.get(&flow) {
            Some(Known::Entry(b)) if *b == p.src => vec![translated],
            Some(Known::Entry(_)) => vec![pass(PassNotVip)],
            known => {
                let mut v = Vec::new();
                if known == Some(&Known::Unsure) {
                    v.push(translated);
                    v.push(pass(PassNotVip));
                }
                if member && (s.stateless || self.flood_possible) {
                    v.push(stateless);
                }
                if !s.stateless || !member {
                    v.push(pass(PassNotVip));
                }
                v.dedup();
                v
            }
        }
    }

    /// The backend a packet from `client` to `s` goes to: its entry's, if the model knows the
    /// flow has one; the VIP's hash for maglev and source-hash; for a TCP segment that is not
    /// a SYN and whose flow never had an entry (`continuing`), the hashed choice, which is the
    /// flow hash into the table for random and least-conn; else any weighted backend.
    ///
    /// A SYN over the flood threshold is not looked up in the unconfirmed table (it costs no
    /// more than it must): it gets the hashed choice even if its flow has an entry there.
    fn pick(&self, s: &Service, client: SocketAddr, continuing: bool, syn: bool) -> Pick {
        let weighted = || {
            Pick::OneOf(
                s.backends
                    .iter()
                    .filter(|(_, w)| *w > 0)
                    .map(|(b, _)| *b)
                    .collect(),
            )
        };
        match self.flows.get(&(client, s.vip, s.udp)) {
            Some(Known::Entry(b)) if syn && self.flood_possible => {
                return match s.table_choice(client, self.seed) {
                    Some(h) => Pick::OneOf(vec![*b, h]),
                    None => weighted(),
                };
            }
            Some(Known::Entry(b)) => return Pick::Exact(*b),
            None if continuing => {
                if let Some(b) = s.table_choice(client, self.seed) {
                    return Pick::Exact(b);
                }
            }
            _ => {}
        }
        match s.hashed(client, self.seed) {
            Some(b) => Pick::Exact(b),
            None => weighted(),
        }
    }

    fn icmp(&self, m: Option<TooBig>) -> Outcome {
        use Counter::*;
        let Some(m) = m else {
            return pass(PassNotTcpUdp);
        };
        let Some(s) = self.vip(m.quoted_src, m.udp) else {
            return pass(PassNotTcpUdp);
        };
        if m.ttl <= 1 {
            return pass(PassTtlExceeded);
        }
        // The flow's backend (its entry, else the VIP's selection), in the VIP's mode.
        let pick = self.pick(s, m.quoted_dst, false, false);
        let any = match &pick {
            Pick::Exact(b) => *b,
            Pick::OneOf(v) => v[0],
        };
        match s.mode {
            Mode::Nat => sent(
                any.ip(),
                Out::IcmpToBackend { backend: pick },
                vec![IcmpToBackend, FwdNat],
            ),
            Mode::DsrL2 => sent(
                any.ip(),
                Out::DsrL2 { backend: pick },
                vec![IcmpToBackend, FwdDsrL2],
            ),
            Mode::Ipip => sent(
                any.ip(),
                Out::Ipip { backend: pick },
                vec![IcmpToBackend, FwdIpip],
            ),
        }
    }

    /// Whether the generator makes ICMP about flows of `vip` (NAT VIPs: the others' backends
    /// are not behind the gateway for ICMP; mutated frames still reach any VIP).
    pub fn icmp_ok(&self, vip: SocketAddr, udp: bool) -> bool {
        self.vip(vip, udp).is_some_and(|s| s.mode == Mode::Nat)
    }

    /// What the model knows of the flow a frame belongs to (for failure messages).
    pub fn knowledge(&self, frame: &[u8]) -> String {
        let Parse::L4(p) = parse(frame) else {
            return "not a TCP/UDP packet".into();
        };
        let flow = match (
            self.vip(p.dst, p.udp),
            self.service_of_backend(p.src, p.udp),
        ) {
            (Some(s), _) => (p.src, s.vip, s.udp),
            (None, Some(s)) => (p.dst, s.vip, s.udp),
            _ => return "no VIP's flow".into(),
        };
        format!("flow {flow:?}: {:?}", self.flows.get(&flow))
    }

    /// Learns from a packet the data plane handled: `pristine` — built as specified, not
    /// mutated; `backend` — where a forwarded packet went; `translated` — a reply rewritten to
    /// its VIP.
    pub fn observe(
        &mut self,
        frame: &[u8],
        pristine: bool,
        backend: Option<SocketAddr>,
        translated: bool,
    ) {
        let Parse::L4(p) = parse(frame) else {
            return;
        };
        let risky = !pristine || p.flags & (TCP_RST | TCP_FIN) != 0;
        if let Some(s) = self.vip(p.dst, p.udp) {
            let flow = (p.src, s.vip, s.udp);
            let sure = !risky && !self.flood_possible;
            match (self.flows.get(&flow), backend) {
                // Not given a backend (the checks before any state): no entry made or changed.
                (_, None) => {}
                (Some(Known::Entry(_)), _) if !risky => {}
                (None, Some(b)) if sure => {
                    self.flows.insert(flow, Known::Entry(b));
                }
                _ => {
                    self.flows.insert(flow, Known::Unsure);
                }
            }
        } else if let Some(s) = self.service_of_backend(p.src, p.udp) {
            let flow = (p.dst, s.vip, s.udp);
            let known = self.flows.get(&flow).copied();
            // A reply matched by the table after a flood may confirm its flow (a new entry).
            if (risky && known.is_some()) || (translated && known.is_none() && self.flood_possible)
            {
                self.flows.insert(flow, Known::Unsure);
            }
        }
    }
}
