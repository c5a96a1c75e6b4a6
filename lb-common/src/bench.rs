//! Shared with the benchmark wrapper program (`lb-ebpf/src/bin/lb-bench.rs`), which restores
//! the frame before every run so that BPF_PROG_TEST_RUN's `repeat` measures the path intended
//! (with `repeat` > 1 the kernel reruns the program on the buffer it already rewrote).

use bytemuck::{Pod, Zeroable};

/// Largest frame the wrapper restores (bytes; frames must be a multiple of 8 long).
pub const BENCH_MAX_FRAME: usize = 128;

/// The frame to restore, in map `BENCH_FRAME` at index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BenchFrame {
    /// Frame length in bytes: a multiple of 8, at most `BENCH_MAX_FRAME`.
    pub len: u32,
    /// If non-zero, the offset of 4 bytes (e.g. the last 4 bytes of the source address) that
    /// the wrapper sets to a per-CPU sequence number on every run, so that every run is a new
    /// flow. (Checksums are not fixed: lb never validates them.)
    pub vary_at: u32,
    /// The frame's bytes.
    pub words: [u64; BENCH_MAX_FRAME / 8],
}
const _: () = assert!(core::mem::size_of::<BenchFrame>() == 8 + BENCH_MAX_FRAME);

/// Map names of the benchmark object.
pub const BENCH_FRAME_MAP: &str = "BENCH_FRAME";
pub const BENCH_SEQ_MAP: &str = "BENCH_SEQ";
pub const BENCH_PROGS_MAP: &str = "BENCH_PROGS";
/// `ProgramArray` of `bench_wrap_sb`: slot 0, the single-buffer XDP program under test.
pub const BENCH_SB_PROGS_MAP: &str = "BENCH_SB_PROGS";
/// `ProgramArray` of `bench_wrap_tc`: slot 0, the tc program under test.
pub const BENCH_TC_PROGS_MAP: &str = "BENCH_TC_PROGS";

#[cfg(feature = "user")]
// SAFETY: Pod without padding.
unsafe impl aya::Pod for BenchFrame {}
