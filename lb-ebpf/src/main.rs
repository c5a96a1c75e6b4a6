//! The lb XDP program: match packets addressed to a VIP, pick a backend (conntrack first, else
//! the VIP's selection table), rewrite the destination (NAT) and send the packet on; rewrite
//! backends' replies back to the VIP. Everything else passes untouched.
//!
//! Shape (after Katran's balancer): every step returns a `Verdict` — an XDP action and the one
//! counter that explains it — and the entry point counts it in a single place. No logging on
//! the per-packet path; every helper is `#[inline(always)]`.
#![no_std]
#![no_main]
// Atomic fetch-add / fetch-or on map values (BPF_ATOMIC); core's Atomic types have no RMW
// methods on the bpf target.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod dsr;
// The shared header layouts, as `crate::headers` for the modules below.
pub(crate) use lb_ebpf::headers;
mod fib;
mod icmp;
mod maps;
mod nat;
mod parse;

use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use core::intrinsics::{atomic_or, atomic_xadd, AtomicOrdering};

use lb_common::{
    hash::{flow_hash, source_hash},
    Backend, Counter, CtEntry, FlowKey, Handoff, RevNat, VipInfo, ALGO_LEAST_CONN, ALGO_RANDOM,
    ALGO_ROUND_ROBIN, ALGO_SOURCE_HASH, CT_F_CLOSED, FWD_DSR_L2, FWD_IPIP, NEXTHOP_F_VALID,
    NO_BACKEND, PORT_F_BACKEND, PORT_F_VIP, PROG_ICMP, PROG_IPIP, VIP_F_STATELESS_REVERSE,
};

use crate::{
    maps::{
        count, ACTIVE, BACKENDS, BACKEND_STATS, CONNTRACK, HANDOFF, NEXTHOP, PORTS, PROGS, REVNAT,
        RR_POS, TABLE, VIPS, VIP_STATS,
    },
    nat::Side,
    parse::Packet,
};

/// What happens to a packet, and the counter that says why.
pub(crate) struct Verdict {
    pub action: u32,
    pub reason: Counter,
}

impl Verdict {
    #[inline(always)]
    pub(crate) const fn pass(reason: Counter) -> Self {
        Verdict {
            action: xdp_action::XDP_PASS,
            reason,
        }
    }

    #[inline(always)]
    pub(crate) const fn drop(reason: Counter) -> Self {
        Verdict {
            action: xdp_action::XDP_DROP,
            reason,
        }
    }
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let v = process(&ctx);
    count(v.reason);
    v.action
}

/// Tail-called by `lb_xdp` for an ipip VIP, with the backend and flow hash in `HANDOFF`:
/// encapsulates and sends (or answers too-big). Its own program, so its own stack.
#[xdp]
pub fn lb_ipip(ctx: XdpContext) -> u32 {
    let v = ipip_handoff(&ctx);
    count(v.reason);
    v.action
}

/// Tail-called by `lb_xdp` for ICMP/ICMPv6: routes too-big errors about VIP flows to their
/// backends, passes everything else.
#[xdp]
pub fn lb_icmp(ctx: XdpContext) -> u32 {
    let v = icmp_error(&ctx).unwrap_or(Verdict::pass(Counter::PassNotTcpUdp));
    count(v.reason);
    v.action
}

#[inline(always)]
fn ipip_handoff(ctx: &XdpContext) -> Verdict {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(v) => return v,
    };
    let Some(h) = HANDOFF.get(0).copied() else {
        return Verdict::drop(Counter::DropNoProgram);
    };
    let Some(backend) = BACKENDS.get(h.backend_id).copied() else {
        return Verdict::drop(Counter::DropNoBackend);
    };
    dsr::ipip(ctx, &pkt, &backend, h.hash)
}

