//! `lb_decap`: the XDP program backends attach (`lb decap attach IFACE`) to receive lb's ipip
//! traffic without an ipip tunnel device (which needs a kernel module this kernel and many
//! backends lack). An IPv4-in-IPv4, IPv6-in-IPv6 or IPv4-in-IPv6 packet loses its outer header
//! and goes up the stack as the inner packet, addressed to the VIP the backend holds on a
//! loopback interface; the backend answers the client directly. Only lb's encapsulation is
//! stripped — the outer source must be in lb's prefixes (172.16.0.0/16, 100::/64) — so the
//! interface does not become an open tunnel endpoint. Everything else passes untouched. Every
//! packet increments one counter (`DecapCounter`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::PerCpuArray,
    helpers::generated::bpf_xdp_adjust_head,
    macros::{btf_map, xdp},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    DecapCounter, DECAP_COUNTER_COUNT, ENCAP_SRC_V4_BE, ENCAP_SRC_V6_BE, PROTO_IPIP, PROTO_IPV6,
};

/// The /16 of lb's IPv4 outer sources (network order, as loaded).
const ENCAP_V4_MASK_BE: u32 = u32::from_ne_bytes([255, 255, 0, 0]);
use lb_ebpf::{
    bounds::ptr_at,
    headers::{EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_LEN, IPV6_LEN},
};

#[btf_map(name = "LB_DECAP_STATS_V1")]
static STATS: PerCpuArray<u64, { DECAP_COUNTER_COUNT as usize }> = PerCpuArray::new();

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let c = decap(&ctx);
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently with us.
        unsafe { *p += 1 };
    }
    if c == DecapCounter::Dropped {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> DecapCounter {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return DecapCounter::PassNotEncap;
    };
    // SAFETY: bounds-checked by ptr_at.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type_be });
    // Outer header length and the inner packet's family.
    let (outer_len, inner_v4, counter) = if ether_type == ETH_P_IP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
            return DecapCounter::PassNotEncap;
        };
        // SAFETY: bounds-checked by ptr_at.
        let (vihl, proto, frag) = unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).frag_off_be) };
        if proto != PROTO_IPIP {
            return DecapCounter::PassNotEncap;
        }
        // SAFETY: bounds-checked by ptr_at.
        let saddr = unsafe { (*ip).saddr_be };
        if saddr & ENCAP_V4_MASK_BE != ENCAP_SRC_V4_BE {
            return DecapCounter::PassForeign;
        }
        // Only option-less, unfragmented outer headers, as lb writes them.
        if vihl != 0x45 || u16::from_be(frag) & 0x3fff != 0 {
            return DecapCounter::PassMalformed;
        }
        (20usize, true, DecapCounter::DecapV4InV4)
    } else if ether_type == ETH_P_IPV6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else {
            return DecapCounter::PassNotEncap;
        };
        // SAFETY: bounds-checked by ptr_at.
        let (next, saddr) = unsafe { ((*ip).next_header, (*ip).saddr_be) };
        let r = match next {
            PROTO_IPIP => (IPV6_LEN, true, DecapCounter::DecapV4InV6),
            PROTO_IPV6 => (IPV6_LEN, false, DecapCounter::DecapV6InV6),
            _ => return DecapCounter::PassNotEncap,
        };
        if saddr[0] != ENCAP_SRC_V6_BE[0] || saddr[1] != ENCAP_SRC_V6_BE[1] {
            return DecapCounter::PassForeign;
        }
        r
    } else {
        return DecapCounter::PassNotEncap;
    };
    // The inner header must be there and of the family the outer one says.
    let inner_off = ETH_LEN + outer_len;
    let Some(inner) = ptr_at::<u8>(ctx, inner_off) else {
        return DecapCounter::PassMalformed;
    };
    // SAFETY: bounds-checked by ptr_at.
    let version = unsafe { *inner } >> 4;
    if version != if inner_v4 { 4 } else { 6 } {
        return DecapCounter::PassMalformed;
    }
    // Move the Ethernet header forward over the outer IP header, then drop the front.
    let Some(new_eth) = ptr_at::<EthHdr>(ctx, outer_len) else {
        return DecapCounter::PassMalformed;
    };
    // SAFETY: both bounds-checked by ptr_at (and apart: the outer header is at least 20 bytes).
    unsafe {
        let (dst, src) = ((*eth).dst, (*eth).src);
        *new_eth = EthHdr {
            dst,
            src,
            ether_type_be: if inner_v4 { ETH_P_IP } else { ETH_P_IPV6 }.to_be(),
        };
    }
    // SAFETY: plain helper call; nothing is accessed through old pointers afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), outer_len as i32) } != 0 {
        // The frame is half rewritten: it cannot be passed on as either packet.
        return DecapCounter::Dropped;
    }
    counter
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
