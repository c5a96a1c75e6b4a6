//! The real `lb` binary against a real attached program on veths in a namespace the test
//! creates: every command, every bad-input case (with the state checked unchanged), the
//! show-config/apply round trip, state seen from a second process, bpftool's view.

mod common;

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::Xdp;
use aya_obj::programs::XdpAttachType;
use common::{
    netns::NetNs,
    packets::{Spec, Tcp},
    testrun::{run, XDP_PASS},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace with a veth pair and a private pin directory; purged on drop.
struct Lb {
    ns: NetNs,
    pin: String,
}

impl Lb {
    fn new(tag: &str) -> Lb {
        let ns = NetNs::new(tag);
        ns.ip(&[
            "link", "add", "lbc0", "type", "veth", "peer", "name", "lbc1",
        ]);
        ns.ip(&["link", "set", "lbc0", "up"]);
        ns.ip(&["link", "set", "lbc1", "up"]);
        let pin = format!(
            "/sys/fs/bpf/lbt-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        Lb { ns, pin }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns.name))
            .arg(env!("CARGO_BIN_EXE_lb"))
            .args(args)
            .env("LB_PIN_DIR", &self.pin);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running lb")
    }

    /// Runs lb, expecting success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "lb {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("valid JSON")
    }

    /// Runs lb, expecting exit `code` and one error line containing `needle`, with the state
    /// unchanged.
    fn fails(&self, args: &[&str], code: i32, needle: &str) {
        let before = self.state();
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(code),
            "lb {args:?}: exit code; stderr: {err}"
        );
        assert!(
            err.contains(needle),
            "lb {args:?}: {err:?} does not mention {needle:?}"
        );
        assert_eq!(self.state(), before, "lb {args:?} changed the state");
    }

    /// Everything observable: configuration, attachments, map fill levels. Both commands must
    /// succeed with output while lb is loaded (program and VIP map pinned), and fail with "not
    /// loaded" when it is not, so two failed reads never compare equal as "unchanged".
    fn state(&self) -> String {
        let pin = std::path::Path::new(&self.pin);
        let loaded = pin.join("prog_lb_xdp").exists() && pin.join(lb_common::names::VIPS).exists();
        let cfg = self.run(&["show-config"]);
        let st = self.run(&["status", "--json"]);
        for (what, o) in [("show-config", &cfg), ("status --json", &st)] {
            check_state_read(what, loaded, o);
        }
        format!(
            "{}{}{loaded}{}",
            String::from_utf8_lossy(&cfg.stdout),
            String::from_utf8_lossy(&st.stdout),
            pin.exists()
        )
    }
}

