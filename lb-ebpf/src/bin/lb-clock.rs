//! `lb_clock`: tells userspace the data plane's clock. Run with BPF_PROG_TEST_RUN on a frame of
//! at least 16 bytes, it writes `bpf_jiffies64()` (the kernel's tick counter, which lb's
//! flow state is timed with) into the frame's first 8 bytes and `bpf_ktime_get_ns()` (the
//! monotonic clock, read in the same run: userspace measures the tick length from pairs of
//! them) into the next 8, little-endian. Never attached.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::xdp,
    programs::XdpContext,
};
use lb_ebpf::bounds::ptr_at;

#[xdp]
pub fn lb_clock(ctx: XdpContext) -> u32 {
    if let Some(p) = ptr_at::<[[u8; 8]; 2]>(&ctx, 0) {
        // SAFETY: plain helper calls; 16 bytes within the frame, checked by ptr_at.
        unsafe {
            *p = [
                bpf_jiffies64().to_le_bytes(),
                bpf_ktime_get_ns().to_le_bytes(),
            ]
        };
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
