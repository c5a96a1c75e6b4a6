//! Direct server return: the backend answers the client itself, so the packet keeps the VIP as
//! its destination and only reaches the backend differently:
//! - `dsr_l2`: the destination MAC becomes the backend's (same L2 segment);
//! - `ipip`: an outer IPv4/IPv6 header to the backend is put in front (IPv4 in IPv4, IPv6 in
//!   IPv6, IPv4 in IPv6). If the result would not fit the egress MTU, the client gets an ICMP
//!   fragmentation-needed / packet-too-big with the MTU left after encapsulation, as a router
//!   would send.

use lb_common::{
    Backend, Counter, ENCAP_SRC_V4_BE, ENCAP_SRC_V6_BE, FAMILY_V4, LB_TTL, NEXTHOP_F_ONLINK,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_IPIP, PROTO_IPV6, PROTO_TCP,
};

use crate::{
    fib::{self, Route},
    frame::{Bounded, Frame},
    headers::{EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_LEN, IPV6_LEN},
    nexthop,
    parse::{data_end, ptr_at, Packet},
    Verdict,
};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
const IPV4_DF: u16 = 0x4000;
const IPV6_MIN_MTU: u32 = 1280;

/// dsr-l2: send the packet unchanged to the MAC of backend `id` (cached, or from a route
/// lookup).
#[inline(always)]
pub(crate) fn dsr_l2(
    ctx: &impl Frame,
    pkt: &Packet,
    id: u32,
    backend: &Backend,
    now: u64,
) -> Verdict {
    // A VLAN-tagged frame stays in its VLAN: the backend must be reached through the
    // interface it came in on.
    let ingress = ctx.ingress_ifindex();
    let untagged = pkt.l3_off == ETH_LEN && !ctx.vlan_tag_aside();
    let in_vlan = |ifindex: u32| untagged || ifindex == ingress;
    if let Some(nh) = nexthop::cached(id, backend, now, pkt.mtu_len()) {
        if nh.flags & NEXTHOP_F_ONLINK != 0 && in_vlan(nh.ifindex) {
            if !crate::nat::decrement_ttl(ctx, pkt) {
                return Verdict::pass(Counter::PassMalformedIp);
            }
            return fib::send_cached(ctx, nh);
        }
    }
    let (r, p) = fib::lookup(
        ctx,
        pkt.family,
        pkt.proto,
        &pkt.src,
        &backend.addr_be,
        pkt.sport,
        pkt.dport,
        pkt.mtu_len(),
        pkt.tos_or_flow,
    );
    nexthop::record(id, backend, now, pkt.mtu_len(), r, &p);
    match r {
        // The next hop must be the backend itself: with a gateway in between, the gateway
        // would route the packet by its destination, the VIP.
        Route::Ok if nexthop::on_link(backend, &p) && in_vlan(p.ifindex) => {
            if !crate::nat::decrement_ttl(ctx, pkt) {
                return Verdict::pass(Counter::PassMalformedIp);
            }
            fib::send(ctx, &p)
        }
        // (Or, for a tagged frame, on another interface than the frame's VLAN.)
        Route::Ok => Verdict::drop(Counter::DropNotOnLink),
        Route::NoNeigh => Verdict::drop(Counter::DropNoNeigh),
        Route::Unreachable => Verdict::drop(Counter::DropFibUnreachable),
        Route::FragNeeded => Verdict::drop(Counter::DropTooBig),
        Route::Other => Verdict::pass(Counter::PassFibOther),
    }
}

/// ipip: encapsulate the packet (the whole IP packet `pkt` describes) to backend `id`, with an
/// outer source address derived from `hash` (the flow's), and send it; a packet that would be
/// too big is answered with an ICMP error.
#[inline(always)]
pub(crate) fn ipip(
    ctx: &impl Frame,
    pkt: &Packet,
    id: u32,
    backend: &Backend,
    hash: u32,
) -> Verdict {
    ipip_send(ctx, pkt, id, backend, hash, true)
}

