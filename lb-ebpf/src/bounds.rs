//! Bounds-checked packet access, shared by the programs, for both kinds of program lb has: XDP
//! (`XdpContext`, the frame in the driver's buffer) and tc (`TcContext`, a socket buffer's
//! linear part).

use aya_ebpf::{
    helpers::generated::bpf_xdp_get_buff_len,
    programs::{TcContext, XdpContext},
    EbpfContext,
};

/// A packet the program can read and write directly, from `data` to `data_end`.
pub trait Bounded: EbpfContext {
    /// Start of the packet (its Ethernet header).
    fn data(&self) -> usize;
    /// End of the directly accessible part: the frame (XDP; its first buffer for a multi-buffer
    /// frame) or the linear part of the socket buffer (tc).
    fn data_end(&self) -> usize;
    /// Length of the whole packet, every buffer or fragment included.
    fn packet_len(&self) -> usize;
}

// `data` and `data_end` are loaded afresh each time (volatile). A plain load lets LLVM prove a
// bounds check redundant from earlier checks (e.g. "L4 header within IP total length, IP total
// length within the frame") and delete it; the verifier cannot follow such proofs and rejects
// the access. After a helper that moves the packet, a reload is what the verifier requires.

impl Bounded for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: ctx points at the kernel's xdp_md for the duration of the program.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data_end) as usize }
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        // SAFETY: plain helper call on this program's context.
        unsafe { bpf_xdp_get_buff_len(self.as_ptr().cast()) as usize }
    }
}

impl Bounded for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: skb points at the kernel's __sk_buff for the duration of the program.
        unsafe { core::ptr::read_volatile(&(*self.skb.skb).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.skb.skb).data_end) as usize }
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        // SAFETY: as above.
        unsafe { (*self.skb.skb).len as usize }
    }
}

/// `data_end`, loaded afresh.
#[inline(always)]
pub fn data_end(ctx: &impl Bounded) -> usize {
    ctx.data_end()
}

/// A pointer to a `T` at `off`, if the whole `T` lies within the directly accessible packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Bounded, off: usize) -> Option<*mut T> {
    let p = ctx.data() + off;
    if p + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(p as *mut T)
}
