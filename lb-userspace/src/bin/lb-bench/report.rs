//! BENCHMARKS.md and its chart.

use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::Result;

use crate::{
    control::BuildTime,
    e2e::{E2eResult, SETUPS},
    per_packet::{PathResult, Settings},
    rig::{ProgramSize, Sample},
    Args,
};

/// A program's (processed, translated) figures in an earlier report, as text ("" if absent).
fn previous_size(report: &str, name: &str) -> (String, String) {
    let start = format!("| {name} | ");
    report
        .lines()
        .skip_while(|l| !l.starts_with("## Program sizes"))
        .find(|l| l.starts_with(&start))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // "", name, processed, previous, translated, previous, ""
            (
                cells.get(2).unwrap_or(&"").to_string(),
                cells.get(4).unwrap_or(&"").to_string(),
            )
        })
        .unwrap_or_default()
}

pub struct Report {
    md: String,
    chart: Vec<(String, f64)>,
    floor: f64,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpus();
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{cpu}, {cores} vCPUs, {mem}, Linux {kernel}")
}

/// CPUs this process may run on.
fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

fn fmt_sample(s: &Sample) -> String {
    format!("{:.1} | {:.1}–{:.1}", s.median, s.p10, s.p90)
}

impl Report {
    pub fn new(args: &Args, s: &Settings) -> Report {
        let mut md = String::new();
        let cmd = if args.quick {
            "cargo xtask bench --quick"
        } else {
            "cargo xtask bench"
        };
        let _ = writeln!(md, "# lb benchmarks\n");
        let _ = writeln!(md, "Written by `{cmd}` — every number below comes from that command; re-run it to reproduce.\n");
        let _ = writeln!(md, "- Machine: {}", machine());
        let _ = writeln!(
            md,
            "- Per-packet method: BPF_PROG_TEST_RUN of the real program, `repeat` = {} per round, {} rounds; median and 10th–90th percentile over rounds. A wrapper program restores the frame before every run (so each run takes the intended path) and tail-calls lb; the wrapper's own cost (wrapper → a program that only returns XDP_PASS, minus that program alone) is subtracted. New-flow runs get a new source address every run. Every round's verdict and output frame are checked, and lb's counters account for every run (see the per-packet table).",
            s.repeat, s.rounds
        );
        let _ = writeln!(
            md,
            "- Compare within one run: the same row differs between runs.\n"
        );
        Report {
            md,
            chart: Vec::new(),
            floor: 0.0,
        }
    }

