//! Header parsing: Ethernet → IPv4 (any IHL) or IPv6 → TCP or UDP. Every access is checked
//! against `data_end`; anything that does not parse is passed to the kernel with the counter
//! that names the reason (the kernel applies its own validation and drops what is invalid).

use lb_common::{Counter, Endpoint, FlowKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

use crate::{
    frame::Frame,
    headers::{EthHdr, Ipv4Hdr, Ipv6Hdr, TcpHdr, UdpHdr, ETH_LEN, IPV6_LEN},
    Verdict,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// 802.1Q (C-tag) and 802.1ad (S-tag) tag protocol identifiers.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags lb looks through (802.1ad + 802.1Q, "QinQ"); a frame with more is not IP to lb.
pub(crate) const MAX_VLAN_TAGS: usize = 2;
const IPV6_FRAGMENT: u8 = 44;

/// A parsed TCP or UDP packet: everything the data plane needs, copied out of the headers.
pub(crate) struct Packet {
    pub family: u8,
    pub proto: u8,
    /// Offset of the IP header: 14, or 18 / 22 after one / two VLAN tags (kept as they are).
    pub l3_off: usize,
    /// Offset of the TCP/UDP header from the start of the frame.
    pub l4_off: usize,
    /// Addresses and ports, network byte order (IPv4 in word 0).
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// Length of the whole frame, for byte counters.
    pub frame_len: u64,
    /// IP total length (IPv4 total length; IPv6 payload length + 40), host order.
    pub ip_len: u16,
    /// A GSO packet's (tc): the IP length of each segment the kernel will make of it; 0 for
    /// any other packet.
    pub seg_len: u16,
    /// IPv4 TOS byte, or the IPv6 flow label (network byte order), for the route lookup.
    pub tos_or_flow: u32,
}

impl Packet {
    /// The length the egress MTU must allow: each segment's for a GSO packet.
    #[inline(always)]
    pub(crate) fn mtu_len(&self) -> u16 {
        if self.seg_len != 0 {
            self.seg_len
        } else {
            self.ip_len
        }
    }

    #[inline(always)]
    pub(crate) fn dst_endpoint(&self) -> Endpoint {
        Endpoint {
            addr_be: self.dst,
            port_be: self.dport,
            proto: self.proto,
            family: self.family,
        }
    }

    /// The flow this client → VIP packet belongs to (conntrack key, hash input).
    #[inline(always)]
    pub(crate) fn flow_key(&self) -> FlowKey {
        FlowKey {
            src_be: self.src,
            dst_be: self.dst,
            sport_be: self.sport,
            dport_be: self.dport,
            proto: self.proto,
            family: self.family,
            _pad: 0,
        }
    }

    /// The client → `vip` flow this backend → client packet would answer.
    #[inline(always)]
    pub(crate) fn reply_flow_key(&self, vip: &Endpoint) -> FlowKey {
        FlowKey {
            src_be: self.dst,
            dst_be: vip.addr_be,
            sport_be: self.dport,
            dport_be: vip.port_be,
            proto: self.proto,
            family: self.family,
            _pad: 0,
        }
    }

    #[inline(always)]
    pub(crate) fn src_endpoint(&self) -> Endpoint {
        Endpoint {
            addr_be: self.src,
            port_be: self.sport,
            proto: self.proto,
            family: self.family,
        }
    }
}

type ParseResult = Result<Packet, Verdict>;

pub(crate) use lb_ebpf::bounds::{data_end, ptr_at};

/// The ether type after up to `MAX_VLAN_TAGS` VLAN tags, and the offset of what it is the
/// type of. None: shorter than an Ethernet header (or than its tags).
#[inline(always)]
pub(crate) fn l2(ctx: &impl Frame) -> Option<(u16, usize)> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    let mut ty = u16::from_be(unsafe { (*eth).ether_type_be });
    let mut off = ETH_LEN;
    let mut i = 0;
    while i < MAX_VLAN_TAGS {
        if ty != ETH_P_8021Q && ty != ETH_P_8021AD {
            break;
        }
        // A tag: TCI (2 bytes), then the next ether type.
        let next = ptr_at::<[u16; 2]>(ctx, off)?;
        // SAFETY: bounds-checked by ptr_at.
        ty = u16::from_be(unsafe { (*next)[1] });
        off += 4;
        i += 1;
    }
    Some((ty, off))
}

#[inline(always)]
pub(crate) fn is_icmp(ctx: &impl Frame) -> bool {
    match l2(ctx) {
        Some((ETH_P_IP, l3)) => ptr_at::<Ipv4Hdr>(ctx, l3)
            // SAFETY: bounds-checked by ptr_at.
            .is_some_and(|ip| unsafe { (*ip).protocol } == lb_common::PROTO_ICMP),
        Some((ETH_P_IPV6, l3)) => ptr_at::<Ipv6Hdr>(ctx, l3)
            // SAFETY: bounds-checked by ptr_at.
            .is_some_and(|ip| unsafe { (*ip).next_header } == lb_common::PROTO_ICMPV6),
        _ => false,
    }
}

/// The family and destination address of an IP packet (whatever follows the IP header).
#[inline(always)]
pub(crate) fn destination(ctx: &impl Frame) -> Option<(u8, [u32; 4])> {
    match l2(ctx)? {
        (ETH_P_IP, l3) => {
            let ip = ptr_at::<Ipv4Hdr>(ctx, l3)?;
            // SAFETY: bounds-checked by ptr_at.
            Some((FAMILY_V4, [unsafe { (*ip).daddr_be }, 0, 0, 0]))
        }
        (ETH_P_IPV6, l3) => {
            let ip = ptr_at::<Ipv6Hdr>(ctx, l3)?;
            // SAFETY: bounds-checked by ptr_at.
            Some((FAMILY_V6, unsafe { (*ip).daddr_be }))
        }
        _ => None,
    }
}

#[inline(always)]
pub(crate) fn parse(ctx: &impl Frame) -> ParseResult {
    match l2(ctx) {
        None => Err(Verdict::pass(Counter::PassMalformedEth)),
        Some((ETH_P_IP, l3)) => parse_v4(ctx, l3),
        Some((ETH_P_IPV6, l3)) => parse_v6(ctx, l3),
        // (Including a frame with more tags than lb looks through.)
        Some(_) => Err(Verdict::pass(Counter::PassNotIp)),
    }
}

#[inline(always)]
fn parse_v4(ctx: &impl Frame, l3: usize) -> ParseResult {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return Err(split_or(ctx, l3 + 20, Counter::PassMalformedIp));
    };
    // SAFETY: bounds-checked by ptr_at.
    let h = unsafe { &*ip };
    let ihl = (h.version_ihl & 0x0f) as usize;
    if h.version_ihl >> 4 != 4 || ihl < 5 {
        return Err(Verdict::pass(Counter::PassMalformedIp));
    }
    let hdr_len = ihl * 4;
    let tot_len = u16::from_be(h.tot_len_be) as usize;
    let frame_len = frame_len(ctx, l3 + tot_len);
    if tot_len < hdr_len || l3 + tot_len > frame_len {
        return Err(Verdict::pass(Counter::PassMalformedIp));
    }
    // More-fragments flag or a fragment offset: lb does not reassemble.
    if u16::from_be(h.frag_off_be) & 0x3fff != 0 {
        return Err(Verdict::pass(Counter::PassFragment));
    }
    let proto = h.protocol;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Verdict::pass(Counter::PassNotTcpUdp));
    }
    let src = [h.saddr_be, 0, 0, 0];
    let dst = [h.daddr_be, 0, 0, 0];
    let tos = h.tos as u32;
    let l4_off = l3 + hdr_len;
    let ttl = h.ttl;
    let l4 = parse_l4(ctx, proto, l4_off, l3 + tot_len)?;
    let seg_len = seg_len(ctx, hdr_len + l4.hdr_len);
    Ok(Packet {
        family: FAMILY_V4,
        proto,
        l3_off: l3,
        l4_off,
        src,
        dst,
        sport: l4.sport,
        dport: l4.dport,
        tcp_flags: l4.flags,
        ttl,
        frame_len: frame_len as u64,
        ip_len: tot_len as u16,
        seg_len,
        tos_or_flow: tos,
    })
}

