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
mod frame;
// The shared header layouts, as `crate::headers` for the modules below.
pub(crate) use lb_ebpf::headers;
mod fib;
mod flow;
mod icmp;
mod maps;
mod nat;
mod nexthop;
mod parse;

use aya_ebpf::helpers::{bpf_get_prandom_u32, generated::bpf_skb_pull_data};
use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    hash::{encap_hash, flow_hash, source_hash},
    Backend, Counter, CtEntry, FlowKey, Handoff, RevNat, RevNatEntry, VipInfo, ALGO_LEAST_CONN,
    ALGO_MAGLEV, ALGO_RANDOM, ALGO_ROUND_ROBIN, ALGO_SOURCE_HASH, CT_F_DIRECT, FAMILY_V4,
    FWD_DSR_L2, FWD_IPIP, FWD_NAT, MAX_VIPS_PER_BACKEND, NO_BACKEND, PORT_F_BACKEND, PORT_F_VIP,
    PROG_ICMP, PROG_IPIP, PROTO_TCP, VIP_F_STATELESS_REVERSE,
};

use crate::{
    flow::Dir,
    frame::{Bounded, Frame, Xdp},
    maps::{
        count, ACTIVE, BACKENDS, BACKEND_STATS, CONNTRACK, CT_NEW, HANDOFF, PORTS, REVNAT, RR_POS,
        TABLE, VIPS, VIP_ADDRS, VIP_BY_ID, VIP_IPS, VIP_STATS,
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

// Two sets of XDP programs, the same code (`frame::Xdp`): multi-buffer ones for native mode
// (`xdp.frags`: they attach to interfaces whose MTU needs several buffers a frame — jumbo
// frames), single-buffer ones for generic mode (where this kernel mishandles multi-buffer
// programs: see `frame::Xdp`).

// Inlined into the entry point the macro generates: as a function of its own it would cost
// every packet a BPF-to-BPF call (with the tail-call bookkeeping that goes with it).
#[xdp(frags)]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let ctx = Xdp::<true>(ctx);
    let v = process(&ctx);
    count(v.reason);
    v.action
}

/// Tail-called by `lb_xdp` for an ipip VIP, with the backend and flow hash in `HANDOFF`:
/// encapsulates and sends (or answers too-big). Its own program, so its own stack.
#[xdp(frags)]
pub fn lb_ipip(ctx: XdpContext) -> u32 {
    let v = ipip_handoff(&Xdp::<true>(ctx));
    count(v.reason);
    v.action
}

/// Tail-called by `lb_xdp` for ICMP/ICMPv6: routes too-big errors about VIP flows to their
/// backends, drops the rest of what is addressed to a VIP's address, passes everything else.
#[xdp(frags)]
pub fn lb_icmp(ctx: XdpContext) -> u32 {
    let v = icmp_verdict(&Xdp::<true>(ctx));
    count(v.reason);
    v.action
}

/// `lb_xdp` for generic mode (single-buffer).
#[xdp]
#[inline(always)]
pub fn lb_xdp_generic(ctx: XdpContext) -> u32 {
    let ctx = Xdp::<false>(ctx);
    let v = process(&ctx);
    count(v.reason);
    v.action
}

/// `lb_ipip` for `lb_xdp_generic`.
#[xdp]
pub fn lb_ipip_generic(ctx: XdpContext) -> u32 {
    let v = ipip_handoff(&Xdp::<false>(ctx));
    count(v.reason);
    v.action
}

/// `lb_icmp` for `lb_xdp_generic`.
#[xdp]
pub fn lb_icmp_generic(ctx: XdpContext) -> u32 {
    let v = icmp_verdict(&Xdp::<false>(ctx));
    count(v.reason);
    v.action
}

// The same data plane as a tc ingress program, for devices where XDP cannot be trusted with
// checksums (generic mode) or is not available: see `frame.rs`.

/// The headers lb reads at most (Ethernet, two VLAN tags, IPv4 with options, TCP): pulled into
/// the linear part of a socket buffer that does not have them there.
const TC_HEADERS: u32 = 14 + 8 + 60 + 20;
/// An ICMP error's: Ethernet, two VLAN tags, IPv6, ICMPv6, the quoted IPv6 header and 8 bytes
/// (more than IPv4's: `icmp::parse` takes only option-less IPv4 headers, outer and quoted).
const TC_ICMP_HEADERS: u32 = 14 + 8 + 40 + 8 + 40 + 8;

/// Makes the first `want` bytes of the packet (or all of it, if shorter) directly accessible.
#[inline(always)]
fn tc_pull(ctx: &TcContext, want: u32) {
    let want = want.min(ctx.packet_len() as u32);
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // SAFETY: plain helper call; packet pointers are derived afterwards.
        unsafe { bpf_skb_pull_data(ctx.skb.skb, want) };
    }
}

