//! Flow state (ARCHITECTURE.md, "Flow state"): two conntrack tables, the TCP/UDP states and
//! their timeouts, confirmation, exact active counts and the new-flow rate limit.
//!
//! - `CT_NEW` holds flows not yet confirmed: a TCP flow whose handshake has not been shown to
//!   complete, a UDP flow without a reply. It is a bounded LRU of its own, so a flood of them
//!   only ever evicts its own kind.
//! - `CONNTRACK` holds confirmed flows. An entry gets there only with evidence a blind spoofer
//!   cannot give (NAT: the client's ACK acknowledges the backend's SYN-ACK, or the backend
//!   answers a flow picked up mid-stream or a UDP flow), so spoofed packets never evict one.
//! - A flow is selected afresh only when its entry is absent, expired, stale (its backend was
//!   replaced), or closed by FINs from both sides: a FIN, SYN or RST from one side never moves
//!   it.
//! - A confirmed flow counts in its backend's active flows (`CT_F_COUNTED`) until the bit is
//!   cleared, once, by an atomic fetch-and: FINs both ways, or found expired here. Entries the
//!   LRU evicts or that expire unseen are settled by the agent's sweep.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use core::intrinsics::{atomic_and, atomic_or, atomic_xadd, AtomicOrdering};
use lb_common::{
    Counter, CtEntry, FlowKey, Timeouts, ACK_WINDOW, CT_F_CLIENT_AGAIN, CT_F_COUNTED, CT_F_DIRECT,
    CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CT_F_PICKUP, CT_F_RST, CT_F_RST_BACKEND, CT_F_SYNACK,
    CT_S_CLOSED, CT_S_CLOSING, CT_S_ESTABLISHED, CT_S_OPENING, CT_S_UDP, PROTO_TCP,
};

use crate::maps::{count, ACTIVE, CONF, CONNTRACK, CT_COUNTS, CT_NEW, FLOOD, RATE, TIMEOUTS};

pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

const NS_PER_S: u64 = 1_000_000_000;
/// `last_seen_ns` is rewritten at most this often (a write per packet would bounce the entry's
/// cache line between CPUs for nothing: timeouts are in seconds).
const REFRESH_NS: u64 = NS_PER_S;
/// BPF_NOEXIST.
const NOEXIST: u64 = 1;

/// Which end of the flow a packet came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    Client,
    Backend,
}

/// The data plane's clock, nanoseconds: the kernel's tick counter times the tick length
/// userspace measured at load (`bpf_jiffies64` is turned into one load by the verifier; a
/// clock helper costs every packet a call, about 20 ns here). Userspace reads the same clock
/// (`lb::clock`).
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    let ns_per_tick = CONF.get(0).map_or(0, |c| c.ns_per_tick) as u64;
    // SAFETY: plain helper calls.
    unsafe {
        if ns_per_tick != 0 {
            bpf_jiffies64() * ns_per_tick
        } else {
            bpf_ktime_get_coarse_ns()
        }
    }
}

/// The deployment's hash seed.
#[inline(always)]
pub(crate) fn seed() -> u32 {
    CONF.get(0).map_or(0, |c| c.hash_seed)
}

/// VIP `vip_id`'s timeouts.
#[inline(always)]
pub(crate) fn timeouts(vip_id: u32) -> Timeouts {
    TIMEOUTS.get(vip_id).copied().unwrap_or(Timeouts::DEFAULT)
}

#[inline(always)]
pub(crate) fn is_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Whether the entry has outlived its state's timeout (0: never). A `last_seen_ns` a little
/// ahead of `now` (written by another CPU) is not expired.
#[inline(always)]
pub(crate) fn expired(e: &CtEntry, now: u64, t: &Timeouts) -> bool {
    let s = t.of_state(e.state) as u64;
    s != 0 && now > e.last_seen_ns && now - e.last_seen_ns > s * NS_PER_S
}

