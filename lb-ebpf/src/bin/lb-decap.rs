//! `lb_decap`: the XDP program backends attach (`lb decap attach IFACE`) to receive lb's ipip
//! traffic without an ipip tunnel device (which needs a kernel module this kernel and many
//! backends lack). An IPv4-in-IPv4, IPv6-in-IPv6 or IPv4-in-IPv6 packet loses its outer header
//! and goes up the stack as the inner packet, addressed to the VIP the backend holds on a
//! loopback interface; the backend answers the client directly. Only lb's encapsulation to this
//! backend's VIPs is stripped, so the interface never becomes a tunnel endpoint that relays:
//! the outer source must be in the configured gateway prefixes (`LB_DECAP_FROM_V1`), the outer
//! destination an address of this host (`LB_DECAP_LOCAL_V1`), and the inner destination one of
//! the VIPs it serves (`LB_DECAP_VIPS_V1`). Everything else passes untouched. ECN is carried
//! over as RFC 6040 says. Every packet increments one counter (`DecapCounter`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{lpm_trie::Key, HashMap, LpmTrie, PerCpuArray},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{btf_map, xdp},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    csum::CsumUpdate, DecapAddr, DecapCounter, Endpoint, DECAP_COUNTER_CAPACITY, FAMILY_V4,
    FAMILY_V6, PROTO_IPIP, PROTO_IPV6,
};
use lb_ebpf::{
    bounds::ptr_at,
    headers::{EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_LEN, IPV6_LEN},
};

#[btf_map(name = "LB_DECAP_STATS_V2")]
static STATS: PerCpuArray<u64, { DECAP_COUNTER_CAPACITY as usize }> = PerCpuArray::new();

/// The outer sources accepted: the gateways' encapsulation prefixes.
#[btf_map(name = "LB_DECAP_FROM_V1")]
static FROM: LpmTrie<DecapAddr, u8, 256> = LpmTrie::new();

/// This host's addresses (port and protocol 0): the outer destinations accepted.
#[btf_map(name = "LB_DECAP_LOCAL_V1")]
static LOCAL: HashMap<Endpoint, u8, 1024> = HashMap::new();

/// The VIPs this backend serves (port and protocol 0): the inner destinations accepted.
#[btf_map(name = "LB_DECAP_VIPS_V1")]
static VIPS: HashMap<Endpoint, u8, 1024> = HashMap::new();

