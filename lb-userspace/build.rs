//! Builds the eBPF program (lb-ebpf) with the pinned nightly and puts the object in OUT_DIR,
//! from where `src/object.rs` embeds it in the library and the `lb` binary.

use aya_build::{build_ebpf, Package, Toolchain};

/// The nightly that builds the eBPF crate; must use the same LLVM major version as bpf-linker.
/// `cargo xtask setup` installs it (keep the two in sync).
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-20";

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