/// Moves `last_seen_ns` to `now` if it is more than a second behind.
#[inline(always)]
pub(crate) fn refresh(p: *mut CtEntry, now: u64) {
    // SAFETY: `p` points at a live map value for the duration of the program run.
    unsafe {
        if now > (*p).last_seen_ns + REFRESH_NS {
            (*p).last_seen_ns = now;
        }
    }
}

/// Adds one flow to (`up`) or takes one off a backend's active count, and records it in the
/// backend's monotonic count events — first, so that the sweep, which reads the count and then
/// the events, never sees a change of the count without its event.
#[inline(always)]
pub(crate) fn active_add(id: u32, up: bool) {
    if let Some(e) = CT_COUNTS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot; nothing else on this CPU runs concurrently with us.
        unsafe {
            if up {
                (*e).counted += 1;
            } else {
                (*e).uncounted += 1;
            }
        }
    }
    if let Some(p) = ACTIVE.get_ptr_mut(id) {
        let delta = if up { 1 } else { u64::MAX };
        // SAFETY: array values are live and 8-byte aligned.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta) };
    }
}

/// Atomically sets `bits`; returns the flags before.
#[inline(always)]
fn set_bits(p: *mut CtEntry, bits: u64) -> u64 {
    // SAFETY: live map value; the u64 field is 8-byte aligned.
    unsafe {
        atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(
            core::ptr::addr_of_mut!((*p).flags),
            bits,
        )
    }
}

/// Atomically clears `bits`; returns the flags before.
#[inline(always)]
fn clear_bits(p: *mut CtEntry, bits: u64) -> u64 {
    // SAFETY: as in `set_bits`.
    unsafe {
        atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(
            core::ptr::addr_of_mut!((*p).flags),
            !bits,
        )
    }
}

/// Takes a flow off its backend's active count, if it is on it — exactly once, whoever (CPU,
/// direction, expiry) gets here first.
#[inline(always)]
pub(crate) fn uncount(p: *mut CtEntry) {
    if clear_bits(p, CT_F_COUNTED) & CT_F_COUNTED != 0 {
        // SAFETY: live map value.
        active_add(unsafe { (*p).backend_id }, false);
    }
}

/// Puts a flow back on its backend's active count, if it is not on it (once, as `uncount`).
#[inline(always)]
fn recount(p: *mut CtEntry) {
    if set_bits(p, CT_F_COUNTED) & CT_F_COUNTED == 0 {
        // SAFETY: live map value.
        active_add(unsafe { (*p).backend_id }, true);
    }
}

/// Takes an entry off the count without touching any count: for an entry whose backend id
/// now belongs to another backend (stale), whose count was reset when the id was reused.
#[inline(always)]
pub(crate) fn forget(p: *mut CtEntry) {
    clear_bits(p, CT_F_COUNTED);
}

const FIN_BOTH: u64 = CT_F_FIN_CLIENT | CT_F_FIN_BACKEND;

/// The TCP state that a confirmed entry's flags mean.
#[inline(always)]
fn tcp_state(flags: u64) -> u8 {
    if flags & FIN_BOTH == FIN_BOTH || flags & (CT_F_RST | CT_F_RST_BACKEND) != 0 {
        CT_S_CLOSED
    } else if flags & FIN_BOTH != 0 {
        CT_S_CLOSING
    } else {
        CT_S_ESTABLISHED
    }
}

