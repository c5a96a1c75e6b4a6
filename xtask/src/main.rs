//! `cargo xtask …`: set-up, tests, demo and benchmarks for lb.

mod dataplane_mutants;
mod package;
mod setup;

use std::{
    io::{BufRead, BufReader},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lb's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (Debian packages, the pinned nightly, bpf-linker).
    /// Idempotent: on a set-up machine it only checks, in seconds.
    Setup,
    /// Set up, then run every check and test (needs root: tests load BPF programs and create
    /// network namespaces).
    Test {
        /// Skip formatting and clippy checks.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Formatting and clippy, for the host crates and the eBPF crate.
    Lint,
    /// Build the Debian package (target/package/lb_VERSION_ARCH.deb): lb, its systemd unit,
    /// /etc/lb/lb.toml (a conffile), man pages, shell completions and the docs. `--check`
    /// then installs it here, checks it and purges it (needs root).
    Package {
        #[arg(long)]
        check: bool,
    },
    /// Set up (plus wrk, nftables, HAProxy), build, and measure lb; writes BENCHMARKS.md and
    /// docs/bench-per-packet.svg. `--quick` for a smoke run; extra arguments go to lb-bench.
    Bench {
        #[arg(long)]
        quick: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and show lb balancing real connections through a virtual gateway
    /// (network namespaces; needs root). Extra arguments go to lb-demo (try `-- --help`).
    Demo {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, then apply each deliberate data-plane bug (wrong slot, IPv6 VIP traffic dropped,
    /// TCP checksum not updated, TTL untouched, reverse path skipped, conntrack ignored) to a
    /// copy of HEAD and require a data-plane test to fail for it (needs root). Writes
    /// target/dataplane-mutants.md.
    DataplaneMutants {
        /// Only this bug (by name).
        #[arg(long)]
        only: Option<String>,
    },
    /// Set up (plus cargo-mutants), then mutation-test the pure code — lb-common and
    /// lb-userspace's maglev.rs, schedule.rs, model.rs and config.rs — against its unit tests
    /// (.cargo/mutants.toml; docs/testing.md). Writes target/mutants.out; fails if fewer than 90%
    /// of the mutants are caught. Extra arguments go to cargo mutants (try `-- --list`).
    Mutants {
        /// Mutants built and tested at once (each build already uses every core).
        #[arg(long, default_value_t = 1)]
        jobs: u32,
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test { no_lint, args } => {
            setup::run()?;
            if !no_lint {
                lint()?;
            }
            test(&args)?;
            // The package a gateway operator installs: built, installed, checked, purged.
            if args.is_empty() {
                package::check(&package::build(&workspace_root()?)?)?;
            }
            Ok(())
        }
        Task::Lint => {
            setup::run()?;
            lint()
        }
        Task::Package { check } => {
            setup::run()?;
            let deb = package::build(&workspace_root()?)?;
            if check {
                if !setup::is_root() {
                    bail!("the package check installs the package: run it as root");
                }
                package::check(&deb)?;
            }
            Ok(())
        }
        Task::Bench { quick, args } => {
            setup::run()?;
            setup::bench_packages()?;
            let mut bench_args: Vec<&str> = Vec::new();
            if quick {
                bench_args.push("--quick");
            }
            bench_args.extend(args.iter().map(String::as_str));
            run_release("lb-bench", "the benchmarks", &bench_args)
        }
        Task::Demo { args } => {
            setup::run()?;
            let demo_args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_release("lb-demo", "the demo", &demo_args)
        }
        Task::DataplaneMutants { only } => {
            setup::run()?;
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .context("the workspace root")?;
            dataplane_mutants::run(root, only.as_deref())
        }
        Task::Mutants { jobs, args } => {
            setup::run()?;
            setup::cargo_mutants()?;
            mutants(jobs, &args)
        }
    }
}

/// The workspace's root directory.
fn workspace_root() -> Result<std::path::PathBuf> {
    Ok(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?
        .to_path_buf())
}

/// The share of mutants `cargo xtask mutants` requires the unit tests to catch (issue 14).
const MUTANTS_CAUGHT_MIN: f64 = 0.90;

/// Runs cargo mutants from the workspace root with .cargo/mutants.toml, then counts its
/// outcomes: caught / (caught + missed) must reach `MUTANTS_CAUGHT_MIN`. Unviable mutants (they
/// do not compile) and timeouts (the tests hang) are reported but count on neither side.
fn mutants(jobs: u32, extra: &[String]) -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?;
    let out_parent = root.join("target");
    let jobs = jobs.to_string();
    let mut args = vec![
        "mutants",
        "--jobs",
        jobs.as_str(),
        "--output",
        out_parent.to_str().context("target path is not UTF-8")?,
    ];
    args.extend(extra.iter().map(String::as_str));
    eprintln!("+ cargo {}", args.join(" "));
    let status = Command::new("cargo")
        .args(&args)
        .current_dir(root)
        .status()
        .context("running cargo mutants")?;
    if extra.iter().any(|a| a.starts_with("--list")) {
        if !status.success() {
            bail!("cargo mutants failed ({status})");
        }
        return Ok(());
    }
    // 0: every mutant caught; 2: some missed; 3: some timed out. Anything else (the baseline
    // failed, bad arguments) is an error.
    if !matches!(status.code(), Some(0 | 2 | 3)) {
        bail!("cargo mutants failed ({status})");
    }
    let out = out_parent.join("mutants.out");
    let lines = |name: &str| -> Result<Vec<String>> {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(text.lines().map(str::to_string).collect())
    };
    let caught = lines("caught.txt")?.len();
    let missed = lines("missed.txt")?;
    let timeouts = lines("timeout.txt")?.len();
    let unviable = lines("unviable.txt")?.len();
    let total = caught + missed.len() + timeouts + unviable;
    for m in &missed {
        println!("missed: {m}");
    }
    let scored = caught + missed.len();
    if scored == 0 {
        bail!("no mutant was tested");
    }
    let share = caught as f64 / scored as f64;
    println!(
        "mutants: {total} — {caught} caught, {} missed, {unviable} unviable, {timeouts} timeouts; \
         caught / (caught + missed) = {:.1}% (docs/testing.md lists the survivors and why)",
        missed.len(),
        share * 100.0
    );
    if share < MUTANTS_CAUGHT_MIN {
        bail!(
            "only {:.1}% of mutants caught (at least {:.0}% required): add unit tests that \
             catch the missed ones, listed above and in {}",
            share * 100.0,
            MUTANTS_CAUGHT_MIN * 100.0,
            out.join("missed.txt").display()
        );
    }
    Ok(())
}

/// Builds lb's binaries in release mode and runs `bin --lb target/release/lb ARGS` (as root:
/// the demo and benchmarks create network namespaces and load BPF programs).
fn run_release(bin: &str, what: &str, args: &[&str]) -> Result<()> {
    if !setup::is_root() {
        bail!("run {what} as root: it creates network namespaces and loads BPF programs");
    }
    eprintln!("building lb (release)…");
    build_release(&["--bins", "--features", "testbed"])?;
    let mut full = vec!["--lb", "target/release/lb"];
    full.extend_from_slice(args);
    cmd(&format!("target/release/{bin}"), &full)
}

/// `cargo build --release` of lb-userspace with `what` (targets, features).
pub(crate) fn build_release(what: &[&str]) -> Result<()> {
    let mut args = vec!["build", "--release", "--quiet", "-p", "lb-userspace"];
    args.extend_from_slice(what);
    cmd("cargo", &args)
}

/// Runs a command, echoing it, failing on a non-zero exit.
pub(crate) fn cmd(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn lint() -> Result<()> {
    cmd("cargo", &["fmt", "--all", "--", "--check"])?;
    cmd(
        "cargo",
        &["clippy", "--all-targets", "--", "-D", "warnings"],
    )?;
    let tc = format!("+{}", setup::EBPF_TOOLCHAIN);
    // The eBPF crate is checked for its own target with the nightly that builds it.
    let mut c = Command::new("cargo");
    c.args([
        tc.as_str(),
        "clippy",
        "-p",
        "lb-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ])
    .env("CARGO_TARGET_DIR", "target/ebpf-lint");
    eprintln!("+ cargo {tc} clippy -p lb-ebpf --target bpfel-unknown-none");
    if !c
        .status()
        .context("running cargo clippy for lb-ebpf")?
        .success()
    {
        bail!("clippy found problems in lb-ebpf");
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    if !setup::is_root() {
        bail!("the tests load BPF programs and create network namespaces: run them as root");
    }
    // Every test binary runs even when one fails, so one run reports every failure.
    let mut args = vec![
        "test",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--no-fail-fast",
    ];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    eprintln!("+ cargo {}", args.join(" "));
    let mut child = Command::new("cargo")
        .args(&args)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    // Echo the output, add up cargo's per-binary "test result:" lines into one total, and note
    // which tests failed and how many a filter left out (cargo names the failed binaries on
    // stderr).
    let (mut passed, mut failed, mut ignored, mut filtered) = (0u64, 0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            failures.push(name.to_string());
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
            ignored += count("ignored");
            filtered += count("filtered out");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    for f in &failures {
        println!("failed: {f}");
    }
    if filtered > 0 {
        println!("filtered out: {filtered} tests were not run (the arguments given select others)");
    }
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}