/// Tail-calls program `slot`; returns only if that fails.
#[inline(always)]
fn tail_call(ctx: &XdpContext, slot: u32) {
    // SAFETY: on success the call does not return; on failure nothing happened.
    unsafe { PROGS.tail_call(ctx, slot) };
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Verdict {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(v) if matches!(v.reason, Counter::PassNotTcpUdp) => {
            // ICMP errors about VIP flows are handled by lb_icmp; if that is missing, pass.
            if parse::is_icmp(ctx) {
                tail_call(ctx, PROG_ICMP);
            }
            return v;
        }
        Err(v) => return v,
    };
    // A port filter first: two array reads spare traffic not for lb two hash lookups.
    let dport_flags = PORTS
        .get(u16::from_be(pkt.dport) as u32)
        .copied()
        .unwrap_or(0);
    if dport_flags & PORT_F_VIP != 0 {
        let vip_key = pkt.dst_endpoint();
        // SAFETY: the value is copied out at once; a concurrent update replaces it whole.
        if let Some(vip) = unsafe { VIPS.get(vip_key) } {
            let vip = *vip;
            return forward(ctx, &pkt, &vip);
        }
    }
    let sport_flags = PORTS
        .get(u16::from_be(pkt.sport) as u32)
        .copied()
        .unwrap_or(0);
    if sport_flags & PORT_F_BACKEND != 0 {
        let backend_key = pkt.src_endpoint();
        // SAFETY: as above.
        if let Some(rev) = unsafe { REVNAT.get(backend_key) } {
            let rev = *rev;
            if is_reply(ctx, &pkt, &rev) {
                return reverse(ctx, &pkt, &rev);
            }
        }
    }
    Verdict::pass(Counter::PassNotVip)
}