/// Like `ipip`, for a packet that is itself an ICMP error: one that would be too big is dropped
/// (an ICMP error is never answered with another).
#[inline(always)]
pub(crate) fn ipip_quiet(
    ctx: &impl Frame,
    pkt: &Packet,
    id: u32,
    backend: &Backend,
    hash: u32,
) -> Verdict {
    ipip_send(ctx, pkt, id, backend, hash, false)
}

/// The outer header's source address (from the flow's `hash`), the inner protocol, and the
/// length the egress MTU must allow: the encapsulated packet's IP total length, or for a GSO
/// packet (tc) the IP length of each segment, which encapsulation leaves as it is (the
/// segments' payload shrinks instead). None: over 64 KiB.
#[inline(always)]
fn outer_of(pkt: &Packet, backend: &Backend, hash: u32) -> Option<([u32; 4], u8, u16)> {
    let outer_v4 = backend.family == FAMILY_V4;
    let outer_len: u32 = if outer_v4 { 20 } else { IPV6_LEN as u32 };
    let src = if outer_v4 {
        [
            ENCAP_SRC_V4_BE | u32::from_ne_bytes([0, 0, (hash >> 8) as u8, hash as u8]),
            0,
            0,
            0,
        ]
    } else {
        [
            ENCAP_SRC_V6_BE[0],
            ENCAP_SRC_V6_BE[1],
            ENCAP_SRC_V6_BE[2],
            hash.to_be(),
        ]
    };
    let inner_proto = if pkt.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    if pkt.seg_len != 0 {
        return Some((src, inner_proto, pkt.seg_len));
    }
    let total = pkt.ip_len as u32 + outer_len;
    if total > 0xffff {
        return None;
    }
    Some((src, inner_proto, total as u16))
}

/// ipip with a fresh cached next hop for backend `id`: encapsulate and send, in `lb_xdp`
/// itself (no tail call). None: no fresh entry — `lb_ipip` looks the route up.
#[inline(always)]
pub(crate) fn ipip_cached(
    ctx: &impl Frame,
    pkt: &Packet,
    id: u32,
    backend: &Backend,
    hash: u32,
    now: u64,
) -> Option<Verdict> {
    let (src, inner_proto, total) = outer_of(pkt, backend, hash)?;
    let nh = nexthop::cached(id, backend, now, total)?;
    if !crate::nat::decrement_ttl(ctx, pkt) {
        return Some(Verdict::pass(Counter::PassMalformedIp));
    }
    if !encapsulate(ctx, pkt, backend, &src, inner_proto, hash) {
        return Some(Verdict::drop(Counter::DropTooBig));
    }
    Some(fib::send_cached(ctx, nh))
}

#[inline(always)]
fn ipip_send(
    ctx: &impl Frame,
    pkt: &Packet,
    id: u32,
    backend: &Backend,
    hash: u32,
    answer_too_big: bool,
) -> Verdict {
    // (`lb_xdp` has tried the cached next hop already: `ipip_cached`.)
    let Some((src, inner_proto, total)) = outer_of(pkt, backend, hash) else {
        return Verdict::drop(Counter::DropTooBig);
    };
    let (r, p) = fib::lookup(
        ctx,
        backend.family,
        inner_proto,
        &src,
        &backend.addr_be,
        0,
        0,
        total,
        0,
    );
    nexthop::record(id, backend, crate::flow::now_ns(), total, r, &p);
    match r {
        Route::Ok | Route::NoNeigh | Route::Other => {}
        Route::Unreachable => return Verdict::drop(Counter::DropFibUnreachable),
        // (A GSO packet's segments were made to fit: it is not answered.)
        Route::FragNeeded if answer_too_big && pkt.seg_len == 0 => {
            // The MTU left for the inner packet.
            let outer_len = if backend.family == FAMILY_V4 {
                20
            } else {
                IPV6_LEN as u32
            };
            let mtu = (p.tot_len as u32).saturating_sub(outer_len);
            return too_big(ctx, pkt, mtu);
        }
        Route::FragNeeded => return Verdict::drop(Counter::DropTooBig),
    }
    // The inner packet is forwarded as a router would: one hop less.
    if !crate::nat::decrement_ttl(ctx, pkt) {
        return Verdict::pass(Counter::PassMalformedIp);
    }
    if !encapsulate(ctx, pkt, backend, &src, inner_proto, hash) {
        return Verdict::drop(Counter::DropTooBig);
    }
    match r {
        Route::Ok => fib::send(ctx, &p),
        // Encapsulated, the packet is an ordinary one to the backend: the kernel resolves the
        // neighbour (or whatever else it must do) and sends it.
        Route::NoNeigh => Verdict::pass(Counter::PassNoNeigh),
        _ => Verdict::pass(Counter::PassFibOther),
    }
}