#[classifier]
#[inline(always)]
pub fn lb_tc(ctx: TcContext) -> i32 {
    tc_pull(&ctx, TC_HEADERS);
    let v = process(&ctx);
    count(v.reason);
    ctx.action(v.action) as i32
}

/// `lb_ipip` for `lb_tc`.
#[classifier]
pub fn lb_tc_ipip(ctx: TcContext) -> i32 {
    let v = ipip_handoff(&ctx);
    count(v.reason);
    ctx.action(v.action) as i32
}

/// `lb_icmp` for `lb_tc`.
#[classifier]
pub fn lb_tc_icmp(ctx: TcContext) -> i32 {
    tc_pull(&ctx, TC_ICMP_HEADERS);
    let v = icmp_verdict(&ctx);
    count(v.reason);
    ctx.action(v.action) as i32
}

#[inline(always)]
fn ipip_handoff(ctx: &impl Frame) -> Verdict {
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
    dsr::ipip(ctx, &pkt, h.backend_id, &backend, h.hash)
}

/// Tail-calls program `slot`; returns only if that fails.
#[inline(always)]
fn tail_call(ctx: &impl Frame, slot: u32) {
    ctx.tail_call(slot);
}

/// An ICMP packet: an error about a VIP flow goes to its backend; anything else to a VIP
/// address is dropped (`unclaimed`); the rest is passed.
#[inline(always)]
fn icmp_verdict(ctx: &impl Frame) -> Verdict {
    icmp_error(ctx).unwrap_or_else(|| unclaimed_or(ctx, Verdict::pass(Counter::PassNotTcpUdp)))
}

/// Whether `dst` is some VIP's address (`VIP_IPS`; the low-bits hint first, so that traffic
/// to other addresses rarely pays the hash lookup).
#[inline(always)]
fn is_vip_address(family: u8, dst: &[u32; 4]) -> bool {
    if !VIP_ADDRS
        .get(lb_common::vip_addr_slot(family, dst))
        .is_some_and(|h| *h != 0)
    {
        return false;
    }
    let key = lb_common::Endpoint {
        addr_be: *dst,
        port_be: 0,
        proto: 0,
        family,
    };
    // SAFETY: only whether it is there.
    unsafe { VIP_IPS.get(key) }.is_some()
}

/// `v` (a pass), or a drop if the packet is addressed to a VIP's address: lb claims nothing
/// of it, and passed to the kernel it would be routed back where it came from — on a
/// gateway, to the router that sends it here (README, "Several gateways").
#[inline(always)]
fn unclaimed_or(ctx: &impl Frame, v: Verdict) -> Verdict {
    match parse::destination(ctx) {
        Some((family, dst)) if is_vip_address(family, &dst) => {
            Verdict::drop(Counter::DropVipUnclaimed)
        }
        _ => v,
    }
}

