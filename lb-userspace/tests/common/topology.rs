//! The fixture gateway: a namespace with two veth pairs, addresses, static neighbours and
//! routes, so that the program's route lookups under BPF_PROG_TEST_RUN give known answers.
//!
//! ```text
//!   client 10.0.0.2 / fd00::2 ─┐
//!   backends 10.1.0.11-13,     ├─ fxa (02:00:00:00:00:a0)  10.0.0.1/24 10.1.0.1/24 fd00::1 fd01::1
//!            fd01::11-13      ─┘
//!   backend 10.2.0.21 / fd02::21 ── fxb (02:00:00:00:00:b0) 10.2.0.1/24 fd02::1
//!   10.1.0.99: on fxa's subnet, no neighbour entry      10.9.0.0/24: blackhole route
//! ```

use std::net::SocketAddr;

use lb::{Dataplane, LoadOptions};

use super::{netns::NetNs, packets::Mac};

pub const GW_MAC_A: Mac = [2, 0, 0, 0, 0, 0xa0];
pub const GW_MAC_B: Mac = [2, 0, 0, 0, 0, 0xb0];
pub const CLIENT_MAC: Mac = [2, 0, 0, 0, 0, 0x0c];

/// Backends with a static neighbour entry and their MACs.
pub const NEIGHBOURS: &[(&str, &str, Mac)] = &[
    ("10.0.0.2", "fxa", CLIENT_MAC),
    ("fd00::2", "fxa", CLIENT_MAC),
    ("10.1.0.11", "fxa", [2, 0, 0, 0, 1, 0x11]),
    ("10.1.0.12", "fxa", [2, 0, 0, 0, 1, 0x12]),
    ("10.1.0.13", "fxa", [2, 0, 0, 0, 1, 0x13]),
    ("fd01::11", "fxa", [2, 0, 0, 0, 1, 0x11]),
    ("fd01::12", "fxa", [2, 0, 0, 0, 1, 0x12]),
    ("fd01::13", "fxa", [2, 0, 0, 0, 1, 0x13]),
    ("10.2.0.21", "fxb", [2, 0, 0, 0, 2, 0x21]),
    ("fd02::21", "fxb", [2, 0, 0, 0, 2, 0x21]),
];

/// The MAC of a neighbour in the table above.
pub fn mac_of(addr: SocketAddr) -> Mac {
    let ip = addr.ip().to_string();
    NEIGHBOURS
        .iter()
        .find(|(a, _, _)| *a == ip)
        .unwrap_or_else(|| panic!("{ip} has no neighbour entry"))
        .2
}

pub struct Gateway {
    /// The loaded program (not attached) — dropped before the namespace.
    pub dp: Dataplane,
    pub ifindex_a: u32,
    pub ifindex_b: u32,
    pub ns: NetNs,
}

impl Gateway {
    /// Builds the namespace, moves the calling thread into it and loads the program.
    pub fn new(tag: &str) -> Gateway {
        let ns = NetNs::new(tag);
        ns.ip(&[
            "link", "add", "fxa", "type", "veth", "peer", "name", "fxa-peer",
        ]);
        ns.ip(&[
            "link", "add", "fxb", "type", "veth", "peer", "name", "fxb-peer",
        ]);
        ns.ip(&["link", "set", "fxa", "address", "02:00:00:00:00:a0"]);
        ns.ip(&["link", "set", "fxb", "address", "02:00:00:00:00:b0"]);
        for l in ["fxa", "fxa-peer", "fxb", "fxb-peer"] {
            ns.ip(&["link", "set", l, "up"]);
        }
        for (addr, dev) in [
            ("10.0.0.1/24", "fxa"),
            ("10.1.0.1/24", "fxa"),
            ("10.2.0.1/24", "fxb"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", dev]);
        }
        for (addr, dev) in [
            ("fd00::1/64", "fxa"),
            ("fd01::1/64", "fxa"),
            ("fd02::1/64", "fxb"),
        ] {
            ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
        }
        for (addr, dev, mac) in NEIGHBOURS {
            let mac = mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            ns.ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        ns.ip(&["route", "add", "blackhole", "10.9.0.0/24"]);
        ns.enable_forwarding();
        ns.enter();
        // A fixed seed unless LB_HASH_SEED gives another: the fixture tests compute their
        // expectations with the seed in the maps (`LbMaps::conf`, `table_backend`), so they
        // hold for any seed.
        let hash_seed = std::env::var("LB_HASH_SEED")
            .ok()
            .map(|s| lb::model::parse_hash_seed(&s).expect("LB_HASH_SEED"))
            .unwrap_or(lb_common::hash::FLOW_HASH_SEED);
        let dp = Dataplane::load(LoadOptions {
            table_capacity: 8 * 65_537,
            ct_capacity: 65_536,
            ct_new_capacity: 65_536,
            hash_seed: Some(hash_seed),
            ..Default::default()
        })
        .expect("loading the program (is this root?)");
        Gateway {
            dp,
            ifindex_a: ns.ifindex("fxa"),
            ifindex_b: ns.ifindex("fxb"),
            ns,
        }
    }
}

/// Pins the calling thread to the CPU it runs on, so that per-CPU data-plane state (the
/// new-flow rate window) is the same for every packet the thread runs.
pub fn pin_to_current_cpu() {
    // SAFETY: a zeroed cpu_set_t is valid; the calls only read and write it.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}
