//! `lb-bench --quick` still runs: every path it measures still takes the path it claims (it
//! checks each round's verdict and output). No timing is asserted here — numbers come from
//! `cargo xtask bench`.

#[test]
fn bench_quick_runs_and_checks_its_paths() {
    let dir = std::env::temp_dir().join(format!("lbt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out_file = dir.join("BENCHMARKS.md");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb-bench"))
        .args([
            "--quick",
            "--no-e2e",
            // (Large configurations: a minute of the suite's time, no path of the data plane.)
            "--no-scale",
            "--lb",
            env!("CARGO_BIN_EXE_lb"),
            "--out",
        ])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(&out_file).unwrap();
    for row in [
        "| not for a VIP (pass) |",
        "| established IPv4 (conntrack hit) |",
        "| new flow IPv6, no next-hop cache (route lookup) |",
        "| reverse NAT IPv4 (reply to the VIP) |",
        "| 1000 backends |",
        "| established IPv4, dsr-l2 |",
        "| established IPv4 in IPv4, ipip |",
        "| established IPv6 in IPv6, ipip |",
        "| decap IPv4 in IPv4 (backend, lb decap) |",
    ] {
        assert!(md.contains(row), "{row} missing:\n{md}");
    }
    // Every per-packet row is accounted for by lb's counters (the bench fails otherwise).
    assert!(
        md.contains("| verified runs | counters = runs | new flows stored |"),
        "verified runs column missing:\n{md}"
    );
    assert!(!md.contains("not verified"), "a row is not verified:\n{md}");
    // The per-packet targets are computed from rows that exist.
    assert!(
        md.contains("Ratios of this run against the per-packet targets")
            && !md.contains("row missing"),
        "targets line:\n{md}"
    );
    // New-flow rows start from an emptied unconfirmed table with room for all of them.
    let new_rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| new flow")).collect();
    assert!(new_rows.len() >= 10, "new-flow rows missing:\n{md}");
    for row in new_rows {
        assert!(row.contains("| 0 → "), "not from an empty table: {row}");
    }
    // The programs' sizes as the kernel reports them, for every program.
    for program in ["lb_xdp", "lb_ipip", "lb_icmp", "lb_decap"] {
        let row = md
            .lines()
            .skip_while(|l| !l.starts_with("## Program sizes"))
            .find(|l| l.starts_with(&format!("| {program} | ")))
            .unwrap_or_else(|| panic!("no size row for {program}:\n{md}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for at in [2, 4] {
            let n: u32 = cells[at]
                .parse()
                .unwrap_or_else(|_| panic!("{program}: {:?} is not a count", cells[at]));
            assert!(n > 0, "{row}");
        }
    }
    assert!(dir.join("docs/bench-per-packet.svg").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