#[inline(always)]
fn parse_v6(ctx: &impl Frame, l3: usize) -> ParseResult {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return Err(split_or(ctx, l3 + IPV6_LEN, Counter::PassMalformedIp));
    };
    // SAFETY: bounds-checked by ptr_at.
    let h = unsafe { &*ip };
    let vtc_flow = u32::from_be(h.vtc_flow_be);
    if vtc_flow >> 28 != 6 {
        return Err(Verdict::pass(Counter::PassMalformedIp));
    }
    let payload_len = u16::from_be(h.payload_len_be) as usize;
    let frame_len = frame_len(ctx, l3 + IPV6_LEN + payload_len);
    if l3 + IPV6_LEN + payload_len > frame_len {
        return Err(Verdict::pass(Counter::PassMalformedIp));
    }
    let proto = h.next_header;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Verdict::pass(match proto {
            IPV6_FRAGMENT => Counter::PassFragment,
            // Hop-by-hop, routing, destination options, AH, mobility, HIP, shim6.
            0 | 43 | 60 | 51 | 135 | 139 | 140 => Counter::PassIpv6Ext,
            _ => Counter::PassNotTcpUdp,
        }));
    }
    let src = h.saddr_be;
    let dst = h.daddr_be;
    let flow = (vtc_flow & 0x000f_ffff).to_be();
    let l4_off = l3 + IPV6_LEN;
    let ttl = h.hop_limit;
    let l4 = parse_l4(ctx, proto, l4_off, l4_off + payload_len)?;
    let seg_len = seg_len(ctx, IPV6_LEN + l4.hdr_len);
    Ok(Packet {
        family: FAMILY_V6,
        proto,
        l3_off: l3,
        l4_off,
        src,
        dst,
        sport: l4.sport,
        dport: l4.dport,
        tcp_flags: l4.flags,
        ttl,
        frame_len: frame_len as u64,
        ip_len: (IPV6_LEN + payload_len) as u16,
        seg_len,
        tos_or_flow: flow,
    })
}

