//! Address and port rewriting with incremental checksum updates (RFC 1624).

use lb_common::{csum::CsumUpdate, FAMILY_V4, PROTO_TCP};

use crate::{
    frame::{Bounded, Frame, L4Sum},
    headers::{Ipv4Hdr, Ipv6Hdr},
    parse::{ptr_at, Packet},
};

/// Which end of the packet to rewrite: the destination (client → backend) or the source
/// (backend reply → client, rewritten to come from the VIP).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Src,
    Dst,
}

/// Rewrites `side`'s address and port to `addr`/`port` (network byte order), decrements the
/// TTL / hop limit (the caller has checked it is above 1), and updates the IPv4 header checksum
/// and the TCP/UDP checksum, whose pseudo-header covers the addresses. Returns false if a
/// header is not within bounds (cannot happen after `parse`; checked again because the verifier
/// needs it).
#[inline(always)]
pub(crate) fn rewrite(
    ctx: &impl Frame,
    pkt: &Packet,
    side: Side,
    addr: &[u32; 4],
    port: u16,
) -> bool {
    // Addresses first, collecting their effect on the L4 checksum.
    let mut l4 = CsumUpdate::delta();
    if pkt.family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let field = if side == Side::Src {
            &mut ip.saddr_be
        } else {
            &mut ip.daddr_be
        };
        let old = *field;
        *field = addr[0];
        let mut c = CsumUpdate::new(ip.check);
        c.word32(old, addr[0]);
        let ttl_proto = u16::from_ne_bytes([ip.ttl, ip.protocol]);
        ip.ttl = ip.ttl.wrapping_sub(1);
        c.word(ttl_proto, u16::from_ne_bytes([ip.ttl, ip.protocol]));
        ip.check = c.finish();
        l4.word32(old, addr[0]);
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let field = if side == Side::Src {
            &mut ip.saddr_be
        } else {
            &mut ip.daddr_be
        };
        let old = *field;
        *field = *addr;
        ip.hop_limit = ip.hop_limit.wrapping_sub(1);
        l4.addr(&old, addr);
    }

    // Then the port, collecting its effect on the L4 checksum separately: a partial checksum
    // (tc) takes only the pseudo-header's part.
    let mut data = CsumUpdate::delta();
    let (port_off, check_off, kind) = if pkt.proto == PROTO_TCP {
        (if side == Side::Src { 0 } else { 2 }, 16, L4Sum::Plain)
    } else {
        (
            if side == Side::Src { 0 } else { 2 },
            6,
            if pkt.family == FAMILY_V4 {
                L4Sum::UdpV4
            } else {
                L4Sum::UdpV6
            },
        )
    };
    let Some(field) = ptr_at::<u16>(ctx, pkt.l4_off + port_off) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        data.word(*field, port);
        *field = port;
    }
    ctx.l4_csum(pkt.l4_off + check_off, l4, data, kind)
}

/// Decrements the TTL (with the IPv4 header checksum) or hop limit of the packet, as a router
/// does; the caller has checked it is above 1. False if the header is out of bounds.
#[inline(always)]
pub(crate) fn decrement_ttl(ctx: &impl Bounded, pkt: &Packet) -> bool {
    if pkt.family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let old = u16::from_ne_bytes([ip.ttl, ip.protocol]);
        ip.ttl = ip.ttl.wrapping_sub(1);
        let mut c = CsumUpdate::new(ip.check);
        c.word(old, u16::from_ne_bytes([ip.ttl, ip.protocol]));
        ip.check = c.finish();
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        ip.hop_limit = ip.hop_limit.wrapping_sub(1);
    }
    true
}
