//! Next hop: `bpf_fib_lookup` on the rewritten packet, then XDP_TX (same interface),
//! XDP_REDIRECT (another interface), or the kernel stack when it must help.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{Counter, NextHop, FAMILY_V4};

use crate::{
    headers::EthHdr,
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

/// `struct bpf_fib_lookup` with its unions flattened to the members we use (64 bytes).
#[repr(C)]
struct FibParams {
    family: u8,
    l4_protocol: u8,
    sport_be: u16,
    dport_be: u16,
    /// In: IP total length (host order), for the MTU check. Out: the MTU.
    tot_len: u16,
    /// In: ingress interface. Out: egress interface.
    ifindex: u32,
    /// IPv4 TOS or IPv6 flow label (network order).
    tos_or_flow: u32,
    src_be: [u32; 4],
    dst_be: [u32; 4],
    vlan_or_tbid: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<FibParams>() == 64);

/// Sends the rewritten packet with a cached next hop: MACs from the cache, then XDP_TX or
/// XDP_REDIRECT as a route lookup would have decided.
#[inline(always)]
pub(crate) fn send_cached(ctx: &XdpContext, nh: &NextHop) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::pass(Counter::PassMalformedEth);
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        (*eth).dst = nh.dmac;
        (*eth).src = nh.smac;
    }
    egress(ctx.ingress_ifindex() as u32, nh.ifindex)
}

#[inline(always)]
fn egress(ingress: u32, ifindex: u32) -> Verdict {
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

/// Routes the already rewritten packet whose addresses and ports are now `src`/`dst`.
#[inline(always)]
pub(crate) fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
) -> Verdict {
    let ingress = ctx.ingress_ifindex() as u32;
    let mut p = FibParams {
        family: if pkt.family == FAMILY_V4 {
            AF_INET
        } else {
            AF_INET6
        },
        l4_protocol: pkt.proto,
        sport_be: sport,
        dport_be: dport,
        tot_len: pkt.ip_len,
        ifindex: ingress,
        tos_or_flow: pkt.tos_or_flow,
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
    match rc {
        FIB_SUCCESS => {
            let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
                return Verdict::pass(Counter::PassMalformedEth);
            };
            // SAFETY: bounds-checked by ptr_at.
            unsafe {
                (*eth).dst = p.dmac;
                (*eth).src = p.smac;
            }
            egress(ingress, p.ifindex)
        }
        FIB_NO_NEIGH => Verdict::pass(Counter::PassNoNeigh),
        FIB_BLACKHOLE | FIB_UNREACHABLE | FIB_PROHIBIT => {
            Verdict::drop(Counter::DropFibUnreachable)
        }
        _ => Verdict::pass(Counter::PassFibOther),
    }
}
