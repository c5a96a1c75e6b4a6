//! The control plane under change (issue 17), end to end with the real `lb` binary and real
//! TCP in namespaces: algorithm switches on a live VIP lose no new connection, and `lb apply`
//! killed at random moments never breaks forwarding, and the next apply leaves a state `lb
//! check` finds consistent.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use lb::testbed::{Testbed, HTTP_PORT};
use rand::{Rng, SeedableRng};

const VIP: &str = "10.100.0.100";

fn testbed(n: usize) -> Testbed {
    Testbed::new(n, "native", Path::new(env!("CARGO_BIN_EXE_lb"))).expect("building the testbed")
}

fn web() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), HTTP_PORT)
}

/// Counts of HTTP connections to the VIP made by `connect_while` (failed: no answer).
#[derive(Default)]
struct Traffic {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// Answered, but after more than 900 ms: the first SYN was lost (retransmitted after 1 s).
    slow: AtomicUsize,
}

impl Traffic {
    /// Every connection was answered at its first SYN, and there were enough of them.
    fn assert_all_answered(self) {
        let (ok, failed, slow) = (
            self.ok.into_inner(),
            self.failed.into_inner(),
            self.slow.into_inner(),
        );
        assert_eq!(
            (failed, slow),
            (0, 0),
            "{failed} connections failed and {slow} waited for a SYN retransmission, of {}",
            ok + failed + slow
        );
        assert!(ok > 50, "only {ok} connections made");
    }
}

/// Opens connections to the VIP one after another until `stop` (at most 20000, or 300 s).
fn connect_while(tb: &Testbed, stop: &AtomicBool, t: &Traffic) {
    let start = Instant::now();
    for _ in 0..20_000 {
        if stop.load(Ordering::SeqCst) || start.elapsed() > Duration::from_secs(300) {
            break;
        }
        let began = Instant::now();
        match tb.http_get(web()) {
            Ok(_) if began.elapsed() > Duration::from_millis(900) => {
                t.slow.fetch_add(1, Ordering::SeqCst)
            }
            Ok(_) => t.ok.fetch_add(1, Ordering::SeqCst),
            Err(_) => t.failed.fetch_add(1, Ordering::SeqCst),
        };
    }
}

/// A live Maglev VIP switched to round robin and back, ten times each, while a client opens
/// connections without pause: every connection is answered at the first SYN, and no packet
/// finds a slot without a backend.
#[test]
fn algorithm_switches_lose_no_new_connection() {
    let tb = testbed(3);
    let vip = format!("{}/tcp", web());
    tb.lb(&["vip", "add", &vip, "--table-size", "65537"])
        .unwrap();
    for b in &tb.backends {
        tb.lb(&[
            "backend",
            "add",
            &vip,
            &SocketAddr::new(b.v4, HTTP_PORT).to_string(),
        ])
        .unwrap();
    }
    let drops = || tb.counters().unwrap()["drop_no_backend"];
    let drops_before = drops();
    let stop = AtomicBool::new(false);
    let t = Traffic::default();
    std::thread::scope(|s| {
        s.spawn(|| connect_while(&tb, &stop, &t));
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..10 {
            for algo in ["round-robin", "maglev"] {
                tb.lb(&["vip", "set", &vip, "--algo", algo]).unwrap();
                std::thread::sleep(Duration::from_millis(150));
            }
        }
        stop.store(true, Ordering::SeqCst);
    });
    t.assert_all_answered();
    assert_eq!(drops() - drops_before, 0, "packets found no backend");
    assert_eq!(tb.lb(&["check"]).unwrap().lines().count(), 1);
}

