//! Several gateways behind an ECMP router, end to end (lb::testbed::Ecmp): BIRD on the router
//! and on both gateways (BGP with BFD), the real agent announcing the VIPs, real TCP. In NAT
//! mode (stateless reverse NAT: replies through either gateway) and in ipip mode (replies
//! straight from the backends).
//!
//! What operators do and what fails, with connections held throughout: connections opened
//! through gw1 alone, then spread over both gateways; an agent restarted (no withdrawal);
//! gw1's BIRD hung with its link up (BFD drops gw1 within a second), then killed; an agent
//! stopped with `--withdraw-on-exit`; gw2's uplink cut; a backend drained, another marked down
//! by its failing health checks, a new one added; a SYN to a port no VIP claims (crosses the
//! router once); every backend down (fail-open stays announced; `when_all_down = "withdraw"`
//! withdraws and announces again on recovery); `lb detach`.
//!
//! A flow that moves to the other gateway keeps its backend there only while the selection
//! is what it was when the flow began (that gateway never saw it): the gateway failures come
//! before the table changes, as in a deployment they are independent events.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lb::testbed::{in_ns, wait_for, Ecmp, LineConn, HTTP_PORT, LINE_PORT};

const VIP: &str = "10.100.0.100";
/// A port of the VIP's address that no VIP claims.
const UNCLAIMED_PORT: u16 = 9999;

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

/// The agents' configuration: `backends` (index into the test bed's backends, weight).
fn config(e: &Ecmp, forward: &str, backends: &[(usize, u32)], when_all_down: &str) -> String {
    // Both gateways share one secret seed, as every gateway of a deployment must.
    let mut out = String::from("hash_seed = \"0x1a2b3c4d\"\n\n");
    let reverse = if forward == "nat" {
        "reverse = \"stateless\"\n"
    } else {
        ""
    };
    for port in [HTTP_PORT, LINE_PORT] {
        out += &format!(
            "[[vip]]\naddress = \"{}/tcp\"\nforward = \"{forward}\"\n{reverse}table_size = 1009\nwhen_all_down = \"{when_all_down}\"\n\n[vip.health]\ncheck = \"tcp\"\ninterval = \"300ms\"\n\n",
            vip(port)
        );
        for (i, w) in backends {
            out += &format!(
                "[[vip.backend]]\naddress = \"{}:{port}\"\nweight = {w}\n\n",
                e.backends[*i].v4
            );
        }
    }
    out
}

/// Packets each gateway has forwarded for the HTTP VIP; panics if the gateway does not list
/// the VIP or its count (so a vanished VIP never compares as 0 == 0).
fn vip_packets(e: &Ecmp, gw: usize) -> u64 {
    let s = e.lb_json(gw, &["stats"]).unwrap();
    let name = format!("{}/tcp", vip(HTTP_PORT));
    let v = s["vips"]
        .as_array()
        .unwrap_or_else(|| panic!("gw{}: stats without vips: {s}", gw + 1))
        .iter()
        .find(|v| v["vip"] == name)
        .unwrap_or_else(|| panic!("gw{}: no VIP {name} in stats: {s}", gw + 1));
    v["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("gw{}: {name} has no packet count: {v}", gw + 1))
}

fn connections(e: &Ecmp, n: usize) {
    let c = e.as_client();
    for i in 0..n {
        if let Err(err) = c.http_get(vip(HTTP_PORT)) {
            // What each gateway had then, for the failure message.
            let state = |g: usize| {
                let b = e.lb(g, &["backend", "list"]).unwrap_or_default();
                let s = e.lb(g, &["stats"]).unwrap_or_default();
                let f = e.lb(g, &["flows"]).unwrap_or_default();
                format!("gw{}:\n{b}\n{s}\n{f}", g + 1)
            };
            panic!("connection {i} failed: {err:#}\n{}\n{}", state(0), state(1));
        }
    }
}

/// Every held connection answers, from the backend it began with.
fn check_held(held: &mut [LineConn], when: &str) {
    for (i, c) in held.iter_mut().enumerate() {
        let got = c
            .ping()
            .unwrap_or_else(|err| panic!("{when}: held connection {i} broke: {err:#}"));
        assert_eq!(got, c.backend, "{when}: held connection {i} moved");
    }
}

/// Both gateways' selection digests of both VIPs, once both have the VIPs and agree.
fn agreed_digest(e: &Ecmp) -> String {
    // (None while a gateway's agent has not applied its file yet.)
    let d = |i| -> Option<String> {
        let mut out = String::new();
        for p in [HTTP_PORT, LINE_PORT] {
            out += &e
                .lb(i, &["table", &format!("{}/tcp", vip(p)), "--digest"])
                .ok()?;
        }
        Some(out)
    };
    let mut out = String::new();
    wait_for(Duration::from_secs(30), "the gateways agree", || {
        match (d(0), d(1)) {
            (Some(a), Some(b)) if a == b => {
                out = a;
                true
            }
            _ => false,
        }
    });
    out
}

/// Writes `text` as the configuration and waits until both gateways' selection differs from
/// `before` and agrees.
fn reconfigure(e: &Ecmp, text: &str, before: &str) -> String {
    e.write_config(text).unwrap();
    let mut now = String::new();
    wait_for(Duration::from_secs(15), "both gateways applied", || {
        now = agreed_digest(e);
        now != before
    });
    now
}

/// Makes backend `i`'s health checks fail (or pass again) without touching its connections:
/// an ACL on the backend drops connection attempts from the gateways' addresses (what a
/// firewall change or a broken probe path does).
fn block_probes(e: &Ecmp, i: usize, block: bool) {
    let ns = &e.backends[i].ns;
    if block {
        ns.exec(&["nft", "add", "table", "inet", "lbtb_acl"])
            .unwrap();
        ns.exec(&[
            "nft",
            "add chain inet lbtb_acl in { type filter hook input priority 0 ; }",
        ])
        .unwrap();
        ns.exec(&[
            "nft",
            "add rule inet lbtb_acl in ip saddr { 10.1.0.1, 10.1.0.2 } tcp flags & (syn | ack) == syn drop",
        ])
        .unwrap();
    } else {
        ns.exec(&["nft", "delete", "table", "inet", "lbtb_acl"])
            .unwrap();
    }
}

/// Whether gateway `gw` sees backend `i` of the line VIP as healthy.
fn healthy(e: &Ecmp, gw: usize, i: usize) -> bool {
    let want = format!("{}:{LINE_PORT}", e.backends[i].v4);
    let rows = e.lb_json(gw, &["backend", "list"]).unwrap();
    rows.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["backend"] == want.as_str())
        .is_some_and(|r| r["health"] == "up")
}