/// Whether a packet from a backend's service endpoint answers a flow that lb forwarded to that
/// backend: conntrack holds the client → VIP flow, pinned to this backend. Anything else from
/// the backend — e.g. a client that talks to the backend's address directly through the
/// gateway — is not lb's to rewrite.
#[inline(always)]
fn is_reply(ctx: &XdpContext, pkt: &Packet, rev: &RevNat) -> bool {
    let flow = FlowKey {
        src_be: pkt.dst,
        dst_be: rev.vip.addr_be,
        sport_be: pkt.dport,
        dport_be: rev.vip.port_be,
        proto: pkt.proto,
        family: pkt.family,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(ct) = (unsafe { CONNTRACK.get(flow) }).copied() else {
        return stateless_reply(ctx, pkt, &flow, rev);
    };
    if ct.backend_id != rev.backend_id {
        // Stale here (the flow was re-selected on another gateway): the table decides.
        return stateless_reply(ctx, pkt, &flow, rev);
    }
    if closes(pkt.tcp_flags) && ct.flags & CT_F_CLOSED == 0 {
        mark_closed(&flow, ct.backend_id);
    }
    true
}

/// A reply this gateway has no conntrack entry for (several gateways behind ECMP: the client's
/// packets went through another one). For a VIP with `VIP_F_STATELESS_REVERSE` whose algorithm
/// is a pure function of the packet (maglev, source-hash), the reply is the VIP's if the VIP's
/// table gives this flow to this backend — what every gateway with the same configuration
/// computes — and it is not addressed to this gateway itself (its health checks talk to the
/// backends directly, from addresses the table may well give to that backend).
#[inline(always)]
fn stateless_reply(ctx: &XdpContext, pkt: &Packet, flow: &FlowKey, rev: &RevNat) -> bool {
    // SAFETY: copied out at once.
    let Some(vip) = (unsafe { VIPS.get(rev.vip) }).copied() else {
        return false;
    };
    if vip.flags & VIP_F_STATELESS_REVERSE == 0 || vip.table_size == 0 {
        return false;
    }
    let index = match vip.algo {
        ALGO_SOURCE_HASH => {
            source_hash(&flow.src_be, flow.family, vip.src_prefix_len) % vip.table_size
        }
        lb_common::ALGO_MAGLEV => flow_hash(flow) % vip.table_size,
        _ => return false,
    };
    if !TABLE
        .get(vip.table_off.wrapping_add(index))
        .is_some_and(|id| *id == rev.backend_id)
    {
        return false;
    }
    let (route, _) = fib::lookup(
        ctx,
        pkt.family,
        pkt.proto,
        &pkt.src,
        &pkt.dst,
        pkt.sport,
        pkt.dport,
        pkt.ip_len,
        pkt.tos_or_flow,
    );
    // Local destinations come back as "not forwarded" (Other); everything else is on its way
    // somewhere else and the forward path handles it.
    !matches!(route, fib::Route::Other)
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
fn is_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
fn closes(flags: u8) -> bool {
    flags & (TCP_FIN | TCP_RST) != 0
}

/// Marks a flow closed and takes it off its backend's active count — once, even when both
/// directions' FINs race on two CPUs (the flag is set with an atomic fetch-or).
#[inline(always)]
fn mark_closed(flow: &FlowKey, backend_id: u32) {
    if let Some(p) = CONNTRACK.get_ptr_mut(*flow) {
        // SAFETY: the LRU value is live while we hold the RCU read side (the program run);
        // u32 fields are naturally aligned.
        let before = unsafe {
            atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(
                core::ptr::addr_of_mut!((*p).flags),
                CT_F_CLOSED,
            )
        };
        if before & CT_F_CLOSED == 0 {
            active_add(backend_id, u64::MAX); // −1
        }
    }
}

/// Adds `delta` (wrapping: u64::MAX is −1) to a backend's active-flow count.
#[inline(always)]
fn active_add(id: u32, delta: u64) {
    if let Some(p) = ACTIVE.get_ptr_mut(id) {
        // SAFETY: array values are live and 8-byte aligned.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta) };
    }
}

/// The less loaded of the backends in two random slots: active flows / weight, compared by
/// cross-multiplying (the "power of two choices": near least-connections at O(1) cost).
#[inline(always)]
fn select_least_conn(vip: &VipInfo) -> Option<(u32, Backend)> {
    // SAFETY: plain helper calls.
    let (r1, r2) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    let id1 = *TABLE.get(vip.table_off.wrapping_add(r1 % vip.table_size))?;
    // A second candidate that is another backend where possible: up to 4 more slots, spread
    // over the table (the same backend twice would be no choice at all).
    let mut s2 = r2 % vip.table_size;
    let mut id2 = *TABLE.get(vip.table_off.wrapping_add(s2))?;
    let stride = vip.table_size / 5 + 1;
    let mut k = 0;
    while k < 4 && id2 == id1 {
        s2 = (s2 + stride) % vip.table_size;
        id2 = *TABLE.get(vip.table_off.wrapping_add(s2))?;
        k += 1;
    }
    let b1 = usable_backend(id1, vip.vip_id)?;
    let Some(b2) = usable_backend(id2, vip.vip_id) else {
        return Some((id1, b1));
    };
    let a1 = ACTIVE.get(id1).copied().unwrap_or(0);
    let a2 = ACTIVE.get(id2).copied().unwrap_or(0);
    if a1 * b2.weight as u64 <= a2 * b1.weight as u64 {
        Some((id1, b1))
    } else {
        Some((id2, b2))
    }
}

/// Backend → client: rewrite the source back to the VIP, forward.
#[inline(always)]
fn reverse(ctx: &XdpContext, pkt: &Packet, rev: &RevNat) -> Verdict {
    count(Counter::RevNat);
    add_traffic(&VIP_STATS, rev.vip_id, pkt.frame_len, false, true);
    add_traffic(&BACKEND_STATS, rev.backend_id, pkt.frame_len, false, true);
    if !nat::rewrite(ctx, pkt, Side::Src, &rev.vip.addr_be, rev.vip.port_be) {
        return Verdict::pass(Counter::PassMalformedL4);
    }
    fib::forward(
        ctx,
        pkt,
        &rev.vip.addr_be,
        &pkt.dst,
        rev.vip.port_be,
        pkt.dport,
    )
}

/// Client → VIP: find the flow's backend, rewrite the destination to it, forward.
#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet, vip: &VipInfo) -> Verdict {
    let flow = FlowKey {
        src_be: pkt.src,
        dst_be: pkt.dst,
        sport_be: pkt.sport,
        dport_be: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: 0,
    };
    let mut chosen: Option<(u32, Backend)> = None;
    // SAFETY: copied out at once.
    if let Some(ct) = unsafe { CONNTRACK.get(flow) } {
        let ct = *ct;
        // A SYN on a closed flow's 5-tuple is a new connection (port reuse): select afresh.
        let reopened = ct.flags & CT_F_CLOSED != 0 && is_syn(pkt.tcp_flags);
        if !reopened {
            match tracked_backend(&ct, vip.vip_id) {
                Some(b) => {
                    count(Counter::CtHit);
                    if closes(pkt.tcp_flags) && ct.flags & CT_F_CLOSED == 0 {
                        mark_closed(&flow, ct.backend_id);
                    }
                    chosen = Some((ct.backend_id, b));
                }
                _ => count(Counter::CtStale),
            }
        }
    }
    let (id, backend) = match chosen {
        Some(c) => c,
        None => {
            let Some((id, b)) = select(vip, &flow) else {
                return Verdict::drop(Counter::DropNoBackend);
            };
            let entry = CtEntry {
                backend_id: id,
                generation: b.generation,
                flags: 0,
            };
            if CONNTRACK.insert(flow, entry, 0).is_err() {
                count(Counter::CtInsertFailed);
            }
            active_add(id, 1);
            count(Counter::CtMiss);
            (id, b)
        }
    };
    let new_flow = chosen.is_none();
    add_traffic(&VIP_STATS, vip.vip_id, pkt.frame_len, new_flow, false);
    add_traffic(&BACKEND_STATS, id, pkt.frame_len, new_flow, false);
    send_to_backend(ctx, pkt, vip, id, &backend, &flow)
}

/// Sends a packet for a VIP to backend `id` the VIP's way: NAT, dsr-l2 or ipip.
#[inline(always)]
fn send_to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &VipInfo,
    id: u32,
    backend: &Backend,
    flow: &FlowKey,
) -> Verdict {
    match vip.fwd {
        FWD_DSR_L2 => {
            count(Counter::FwdDsrL2);
            return dsr::dsr_l2(ctx, pkt, backend);
        }
        FWD_IPIP => {
            count(Counter::FwdIpip);
            if let Some(h) = HANDOFF.get_ptr_mut(0) {
                // SAFETY: per-CPU slot, read by the program tail-called next on this CPU.
                unsafe {
                    *h = Handoff {
                        backend_id: id,
                        hash: flow_hash(flow),
                    }
                };
            }
            tail_call(ctx, PROG_IPIP);
            return Verdict::drop(Counter::DropNoProgram);
        }
        _ => count(Counter::FwdNat),
    }
    if !nat::rewrite(ctx, pkt, Side::Dst, &backend.addr_be, backend.port_be) {
        return Verdict::pass(Counter::PassMalformedL4);
    }
    if let Some(nh) = NEXTHOP.get(id) {
        if nh.flags & NEXTHOP_F_VALID != 0 && nh.generation == backend.generation {
            count(Counter::NextHopCached);
            return fib::send_cached(ctx, nh);
        }
    }
    fib::forward(
        ctx,
        pkt,
        &pkt.src,
        &backend.addr_be,
        pkt.sport,
        backend.port_be,
    )
}