    pub fn paths(&mut self, floor: Sample, results: &[PathResult]) {
        self.floor = floor.median;
        let md = &mut self.md;
        let _ = writeln!(md, "## Per-packet cost by path\n");
        let _ = writeln!(
            md,
            "× floor: the row's median over the floor's, both from this run. Verified runs: runs of the program under test in the row, each counted by exactly one verdict counter; the counters named next to it each counted every one of those runs (all read before and after the row; the bench fails otherwise). New-flow rows also show no conntrack hit; new flows stored is `ct_miss` less the flows over the flood threshold. Before each new-flow row the unconfirmed conntrack table is emptied; its entries before → after the row, and its capacity, are in the last column.\n"
        );
        let _ = writeln!(md, "| path | programs run (instructions: \"Program sizes\") | ns/packet (median) | p10–p90 | × floor | verified runs | counters = runs | new flows stored | unconfirmed table: before → after / capacity |");
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        let _ = writeln!(
            md,
            "| floor: XDP program that only returns XDP_PASS | bench_pass | {} | 1.0 | | | | |",
            fmt_sample(&floor)
        );
        self.chart.push(("floor (XDP_PASS)".into(), floor.median));
        for r in results {
            let v = r.sample.verified.as_ref();
            let runs = match v {
                Some(v) => v.runs.to_string(),
                // A floor is a program that only returns: nothing of lb's to verify.
                None if r.name.starts_with("floor:") => "—".to_string(),
                None => "**not verified**".to_string(),
            };
            let counters = v.map_or(String::new(), |v| v.counters.clone());
            let new_flows = v
                .and_then(|v| v.new_flows)
                .map_or(String::new(), |n| n.to_string());
            let fill = v
                .and_then(|v| v.fill)
                .map_or(String::new(), |(before, after, cap)| {
                    format!("{before} → {after} / {cap}")
                });
            let programs = if r.name.starts_with("decap") {
                "lb_decap"
            } else if r.name.ends_with("tc program") {
                "lb_tc"
            } else if r.name.starts_with("floor: tc") {
                "bench_pass_tc"
            } else if r.name.contains("ipip") {
                "lb_xdp (→ lb_ipip for a route lookup)"
            } else {
                "lb_xdp"
            };
            let _ = writeln!(
                md,
                "| {} | {programs} | {} | {:.1} | {runs} | {counters} | {new_flows} | {fill} |",
                r.name,
                fmt_sample(&r.sample),
                r.sample.median / floor.median.max(0.1),
            );
            self.chart.push((r.name.clone(), r.sample.median));
        }
        let _ = writeln!(
            md,
            "\n![per-packet cost by path](docs/bench-per-packet.svg)\n"
        );
        // What limits the numbers, computed from the rows above.
        let get = |name: &str| {
            results
                .iter()
                .find(|r| r.name.starts_with(name))
                .map(|r| r.sample.median)
        };
        let stored = |name: &str| {
            results
                .iter()
                .find(|r| r.name.starts_with(name))
                .and_then(|r| r.sample.verified.as_ref())
                .and_then(|v| v.new_flows)
                .map_or("an unknown number".to_string(), |n| n.to_string())
        };
        let _ = writeln!(md, "What limits them (computed from the rows above):\n");
        if let (Some(c), Some(e)) = (
            get("established IPv4 (conntrack hit)"),
            get("established IPv4, no next-hop cache"),
        ) {
            let _ = writeln!(
                md,
                "- The established IPv4 rows with the default configuration and with the next-hop cache off (`nexthop_max_age_ms = 0`) differ only in the route lookup (`bpf_fib_lookup`) the cache replaces: it would be {:.0} ns of the {e:.0} ns of an established IPv4 packet ({:.0}%). By default the established path costs {:.1}× the floor, without the cache {:.1}×.",
                e - c,
                100.0 * (e - c) / e,
                c / floor.median,
                e / floor.median
            );
        }
        // The per-packet targets (issue 15), as ratios of rows of this run.
        let ratio = |a: &str, b: &str| Some(get(a)? / get(b)?);
        let targets = [
            (
                "established IPv4 / floor",
                get("established IPv4 (conntrack hit)").map(|e| e / floor.median),
                4.5,
            ),
            (
                "established IPv6 / established IPv4",
                ratio(
                    "established IPv6 (conntrack hit)",
                    "established IPv4 (conntrack hit)",
                ),
                1.15,
            ),
            (
                "ipip 4in4 established / NAT established IPv4",
                ratio(
                    "established IPv4 in IPv4, ipip",
                    "established IPv4 (conntrack hit)",
                ),
                1.3,
            ),
            (
                "dsr-l2 established IPv4 / NAT established IPv4",
                ratio(
                    "established IPv4, dsr-l2",
                    "established IPv4 (conntrack hit)",
                ),
                1.0,
            ),
            (
                "not for a VIP / floor",
                get("not for a VIP").map(|p| p / floor.median),
                1.5,
            ),
        ];
        let _ = writeln!(
            md,
            "- Ratios of this run against the per-packet targets: {}.",
            targets
                .iter()
                .map(|(what, v, target)| match v {
                    Some(v) => format!(
                        "{what} {v:.2} (target ≤ {target}: {})",
                        if *v <= *target { "met" } else { "**not met**" }
                    ),
                    None => format!("{what}: row missing"),
                })
                .collect::<Vec<_>>()
                .join("; ")
        );
        if let (Some(n), Some(f), Some(e)) = (
            get("new flow IPv4 (TCP SYN"),
            get("new flow IPv4 under a flood"),
            get("established IPv4 (conntrack hit)"),
        ) {
            let _ = writeln!(
                md,
                "- A new flow that is stored costs {n:.0} ns, {:.1}× an established one. Above the flood threshold (default {} new flows per second per CPU; that row sets 1, so {} of its packets were stored) a new flow is not stored and costs {f:.0} ns, {:.2}× the established row. What the stored new flow costs beyond one over the threshold — the unconfirmed table's lookup and insert, which a flow over the threshold skips — is the difference: {:.0} ns.",
                n / e,
                lb_common::DEFAULT_FLOOD_RATE,
                stored("new flow IPv4 under a flood"),
                f / e,
                n - f
            );
        }
        if let Some(p) = get("not for a VIP") {
            let _ = writeln!(
                md,
                "- Traffic not for a VIP costs {:.1}× the floor. The measured packet goes to a backend's address and port from a client port, so after parsing it is decided by two reads of the port filter (array lookups); traffic on a VIP's or a backend's port pays a hash lookup more.",
                p / floor.median
            );
        }
        let _ = writeln!(md);
    }