fn scale_out(forward: &str) {
    let vips: Vec<IpAddr> = if forward == "ipip" {
        vec![VIP.parse().unwrap()]
    } else {
        vec![]
    };
    // Four backends; the fourth joins later.
    let mut e = Ecmp::new(4, Path::new(env!("CARGO_BIN_EXE_lb")), &vips).expect("testbed");
    if forward == "ipip" {
        e.decap_on_backends().unwrap();
    }
    let mut members = vec![(0, 1), (1, 1), (2, 1)];
    e.write_config(&config(&e, forward, &members, "fail-open"))
        .unwrap();
    let gw1: IpAddr = "10.2.1.2".parse().unwrap();
    let gw2: IpAddr = "10.2.2.2".parse().unwrap();
    let vip_ip: IpAddr = VIP.parse().unwrap();
    let hops = |e: &Ecmp| e.router_next_hops(vip_ip).unwrap();

    // ---- 24 connections through gw1 alone, then spread over both gateways ----
    // gw2 runs lb (the backends' replies take either gateway) but its BIRD is down: the
    // router knows gw1 only.
    e.kill_bird(1).unwrap();
    e.start_agent(0).unwrap();
    e.start_agent(1).unwrap();
    let t = wait_for(Duration::from_secs(30), "gw1 announced", || {
        hops(&e) == [gw1]
    });
    println!("{forward}: gw1 announced {t:?} after the agents started");
    let digest = agreed_digest(&e);
    let client = e.as_client();
    let mut held: Vec<LineConn> = (0..24)
        .map(|_| client.open_line(vip(LINE_PORT)).unwrap())
        .collect();
    e.restart_bird(1).unwrap();
    let t = wait_for(Duration::from_secs(30), "both gateways announced", || {
        hops(&e) == [gw1, gw2]
    });
    println!("{forward}: both gateways announced {t:?} after gw2's BIRD started");
    check_held(&mut held, "spread over both gateways");
    let before = [vip_packets(&e, 0), vip_packets(&e, 1)];
    connections(&e, 200);
    let after = [vip_packets(&e, 0), vip_packets(&e, 1)];
    println!(
        "{forward}: 200 connections: gw1 forwarded {} packets, gw2 {}",
        after[0] - before[0],
        after[1] - before[1]
    );
    for g in 0..2 {
        assert!(
            after[g] - before[g] > 100,
            "gateway {} carried {} packets of 200 connections",
            g + 1,
            after[g] - before[g]
        );
    }

    // ---- an agent restart (SIGTERM, then a start) withdraws nothing ----
    // A watcher polls the router every 20 ms while the agent stops and starts again.
    let restart_watch = |e: &mut Ecmp| {
        let stop = AtomicBool::new(false);
        let missing = AtomicBool::new(false);
        let ok_conns = std::sync::atomic::AtomicU32::new(0);
        let router = e.router.name.clone();
        std::thread::scope(|s| {
            s.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    if !router_has_hop(&router, vip_ip, gw1) {
                        missing.store(true, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            e.stop_agent(0).unwrap();
            // The data plane forwards while no agent runs.
            for i in 0..20 {
                e.as_client()
                    .http_get(vip(HTTP_PORT))
                    .unwrap_or_else(|err| panic!("connection {i} without an agent: {err:#}"));
                ok_conns.fetch_add(1, Ordering::SeqCst);
            }
            e.start_agent(0).unwrap();
            let log = e.agent_log(0);
            wait_for(Duration::from_secs(30), "gw1's agent applied", || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .matches("configuration applied")
                    .count()
                    >= 2
            });
            for i in 0..20 {
                e.as_client()
                    .http_get(vip(HTTP_PORT))
                    .unwrap_or_else(|err| panic!("connection {i} after the restart: {err:#}"));
                ok_conns.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_secs(1));
            stop.store(true, Ordering::SeqCst);
        });
        (
            missing.load(Ordering::SeqCst),
            ok_conns.load(Ordering::SeqCst),
        )
    };
    let (missing, ok) = restart_watch(&mut e);
    assert!(!missing, "the router lost gw1 while its agent restarted");
    assert_eq!(ok, 40);
    check_held(&mut held, "agent restarted");
    println!("{forward}: gw1's agent restarted: the router kept gw1 throughout (polled every 20 ms), 40 connections and the 24 held ones fine");

    // ---- gw1's BIRD stops answering, its link up: BFD drops gw1 within a second ----
    // (Frozen, not killed: a killed BIRD's TCP session is closed by its kernel, which the
    // router notices at once; a hung one says nothing, and BGP alone would wait out its hold
    // time, 3 s here.)
    e.freeze_bird(0, true).unwrap();
    let t = wait_for(Duration::from_secs(5), "gw1 dropped", || hops(&e) == [gw2]);
    println!("{forward}: gw1's BIRD frozen: the router dropped gw1 {t:?} later (BFD)");
    assert!(t <= Duration::from_secs(1), "{t:?}: BFD did not act");
    check_held(&mut held, "gw1's BIRD frozen");
    connections(&e, 30);
    e.freeze_bird(0, false).unwrap();
    let t = wait_for(Duration::from_secs(30), "gw1 back", || {
        hops(&e) == [gw1, gw2]
    });
    println!("{forward}: gw1's BIRD thawed: back {t:?} later");
    check_held(&mut held, "gw1's BIRD back");
    // Killed outright, it is gone as fast (its kernel closes the session).
    e.kill_bird(0).unwrap();
    let t = wait_for(Duration::from_secs(5), "gw1 dropped", || hops(&e) == [gw2]);
    println!("{forward}: gw1's BIRD killed: the router dropped gw1 {t:?} later");
    check_held(&mut held, "gw1's BIRD dead");
    e.restart_bird(0).unwrap();
    wait_for(Duration::from_secs(30), "gw1 back", || {
        hops(&e) == [gw1, gw2]
    });

    // ---- draining a gateway: an agent stopped with --withdraw-on-exit ----
    e.stop_agent(0).unwrap();
    e.agent_args[0] = vec!["--withdraw-on-exit".into()];
    e.start_agent(0).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(hops(&e), [gw1, gw2]);
    e.stop_agent(0).unwrap();
    let t = wait_for(Duration::from_secs(15), "gw1 withdrawn", || {
        hops(&e) == [gw2]
    });
    println!("{forward}: gw1's agent stopped with --withdraw-on-exit: withdrawn {t:?} later");
    check_held(&mut held, "gw1 drained");
    let gw1_before = vip_packets(&e, 0);
    connections(&e, 50);
    assert_eq!(
        vip_packets(&e, 0),
        gw1_before,
        "gw1 still carries new flows"
    );
    e.agent_args[0].clear();
    e.start_agent(0).unwrap();
    wait_for(Duration::from_secs(30), "gw1 announced again", || {
        hops(&e) == [gw1, gw2]
    });

    // ---- gw2's uplink cut, and back ----
    e.set_uplink(1, false).unwrap();
    let t = wait_for(
        Duration::from_secs(15),
        "gw2 gone after its link was cut",
        || hops(&e) == [gw1],
    );
    println!("{forward}: the router dropped gw2 {t:?} after its uplink was cut");
    check_held(&mut held, "link cut");
    connections(&e, 50);
    e.set_uplink(1, true).unwrap();
    let t = wait_for(
        Duration::from_secs(30),
        "gw2 back after its link returned",
        || hops(&e) == [gw1, gw2],
    );
    println!("{forward}: gw2 back in the router {t:?} after its uplink returned");
    check_held(&mut held, "link back");

    // ---- changes: a drain, a backend down, a new backend ----
    members[0].1 = 0;
    reconfigure(&e, &config(&e, forward, &members, "fail-open"), &digest);
    check_held(&mut held, "backend 1 drained");
    block_probes(&e, 1, true);
    let t = wait_for(Duration::from_secs(15), "backend 2 down on both", || {
        !healthy(&e, 0, 1) && !healthy(&e, 1, 1)
    });
    println!("{forward}: backend 2 down on both gateways {t:?} after its probes were blocked");
    let digest = agreed_digest(&e);
    check_held(&mut held, "backend 2 down");
    members.push((3, 1));
    reconfigure(&e, &config(&e, forward, &members, "fail-open"), &digest);
    check_held(&mut held, "backend 4 added");
    connections(&e, 50);
    println!("{forward}: drain, health-down and add: 24 held connections unbroken");

    // ---- a SYN to a port of the VIP's address that no VIP claims crosses the router once ----
    let unclaimed = vip(UNCLAIMED_PORT);
    let before = e.router_forwarded(unclaimed).unwrap();
    let refused = in_ns(&e.client, || {
        std::net::TcpStream::connect_timeout(&unclaimed, Duration::from_millis(500))
    })
    .unwrap();
    assert!(refused.is_err(), "something answered {unclaimed}");
    std::thread::sleep(Duration::from_millis(500));
    let crossed = e.router_forwarded(unclaimed).unwrap() - before;
    println!("{forward}: a SYN to {unclaimed} crossed the router {crossed} time(s)");
    assert_eq!(crossed, 1, "the SYN looped (or never left the client)");

    // ---- every backend down: failing open, the VIP stays announced ----
    for i in [0, 2, 3] {
        block_probes(&e, i, true);
    }
    let t = wait_for(Duration::from_secs(15), "every backend down", || {
        (0..4).all(|i| !healthy(&e, 0, i) && !healthy(&e, 1, i))
    });
    println!("{forward}: every backend down on both gateways after {t:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(hops(&e), [gw1, gw2], "fail-open VIP withdrawn");
    connections(&e, 30);
    check_held(&mut held, "every backend down (fail-open)");
    // The per-VIP choice for anycast: withdrawn while every backend is down...
    e.write_config(&config(&e, forward, &members, "withdraw"))
        .unwrap();
    let t = wait_for(Duration::from_secs(15), "withdrawn (all down)", || {
        hops(&e).is_empty()
    });
    println!("{forward}: when_all_down = \"withdraw\": withdrawn {t:?} after the change");
    // ... and announced again on recovery.
    for i in 0..4 {
        block_probes(&e, i, false);
    }
    let t = wait_for(Duration::from_secs(15), "announced on recovery", || {
        hops(&e) == [gw1, gw2]
    });
    println!("{forward}: announced again {t:?} after the probes passed");
    check_held(&mut held, "recovered");
    // Back to failing open, every weighted backend up again on both gateways, before the
    // last step: a backend still rising must not withdraw a "withdraw" VIP meanwhile.
    e.write_config(&config(&e, forward, &members, "fail-open"))
        .unwrap();
    wait_for(Duration::from_secs(20), "every backend up again", || {
        (1..4).all(|i| healthy(&e, 0, i) && healthy(&e, 1, i))
    });
    std::thread::sleep(Duration::from_secs(1));

    // ---- gw2 detached (its agent keeps running): withdrawn ----
    e.lb(1, &["detach"]).unwrap();
    let t = wait_for(
        Duration::from_secs(15),
        "gw2 withdrawn after detach",
        || hops(&e) == [gw1],
    );
    println!("{forward}: the router dropped gw2 {t:?} after `lb detach` there");
    if forward == "ipip" {
        // (In NAT mode the backends' replies would still take their route through gw2, which
        // no longer translates them: return routes must point at gateways running lb.)
        connections(&e, 50);
    }
}

/// Whether the router's route to `vip` has `hop` among its next hops.
fn router_has_hop(router: &str, vip: IpAddr, hop: IpAddr) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-n", router, "route", "show", &format!("{vip}/32")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!("via {hop} "))
}

#[test]
fn two_gateways_nat() {
    scale_out("nat");
}

#[test]
fn two_gateways_ipip() {
    scale_out("ipip");
}
