//! The agent as its systemd unit (deploy/lb.service) runs it, on a namespace test bed: no
//! root, only the unit's capabilities, no-new-privileges, its umask — and every system call
//! and socket family it used inside the unit's filters. It attaches, applies, health-checks,
//! forwards, announces through BIRD and serves metrics that `promtool check metrics` accepts;
//! what root does from a shell meanwhile is handed to it; a missing capability is one error
//! naming it. And the unit's exposure stays at most 3.0.

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use lb::testbed::{
    service::{self, ServiceRun, Unit},
    wait_for, Testbed, HTTP_PORT,
};

/// The uid (and gid) in the role of the package's `lb` (no name needed). BIRD's control
/// socket is given to that group: on a gateway it is Debian's `bird`, which the package adds
/// `lb` to, but an unnamed uid has no entry in the group database for root's `lb detach` to
/// find its groups by.
const SERVICE_UID: u32 = 64_350;
const BIRD_GID: u32 = SERVICE_UID;
const VIP: &str = "10.100.0.100";
const METRICS: &str = "127.0.0.1:9100";
/// The exposure `systemd-analyze security` may rate the unit at most.
const MAX_EXPOSURE: f64 = 3.0;

fn lb_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb"))
}

/// A process killed and reaped when dropped (BIRD).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent under strace, its whole process group killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        service::kill_group(self.0.id());
        let _ = self.0.wait();
    }
}