    /// The programs' sizes, next to the previous report's (read from the file this run
    /// replaces, if it has them).
    pub fn program_sizes(&mut self, sizes: &[ProgramSize], previous: &str) {
        let md = &mut self.md;
        let _ = writeln!(md, "## Program sizes\n");
        let _ = writeln!(
            md,
            "As the kernel reports them for the programs loaded by this run (`bpf_prog_info`): the instructions the verifier processed, over every path it explored, and the translated program's length in BPF instructions (what `bpftool prog dump xlated` lists). Exact, and independent of the machine's noise: a change to the data plane shows here even where the nanoseconds cannot tell. \"Previous\" is the report this run replaced.\n"
        );
        let _ = writeln!(
            md,
            "| program | verifier: processed instructions | previous | translated length (instructions) | previous |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        let show = |v: Option<u32>| v.map_or("not reported".to_string(), |v| v.to_string());
        for p in sizes {
            let (pv, px) = previous_size(previous, &p.name);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                p.name,
                show(p.verified),
                pv,
                show(p.xlated),
                px
            );
        }
        let _ = writeln!(md);
    }

    pub fn scaling(&mut self, rows: &[(String, Sample, Sample)]) {
        let md = &mut self.md;
        let _ = writeln!(md, "## Scaling (IPv4)\n");
        let _ = writeln!(
            md,
            "Verified as above: every run of each measurement counted (established: `tx`, `ct_hit`; new flow: `tx`, `ct_miss`, each stored in an emptied unconfirmed table).\n"
        );
        let _ = writeln!(
            md,
            "| configuration | established ns | p10–p90 | verified runs | new flow ns | p10–p90 | verified runs = new flows stored |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        let runs = |s: &Sample| {
            s.verified
                .as_ref()
                .map_or("**not verified**".to_string(), |v| v.runs.to_string())
        };
        for (name, e, n) in rows {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} |",
                fmt_sample(e),
                runs(e),
                fmt_sample(n),
                runs(n)
            );
        }
        let _ = writeln!(md);
    }

    pub fn control(&mut self, rows: &[BuildTime]) {
        let md = &mut self.md;
        let _ = writeln!(md, "## Control plane (M = 65537)\n");
        let _ = writeln!(md, "| backends | table build (ms, median) | first fill of the table map (ms) | slots written | one weight change (ms, median) | slots written |");
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for r in rows {
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.2} | {} | {:.2} | {} |",
                r.backends,
                r.build_ms,
                r.update_ms,
                r.slots_written,
                r.reweight_ms,
                r.reweight_slots
            );
        }
        let _ = writeln!(md, "\nThrough the library (`LbMaps::set_backends`), what `lb` and the agent call. The slot array is mapped into the process (`BPF_F_MMAPABLE`): the table is read back and the changed slots written in memory; the rest — the VIP entry, the backends in use (batched reads of the reverse-NAT map) — are map syscalls. A weight change includes building the whole table again.\n");
    }

    pub fn conntrack_memory(&mut self, capacity: u32, bytes: f64, per: f64) {
        let _ = writeln!(
            self.md,
            "Conntrack memory (kernel accounting, `bpftool map show` bytes_memlock): {:.0} MiB for {capacity} entries, {per:.0} bytes per entry — {:.0} MiB at 1M flows.\n",
            bytes / 1048576.0,
            per * 1_048_576.0 / 1048576.0
        );
    }

    pub fn control_at_scale(&mut self, rows: &[crate::scale_cp::Row]) {
        let md = &mut self.md;
        let _ = writeln!(
            md,
            "## Control plane at scale
"
        );
        let _ = writeln!(md, "The real `lb` binary and agent in a namespace of their own, on large configurations (wall time of each command, process start included). 1,000 VIPs of 64 backends each: the backend array holds 65,536 backends, so 1,000 × 100 does not fit.\n");
        let _ = writeln!(md, "| what | measured | note |");
        let _ = writeln!(md, "|---|---|---|");
        for r in rows {
            let _ = writeln!(md, "| {} | {} | {} |", r.what, r.value, r.note);
        }
        let _ = writeln!(md);
    }

    pub fn set_latency(&mut self, (first_packet_ms, command_ms): (f64, f64)) {
        let _ = writeln!(
            self.md,
            "`lb backend set` (the real binary, on pinned maps: a drained backend given almost all the weight) to the first new-flow packet on the new table: {first_packet_ms:.1} ms, median of 5; the command itself exits after {command_ms:.1} ms (it loads nothing: it opens the pinned maps, computes the table and writes the slots that change, while packets already use the slots written).\n"
        );
    }

    pub fn e2e(&mut self, r: &E2eResult, rounds: usize, secs: u32) {
        let med = |v: &Vec<f64>| {
            let mut s = v.clone();
            s.sort_by(|a, b| a.partial_cmp(b).unwrap());
            (s[s.len() / 2], s[0], s[s.len() - 1])
        };
        let md = &mut self.md;
        let _ = writeln!(md, "## End to end (the demo topology)\n");
        let _ = writeln!(
            md,
            "wrk (1 thread, 32 connections) in the client namespace → gateway namespace → 3 backends running the testbed's HTTP server; {rounds} rounds of {secs} s per setup, setups alternating; median (min–max). Connections/s: every request on a new connection (`Connection: close`); requests/s: keep-alive. CPU: busy CPU time of the whole machine per connection — client, gateway and backends share the same {} CPUs, so this is an upper bound of the gateway's share. wrk and the three servers share those CPUs with the gateway: treat differences smaller than the min–max spread as noise.\n",
            cpus()
        );
        let _ = writeln!(
            md,
            "| setup | connections/s | requests/s (keep-alive) | machine CPU µs per connection |"
        );
        let _ = writeln!(md, "|---|---|---|---|");
        for s in SETUPS {
            let (c, c0, c1) = med(&r.cps[s]);
            let (q, q0, q1) = med(&r.rps[s]);
            let (u, _, _) = med(&r.cpu_us_per_conn[s]);
            let _ = writeln!(
                md,
                "| {s} | {c:.0} ({c0:.0}–{c1:.0}) | {q:.0} ({q0:.0}–{q1:.0}) | {u:.0} |"
            );
        }
        let _ = writeln!(md);
    }

    pub fn write(mut self, path: &Path, took: Duration) -> Result<()> {
        let _ = writeln!(self.md, "Run took {:.0} s.", took.as_secs_f64());
        std::fs::write(path, &self.md)?;
        let dir = path.parent().unwrap_or(Path::new(".")).join("docs");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("bench-per-packet.svg"),
            svg_chart(&self.chart, self.floor),
        )?;
        Ok(())
    }
}

