//! Address and port rewriting with incremental checksum updates (RFC 1624).

use aya_ebpf::programs::XdpContext;
use lb_common::{csum::CsumUpdate, FAMILY_V4, PROTO_TCP};

use crate::{
    headers::{Ipv4Hdr, Ipv6Hdr, TcpHdr, UdpHdr, ETH_LEN},
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
    ctx: &XdpContext,
    pkt: &Packet,
    side: Side,
    addr: &[u32; 4],
    port: u16,
) -> bool {
    // Addresses first, collecting their effect on the L4 checksum.
    let mut l4 = CsumUpdate::delta();
    if pkt.family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
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
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else {
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

    if pkt.proto == PROTO_TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(ctx, pkt.l4_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let tcp = unsafe { &mut *tcp };
        let field = if side == Side::Src {
            &mut tcp.sport_be
        } else {
            &mut tcp.dport_be
        };
        let mut c = l4.rebase(tcp.check);
        c.word(*field, port);
        *field = port;
        tcp.check = c.finish();
    } else {
        let Some(udp) = ptr_at::<UdpHdr>(ctx, pkt.l4_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let udp = unsafe { &mut *udp };
        let field = if side == Side::Src {
            &mut udp.sport_be
        } else {
            &mut udp.dport_be
        };
        let mut c = l4.rebase(udp.check);
        c.word(*field, port);
        *field = port;
        // An IPv4 UDP checksum of zero means "no checksum": leave it so.
        if udp.check != 0 || pkt.family != FAMILY_V4 {
            let mut sum = c.finish();
            // A computed zero is sent as all ones, since zero means "none".
            if sum == 0 {
                sum = 0xffff;
            }
            udp.check = sum;
        }
    }
    true
}

/// Decrements the TTL (with the IPv4 header checksum) or hop limit of the packet at `ETH_LEN`,
/// as a router does; the caller has checked it is above 1. False if the header is out of bounds.
#[inline(always)]
pub(crate) fn decrement_ttl(ctx: &XdpContext, family: u8) -> bool {
    if family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
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
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        ip.hop_limit = ip.hop_limit.wrapping_sub(1);
    }
    true
}