/// The service's files, removed at the end (and shown if the test fails).
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for f in ["agent.log", "bird.log"] {
                let text = std::fs::read_to_string(self.0.join(f)).unwrap_or_default();
                eprintln!("---- {f} ----\n{text}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bpffs of the test's own, mounted as systemd mounts /sys/fs/bpf (root's, 0700); unmounted
/// and removed however the test ends (declared before the test bed, it goes after it).
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount() -> Bpffs {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("lb-service-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "-o", "mode=0700", "bpf"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "mounting a bpffs at {}", dir.display());
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `birdc show route` on BIRD's socket, if it answers.
fn bird_routes(socket: &Path) -> Option<String> {
    let o = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(["show", "route"])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

/// The names in a capability list, sorted.
fn sorted(words: Vec<String>) -> Vec<String> {
    let mut w = words;
    w.sort();
    w
}

/// The unit grants exactly the capabilities lb checks for, to its own user, never more; its
/// exposure (`systemd-analyze security --offline=true`) is at most 3.0.
#[test]
fn the_unit_grants_what_lb_needs_and_no_more() {
    let unit = Unit::shipped();
    assert_eq!(unit.one("User").unwrap(), "lb");
    assert_eq!(unit.one("Group").unwrap(), "lb");
    let needed: Vec<String> = sorted(
        lb::privileges::FOR_LOADING
            .iter()
            .map(|c| c.to_string())
            .collect(),
    );
    assert_eq!(sorted(unit.words("AmbientCapabilities")), needed);
    assert_eq!(sorted(unit.words("CapabilityBoundingSet")), needed);
    assert_eq!(unit.one("NoNewPrivileges").unwrap(), "yes");
    assert!(unit.allowed_syscalls().unwrap().contains("bpf"));

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lb.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package; cargo xtask setup installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    let level: f64 = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(
        level <= MAX_EXPOSURE,
        "the unit's exposure is {level} (at most {MAX_EXPOSURE}):\n{report}"
    );
    eprintln!("unit exposure: {level}");
}

#[test]
fn the_agent_runs_as_the_unit_says() {
    let bpffs = Bpffs::mount();
    let mut tb = Testbed::unattached(2, lb_bin()).expect("building the testbed");
    tb.set_pin_dir(&bpffs.0.join("lb"));
    tb.make_pin_dir_for(SERVICE_UID, SERVICE_UID).unwrap();
    let dir = Dir(std::env::temp_dir().join(format!("{}-service", tb.prefix)));
    let svc = ServiceRun::new(Unit::shipped(), SERVICE_UID, SERVICE_UID, vec![], &dir.0).unwrap();
    let caps = svc.unit.setpriv_caps().unwrap();
    let attach: Vec<String> = tb
        .interfaces()
        .into_iter()
        .flat_map(|i| ["--attach".to_string(), i])
        .collect();
    let attach: Vec<&str> = attach.iter().map(String::as_str).collect();
    let agent_log = dir.0.join("agent.log");
    let as_service = |caps: &str, args: &[&str]| {
        std::fs::write(&agent_log, "").unwrap();
        let status = tb
            .spawn_lb_as(&svc, caps, args, &agent_log)
            .unwrap()
            .wait()
            .unwrap();
        (status.success(), log(&dir.0))
    };

    // The bpffs as systemd mounts it (0700): the service user cannot reach its directory, and
    // is told why; then 0711, as the package's tmpfiles.d makes it.
    let (ok, said) = as_service(&caps, &["vip", "list"]);
    assert!(
        !ok && said.contains("cannot reach the pin directory") && said.contains("0711"),
        "{said}"
    );
    std::fs::set_permissions(&bpffs.0, std::fs::Permissions::from_mode(0o711)).unwrap();

    // Without CAP_PERFMON: one error naming it, nothing pinned.
    let fewer: String = caps
        .split(',')
        .filter(|c| *c != "+perfmon")
        .collect::<Vec<_>>()
        .join(",");
    let (ok, said) = as_service(&fewer, &["attach", "g0"]);
    assert!(!ok);
    assert!(
        said.contains("needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON (missing: CAP_PERFMON)"),
        "{said}"
    );
    assert_eq!(said.matches("error").count(), 1, "{said}");
    assert_eq!(
        std::fs::read_dir(tb.pin_dir()).unwrap().count(),
        0,
        "a refused attach pinned something"
    );

    // The file-system view the runs get (the unit's): nothing writable but the runtime and
    // pin directories, no /proc/sys, no other processes.
    let probe = format!(
        "touch {run}/probe && ! touch {dir}/probe 2>/dev/null && ! touch /etc/lb-probe 2>/dev/null && test ! -e /proc/sys && test ! -e /proc/1",
        run = svc.runtime_dir().display(),
        dir = dir.0.display()
    );
    let viewed = svc
        .command(
            &tb.gateway.name,
            "",
            &[tb.pin_dir()],
            Path::new("/bin/sh"),
            &["-c", &probe],
        )
        .unwrap()
        .status()
        .unwrap();
    assert!(viewed.success(), "the unit's file-system view: {probe}");

    // Loading takes the capabilities; attaching a loaded program, detaching and reading take
    // none (only the pins' file permissions).
    let seeded = [
        "attach",
        "g0",
        "--mode",
        "native",
        "--hash-seed",
        "0x1a2b3c4d",
    ];
    let (ok, said) = as_service(&caps, &seeded);
    assert!(ok, "{said}");
    for args in [
        &["detach", "g0"][..],
        &["attach", "g0", "--mode", "native"],
        &["vip", "list"],
    ] {
        let (ok, said) = as_service("", args);
        assert!(ok, "{args:?} without capabilities: {said}");
    }
    std::fs::write(&agent_log, "").unwrap();

    // BIRD as on a gateway: root, its control socket for group `bird`.
    let run = svc.runtime_dir();
    let include = run.join("bird-vips.conf");
    std::fs::write(&include, "").unwrap();
    let socket = dir.0.join("bird.ctl");
    let conf = dir.0.join("bird.conf");
    std::fs::write(
        &conf,
        format!(
            "router id 10.0.0.1;\nprotocol device {{}}\ninclude \"{}\";\n",
            include.display()
        ),
    )
    .unwrap();
    let _bird = Killed(
        Command::new("ip")
            .args(["netns", "exec", &tb.gateway.name, "bird", "-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .args(["-g", &BIRD_GID.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("bird.log")).unwrap())
            .spawn()
            .expect("starting bird (cargo xtask setup installs bird2)"),
    );
    wait_for(Duration::from_secs(10), "BIRD's control socket", || {
        socket.exists()
    });

    let config = dir.0.join("lb.toml");
    let mut text = format!(
        "hash_seed = \"0x1a2b3c4d\"\n[[vip]]\naddress = \"{VIP}:{HTTP_PORT}/tcp\"\ntable_size = 1009\n[vip.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 2\n"
    );
    for b in &tb.backends {
        text += &format!("[[vip.backend]]\naddress = \"{}:{HTTP_PORT}\"\n", b.v4);
    }
    std::fs::write(&config, text).unwrap();
    let cfg = config.display().to_string();
    let (inc, sock) = (include.display().to_string(), socket.display().to_string());
    let mut args = vec!["run", "-f", &cfg, "--metrics", METRICS, "--poll", "200ms"];
    args.extend(&attach);
    args.extend([
        "--mode",
        "native",
        "--bird-include",
        &inc,
        "--bird-socket",
        &sock,
    ]);
    let mut agent = Agent(tb.spawn_lb_as(&svc, &caps, &args, &agent_log).unwrap());

    // Attached and applied; both backends pass their HTTP checks; traffic flows.
    wait_for(Duration::from_secs(60), "the configuration applied", || {
        log(&dir.0).contains("configuration applied")
    });
    let up = |tb: &Testbed| {
        tb.lb_json(&["backend", "list"]).is_ok_and(|rows| {
            rows.as_array()
                .is_some_and(|r| r.len() == 2 && r.iter().all(|b| b["health"] == "up"))
        })
    };
    wait_for(Duration::from_secs(20), "both backends up", || up(&tb));
    let vip: SocketAddr = format!("{VIP}:{HTTP_PORT}").parse().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (name, _) = tb.http_get(vip).expect("a connection through the VIP");
        seen.insert(name);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Announced through BIRD's control socket.
    wait_for(Duration::from_secs(10), "the VIP in BIRD", || {
        bird_routes(&socket).is_some_and(|r| r.contains(&format!("{VIP}/32")))
    });

    // Root from a shell: detach and attach again. Its new link pin goes to the service user,
    // whose agent reads it.
    tb.lb(&["detach", "g2"]).unwrap();
    tb.lb(&["attach", "g2", "--mode", "native"]).unwrap();
    for e in std::fs::read_dir(tb.pin_dir()).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o777),
            (SERVICE_UID, SERVICE_UID, 0o600),
            "{}",
            e.path().display()
        );
    }
    let d = std::fs::metadata(tb.pin_dir()).unwrap();
    assert_eq!(
        (d.uid(), d.permissions().mode() & 0o777),
        (SERVICE_UID, 0o700)
    );

    // Metrics, with traffic and health checks behind them, that promtool accepts.
    let mut page = String::new();
    wait_for(Duration::from_secs(10), "g2 attached on /metrics", || {
        page = tb
            .gateway_http_get(METRICS.parse().unwrap(), "/metrics")
            .unwrap_or_default();
        page.contains("lb_attached{iface=\"g2\",mode=\"native\"} 1")
    });
    for needle in [
        "lb_vip_announced{address=\"10.100.0.100\"} 1",
        "lb_health_checks_total{",
        "lb_backend_up{",
    ] {
        assert!(page.contains(needle), "{needle} not in:\n{page}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; cargo xtask setup installs it)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), page.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        checked.status.success() && findings.trim().is_empty(),
        "promtool check metrics: {findings}"
    );

    // The umask: what the agent made without a mode of its own is its user's only.
    let announce = run.join("announce");
    assert_eq!(
        std::fs::metadata(&announce).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // Stopped; everything it and its children (birdc) did was inside the unit's filters.
    let lb = service::traced_pid(agent.0.id()).expect("lb under strace");
    // SAFETY: plain syscall on our child's child.
    unsafe { libc::kill(lb, libc::SIGTERM) };
    wait_for(Duration::from_secs(10), "the agent to stop", || {
        agent.0.try_wait().ok().flatten().is_some()
    });
    let trace = svc.check_trace().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "{} system calls, families {:?}",
        trace.syscalls.len(),
        trace.families
    );
    let raw = std::fs::read_to_string(svc.trace_path()).unwrap();
    assert!(raw.contains("birdc\""), "the trace shows no birdc");
    assert!(trace.families.contains("AF_UNIX"), "{:?}", trace.families);

    // Root detaches everywhere with no agent running: the VIP is withdrawn through the
    // agent's record, with the service user's rights — the include file stays its, and a
    // record that names a file root's alone could write is refused.
    let detach = |tb: &Testbed| {
        tb.lb_command(&["detach"])
            .env("LB_RUNTIME_DIR", &run)
            .output()
            .unwrap()
    };
    let record = std::fs::read_dir(run.join("announce"))
        .unwrap()
        .next()
        .expect("the agent's record")
        .unwrap()
        .path();
    let honest = std::fs::read_to_string(&record).unwrap();
    let roots_only = dir.0.join("roots-only");
    std::fs::create_dir(&roots_only).unwrap();
    std::fs::set_permissions(&roots_only, std::fs::Permissions::from_mode(0o700)).unwrap();
    let target = roots_only.join("bird-vips.conf");
    let forged = format!("{}\n{}\n", target.display(), socket.display());
    // (Written as the agent would: the record is its.)
    std::fs::write(&record, forged).unwrap();
    std::os::unix::fs::chown(&record, Some(SERVICE_UID), Some(SERVICE_UID)).unwrap();
    let out = detach(&tb);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !target.exists() && err.contains("withdrawing the VIPs from BIRD failed"),
        "root wrote where the record said: {err}"
    );
    tb.lb(&["attach", "g0", "--mode", "native"]).unwrap();
    std::fs::write(&record, honest).unwrap();
    let out = detach(&tb);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("withdrew the VIPs from BIRD"),
        "{out:?}"
    );
    let m = std::fs::metadata(&include).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (SERVICE_UID, 0o644));
    wait_for(Duration::from_secs(10), "the VIP gone from BIRD", || {
        bird_routes(&socket).is_some_and(|r| !r.contains(&format!("{VIP}/32")))
    });
}
