//! The agent (`lb run`) end to end: real servers in namespaces that die and come back, the agent
//! killed and restarted and the program upgraded under traffic, configuration mistakes, and
//! the metrics endpoint against `lb stats`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Child,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use lb::testbed::{wait_for, Testbed, HTTP_PORT, LINE_PORT};
use lb_common::{CtEntry, CT_S_ESTABLISHED};

const VIP: &str = "10.100.0.100";
const METRICS: &str = "127.0.0.1:9100";

fn testbed(n: usize) -> Testbed {
    Testbed::new(n, "native", Path::new(env!("CARGO_BIN_EXE_lb"))).expect("building the testbed")
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn vip(port: u16) -> SocketAddr {
    sa(VIP.parse().unwrap(), port)
}

/// The agent's files (config and log) in a fresh directory.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(tb: &Testbed) -> Files {
        let dir = std::env::temp_dir().join(format!("{}-agent", tb.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        Files { dir }
    }
    fn config(&self) -> PathBuf {
        self.dir.join("lb.toml")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    fn write_config(&self, text: &str) {
        // Write beside and rename, as editors and config management do.
        let tmp = self.dir.join("lb.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config()).unwrap();
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running agent, killed when dropped.
struct Agent(Child);

impl Agent {
    fn start(tb: &Testbed, files: &Files) -> Agent {
        let cfg = files.config().display().to_string();
        let args = ["run", "-f", &cfg, "--metrics", METRICS, "--poll", "200ms"];
        Agent(
            tb.spawn_lb(&args, &files.log())
                .expect("starting the agent"),
        )
    }
    fn kill(mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Number of log lines containing `needle`.
fn log_count(files: &Files, needle: &str) -> usize {
    files
        .log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

fn backend_health(tb: &Testbed, backend: SocketAddr) -> Option<String> {
    let rows = tb.lb_json(&["backend", "list"]).ok()?;
    rows.as_array()?
        .iter()
        .find(|r| r["backend"] == backend.to_string())
        .map(|r| r["health"].as_str().unwrap_or("").to_string())
}

fn config(tb: &Testbed, health: &str, weights: &[(usize, u32)], extra: &str) -> String {
    let mut out = String::new();
    for port in [HTTP_PORT, LINE_PORT] {
        // The line service is not HTTP: it gets a TCP check with the same timings.
        let health = if port == LINE_PORT {
            health
                .replace("check = \"http\"", "check = \"tcp\"")
                .replace("path = \"/healthz\"\n", "")
        } else {
            health.to_string()
        };
        out += &format!(
            "[[vip]]\naddress = \"{}/tcp\"\ntable_size = 1009\n{extra}\n{health}\n",
            vip(port)
        );
        for (i, w) in weights {
            out += &format!(
                "[[vip.backend]]\naddress = \"{}\"\nweight = {w}\n",
                sa(tb.backends[*i].v4, port)
            );
        }
    }
    out
}

/// HTTP connections to the VIP: backend name → count, and failures.
fn connections(tb: &Testbed, n: usize) -> (HashMap<String, usize>, usize) {
    let mut by = HashMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match tb.http_get(vip(HTTP_PORT)) {
            Ok((name, _)) => *by.entry(name).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    (by, failed)
}

const HTTP_CHECK: &str =
    "[vip.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n";

/// A backend whose server dies leaves the table within fall × interval (+ margin); after that
/// no new connection fails; other backends' connections are untouched; it rejoins after rise
/// checks once it is back.
#[test]
fn health_checks_take_dead_backends_out_and_back() {
    let mut tb = testbed(3);
    let files = Files::new(&tb);
    files.write_config(&config(&tb, HTTP_CHECK, &[(0, 1), (1, 1), (2, 1)], ""));
    let agent = Agent::start(&tb, &files);
    wait_for(
        Duration::from_secs(20),
        "the agent to apply the file",
        || log_count(&files, "configuration applied") > 0,
    );
    let (by, failed) = connections(&tb, 60);
    assert_eq!(failed, 0);
    assert_eq!(by.len(), 3, "{by:?}");
    // Long-lived connections, at least one on a backend that stays.
    let mut long: Vec<_> = (0..9)
        .map(|_| tb.open_line(vip(LINE_PORT)).unwrap())
        .collect();
    assert!(long.iter().any(|c| c.backend != "backend-2"));

    let b2 = sa(tb.backends[1].v4, HTTP_PORT);
    tb.stop_server("backend-2");
    let took = wait_for(
        Duration::from_secs(10),
        "backend-2 to be marked down",
        || backend_health(&tb, b2).as_deref() == Some("down"),
    );
    // fall × interval = 400 ms; the margin covers the probe timeout, the 50 ms polling of
    // `lb backend list` and scheduling on a loaded 2-core machine (tests run in parallel).
    assert!(
        took <= Duration::from_millis(400 + 2600),
        "marked down after {took:?}"
    );
    let (by, failed) = connections(&tb, 90);
    assert_eq!(
        failed, 0,
        "new connections failed after the backend was marked down"
    );
    assert_eq!(by.get("backend-2"), None, "{by:?}");
    assert_eq!(by.len(), 2, "{by:?}");
    for c in long.iter_mut().filter(|c| c.backend != "backend-2") {
        assert_eq!(
            c.ping().unwrap(),
            c.backend,
            "a connection to a live backend broke"
        );
    }
    // Its HTTP and line services (checked independently).
    wait_for(
        Duration::from_secs(3),
        "lb status to show both down",
        || tb.lb(&["status"]).unwrap().contains("2 backends down"),
    );

    // A restarted agent adopts the health the maps record: backend-2 stays out.
    agent.kill();
    let _agent = Agent::start(&tb, &files);
    wait_for(Duration::from_secs(20), "the new agent to adopt", || {
        log_count(&files, "adopting the pinned state") >= 2
    });
    for _ in 0..10 {
        assert_eq!(backend_health(&tb, b2).as_deref(), Some("down"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (by, failed) = connections(&tb, 30);
    assert_eq!((failed, by.get("backend-2")), (0, None), "{by:?}");

    tb.start_server("backend-2").unwrap();
    let took = wait_for(Duration::from_secs(10), "backend-2 to be back", || {
        backend_health(&tb, b2).as_deref() == Some("up")
    });
    assert!(
        took <= Duration::from_millis(400 + 2600),
        "back after {took:?}"
    );
    let (by, failed) = connections(&tb, 90);
    assert_eq!(failed, 0);
    assert!(by.get("backend-2").copied().unwrap_or(0) > 10, "{by:?}");
    assert!(log_count(&files, "backend is down") >= 1);
    assert!(log_count(&files, "backend is up") >= 1);
}

/// When every backend is down the VIP fails open by default; with when_all_down = "drop" its
/// table empties.
#[test]
fn all_backends_down_follows_the_documented_choice() {
    let mut tb = testbed(2);
    let files = Files::new(&tb);
    files.write_config(&config(&tb, HTTP_CHECK, &[(0, 1), (1, 1)], ""));
    let _agent = Agent::start(&tb, &files);
    wait_for(
        Duration::from_secs(20),
        "the agent to apply the file",
        || log_count(&files, "configuration applied") > 0,
    );
    let table_filled = |tb: &Testbed| {
        let t = tb
            .lb_json(&["table", &format!("{}/tcp", vip(HTTP_PORT))])
            .unwrap();
        t["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["slots"].as_u64().unwrap())
            .sum::<u64>()
    };
    tb.stop_server("backend-1");
    tb.stop_server("backend-2");
    wait_for(Duration::from_secs(10), "both backends down", || {
        tb.lb(&["status"]).unwrap().contains("4 backends down")
    });
    assert_eq!(table_filled(&tb), 1009, "fail-open keeps every slot filled");
    assert!(log_count(&files, "failing open") >= 1);
    files.write_config(&config(
        &tb,
        HTTP_CHECK,
        &[(0, 1), (1, 1)],
        "when_all_down = \"drop\"",
    ));
    wait_for(Duration::from_secs(10), "an empty table", || {
        table_filled(&tb) == 0
    });
    tb.start_server("backend-1").unwrap();
    wait_for(
        Duration::from_secs(10),
        "backend-1 back in the table",
        || table_filled(&tb) == 1009,
    );
    let (by, failed) = connections(&tb, 20);
    assert_eq!((failed, by.get("backend-1").copied()), (0, Some(20)));
}

/// SIGKILL the agent and start a new one, then upgrade the program, while a client keeps
/// opening connections and holds long ones: no connection fails, the new agent rewrites
/// nothing, and the counters carry on.
#[test]
fn agent_restart_and_program_upgrade_are_hitless() {
    let tb = testbed(3);
    let files = Files::new(&tb);
    let tcp = "[vip.health]\ncheck = \"tcp\"\ninterval = \"300ms\"\n";
    files.write_config(&config(&tb, tcp, &[(0, 1), (1, 2), (2, 1)], ""));
    let agent = Agent::start(&tb, &files);
    wait_for(
        Duration::from_secs(20),
        "the agent to apply the file",
        || log_count(&files, "configuration applied") > 0,
    );
    let mut long: Vec<_> = (0..12)
        .map(|_| tb.open_line(vip(LINE_PORT)).unwrap())
        .collect();
    let before = tb.lb_json(&["stats"]).unwrap()["packets_seen"]
        .as_u64()
        .unwrap();
    let prog_before = tb.lb_json(&["status"]).unwrap()["program_id"].clone();

    let stop = AtomicBool::new(false);
    let ok = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Bounded: at most 5000 connections or 60 s.
            let start = Instant::now();
            for _ in 0..5000 {
                if stop.load(Ordering::SeqCst) || start.elapsed() > Duration::from_secs(60) {
                    break;
                }
                match tb.http_get(vip(HTTP_PORT)) {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        agent.kill();
        std::thread::sleep(Duration::from_millis(700));
        let applied_before = log_count(&files, "configuration applied");
        let _agent = Agent::start(&tb, &files);
        wait_for(Duration::from_secs(20), "the new agent to adopt", || {
            log_count(&files, "configuration applied") > applied_before
        });
        assert!(
            files.log_text().contains("adopting the pinned state"),
            "{}",
            files.log_text()
        );
        assert_eq!(
            log_count(&files, "configuration applied: no changes"),
            1,
            "the restarted agent rewrote state: {}",
            files.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
        let u = tb.lb_json(&["upgrade"]).unwrap();
        assert_ne!(u["old_program_id"], u["new_program_id"]);
        assert_eq!(u["interfaces"].as_array().unwrap().len(), 4);
        // The new program counts into the pinned maps.
        let just_after = tb.lb_json(&["stats"]).unwrap()["packets_seen"]
            .as_u64()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let later = tb.lb_json(&["stats"]).unwrap()["packets_seen"]
            .as_u64()
            .unwrap();
        assert!(later > just_after, "counters stopped after the upgrade");
        stop.store(true, Ordering::SeqCst);
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    assert!(ok > 20, "only {ok} connections made");
    for c in &mut long {
        assert_eq!(
            c.ping().unwrap(),
            c.backend,
            "a long connection moved or broke"
        );
    }
    let status = tb.lb_json(&["status"]).unwrap();
    assert_ne!(status["program_id"], prog_before);
    let stats = tb.lb_json(&["stats"]).unwrap();
    let after = stats["packets_seen"].as_u64().unwrap();
    assert!(after > before, "counters restarted: {before} -> {after}");
    // The data plane keeps the next-hop cache filled: forwarded packets skipped the route
    // lookup.
    assert!(
        stats["counters"]["nexthop_cached"].as_u64().unwrap() > 0,
        "{stats}"
    );
}

/// An invalid file is logged and the running state kept; a valid change is applied; a backend
/// removed from the file drains and is then removed; /metrics parses and matches `lb stats`.
#[test]
fn config_reload_drain_and_metrics() {
    let tb = testbed(3);
    let files = Files::new(&tb);
    files.write_config(&config(
        &tb,
        "",
        &[(0, 1), (1, 1), (2, 1)],
        "drain_timeout = \"30s\"",
    ));
    let _agent = Agent::start(&tb, &files);
    wait_for(
        Duration::from_secs(20),
        "the agent to apply the file",
        || log_count(&files, "configuration applied") > 0,
    );
    let list_before = tb.lb(&["backend", "list", "--json"]).unwrap();

    // Invalid: a weight out of range. Logged with the reason; state kept; traffic flows.
    let bad = config(&tb, "", &[(0, 1), (1, 70000), (2, 1)], "");
    files.write_config(&bad);
    wait_for(Duration::from_secs(10), "the error in the log", || {
        log_count(&files, "invalid configuration") > 0
    });
    assert!(
        files.log_text().contains("weight 70000"),
        "{}",
        files.log_text()
    );
    assert_eq!(tb.lb(&["backend", "list", "--json"]).unwrap(), list_before);
    let (_, failed) = connections(&tb, 30);
    assert_eq!(failed, 0);
    let bad_metrics = tb
        .gateway_http_get(METRICS.parse().unwrap(), "/metrics")
        .unwrap();
    assert!(
        bad_metrics.contains("lb_config_last_reload_ok 0"),
        "{bad_metrics}"
    );

    // Valid again, without backend-3 and with a long connection held on it: it drains (weight
    // 0, still listed) while the connection lives, and goes once it is closed.
    let mut on_b3 = None;
    for _ in 0..30 {
        let c = tb.open_line(vip(LINE_PORT)).unwrap();
        if c.backend == "backend-3" {
            on_b3 = Some(c);
            break;
        }
    }
    let mut on_b3 = on_b3.expect("no connection landed on backend-3");
    files.write_config(&config(
        &tb,
        "",
        &[(0, 1), (1, 1)],
        "drain_timeout = \"30s\"",
    ));
    let b3 = sa(tb.backends[2].v4, LINE_PORT);
    let weight_of = |tb: &Testbed, b: SocketAddr| -> Option<u64> {
        let rows = tb.lb_json(&["backend", "list"]).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["backend"] == b.to_string())
            .map(|r| r["weight"].as_u64().unwrap())
    };
    wait_for(Duration::from_secs(10), "backend-3 draining", || {
        weight_of(&tb, b3) == Some(0)
    });
    let (by, failed) = connections(&tb, 30);
    assert_eq!((failed, by.get("backend-3")), (0, None), "{by:?}");
    assert_eq!(
        on_b3.ping().unwrap(),
        "backend-3",
        "the draining backend's flow broke"
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        weight_of(&tb, b3),
        Some(0),
        "removed while a flow was active"
    );
    drop(on_b3); // FIN: no active flow left
                 // Removed after the 2 s grace, well before the 10 s idle rule or the 30 s timeout.
    let took = wait_for(Duration::from_secs(6), "backend-3 removed", || {
        weight_of(&tb, b3).is_none()
    });
    assert!(
        took >= Duration::from_secs(1),
        "removed without the grace: {took:?}"
    );
    assert!(
        files
            .log_text()
            .lines()
            .any(|l| l.contains("backend drained")
                && l.contains(&b3.to_string())
                && l.contains("no active flows")),
        "{}",
        files.log_text()
    );

    // Quiet traffic, then metrics between two `lb stats` snapshots.
    let (_, failed) = connections(&tb, 20);
    assert_eq!(failed, 0);
    let s1 = tb.lb_json(&["stats"]).unwrap();
    let page = tb
        .gateway_http_get(METRICS.parse().unwrap(), "/metrics")
        .unwrap();
    let s2 = tb.lb_json(&["stats"]).unwrap();
    let lines = page.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("unexpected type of {name}"),
        }
    };
    // Global counters move with health checks and other bystander traffic: between the two.
    for (name, v1) in s1["counters"].as_object().unwrap() {
        let v2 = s2["counters"][name].as_u64().unwrap();
        let index = lb_common::COUNTER_NAMES
            .iter()
            .position(|n| n == name)
            .unwrap();
        let (metric, key) = if (index as u32) < lb_common::VERDICT_COUNT {
            ("lb_packets_total", "verdict")
        } else {
            ("lb_events_total", "event")
        };
        let m = value(metric, &[(key, name)]) as u64;
        assert!(
            v1.as_u64().unwrap() <= m && m <= v2,
            "{name}: {v1} <= {m} <= {v2}"
        );
    }
    // Per-VIP and per-backend counters only move with client traffic: equal.
    assert_eq!(s1["vips"], s2["vips"], "traffic during the scrape");
    for v in s1["vips"].as_array().unwrap() {
        let name = v["vip"].as_str().unwrap();
        assert_eq!(
            value("lb_vip_packets_total", &[("vip", name)]) as u64,
            v["packets"].as_u64().unwrap()
        );
        assert_eq!(
            value("lb_vip_new_flows_total", &[("vip", name)]) as u64,
            v["new_flows"].as_u64().unwrap()
        );
        for b in v["backends"].as_array().unwrap() {
            let l = [("vip", name), ("backend", b["backend"].as_str().unwrap())];
            assert_eq!(
                value("lb_backend_packets_total", &l) as u64,
                b["packets"].as_u64().unwrap()
            );
            assert_eq!(
                value("lb_backend_bytes_total", &l) as u64,
                b["bytes"].as_u64().unwrap()
            );
            assert_eq!(value("lb_backend_up", &l), 1.0);
        }
    }
    assert!(value("lb_config_reloads_total", &[("result", "error")]) >= 1.0);
    assert_eq!(value("lb_config_last_reload_ok", &[]), 1.0);
    assert!(value("lb_backends_drained_total", &[]) >= 1.0);
    // The links and their modes (the test bed attached every gateway interface natively).
    assert_eq!(
        value("lb_attached", &[("iface", "g0"), ("mode", "native")]),
        1.0
    );
}

/// `lb backend del --drain` (no agent): the backend gets no new flows at once, keeps its
/// established connection, and is removed when that connection closes.
#[test]
fn cli_drain_then_delete() {
    let tb = testbed(2);
    let files = Files::new(&tb);
    let v = format!("{}/tcp", vip(LINE_PORT));
    tb.lb(&["vip", "add", &v, "--table-size", "1009"]).unwrap();
    for b in &tb.backends {
        tb.lb(&["backend", "add", &v, &sa(b.v4, LINE_PORT).to_string()])
            .unwrap();
    }
    let mut held = None;
    for _ in 0..30 {
        let c = tb.open_line(vip(LINE_PORT)).unwrap();
        if c.backend == "backend-2" {
            held = Some(c);
            break;
        }
    }
    let mut held = held.expect("no connection landed on backend-2");
    let b2 = sa(tb.backends[1].v4, LINE_PORT).to_string();
    let mut child = tb
        .spawn_lb(
            &["backend", "del", &v, &b2, "--drain", "--timeout", "30s"],
            &files.log(),
        )
        .unwrap();
    let weight = |tb: &Testbed| -> Option<u64> {
        tb.lb_json(&["backend", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["backend"] == b2)
            .map(|r| r["weight"].as_u64().unwrap())
    };
    wait_for(Duration::from_secs(5), "backend-2 at weight 0", || {
        weight(&tb) == Some(0)
    });
    for _ in 0..10 {
        assert_eq!(tb.open_line(vip(LINE_PORT)).unwrap().backend, "backend-1");
    }
    assert_eq!(held.ping().unwrap(), "backend-2");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "finished while a flow was active"
    );
    assert_eq!(weight(&tb), Some(0));
    drop(held);
    wait_for(Duration::from_secs(5), "the drain to finish", || {
        child.try_wait().unwrap().is_some()
    });
    assert!(child.wait().unwrap().success(), "{}", files.log_text());
    assert_eq!(weight(&tb), None, "not removed");
}

/// Changing a VIP's forwarding mode in the file: a backend that left the file and would not
/// suit the new mode (dsr-l2 keeps the port) is removed at once instead of draining, and the
/// change goes through.
#[test]
fn forward_mode_change_with_unfit_backends() {
    let tb = testbed(2);
    let files = Files::new(&tb);
    let v = vip(HTTP_PORT);
    let b1 = sa(tb.backends[0].v4, HTTP_PORT);
    let b2_other_port = sa(tb.backends[1].v4, 8081);
    files.write_config(&format!(
        "[[vip]]\naddress = \"{v}/tcp\"\ntable_size = 1009\n\n[[vip.backend]]\naddress = \"{b1}\"\n\n[[vip.backend]]\naddress = \"{b2_other_port}\"\n"
    ));
    let _agent = Agent::start(&tb, &files);
    wait_for(
        Duration::from_secs(20),
        "the agent to apply the file",
        || log_count(&files, "configuration applied") > 0,
    );
    files.write_config(&format!(
        "[[vip]]\naddress = \"{v}/tcp\"\nforward = \"dsr-l2\"\ntable_size = 1009\n\n[[vip.backend]]\naddress = \"{b1}\"\n"
    ));
    wait_for(Duration::from_secs(10), "the mode change", || {
        let vips = tb.lb_json(&["vip", "list"]).unwrap();
        vips[0]["forward"] == "dsr-l2"
    });
    let rows = tb.lb_json(&["backend", "list"]).unwrap();
    let listed: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["backend"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [b1.to_string().as_str()], "{rows}");
    // No apply failed: neither logged nor counted (the sample must exist).
    let apply_failed = format!("applying {} failed", files.config().display());
    assert_eq!(log_count(&files, &apply_failed), 0, "{}", files.log_text());
    assert_eq!(
        metric(&tb, "lb_config_reloads_total", &[("result", "error")]),
        0.0
    );

    // Positive control, same needle and counter: a file that parses but cannot be applied (a
    // table larger than the table array's 262144 slots) is logged once and counted.
    files.write_config(&format!(
        "[[vip]]\naddress = \"{v}/tcp\"\nforward = \"dsr-l2\"\ntable_size = 1048573\n\n[[vip.backend]]\naddress = \"{b1}\"\n"
    ));
    wait_for(
        Duration::from_secs(10),
        "the apply failure in the log",
        || log_count(&files, &apply_failed) > 0,
    );
    assert_eq!(log_count(&files, &apply_failed), 1, "{}", files.log_text());
    assert!(
        files
            .log_text()
            .contains("no room for a table of 1048573 slots"),
        "{}",
        files.log_text()
    );
    assert!(metric(&tb, "lb_config_reloads_total", &[("result", "error")]) >= 1.0);
}

/// One sample of the agent's metrics page; panics if it is missing.
fn metric(tb: &Testbed, name: &str, labels: &[(&str, &str)]) -> f64 {
    let page = tb
        .gateway_http_get(METRICS.parse().unwrap(), "/metrics")
        .unwrap();
    let lines = page.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}:\n{page}"));
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => panic!("unexpected type of {name}"),
    }
}

/// A reader nobody reads blocks nobody: `lb flows` stuck writing into a full pipe (more flows
/// than a pipe holds) holds no lock, so `lb backend set` completes within a second, and the
/// agent marks a killed backend down on time.
#[test]
fn a_stuck_reader_blocks_neither_writers_nor_the_agent() {
    let mut tb = testbed(3);
    let files = Files::new(&tb);
    files.write_config(&config(&tb, HTTP_CHECK, &[(0, 1), (1, 1), (2, 1)], ""));
    let _agent = Agent::start(&tb, &files);
    wait_for(
        Duration::from_secs(20),
        "the agent to apply the file",
        || log_count(&files, "configuration applied") > 0,
    );
    // 2000 established flows: `lb flows --json` writes about 200 bytes each, a pipe holds
    // 64 KiB.
    let web: lb::Vip = format!("{}/tcp", vip(HTTP_PORT)).parse().unwrap();
    {
        let maps = lb::pin::PinDir::open(tb.pin_dir()).unwrap();
        let mut maps = maps.maps().unwrap();
        let b = maps.backends(&web).unwrap()[0].id;
        let generation = maps.backend_entry(b).unwrap().unwrap().generation;
        let now = lb::sweep::now_ns(&maps).unwrap();
        for i in 0..2000u32 {
            let client = sa(std::net::Ipv4Addr::from(0x0a05_0000 + i).into(), 40_000);
            let entry = CtEntry {
                backend_id: b,
                generation,
                last_seen_ns: now,
                state: CT_S_ESTABLISHED,
                ..CtEntry::default()
            };
            maps.flows
                .insert_confirmed(&lb::model::flow_key(client, &web), &entry)
                .unwrap();
        }
    }
    let mut reader = tb
        .lb_command(&["flows", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "lb flows ended: its output did not fill the pipe"
    );

    let b1 = sa(tb.backends[0].v4, HTTP_PORT).to_string();
    let started = Instant::now();
    let mut setter = tb
        .lb_command(&["backend", "set", &web.to_string(), &b1, "--weight", "2"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Bounded: a setter still waiting after 5 s is killed (and the test fails).
    let status = loop {
        if let Some(st) = setter.try_wait().unwrap() {
            break Some(st);
        }
        if started.elapsed() > Duration::from_secs(5) {
            let _ = setter.kill();
            let _ = setter.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "lb backend set did not complete while lb flows was stuck ({took:?}): {status:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "lb backend set took {took:?}"
    );

    // The agent's health checks still act on time.
    let b3 = sa(tb.backends[2].v4, HTTP_PORT);
    tb.stop_server("backend-3");
    let took = wait_for(
        Duration::from_secs(10),
        "backend-3 to be marked down",
        || backend_health(&tb, b3).as_deref() == Some("down"),
    );
    assert!(
        took <= Duration::from_millis(400 + 2600),
        "marked down after {took:?}"
    );
    assert!(
        reader.try_wait().unwrap().is_none(),
        "lb flows ended before the end of the test"
    );
    let _ = reader.kill();
    let _ = reader.wait();
}