#[inline(always)]
fn process(ctx: &impl Frame) -> Verdict {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(v) if matches!(v.reason, Counter::PassNotTcpUdp) => {
            // ICMP errors about VIP flows are handled by lb_icmp; if that is missing, pass.
            if parse::is_icmp(ctx) {
                tail_call(ctx, PROG_ICMP);
                return v;
            }
            return unclaimed_or(ctx, v);
        }
        Err(v)
            if matches!(
                v.reason,
                Counter::PassFragment | Counter::PassIpv6Ext | Counter::PassMalformedL4
            ) =>
        {
            return unclaimed_or(ctx, v);
        }
        Err(v) => return v,
    };
    // A port filter first: two array reads spare traffic not for lb two hash lookups.
    let dport_flags = PORTS
        .get(u16::from_be(pkt.dport) as u32)
        .copied()
        .unwrap_or(0);
    if dport_flags & PORT_F_VIP != 0 {
        // To an address that likely is a VIP's: conntrack first — a confirmed flow's entry
        // names its backend, and so its VIP, which the mirror by id gives without the hash
        // lookup in `VIPS`. Otherwise `VIPS` first, so that traffic to a VIP's port on another
        // address is not looked up in conntrack at all. (The hint only orders the lookups.)
        let flow = &pkt.flow_key();
        let likely_vip = VIP_ADDRS
            .get(lb_common::vip_addr_slot(pkt.family, &pkt.dst))
            .is_some_and(|h| *h != 0);
        let mut ct = None;
        let mut found = None;
        if likely_vip {
            ct = CONNTRACK.get_ptr_mut(flow);
            found = ct.and_then(|p| vip_of_flow(&pkt, p)).map(|v| (v, true));
        }
        if found.is_none() {
            let vip_key = pkt.dst_endpoint();
            // SAFETY: copied out at once; a concurrent update replaces it whole.
            found = unsafe { VIPS.get(vip_key) }.map(|v| (*v, false));
            if found.is_some() && !likely_vip {
                ct = CONNTRACK.get_ptr_mut(flow);
            }
        }
        // One call site: `forward` is inlined once. None: the mirror named a VIP that is gone
        // (the packet is then looked at as one not for a VIP, below).
        if let Some((vip, mirrored)) = found {
            if let Some(v) = forward(ctx, &pkt, &vip, flow, ct, mirrored) {
                return v;
            }
        }
    }
    let sport_flags = PORTS
        .get(u16::from_be(pkt.sport) as u32)
        .copied()
        .unwrap_or(0);
    if sport_flags & PORT_F_BACKEND != 0 {
        let backend_key = pkt.src_endpoint();
        if let Some(rev) = REVNAT.get_ptr(backend_key) {
            // From a backend's service endpoint with no hop left: not forwarded, and it
            // changes no flow state either.
            if pkt.ttl <= 1 {
                return Verdict::pass(Counter::PassTtlExceeded);
            }
            if let Some(r) = reply_of(ctx, &pkt, rev) {
                return reverse(ctx, &pkt, &r);
            }
        }
    }
    if is_vip_address(pkt.family, &pkt.dst) {
        return Verdict::drop(Counter::DropVipUnclaimed);
    }
    Verdict::pass(Counter::PassNotVip)
}

/// Which of the VIPs a backend endpoint serves (`rev`) a packet from it answers, if any: the
/// first whose client → VIP flow is in conntrack (confirmed or not) for this backend; else,
/// for a backend of one VIP, its membership (`stateless_reply`). Anything else from the
/// backend — e.g. a client that talks to the backend's address directly through the gateway —
/// is not lb's to rewrite. Applies the reply to the flow's state.
#[inline(always)]
fn reply_of(ctx: &impl Frame, pkt: &Packet, rev: *const RevNat) -> Option<RevNatEntry> {
    let now = flow::now_ns();
    // SAFETY: the map value is live for the program run; fields are copied out.
    let n = unsafe { (*rev).count } as usize;
    let mut elsewhere = false;
    let mut i = 0;
    while i < MAX_VIPS_PER_BACKEND {
        if i >= n {
            break;
        }
        // SAFETY: as above; i is below the array length.
        let r = unsafe { (*rev).vips[i] };
        let key = pkt.reply_flow_key(&r.vip);
        match tracked_reply(ctx, pkt, &key, &r, now) {
            Tracked::Reply => return Some(r),
            Tracked::Elsewhere => elsewhere = true,
            Tracked::Untracked => {}
        }
        i += 1;
    }
    // The table decides only for a flow without an entry.
    if n == 1 && !elsewhere {
        // SAFETY: as above.
        let r = unsafe { (*rev).vips[0] };
        if stateless_reply(ctx, pkt, &r, now) {
            count(Counter::RevStateless);
            return Some(r);
        }
    }
    None
}