/// Puts the outer header in front of the IP packet. False if the frame cannot grow.
#[inline(always)]
fn encapsulate(
    ctx: &impl Frame,
    pkt: &Packet,
    backend: &Backend,
    src: &[u32; 4],
    inner_proto: u8,
    hash: u32,
) -> bool {
    let outer_v4 = backend.family == FAMILY_V4;
    let outer_len: i32 = if outer_v4 { 20 } else { IPV6_LEN as i32 };
    // The frame's MACs (and VLAN tags) go to the new link-layer header: a frame handed to the
    // kernel (next hop unresolved) must still be addressed to this host. `send` replaces the
    // MACs otherwise.
    let Some(l2) = Link::save(ctx, pkt.l3_off) else {
        return false;
    };
    // The outer header carries the inner one's DSCP and ECN (RFC 6040, normal mode: the ECN
    // field copied; the backend's decapsulation carries a CE mark back in).
    let traffic_class = if pkt.family == FAMILY_V4 {
        pkt.tos_or_flow as u8
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        (u32::from_be(unsafe { (*ip).vtc_flow_be }) >> 20) as u8
    };
    // Every pointer is derived afresh afterwards. (Wherever the room goes in front of the IP
    // packet — XDP: the frame's start; tc: after the MAC header — the link-layer header and
    // the outer header are written over all of it.)
    if !ctx.push_outer(outer_len as u32, outer_v4, pkt.l3_off) {
        return false;
    }
    let ether_type_be = if outer_v4 { ETH_P_IP_BE } else { ETH_P_IPV6_BE };
    if l2
        .write(ctx, l2.eth.dst, l2.eth.src, ether_type_be)
        .is_none()
    {
        return false;
    }
    let l3 = pkt.l3_off;
    if outer_v4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
            return false;
        };
        let mut h = Ipv4Hdr {
            version_ihl: 0x45,
            tos: traffic_class,
            // (A GSO packet's segments get their own lengths when they are made.)
            tot_len_be: pkt.ip_len.saturating_add(20).to_be(),
            id_be: 0,
            frag_off_be: IPV4_DF.to_be(),
            ttl: LB_TTL,
            protocol: inner_proto,
            check: 0,
            saddr_be: src[0],
            daddr_be: backend.addr_be[0],
        };
        h.check = ipv4_checksum(&h);
        // SAFETY: bounds-checked by ptr_at.
        unsafe { *ip = h };
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
            return false;
        };
        let h = Ipv6Hdr {
            // Version 6, the inner traffic class, the flow label from the flow hash (ECMP and
            // RSS on the way to the backend keep the flow together and spread flows).
            vtc_flow_be: ((6u32 << 28) | ((traffic_class as u32) << 20) | (hash & 0x000f_ffff))
                .to_be(),
            payload_len_be: pkt.ip_len.to_be(),
            next_header: inner_proto,
            hop_limit: LB_TTL,
            saddr_be: *src,
            daddr_be: backend.addr_be,
        };
        // SAFETY: bounds-checked by ptr_at.
        unsafe { *ip = h };
    }
    true
}

