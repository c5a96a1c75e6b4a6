//! `cargo xtask dataplane-mutants`: deliberate bugs in the data plane, each of which the tests
//! must catch. Each bug is applied to a scratch copy of the committed tree (`git archive HEAD`,
//! never the working tree), which is then built and tested; a bug that no test notices fails
//! the task. Results go to target/dataplane-mutants.md.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};

/// One deliberate bug: text replacements in the eBPF sources (each must match exactly once).
struct Bug {
    name: &'static str,
    what: &'static str,
    edits: &'static [(&'static str, &'static str, &'static str)],
}

const BUGS: &[Bug] = &[
    Bug {
        name: "wrong-slot",
        what: "a new flow's hash indexes the slot after the right one",
        edits: &[(
            "lb-ebpf/src/main.rs",
            "_ => flow_hash(flow, seed) % vip.table_size,",
            "_ => flow_hash(flow, seed).wrapping_add(1) % vip.table_size,",
        )],
    },
    Bug {
        name: "ipv6-vip-dropped",
        what: "every IPv6 packet to a VIP is dropped",
        edits: &[(
            "lb-ebpf/src/main.rs",
            "    mirrored: bool,\n) -> Option<Verdict> {\n",
            "    mirrored: bool,\n) -> Option<Verdict> {\n    if pkt.family == lb_common::FAMILY_V6 {\n        return Some(Verdict::drop(Counter::DropNoBackend));\n    }\n",
        )],
    },
    Bug {
        name: "tcp-checksum-not-updated",
        what: "NAT rewrites TCP ports and addresses without updating the TCP checksum",
        edits: &[(
            "lb-ebpf/src/nat.rs",
            "    ctx.l4_csum(pkt.l4_off + check_off, l4, data, kind)\n}",
            "    pkt.proto == PROTO_TCP || ctx.l4_csum(pkt.l4_off + check_off, l4, data, kind)\n}",
        )],
    },
    Bug {
        name: "ttl-untouched",
        what: "NAT leaves the TTL / hop limit as it was",
        edits: &[
            (
                "lb-ebpf/src/nat.rs",
                "        ip.ttl = ip.ttl.wrapping_sub(1);\n        c.word(ttl_proto, u16::from_ne_bytes([ip.ttl, ip.protocol]));\n        ip.check = c.finish();\n        l4.word32(old, addr[0]);",
                "        let _ = ttl_proto;\n        ip.check = c.finish();\n        l4.word32(old, addr[0]);",
            ),
            (
                "lb-ebpf/src/nat.rs",
                "        ip.hop_limit = ip.hop_limit.wrapping_sub(1);\n        l4.addr(&old, addr);",
                "        l4.addr(&old, addr);",
            ),
        ],
    },
    Bug {
        name: "reverse-path-skipped",
        what: "replies from backends are forwarded without their source rewritten to the VIP",
        edits: &[(
            "lb-ebpf/src/main.rs",
            "    if !nat::rewrite(ctx, pkt, Side::Src, &rev.vip.addr_be, rev.vip.port_be) {",
            // (The rewrite stays in the program, only never runs: removing code can change
            // the compiler's stack layout enough to fail the build, which is not the bug.)
            "    if rev.vip_id == u32::MAX && !nat::rewrite(ctx, pkt, Side::Src, &rev.vip.addr_be, rev.vip.port_be) {",
        )],
    },
    Bug {
        name: "conntrack-ignored",
        what: "the forward path never finds a confirmed flow's entry",
        edits: &[(
            "lb-ebpf/src/main.rs",
            "Some(p) => confirmed_flow(pkt, vip, flow, p, now),",
            "Some(p) => confirmed_flow(pkt, vip, flow, p, now).filter(|_| false),",
        )],
    },
    Bug {
        name: "vip-mirror-unchecked",
        what: "a confirmed flow's VIP is taken from the mirror slot without checking it",
        edits: &[(
            "lb-ebpf/src/main.rs",
            "    let v = &m.vip;\n    if v.addr_be == pkt.dst\n",
            "    let v = &m.vip;\n    if true || v.addr_be == pkt.dst\n",
        )],
    },
    Bug {
        name: "nexthop-never-stale",
        what: "a cached next hop is used whatever its age",
        edits: &[(
            "lb-ebpf/src/nexthop.rs",
            "        && now.wrapping_sub(e.checked_ns) < max_age\n}",
            "        && (now.wrapping_sub(e.checked_ns) < max_age || max_age > 0)\n}",
        )],
    },
    Bug {
        name: "nexthop-any-generation",
        what: "a cached next hop made for the id's previous holder is used",
        edits: &[(
            "lb-ebpf/src/nexthop.rs",
            "        && e.generation == backend.generation\n        && len <= e.max_len",
            "        && len <= e.max_len",
        )],
    },
    Bug {
        name: "vlan-offset-ignored",
        what: "an IPv4 packet's header is read at 14 bytes, VLAN tags or not",
        edits: &[(
            "lb-ebpf/src/parse.rs",
            "        Some((ETH_P_IP, l3)) => parse_v4(ctx, l3),",
            "        Some((ETH_P_IP, _)) => parse_v4(ctx, ETH_LEN),",
        )],
    },
    Bug {
        name: "vlan-tags-dropped-on-encapsulation",
        what: "ipip encapsulation writes the outer header over the VLAN tags",
        edits: &[(
            "lb-ebpf/src/dsr.rs",
            "        return false;\n    }\n    let l3 = pkt.l3_off;\n",
            "        return false;\n    }\n    let l3 = ETH_LEN;\n",
        )],
    },
    Bug {
        name: "tc-vlan-tag-aside-ignored",
        what: "lb_tc takes a frame whose VLAN tag the kernel keeps aside for an untagged one",
        edits: &[(
            "lb-ebpf/src/fib.rs",
            "ETH_P_8021AD_BE || ctx.vlan_tag_aside();",
            "ETH_P_8021AD_BE;",
        )],
    },
    Bug {
        name: "native-single-buffer",
        what: "native mode's programs are not multi-buffer (xdp.frags): no jumbo frames",
        edits: &[
            (
                "lb-ebpf/src/main.rs",
                "#[xdp(frags)]\n#[inline(always)]\npub fn lb_xdp(",
                "#[xdp]\n#[inline(always)]\npub fn lb_xdp(",
            ),
            (
                "lb-ebpf/src/main.rs",
                "#[xdp(frags)]\npub fn lb_ipip(",
                "#[xdp]\npub fn lb_ipip(",
            ),
            (
                "lb-ebpf/src/main.rs",
                "#[xdp(frags)]\npub fn lb_icmp(",
                "#[xdp]\npub fn lb_icmp(",
            ),
        ],
    },
    Bug {
        name: "unclaimed-passed",
        what: "traffic to a VIP's address that no VIP claims is passed on (to loop back to the router)",
        edits: &[
            (
                "lb-ebpf/src/main.rs",
                "    if is_vip_address(pkt.family, &pkt.dst) {\n        return Verdict::drop(Counter::DropVipUnclaimed);\n    }\n",
                "",
            ),
            (
                "lb-ebpf/src/main.rs",
                "Some((family, dst)) if is_vip_address(family, &dst) => {",
                "Some((family, dst)) if family == 255 && is_vip_address(family, &dst) => {",
            ),
        ],
    },
    Bug {
        name: "stateless-by-table",
        what: "stateless reverse NAT translates a reply only if the VIP's table still gives the flow to its backend",
        edits: &[(
            "lb-ebpf/src/main.rs",
            "    let Some(member) = usable_backend(r.backend_id, r.vip_id) else {",
            "    let in_table = hashed_index(&vip, &key, flow::seed())\n        .and_then(|i| TABLE.get(vip.table_off.wrapping_add(i)))\n        .is_some_and(|id| *id == r.backend_id);\n    let Some(member) = usable_backend(r.backend_id, r.vip_id).filter(|_| in_table) else {",
        )],
    },
    Bug {
        name: "tc-checksum-in-place",
        what: "lb_tc updates L4 checksums in place, as XDP does (wrong for partial checksums)",
        edits: &[(
            "lb-ebpf/src/frame.rs",
            "        let zero = match kind {",
            "        if off != usize::MAX {\n            return l4_csum_in_place(self, off, pseudo, data, kind);\n        }\n        let zero = match kind {",
        )],
    },
    Bug {
        name: "tc-too-big-quote-unstable",
        what: "lb_tc's IPv4 too-big answer leaves the quoted checksum field for the kernel to finish",
        edits: &[(
            "lb-ebpf/src/dsr.rs",
            "        stable_field::<5>(ctx, l3 + 20 + 8 + 20, f)?;",
            "        let _ = f;",
        )],
    },
];