/// The length of the packet whose IP packet ends at `ip_end`: the directly accessible part,
/// or — only when that is shorter, so that an ordinary XDP frame costs no helper call — the
/// whole packet (a multi-buffer frame, or a socket buffer's fragments).
#[inline(always)]
fn frame_len(ctx: &impl Frame, ip_end: usize) -> usize {
    let linear = data_end(ctx) - ctx.data();
    if ip_end <= linear {
        linear
    } else {
        ctx.packet_len()
    }
}

/// The IP length of each segment of a GSO packet with `headers` bytes of IP and L4 headers (0:
/// not one).
#[inline(always)]
fn seg_len(ctx: &impl Frame, headers: usize) -> u16 {
    let gso = ctx.gso_size();
    if gso == 0 {
        0
    } else {
        (headers as u32 + gso).min(0xffff) as u16
    }
}

/// A header that the packet has but that lies beyond its directly accessible part (XDP: the
/// first buffer of a multi-buffer frame; tc: the linear part, after the pull at the entry):
/// counted, and passed with the verdict `bad` names.
#[inline(always)]
fn split_or(ctx: &impl Frame, end: usize, bad: Counter) -> Verdict {
    if end <= ctx.packet_len() {
        crate::maps::count(Counter::HeadersNotLinear);
    }
    Verdict::pass(bad)
}

/// What `parse_l4` reads: ports (network byte order), TCP flags and the header's length.
struct L4 {
    sport: u16,
    dport: u16,
    flags: u8,
    hdr_len: usize,
}

/// Checks the TCP/UDP header at `l4_off`, which must lie within the IP packet ending at
/// `ip_end`, and returns what the data plane needs of it.
#[inline(always)]
fn parse_l4(ctx: &impl Frame, proto: u8, l4_off: usize, ip_end: usize) -> Result<L4, Verdict> {
    let malformed = Err(Verdict::pass(Counter::PassMalformedL4));
    if proto == PROTO_TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(ctx, l4_off) else {
            return Err(split_or(ctx, l4_off + 20, Counter::PassMalformedL4));
        };
        // SAFETY: bounds-checked by ptr_at.
        let t = unsafe { &*tcp };
        let doff = (t.doff_res >> 4) as usize;
        if doff < 5 || l4_off + doff * 4 > ip_end {
            return malformed;
        }
        Ok(L4 {
            sport: t.sport_be,
            dport: t.dport_be,
            flags: t.flags,
            hdr_len: doff * 4,
        })
    } else {
        let Some(udp) = ptr_at::<UdpHdr>(ctx, l4_off) else {
            return Err(split_or(ctx, l4_off + 8, Counter::PassMalformedL4));
        };
        // SAFETY: bounds-checked by ptr_at.
        let u = unsafe { &*udp };
        let len = u16::from_be(u.len_be) as usize;
        if len < core::mem::size_of::<UdpHdr>() || l4_off + len > ip_end {
            return malformed;
        }
        Ok(L4 {
            sport: u.sport_be,
            dport: u.dport_be,
            flags: 0,
            hdr_len: core::mem::size_of::<UdpHdr>(),
        })
    }
}

/// The TCP sequence and acknowledgment numbers (host order) of a parsed TCP packet: read only
/// on the paths that need them (unconfirmed flows), not by every packet's parse.
#[inline(always)]
pub(crate) fn tcp_seq_ack(ctx: &impl Frame, pkt: &Packet) -> (u32, u32) {
    match ptr_at::<TcpHdr>(ctx, pkt.l4_off) {
        // SAFETY: bounds-checked by ptr_at.
        Some(t) => unsafe { (u32::from_be((*t).seq), u32::from_be((*t).ack)) },
        None => (0, 0),
    }
}