/// A frame's link-layer header — Ethernet and up to two VLAN tags, `l3` bytes — kept while the
/// frame is rebuilt around its IP packet, and written back in front of the new one.
struct Link {
    eth: EthHdr,
    tags: [u32; 2],
    l3: usize,
}

impl Link {
    #[inline(always)]
    fn save(ctx: &impl Bounded, l3: usize) -> Option<Link> {
        // SAFETY (all three reads): bounds-checked by ptr_at.
        let eth = unsafe { *ptr_at::<EthHdr>(ctx, 0)? };
        let mut tags = [0u32; 2];
        if l3 > ETH_LEN {
            tags[0] = unsafe { *ptr_at::<u32>(ctx, ETH_LEN)? };
        }
        if l3 > ETH_LEN + 4 {
            tags[1] = unsafe { *ptr_at::<u32>(ctx, ETH_LEN + 4)? };
        }
        Some(Link { eth, tags, l3 })
    }

    /// Writes the header at the frame's start with MACs `dst` / `src`, the tags as they were,
    /// and `ether_type_be` as the type of what follows them.
    #[inline(always)]
    fn write(
        &self,
        ctx: &impl Bounded,
        dst: [u8; 6],
        src: [u8; 6],
        ether_type_be: u16,
    ) -> Option<()> {
        let tagged = self.l3 > ETH_LEN;
        // SAFETY (every write): bounds-checked by ptr_at.
        unsafe {
            *ptr_at::<EthHdr>(ctx, 0)? = EthHdr {
                dst,
                src,
                ether_type_be: if tagged {
                    self.eth.ether_type_be
                } else {
                    ether_type_be
                },
            };
            if tagged {
                *ptr_at::<u32>(ctx, ETH_LEN)? = self.tags[0];
                if self.l3 > ETH_LEN + 4 {
                    *ptr_at::<u32>(ctx, ETH_LEN + 4)? = self.tags[1];
                }
                // The last tag's "next type".
                *ptr_at::<u16>(ctx, (self.l3 - 2) & 0x1f)? = ether_type_be;
            }
        }
        Some(())
    }
}

/// Folds a 32-bit ones' complement sum to the 16-bit checksum.
#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn ipv4_checksum(h: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 plain bytes.
    let words: &[u16; 10] = unsafe { &*(h as *const Ipv4Hdr).cast() };
    let mut s = 0u32;
    let mut i = 0;
    while i < 10 {
        s += words[i] as u32;
        i += 1;
    }
    fold(s)
}

/// Sum of the `N` 32-bit words at `off` (bounds-checked once), as 16-bit ones' complement
/// words, for checksums of what lb writes. Read in place, one word at a time.
#[inline(always)]
fn sum_at<const N: usize>(ctx: &impl Bounded, off: usize) -> Option<u32> {
    let p = ptr_at::<[u32; N]>(ctx, off)?;
    let mut s = 0u32;
    let mut i = 0;
    while i < N {
        // SAFETY: bounds-checked by ptr_at (the whole array).
        let w = unsafe { (*p)[i] };
        s += (w & 0xffff) + (w >> 16);
        i += 1;
    }
    Some(s)
}

