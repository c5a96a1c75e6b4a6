//! ICMP errors about VIP flows: a fragmentation-needed (IPv4) or packet-too-big (IPv6) sent to
//! a VIP by a router on the way to the client quotes the packet the backend sent (VIP → client).
//! lb finds the flow from the quote and sends the message to that flow's backend, so path MTU
//! discovery works behind it. Other ICMP (echo included) is passed to the kernel untouched, or
//! dropped if it is addressed to a VIP's address (`drop_vip_unclaimed`).

use lb_common::{
    csum::CsumUpdate, Endpoint, FlowKey, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP,
};

use crate::{
    frame::{Frame, L4Sum},
    headers::{Ipv4Hdr, Ipv6Hdr, IPV6_LEN},
    parse::{ptr_at, Packet},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// A too-big message about a flow to a VIP.
pub(crate) struct TooBig {
    /// The ICMP packet itself (addresses of its outer IP header; ports 0).
    pub outer: Packet,
    /// The VIP the quoted packet came from.
    pub vip: Endpoint,
    /// The flow (client → VIP) the quoted packet belongs to.
    pub flow: FlowKey,
    /// Offset of the quoted IP header.
    pub quote_off: usize,
}

/// Parses a frame as an ICMP too-big about a TCP/UDP packet sent from some address:port
/// (possibly a VIP). Only option-less IPv4 headers, outer and quoted.
#[inline(always)]
pub(crate) fn parse(ctx: &impl Frame) -> Option<TooBig> {
    let (ether_type, l3) = crate::parse::l2(ctx)?;
    // The whole packet: a message longer than the directly accessible part (a socket
    // buffer's linear part; a multi-buffer frame's first buffer) is still one.
    let frame_len = ctx.packet_len() as u64;
    if ether_type == ETH_P_IP {
        let ip = ptr_at::<Ipv4Hdr>(ctx, l3)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *ip };
        let icmp = ptr_at::<[u8; 8]>(ctx, l3 + 20)?;
        // SAFETY: bounds-checked by ptr_at.
        let icmp = unsafe { *icmp };
        if h.version_ihl != 0x45 || h.protocol != PROTO_ICMP || icmp[0] != 3 || icmp[1] != 4 {
            return None;
        }
        if u16::from_be(h.frag_off_be) & 0x3fff != 0 {
            return None;
        }
        let quote_off = l3 + 28;
        let q = ptr_at::<Ipv4Hdr>(ctx, quote_off)?;
        // SAFETY: bounds-checked by ptr_at.
        let q = unsafe { *q };
        if q.version_ihl != 0x45 || (q.protocol != PROTO_TCP && q.protocol != PROTO_UDP) {
            return None;
        }
        let ports = ptr_at::<[u16; 2]>(ctx, quote_off + 20)?;
        // SAFETY: bounds-checked by ptr_at.
        let [qsport, qdport] = unsafe { *ports };
        let tot_len = u16::from_be(h.tot_len_be);
        if l3 as u64 + tot_len as u64 > frame_len {
            return None;
        }
        Some(TooBig {
            outer: Packet {
                l3_off: l3,
                family: FAMILY_V4,
                proto: PROTO_ICMP,
                l4_off: l3 + 20,
                src: [h.saddr_be, 0, 0, 0],
                dst: [h.daddr_be, 0, 0, 0],
                sport: 0,
                dport: 0,
                tcp_flags: 0,
                ttl: h.ttl,
                frame_len,
                ip_len: tot_len,
                seg_len: 0,
                tos_or_flow: h.tos as u32,
            },
            vip: Endpoint {
                addr_be: [q.saddr_be, 0, 0, 0],
                port_be: qsport,
                proto: q.protocol,
                family: FAMILY_V4,
            },
            flow: FlowKey {
                src_be: [q.daddr_be, 0, 0, 0],
                dst_be: [q.saddr_be, 0, 0, 0],
                sport_be: qdport,
                dport_be: qsport,
                proto: q.protocol,
                family: FAMILY_V4,
                _pad: 0,
            },
            quote_off,
        })
    } else if ether_type == ETH_P_IPV6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, l3)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *ip };
        let icmp = ptr_at::<[u8; 8]>(ctx, l3 + IPV6_LEN)?;
        // SAFETY: bounds-checked by ptr_at.
        let icmp = unsafe { *icmp };
        if h.next_header != PROTO_ICMPV6 || icmp[0] != 2 || icmp[1] != 0 {
            return None;
        }
        let quote_off = l3 + IPV6_LEN + 8;
        let q = ptr_at::<Ipv6Hdr>(ctx, quote_off)?;
        // SAFETY: bounds-checked by ptr_at.
        let q = unsafe { *q };
        if q.next_header != PROTO_TCP && q.next_header != PROTO_UDP {
            return None;
        }
        let ports = ptr_at::<[u16; 2]>(ctx, quote_off + IPV6_LEN)?;
        // SAFETY: bounds-checked by ptr_at.
        let [qsport, qdport] = unsafe { *ports };
        let payload = u16::from_be(h.payload_len_be) as u64;
        if (l3 + IPV6_LEN) as u64 + payload > frame_len {
            return None;
        }
        Some(TooBig {
            outer: Packet {
                l3_off: l3,
                family: FAMILY_V6,
                proto: PROTO_ICMPV6,
                l4_off: l3 + IPV6_LEN,
                src: h.saddr_be,
                dst: h.daddr_be,
                sport: 0,
                dport: 0,
                tcp_flags: 0,
                ttl: h.hop_limit,
                frame_len,
                ip_len: (IPV6_LEN as u64 + payload) as u16,
                seg_len: 0,
                tos_or_flow: (u32::from_be(h.vtc_flow_be) & 0x000f_ffff).to_be(),
            },
            vip: Endpoint {
                addr_be: q.saddr_be,
                port_be: qsport,
                proto: q.next_header,
                family: FAMILY_V6,
            },
            flow: FlowKey {
                src_be: q.daddr_be,
                dst_be: q.saddr_be,
                sport_be: qdport,
                dport_be: qsport,
                proto: q.next_header,
                family: FAMILY_V6,
                _pad: 0,
            },
            quote_off,
        })
    } else {
        None
    }
}

