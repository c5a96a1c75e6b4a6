//! Several gateways behind an ECMP router, end to end (lb::testbed::Ecmp): BIRD on the router
//! and on both gateways, the real agent announcing the VIPs over BGP, real TCP. Flows spread over
//! both gateways; a flow's backend does not depend on the gateway; when a gateway withdraws
//! (its agent stops) its flows move to the other and established connections survive, and they
//! survive again when it comes back. In NAT mode (replies through either gateway) and in ipip
//! mode (replies straight from the backends).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use lb::testbed::{wait_for, Ecmp, HTTP_PORT, LINE_PORT};

const VIP: &str = "10.100.0.100";

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

fn config(e: &Ecmp, forward: &str) -> String {
    // Both gateways share one secret seed, as every gateway of a deployment must.
    let mut out = String::from("hash_seed = \"0x1a2b3c4d\"\n\n");
    for port in [HTTP_PORT, LINE_PORT] {
        out += &format!(
            "[[vip]]\naddress = \"{}/tcp\"\nforward = \"{forward}\"\nreverse = \"stateless\"\ntable_size = 1009\n\n[vip.health]\ncheck = \"tcp\"\ninterval = \"300ms\"\n\n",
            vip(port)
        );
        for b in &e.backends {
            out += &format!("[[vip.backend]]\naddress = \"{}:{port}\"\n\n", b.v4);
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
        c.http_get(vip(HTTP_PORT))
            .unwrap_or_else(|err| panic!("connection {i} failed: {err:#}"));
    }
}

fn scale_out(forward: &str) {
    let vips: Vec<IpAddr> = if forward == "ipip" {
        vec![VIP.parse().unwrap()]
    } else {
        vec![]
    };
    let mut e = Ecmp::new(3, Path::new(env!("CARGO_BIN_EXE_lb")), &vips).expect("testbed");
    if forward == "ipip" {
        e.decap_on_backends().unwrap();
    }
    e.write_config(&config(&e, forward)).unwrap();
    e.start_agent(0).unwrap();
    e.start_agent(1).unwrap();
    let gw1: IpAddr = "10.2.1.2".parse().unwrap();
    let gw2: IpAddr = "10.2.2.2".parse().unwrap();
    let vip_ip: IpAddr = VIP.parse().unwrap();
    let t = wait_for(Duration::from_secs(30), "both gateways announced", || {
        e.router_next_hops(vip_ip).unwrap() == [gw1, gw2]
    });
    println!("{forward}: both gateways announced {t:?} after the agents started");

    // The same configuration gives the same selection on both gateways.
    for port in [HTTP_PORT, LINE_PORT] {
        let v = format!("{}/tcp", vip(port));
        let d1 = e.lb(0, &["table", &v, "--digest"]).unwrap();
        let d2 = e.lb(1, &["table", &v, "--digest"]).unwrap();
        assert_eq!(d1, d2, "gateways disagree on {v}");
    }

    // Flows spread over both gateways.
    let client = e.as_client();
    let mut long: Vec<_> = (0..24)
        .map(|_| client.open_line(vip(LINE_PORT)).unwrap())
        .collect();
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

    // gw1 withdraws (its agent stops): everything goes through gw2, and every established
    // connection keeps its backend (gw2 picks the same one without having seen the flow).
    e.stop_agent(0).unwrap();
    let t = wait_for(Duration::from_secs(15), "gw1 withdrawn", || {
        e.router_next_hops(vip_ip).unwrap() == [gw2]
    });
    println!("{forward}: the router dropped gw1 {t:?} after its agent stopped; 24 held connections checked");
    for c in &mut long {
        assert_eq!(
            c.ping().unwrap(),
            c.backend,
            "a connection moved or broke (gw1 withdrawn)"
        );
    }
    let gw1_before = vip_packets(&e, 0);
    connections(&e, 100);
    assert_eq!(
        vip_packets(&e, 0),
        gw1_before,
        "gw1 still carries new flows"
    );

    // gw1 comes back: flows spread again; the established connections still hold.
    e.start_agent(0).unwrap();
    let t = wait_for(Duration::from_secs(30), "gw1 announced again", || {
        e.router_next_hops(vip_ip).unwrap() == [gw1, gw2]
    });
    println!("{forward}: gw1 back in the router {t:?} after its agent started");
    for c in &mut long {
        assert_eq!(
            c.ping().unwrap(),
            c.backend,
            "a connection moved or broke (gw1 back)"
        );
    }
    let before = [vip_packets(&e, 0), vip_packets(&e, 1)];
    connections(&e, 200);
    let after = [vip_packets(&e, 0), vip_packets(&e, 1)];
    println!(
        "{forward}: 200 connections after the return: gw1 {} packets, gw2 {}",
        after[0] - before[0],
        after[1] - before[1]
    );
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "{before:?} -> {after:?}"
    );
    let log = std::fs::read_to_string(e.agent_log(0)).unwrap();
    assert!(log.contains("withdrew every VIP"), "{log}");

    // gw2's uplink is cut: the router stops using it, its flows move to gw1, and every
    // established connection survives (in NAT mode, the replies that still reach gw2 leave
    // through gw1 after their translation).
    e.set_uplink(1, false).unwrap();
    let t = wait_for(
        Duration::from_secs(15),
        "gw2 gone after its link was cut",
        || e.router_next_hops(vip_ip).unwrap() == [gw1],
    );
    println!("{forward}: the router dropped gw2 {t:?} after its uplink was cut");
    for c in &mut long {
        assert_eq!(
            c.ping().unwrap(),
            c.backend,
            "a connection moved or broke (link cut)"
        );
    }
    connections(&e, 50);
    e.set_uplink(1, true).unwrap();
    let t = wait_for(
        Duration::from_secs(30),
        "gw2 back after its link returned",
        || e.router_next_hops(vip_ip).unwrap() == [gw1, gw2],
    );
    println!("{forward}: gw2 back in the router {t:?} after its uplink returned");
    for c in &mut long {
        assert_eq!(
            c.ping().unwrap(),
            c.backend,
            "a connection moved or broke (link back)"
        );
    }

    // gw2's data plane is detached (its agent keeps running): it withdraws, and new
    // connections all go through gw1.
    e.lb(1, &["detach"]).unwrap();
    let t = wait_for(
        Duration::from_secs(15),
        "gw2 withdrawn after detach",
        || e.router_next_hops(vip_ip).unwrap() == [gw1],
    );
    println!("{forward}: the router dropped gw2 {t:?} after `lb detach` there");
    if forward == "ipip" {
        // (In NAT mode the backends' replies would still take their route through gw2, which
        // no longer translates them: return routes must point at gateways running lb.)
        connections(&e, 50);
    }
}

#[test]
fn two_gateways_nat() {
    scale_out("nat");
}

#[test]
fn two_gateways_ipip() {
    scale_out("ipip");
}