/// Applies a TCP packet's flags to a confirmed entry. FIN from one side: closing; from both:
/// closed (off the active count for good). RST: closed — off the count, the closed timeout —
/// until a non-RST packet from the side that sent it shows the flow goes on (then it is
/// counted again: a spoofed RST is undone by the real peer's next packet). Packets the other
/// side still had in flight do not undo a real RST.
#[inline(always)]
pub(crate) fn tcp_update(p: *mut CtEntry, tcp_flags: u8, from: Dir) {
    // SAFETY: live map value.
    let flags = unsafe { (*p).flags };
    let (fin, rst) = if from == Dir::Client {
        (CT_F_FIN_CLIENT, CT_F_RST)
    } else {
        (CT_F_FIN_BACKEND, CT_F_RST_BACKEND)
    };
    let mut new = flags;
    if tcp_flags & TCP_RST != 0 {
        if flags & rst == 0 {
            new = set_bits(p, rst) | rst;
        }
    } else {
        if flags & rst != 0 {
            new = clear_bits(p, rst) & !rst;
        }
        if tcp_flags & TCP_FIN != 0 && flags & fin == 0 {
            new = set_bits(p, fin) | fin;
        }
    }
    if new != flags {
        let state = tcp_state(new);
        // SAFETY: live map value; a racing writer computes the state from the bits it saw,
        // and every decision below is taken from the bits, not from this byte.
        unsafe { (*p).state = state };
        if state == CT_S_CLOSED {
            uncount(p);
        } else if flags & (CT_F_RST | CT_F_RST_BACKEND) != 0 {
            recount(p);
        }
    }
}

/// Moves an unconfirmed flow to the confirmed table, counted active. Two CPUs confirming the
/// same flow: the second insert fails (BPF_NOEXIST) and counts nothing.
#[inline(always)]
pub(crate) fn confirm(flow: &FlowKey, p: *const CtEntry, proto: u8, now: u64) {
    // SAFETY: live map value, copied.
    let old = unsafe { *p };
    let entry = CtEntry {
        backend_id: old.backend_id,
        generation: old.generation,
        last_seen_ns: now,
        flags: CT_F_COUNTED | (old.flags & CT_F_DIRECT),
        ack_expect: 0,
        state: if proto == PROTO_TCP {
            CT_S_ESTABLISHED
        } else {
            CT_S_UDP
        },
        _pad: [0; 3],
    };
    match CONNTRACK.insert(flow, entry, NOEXIST) {
        Ok(()) => {
            active_add(old.backend_id, true);
            count(Counter::CtConfirmed);
        }
        // -EEXIST: another CPU confirmed it first.
        Err(-17) => {}
        Err(_) => count(Counter::CtInsertFailed),
    }
    let _ = CT_NEW.remove(flow);
}

/// Confirms a flow that has no entry at all, from the backend's side (see `stateless_reply`).
#[inline(always)]
pub(crate) fn confirm_reply(flow: &FlowKey, backend_id: u32, generation: u32, now: u64) {
    let entry = CtEntry {
        backend_id,
        generation,
        last_seen_ns: now,
        flags: CT_F_COUNTED,
        ack_expect: 0,
        state: CT_S_ESTABLISHED,
        _pad: [0; 3],
    };
    if CONNTRACK.insert(flow, entry, NOEXIST).is_ok() {
        active_add(backend_id, true);
        count(Counter::CtConfirmed);
    }
}

/// Stores a new, unconfirmed flow.
#[inline(always)]
pub(crate) fn insert_new(
    flow: &FlowKey,
    backend_id: u32,
    generation: u32,
    tcp_flags: u8,
    now: u64,
    direct: bool,
) {
    let tcp = flow.proto == PROTO_TCP;
    let entry = CtEntry {
        backend_id,
        generation,
        last_seen_ns: now,
        flags: if tcp && !is_syn(tcp_flags) {
            CT_F_PICKUP
        } else {
            0
        } | if direct { CT_F_DIRECT } else { 0 },
        ack_expect: 0,
        state: if tcp { CT_S_OPENING } else { CT_S_UDP },
        _pad: [0; 3],
    };
    if CT_NEW.insert(flow, entry, 0).is_err() {
        count(Counter::CtInsertFailed);
    }
}