/// Answers the client with an ICMP fragmentation-needed (IPv4, only when DF is set: otherwise
/// a router would fragment, which lb does not) or packet-too-big (IPv6) carrying `mtu`, from
/// the VIP, quoting the packet's IP header and the first bytes of its payload, out of the
/// interface it came in on.
///
/// XDP quotes 8 bytes of payload. A socket buffer (tc) may carry a partial checksum whose
/// finishing the kernel still owes: it then refuses to cut the packet before the L4 checksum
/// field, and would finish that checksum — over the quote, into the quoted field — after lb
/// computed the ICMP checksum. So tc quotes 20 bytes (the whole TCP header without options) and
/// sets the quoted checksum field to the one value that finishing leaves as it is (see
/// `stable_field`): the ICMP checksum is right whether or not the kernel finishes anything.
#[inline(always)]
fn too_big(ctx: &impl Frame, pkt: &Packet, mtu: u32) -> Verdict {
    let field = if pkt.proto == PROTO_TCP { 16 } else { 6 };
    let l3 = pkt.l3_off;
    let sent = match (pkt.family == FAMILY_V4, ctx.gso_capable()) {
        (true, false) => too_big_v4::<8, { (8 + 28) / 4 }>(ctx, l3, mtu, None),
        (true, true) => too_big_v4::<20, { (8 + 40) / 4 }>(ctx, l3, mtu, Some(field)),
        (false, false) => too_big_v6::<8, { (8 + 48) / 4 }>(ctx, l3, mtu.max(IPV6_MIN_MTU), None),
        (false, true) => {
            too_big_v6::<20, { (8 + 60) / 4 }>(ctx, l3, mtu.max(IPV6_MIN_MTU), Some(field))
        }
    };
    match sent {
        Some(true) => Verdict {
            action: aya_ebpf::bindings::xdp_action::XDP_TX,
            reason: Counter::TxIcmpTooBig,
        },
        // Cannot answer (no DF, IP options): dropped, counted.
        Some(false) => Verdict::drop(Counter::DropTooBig),
        // The frame was being rebuilt when a check failed: drop what is left.
        None => Verdict::drop(Counter::DropTooBig),
    }
}

/// For the quoted L4 header of `Q` bytes at `off` whose checksum field is at `field` (0..Q):
/// writes into that field the value S that finishing a partial checksum over the quote leaves
/// unchanged. Finishing writes ~(R + S), R being the ones' complement sum of the other quoted
/// bytes; S = ~(R + S) means 2S = ~R, and doubling in ones' complement is a rotation left by
/// one bit, so S = ~R rotated right by one.
#[inline(always)]
fn stable_field<const Q4: usize>(ctx: &impl Bounded, off: usize, field: usize) -> Option<()> {
    let p = ptr_at::<u16>(ctx, off + (field & 0x1e))?;
    // SAFETY: bounds-checked by ptr_at.
    let old = unsafe { *p };
    // The other bytes: all of them, minus the field (adding its complement).
    let mut r = sum_at::<Q4>(ctx, off)? + (!old) as u32;
    r = (r & 0xffff) + (r >> 16);
    r = (r & 0xffff) + (r >> 16);
    let s = (!(r as u16)).rotate_right(1);
    // SAFETY: as above (the same field).
    unsafe { *p = s };
    Some(())
}

/// IPv4 frame of an ICMP error lb sends: Ethernet (and VLAN tags: `l3` bytes), IP (20), ICMP (8), the quoted IP header
/// (20) and `L4Q` bytes after it. `W`: 32-bit words of the ICMP message.
#[inline(always)]
fn too_big_v4<const L4Q: usize, const W: usize>(
    ctx: &impl Frame,
    l3: usize,
    mtu: u32,
    field: Option<usize>,
) -> Option<bool> {
    let quote = 20 + L4Q;
    let frame = l3 + 20 + 8 + quote;
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3)?;
    // SAFETY: bounds-checked by ptr_at.
    let (version_ihl, frag_off, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            u16::from_be((*ip).frag_off_be),
            (*ip).saddr_be,
            (*ip).daddr_be,
        )
    };
    if version_ihl != 0x45 || frag_off & IPV4_DF == 0 {
        return Some(false);
    }
    if data_end(ctx) - ctx.data() < l3 + quote {
        return Some(false);
    }
    let link = Link::save(ctx, l3)?;
    // Make room for the new IP and ICMP headers in front of the quoted IP header, and cut
    // the rest of the quote. Pointers are derived afresh afterwards.
    if !ctx.grow_head(28) || !ctx.set_len(frame as u32) {
        return None;
    }
    // Back to where it came from, with its VLAN tags.
    link.write(ctx, link.eth.src, link.eth.dst, ETH_P_IP_BE)?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3)?;
    let icmp = ptr_at::<[u8; 8]>(ctx, l3 + 20)?;
    let mut h = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len_be: ((20 + 8 + quote) as u16).to_be(),
        id_be: 0,
        frag_off_be: 0,
        ttl: LB_TTL,
        protocol: PROTO_ICMP,
        check: 0,
        saddr_be: daddr,
        daddr_be: saddr,
    };
    h.check = ipv4_checksum(&h);
    // SAFETY: both bounds-checked by ptr_at.
    unsafe {
        *ip = h;
        // Type 3 (destination unreachable), code 4 (fragmentation needed), checksum, unused,
        // next-hop MTU.
        let m = (mtu.min(0xffff) as u16).to_be_bytes();
        *icmp = [3, 4, 0, 0, 0, 0, m[0], m[1]];
    }
    if let Some(f) = field {
        stable_field::<5>(ctx, l3 + 20 + 8 + 20, f)?;
    }
    let sum = sum_at::<W>(ctx, l3 + 20)?;
    let csum = ptr_at::<u16>(ctx, l3 + 20 + 2)?;
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *csum = fold(sum) };
    Some(true)
}