/// The test binaries that specify the data plane through the real program (seconds each;
/// `devices` moves data end to end through the tc fallback with verifying receivers).
const TESTS: &[&str] = &["fixtures", "fixtures_dsr", "random_packets", "devices"];

pub fn run(root: &Path, only: Option<&str>) -> Result<()> {
    // A fixed place under target/ (ignored by git): a run interrupted before its clean-up
    // leaves nothing behind that the next run does not replace, and the build cache in
    // target/dataplane-mutants/target is reused from run to run.
    let scratch = root.join("target/dataplane-mutants/tree");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    let result = run_in(root, &scratch, only);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn run_in(root: &Path, scratch: &Path, only: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(scratch)?;
    // The committed tree, not the working tree: main's files are never touched.
    let status = Command::new("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            r#"git -C "$0" archive HEAD | tar -x -C "$1""#,
        ])
        .arg(root)
        .arg(scratch)
        .status()?;
    ensure!(status.success(), "copying HEAD to {}", scratch.display());
    // A build cache of its own (the copy's crates have another path than main's anyway).
    let target = root.join("target/dataplane-mutants/target");
    let bugs: Vec<&Bug> = BUGS
        .iter()
        .filter(|b| only.is_none_or(|o| o == b.name))
        .collect();
    ensure!(!bugs.is_empty(), "no bug named {only:?}");
    eprintln!("baseline: the tests pass on the unchanged copy…");
    let (ok, failed) = test(scratch, &target);
    ensure!(
        ok?,
        "the tests fail on the unchanged tree ({}): fix that first",
        failed.join(", ")
    );
    let mut report = String::from(
        "# Data-plane mutants\n\nWritten by `cargo xtask dataplane-mutants`: each deliberate bug applied to a copy of HEAD, then `cargo test --release -p lb-userspace --no-fail-fast --test fixtures --test fixtures_dsr --test random_packets --test devices`.\n\n| bug | what it does | caught | failing tests | seconds |\n|---|---|---|---|---|\n",
    );
    let mut survivors = Vec::new();
    for bug in bugs {
        let started = Instant::now();
        let originals = apply(scratch, bug)?;
        eprintln!("bug {}: {}…", bug.name, bug.what);
        let (ok, failed) = test(scratch, &target);
        for (path, text) in originals {
            std::fs::write(&path, text)?;
        }
        let (ok, failed) = (ok?, failed);
        let caught = !ok;
        eprintln!(
            "bug {}: {} ({})",
            bug.name,
            if caught { "caught" } else { "NOT CAUGHT" },
            failed.join(", ")
        );
        if !caught {
            survivors.push(bug.name);
        }
        report.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} |\n",
            bug.name,
            bug.what,
            if caught { "yes" } else { "**no**" },
            failed.join(", "),
            started.elapsed().as_secs_f64()
        ));
    }
    let out = root.join("target/dataplane-mutants.md");
    std::fs::write(&out, &report)?;
    print!("{report}");
    eprintln!("wrote {}", out.display());
    if !survivors.is_empty() {
        bail!("bugs no test caught: {}", survivors.join(", "));
    }
    Ok(())
}