/// A horizontal bar chart of ns per packet by path, with the floor marked.
fn svg_chart(bars: &[(String, f64)], floor: f64) -> String {
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.5;
    let (left, width, row) = (330.0, 420.0, 28.0);
    let height = 50.0 + row * bars.len() as f64 + 30.0;
    let x = |v: f64| left + width * v / max;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"800\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">lb: ns per packet by path (BPF_PROG_TEST_RUN, median)</text>\n"
    );
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = 40.0 + row * i as f64;
        let colour = if i == 0 { "#999999" } else { "#3b75af" };
        let _ = write!(
            s,
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{}</text>\n<rect x=\"{left}\" y=\"{:.0}\" width=\"{:.1}\" height=\"18\" fill=\"{colour}\"/>\n<text x=\"{:.1}\" y=\"{:.0}\">{v:.1} ns ({:.1}× floor)</text>\n",
            left - 8.0,
            y + 13.0,
            name.replace('&', "&amp;").replace('<', "&lt;"),
            y,
            x(*v) - left,
            x(*v) + 5.0,
            y + 13.0,
            v / floor.max(0.1)
        );
    }
    let _ = write!(
        s,
        "<line x1=\"{:.1}\" y1=\"32\" x2=\"{:.1}\" y2=\"{:.0}\" stroke=\"#cc3333\" stroke-dasharray=\"4 3\"/>\n</svg>\n",
        x(floor),
        x(floor),
        height - 25.0
    );
    s
}