/// An ICMP too-big about a VIP flow: to the flow's backend (conntrack, else the VIP's
/// selection), in the VIP's forwarding mode. None: not one (the caller passes the packet).
#[inline(always)]
fn icmp_error(ctx: &XdpContext) -> Option<Verdict> {
    let m = icmp::parse(ctx)?;
    // SAFETY: copied out at once.
    let vip = unsafe { VIPS.get(m.vip) }.copied()?;
    // SAFETY: copied out at once.
    let from_ct = unsafe { CONNTRACK.get(m.flow) }
        .copied()
        .and_then(|ct| Some((ct.backend_id, tracked_backend(&ct, vip.vip_id)?)));
    let (_, backend) = match from_ct {
        Some(c) => c,
        None => select(&vip, &m.flow)?,
    };
    count(Counter::IcmpToBackend);
    if vip.fwd == FWD_DSR_L2 {
        count(Counter::FwdDsrL2);
        return Some(dsr::dsr_l2(ctx, &m.outer, &backend));
    }
    if vip.fwd == FWD_IPIP {
        count(Counter::FwdIpip);
        return Some(dsr::ipip_quiet(ctx, &m.outer, &backend, flow_hash(&m.flow)));
    }
    count(Counter::FwdNat);
    if !icmp::nat_rewrite(ctx, &m, &backend.addr_be, backend.port_be) {
        return Some(Verdict::pass(Counter::PassMalformedL4));
    }
    Some(fib::forward(
        ctx,
        &m.outer,
        &m.outer.src,
        &backend.addr_be,
        0,
        0,
    ))
}