/// A client packet on an unconfirmed flow: whether it confirms it. NAT TCP: an ACK that
/// acknowledges the backend's SYN-ACK (`ack_expect`, within `ACK_WINDOW`). DSR (the gateway
/// never sees replies): any further non-SYN, non-RST client packet — the only evidence there is.
/// NAT UDP: never (the reply confirms).
#[inline(always)]
pub(crate) fn client_confirms(
    p: *mut CtEntry,
    proto: u8,
    tcp_flags: u8,
    ack: u32,
    dsr: bool,
) -> bool {
    // SAFETY: live map value.
    let e = unsafe { *p };
    if proto != PROTO_TCP {
        return dsr;
    }
    if tcp_flags & (TCP_SYN | TCP_RST) != 0 {
        return false;
    }
    if dsr {
        return true;
    }
    if e.flags & CT_F_SYNACK == 0 {
        if e.flags & CT_F_CLIENT_AGAIN == 0 {
            set_bits(p, CT_F_CLIENT_AGAIN);
        }
        return false;
    }
    if ack.wrapping_sub(e.ack_expect) < ACK_WINDOW {
        return true;
    }
    count(Counter::CtBadAck);
    false
}

/// What a backend's reply does to an unconfirmed NAT flow: a SYN-ACK records the number the
/// client's ACK must carry; an RST ends the flow (returns false: remove it); a reply to a flow
/// picked up mid-stream, or any UDP reply, confirms it (`Confirm`).
pub(crate) enum ReplyEffect {
    Keep,
    Confirm,
    Refused,
}

#[inline(always)]
pub(crate) fn backend_reply(p: *mut CtEntry, proto: u8, tcp_flags: u8, seq: u32) -> ReplyEffect {
    if proto != PROTO_TCP {
        return ReplyEffect::Confirm;
    }
    if tcp_flags & TCP_RST != 0 {
        return ReplyEffect::Refused;
    }
    // SAFETY: live map value.
    let flags = unsafe { (*p).flags };
    if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        // SAFETY: live map value. Plain stores: a racing SYN-ACK retransmission writes the
        // same number.
        unsafe { (*p).ack_expect = seq.wrapping_add(1) };
        set_bits(p, CT_F_SYNACK);
        return ReplyEffect::Keep;
    }
    if flags & CT_F_PICKUP != 0 {
        return ReplyEffect::Confirm;
    }
    ReplyEffect::Keep
}

/// The new-flow rate limit (Katran's): true when this CPU has seen more than the threshold of
/// new flows in the current one-second window — then no unconfirmed entry is stored and the
/// backend is chosen by the flow hash alone. The first CPU over the threshold in a window
/// stamps `FLOOD`, so that replies of such flows are matched by the table for a while.
#[inline(always)]
pub(crate) fn flooding(now: u64) -> bool {
    let limit = CONF.get(0).map_or(0, |c| c.flood_rate) as u64;
    if limit == 0 {
        return false;
    }
    let Some(w) = RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot; nothing else on this CPU runs concurrently with us.
    let w = unsafe { &mut *w };
    if now > w.start_ns + NS_PER_S || now < w.start_ns {
        w.start_ns = now;
        w.count = 0;
    }
    w.count += 1;
    if w.count <= limit {
        return false;
    }
    // Stamp once per window (also when the threshold was lowered mid-window).
    if let Some(f) = FLOOD.get_ptr_mut(0) {
        // SAFETY: a plain u64 store; racing CPUs write nearly the same time.
        unsafe {
            if *f < w.start_ns {
                *f = now;
            }
        }
    }
    true
}

/// Whether some CPU was over the flood threshold less than `window_s` seconds ago.
#[inline(always)]
pub(crate) fn flooded_recently(now: u64, window_s: u32) -> bool {
    let t = FLOOD.get(0).copied().unwrap_or(0);
    t != 0 && now.saturating_sub(t) < window_s as u64 * NS_PER_S
}

/// Removes an entry from the confirmed table, taking it off the active count first.
#[inline(always)]
pub(crate) fn drop_confirmed(flow: &FlowKey, p: *mut CtEntry) {
    uncount(p);
    let _ = CONNTRACK.remove(flow);
}

/// Flows closed by FINs both ways are the only ones a SYN reopens (an RST-closed flow keeps
/// its backend until it expires).
#[inline(always)]
pub(crate) fn is_closed(p: *const CtEntry) -> bool {
    // SAFETY: live map value.
    unsafe { (*p).flags & FIN_BOTH == FIN_BOTH }
}
