//! The compiled XDP program, embedded at build time by `build.rs`.

/// ELF object of the lb XDP program.
pub static LB_XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

/// Name of the XDP program inside the object (multi-buffer: native mode).
pub const LB_XDP_PROGRAM: &str = "lb_xdp";

/// Name of its single-buffer twin (generic mode) inside the object.
pub const LB_XDP_GENERIC_PROGRAM: &str = "lb_xdp_generic";

/// Name of the same data plane as a tc program (`lb attach --mode tc`) inside the object.
pub const LB_TC_PROGRAM: &str = "lb_tc";

/// ELF object of the benchmark helpers (`bench_wrap`, `bench_pass`).
pub static LB_BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench"));

/// ELF object of the decapsulation program backends attach (`lb decap attach`).
pub static LB_DECAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// Name of the decapsulation program inside its object.
pub const LB_DECAP_PROGRAM: &str = "lb_decap";

/// ELF object of `lb_clock`, which reads the data plane's clock for userspace (`crate::clock`).
pub static LB_CLOCK_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-clock"));
