//! The next-hop cache (ARCHITECTURE.md, "Next hop"): per CPU and backend, what the last route
//! lookup towards the backend said (egress interface, MACs, whether the backend is on-link).
//! A packet to a backend uses it instead of `bpf_fib_lookup` while it is fresh — younger than
//! the deployment's maximum age, made for this holder of the backend id, and the packet no
//! longer than the longest one a lookup passed the MTU check with — so a changed neighbour or
//! route is followed within the maximum age, with no process or operator involved.
//!
//! Per CPU: each CPU writes only its own entry (no torn reads of MACs another CPU is writing,
//! no cache line bouncing between CPUs), at the cost of one lookup per CPU and backend per
//! maximum age.

use lb_common::{
    Backend, Counter, NextHop, DEFAULT_NEXTHOP_MAX_AGE_MS, FAMILY_V4, NEXTHOP_CACHE_OFF,
    NEXTHOP_F_ONLINK, NEXTHOP_F_VALID,
};

use crate::{
    fib::{FibParams, Route},
    maps::{count, CONF, NEXTHOP},
};

const NS_PER_MS: u64 = 1_000_000;

/// How long a cached next hop is used (ns); None: no cache.
#[inline(always)]
fn max_age_ns() -> Option<u64> {
    match CONF.get(0).map_or(0, |c| c.nexthop_max_age_ms) {
        NEXTHOP_CACHE_OFF => None,
        0 => Some(DEFAULT_NEXTHOP_MAX_AGE_MS as u64 * NS_PER_MS),
        ms => Some(ms as u64 * NS_PER_MS),
    }
}

/// Whether `e` may be used for a packet of `len` bytes (IP total length) to `backend` at `now`.
#[inline(always)]
fn fresh(e: &NextHop, backend: &Backend, now: u64, len: u16, max_age: u64) -> bool {
    e.flags & NEXTHOP_F_VALID != 0
        && e.generation == backend.generation
        && len <= e.max_len
        // A clock that went back (another clock source after a reload) makes it look old.
        && now.wrapping_sub(e.checked_ns) < max_age
}

/// This CPU's fresh cached next hop of backend `id` for an IP packet of `len` bytes.
#[inline(always)]
pub(crate) fn cached(id: u32, backend: &Backend, now: u64, len: u16) -> Option<&'static NextHop> {
    let max_age = max_age_ns()?;
    let e = NEXTHOP.get(id)?;
    if fresh(e, backend, now, len, max_age) {
        Some(e)
    } else {
        None
    }
}

/// Records a successful route lookup towards backend `id` for a packet of `len` bytes. A
/// lookup that only extends a fresh entry to a longer packet (same next hop) keeps the
/// entry's age: the maximum age bounds how long any lookup's answer is used.
#[inline(always)]
fn fill(id: u32, backend: &Backend, now: u64, len: u16, p: &FibParams) {
    let Some(max_age) = max_age_ns() else {
        return;
    };
    let Some(e) = NEXTHOP.get_ptr_mut(id) else {
        return;
    };
    // SAFETY: this CPU's slot; nothing else on this CPU runs concurrently with us.
    let e = unsafe { &mut *e };
    let flags = NEXTHOP_F_VALID
        | if on_link(backend, p) {
            NEXTHOP_F_ONLINK
        } else {
            0
        };
    count(Counter::NextHopLookedUp);
    if e.flags == flags
        && e.ifindex == p.ifindex
        && e.dmac == p.dmac
        && e.smac == p.smac
        && e.generation == backend.generation
        && now.wrapping_sub(e.checked_ns) < max_age
    {
        if len > e.max_len {
            e.max_len = len;
        }
        return;
    }
    e.checked_ns = now;
    e.ifindex = p.ifindex;
    e.generation = backend.generation;
    e.dmac = p.dmac;
    e.smac = p.smac;
    e.max_len = len;
    e.flags = flags;
}

/// Whether a successful lookup's next hop is the backend itself (no router in between).
#[inline(always)]
pub(crate) fn on_link(backend: &Backend, p: &FibParams) -> bool {
    if backend.family == FAMILY_V4 {
        p.dst_be[0] == backend.addr_be[0]
    } else {
        p.dst_be == backend.addr_be
    }
}

/// Applies a route lookup towards backend `id` for a packet of `len` bytes to the cache: a
/// next hop is recorded; too big for the MTU leaves the entry for shorter packets; anything
/// else (no neighbour, no route, local) drops it.
#[inline(always)]
pub(crate) fn record(id: u32, backend: &Backend, now: u64, len: u16, r: Route, p: &FibParams) {
    match r {
        Route::Ok => fill(id, backend, now, len, p),
        Route::FragNeeded => {}
        Route::NoNeigh | Route::Unreachable | Route::Other => forget(id),
    }
}

/// Drops this CPU's entry for backend `id`: the route lookup no longer gives a next hop.
#[inline(always)]
fn forget(id: u32) {
    if let Some(e) = NEXTHOP.get_ptr_mut(id) {
        // SAFETY: as in `fill`.
        unsafe { (*e).flags = 0 };
    }
}