/// `state()`'s check of one read: loaded, exit 0 and a non-empty stdout (status JSON with
/// the `attached` list); not loaded, exit 1, no output and "lb is not loaded" on stderr.
fn check_state_read(what: &str, loaded: bool, o: &Output) {
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    if loaded {
        assert!(
            o.status.success() && !out.trim().is_empty(),
            "state: lb {what} failed or printed nothing ({:?}): {out}{err}",
            o.status
        );
        if what.starts_with("status") {
            let v: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
            assert!(v["attached"].is_array(), "state: lb {what}: {out}");
        }
    } else {
        assert!(
            o.status.code() == Some(1) && err.contains("lb is not loaded") && out.is_empty(),
            "state: lb {what} without a pin directory: {:?}: {out}{err}",
            o.status
        );
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.run(&["detach", "--purge"]);
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

const VIP: &str = "10.100.0.100:80/tcp";

/// Control for `state()`: two failed reads (what the old, unchecked `state()` compared as
/// "unchanged") are rejected when lb should be loaded, and accepted only as "not loaded".
#[test]
fn state_check_rejects_failed_reads() {
    // A pin directory nothing was ever loaded into (lb creates it: removed at the end).
    let pin = format!("/sys/fs/bpf/lbt-{}-never-loaded", std::process::id());
    let read = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lb"))
            .args(args)
            .env("LB_PIN_DIR", &pin)
            .output()
            .unwrap()
    };
    let (a, b) = (read(&["show-config"]), read(&["status", "--json"]));
    let _ = std::fs::remove_dir_all(&pin);
    // What the old state() compared: both empty, so "unchanged" held trivially.
    assert!(a.stdout.is_empty() && b.stdout.is_empty());
    for (what, o) in [("show-config", &a), ("status --json", &b)] {
        check_state_read(what, false, o);
        let o = o.clone();
        let what = what.to_string();
        let r = std::panic::catch_unwind(move || check_state_read(&what, true, &o));
        assert!(r.is_err(), "a failed read passed as a loaded state");
    }
}

#[test]
fn attach_status_detach() {
    let lb = Lb::new("attach");
    let out = lb.ok(&["attach", "lbc0", "--mode", "generic"]);
    assert!(out.contains("attached to lbc0 (generic mode)"), "{out}");
    lb.ok(&["attach", "lbc1", "--mode", "native"]);
    // No lb process is running now; the state is pinned.
    let st = lb.json(&["status"]);
    let attached = st["attached"].as_array().unwrap();
    assert_eq!(attached.len(), 2);
    assert_eq!(attached[0]["iface"], "lbc0");
    assert_eq!(attached[0]["mode"], "generic");
    assert_eq!(attached[1]["mode"], "native");
    assert!(st["program_id"].as_u64().unwrap() > 0);
    // The kernel agrees: the interfaces carry an XDP program.
    let link = Command::new("ip")
        .args(["-n", &lb.ns.name, "link", "show", "lbc0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains("xdpgeneric"));
    // Pinned objects are root's only.
    let meta = std::fs::metadata(&lb.pin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o077,
        0,
        "pin directory is private"
    );

    lb.fails(&["attach", "lbc0"], 1, "already attached to lbc0");
    lb.fails(
        &["attach", "nosuch0"],
        1,
        "interface nosuch0 does not exist",
    );
    lb.fails(&["detach", "nosuch0"], 1, "not attached to nosuch0");

    // A failure on one interface (loopback: not Ethernet) undoes the others of the same command.
    lb.ok(&["detach", "lbc0"]);
    lb.fails(
        &["attach", "lbc0", "lo", "--mode", "native"],
        1,
        "lo is not an Ethernet interface",
    );
    assert!(!String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-n", &lb.ns.name, "link", "show", "lbc0"])
            .output()
            .unwrap()
            .stdout
    )
    .contains("xdp"));
    lb.ok(&["attach", "lbc0", "--mode", "generic"]);

    lb.ok(&["detach", "lbc1"]);
    let st = lb.json(&["status"]);
    assert_eq!(st["attached"].as_array().unwrap().len(), 1);
    let link = Command::new("ip")
        .args(["-n", &lb.ns.name, "link", "show", "lbc1"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"));
    lb.ok(&["detach", "--purge"]);
    assert!(!std::path::Path::new(&lb.pin).exists());
    lb.fails(&["vip", "list"], 1, "lb is not loaded");
}

#[test]
fn vips_backends_and_bad_input() {
    let lb = Lb::new("services");
    lb.ok(&["attach", "lbc0", "--mode", "generic"]);
    lb.ok(&["vip", "add", VIP, "--table-size", "4099"]);
    lb.ok(&[
        "vip",
        "add",
        "[2001:db8::100]:53/udp",
        "--table-size",
        "251",
    ]);
    lb.ok(&["backend", "add", VIP, "10.200.0.11:8080", "--weight", "3"]);
    lb.ok(&["backend", "add", VIP, "10.200.0.12:8080"]);
    lb.ok(&[
        "backend",
        "add",
        "[2001:db8::100]:53/udp",
        "[2001:db8::11]:5353",
    ]);

    // Listings, read by a new process each time.
    let vips = lb.json(&["vip", "list"]);
    assert_eq!(vips.as_array().unwrap().len(), 2);
    assert_eq!(vips[0]["vip"], VIP);
    assert_eq!(vips[0]["table_size"], 4099);
    assert_eq!(vips[0]["backends"], 2);
    let bs = lb.json(&["backend", "list", VIP]);
    assert_eq!(bs[0]["backend"], "10.200.0.11:8080");
    assert_eq!(bs[0]["weight"], 3);
    let table = lb.json(&["table", VIP]);
    let share = table["backends"][0]["slot_share_percent"].as_f64().unwrap();
    assert!((share - 75.0).abs() < 0.1, "share {share}");
    assert_eq!(table["empty_slots"], 0);

    // Drain, and the table follows.
    lb.ok(&["backend", "set", VIP, "10.200.0.11:8080", "--weight", "0"]);
    let table = lb.json(&["table", VIP]);
    assert_eq!(table["backends"][0]["slots"], 0);
    assert_eq!(table["backends"][1]["slots"], 4099);
    lb.ok(&["backend", "set", VIP, "10.200.0.11:8080", "--weight", "3"]);

    // Bad input: one clear error, the right exit code, nothing changed.
    lb.fails(
        &["vip", "add", "10.100.0.300:80/tcp"],
        2,
        "invalid VIP address",
    );
    lb.fails(&["vip", "add", "10.100.0.1:80/icmp"], 2, "unknown protocol");
    lb.fails(&["vip", "add", "10.100.0.1:0/tcp"], 2, "port 0");
    lb.fails(
        &["vip", "add", "10.100.0.1:70000/tcp"],
        2,
        "invalid VIP address",
    );
    lb.fails(
        &["vip", "add", "10.100.0.1:80/tcp", "--table-size", "4096"],
        2,
        "not a prime",
    );
    lb.fails(
        &["vip", "add", "10.100.0.1:80/tcp", "--table-size", "3"],
        2,
        "out of range",
    );
    lb.fails(&["vip", "add", VIP], 1, "already exists");
    lb.fails(&["vip", "del", "10.100.0.9:80/tcp"], 1, "does not exist");
    lb.fails(
        &["backend", "add", VIP, "10.200.0.11:8080"],
        1,
        "already exists",
    );
    lb.fails(
        &["backend", "add", VIP, "10.200.0.13"],
        2,
        "invalid backend address",
    );
    lb.fails(
        &["backend", "add", VIP, "10.200.0.13:80", "--weight", "70000"],
        2,
        "weight 70000",
    );
    lb.fails(
        &["backend", "add", VIP, "10.200.0.13:80", "--weight", "-1"],
        2,
        "unexpected argument '-1' found",
    );
    lb.fails(
        &["backend", "add", VIP, "10.200.0.13:80", "--weight=-1"],
        2,
        "invalid value '-1' for '--weight <WEIGHT>'",
    );
    lb.fails(
        &["backend", "add", VIP, "[2001:db8::13]:80"],
        2,
        "different address families",
    );
    lb.fails(
        &["backend", "add", "10.100.0.9:80/tcp", "10.200.0.13:80"],
        1,
        "does not exist",
    );
    lb.fails(
        &["backend", "del", VIP, "10.200.0.99:80"],
        1,
        "does not exist",
    );
    lb.fails(
        &["backend", "set", VIP, "10.200.0.99:80", "--weight", "1"],
        1,
        "does not exist",
    );
    lb.fails(
        &[
            "backend",
            "add",
            "[2001:db8::100]:53/udp",
            "[2001:db8::11]:5353",
        ],
        1,
        "already exists",
    );
    lb.ok(&["vip", "add", "10.100.0.101:80/tcp", "--table-size", "251"]);
    // One backend behind several VIPs (at most four), listed under each.
    lb.ok(&["backend", "add", "10.100.0.101:80/tcp", "10.200.0.11:8080"]);
    let bs = lb.json(&["backend", "list"]);
    let under: Vec<&str> = bs
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["backend"] == "10.200.0.11:8080")
        .map(|b| b["vip"].as_str().unwrap())
        .collect();
    assert_eq!(under, [VIP, "10.100.0.101:80/tcp"], "{bs}");
    // Stateless reverse NAT finds the VIP from the backend alone: no sharing.
    lb.fails(
        &["vip", "set", VIP, "--reverse", "stateless"],
        2,
        "cannot serve both VIP 10.100.0.100:80/tcp (reverse = stateless) and VIP 10.100.0.101:80/tcp",
    );
    for i in 2..=3 {
        lb.ok(&[
            "vip",
            "add",
            &format!("10.100.0.10{i}:80/tcp"),
            "--table-size",
            "251",
        ]);
        lb.ok(&[
            "backend",
            "add",
            &format!("10.100.0.10{i}:80/tcp"),
            "10.200.0.11:8080",
        ]);
    }
    lb.ok(&["vip", "add", "10.100.0.104:80/tcp", "--table-size", "251"]);
    lb.fails(
        &["backend", "add", "10.100.0.104:80/tcp", "10.200.0.11:8080"],
        2,
        "backend 10.200.0.11:8080 already serves VIPs 10.100.0.100:80/tcp, 10.100.0.101:80/tcp, 10.100.0.102:80/tcp and 10.100.0.103:80/tcp",
    );
    lb.ok(&[
        "vip",
        "set",
        "10.100.0.104:80/tcp",
        "--reverse",
        "stateless",
    ]);
    lb.fails(
        &["backend", "add", "10.100.0.104:80/tcp", "10.200.0.12:8080"],
        2,
        "(reverse = stateless)",
    );
    for i in 2..=4 {
        lb.ok(&["vip", "del", &format!("10.100.0.10{i}:80/tcp")]);
    }
    lb.ok(&["backend", "del", "10.100.0.101:80/tcp", "10.200.0.11:8080"]);
    // The backend still serves its first VIP.
    let bs = lb.json(&["backend", "list", VIP]);
    assert_eq!(bs[0]["backend"], "10.200.0.11:8080");
    // Flow timeouts: a bad one is one usage error, with nothing changed.
    lb.fails(
        &[
            "vip",
            "add",
            "10.100.0.105:80/tcp",
            "--timeout",
            "established=abc",
        ],
        2,
        "\"abc\" is not a number of seconds for state established",
    );
    lb.fails(
        &["vip", "set", VIP, "--timeout", "synsent=5"],
        2,
        "unknown flow state \"synsent\"",
    );
    lb.fails(
        &["vip", "set", VIP, "--timeout", "udp=604801"],
        2,
        "too long",
    );
    lb.ok(&[
        "vip",
        "set",
        VIP,
        "--timeout",
        "established=7200",
        "--timeout",
        "udp=0",
    ]);
    let vips = lb.json(&["vip", "list"]);
    assert_eq!(vips[0]["timeouts"]["established"], 7200, "{vips}");
    assert_eq!(vips[0]["timeouts"]["udp"], 0, "{vips}");
    assert_eq!(vips[0]["timeouts"]["opening"], 60, "{vips}");
    let cfg = lb.ok(&["show-config"]);
    assert!(
        cfg.contains("[vip.timeouts]\nopening = 60\nestablished = 7200\n"),
        "{cfg}"
    );
    for i in 0..25 {
        lb.ok(&[
            "backend",
            "add",
            "10.100.0.101:80/tcp",
            &format!("10.201.0.{i}:80"),
        ]);
    }
    lb.fails(
        &["backend", "add", "10.100.0.101:80/tcp", "10.201.0.99:80"],
        2,
        "too small for 26 backends",
    );
    lb.fails(&["vip", "add"], 2, "required");
    // Algorithms.
    lb.fails(
        &["vip", "add", "10.100.0.7:80/tcp", "--algo", "fastest"],
        2,
        "unknown algorithm \"fastest\"",
    );
    lb.fails(
        &[
            "vip",
            "add",
            "10.100.0.7:80/tcp",
            "--algo",
            "maglev",
            "--source-prefix",
            "24",
        ],
        2,
        "applies only to source-hash",
    );
    lb.fails(
        &[
            "vip",
            "add",
            "10.100.0.7:80/tcp",
            "--algo",
            "source-hash",
            "--source-prefix",
            "33",
        ],
        2,
        "longer than",
    );
    lb.fails(
        &["vip", "add", "10.100.0.7:53/udp", "--algo", "least-conn"],
        2,
        "least-conn needs a TCP VIP",
    );
    lb.fails(
        &[
            "vip",
            "set",
            "[2001:db8::100]:53/udp",
            "--algo",
            "least-conn",
        ],
        2,
        "least-conn needs a TCP VIP",
    );
    lb.fails(
        &["vip", "set", "10.100.0.9:80/tcp", "--algo", "random"],
        1,
        "does not exist",
    );
    lb.ok(&["vip", "set", VIP, "--algo", "round-robin"]);
    assert_eq!(lb.json(&["vip", "list"])[0]["algorithm"], "round-robin");
    lb.ok(&[
        "vip",
        "set",
        VIP,
        "--algo",
        "source-hash",
        "--source-prefix",
        "24",
    ]);
    assert_eq!(lb.json(&["vip", "list"])[0]["algorithm"], "source-hash/24");
    lb.ok(&["vip", "set", VIP, "--algo", "maglev"]);
    lb.fails(&["frobnicate"], 2, "unrecognized subcommand");

    // Another user, without root: the pin directory is root's (0700), and says so.
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_lb"),
            "vip",
            "list",
        ])
        .env("LB_PIN_DIR", &lb.pin)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    // (Where /sys/fs/bpf itself is 0700, as systemd mounts it, the error says the directory
    // cannot be reached.)
    assert!(
        (err.contains("permission denied on the pin directory")
            && err.contains(
                "(it belongs to user root (uid 0), mode 0700): run lb as that user or as root"
            ))
            || err.contains("cannot reach the pin directory"),
        "{err}"
    );

    // No BPF filesystem under the pin directory.
    let o = lb
        .cmd(&["vip", "list"])
        .env("LB_PIN_DIR", "/tmp/lb-not-bpffs")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not on a BPF filesystem"));

    lb.ok(&["backend", "del", VIP, "10.200.0.12:8080"]);
    assert_eq!(
        lb.json(&["backend", "list", VIP]).as_array().unwrap().len(),
        1
    );
    lb.ok(&["vip", "del", "[2001:db8::100]:53/udp"]);
    assert_eq!(lb.json(&["vip", "list"]).as_array().unwrap().len(), 2);
}

#[test]
fn capacity_is_enforced() {
    let lb = Lb::new("capacity");
    lb.ok(&[
        "attach",
        "lbc0",
        "--mode",
        "generic",
        "--table-capacity",
        "600",
        "--conntrack-size",
        "1024",
    ]);
    lb.ok(&["vip", "add", "10.100.0.1:80/tcp", "--table-size", "251"]);
    lb.ok(&["vip", "add", "10.100.0.2:80/tcp", "--table-size", "251"]);
    lb.fails(
        &["vip", "add", "10.100.0.3:80/tcp", "--table-size", "251"],
        1,
        "no room for a table of 251 slots",
    );
    let st = lb.json(&["status"]);
    assert_eq!(st["maps"][2]["capacity"], 600);
    assert_eq!(st["maps"][3]["capacity"], 1024);
}

#[test]
fn apply_show_config_round_trip() {
    let lb = Lb::new("config");
    let dir = std::env::temp_dir().join(format!("lbt-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("lb.toml");
    std::fs::write(
        &file,
        r#"
hash_seed = "0x1a2b3c4d"
flood_threshold = 50000

[[vip]]
address = "10.100.0.100:80/tcp"
table_size = 4099

[vip.timeouts]
established = 7200

[[vip.backend]]
address = "10.200.0.11:8080"
weight = 1

[[vip.backend]]
address = "10.200.0.12:8080"
weight = 2

[[vip]]
address = "[2001:db8::100]:443/tcp"
algorithm = "least-conn"
table_size = 251

[[vip.backend]]
address = "[2001:db8::11]:8443"

[[vip]]
address = "10.100.0.102:80/tcp"
algorithm = "source-hash"
source_prefix = 24
table_size = 251

[[vip]]
address = "10.100.0.103:80/tcp"
algorithm = "round-robin"
table_size = 251

[[vip.backend]]
address = "10.200.3.1:80"
weight = 2

[[vip.backend]]
address = "10.200.0.11:8080"
"#,
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let out = lb.ok(&["apply", "-f", f]);
    assert!(out.contains("4 VIPs added"), "{out}");
    let vips = lb.json(&["vip", "list"]);
    let algos: Vec<&str> = vips
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["algorithm"].as_str().unwrap())
        .collect();
    assert_eq!(
        algos,
        ["maglev", "source-hash/24", "round-robin", "least-conn"]
    );
    // Round trip: what show-config prints, applied, changes nothing.
    let shown = lb.ok(&["show-config"]);
    assert!(
        shown.contains("hash_seed = \"0x1a2b3c4d\"\nflood_threshold = 50000\n"),
        "{shown}"
    );
    assert!(
        shown.contains("[vip.timeouts]\nopening = 60\nestablished = 7200\n"),
        "{shown}"
    );
    // The status says a seed is set, and which flood threshold, but not the seed.
    let st = lb.ok(&["status", "--json"]);
    assert!(st.contains("\"flood_threshold\": 50000"), "{st}");
    assert!(st.contains("\"hash_seed_set\": true"), "{st}");
    assert!(
        !st.contains("1a2b3c4d") && !st.contains("439041101"),
        "{st}"
    );
    // The backend behind two VIPs is listed under both.
    let shared = lb.json(&["backend", "list"]);
    let n = shared
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["backend"] == "10.200.0.11:8080")
        .count();
    assert_eq!(n, 2, "{shared}");
    let again = dir.join("again.toml");
    std::fs::write(&again, &shown).unwrap();
    assert_eq!(
        lb.ok(&["apply", "-f", again.to_str().unwrap()]).trim(),
        "no changes"
    );
    assert_eq!(lb.ok(&["show-config"]), shown);

    // A change: one backend goes, one weight changes, a VIP goes, a VIP comes, a table grows.
    std::fs::write(
        &file,
        r#"
[[vip]]
address = "10.100.0.100:80/tcp"
table_size = 8191

[[vip.backend]]
address = "10.200.0.12:8080"
weight = 5

[[vip]]
address = "10.100.0.101:53/udp"
table_size = 251

[[vip.backend]]
address = "10.200.0.11:53"
"#,
    )
    .unwrap();
    let out = lb.ok(&["apply", "-f", f]);
    assert!(
        out.contains("1 VIPs added, 3 removed, 1 tables resized"),
        "{out}"
    );
    let vips = lb.json(&["vip", "list"]);
    assert_eq!(vips.as_array().unwrap().len(), 2);
    assert_eq!(vips[0]["table_size"], 8191);
    let table = lb.json(&["table", "10.100.0.100:80/tcp"]);
    assert_eq!(table["backends"][0]["slots"], 8191);

    // Malformed and inconsistent files: the error names the line; nothing changes.
    for (text, needle) in [
        (
            "[[vip]]\naddress = \"10.100.0.100:80/tcp\"\ntable_size = 1000\n",
            "lb.toml:3: table size 1000 is not a prime",
        ),
        (
            "[[vip]]\naddress = \"10.100.0.100:80/tcp\"\n[[vip.backend]]\naddress = \"nope\"\n",
            "lb.toml:4: invalid backend address",
        ),
        (
            "[[vip]]\naddress = \"10.1.0.1:80/tcp\"\n\n[[vip]]\naddress = \"10.1.0.1:80/tcp\"\n",
            "lb.toml:5: VIP 10.1.0.1:80/tcp is listed twice",
        ),
        ("[[vip]\naddress = 1\n", "lb.toml:1:"),
        (
            "[[vip]]\nadress = \"10.1.0.1:80/tcp\"\n",
            "lb.toml:2: unknown field",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        lb.fails(&["apply", "-f", f], 2, needle);
    }
    lb.fails(
        &["apply", "-f", "/nonexistent/lb.toml"],
        2,
        "reading /nonexistent/lb.toml",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn traffic_shows_in_stats_and_flows_and_bpftool() {
    let lb = Lb::new("observe");
    lb.ok(&["attach", "lbc0", "--mode", "generic"]);
    lb.ok(&["vip", "add", VIP, "--table-size", "251"]);
    lb.ok(&["backend", "add", VIP, "10.200.0.11:8080"]);
    // Run packets through the pinned program itself (the same one the link runs: generic
    // mode's).
    lb.ns.enter();
    let mut prog = Xdp::from_pin(
        format!("{}/prog_lb_xdp_generic", lb.pin),
        XdpAttachType::Interface,
    )
    .unwrap();
    let ifindex = lb.ns.ifindex("lbc0");
    for port in 0..5u16 {
        let spec = Spec::tcp(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            format!("10.0.0.2:{}", 40000 + port).parse().unwrap(),
            "10.100.0.100:80".parse().unwrap(),
            Tcp::Syn,
        );
        // No route to the backend in this namespace: rewritten and passed to the kernel.
        let (action, _) = run(&mut prog, ifindex, &spec.build());
        assert_eq!(action, XDP_PASS);
    }
    let stats = lb.json(&["stats"]);
    assert_eq!(stats["vips"][0]["packets"], 5);
    assert_eq!(stats["vips"][0]["new_flows"], 5);
    assert_eq!(stats["vips"][0]["backends"][0]["packets"], 5);
    assert!(stats["packets_seen"].as_u64().unwrap() >= 5);
    let text = lb.ok(&["stats"]);
    assert!(text.contains("-> 10.200.0.11:8080"), "{text}");
    let flows = lb.json(&["flows", VIP]);
    assert_eq!(flows.as_array().unwrap().len(), 5);
    assert_eq!(flows[0]["backend"], "10.200.0.11:8080");
    // A SYN makes an unconfirmed entry.
    assert_eq!(flows[0]["state"], "opening", "{flows}");
    assert_eq!(flows[0]["confirmed"], false, "{flows}");
    assert!(flows[0]["age_s"].as_u64().unwrap() < 60, "{flows}");
    let text = lb.ok(&["flows"]);
    assert!(text.contains("10.0.0.2:40000"), "{text}");
    assert!(text.contains("opening"), "{text}");
    let st = lb.json(&["status"]);
    let ct_used: u64 = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["map"].as_str().unwrap().starts_with("conntrack"))
        .map(|m| m["used"].as_u64().unwrap())
        .sum();
    assert_eq!(ct_used, 5, "conntrack fill: {st}");
    // The sweep keeps live entries, and deletes them once past their timeout.
    let o = lb.run(&["flows", "--sweep", "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("swept: 0 expired and 0 stale"), "{err}");
    let flows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(flows.as_array().unwrap().len(), 5);
    lb.ok(&["vip", "set", VIP, "--timeout", "opening=1"]);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let o = lb.run(&["flows", "--sweep", "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("swept: 5 expired and 0 stale"), "{err}");
    let flows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(flows.as_array().unwrap().len(), 0, "{flows}");

    // The next-hop cache is the data plane's: nothing cached before a packet went to the
    // backend; the maximum age is a setting like the others.
    let nh = lb.json(&["nexthop", "show"]);
    assert_eq!(nh[0]["mac"], serde_json::Value::Null, "{nh}");
    assert_eq!(nh[0]["cpus"], 0, "{nh}");
    assert!(lb
        .ok(&["nexthop", "show"])
        .contains("none: the next packet is looked up"));
    assert!(lb
        .ok(&["nexthop", "clear"])
        .contains("cleared the next hop of 1 backends"));
    assert!(lb.ok(&["status"]).contains("each used for at most 100 ms"));
    lb.fails(
        &["attach", "lbc0", "--nexthop-max-age-ms", "3600001"],
        2,
        "3600001",
    );

    // bpftool prints the maps with their field names.
    let v = bpftool_dump(&format!("{}/LB_VIPS_V2", lb.pin));
    // With BTF, `bpftool -j` puts the decoded key and value under "formatted".
    let entry = &v[0]["formatted"];
    for field in ["addr_be", "port_be", "proto", "family"] {
        assert!(
            entry["key"].get(field).is_some(),
            "key has no {field}: {entry}"
        );
    }
    assert_eq!(
        entry["key"]["port_be"],
        u16::from_ne_bytes(80u16.to_be_bytes())
    );
    assert_eq!(entry["value"]["table_size"], 251);
    let v = bpftool_dump(&format!("{}/LB_BACKENDS_V1", lb.pin));
    assert_eq!(v[0]["formatted"]["value"]["weight"], 1);
    assert_eq!(v[0]["formatted"]["value"]["flags"], 1);
    drop(prog);
}

/// `bpftool -j map dump pinned PATH` (with BTF, each entry's decoded key and value are under
/// "formatted").
fn bpftool_dump(path: &str) -> serde_json::Value {
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", path])
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    serde_json::from_slice(&dump.stdout).unwrap()
}

#[test]
fn concurrent_commands_are_serialized() {
    let lb = Lb::new("concurrent");
    lb.ok(&["vip", "add", VIP, "--table-size", "4099"]);
    let children: Vec<_> = (0..8)
        .map(|i| {
            lb.cmd(&["backend", "add", VIP, &format!("10.200.1.{i}:80")])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let bs = lb.json(&["backend", "list", VIP]);
    assert_eq!(
        bs.as_array().unwrap().len(),
        8,
        "every concurrent add landed"
    );
    let table = lb.json(&["table", VIP]);
    assert_eq!(table["empty_slots"], 0);
}

/// `lb run` refuses bad input before touching anything; `lb upgrade` replaces the program and
/// keeps the state, and refuses an object whose maps differ, changing nothing.
#[test]
fn run_and_upgrade_bad_input() {
    let lb = Lb::new("agent");
    lb.fails(&["upgrade"], 1, "not loaded");
    lb.ok(&["attach", "lbc0", "--mode", "generic"]);
    lb.ok(&["vip", "add", VIP, "--table-size", "251"]);
    lb.ok(&["backend", "add", VIP, "10.200.0.11:8080"]);
    let dir = std::env::temp_dir().join(format!("lbt-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[vip]]\naddress = \"10.100.0.100:80/tcp\"\n[vip.health]\ncheck = \"tcp\"\nfall = 0\n",
    )
    .unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[[vip]]\naddress = \"10.100.0.100:80/tcp\"\n").unwrap();
    let (bad, good) = (bad.to_str().unwrap(), good.to_str().unwrap());
    lb.fails(
        &["run", "-f", "/nonexistent/lb.toml"],
        2,
        "reading /nonexistent/lb.toml",
    );
    lb.fails(
        &["run", "-f", bad],
        2,
        "bad.toml:5: fall must be between 1 and 100",
    );
    lb.fails(
        &["run", "-f", good, "--metrics", "localhost"],
        2,
        "invalid --metrics",
    );
    lb.fails(&["run", "-f", good, "--poll", "0s"], 2, "more than 0");
    lb.fails(
        &["upgrade", "--object", "/nonexistent.o"],
        2,
        "reading /nonexistent.o",
    );
    // An object without lb's maps (the benchmark helpers) is refused.
    let other = dir.join("other.o");
    std::fs::write(&other, lb::object::LB_BENCH_OBJECT).unwrap();
    lb.fails(
        &["upgrade", "--object", other.to_str().unwrap()],
        1,
        "has no map",
    );
    let garbage = dir.join("garbage.o");
    std::fs::write(&garbage, b"not an ELF file").unwrap();
    lb.fails(
        &["upgrade", "--object", garbage.to_str().unwrap()],
        1,
        "parsing the new object",
    );
    // The real upgrade: a new program id, the same state.
    let before = lb.json(&["status"])["program_id"].clone();
    let cfg = lb.ok(&["show-config"]);
    let u = lb.json(&["upgrade"]);
    assert_eq!(u["old_program_id"], before);
    assert_ne!(u["new_program_id"], before);
    assert_eq!(u["interfaces"], serde_json::json!(["lbc0"]));
    assert_eq!(lb.json(&["status"])["program_id"], u["new_program_id"]);
    assert_eq!(lb.ok(&["show-config"]), cfg);

    // From a program that predates the next-hop cache, the VIP mirror, tc mode, the
    // multi-buffer programs of native mode and the mappable slot array: its pins are what an
    // older lb left (the old cache's map, program array and slot array — with the VIP's table
    // in it —, none of the new ones, no tc or generic-mode program).
    let pin = std::path::Path::new(&lb.pin);
    let digest = lb.ok(&["table", VIP, "--digest"]);
    let table = lb_table_slots(pin);
    const NEW: [&str; 9] = [
        "LB_TABLE_V2",
        "LB_VIPBYID_V1",
        "LB_VIPADDRS_V1",
        "LB_NEXTHOP_V2",
        "LB_PROGS_V3",
        "LB_GENPROGS_V1",
        "LB_TCPROGS_V1",
        "prog_lb_tc",
        "prog_lb_xdp_generic",
    ];
    for name in NEW {
        std::fs::remove_file(pin.join(name)).unwrap();
    }
    let old_cache = pin.join("LB_NEXTHOP_V1");
    let old_progs = pin.join("LB_PROGS_V2");
    let old_table = pin.join("LB_TABLE_V1");
    let capacity = table.len().to_string();
    for (path, kind, value, entries, name) in [
        (&old_cache, "array", "24", "65536", "LB_NEXTHOP_V1"),
        (&old_progs, "prog_array", "4", "2", "LB_PROGS_V2"),
        (&old_table, "array", "4", capacity.as_str(), "LB_TABLE_V1"),
    ] {
        let created = Command::new("bpftool")
            .args(["map", "create", path.to_str().unwrap()])
            .args(["type", kind, "key", "4", "value", value, "entries", entries])
            .args(["name", name])
            .output()
            .unwrap();
        assert!(created.status.success(), "{created:?}");
    }
    {
        let data = aya::maps::MapData::from_pin(&old_table).unwrap();
        let mut old: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
        for (i, v) in table.iter().enumerate() {
            if *v != 0 {
                old.set(i as u32, v, 0).unwrap();
            }
        }
    }
    let o = lb.run(&["status"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("run `lb upgrade` first"), "{err}");
    let u = lb.json(&["upgrade"]);
    assert_ne!(u["new_program_id"], u["old_program_id"]);
    assert_eq!(lb.ok(&["show-config"]), cfg);
    for name in NEW {
        assert!(pin.join(name).exists(), "{name} not pinned by the upgrade");
    }
    assert!(!old_cache.exists(), "the old cache's pin is left behind");
    assert!(
        !old_progs.exists(),
        "the old program array's pin is left behind"
    );
    assert!(
        !old_table.exists(),
        "the old slot array's pin is left behind"
    );
    // The tables were copied: the same selection, in an array as large.
    assert_eq!(lb.ok(&["table", VIP, "--digest"]), digest);
    assert_eq!(lb_table_slots(pin), table);
    // The mirror was filled: the one VIP (port 80) under its id.
    let slots = bpftool_dump(&format!("{}/LB_VIPBYID_V1", lb.pin));
    let vips: Vec<&serde_json::Value> = slots
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["formatted"]["value"]["vip"]["family"] == 4)
        .collect();
    assert_eq!(vips.len(), 1, "{slots}");
    assert_eq!(
        vips[0]["formatted"]["value"]["vip"]["port_be"],
        80u16.to_be(),
        "{slots}"
    );
    // And the address hint: the VIP's low 16 bits (10.100.0.100: 100), nothing else.
    let hints = bpftool_dump(&format!("{}/LB_VIPADDRS_V1", lb.pin));
    let set: Vec<&serde_json::Value> = hints
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["formatted"]["value"] != 0)
        .map(|s| &s["formatted"]["key"])
        .collect();
    assert_eq!(set, [&serde_json::json!(100)], "{set:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every slot of the slot array pinned in `pin`.
fn lb_table_slots(pin: &std::path::Path) -> Vec<u32> {
    let data = aya::maps::MapData::from_pin(pin.join("LB_TABLE_V2")).unwrap();
    let table: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    (0..table.len())
        .map(|i| table.get(&i, 0).unwrap())
        .collect()
}

/// Forwarding modes (their rules on backends), marking backends up/down by hand, and the
/// decapsulation program's commands.
#[test]
fn forward_modes_health_and_decap() {
    let lb = Lb::new("fwd");
    lb.ok(&["attach", "lbc0", "--mode", "generic"]);
    lb.ok(&[
        "vip",
        "add",
        VIP,
        "--forward",
        "dsr-l2",
        "--table-size",
        "251",
    ]);
    lb.fails(
        &["backend", "add", VIP, "10.200.0.11:8080"],
        2,
        "must listen on the VIP's port 80",
    );
    lb.fails(
        &["backend", "add", VIP, "[2001:db8::11]:80"],
        2,
        "only ipip carries IPv4 in IPv6",
    );
    lb.ok(&["backend", "add", VIP, "10.200.0.11:80"]);
    lb.fails(
        &["vip", "set", VIP, "--forward", "tunnel"],
        2,
        "unknown forwarding mode",
    );
    let v = lb.json(&["vip", "list"]);
    assert_eq!(v[0]["forward"], "dsr-l2");
    assert!(lb.ok(&["show-config"]).contains("forward = \"dsr-l2\""));
    // ipip carries IPv4 in IPv6; nat needs the VIP's port only in DSR modes.
    let tun = "10.100.0.101:80/tcp";
    lb.ok(&[
        "vip",
        "add",
        tun,
        "--forward",
        "ipip",
        "--table-size",
        "251",
    ]);
    lb.ok(&["backend", "add", tun, "[2001:db8::11]:80"]);
    lb.fails(
        &["vip", "set", tun, "--forward", "nat"],
        2,
        "different address families",
    );
    // By hand: down takes it out of the table, up brings it back.
    lb.ok(&["backend", "set", VIP, "10.200.0.11:80", "--health", "down"]);
    let rows = lb.json(&["backend", "list", VIP]);
    assert_eq!(rows[0]["health"], "down");
    assert!(lb.ok(&["status"]).contains("1 backends down"));
    assert_eq!(
        lb.json(&["table", VIP])["empty_slots"],
        0,
        "fail-open keeps the table"
    );
    lb.ok(&["backend", "set", VIP, "10.200.0.11:80", "--health", "up"]);
    assert_eq!(lb.json(&["backend", "list", VIP])[0]["health"], "up");
    lb.fails(
        &["backend", "set", VIP, "10.200.0.99:80", "--health", "up"],
        1,
        "does not exist",
    );

    // Stateless reverse NAT needs a hash algorithm; the digest names the selection.
    lb.fails(
        &[
            "vip",
            "set",
            VIP,
            "--algo",
            "random",
            "--reverse",
            "stateless",
        ],
        2,
        "maglev or source-hash",
    );
    lb.ok(&["vip", "set", VIP, "--reverse", "stateless"]);
    assert_eq!(lb.json(&["vip", "list"])[0]["reverse"], "stateless");
    lb.fails(
        &["vip", "set", VIP, "--algo", "round-robin"],
        2,
        "maglev or source-hash",
    );
    let d = lb.ok(&["table", VIP, "--digest"]);
    assert_eq!(d.trim().len(), 64, "{d}");
    assert_eq!(lb.json(&["table", VIP, "--digest"])["digest"], d.trim());
    lb.ok(&["backend", "set", VIP, "10.200.0.11:80", "--weight", "5"]);
    assert_eq!(
        lb.ok(&["table", VIP, "--digest"]),
        d,
        "one backend: same slots"
    );
    lb.ok(&["backend", "add", VIP, "10.200.0.12:80"]);
    assert_ne!(lb.ok(&["table", VIP, "--digest"]), d);
    assert!(lb.ok(&["show-config"]).contains("reverse = \"stateless\""));

    // The decapsulation program: what it accepts must be given, and bad input changes nothing.
    lb.fails(
        &["decap", "attach", "lbc1", "--mode", "generic"],
        1,
        "--from PREFIX",
    );
    lb.fails(
        &["decap", "attach", "lbc1", "--from", "172.16.0.0/33"],
        1,
        "the length must be 0 to 32",
    );
    lb.fails(
        &["decap", "attach", "lbc1", "--from", "172.16.0.0/16"],
        1,
        "no VIP to accept",
    );
    assert_eq!(
        lb.json(&["decap", "status"])["attached"],
        serde_json::json!([])
    );
    lb.ok(&[
        "decap",
        "attach",
        "lbc1",
        "--mode",
        "generic",
        "--from",
        "172.16.0.0/16",
        "--vip",
        "10.100.0.100",
    ]);
    let s = lb.json(&["decap", "status"]);
    assert_eq!(s["attached"][0]["iface"], "lbc1");
    assert_eq!(s["counters"]["decap_v4_in_v4"], 0);
    let with_from = |iface: &'static str| {
        [
            "decap",
            "attach",
            iface,
            "--from",
            "172.16.0.0/16",
            "--vip",
            "10.100.0.100",
        ]
    };
    lb.fails(&with_from("lbc1"), 1, "already attached");
    // What it accepts changes in place; bad input changes nothing.
    let out = lb.ok(&["decap", "set", "--from", "100::/64", "--vip", "fd10::100"]);
    assert!(out.contains("from 100::/64; VIPs fd10::100"), "{out}");
    lb.fails(
        &["decap", "set", "--from", "100::1/64", "--vip", "fd10::100"],
        1,
        "host bits set (the prefix is 100::/64)",
    );
    lb.fails(&with_from("nosuch0"), 1, "does not exist");
    lb.ok(&["decap", "detach"]);
    assert_eq!(
        lb.json(&["decap", "status"])["attached"],
        serde_json::json!([])
    );
    lb.fails(&["decap", "detach", "lbc1"], 1, "not attached");
}

/// `auto` (the default) is native XDP; on an interface whose driver refuses it, the tc
/// program — never generic mode, which can corrupt unfinished checksums — and `lb attach`
/// says so (stdout: the mode; stderr: why). `lb status` and `/metrics`-style readers see the
/// mode. `--mode generic` is an operator's explicit choice.
#[test]
fn auto_mode_falls_back_to_tc_never_to_generic() {
    let lb = Lb::new("auto");
    // A bridge has no native XDP.
    lb.ns.ip(&["link", "add", "lbbr0", "type", "bridge"]);
    lb.ns.ip(&["link", "set", "lbbr0", "up"]);
    let o = lb.run(&["attach", "lbbr0"]);
    assert!(o.status.success(), "{o:?}");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(out.contains("attached to lbbr0 (tc mode)"), "{out}");
    assert!(
        err.contains("lbbr0: the driver refused native XDP") && err.contains("tc mode"),
        "{err}"
    );
    let st = lb.json(&["status"]);
    assert_eq!(st["attached"][0]["iface"], "lbbr0", "{st}");
    assert_eq!(st["attached"][0]["mode"], "tc", "{st}");
    lb.ok(&["detach", "lbbr0"]);
    let out = lb.ok(&["attach", "lbbr0", "--mode", "generic"]);
    assert!(out.contains("attached to lbbr0 (generic mode)"), "{out}");
    lb.fails(
        &[
            "decap",
            "attach",
            "lbc1",
            "--mode",
            "tc",
            "--from",
            "172.16.0.0/16",
            "--vip",
            "10.100.0.100",
        ],
        1,
        "no tc mode",
    );
    // Native where the driver has it (veth), by default.
    let out = lb.ok(&["attach", "lbc0"]);
    assert!(out.contains("attached to lbc0 (native mode)"), "{out}");
}

/// `lb upgrade` switches a tc-mode link (the new `lb_tc` runs on it, tcx's link update: no
/// packet sees no program) and a generic-mode one (to the new `lb_xdp_generic`, not native
/// mode's multi-buffer program), and `lb detach` removes a tc link.
#[test]
fn upgrade_switches_tc_and_generic_links() {
    let lb = Lb::new("tcup");
    let out = lb.ok(&["attach", "lbc0", "--mode", "tc"]);
    assert!(out.contains("attached to lbc0 (tc mode)"), "{out}");
    lb.ok(&["attach", "lbc1", "--mode", "generic"]);
    let bpftool = |args: &[&str]| -> serde_json::Value {
        let o = Command::new("bpftool")
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let tc_link = format!("{}/link_lbc0_tc", lb.pin);
    let generic_link = format!("{}/link_lbc1_generic", lb.pin);
    let prog_of_link = |link: &str| -> u64 {
        let v = bpftool(&["link", "show", "pinned", link]);
        v["prog_id"].as_u64().unwrap()
    };
    let pinned = |name: &str| -> u64 {
        let v = bpftool(&["prog", "show", "pinned", &format!("{}/{name}", lb.pin)]);
        v["id"].as_u64().unwrap()
    };
    // BPF_LINK_TYPE_TCX (this bpftool prints the number).
    let t = &bpftool(&["link", "show", "pinned", &tc_link])["type"];
    assert!(t == "tcx" || t == 11, "{t}");
    // Each link runs its mode's program: the tc one, and generic mode's single-buffer one.
    assert_eq!(prog_of_link(&tc_link), pinned("prog_lb_tc"));
    assert_eq!(prog_of_link(&generic_link), pinned("prog_lb_xdp_generic"));
    let before = (prog_of_link(&tc_link), prog_of_link(&generic_link));
    let u = lb.json(&["upgrade"]);
    assert_eq!(u["interfaces"], serde_json::json!(["lbc0", "lbc1"]));
    let after = (prog_of_link(&tc_link), prog_of_link(&generic_link));
    assert_ne!(before.0, after.0, "the tc link still runs the old program");
    assert_ne!(
        before.1, after.1,
        "the generic link still runs the old program"
    );
    assert_eq!(after.0, pinned("prog_lb_tc"));
    assert_eq!(after.1, pinned("prog_lb_xdp_generic"));
    let st = lb.json(&["status"]);
    assert_eq!(st["attached"][0]["mode"], "tc", "{st}");
    assert_eq!(st["attached"][1]["mode"], "generic", "{st}");
    lb.ok(&["detach", "lbc0"]);
    assert!(!std::path::Path::new(&tc_link).exists());
}

/// `lb check` says "consistent" and exits 0 on a consistent state; names each violation and
/// exits 1 when the maps are inconsistent (here made so with bpftool: a port filter flag no
/// VIP needs, a table slot naming no backend of its VIP, a VIP's port missing from the
/// filter); `lb apply` of the same configuration repairs all of it.
#[test]
fn check_names_violations_and_apply_repairs_them() {
    let lb = Lb::new("check");
    lb.ok(&["vip", "add", VIP, "--table-size", "251"]);
    lb.ok(&["backend", "add", VIP, "10.200.0.11:8080"]);
    lb.ok(&["backend", "add", VIP, "10.200.0.12:8080"]);
    let out = lb.ok(&["check"]);
    assert!(out.starts_with("consistent: 1 VIPs"), "{out}");
    assert_eq!(lb.json(&["check"])["violations"], serde_json::json!([]));

    let update = |map: &str, key: &[u8], value: &[u8]| {
        let hex = |b: &[u8]| b.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let o = Command::new("bpftool")
            .args([
                "map",
                "update",
                "pinned",
                &format!("{}/{map}", lb.pin),
                "key",
            ])
            .args(hex(key))
            .arg("value")
            .args(hex(value))
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    };
    // Port 9999 marked for a backend; port 80 (the VIP's) cleared; the VIP's first slot (the
    // VIP's table starts at slot 0: the only VIP) naming backend id 77.
    update(
        "LB_PORTS_V1",
        &9999u32.to_ne_bytes(),
        &[lb_common::PORT_F_BACKEND],
    );
    update("LB_PORTS_V1", &80u32.to_ne_bytes(), &[0]);
    update("LB_TABLE_V2", &0u32.to_ne_bytes(), &77u32.to_ne_bytes());
    let o = lb.run(&["check"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    for needle in [
        "violation: port 9999: the port filter marks it for a backend, but none uses it",
        "violation: port 80: a VIP uses it, but the port filter does not say so",
        "violation: VIP 10.100.0.100:80/tcp: 1 table slots name no backend of this VIP (slot 0: id 77)",
        "violation: VIP 10.100.0.100:80/tcp: 1 table slots differ",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    assert!(err.contains("4 invariant violations"), "{err}");

    let dir = std::env::temp_dir().join(format!("lbt-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("lb.toml");
    std::fs::write(&file, lb.ok(&["show-config"])).unwrap();
    let out = lb.ok(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.contains("repaired what an interrupted command had left: 2 port filter entries"),
        "{out}"
    );
    assert!(lb.ok(&["check"]).starts_with("consistent"));
    let _ = std::fs::remove_dir_all(&dir);
}