/// One of two configurations that differ in most of their VIPs and backends: `variant` 0 or 1.
/// Both keep the VIP the client uses (the test bed's three backends) as it is.
fn config(tb: &Testbed, variant: usize) -> String {
    let mut out = format!("[[vip]]\naddress = \"{}/tcp\"\ntable_size = 1031\n", web());
    for b in &tb.backends {
        out += &format!(
            "[[vip.backend]]\naddress = \"{}\"\n",
            SocketAddr::new(b.v4, HTTP_PORT)
        );
    }
    // 40 VIPs, of which variant 0 has 0..30 and variant 1 has 10..40; of those both have,
    // the variants differ in weights (10..20), algorithm (20..25) and table size (25..30).
    let range = if variant == 0 { 0..30 } else { 10..40 };
    for i in range {
        let algo = if (20..25).contains(&i) && variant == 1 {
            "round-robin"
        } else {
            "maglev"
        };
        let size = if (25..30).contains(&i) && variant == 1 {
            2053
        } else {
            1031
        };
        out += &format!(
            "[[vip]]\naddress = \"10.101.{}.{}:{}/tcp\"\nalgorithm = \"{algo}\"\ntable_size = {size}\n",
            i / 200,
            i % 200 + 1,
            2000 + i
        );
        for j in 0..4 {
            let weight = if (10..20).contains(&i) && variant == 1 {
                j + 2
            } else {
                1
            };
            out += &format!(
                "[[vip.backend]]\naddress = \"10.201.{i}.{}:{}\"\nweight = {weight}\n",
                j + 1,
                3000 + i * 4 + j
            );
        }
    }
    out
}

/// `lb apply` of `file` in the gateway's namespace, spawned.
fn spawn_apply(tb: &Testbed, file: &Path) -> std::process::Child {
    tb.lb_command(&["apply", "-f", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `lb check`: its exit code and output.
fn check(tb: &Testbed) -> (i32, String) {
    let o = tb.lb_command(&["check"]).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// `lb apply` of configurations that change 20 VIPs and 120 backends, killed (SIGKILL) at a
/// random moment of its run 100 times; after each, `lb check`, then `lb apply` of the same file
/// to its end, after which `lb check` must find nothing. A client keeps connecting to a VIP
/// both configurations keep: every connection must be answered, at the first SYN.
#[test]
fn apply_killed_at_random_moments_converges() {
    let tb = testbed(3);
    let dir = std::env::temp_dir().join(format!("{}-crash", tb.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<std::path::PathBuf> = (0..2)
        .map(|v| {
            let f = dir.join(format!("lb-{v}.toml"));
            std::fs::write(&f, config(&tb, v)).unwrap();
            f
        })
        .collect();
    // The time a whole apply takes (from a start to an end), which the kills fall in.
    let mut took = Duration::ZERO;
    for f in [&files[0], &files[1], &files[0]] {
        let began = Instant::now();
        let st = spawn_apply(&tb, f).wait().unwrap();
        assert!(st.success(), "lb apply of {}", f.display());
        took = took.max(began.elapsed());
    }
    assert_eq!(check(&tb).0, 0, "{}", check(&tb).1);

    let seed: u64 = rand::random();
    eprintln!("seed {seed:#x}, a whole apply takes up to {took:?}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let stop = AtomicBool::new(false);
    let t = Traffic::default();
    let (mut interrupted, mut found) = (0, 0);
    std::thread::scope(|s| {
        s.spawn(|| connect_while(&tb, &stop, &t));
        for i in 0..100 {
            let f = &files[(i + 1) % 2];
            let delay = took.mul_f64(rng.random_range(0.0..1.0));
            let mut child = spawn_apply(&tb, f);
            std::thread::sleep(delay);
            if child.try_wait().unwrap().is_none() {
                interrupted += 1;
            }
            let _ = child.kill();
            let _ = child.wait();
            if check(&tb).0 != 0 {
                found += 1;
            }
            let st = spawn_apply(&tb, f).wait().unwrap();
            assert!(st.success(), "round {i}: lb apply after the kill failed");
            let (code, out) = check(&tb);
            assert_eq!(
                code, 0,
                "round {i} (killed after {delay:?}): lb check after the re-apply\n{out}"
            );
        }
        stop.store(true, Ordering::SeqCst);
    });
    eprintln!(
        "{interrupted} of 100 applies killed while running; lb check found something after {found}"
    );
    assert!(
        interrupted >= 50,
        "only {interrupted} applies were killed while running"
    );
    t.assert_all_answered();
    let _ = std::fs::remove_dir_all(&dir);
}
