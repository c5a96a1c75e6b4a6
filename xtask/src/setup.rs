//! Installs what lb needs on a fresh Debian machine, idempotently, saying what it does.
//! The recipe (versions, LLVM_PREFIX) is the one in shared/SETUP-NOTES.md.

use std::process::{Command, Stdio};

use anyhow::{bail, Result};

use crate::cmd;

/// The nightly that builds the eBPF crate (LLVM 22, matching bpf-linker). Keep in sync with
/// lb-userspace/build.rs.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-07-20";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-mutants, for `cargo xtask mutants` (the figures in docs/testing.md are from this one).
const CARGO_MUTANTS_VERSION: &str = "27.1.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Debian packages: LLVM 22 for bpf-linker, and the tools tests and operators use.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "tcpdump",
    "procps",
    // BGP for the scale-out test (several gateways behind an ECMP router); nft counts what
    // crosses its router and plays an ACL on its backends.
    "bird2",
    "nftables",
    // The package check: man pages, the unit's exposure (systemd-analyze), and a fresh
    // Debian to install it on.
    "man-db",
    "systemd",
    "debootstrap",
    // The service test: the agent as its unit runs it (setpriv is util-linux's, on every
    // Debian), its system calls traced, its /metrics checked by promtool.
    "strace",
    "prometheus",
];

pub fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc_getuid() == 0 }
}

extern "C" {
    #[link_name = "getuid"]
    fn libc_getuid() -> u32;
}

fn quiet(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run() -> Result<()> {
    eprintln!("setup: checking the machine");
    debian_packages()?;
    nightly()?;
    bpf_linker()?;
    eprintln!("setup: ready");
    Ok(())
}

/// What only `cargo xtask bench` needs: the load generator and the two comparison setups.
const BENCH_PACKAGES: &[&str] = &["wrk", "nftables", "haproxy"];

pub fn bench_packages() -> Result<()> {
    install(BENCH_PACKAGES)
}

fn debian_packages() -> Result<()> {
    install(PACKAGES)
}

fn install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            quiet("dpkg-query", &["-W", "-f=${Status}", p])
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present");
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    cmd("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    // Non-interactive: CI has no terminal.
    std::env::set_var("DEBIAN_FRONTEND", "noninteractive");
    cmd("apt-get", &args)
}

fn nightly() -> Result<()> {
    let installed = quiet("rustup", &["toolchain", "list"])
        .is_some_and(|s| s.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN)));
    let components = if installed {
        quiet(
            "rustup",
            &[
                "component",
                "list",
                "--installed",
                "--toolchain",
                EBPF_TOOLCHAIN,
            ],
        )
        .unwrap_or_default()
    } else {
        String::new()
    };
    let has = |c: &str| components.lines().any(|l| l.starts_with(c));
    if has("rust-src") && has("clippy") {
        eprintln!("setup: {EBPF_TOOLCHAIN} with rust-src and clippy present");
        return Ok(());
    }
    eprintln!("setup: installing {EBPF_TOOLCHAIN} with rust-src and clippy");
    cmd(
        "rustup",
        &[
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src,clippy",
        ],
    )
}

fn bpf_linker() -> Result<()> {
    let version = quiet("bpf-linker", &["--version"]).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} on LLVM 22 (about a minute)");
    std::env::set_var("LLVM_PREFIX", LLVM_PREFIX);
    let spec = format!("bpf-linker@{BPF_LINKER_VERSION}");
    cmd(
        "cargo",
        &[
            "install",
            &spec,
            "--no-default-features",
            "--features",
            "llvm-22",
            "--locked",
        ],
    )
}

/// What only `cargo xtask mutants` needs: cargo-mutants (a minute to build, once).
pub fn cargo_mutants() -> Result<()> {
    let version = quiet("cargo", &["mutants", "--version"]).unwrap_or_default();
    if version.contains(CARGO_MUTANTS_VERSION) {
        eprintln!("setup: cargo-mutants {CARGO_MUTANTS_VERSION} present");
        return Ok(());
    }
    eprintln!("setup: installing cargo-mutants {CARGO_MUTANTS_VERSION} (about a minute)");
    let spec = format!("cargo-mutants@{CARGO_MUTANTS_VERSION}");
    cmd("cargo", &["install", &spec, "--locked"])
}