/// What conntrack says of a packet from a backend about a flow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tracked {
    /// A reply: the flow's live entry names this backend (its state was updated).
    Reply,
    /// The flow has an unexpired entry, for another backend or a VIP without NAT: not a
    /// reply (an entry of a removed backend counts until the sweep removes it).
    Elsewhere,
    /// No live entry.
    Untracked,
}

/// Whether a packet from a backend is a reply of a flow in conntrack for this backend;
/// applies a reply to the flow's state.
#[inline(always)]
fn tracked_reply(
    ctx: &impl Frame,
    pkt: &Packet,
    key: &FlowKey,
    r: &RevNatEntry,
    now: u64,
) -> Tracked {
    // The backend's generation: an entry made for an earlier holder of the id is stale.
    let generation = match BACKENDS.get(r.backend_id) {
        Some(b) if b.is_valid() => b.generation,
        _ => return Tracked::Untracked,
    };
    let mut elsewhere = false;
    if let Some(p) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: live map value, copied.
        let e = unsafe { *p };
        let live = !flow::expired(&e, now, &flow::timeouts(r.vip_id));
        if e.backend_id == r.backend_id {
            // A dsr-l2 / ipip flow: its backend answers from the VIP, not through here.
            if e.flags & CT_F_DIRECT != 0 {
                return if live {
                    Tracked::Elsewhere
                } else {
                    Tracked::Untracked
                };
            }
            if e.generation != generation {
                count(Counter::CtStale);
                flow::forget(p);
                let _ = CONNTRACK.remove(key);
                return Tracked::Untracked;
            }
            if !live {
                count(Counter::CtExpired);
                flow::drop_confirmed(key, p);
                return Tracked::Untracked;
            }
            if pkt.proto == PROTO_TCP {
                flow::tcp_update(p, pkt.tcp_flags, Dir::Backend);
            }
            flow::refresh(p, now);
            return Tracked::Reply;
        }
        // Another backend's live flow here (re-selected on another gateway): not this
        // reply's, unless the unconfirmed table holds it for this backend.
        elsewhere = live;
    }
    let none = if elsewhere {
        Tracked::Elsewhere
    } else {
        Tracked::Untracked
    };
    let Some(p) = CT_NEW.get_ptr_mut(key) else {
        return none;
    };
    // SAFETY: live map value, copied.
    let e = unsafe { *p };
    let expired = flow::expired(&e, now, &flow::timeouts(r.vip_id));
    if e.backend_id != r.backend_id || e.flags & CT_F_DIRECT != 0 {
        return if expired { none } else { Tracked::Elsewhere };
    }
    if e.generation != generation || expired {
        count(if e.generation != generation {
            Counter::CtStale
        } else {
            Counter::CtExpired
        });
        let _ = CT_NEW.remove(key);
        return none;
    }
    let seq = if pkt.proto == PROTO_TCP {
        parse::tcp_seq_ack(ctx, pkt).0
    } else {
        0
    };
    match flow::backend_reply(p, pkt.proto, pkt.tcp_flags, seq) {
        flow::ReplyEffect::Confirm => flow::confirm(key, p, pkt.proto, now),
        flow::ReplyEffect::Refused => {
            count(Counter::CtRefused);
            let _ = CT_NEW.remove(key);
        }
        flow::ReplyEffect::Keep => flow::refresh(p, now),
    }
    Tracked::Reply
}