/// ECN codepoints (the low two bits of the IPv4 TOS / IPv6 traffic class).
const ECN_MASK: u8 = 0x03;
const ECN_NOT_ECT: u8 = 0;
const ECN_ECT1: u8 = 1;
const ECN_ECT0: u8 = 2;
const ECN_CE: u8 = 3;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let c = decap(&ctx);
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently with us.
        unsafe { *p += 1 };
    }
    if c == DecapCounter::Dropped || c == DecapCounter::DroppedEcn {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// Whether `addr` (of `family`) is in `map` (port and protocol 0).
#[inline(always)]
fn listed(map: &HashMap<Endpoint, u8, 1024>, family: u8, addr_be: [u32; 4]) -> bool {
    let key = Endpoint {
        addr_be,
        port_be: 0,
        proto: 0,
        family,
    };
    // SAFETY: only whether it is there.
    unsafe { map.get(key) }.is_some()
}

/// Whether the outer source `addr` is in a configured gateway prefix.
#[inline(always)]
fn from_gateway(family: u8, addr_be: [u32; 4]) -> bool {
    let bits = if family == FAMILY_V4 { 32 } else { 128 };
    let key = Key::new(
        DecapAddr::prefix_len(bits),
        DecapAddr {
            family,
            _pad: [0; 3],
            addr_be,
        },
    );
    FROM.get(&key).is_some()
}

/// The inner ECN field after decapsulation (RFC 6040 section 4.2), or None: drop (the outer
/// header says CE, congestion, which an inner packet that is not ECN-capable cannot carry).
#[inline(always)]
fn decapsulated_ecn(outer: u8, inner: u8) -> Option<u8> {
    match (outer & ECN_MASK, inner & ECN_MASK) {
        (ECN_CE, ECN_NOT_ECT) => None,
        (ECN_CE, _) => Some(ECN_CE),
        (ECN_ECT1, ECN_ECT0) => Some(ECN_ECT1),
        (_, i) => Some(i),
    }
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> DecapCounter {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return DecapCounter::PassNotEncap;
    };
    // SAFETY: bounds-checked by ptr_at.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type_be });
    // Outer header length, the inner packet's family, the outer ECN field, and whether the
    // outer destination is this host's.
    let (outer_len, inner_v4, counter, outer_ecn, local) = if ether_type == ETH_P_IP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
            return DecapCounter::PassNotEncap;
        };
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *ip };
        if h.protocol != PROTO_IPIP {
            return DecapCounter::PassNotEncap;
        }
        if !from_gateway(FAMILY_V4, [h.saddr_be, 0, 0, 0]) {
            return DecapCounter::PassForeign;
        }
        // Only option-less, unfragmented outer headers, as lb writes them.
        if h.version_ihl != 0x45 || u16::from_be(h.frag_off_be) & 0x3fff != 0 {
            return DecapCounter::PassMalformed;
        }
        let local = listed(&LOCAL, FAMILY_V4, [h.daddr_be, 0, 0, 0]);
        (20usize, true, DecapCounter::DecapV4InV4, h.tos, local)
    } else if ether_type == ETH_P_IPV6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else {
            return DecapCounter::PassNotEncap;
        };
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *ip };
        let r = match h.next_header {
            PROTO_IPIP => (true, DecapCounter::DecapV4InV6),
            PROTO_IPV6 => (false, DecapCounter::DecapV6InV6),
            _ => return DecapCounter::PassNotEncap,
        };
        if !from_gateway(FAMILY_V6, h.saddr_be) {
            return DecapCounter::PassForeign;
        }
        let tc = (u32::from_be(h.vtc_flow_be) >> 20) as u8;
        let local = listed(&LOCAL, FAMILY_V6, h.daddr_be);
        (IPV6_LEN, r.0, r.1, tc, local)
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
    // Addressed to this host, carrying a packet for one of its VIPs: anything else would be
    // relayed (or delivered to an address lb does not serve).
    if !local {
        return DecapCounter::PassNotLocal;
    }
    if inner_v4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, inner_off) else {
            return DecapCounter::PassMalformed;
        };
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { &mut *ip };
        if !listed(&VIPS, FAMILY_V4, [h.daddr_be, 0, 0, 0]) {
            return DecapCounter::PassNotVip;
        }
        let Some(ecn) = decapsulated_ecn(outer_ecn, h.tos) else {
            return DecapCounter::DroppedEcn;
        };
        let tos = (h.tos & !ECN_MASK) | ecn;
        if tos != h.tos {
            // The checksum follows the changed 16-bit word (version/IHL, TOS), loaded as stored.
            let mut c = CsumUpdate::new(h.check);
            c.word(
                u16::from_ne_bytes([h.version_ihl, h.tos]),
                u16::from_ne_bytes([h.version_ihl, tos]),
            );
            h.check = c.finish();
            h.tos = tos;
        }
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, inner_off) else {
            return DecapCounter::PassMalformed;
        };
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { &mut *ip };
        if !listed(&VIPS, FAMILY_V6, h.daddr_be) {
            return DecapCounter::PassNotVip;
        }
        let vtc = u32::from_be(h.vtc_flow_be);
        let tc = (vtc >> 20) as u8;
        let Some(ecn) = decapsulated_ecn(outer_ecn, tc) else {
            return DecapCounter::DroppedEcn;
        };
        let tc = (tc & !ECN_MASK) | ecn;
        h.vtc_flow_be = ((vtc & !(0xff << 20)) | ((tc as u32) << 20)).to_be();
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
