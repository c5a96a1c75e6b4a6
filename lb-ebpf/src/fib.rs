//! Next hop: `bpf_fib_lookup` on the rewritten packet (or, towards a backend, the next-hop
//! cache that such lookups fill), then XDP_TX (same interface), XDP_REDIRECT (another
//! interface), or the kernel stack when it must help.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
};
use lb_common::{Backend, Counter, NextHop, FAMILY_V4};

use crate::{
    frame::Frame,
    headers::EthHdr,
    maps::count,
    nexthop,
    parse::{ptr_at, Packet},
    Verdict,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

// bpf_fib_lookup return codes (include/uapi/linux/bpf.h).
const FIB_SUCCESS: i64 = 0;
const FIB_BLACKHOLE: i64 = 1;
const FIB_UNREACHABLE: i64 = 2;
const FIB_PROHIBIT: i64 = 3;
const FIB_NO_NEIGH: i64 = 7;
const FIB_FRAG_NEEDED: i64 = 8;

/// `struct bpf_fib_lookup` with its unions flattened to the members we use (64 bytes).
#[repr(C)]
pub(crate) struct FibParams {
    family: u8,
    l4_protocol: u8,
    sport_be: u16,
    dport_be: u16,
    /// In: IP total length (host order), for the MTU check. Out: the MTU.
    pub tot_len: u16,
    /// In: ingress interface. Out: egress interface.
    pub ifindex: u32,
    /// IPv4 TOS or IPv6 flow label (network order).
    tos_or_flow: u32,
    src_be: [u32; 4],
    /// In: destination. Out: the next hop's address (the gateway, if the route has one).
    pub dst_be: [u32; 4],
    vlan_or_tbid: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// What the route lookup said.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Next hop known: MACs and egress interface in the params.
    Ok,
    /// The next hop's MAC is not known yet.
    NoNeigh,
    /// Blackhole, unreachable or prohibit.
    Unreachable,
    /// The packet (of the length given) exceeds the egress MTU, which is in `tot_len`.
    FragNeeded,
    /// Anything else the kernel must handle (local destination, forwarding disabled, …).
    Other,
}

/// Looks up the route of a packet from `src` to `dst` of `tot_len` bytes (IP total length).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn lookup(
    ctx: &impl Frame,
    family: u8,
    proto: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    tot_len: u16,
    tos_or_flow: u32,
) -> (Route, FibParams) {
    let mut p = FibParams {
        family: if family == FAMILY_V4 {
            AF_INET
        } else {
            AF_INET6
        },
        l4_protocol: proto,
        sport_be: sport,
        dport_be: dport,
        tot_len,
        ifindex: ctx.ingress_ifindex(),
        tos_or_flow,
        src_be: *src,
        dst_be: *dst,
        vlan_or_tbid: 0,
        smac: [0; 6],
        dmac: [0; 6],
    };
    // SAFETY: `p` is a valid, writable `struct bpf_fib_lookup` of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            (&mut p as *mut FibParams).cast(),
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    let r = match rc {
        FIB_SUCCESS => Route::Ok,
        FIB_NO_NEIGH => Route::NoNeigh,
        FIB_BLACKHOLE | FIB_UNREACHABLE | FIB_PROHIBIT => Route::Unreachable,
        FIB_FRAG_NEEDED => Route::FragNeeded,
        _ => Route::Other,
    };
    (r, p)
}

/// Writes the next hop's MACs into the Ethernet header and sends the frame out of the
/// looked-up interface.
#[inline(always)]
pub(crate) fn send(ctx: &impl Frame, p: &FibParams) -> Verdict {
    send_to(ctx, &p.dmac, &p.smac, p.ifindex)
}
const _: () = assert!(core::mem::size_of::<FibParams>() == 64);

/// Sends the rewritten packet with a cached next hop (counted: `nexthop_cached`): MACs from
/// the cache, then XDP_TX or XDP_REDIRECT as a route lookup would have decided.
#[inline(always)]
pub(crate) fn send_cached(ctx: &impl Frame, nh: &NextHop) -> Verdict {
    count(Counter::NextHopCached);
    send_to(ctx, &nh.dmac, &nh.smac, nh.ifindex)
}

/// Writes the MACs into the Ethernet header and sends the frame out of `ifindex`.
///
/// A VLAN-tagged frame keeps its tags: it goes back out of the interface it came in on, in its
/// VLAN (XDP_TX). A route out of another interface — a VLAN device, whose tag XDP cannot put
/// on, or another NIC, whose VLANs lb does not know — hands the (rewritten) packet to the
/// kernel, which forwards it (`pass_fib_other`).
#[inline(always)]
fn send_to(ctx: &impl Frame, dmac: &[u8; 6], smac: &[u8; 6], ifindex: u32) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::pass(Counter::PassMalformedEth);
    };
    let ingress = ctx.ingress_ifindex();
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        let ty = (*eth).ether_type_be;
        let tagged = ty == ETH_P_8021Q_BE || ty == ETH_P_8021AD_BE || ctx.vlan_tag_aside();
        if ifindex != ingress && tagged {
            return Verdict::pass(Counter::PassFibOther);
        }
        (*eth).dst = *dmac;
        (*eth).src = *smac;
    }
    egress(ingress, ifindex)
}

const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
const ETH_P_8021AD_BE: u16 = 0x88a8u16.to_be();

#[inline(always)]
pub(crate) fn egress(ingress: u32, ifindex: u32) -> Verdict {
    if ifindex == ingress {
        Verdict {
            action: xdp_action::XDP_TX,
            reason: Counter::Tx,
        }
    } else {
        // SAFETY: plain helper call.
        let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
        Verdict {
            action,
            reason: Counter::Redirect,
        }
    }
}

/// Sends the packet, rewritten to backend `id` (NAT), with its cached next hop, or looks the
/// route up (and caches what it says).
#[inline(always)]
pub(crate) fn to_backend(
    ctx: &impl Frame,
    pkt: &Packet,
    id: u32,
    backend: &Backend,
    now: u64,
) -> Verdict {
    if let Some(nh) = nexthop::cached(id, backend, now, pkt.mtu_len()) {
        return send_cached(ctx, nh);
    }
    let (r, p) = lookup(
        ctx,
        pkt.family,
        pkt.proto,
        &pkt.src,
        &backend.addr_be,
        pkt.sport,
        backend.port_be,
        pkt.mtu_len(),
        pkt.tos_or_flow,
    );
    nexthop::record(id, backend, now, pkt.mtu_len(), r, &p);
    send_as_routed(ctx, r, &p)
}

/// Routes the already rewritten packet whose addresses and ports are now `src`/`dst`.
#[inline(always)]
pub(crate) fn forward(
    ctx: &impl Frame,
    pkt: &Packet,
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
) -> Verdict {
    let (r, p) = lookup(
        ctx,
        pkt.family,
        pkt.proto,
        src,
        dst,
        sport,
        dport,
        pkt.mtu_len(),
        pkt.tos_or_flow,
    );
    send_as_routed(ctx, r, &p)
}

/// Sends a rewritten packet the way its route lookup said (NAT: the kernel gets what it
/// must resolve or handle).
#[inline(always)]
fn send_as_routed(ctx: &impl Frame, r: Route, p: &FibParams) -> Verdict {
    match r {
        Route::Ok => send(ctx, p),
        Route::NoNeigh => Verdict::pass(Counter::PassNoNeigh),
        Route::Unreachable => Verdict::drop(Counter::DropFibUnreachable),
        Route::FragNeeded | Route::Other => Verdict::pass(Counter::PassFibOther),
    }
}
