//! Benchmark helpers (never attached to an interface):
//! - `bench_wrap` restores the frame from `BENCH_FRAME` — its start too, which encapsulation
//!   and decapsulation move and the kernel does not reset between repetitions — (and, if
//!   asked, gives it a new source address from a per-CPU sequence), then tail-calls the
//!   program under test in `BENCH_PROGS[0]`. Its own cost is measured by tail-calling
//!   `bench_pass` and subtracted.
//! - `bench_pass`: the floor, a program that only returns XDP_PASS.
//! - `bench_wrap_sb`, `bench_pass_sb`: the same for single-buffer XDP programs (`lb_decap`).
//! - `bench_wrap_tc`, `bench_pass_tc`: the same for tc programs (`lb_tc`), for frames whose
//!   length lb does not change (the wrapper restores the bytes only).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{Array, PerCpuArray, ProgramArray},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::bench::{BenchFrame, BENCH_MAX_FRAME};

#[btf_map(name = "BENCH_FRAME")]
static FRAME: Array<BenchFrame, 1> = Array::new();

#[btf_map(name = "BENCH_SEQ")]
static SEQ: PerCpuArray<u32, 1> = PerCpuArray::new();

#[btf_map(name = "BENCH_PROGS")]
static PROGS: ProgramArray<1> = ProgramArray::new();

#[btf_map(name = "BENCH_SB_PROGS")]
static SB_PROGS: ProgramArray<1> = ProgramArray::new();

#[btf_map(name = "BENCH_TC_PROGS")]
static TC_PROGS: ProgramArray<1> = ProgramArray::new();

#[inline(always)]
fn data_end(ctx: &XdpContext) -> usize {
    // SAFETY: ctx points at the kernel's xdp_md.
    unsafe { core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize }
}

// Multi-buffer (`frags`), like `lb_xdp`: a program array takes only programs that agree with
// its first user on that. `bench_wrap_sb`, `bench_pass_sb`: the same for single-buffer
// programs (`lb_decap`).
#[xdp(frags)]
pub fn bench_wrap(ctx: XdpContext) -> u32 {
    wrap(&ctx, &PROGS)
}

#[xdp]
pub fn bench_wrap_sb(ctx: XdpContext) -> u32 {
    wrap(&ctx, &SB_PROGS)
}

#[inline(always)]
fn wrap(ctx: &XdpContext, progs: &ProgramArray<1>) -> u32 {
    let Some(f) = FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let len = f.len as usize;
    // The previous run may have moved the start (its end stays): move it back. Called every
    // run, also with 0, so that the wrapper's cost (subtracted) is the same for every path.
    let now = data_end(ctx) as i64 - ctx.data() as i64;
    // SAFETY: plain helper call; packet pointers are derived afresh below.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), (now - len as i64) as i32) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    let data = ctx.data();
    let mut i = 0;
    while i < BENCH_MAX_FRAME / 8 {
        let off = i * 8;
        if off >= len {
            break;
        }
        if data + off + 8 > data_end(ctx) {
            return xdp_action::XDP_ABORTED;
        }
        // SAFETY: 8 bytes at data + off are within the packet, checked above.
        unsafe { *((data + off) as *mut u64) = f.words[i] };
        i += 1;
    }
    // Masked (not just compared) so that the verifier sees a bounded offset.
    let at = f.vary_at as usize & (BENCH_MAX_FRAME - 1);
    if at != 0 {
        if let Some(seq) = SEQ.get_ptr_mut(0) {
            // SAFETY: per-CPU slot.
            let s = unsafe {
                *seq = (*seq).wrapping_add(1);
                *seq
            };
            if data + at + 4 <= data_end(ctx) {
                // SAFETY: 4 bytes within the packet, checked above.
                // In 10.128.0.0/9 (IPv4: the whole address), never a martian source, and
                // never a client the bench uses for fixed flows (10.0.0.x). 2^23 addresses
                // per CPU: the bench pins its thread, and checks every run was a new flow.
                let v = (s & 0x007f_ffff) | 0x0a80_0000;
                unsafe { *((data + at) as *mut [u8; 4]) = v.to_be_bytes() };
            }
        }
    }
    // SAFETY: tail call into the program under test; returns only if the slot is empty.
    unsafe { progs.tail_call(ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[xdp(frags)]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bench_pass_sb(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn bench_wrap_tc(ctx: TcContext) -> i32 {
    let Some(f) = FRAME.get(0) else {
        return TC_ACT_SHOT;
    };
    let len = f.len as usize;
    // SAFETY (both loads): skb points at the kernel's __sk_buff; fresh loads each time.
    let data = unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).data) } as usize;
    let end = || unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).data_end) } as usize;
    let mut i = 0;
    while i < BENCH_MAX_FRAME / 8 {
        let off = i * 8;
        if off >= len {
            break;
        }
        if data + off + 8 > end() {
            return TC_ACT_SHOT;
        }
        // SAFETY: 8 bytes at data + off are within the packet, checked above.
        unsafe { *((data + off) as *mut u64) = f.words[i] };
        i += 1;
    }
    // SAFETY: tail call into the program under test; returns only if the slot is empty.
    unsafe { TC_PROGS.tail_call(&ctx, 0) };
    TC_ACT_SHOT
}

#[classifier]
pub fn bench_pass_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
