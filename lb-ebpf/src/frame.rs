//! What differs between the two kinds of program that run the data plane: `lb_xdp` (XDP, in
//! the driver or the generic stack) and `lb_tc` (tc ingress, on a socket buffer). Everything
//! else — parsing, conntrack, selection, rewriting, next hops — is the same code, generic over
//! `Frame`.
//!
//! The difference that matters most is checksums. XDP sees frames as they came off the wire:
//! every checksum is finished, and lb updates it in place (RFC 1624). A socket buffer may carry
//! a *partial* checksum — GRO-merged packets, and every locally generated packet on a veth —
//! whose checksum field holds only the pseudo-header's sum, to be finished on transmit; or a
//! *complete* one, with the sum the NIC computed in `skb->csum`. Only the kernel knows which,
//! so the tc program updates L4 checksums with `bpf_l4_csum_replace`, which handles all three.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_MARK_ENFORCE, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR,
        TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::generated::{
        bpf_l4_csum_replace, bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_head,
        bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::csum::CsumUpdate;

pub(crate) use lb_ebpf::bounds::Bounded;

use crate::{
    maps::{GENERIC_PROGS, PROGS, TC_PROGS},
    parse::ptr_at,
};

/// An XDP program's packet. `MB`: the program is multi-buffer (`xdp.frags`: `lb_xdp`, for
/// native mode, where a jumbo frame comes in several buffers) or not (`lb_xdp_generic`, for
/// generic mode: with multi-buffer programs there this kernel (6.18) copies GRO-merged packets
/// into page-pool fragments, warns, and corrupts memory — seen as a usercopy BUG in
/// `tcp_recvmsg`). The two sets differ only in this and in their program arrays (tail calls
/// must agree on it).
pub(crate) struct Xdp<const MB: bool>(pub XdpContext);

impl<const MB: bool> EbpfContext for Xdp<MB> {
    #[inline(always)]
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        self.0.as_ptr()
    }
}

impl<const MB: bool> Bounded for Xdp<MB> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        Bounded::data_end(&self.0)
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.0.packet_len()
    }
}

/// Which L4 checksum is updated, for the rules about zero.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum L4Sum {
    /// TCP, ICMP, ICMPv6: a plain checksum.
    Plain,
    /// IPv4 UDP: 0 means "no checksum" and stays 0; a computed 0 is sent as 0xffff.
    UdpV4,
    /// IPv6 UDP: a computed 0 is sent as 0xffff.
    UdpV6,
}

pub(crate) trait Frame: Bounded {
    /// The interface the packet came in on.
    fn ingress_ifindex(&self) -> u32;

    /// Tail-calls program `slot` of this kind of program's array; returns only if that fails.
    fn tail_call(&self, slot: u32);

    /// The kernel's segmentation size, if the packet is a GSO super-packet (tc only): its
    /// payload is sent as segments of this many bytes each.
    fn gso_size(&self) -> u32;

    /// Whether packets are socket buffers (tc), which may be GSO super-packets and may carry
    /// partial checksums the kernel finishes on transmit.
    fn gso_capable(&self) -> bool;

    /// A VLAN tag the kernel took off the packet and keeps beside it (tc; XDP: never), which it
    /// puts back on at egress.
    fn vlan_tag_aside(&self) -> bool;

    /// Updates the L4 checksum at `off` for changes to the pseudo-header (`pseudo`: addresses)
    /// and to the data it covers (`data`: ports, quoted headers). False: out of bounds.
    fn l4_csum(&self, off: usize, pseudo: CsumUpdate, data: CsumUpdate, kind: L4Sum) -> bool;

    /// Makes room for an outer IP header of `len` bytes in front of the IP packet at `l3` (the
    /// link-layer header in front of it is rewritten by the caller). `outer_v4`: the outer
    /// header's family, which segmentation needs to know.
    fn push_outer(&self, len: u32, outer_v4: bool, l3: usize) -> bool;

    /// Adds `len` bytes in front of the frame.
    fn grow_head(&self, len: u32) -> bool;

    /// Cuts the packet to `len` bytes.
    fn set_len(&self, len: u32) -> bool;

    /// This kind of program's return code for a `Verdict`'s action (an XDP action, or what
    /// `bpf_redirect` returned).
    fn action(&self, xdp: u32) -> u32;
}

/// The software update both kinds of program could do, and XDP does: RFC 1624 in place.
#[inline(always)]
fn l4_csum_in_place(
    ctx: &impl Bounded,
    off: usize,
    pseudo: CsumUpdate,
    data: CsumUpdate,
    kind: L4Sum,
) -> bool {
    let Some(check) = ptr_at::<u16>(ctx, off) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    let check = unsafe { &mut *check };
    if kind == L4Sum::UdpV4 && *check == 0 {
        return true;
    }
    let mut sum = pseudo.merge(data).rebase(*check).finish();
    if kind != L4Sum::Plain && sum == 0 {
        sum = 0xffff;
    }
    *check = sum;
    true
}

