//! Flow state that survives the internet (issue 13), end to end: real kernel TCP/UDP in the
//! testbed's namespaces, the real `lb` binary, and spoofed traffic sent from the client's
//! namespace through an AF_PACKET socket (`lb::testbed::spoof`) — floods from random sources,
//! blind FIN/SYN/RST with real clients' 5-tuples, martian sources. Replies to the spoofed
//! sources (198.18.0.0/15, 2001:db8::/32) are blackholed at the gateway, so nothing leaves
//! the namespaces.
//!
//! Spoofed floods use random sources; the seed is printed, `LB_FLOW_SEED=…` replays one.

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb::testbed::{
    assert_none, grew,
    hold::{HoldServers, TtlServers},
    in_ns,
    spoof::{self, tcp_flags, RawSender, TcpSeg, L2},
    transfer::{self, DigestServer},
    wait_for, Testbed, IO_TIMEOUT, UDP_PORT,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The hold servers' port (keep every connection, push on demand).
const PUSH_PORT: u16 = 9100;
/// The TTL-recording UDP servers' port.
const TTL_PORT: u16 = 5400;
/// The digest server's port (bulk transfers checked with SHA-256).
const BULK_PORT: u16 = 9200;

const VIP4: &str = "10.100.0.100";
const VIP4_B: &str = "10.100.0.101";
const VIP6: &str = "fd10::100";

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn vip4(port: u16) -> SocketAddr {
    sa(VIP4.parse().unwrap(), port)
}

fn vip6(port: u16) -> SocketAddr {
    sa(VIP6.parse().unwrap(), port)
}

fn seed() -> u64 {
    let seed = std::env::var("LB_FLOW_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("LB_FLOW_SEED={seed}");
    seed
}

/// The testbed with `n` backends; when `attach` is not empty, lb is attached with these
/// options instead of the testbed's default sizes. Replies to the spoofed source ranges are
/// blackholed at the gateway.
fn testbed(n: usize, mode: &str, attach: &[&str]) -> Testbed {
    let lb = Path::new(env!("CARGO_BIN_EXE_lb"));
    let tb = if attach.is_empty() {
        Testbed::new(n, mode, lb)
    } else {
        let mut args = vec!["--table-capacity", "262144"];
        args.extend(attach);
        Testbed::with_attach(n, mode, lb, &args)
    }
    .unwrap_or_else(|e| {
        panic!(
            "building the testbed (lb attach … {}): {e:#}",
            attach.join(" ")
        )
    });
    tb.gateway
        .ip(&["route", "add", "blackhole", "198.18.0.0/15"])
        .unwrap();
    tb.gateway
        .ip(&["-6", "route", "add", "blackhole", "2001:db8::/32"])
        .unwrap();
    tb
}

/// `vip` with backends `addrs` (lb's syntax), after `vip add` with `vip_args`.
fn add_vip(tb: &Testbed, vip: &str, vip_args: &[&str], addrs: &[SocketAddr]) {
    let mut args = vec!["vip", "add", vip, "--table-size", "251"];
    args.extend(vip_args);
    tb.lb(&args)
        .unwrap_or_else(|e| panic!("lb {}: {e:#}", args.join(" ")));
    for a in addrs {
        let a = a.to_string();
        tb.lb(&["backend", "add", vip, &a])
            .unwrap_or_else(|e| panic!("lb backend add {vip} {a}: {e:#}"));
    }
}

/// The backends' addresses on `port` (IPv4, or IPv6 with `v6`).
fn backend_addrs(tb: &Testbed, port: u16, v6: bool) -> Vec<SocketAddr> {
    tb.backends
        .iter()
        .map(|b| sa(if v6 { b.v6 } else { b.v4 }, port))
        .collect()
}

/// Backend address as lb prints it → backend name.
fn names(tb: &Testbed, port: u16) -> HashMap<String, String> {
    tb.backends
        .iter()
        .flat_map(|b| {
            [
                (sa(b.v4, port).to_string(), b.name.clone()),
                (sa(b.v6, port).to_string(), b.name.clone()),
            ]
        })
        .collect()
}

/// The Ethernet addresses of frames the client sends to the gateway.
fn client_l2(tb: &Testbed) -> L2 {
    L2 {
        src: spoof::mac_of(&tb.client, "eth0").expect("client MAC"),
        dst: spoof::mac_of(&tb.gateway, "g0").expect("gateway MAC"),
    }
}

// ---- counters ----

/// `lb stats --json`: the global counters by name.
fn counters(tb: &Testbed) -> BTreeMap<String, u64> {
    tb.counters().expect("lb stats --json")
}

fn print_deltas(what: &str, before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) {
    let d: Vec<String> = after
        .keys()
        .filter(|k| grew(before, after, k) > 0)
        .map(|k| format!("{k} +{}", grew(before, after, k)))
        .collect();
    println!("counters during {what}: {}", d.join(", "));
}

/// Packets forwarded to each backend of each VIP, from `lb stats --json`:
/// "VIP -> backend" → packets.
fn backend_packets(tb: &Testbed) -> BTreeMap<String, u64> {
    let s = tb.lb_json(&["stats"]).expect("lb stats --json");
    let mut out = BTreeMap::new();
    for v in s["vips"].as_array().expect("vips") {
        for b in v["backends"].as_array().expect("backends") {
            out.insert(
                format!("{} -> {}", v["vip"], b["backend"]),
                b["packets"].as_u64().expect("packets"),
            );
        }
    }
    out
}

/// Active flows per backend address, from `lb backend list --json`.
fn active_flows(tb: &Testbed) -> BTreeMap<String, u64> {
    let rows = tb
        .lb_json(&["backend", "list"])
        .expect("lb backend list --json");
    rows.as_array()
        .expect("lb backend list --json prints a list")
        .iter()
        .map(|r| {
            let n = r["active_flows"]
                .as_u64()
                .unwrap_or_else(|| panic!("no active_flows in a backend row: {r}"));
            (r["backend"].as_str().unwrap().to_string(), n)
        })
        .collect()
}

/// `lb flows --json`: the client addresses that have an entry (any state).
fn flow_clients(tb: &Testbed) -> Vec<String> {
    let rows = tb.lb_json(&["flows"]).expect("lb flows --json");
    rows.as_array()
        .expect("lb flows --json prints a list")
        .iter()
        .map(|r| r["client"].as_str().unwrap_or("").to_string())
        .collect()
}

/// `lb flows --json`: (client address, confirmed, state) of every entry.
fn flow_states(tb: &Testbed) -> Vec<(String, bool, String)> {
    let rows = tb.lb_json(&["flows"]).expect("lb flows --json");
    rows.as_array()
        .expect("lb flows --json prints a list")
        .iter()
        .map(|r| {
            (
                r["client"].as_str().unwrap_or("").to_string(),
                r["confirmed"].as_bool().unwrap_or(false),
                r["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The active counts by backend name (every backend of the testbed's VIPs on `names`' port).
fn active_by_name(tb: &Testbed, names: &HashMap<String, String>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (addr, n) in active_flows(tb) {
        let name = names
            .get(&addr)
            .unwrap_or_else(|| panic!("backend {addr} is not one of the testbed's"));
        *out.entry(name.clone()).or_default() += n;
    }
    out
}

/// The active counts become exactly `want` (connections per backend name; 0 for the backends
/// it does not name) within the I/O timeout — what the data plane counts by itself: no sweep
/// runs in these tests unless one asks for it.
fn expect_active_exact(
    tb: &Testbed,
    names: &HashMap<String, String>,
    want: &BTreeMap<String, usize>,
    what: &str,
) {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let got = active_by_name(tb, names);
        let total: u64 = got.values().sum();
        let want_total: u64 = want.values().map(|n| *n as u64).sum();
        let same = total == want_total
            && got
                .iter()
                .all(|(name, n)| *n == want.get(name).copied().unwrap_or(0) as u64);
        if same {
            println!("{what}: active flows exactly {got:?}");
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: active flows {got:?} (total {total}), want exactly {want:?} (total \
                 {want_total})"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sets the flood threshold of the running lb the way an operator would: `lb show-config`,
/// the `flood_threshold` line changed, `lb apply -f`.
fn set_flood_threshold(tb: &Testbed, n: u32) {
    let cfg = tb.lb(&["show-config"]).expect("lb show-config");
    assert!(
        cfg.lines().any(|l| l.starts_with("flood_threshold")),
        "lb show-config prints no flood_threshold:\n{cfg}"
    );
    let cfg: String = cfg
        .lines()
        .map(|l| {
            if l.starts_with("flood_threshold") {
                format!("flood_threshold = {n}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let path = std::env::temp_dir().join(format!("lb-flowstate-{}.toml", std::process::id()));
    std::fs::write(&path, cfg).expect("writing the configuration");
    let out = tb.lb(&["apply", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    out.unwrap_or_else(|e| panic!("lb apply (flood_threshold = {n}): {e:#}"));
    let now = tb.lb(&["show-config"]).expect("lb show-config");
    assert!(
        now.lines().any(|l| l == format!("flood_threshold = {n}")),
        "the flood threshold is not {n} after lb apply:\n{now}"
    );
}

// ---- client connections (to the hold servers) ----

/// A connection from the client to a hold server through a VIP.
struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The client's address and port.
    local: SocketAddr,
    /// The VIP it connected to.
    vip: SocketAddr,
    /// The backend that answered the first line.
    backend: String,
}

impl Conn {
    /// Connects from the client's address (port `port`, 0: any) to `vip` and learns its
    /// backend.
    fn open(tb: &Testbed, vip: SocketAddr, port: u16) -> Result<Conn> {
        let mut c = Conn::connect(tb, vip, port)?;
        c.backend = c.ask(Instant::now() + IO_TIMEOUT)?;
        Ok(c)
    }

    /// Connects (the handshake only: no data, so the backend has sent nothing but its
    /// SYN-ACK); the backend is not known yet.
    fn connect(tb: &Testbed, vip: SocketAddr, port: u16) -> Result<Conn> {
        let client = if vip.is_ipv4() {
            tb.client_v4
        } else {
            tb.client_v6
        };
        let stream = in_ns(&tb.client, move || -> Result<TcpStream> {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(vip),
                socket2::Type::STREAM,
                None,
            )?;
            sock.set_reuse_address(true)?;
            sock.bind(&sa(client, port).into())?;
            sock.connect_timeout(&vip.into(), IO_TIMEOUT)
                .with_context(|| format!("connecting to {vip}"))?;
            let s: TcpStream = sock.into();
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(s)
        })??;
        let c = Conn {
            local: stream.local_addr()?,
            reader: BufReader::new(stream.try_clone()?),
            stream,
            vip,
            backend: String::new(),
        };
        if c.stream.peer_addr()? != vip {
            bail!("connected to {} instead of {vip}", c.stream.peer_addr()?);
        }
        Ok(c)
    }

    /// Sends a line; returns the answer (the backend's name), waiting until `deadline`.
    fn ask(&mut self, deadline: Instant) -> Result<String> {
        self.stream.write_all(b"hello\n")?;
        self.read_line(deadline)
    }

    /// The next line from the server, waiting until `deadline` (at least 50 ms).
    fn read_line(&mut self, deadline: Instant) -> Result<String> {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(50));
        self.stream.set_read_timeout(Some(wait))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("no answer in time (or reset)")?;
        if n == 0 {
            bail!("connection closed by the peer");
        }
        Ok(line.trim().to_string())
    }

    /// Reads until the server closes (bounded).
    fn expect_eof(&mut self) -> Result<()> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            match self.read_line(deadline) {
                Err(e) if e.to_string().contains("closed by the peer") => return Ok(()),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
    }

    fn name(&self) -> String {
        format!("{} → {} ({})", self.local, self.vip, self.backend)
    }
}

/// Opens `n` connections to `vip` (ports from the kernel).
fn open_conns(tb: &Testbed, vip: SocketAddr, n: usize, what: &str) -> Vec<Conn> {
    (0..n)
        .map(|i| {
            Conn::open(tb, vip, 0)
                .unwrap_or_else(|e| panic!("{what}: connection {i} to {vip} failed: {e:#}"))
        })
        .collect()
}

fn spread(conns: &[Conn]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in conns {
        *m.entry(c.backend.clone()).or_default() += 1;
    }
    m
}

/// Every connection answers a line, from the backend it had; returns the failures.
fn check_answers(conns: &mut [Conn], what: &str) -> Vec<String> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut bad = Vec::new();
    // Write on all first, then read: a dead connection costs one timeout, not one each.
    let written: Vec<bool> = conns
        .iter_mut()
        .map(|c| match c.stream.write_all(b"hello\n") {
            Ok(()) => true,
            Err(e) => {
                bad.push(format!("{what}: {}: write failed: {e}", c.name()));
                false
            }
        })
        .collect();
    for (c, _) in conns.iter_mut().zip(written).filter(|(_, w)| *w) {
        match c.read_line(deadline) {
            Ok(a) if a == c.backend => {}
            Ok(a) => bad.push(format!("{what}: {}: answered by {a}", c.name())),
            Err(e) => bad.push(format!("{what}: {}: {e:#}", c.name())),
        }
    }
    bad
}

/// The servers push a line on every connection they hold; each client connection must get
/// `push <its backend>`. Returns the failures.
fn check_push(hold: &HoldServers, conns: &mut [Conn], what: &str) -> Vec<String> {
    let (pushed, errors) = hold.push_all();
    let mut bad: Vec<String> = errors
        .into_iter()
        .map(|e| format!("{what}: server push failed: {e}"))
        .collect();
    if pushed != conns.len() {
        bad.push(format!(
            "{what}: the servers hold {pushed} connections, the client {} ({:?})",
            conns.len(),
            hold.open()
        ));
    }
    let deadline = Instant::now() + IO_TIMEOUT;
    for c in conns.iter_mut() {
        let want = format!("push {}", c.backend);
        match c.read_line(deadline) {
            Ok(l) if l == want => {}
            Ok(l) => bad.push(format!("{what}: {}: got {l:?}, not {want:?}", c.name())),
            Err(e) => bad.push(format!("{what}: {}: push not received: {e:#}", c.name())),
        }
    }
    bad
}

/// A random source in 198.18.0.0/15 (blackholed at the gateway) with a random port ≥ 1024.
fn random_source(rng: &mut StdRng) -> SocketAddr {
    let a = 0xc612_0000u32 | (rng.random::<u32>() & 0x1_ffff);
    sa(Ipv4Addr::from(a).into(), rng.random_range(1024..=65535))
}

// ---- 1. floods ----

/// Sizes of the flood tests: 16,384 confirmed flows; 4,096 unconfirmed ones, so that the
/// flood overflows that table too.
const FLOOD_SIZES: [&str; 4] = ["--conntrack-size", "16384", "--conntrack-new-size", "4096"];

#[test]
fn syn_and_ack_flood_spare_established_flows() {
    flood_spares_established("native", &FLOOD_SIZES, false);
}

#[test]
fn syn_and_ack_flood_spare_established_flows_generic() {
    flood_spares_established("generic", &FLOOD_SIZES, false);
}

/// The same flood above the flood threshold: most new flows get no entry at all (their
/// backend comes from the hash), established flows and new connections are unaffected.
#[test]
fn syn_and_ack_flood_above_threshold_spare_established_flows() {
    let mut args = FLOOD_SIZES.to_vec();
    args.extend(["--flood-threshold", "10000"]);
    flood_spares_established("native", &args, true);
}

/// Conntrack sized 16,384; 30 idle connections; a spoofed SYN flood of 10× the table and an
/// ACK flood of 2× from random sources. Then server push on 30/30, client data on 30/30 (same
/// backends) and 30 new connections. With `above_threshold`, the flood must also have been
/// recognized as one (ct_flood_skip).
fn flood_spares_established(mode: &str, attach: &[&str], above_threshold: bool) {
    const TABLE: usize = 16_384;
    const IDLE: usize = 30;
    let started = Instant::now();
    let tb = testbed(3, mode, attach);
    let hold = HoldServers::start(&tb.backends, PUSH_PORT).expect("hold servers");
    let vip = format!("{VIP4}:80/tcp");
    add_vip(&tb, &vip, &[], &backend_addrs(&tb, PUSH_PORT, false));

    let mut conns = open_conns(&tb, vip4(80), IDLE, "before the flood");
    println!(
        "{mode}: {IDLE} idle connections, spread {:?}",
        spread(&conns)
    );
    wait_for(IO_TIMEOUT, "the servers to hold 30 connections", || {
        hold.accepted() == IDLE as u64
    });

    let l2 = client_l2(&tb);
    let mut tx = RawSender::open(&tb.client, "eth0").expect("AF_PACKET socket");
    let mut rng = StdRng::seed_from_u64(seed());
    let dst = vip4(80);
    let before = counters(&tb);
    let link0 = spoof::link_counters(&tb.client, "eth0").unwrap();
    let syns = {
        let rng = &mut rng;
        std::iter::repeat_with(move || {
            l2.tcp(&TcpSeg {
                seq: rng.random(),
                ..TcpSeg::new(random_source(rng), dst, tcp_flags::SYN)
            })
        })
    };
    let r1 = tx
        .send_all(syns, 10 * TABLE, Duration::from_secs(180))
        .expect("sending the SYN flood");
    let acks = {
        let rng = &mut rng;
        std::iter::repeat_with(move || {
            l2.tcp(&TcpSeg {
                seq: rng.random(),
                ack: rng.random(),
                ..TcpSeg::new(random_source(rng), dst, tcp_flags::ACK)
            })
        })
    };
    let r2 = tx
        .send_all(acks, 2 * TABLE, Duration::from_secs(60))
        .expect("sending the ACK flood");
    let link1 = spoof::link_counters(&tb.client, "eth0").unwrap();
    let after = counters(&tb);
    println!(
        "{mode}: sent {} SYNs in {:.2?} ({:.0}/s), {} ACKs in {:.2?} ({:.0}/s), {} retries; \
         client eth0 tx +{} dropped +{}",
        r1.sent,
        r1.elapsed,
        r1.per_sec(),
        r2.sent,
        r2.elapsed,
        r2.per_sec(),
        r1.retries + r2.retries,
        link1.tx_packets - link0.tx_packets,
        link1.tx_dropped - link0.tx_dropped,
    );
    print_deltas("the flood", &before, &after);
    let flood = (r1.sent + r2.sent) as u64;
    let margin = flood / 100;
    let seen = grew(&before, &after, "fwd_nat");
    let new = grew(&before, &after, "ct_miss") + grew(&before, &after, "ct_flood_skip");
    assert!(
        seen + margin >= flood || new + margin >= flood,
        "the flood did not reach lb: {flood} frames sent, fwd_nat +{seen}, ct_miss + \
         ct_flood_skip +{new}"
    );
    if above_threshold {
        let skipped = grew(&before, &after, "ct_flood_skip");
        assert!(
            skipped >= flood / 2,
            "{flood} new flows at {:.0}/s against a threshold of 10000/s per CPU, but only \
             {skipped} were not stored (ct_flood_skip)",
            r1.per_sec()
        );
    }

    // The backends answered the flood (SYN-ACKs, RSTs): let those drain first.
    std::thread::sleep(Duration::from_millis(300));
    let push = check_push(&hold, &mut conns, "server push after the flood");
    let data = check_answers(&mut conns, "client data after the flood");
    let mut fresh = Vec::new();
    let mut new_fail = Vec::new();
    for i in 0..IDLE {
        match Conn::open(&tb, vip4(80), 0) {
            Ok(c) => fresh.push(c),
            Err(e) => new_fail.push(format!("new connection {i}: {e:#}")),
        }
    }
    let final_counters = counters(&tb);
    print_deltas("the checks after the flood", &after, &final_counters);
    println!(
        "{mode}: push {}/{IDLE}, client data {}/{IDLE}, new connections {}/{IDLE} ({:.1?})",
        IDLE - push.len().min(IDLE),
        IDLE - data.len().min(IDLE),
        fresh.len(),
        started.elapsed()
    );
    assert_none(
        &push,
        "server push on the 30 idle connections after the flood",
    );
    assert_none(
        &data,
        "client data on the 30 idle connections after the flood",
    );
    assert_none(&new_fail, "30 new connections after the flood");
}

/// A gateway whose flood threshold is 1 new flow per second per CPU, hold servers on the
/// backends, and `VIP4`:80 to them with an opening timeout of 2 s and these more options.
fn flood_testbed(options: &[&str]) -> (Testbed, HoldServers) {
    let tb = testbed(
        3,
        "native",
        &["--conntrack-size", "65536", "--flood-threshold", "1"],
    );
    let hold = HoldServers::start(&tb.backends, PUSH_PORT).expect("hold servers");
    let mut args = options.to_vec();
    args.extend(["--timeout", "opening=2"]);
    add_vip(
        &tb,
        &format!("{VIP4}:80/tcp"),
        &args,
        &backend_addrs(&tb, PUSH_PORT, false),
    );
    (tb, hold)
}

/// Connections made while new flows are above the flood threshold get no entry (their
/// backend comes from the hash, their replies are matched by the table while the flood is
/// recent). They must keep working after that, also when the server speaks first: here,
/// idle past the opening timeout (2 s) and then server push, then client data.
#[test]
fn connections_made_above_the_flood_threshold_keep_working() {
    let (tb, hold) = flood_testbed(&[]);
    let before = counters(&tb);
    let mut conns = open_conns(&tb, vip4(80), 10, "above the flood threshold");
    let after = counters(&tb);
    print_deltas("10 connections above the threshold", &before, &after);
    let skipped = grew(&before, &after, "ct_flood_skip");
    assert!(
        skipped > 0,
        "10 new connections with a threshold of 1 new flow/s: none was over it"
    );
    std::thread::sleep(Duration::from_secs(4));
    let push = check_push(&hold, &mut conns, "server push 4 s later");
    let data = check_answers(&mut conns, "client data 4 s later");
    print_deltas("the checks", &after, &counters(&tb));
    assert_none(
        &push,
        "server push on connections made above the flood threshold",
    );
    assert_none(
        &data,
        "client data on connections made above the flood threshold",
    );
}

/// As above on a `random` VIP, but the flood ends before anyone speaks and the client speaks
/// first (see `flood_ends_then_the_client_speaks`).
#[test]
fn connections_made_above_the_flood_threshold_keep_working_random() {
    flood_ends_then_the_client_speaks("random");
}

#[test]
fn connections_made_above_the_flood_threshold_keep_working_least_conn() {
    flood_ends_then_the_client_speaks("least-conn");
}

#[test]
fn connections_made_above_the_flood_threshold_keep_working_round_robin() {
    flood_ends_then_the_client_speaks("round-robin");
}

/// Ten connections (handshakes only) to an `algo` VIP while new flows are above the flood
/// threshold (1/s per CPU): most get no entry, their backend from the flow hash. The flood
/// then ends — no new flow for 4 s (past the opening timeout of 2 s, so the unconfirmed
/// entries some handshake ACKs left are expired), the threshold raised to 100,000 — and the
/// client speaks first: its segment has no entry and is under the threshold, so it must get
/// the same backend from the hash, not a fresh random / least-conn / round-robin choice
/// (another backend would answer with an RST). Then client data on all ten, and server push.
fn flood_ends_then_the_client_speaks(algo: &str) {
    let (tb, hold) = flood_testbed(&["--algo", algo]);
    let before = counters(&tb);
    let mut conns: Vec<Conn> = (0..10)
        .map(|i| {
            Conn::connect(&tb, vip4(80), 0)
                .unwrap_or_else(|e| panic!("{algo}: connection {i} above the threshold: {e:#}"))
        })
        .collect();
    wait_for(IO_TIMEOUT, "the servers to accept the 10", || {
        hold.accepted() == 10
    });
    let after = counters(&tb);
    print_deltas(
        &format!("{algo}: 10 handshakes above the threshold"),
        &before,
        &after,
    );
    let skipped = grew(&before, &after, "ct_flood_skip");
    assert!(
        skipped > 0,
        "{algo}: 10 new connections with a threshold of 1 new flow/s: none was over it"
    );
    std::thread::sleep(Duration::from_secs(4));
    set_flood_threshold(&tb, 100_000);
    let confirmed: Vec<String> = flow_states(&tb)
        .into_iter()
        .filter(|(_, confirmed, _)| *confirmed)
        .map(|(c, _, _)| c)
        .collect();
    let without: Vec<String> = conns
        .iter()
        .map(|c| c.local.to_string())
        .filter(|c| !confirmed.contains(c))
        .collect();
    println!(
        "{algo}: {} of 10 connections without a confirmed entry when the flood is over",
        without.len()
    );
    assert!(
        without.len() >= 3,
        "{algo}: only {} of the 10 connections made above the threshold have no confirmed \
         entry: the test does not exercise flows without one",
        without.len()
    );

    // The client speaks first, one connection after the other.
    let before = counters(&tb);
    let mut failed = Vec::new();
    for c in &mut conns {
        match c.ask(Instant::now() + IO_TIMEOUT) {
            Ok(b) => c.backend = b,
            Err(e) => failed.push(format!("{algo}: {}: first data: {e:#}", c.name())),
        }
    }
    let after = counters(&tb);
    print_deltas(
        &format!("{algo}: the clients' first data after the flood"),
        &before,
        &after,
    );
    println!("{algo}: spread {:?}", spread(&conns));
    assert_none(
        &failed,
        "the clients' first data on connections made above the flood threshold",
    );
    assert_eq!(
        grew(&before, &after, "ct_flood_skip"),
        0,
        "{algo}: the flood is over, yet segments were over the threshold"
    );
    assert!(
        grew(&before, &after, "ct_miss") >= without.len() as u64,
        "{algo}: {} connections had no entry, but their first data made only {} new ones",
        without.len(),
        grew(&before, &after, "ct_miss")
    );
    assert_none(
        &check_answers(&mut conns, "client data again"),
        "client data on connections made above the flood threshold",
    );
    assert_none(
        &check_push(&hold, &mut conns, "server push after the client's data"),
        "server push on connections made above the flood threshold",
    );
}

// ---- 2. blind FIN + SYN ----

/// Five live connections on a `random` VIP (and five each on `round-robin` and `least-conn`
/// VIPs, whose choice is not a function of the packet either); a spoofed FIN then SYN with
/// each one's 5-tuple moves none of them; new connections still work. Each VIP has its own
/// backend port, so this does not depend on one backend serving several VIPs.
#[test]
fn spoofed_fin_syn_do_not_move_flows() {
    let tb = testbed(3, "native", &[]);
    let mut groups = Vec::new();
    for (i, algo) in ["random", "round-robin", "least-conn"]
        .into_iter()
        .enumerate()
    {
        let (port, backend_port) = (80 + i as u16, PUSH_PORT + i as u16);
        let hold = HoldServers::start(&tb.backends, backend_port).expect("hold servers");
        add_vip(
            &tb,
            &format!("{VIP4}:{port}/tcp"),
            &["--algo", algo],
            &backend_addrs(&tb, backend_port, false),
        );
        let conns = open_conns(&tb, vip4(port), 5, algo);
        println!("{algo}: live connections {:?}", spread(&conns));
        groups.push((algo, port, hold, conns));
    }

    let l2 = client_l2(&tb);
    let mut tx = RawSender::open(&tb.client, "eth0").expect("AF_PACKET socket");
    let mut rng = StdRng::seed_from_u64(seed());
    let before = counters(&tb);
    for c in groups.iter().flat_map(|g| &g.3) {
        let fin = TcpSeg {
            seq: rng.random(),
            ack: rng.random(),
            ..TcpSeg::new(c.local, c.vip, tcp_flags::FIN | tcp_flags::ACK)
        };
        let syn = TcpSeg {
            seq: rng.random(),
            ..TcpSeg::new(c.local, c.vip, tcp_flags::SYN)
        };
        tx.send(&l2.tcp(&fin)).unwrap();
        tx.send(&l2.tcp(&syn)).unwrap();
    }
    // The backends' answers (ACKs to out-of-window segments) reach the clients.
    std::thread::sleep(Duration::from_millis(300));
    print_deltas("the spoofed FIN+SYN pairs", &before, &counters(&tb));
    let (mut moved, mut push, mut new_fail) = (Vec::new(), Vec::new(), Vec::new());
    for (algo, port, hold, conns) in &mut groups {
        moved.extend(check_answers(
            conns,
            &format!("{algo}: after a spoofed FIN+SYN"),
        ));
        push.extend(check_push(hold, conns, &format!("{algo}: server push")));
        for i in 0..5 {
            if let Err(e) = Conn::open(&tb, vip4(*port), 0) {
                new_fail.push(format!("{algo}: new connection {i}: {e:#}"));
            }
        }
    }
    assert_none(&moved, "live flows after spoofed FIN+SYN");
    assert_none(&push, "server push after spoofed FIN+SYN");
    assert_none(&new_fail, "new connections after spoofed FIN+SYN");
}

// ---- 3. exact active counts ----

/// 12 connections stay open through opens and closes (client first, server first,
/// half-closes, a reset by the client), an RST flood (random sources, and the 12 real
/// 5-tuples, each followed by the real client's data) and evictions from a 64-entry table.
/// Before any sweep — the data plane's own counting — the active counts are exactly 12, per
/// backend exactly the connections it serves: after the closes (the reset one off the count
/// at once), and after the RST flood (the spoofed RSTs take the 12 off the count, the real
/// clients' next data puts them back, once). After the evictions, `lb flows --sweep` settles
/// what the data plane cannot see, and the counts are exact again.
#[test]
fn active_counts_are_exact() {
    const KEEP: usize = 12;
    // 256 entries: the kernel's LRU hands free entries to each CPU in batches of 128, so with
    // 2 CPUs nothing is evicted before 128 flows on one CPU (the first part below makes 41);
    // the churn further down makes far more than 256.
    let tb = testbed(3, "native", &["--conntrack-size", "256"]);
    let hold = HoldServers::start(&tb.backends, PUSH_PORT).expect("hold servers");
    let vip = format!("{VIP4}:80/tcp");
    add_vip(&tb, &vip, &[], &backend_addrs(&tb, PUSH_PORT, false));
    let names = names(&tb, PUSH_PORT);
    let addr = vip4(80);
    let held = || hold.open().iter().map(|(_, n)| n).sum::<usize>();

    let mut keep = open_conns(&tb, addr, KEEP, "the 12 kept connections");
    let want = spread(&keep);
    println!("kept: {want:?}");
    expect_active_exact(&tb, &names, &want, "the 12 kept connections open");
    // Opened and closed by the client (FIN from the client first).
    for c in open_conns(&tb, addr, 20, "opened and closed") {
        drop(c);
    }
    // Half-closed by the client, then closed by the server.
    for (i, mut c) in open_conns(&tb, addr, 4, "half-closed")
        .into_iter()
        .enumerate()
    {
        c.stream.shutdown(Shutdown::Write).unwrap();
        c.expect_eof()
            .unwrap_or_else(|e| panic!("half-closed connection {i}: {e:#}"));
    }
    // Closed by the server first.
    for (i, mut c) in open_conns(&tb, addr, 4, "closed by the server")
        .into_iter()
        .enumerate()
    {
        c.stream.write_all(b"close\n").unwrap();
        let bye = c.read_line(Instant::now() + IO_TIMEOUT).unwrap();
        assert_eq!(bye, format!("bye {}", c.backend));
        c.expect_eof()
            .unwrap_or_else(|e| panic!("server-closed connection {i}: {e:#}"));
    }
    wait_for(IO_TIMEOUT, "the servers to hold only the 12", || {
        held() == KEEP
    });
    expect_active_exact(
        &tb,
        &names,
        &want,
        "after 28 connections closed (client first, server first, half-closed), no sweep",
    );

    // Reset by the client (SO_LINGER 0: an RST, no FIN): off the count at once.
    let reset = Conn::open(&tb, addr, 0).expect("the connection to reset");
    let mut with_reset = want.clone();
    *with_reset.entry(reset.backend.clone()).or_default() += 1;
    expect_active_exact(&tb, &names, &with_reset, "the 12 and the one to reset");
    socket2::SockRef::from(&reset.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    let reset_local = reset.local.to_string();
    drop(reset);
    expect_active_exact(
        &tb,
        &names,
        &want,
        "after a connection reset by the client (SO_LINGER 0), no sweep",
    );
    let states = flow_states(&tb);
    assert!(
        states
            .iter()
            .any(|(c, confirmed, state)| *c == reset_local && *confirmed && state == "closed"),
        "the reset connection {reset_local}: want a confirmed, closed entry; lb flows: {:?}",
        states
            .iter()
            .filter(|(c, _, _)| *c == reset_local)
            .collect::<Vec<_>>()
    );
    wait_for(
        IO_TIMEOUT,
        "the servers to drop the reset connection",
        || held() == KEEP,
    );

    // RST flood: random sources, then RSTs (and RST+ACKs) with the 12 real 5-tuples and
    // random sequence numbers (out of the backends' windows: they ignore them).
    let l2 = client_l2(&tb);
    let mut tx = RawSender::open(&tb.client, "eth0").expect("AF_PACKET socket");
    let mut rng = StdRng::seed_from_u64(seed());
    let before = counters(&tb);
    let rsts: Vec<Vec<u8>> = (0..2000)
        .map(|_| {
            l2.tcp(&TcpSeg {
                seq: rng.random(),
                ..TcpSeg::new(random_source(&mut rng), addr, tcp_flags::RST)
            })
        })
        .collect();
    tx.send_all(rsts, 2000, Duration::from_secs(30))
        .expect("sending the RST flood");
    for c in &keep {
        for flags in [tcp_flags::RST, tcp_flags::RST | tcp_flags::ACK] {
            tx.send(&l2.tcp(&TcpSeg {
                seq: rng.random(),
                ack: rng.random(),
                ..TcpSeg::new(c.local, addr, flags)
            }))
            .unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    print_deltas("the RST flood", &before, &counters(&tb));
    // An RST takes a flow off the count at once (its closed timeout runs) until the side
    // that sent it shows the flow goes on.
    expect_active_exact(
        &tb,
        &names,
        &BTreeMap::new(),
        "after RSTs with the 12 kept connections' 5-tuples",
    );
    // The real clients' next data undoes the spoofed RSTs: counted again, once each.
    assert_none(
        &check_answers(&mut keep, "after the RST flood"),
        "the 12 kept connections after the RST flood",
    );
    expect_active_exact(
        &tb,
        &names,
        &want,
        "after the RST flood and the real clients' data, no sweep",
    );
    let states = flow_states(&tb);
    for c in &keep {
        let local = c.local.to_string();
        assert!(
            states
                .iter()
                .any(|(cl, confirmed, state)| *cl == local && *confirmed && state == "established"),
            "kept connection {}: want a confirmed, established entry after the RST flood; lb \
             flows: {:?}",
            c.name(),
            states
                .iter()
                .filter(|(cl, _, _)| *cl == local)
                .collect::<Vec<_>>()
        );
    }

    // Evictions: more closed connections than the table holds.
    let churn = 400;
    for i in 0..churn {
        let c = Conn::open(&tb, addr, 0).unwrap_or_else(|e| panic!("churn connection {i}: {e:#}"));
        drop(c);
    }
    wait_for(IO_TIMEOUT, "the servers to hold only the 12 again", || {
        held() == KEEP
    });
    let present = flow_clients(&tb);
    let evicted = keep
        .iter()
        .filter(|c| !present.contains(&c.local.to_string()))
        .count();
    println!("after {churn} more connections, {evicted} of the 12 kept flows were evicted");
    assert!(
        evicted > 0,
        "no kept flow was evicted from a 256-entry table by {churn} connections: the test \
         does not exercise evictions"
    );
    // A byte on each of the 12 brings its entry back (maglev: the same backend).
    assert_none(
        &check_answers(&mut keep, "after evictions"),
        "the 12 kept connections after evictions",
    );
    assert_none(
        &check_push(&hold, &mut keep, "server push after evictions"),
        "server push on the 12 kept connections",
    );
    // The last FINs and ACKs of the closed connections are through.
    std::thread::sleep(Duration::from_millis(200));

    tb.lb(&["flows", "--sweep"]).expect("lb flows --sweep");
    let active = active_flows(&tb);
    let total: u64 = active.values().sum();
    println!("active flows after the sweep: {active:?}; kept connections: {want:?}");
    assert_eq!(
        total, KEEP as u64,
        "active flows sum to {total}, not {KEEP}: {active:?} (kept: {want:?})"
    );
    for (backend, n) in &active {
        let name = &names[backend];
        let w = want.get(name).copied().unwrap_or(0) as u64;
        assert_eq!(
            *n, w,
            "{name} ({backend}) counts {n} active flows but serves {w} of the kept connections"
        );
    }
}

// ---- 4. TTL ----

/// A UDP datagram to a VIP with TTL 1 does not reach the backend (it is passed to the
/// kernel and counted); one with TTL 5 arrives with 4. The same for IPv6's hop limit.
#[test]
fn ttl_is_decremented_and_ttl_1_is_not_forwarded() {
    let tb = testbed(2, "native", &[]);
    let ttl_servers = TtlServers::start(&tb.backends, TTL_PORT).expect("TTL servers");
    add_vip(
        &tb,
        &format!("{VIP4}:{TTL_PORT}/udp"),
        &[],
        &backend_addrs(&tb, TTL_PORT, false),
    );
    add_vip(
        &tb,
        &format!("[{VIP6}]:{TTL_PORT}/udp"),
        &[],
        &backend_addrs(&tb, TTL_PORT, true),
    );
    // The gateway must know the backends' MACs: otherwise lb hands the first packets to the
    // kernel to resolve them, and the kernel, not lb, forwards them (decrementing the TTL).
    for b in &tb.backends {
        for ip in [b.v4, b.v6] {
            wait_for(Duration::from_secs(10), &format!("ping {ip}"), || {
                tb.ping(ip)
            });
        }
    }
    let before = counters(&tb);
    for (vip, fam) in [(vip4(TTL_PORT), "v4"), (vip6(TTL_PORT), "v6")] {
        let client = if vip.is_ipv4() {
            tb.client_v4
        } else {
            tb.client_v6
        };
        in_ns(&tb.client, move || -> Result<()> {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(vip),
                socket2::Type::DGRAM,
                None,
            )?;
            s.bind(&sa(client, 0).into())?;
            for ttl in [1u32, 5] {
                if vip.is_ipv4() {
                    s.set_ttl_v4(ttl)?;
                } else {
                    s.set_unicast_hops_v6(ttl)?;
                }
                s.send_to(format!("{fam} ttl {ttl}").as_bytes(), &vip.into())?;
            }
            Ok(())
        })
        .unwrap()
        .unwrap();
        let want = format!("{fam} ttl 5");
        wait_for(
            IO_TIMEOUT,
            &format!("the {fam} datagram sent with TTL 5"),
            || ttl_servers.received().iter().any(|d| d.payload == want),
        );
    }
    // The TTL-1 datagrams were sent first; give them time to show up if they were forwarded.
    std::thread::sleep(Duration::from_millis(500));
    let got = ttl_servers.received();
    let after = counters(&tb);
    print_deltas("the TTL datagrams", &before, &after);
    println!("received: {got:?}");
    assert_eq!(
        grew(&before, &after, "pass_no_neigh") + grew(&before, &after, "pass_fib_other"),
        0,
        "the gateway's kernel forwarded some of the datagrams, not lb"
    );
    for fam in ["v4", "v6"] {
        let one = format!("{fam} ttl 1");
        assert!(
            !got.iter().any(|d| d.payload == one),
            "{fam}: the datagram sent with TTL 1 reached a backend: {got:?}"
        );
        let five = format!("{fam} ttl 5");
        let d = got.iter().find(|d| d.payload == five).unwrap();
        assert_eq!(
            d.ttl,
            Some(4),
            "{fam}: the datagram sent with TTL 5 arrived with {:?}, not 4",
            d.ttl
        );
    }
    assert_eq!(
        grew(&before, &after, "pass_ttl_exceeded"),
        2,
        "pass_ttl_exceeded should count the two TTL-1 datagrams"
    );
}

// ---- checksums of lb's rewrites, verified by the receivers ----

/// Bytes moved each way per transfer.
const BULK_BYTES: usize = 20 << 20;

/// 20 MB each way through a NAT VIP over TCP, IPv4 and IPv6, with the receivers verifying
/// every checksum (SETUP-NOTES "Testing checksums honestly on veth", as far as native XDP
/// allows): the gateway's interfaces merge (GRO) and checksum in software at egress, the
/// client's and the backend's interfaces verify on receive (`rx off`). The senders keep TX
/// checksum offload off, as the testbed does (native XDP on veth would see partial checksums
/// from them, which real NICs never deliver; issue 16), so this covers lb's own rewrites:
/// addresses and ports (NAT) and the TTL / hop limit decrement (the IPv4 header checksum).
/// Both directions are compared with SHA-256 at the other end, and neither end's
/// TcpInCsumErrors / IpInHdrErrors / Ip6InHdrErrors grows.
#[test]
fn nat_transfer_with_verifying_receivers() {
    let tb = testbed(1, "native", &[]);
    for i in 0..=tb.backends.len() {
        tb.gateway
            .exec(&["ethtool", "-K", &format!("g{i}"), "gro", "on", "tx", "off"])
            .expect("ethtool on the gateway");
    }
    let backend = &tb.backends[0];
    for ns in [&tb.client, &backend.ns] {
        ns.exec(&["ethtool", "-K", "eth0", "rx", "off"])
            .expect("ethtool on a receiver");
    }
    let seed = 0x5eed_b01c_u64;
    let server = DigestServer::start(&backend.ns, BULK_PORT, BULK_BYTES, BULK_BYTES, seed)
        .expect("digest server");
    add_vip(
        &tb,
        &format!("{VIP4}:{BULK_PORT}/tcp"),
        &[],
        &backend_addrs(&tb, BULK_PORT, false),
    );
    add_vip(
        &tb,
        &format!("[{VIP6}]:{BULK_PORT}/tcp"),
        &[],
        &backend_addrs(&tb, BULK_PORT, true),
    );
    // The gateway must know both ends' MACs, so that lb (not the gateway's kernel) forwards.
    for ip in [backend.v4, backend.v6] {
        wait_for(Duration::from_secs(10), &format!("ping {ip}"), || {
            tb.ping(ip)
        });
    }
    let mut failures = Vec::new();
    for vip in [vip4(BULK_PORT), vip6(BULK_PORT)] {
        let fam = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
        let lb_before = counters(&tb);
        let x = transfer::exchange(
            &tb.client,
            vip,
            BULK_BYTES,
            seed,
            &[("client", &tb.client), ("backend", &backend.ns)],
        )
        .expect("running the transfer");
        let lb_after = counters(&tb);
        print_deltas(&format!("the {fam} transfer"), &lb_before, &lb_after);
        println!(
            "{fam}: {BULK_BYTES} bytes each way in {:.2?}, intact: up {}, down {} ({} bytes); {}",
            x.took,
            x.up_intact,
            x.down_intact,
            x.down_bytes,
            x.csum_summary()
        );
        failures.extend(x.failures(fam));
        let kernel = grew(&lb_before, &lb_after, "pass_no_neigh")
            + grew(&lb_before, &lb_after, "pass_fib_other");
        if kernel > 0 {
            failures.push(format!(
                "{fam}: the gateway's kernel forwarded {kernel} packets, not lb"
            ));
        }
    }
    let server_errors = server.errors();
    if !server_errors.is_empty() {
        failures.push(format!("digest server: {server_errors:?}"));
    }
    assert_none(&failures, "the verified NAT transfers");
}

// ---- 5. one backend, two VIPs ----

/// The same backends (address:port) behind two VIP addresses, NAT, tracked reverse: TCP
/// connections through both work at the same time (kernel TCP accepts only answers from the
/// address it connected to), server push included, and UDP replies come from the VIP each
/// flow was sent to.
#[test]
fn one_backend_behind_two_vips() {
    let tb = testbed(2, "native", &[]);
    let hold = HoldServers::start(&tb.backends, PUSH_PORT).expect("hold servers");
    let a: SocketAddr = sa(VIP4.parse().unwrap(), 80);
    let b: SocketAddr = sa(VIP4_B.parse().unwrap(), 80);
    for v in [a, b] {
        add_vip(
            &tb,
            &format!("{v}/tcp"),
            &[],
            &backend_addrs(&tb, PUSH_PORT, false),
        );
    }
    // Distinct client ports: one client port to both VIPs on one backend would be one
    // connection to the backend (the same 4-tuple), which no NAT can tell apart.
    let mut conns = Vec::new();
    for i in 0..8u16 {
        for (v, base) in [(a, 30_000u16), (b, 31_000)] {
            conns.push(
                Conn::open(&tb, v, base + i)
                    .unwrap_or_else(|e| panic!("connection {i} through {v}: {e:#}")),
            );
        }
    }
    let mut both = BTreeMap::<String, (usize, usize)>::new();
    for c in &conns {
        let e = both.entry(c.backend.clone()).or_default();
        if c.vip == a {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    println!("connections per backend (through {a}, through {b}): {both:?}");
    assert!(
        both.values().any(|&(x, y)| x > 0 && y > 0),
        "no backend serves both VIPs at once: {both:?}"
    );
    assert_none(
        &check_answers(&mut conns, "two VIPs"),
        "connections through two VIPs",
    );
    assert_none(
        &check_push(&hold, &mut conns, "two VIPs"),
        "server push through two VIPs",
    );
    for c in &conns {
        assert_eq!(c.stream.peer_addr().unwrap(), c.vip);
    }

    // UDP: 8 flows per VIP, all open at once, interleaved.
    for v in [a, b] {
        let vip = format!("{}:53/udp", v.ip());
        add_vip(&tb, &vip, &[], &backend_addrs(&tb, UDP_PORT, false));
    }
    let client = tb.client_v4;
    let replies = in_ns(
        &tb.client,
        move || -> Result<Vec<(SocketAddr, SocketAddr, String)>> {
            let mut socks = Vec::new();
            for i in 0..16 {
                let s = UdpSocket::bind(sa(client, 0))?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                let to = sa(if i % 2 == 0 { a.ip() } else { b.ip() }, 53);
                socks.push((s, to));
            }
            for round in 0..3 {
                for (s, to) in &socks {
                    s.send_to(format!("ping {round}").as_bytes(), to)?;
                }
            }
            let mut out = Vec::new();
            let mut buf = [0u8; 256];
            for (s, to) in &socks {
                for _ in 0..3 {
                    let (n, from) = s
                        .recv_from(&mut buf)
                        .with_context(|| format!("no UDP reply from {to}"))?;
                    out.push((*to, from, String::from_utf8_lossy(&buf[..n]).to_string()));
                }
            }
            Ok(out)
        },
    )
    .unwrap()
    .expect("UDP through two VIPs");
    let wrong: Vec<_> = replies.iter().filter(|(to, from, _)| to != from).collect();
    assert!(
        wrong.is_empty(),
        "UDP replies from the wrong address (sent to, reply from, backend): {wrong:?}"
    );
    let mut udp_both = BTreeMap::<String, (usize, usize)>::new();
    for (to, _, name) in &replies {
        let e = udp_both.entry(name.trim().to_string()).or_default();
        if to.ip() == a.ip() {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    println!("UDP replies per backend (through {a}, through {b}): {udp_both:?}");
}

// ---- 6. martian sources ----

/// Spoofed SYNs to a VIP from sources that cannot be real clients, and with source port 0,
/// are dropped and counted; no backend sees them.
#[test]
fn martian_sources_are_dropped() {
    let tb = testbed(2, "native", &[]);
    let _hold = HoldServers::start(&tb.backends, PUSH_PORT).expect("hold servers");
    add_vip(
        &tb,
        &format!("{VIP4}:80/tcp"),
        &[],
        &backend_addrs(&tb, PUSH_PORT, false),
    );
    add_vip(
        &tb,
        &format!("[{VIP6}]:80/tcp"),
        &[],
        &backend_addrs(&tb, PUSH_PORT, true),
    );
    let martians4: Vec<IpAddr> = [
        "127.0.0.5",
        "0.1.2.3",
        "224.0.0.9",
        "239.1.2.3",
        "169.254.1.1",
        "240.0.0.1",
        "255.255.255.255",
        VIP4,
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let martians6: Vec<IpAddr> = ["::1", "::", "ff02::1", "ff0e::5", "fe80::1", VIP6]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let l2 = client_l2(&tb);
    let mut tx = RawSender::open(&tb.client, "eth0").expect("AF_PACKET socket");
    let before = counters(&tb);
    let pkts_before = backend_packets(&tb);
    let mut martian = 0;
    for src in martians4.iter().chain(&martians6) {
        let dst = if src.is_ipv4() { vip4(80) } else { vip6(80) };
        for port in [40_000, 50_001] {
            tx.send(&l2.tcp(&TcpSeg::new(sa(*src, port), dst, tcp_flags::SYN)))
                .unwrap();
            martian += 1;
        }
    }
    let mut port_zero = 0;
    for (src, dst) in [
        (sa(Ipv4Addr::new(198, 18, 0, 7).into(), 0), vip4(80)),
        (
            sa("2001:db8::7".parse::<Ipv6Addr>().unwrap().into(), 0),
            vip6(80),
        ),
    ] {
        for flags in [tcp_flags::SYN, tcp_flags::ACK] {
            tx.send(&l2.tcp(&TcpSeg::new(src, dst, flags))).unwrap();
            port_zero += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = counters(&tb);
    let pkts_after = backend_packets(&tb);
    print_deltas("the martian packets", &before, &after);
    assert_eq!(
        grew(&before, &after, "drop_martian"),
        martian,
        "drop_martian should count the {martian} packets from martian sources"
    );
    assert_eq!(
        grew(&before, &after, "drop_port_zero"),
        port_zero,
        "drop_port_zero should count the {port_zero} packets from port 0"
    );
    assert_eq!(
        pkts_before, pkts_after,
        "backends got packets from martian sources or port 0"
    );
    // The VIPs themselves work.
    for v in [vip4(80), vip6(80)] {
        Conn::open(&tb, v, 0).unwrap_or_else(|e| panic!("a real connection to {v}: {e:#}"));
    }
}