/// Applies a bug's edits; returns the original texts to restore.
fn apply(scratch: &Path, bug: &Bug) -> Result<Vec<(PathBuf, String)>> {
    let mut originals: Vec<(PathBuf, String)> = Vec::new();
    for (file, from, to) in bug.edits {
        let path = scratch.join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {file}"))?;
        let n = text.matches(from).count();
        ensure!(
            n == 1,
            "bug {}: {from:?} occurs {n} times in {file} (the data plane changed: update the bug)",
            bug.name
        );
        if !originals.iter().any(|(p, _)| *p == path) {
            originals.push((path.clone(), text.clone()));
        }
        std::fs::write(&path, text.replacen(from, to, 1))?;
    }
    Ok(originals)
}

/// Runs the data-plane tests in `dir`: (all passed, the names of the tests that failed). A
/// build failure is an error, not a catch: a bug must compile to count.
fn test(dir: &Path, target: &Path) -> (Result<bool>, Vec<String>) {
    let mut args = vec!["test", "--release", "-p", "lb-userspace", "--no-fail-fast"];
    for t in TESTS {
        args.extend(["--test", t]);
    }
    // Build first, so that a bug that does not compile is told apart from a failing test.
    let built = Command::new("cargo")
        .args(&args)
        .arg("--no-run")
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .status();
    match built {
        Ok(s) if s.success() => {}
        Ok(s) => return (Err(anyhow::anyhow!("the build failed ({s})")), vec![]),
        Err(e) => return (Err(e.into()), vec![]),
    }
    let out = Command::new("cargo")
        .args(&args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return (Err(e.into()), vec![]),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<String> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("test ")
                .and_then(|l| l.strip_suffix(" ... FAILED"))
        })
        .map(str::to_string)
        .collect();
    (Ok(out.status.success()), failed)
}