/// NAT mode: the backend knows the flow as backend → client, so the message becomes one about
/// that: outer destination, quoted source address and port become the backend's. The outer and
/// quoted IPv4 header checksums and the ICMP checksum are updated (the quoted TCP/UDP checksum
/// is not: receivers of ICMP errors do not check it).
#[inline(always)]
pub(crate) fn nat_rewrite(ctx: &impl Frame, m: &TooBig, addr: &[u32; 4], port: u16) -> bool {
    // Changes to the ICMP checksum: of the pseudo-header (ICMPv6's covers the destination) and
    // of the message (the quote).
    let mut pseudo = CsumUpdate::delta();
    let mut icmp_delta = CsumUpdate::delta();
    if m.outer.family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, m.outer.l3_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let mut c = CsumUpdate::new(ip.check);
        c.word32(ip.daddr_be, addr[0]);
        ip.daddr_be = addr[0];
        // Forwarded one hop on, as a router does (the caller checked the TTL is above 1).
        let ttl_proto = u16::from_ne_bytes([ip.ttl, ip.protocol]);
        ip.ttl = ip.ttl.wrapping_sub(1);
        c.word(ttl_proto, u16::from_ne_bytes([ip.ttl, ip.protocol]));
        ip.check = c.finish();
        let Some(q) = ptr_at::<Ipv4Hdr>(ctx, m.quote_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let q = unsafe { &mut *q };
        let old_check = q.check;
        let mut c = CsumUpdate::new(q.check);
        c.word32(q.saddr_be, addr[0]);
        icmp_delta.word32(q.saddr_be, addr[0]);
        q.saddr_be = addr[0];
        q.check = c.finish();
        icmp_delta.word(old_check, q.check);
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, m.outer.l3_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        // The ICMPv6 checksum covers the pseudo-header's destination (not the hop limit).
        pseudo.addr(&ip.daddr_be, addr);
        ip.daddr_be = *addr;
        ip.hop_limit = ip.hop_limit.wrapping_sub(1);
        let Some(q) = ptr_at::<Ipv6Hdr>(ctx, m.quote_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let q = unsafe { &mut *q };
        icmp_delta.addr(&q.saddr_be, addr);
        q.saddr_be = *addr;
    }
    let quote_l4 = m.quote_off
        + if m.outer.family == FAMILY_V4 {
            20
        } else {
            IPV6_LEN
        };
    let Some(sport) = ptr_at::<u16>(ctx, quote_l4) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        icmp_delta.word(*sport, port);
        *sport = port;
    }
    ctx.l4_csum(m.outer.l4_off + 2, pseudo, icmp_delta, L4Sum::Plain)
}