impl<const MB: bool> Frame for Xdp<MB> {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(&self.0) as u32
    }

    #[inline(always)]
    fn tail_call(&self, slot: u32) {
        let array = if MB { &PROGS } else { &GENERIC_PROGS };
        // SAFETY: on success the call does not return; on failure nothing happened.
        unsafe { array.tail_call(&self.0, slot) };
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }

    #[inline(always)]
    fn gso_capable(&self) -> bool {
        false
    }

    #[inline(always)]
    fn vlan_tag_aside(&self) -> bool {
        false
    }

    #[inline(always)]
    fn l4_csum(&self, off: usize, pseudo: CsumUpdate, data: CsumUpdate, kind: L4Sum) -> bool {
        l4_csum_in_place(self, off, pseudo, data, kind)
    }

    #[inline(always)]
    fn push_outer(&self, len: u32, _outer_v4: bool, _l3: usize) -> bool {
        self.grow_head(len)
    }

    #[inline(always)]
    fn grow_head(&self, len: u32) -> bool {
        // SAFETY: plain helper call; callers derive every packet pointer afresh afterwards.
        unsafe { bpf_xdp_adjust_head(self.as_ptr().cast(), -(len as i32)) == 0 }
    }

    #[inline(always)]
    fn set_len(&self, len: u32) -> bool {
        let delta = len as i32 - self.packet_len() as i32;
        // SAFETY: as above.
        unsafe { bpf_xdp_adjust_tail(self.as_ptr().cast(), delta) == 0 }
    }

    #[inline(always)]
    fn action(&self, xdp: u32) -> u32 {
        xdp
    }
}

/// `TC_ACT_REDIRECT`: what `bpf_redirect` returns in a tc program.
const TC_ACT_REDIRECT: u32 = 7;

impl Frame for TcContext {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: skb points at the kernel's __sk_buff for the duration of the program.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn tail_call(&self, slot: u32) {
        // SAFETY: on success the call does not return; on failure nothing happened.
        unsafe { TC_PROGS.tail_call(self, slot) };
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.skb.skb).gso_size }
    }

    #[inline(always)]
    fn gso_capable(&self) -> bool {
        true
    }

    #[inline(always)]
    fn vlan_tag_aside(&self) -> bool {
        // SAFETY: skb points at the kernel's __sk_buff for the duration of the program.
        unsafe { (*self.skb.skb).vlan_present != 0 }
    }

    #[inline(always)]
    fn l4_csum(&self, off: usize, pseudo: CsumUpdate, data: CsumUpdate, kind: L4Sum) -> bool {
        let zero = match kind {
            L4Sum::Plain => 0,
            L4Sum::UdpV4 => BPF_F_MARK_MANGLED_0,
            L4Sum::UdpV6 => BPF_F_MARK_MANGLED_0 | BPF_F_MARK_ENFORCE,
        } as u64;
        // Size 0: `to` is a difference (a ones' complement sum) to apply. The kernel applies a
        // pseudo-header change to a partial checksum (and to `skb->csum` of a complete one);
        // a data change only to a finished checksum (a partial one is finished over the new
        // data anyway).
        let skb = self.skb.skb;
        // SAFETY: plain helper calls; callers derive every packet pointer afresh afterwards.
        unsafe {
            bpf_l4_csum_replace(
                skb,
                off as u32,
                0,
                pseudo.sum() as u64,
                BPF_F_PSEUDO_HDR as u64 | zero,
            ) == 0
                && bpf_l4_csum_replace(skb, off as u32, 0, data.sum() as u64, zero) == 0
        }
    }

    #[inline(always)]
    fn push_outer(&self, len: u32, outer_v4: bool, l3: usize) -> bool {
        // A VLAN tag in the packet (the kernel moves the outer one to the socket buffer's
        // metadata before tc; an inner one, or any in a test run, stays): the kernel's
        // encapsulation helper wants the IP packet right after the MAC header. Room in front
        // does for a packet that is not GSO (nothing else refers to its headers' places).
        if l3 != 14 {
            return self.gso_size() == 0 && self.grow_head(len);
        }
        // After the MAC header, telling the kernel it is an IP-in-IP encapsulation: a GSO
        // packet's segments then get the outer header each, and their size shrinks by `len`
        // (so that they still fit the MTU the sender's segment size was made for).
        let flags = if outer_v4 {
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        } else {
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
        } as u64;
        // SAFETY: plain helper call; callers derive every packet pointer afresh afterwards.
        unsafe { bpf_skb_adjust_room(self.skb.skb, len as i32, BPF_ADJ_ROOM_MAC, flags) == 0 }
    }

    #[inline(always)]
    fn grow_head(&self, len: u32) -> bool {
        // SAFETY: as above.
        unsafe { bpf_skb_change_head(self.skb.skb, len, 0) == 0 }
    }

    #[inline(always)]
    fn set_len(&self, len: u32) -> bool {
        // SAFETY: as above.
        unsafe { bpf_skb_change_tail(self.skb.skb, len, 0) == 0 }
    }

    #[inline(always)]
    fn action(&self, xdp: u32) -> u32 {
        match xdp {
            // "Next": the interface's other tc programs (lb is attached first) and then the
            // stack; `TC_ACT_OK` would end the chain here.
            xdp_action::XDP_PASS => TC_ACT_UNSPEC as u32,
            xdp_action::XDP_DROP | xdp_action::XDP_ABORTED => TC_ACT_SHOT as u32,
            // Out of the interface it came in on.
            xdp_action::XDP_TX => {
                // SAFETY: plain helper call.
                unsafe { bpf_redirect(Frame::ingress_ifindex(self), 0) as u32 }
            }
            // `bpf_redirect` already said (TC_ACT_REDIRECT).
            other => other,
        }
    }
}

const _: () = assert!(TC_ACT_REDIRECT > xdp_action::XDP_REDIRECT);