/// A reply this gateway has no flow entry for. It is the VIP's if its backend is a current
/// member of the VIP — valid, of this VIP, whether weighted, drained or down, until it is
/// removed: a flow keeps its backend through changes of the table, and its replies may come
/// through any gateway — and it is not addressed to this gateway itself (its health checks
/// talk to the backends directly); and either the VIP has `VIP_F_STATELESS_REVERSE` (several
/// gateways behind ECMP) or a flood was on within the opening timeout (flows that began then
/// have no entry: see `flow::flooding`). What this costs: a client that talks to the
/// backend's service endpoint directly through this gateway gets its replies from the VIP
/// (README, "Several gateways").
#[inline(always)]
fn stateless_reply(ctx: &impl Frame, pkt: &Packet, r: &RevNatEntry, now: u64) -> bool {
    // SAFETY: copied out at once.
    let Some(vip) = (unsafe { VIPS.get(r.vip) }).copied() else {
        return false;
    };
    // dsr-l2 / ipip backends answer from the VIP, not through here.
    if vip.fwd != FWD_NAT {
        return false;
    }
    let after_flood = vip.flags & VIP_F_STATELESS_REVERSE == 0;
    if after_flood {
        // As long as a flow that began in the flood could live without an entry.
        let t = flow::timeouts(r.vip_id).established_s;
        if !flow::flooded_recently(now, if t == 0 { u32::MAX } else { t }) {
            return false;
        }
    } else if vip.algo != ALGO_MAGLEV && vip.algo != ALGO_SOURCE_HASH {
        return false;
    }
    let key = pkt.reply_flow_key(&r.vip);
    let Some(member) = usable_backend(r.backend_id, r.vip_id) else {
        return false;
    };
    let (route, _) = fib::lookup(
        ctx,
        pkt.family,
        pkt.proto,
        &pkt.src,
        &pkt.dst,
        pkt.sport,
        pkt.dport,
        pkt.mtu_len(),
        pkt.tos_or_flow,
    );
    // Local destinations come back as "not forwarded" (Other); everything else is on its way
    // somewhere else and the forward path handles it.
    if matches!(route, fib::Route::Other) {
        return false;
    }
    // A flow that began in a flood: the backend's ordinary TCP segment (not a SYN-ACK, which
    // spoofed SYNs get too, nor an RST) shows the backend holds an established connection,
    // which only a real client's handshake makes: confirm the flow.
    // (Only where the table still gives the flow to this backend: the entry then says what
    // the hash says, as it would have had the flood not skipped it.)
    if after_flood
        && pkt.proto == PROTO_TCP
        && pkt.tcp_flags & (flow::TCP_SYN | flow::TCP_RST) == 0
        && hashed_index(&vip, &key, flow::seed())
            .and_then(|i| TABLE.get(vip.table_off.wrapping_add(i)))
            .is_some_and(|id| *id == r.backend_id)
    {
        flow::confirm_reply(&key, r.backend_id, member.generation, now);
    }
    true
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
fn reverse(ctx: &impl Frame, pkt: &Packet, rev: &RevNatEntry) -> Verdict {
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

/// Sources no real client has (RFC 6890 and friends): this network (0/8), loopback, link-local,
/// multicast, 240/4 with broadcast; ::, ::1, link-local and multicast IPv6.
#[inline(always)]
fn martian(family: u8, src: &[u32; 4]) -> bool {
    let b = src[0].to_ne_bytes();
    if family == FAMILY_V4 {
        b[0] == 0 || b[0] == 127 || b[0] >= 224 || (b[0] == 169 && b[1] == 254)
    } else {
        let unspecified_or_loopback =
            src[0] == 0 && src[1] == 0 && src[2] == 0 && (src[3] == 0 || src[3] == 1u32.to_be());
        unspecified_or_loopback || b[0] == 0xff || (b[0] == 0xfe && b[1] & 0xc0 == 0x80)
    }
}

/// The VIP of the confirmed flow whose entry `p` is, from the mirror by id: the entry's
/// backend (if in use) names it, and it must still be the packet's destination. None: find
/// the VIP in `VIPS`.
#[inline(always)]
fn vip_of_flow(pkt: &Packet, p: *mut CtEntry) -> Option<VipInfo> {
    // SAFETY: live map value; one field read.
    let b = BACKENDS.get(unsafe { (*p).backend_id })?;
    if !b.is_valid() {
        return None;
    }
    let m = VIP_BY_ID.get(b.vip_id)?;
    let v = &m.vip;
    if v.addr_be == pkt.dst
        && v.port_be == pkt.dport
        && v.proto == pkt.proto
        && v.family == pkt.family
        && m.info.vip_id == b.vip_id
    {
        Some(m.info)
    } else {
        None
    }
}

/// Client → VIP: check the packet, find the flow's backend, rewrite the destination to it,
/// forward. `ct`: the flow's entry in the confirmed table, as looked up already. `mirrored`:
/// `vip` was read from the mirror by id (used only for a live confirmed flow; anything that
/// selects a backend reads the VIP from `VIPS`). None: the VIP is not in `VIPS` (any more).
#[inline(always)]
fn forward(
    ctx: &impl Frame,
    pkt: &Packet,
    vip: &VipInfo,
    flow: &FlowKey,
    ct: Option<*mut CtEntry>,
    mirrored: bool,
) -> Option<Verdict> {
    if pkt.ttl <= 1 {
        return Some(Verdict::pass(Counter::PassTtlExceeded));
    }
    let now = flow::now_ns();
    let confirmed = match ct {
        Some(p) => confirmed_flow(pkt, vip, flow, p, now),
        None => None,
    };
    // The mirror is written after `VIPS`: for a flow it does not answer, the VIP as `VIPS`
    // has it.
    let fresh_vip;
    let vip = if confirmed.is_none() && mirrored {
        let key = pkt.dst_endpoint();
        // SAFETY: copied out at once.
        fresh_vip = *unsafe { VIPS.get(key) }?;
        &fresh_vip
    } else {
        vip
    };
    let (id, backend, new_flow) = if let Some(known) = confirmed {
        known
    } else {
        // No confirmed flow has a martian source or port 0 (none is ever made), so these
        // checks are needed only here.
        if pkt.sport == 0 {
            return Some(Verdict::drop(Counter::DropPortZero));
        }
        if martian(pkt.family, &pkt.src) || pkt.src == pkt.dst {
            return Some(Verdict::drop(Counter::DropMartian));
        }
        // A SYN above the flood threshold skips the unconfirmed table as well: that is the
        // flood's own path, kept to one lookup (a retransmitted SYN then goes where the hash
        // says). Anything else looks there first.
        let syn = pkt.proto == PROTO_TCP && flow::is_syn(pkt.tcp_flags);
        let mut flooding = syn && flow::flooding(now);
        let known = if flooding {
            None
        } else {
            unconfirmed_flow(ctx, pkt, vip, flow, now)
        };
        if let Some((id, b)) = known {
            (id, b, false)
        } else {
            if !syn {
                flooding = flow::flooding(now);
            }
            // A TCP segment that is not a SYN never starts a connection: its flow began
            // earlier and lost its entry (a flood skipped it, the LRU evicted it), so it gets
            // the choice that needs no entry — for maglev and source-hash the same as ever.
            let midstream = pkt.proto == PROTO_TCP && !syn;
            let picked = if flooding || midstream {
                let seed = flow::seed();
                hashed_index(vip, flow, seed).and_then(|i| slot_backend(vip, i))
            } else {
                select(vip, flow)
            };
            let Some((id, b)) = picked else {
                return Some(Verdict::drop(Counter::DropNoBackend));
            };
            count(Counter::CtMiss);
            if flooding {
                count(Counter::CtFloodSkip);
            } else if pkt.tcp_flags & flow::TCP_RST == 0 {
                flow::insert_new(
                    flow,
                    id,
                    b.generation,
                    pkt.tcp_flags,
                    now,
                    vip.fwd != FWD_NAT,
                );
            }
            (id, b, true)
        }
    };
    add_traffic(&VIP_STATS, vip.vip_id, pkt.frame_len, new_flow, false);
    add_traffic(&BACKEND_STATS, id, pkt.frame_len, new_flow, false);
    Some(send_to_backend(ctx, pkt, vip, id, &backend, flow, now))
}

/// The backend of a confirmed flow, after applying this client packet to its state, and
/// whether the flow starts anew here (an expired TCP flow picked up again with its backend).
/// None: not a live confirmed flow — no entry, or one that is stale (its backend was
/// replaced), expired (UDP, or a SYN), or closed and reopened by a SYN (each removed here).
#[inline(always)]
fn confirmed_flow(
    pkt: &Packet,
    vip: &VipInfo,
    flow: &FlowKey,
    p: *mut CtEntry,
    now: u64,
) -> Option<(u32, Backend, bool)> {
    // SAFETY: live map value, copied.
    let e = unsafe { *p };
    // Stale first: the id may belong to another backend now, whose count this flow is not on.
    let Some(b) = tracked_backend(&e, vip.vip_id) else {
        count(Counter::CtStale);
        flow::forget(p);
        let _ = CONNTRACK.remove(flow);
        return None;
    };
    if flow::expired(&e, now, &flow::timeouts(vip.vip_id)) {
        count(Counter::CtExpired);
        flow::drop_confirmed(flow, p);
        // A TCP flow past its timeout (idle that long, or closed by an RST nobody undid) still
        // names a usable backend: a segment that is not a SYN is that connection going on,
        // so it keeps the backend (picked up again) rather than being chosen afresh — which,
        // for random, round-robin and least-conn, would move it.
        if pkt.proto == PROTO_TCP && !flow::is_syn(pkt.tcp_flags) {
            count(Counter::CtMiss);
            if pkt.tcp_flags & flow::TCP_RST == 0 {
                flow::insert_new(
                    flow,
                    e.backend_id,
                    e.generation,
                    pkt.tcp_flags,
                    now,
                    vip.fwd != FWD_NAT,
                );
            }
            return Some((e.backend_id, b, true));
        }
        return None;
    }
    if flow::is_closed(p) && flow::is_syn(pkt.tcp_flags) {
        // Port reuse after a complete close: a new connection.
        count(Counter::CtReopened);
        flow::drop_confirmed(flow, p);
        return None;
    }
    count(Counter::CtHit);
    if pkt.proto == PROTO_TCP {
        flow::tcp_update(p, pkt.tcp_flags, Dir::Client);
    }
    flow::refresh(p, now);
    Some((e.backend_id, b, false))
}

/// The backend of an unconfirmed flow, after applying this client packet to it (which may
/// confirm it). None: no live entry (an expired or stale one is removed).
#[inline(always)]
fn unconfirmed_flow(
    ctx: &impl Frame,
    pkt: &Packet,
    vip: &VipInfo,
    flow: &FlowKey,
    now: u64,
) -> Option<(u32, Backend)> {
    let p = CT_NEW.get_ptr_mut(flow)?;
    // SAFETY: live map value, copied.
    let e = unsafe { *p };
    if flow::expired(&e, now, &flow::timeouts(vip.vip_id)) {
        count(Counter::CtExpired);
        let _ = CT_NEW.remove(flow);
        return None;
    }
    let Some(b) = tracked_backend(&e, vip.vip_id) else {
        count(Counter::CtStale);
        let _ = CT_NEW.remove(flow);
        return None;
    };
    count(Counter::CtHit);
    let dsr = vip.fwd != lb_common::FWD_NAT;
    let ack = if pkt.proto == PROTO_TCP {
        parse::tcp_seq_ack(ctx, pkt).1
    } else {
        0
    };
    if flow::client_confirms(p, pkt.proto, pkt.tcp_flags, ack, dsr) {
        flow::confirm(flow, p, pkt.proto, now);
    } else {
        flow::refresh(p, now);
    }
    Some((e.backend_id, b))
}

/// Sends a packet for a VIP to backend `id` the VIP's way: NAT, dsr-l2 or ipip.
#[inline(always)]
fn send_to_backend(
    ctx: &impl Frame,
    pkt: &Packet,
    vip: &VipInfo,
    id: u32,
    backend: &Backend,
    flow: &FlowKey,
    now: u64,
) -> Verdict {
    match vip.fwd {
        FWD_DSR_L2 => {
            count(Counter::FwdDsrL2);
            return dsr::dsr_l2(ctx, pkt, id, backend, now);
        }
        FWD_IPIP => {
            count(Counter::FwdIpip);
            let hash = encap_hash(flow, flow::seed());
            // With a fresh next hop, here; otherwise `lb_ipip` (route lookup, too-big answers:
            // its own stack).
            if let Some(v) = dsr::ipip_cached(ctx, pkt, id, backend, hash, now) {
                return v;
            }
            if let Some(h) = HANDOFF.get_ptr_mut(0) {
                // SAFETY: per-CPU slot, read by the program tail-called next on this CPU.
                unsafe {
                    *h = Handoff {
                        backend_id: id,
                        hash,
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
    fib::to_backend(ctx, pkt, id, backend, now)
}

/// An ICMP too-big about a VIP flow: to the flow's backend (conntrack, else the VIP's
/// selection), in the VIP's forwarding mode. None: not one (`icmp_verdict` decides).
#[inline(always)]
fn icmp_error(ctx: &impl Frame) -> Option<Verdict> {
    let m = icmp::parse(ctx)?;
    // SAFETY: copied out at once.
    let vip = unsafe { VIPS.get(m.vip) }.copied()?;
    if m.outer.ttl <= 1 {
        return Some(Verdict::pass(Counter::PassTtlExceeded));
    }
    // SAFETY: copied out at once (confirmed flows, then unconfirmed ones).
    let ct = unsafe { CONNTRACK.get(m.flow).or_else(|| CT_NEW.get(m.flow)) }.copied();
    let from_ct = ct.and_then(|ct| Some((ct.backend_id, tracked_backend(&ct, vip.vip_id)?)));
    let (id, backend) = match from_ct {
        Some(c) => c,
        None => select(&vip, &m.flow)?,
    };
    count(Counter::IcmpToBackend);
    if vip.fwd == FWD_DSR_L2 {
        count(Counter::FwdDsrL2);
        return Some(dsr::dsr_l2(ctx, &m.outer, id, &backend, flow::now_ns()));
    }
    if vip.fwd == FWD_IPIP {
        count(Counter::FwdIpip);
        return Some(dsr::ipip_quiet(
            ctx,
            &m.outer,
            id,
            &backend,
            encap_hash(&m.flow, flow::seed()),
        ));
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
        _ => hashed_index(vip, flow, flow::seed())?,
    };
    slot_backend(vip, index)
}

/// The slot a flow gets from its hash alone, whatever the VIP's algorithm: maglev's choice,
/// source-hash's, and — for a new flow above the flood threshold, which is not stored — the
/// same weighted table (random, least-conn) or round-robin sequence hashed, so that the flow's
/// next packets find the same backend without an entry.
#[inline(always)]
fn hashed_index(vip: &VipInfo, flow: &FlowKey, seed: u32) -> Option<u32> {
    if vip.table_size == 0 {
        return None;
    }
    Some(match vip.algo {
        ALGO_SOURCE_HASH => {
            source_hash(&flow.src_be, flow.family, vip.src_prefix_len, seed) % vip.table_size
        }
        ALGO_ROUND_ROBIN => {
            if vip.seq_len == 0 || vip.seq_len > vip.table_size {
                return None;
            }
            flow_hash(flow, seed) % vip.seq_len
        }
        _ => flow_hash(flow, seed) % vip.table_size,
    })
}

/// The usable backend in slot `index` of the VIP's table.
#[inline(always)]
fn slot_backend(vip: &VipInfo, index: u32) -> Option<(u32, Backend)> {
    let id = *TABLE.get(vip.table_off.wrapping_add(index))?;
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