/// The backend the VIP's algorithm gives a new flow, if usable.
#[inline(always)]
fn select(vip: &VipInfo, flow: &FlowKey) -> Option<(u32, Backend)> {
    if vip.table_size == 0 {
        return None;
    }
    let index = match vip.algo {
        ALGO_LEAST_CONN => return select_least_conn(vip),
        // SAFETY: plain helper call.
        ALGO_RANDOM => (unsafe { bpf_get_prandom_u32() }) % vip.table_size,
        ALGO_SOURCE_HASH => {
            source_hash(&flow.src_be, flow.family, vip.src_prefix_len) % vip.table_size
        }
        ALGO_ROUND_ROBIN => {
            if vip.seq_len == 0 || vip.seq_len > vip.table_size {
                return None;
            }
            let pos = RR_POS.get_ptr_mut(vip.vip_id)?;
            // SAFETY: per-CPU slot; nothing else on this CPU runs concurrently with us.
            unsafe {
                let p = *pos % vip.seq_len;
                *pos = p + 1;
                p
            }
        }
        _ => flow_hash(flow) % vip.table_size,
    };
    let slot = vip.table_off.wrapping_add(index);
    let id = *TABLE.get(slot)?;
    if id == NO_BACKEND {
        return None;
    }
    usable_backend(id, vip.vip_id).map(|b| (id, b))
}

/// The backend a conntrack entry names, if it is still that backend (same generation) and
/// still one of VIP `vip_id`'s.
#[inline(always)]
fn tracked_backend(ct: &CtEntry, vip_id: u32) -> Option<Backend> {
    usable_backend(ct.backend_id, vip_id).filter(|b| b.generation == ct.generation)
}

/// A copy of backend `id` if it is in use and belongs to VIP `vip_id`.
#[inline(always)]
fn usable_backend(id: u32, vip_id: u32) -> Option<Backend> {
    let b = *BACKENDS.get(id)?;
    if b.is_valid() && b.vip_id == vip_id {
        Some(b)
    } else {
        None
    }
}

#[inline(always)]
fn add_traffic<const N: usize>(
    map: &aya_ebpf::btf_maps::PerCpuArray<lb_common::TrafficStats, N>,
    index: u32,
    len: u64,
    new_flow: bool,
    reverse: bool,
) {
    if let Some(s) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently with us.
        let s = unsafe { &mut *s };
        if reverse {
            s.rev_packets += 1;
            s.rev_bytes += len;
        } else {
            s.packets += 1;
            s.bytes += len;
            if new_flow {
                s.new_flows += 1;
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
