//! Interfaces that come and go (a driver reload, an unplugged NIC, a VLAN sub-interface made
//! again): lb sees a deleted interface's link as gone, attaches to the interface made again,
//! cleans up on detach, and the agent re-attaches on its own. Interface names with dots (VLAN
//! sub-interfaces such as `eth0.100`) work. Real `lb` binary, namespaces of their own.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use lb::testbed::{Testbed, HTTP_PORT};

const VIP: &str = "10.100.0.100:80";

fn lb_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb"))
}

/// (state, mode) of `iface` in `lb status`, None if it is not listed.
fn link_state(tb: &Testbed, iface: &str) -> Option<(String, String)> {
    let s = tb.lb_json(&["status"]).unwrap();
    s["attached"].as_array().unwrap().iter().find_map(|a| {
        (a["iface"] == iface).then(|| {
            (
                a["state"].as_str().unwrap().to_string(),
                a["mode"].as_str().unwrap().to_string(),
            )
        })
    })
}

fn vip_to_backend_1(tb: &Testbed) {
    let vip = format!("{VIP}/tcp");
    tb.lb(&["vip", "add", &vip, "--table-size", "251"]).unwrap();
    let b = SocketAddr::new(tb.backends[0].v4, HTTP_PORT).to_string();
    tb.lb(&["backend", "add", &vip, &b]).unwrap();
}

/// Bounded in count and time: up to 50 tries over at most 10 s.
fn served_through_vip(tb: &Testbed) -> bool {
    let start = Instant::now();
    for _ in 0..50 {
        if let Ok((name, _)) = tb.http_get(VIP.parse().unwrap()) {
            return name == "backend-1";
        }
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn a_deleted_interface_is_gone_and_can_be_attached_again() {
    let tb = Testbed::new(1, "native", lb_bin()).expect("building the testbed");
    vip_to_backend_1(&tb);
    assert!(served_through_vip(&tb));
    assert_eq!(
        link_state(&tb, "g1"),
        Some(("attached".into(), "native".into()))
    );

    tb.delete_backend_link(1).unwrap();
    assert_eq!(
        link_state(&tb, "g1"),
        Some(("gone".into(), "native".into())),
        "a deleted interface's link is shown as gone"
    );
    assert_eq!(link_state(&tb, "g0").unwrap().0, "attached");
    let text = tb.lb(&["status"]).unwrap();
    assert!(text.contains("g1 (native, GONE"), "{text}");
    // An upgrade switches the live links and leaves the gone one alone.
    let u = tb.lb_json(&["upgrade"]).unwrap();
    assert_eq!(u["interfaces"], serde_json::json!(["g0"]), "{u}");
    let e = tb.lb(&["attach", "g1"]).unwrap_err();
    assert!(
        format!("{e:#}").contains("interface g1 does not exist"),
        "{e:#}"
    );

    // Made again with the same name: still the old link (gone) until attached anew.
    tb.recreate_backend_link(1).unwrap();
    assert_eq!(link_state(&tb, "g1").unwrap().0, "gone");
    let out = tb.lb(&["attach", "g1", "--mode", "native"]).unwrap();
    assert!(out.contains("attached to g1 (native mode)"), "{out}");
    assert_eq!(
        link_state(&tb, "g1"),
        Some(("attached".into(), "native".into()))
    );
    assert!(
        served_through_vip(&tb),
        "no traffic through the re-attached interface"
    );

    // Deleted again: `lb detach` removes what is left of the link, and says so.
    tb.delete_backend_link(1).unwrap();
    let out = tb.lb(&["detach", "g1"]).unwrap();
    assert!(
        out.contains("removed the link of g1 (the interface is gone)"),
        "{out}"
    );
    assert_eq!(link_state(&tb, "g1"), None);
}

#[test]
fn interface_names_with_dots_attach_and_detach() {
    let tb = Testbed::new(1, "native", lb_bin()).expect("building the testbed");
    // A VLAN sub-interface's kind of name (this kernel makes no VLAN devices: a veth with it).
    tb.gateway
        .ip(&[
            "link", "add", "vl0.100", "type", "veth", "peer", "name", "vl1.100",
        ])
        .unwrap();
    tb.gateway.ip(&["link", "set", "vl0.100", "up"]).unwrap();
    tb.gateway.ip(&["link", "set", "vl1.100", "up"]).unwrap();
    let out = tb.lb(&["attach", "vl0.100", "--mode", "generic"]).unwrap();
    assert!(out.contains("attached to vl0.100 (generic mode)"), "{out}");
    assert_eq!(
        link_state(&tb, "vl0.100"),
        Some(("attached".into(), "generic".into()))
    );
    let e = tb.lb(&["attach", "vl0.100"]).unwrap_err();
    assert!(
        format!("{e:#}").contains("already attached to vl0.100"),
        "{e:#}"
    );
    let out = tb.lb(&["detach", "vl0.100"]).unwrap();
    assert!(out.contains("detached from vl0.100"), "{out}");
    assert_eq!(link_state(&tb, "vl0.100"), None);
}

#[test]
fn the_agent_attaches_again_when_an_interface_comes_back() {
    let tb = Testbed::new(1, "native", lb_bin()).expect("building the testbed");
    let dir = std::env::temp_dir().join(format!("lbt-ifaces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    let b = SocketAddr::new(tb.backends[0].v4, HTTP_PORT);
    std::fs::write(
        &cfg,
        format!("[[vip]]\naddress = \"{VIP}/tcp\"\ntable_size = 251\n\n[[vip.backend]]\naddress = \"{b}\"\n"),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let cfg_s = cfg.display().to_string();
    let mut agent = tb
        .spawn_lb(
            &[
                "run",
                "-f",
                &cfg_s,
                "--attach",
                "g1",
                "--metrics",
                "off",
                "--poll",
                "200ms",
            ],
            &log,
        )
        .unwrap();
    let log_has = |needle: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(needle)
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "waiting for {what}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("the agent to apply the file", &|| {
        log_has("configuration applied")
    });
    assert!(served_through_vip(&tb));
    tb.delete_backend_link(1).unwrap();
    tb.recreate_backend_link(1).unwrap();
    wait("the agent to attach again", &|| log_has("attached again"));
    assert_eq!(
        link_state(&tb, "g1"),
        Some(("attached".into(), "native".into()))
    );
    assert!(
        served_through_vip(&tb),
        "no traffic after the agent attached again"
    );
    // An operator's `lb detach` is not undone (what the scale-out tests rely on to withdraw).
    tb.lb(&["detach", "g1"]).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        link_state(&tb, "g1"),
        None,
        "the agent attached again after `lb detach`"
    );
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
