//! Address and port rewriting with incremental checksum updates (RFC 1624).

use aya_ebpf::programs::XdpContext;
use lb_common::{csum::CsumUpdate, FAMILY_V4, PROTO_TCP};

use crate::parse::{Packet, ETH_LEN, IPV4_MIN_LEN, IPV6_LEN, TCP_MIN_LEN, UDP_LEN};

/// Which end of the packet to rewrite: the destination (client → backend) or the source
/// (backend reply → client, rewritten to come from the VIP).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Src,
    Dst,
}

#[inline(always)]
fn read2(p: usize) -> [u8; 2] {
    // SAFETY: callers pass pointers inside a bounds-checked header.
    unsafe { *(p as *const [u8; 2]) }
}

#[inline(always)]
fn write2(p: usize, v: [u8; 2]) {
    // SAFETY: as above.
    unsafe { *(p as *mut [u8; 2]) = v }
}

/// Rewrites `side`'s address and port to `addr`/`port` and fixes the IPv4 header checksum and
/// the TCP/UDP checksum (whose pseudo-header covers the addresses). Returns false if a header
/// is no longer within bounds (cannot happen after `parse`; checked again for the verifier).
#[inline(always)]
pub(crate) fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    side: Side,
    addr: &[u8; 16],
    port: [u8; 2],
) -> bool {
    let data = ctx.data();
    let end = ctx.data_end();
    let l4 = data + pkt.l4_off;
    let (l4_len, csum_off) = if pkt.proto == PROTO_TCP {
        (TCP_MIN_LEN, 16)
    } else {
        (UDP_LEN, 6)
    };
    if l4 + l4_len > end {
        return false;
    }
    let port_ptr = l4 + if side == Side::Src { 0 } else { 2 };
    let l4_csum_ptr = l4 + csum_off;
    let old_l4_csum = read2(l4_csum_ptr);
    // An IPv4 UDP checksum of zero means "no checksum": leave it so.
    let l4_has_csum = pkt.proto == PROTO_TCP || pkt.family != FAMILY_V4 || old_l4_csum != [0, 0];
    let mut l4_csum = CsumUpdate::new(u16::from_ne_bytes(old_l4_csum));

    if pkt.family == FAMILY_V4 {
        let ip = data + ETH_LEN;
        if ip + IPV4_MIN_LEN > end {
            return false;
        }
        let addr_ptr = ip + if side == Side::Src { 12 } else { 16 };
        // SAFETY: within the fixed IPv4 header, checked above.
        let old = unsafe { *(addr_ptr as *const [u8; 4]) };
        let new = [addr[0], addr[1], addr[2], addr[3]];
        let mut ip_csum = CsumUpdate::new(u16::from_ne_bytes(read2(ip + 10)));
        ip_csum.bytes4(&old, &new);
        l4_csum.bytes4(&old, &new);
        // SAFETY: as above.
        unsafe { *(addr_ptr as *mut [u8; 4]) = new };
        write2(ip + 10, ip_csum.finish().to_ne_bytes());
    } else {
        let ip = data + ETH_LEN;
        if ip + IPV6_LEN > end {
            return false;
        }
        let addr_ptr = ip + if side == Side::Src { 8 } else { 24 };
        // SAFETY: within the IPv6 header, checked above.
        let old = unsafe { *(addr_ptr as *const [u8; 16]) };
        l4_csum.bytes16(&old, addr);
        // SAFETY: as above.
        unsafe { *(addr_ptr as *mut [u8; 16]) = *addr };
    }

    l4_csum.bytes2(read2(port_ptr), port);
    write2(port_ptr, port);
    if l4_has_csum {
        let mut c = l4_csum.finish();
        // In UDP a computed zero is sent as all ones (zero means "none").
        if c == 0 && pkt.proto != PROTO_TCP {
            c = 0xffff;
        }
        write2(l4_csum_ptr, c.to_ne_bytes());
    }
    true
}