/// IPv6: Ethernet, IPv6 (40), ICMPv6 (8), the quoted IPv6 header (40) and `L4Q` bytes after it.
#[inline(always)]
fn too_big_v6<const L4Q: usize, const W: usize>(
    ctx: &impl Frame,
    l3: usize,
    mtu: u32,
    field: Option<usize>,
) -> Option<bool> {
    let quote = IPV6_LEN + L4Q;
    let frame = l3 + IPV6_LEN + 8 + quote;
    if data_end(ctx) - ctx.data() < l3 + quote {
        return Some(false);
    }
    let ip = ptr_at::<Ipv6Hdr>(ctx, l3)?;
    // SAFETY: bounds-checked by ptr_at.
    let (saddr, daddr) = unsafe { ((*ip).saddr_be, (*ip).daddr_be) };
    let link = Link::save(ctx, l3)?;
    // Pointers are derived afresh afterwards.
    if !ctx.grow_head(IPV6_LEN as u32 + 8) || !ctx.set_len(frame as u32) {
        return None;
    }
    link.write(ctx, link.eth.src, link.eth.dst, ETH_P_IPV6_BE)?;
    let ip = ptr_at::<Ipv6Hdr>(ctx, l3)?;
    let icmp = ptr_at::<[u8; 8]>(ctx, l3 + IPV6_LEN)?;
    let payload = (8 + quote) as u16;
    // SAFETY: both bounds-checked by ptr_at.
    unsafe {
        *ip = Ipv6Hdr {
            vtc_flow_be: (6u32 << 28).to_be(),
            payload_len_be: payload.to_be(),
            next_header: PROTO_ICMPV6,
            hop_limit: LB_TTL,
            saddr_be: daddr,
            daddr_be: saddr,
        };
        // Type 2 (packet too big), code 0, checksum, MTU (32 bits).
        let m = mtu.to_be_bytes();
        *icmp = [2, 0, 0, 0, m[0], m[1], m[2], m[3]];
    }
    if let Some(f) = field {
        stable_field::<5>(ctx, l3 + IPV6_LEN + 8 + IPV6_LEN, f)?;
    }
    // Pseudo-header: source, destination, upper-layer length, next header.
    let mut sum = 0u32;
    let mut i = 0;
    while i < 4 {
        let (a, b) = (daddr[i], saddr[i]);
        sum += (a & 0xffff) + (a >> 16) + (b & 0xffff) + (b >> 16);
        i += 1;
    }
    sum += (payload.to_be() as u32) + ((PROTO_ICMPV6 as u16).to_be() as u32);
    sum += sum_at::<W>(ctx, l3 + IPV6_LEN)?;
    let csum = ptr_at::<u16>(ctx, l3 + IPV6_LEN + 2)?;
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *csum = fold(sum) };
    Some(true)
}
