//! Bounds-checked packet access, shared by the programs.

use aya_ebpf::programs::XdpContext;

/// `data_end`, loaded afresh each time. A plain load lets LLVM prove a bounds check redundant
/// from earlier checks (e.g. "L4 header within IP total length, IP total length within the
/// frame") and delete it; the verifier cannot follow such proofs and rejects the access.
#[inline(always)]
pub fn data_end(ctx: &XdpContext) -> usize {
    // SAFETY: ctx points at the kernel's xdp_md for the duration of the program.
    unsafe { core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize }
}

/// A pointer to a `T` at `off`, if the whole `T` lies within the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let p = ctx.data() + off;
    if p + core::mem::size_of::<T>() > data_end(ctx) {
        return None;
    }
    Some(p as *mut T)
}
