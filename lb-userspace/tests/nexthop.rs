//! The next-hop cache under a changing neighbour (ARCHITECTURE.md, "Next hop"): the data
//! plane uses the MAC a route lookup gave it for at most `nexthop_max_age_ms`, so when a
//! backend's MAC changes (a replaced NIC or VM, a failover), traffic reaches it again within
//! that bound — with no process running and no operator action.
//!
//! Real kernel UDP in namespaces, lb attached in native mode: the client sends one datagram
//! every few milliseconds to a VIP with one backend (its echo server answers each); then the
//! backend's interface gets a new MAC and the gateway's neighbour entry follows it (as ARP
//! would). Until the cached next hop is looked up again the gateway sends to the old MAC,
//! which the backend's interface no longer accepts: echoes stop. The test measures how long.

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use lb::testbed::{in_ns, Testbed, UDP_PORT};

const VIP: &str = "10.100.0.100:53";

/// How long after the neighbour changed the first echo came back, with lb attached and the
/// cache's maximum age set to `max_age_ms`. Sends for at most `limit`.
fn outage_after_mac_change(max_age_ms: u32, limit: Duration) -> Duration {
    let age = max_age_ms.to_string();
    let tb = Testbed::with_attach(
        1,
        "native",
        Path::new(env!("CARGO_BIN_EXE_lb")),
        &["--nexthop-max-age-ms", &age],
    )
    .expect("building the testbed");
    let b = &tb.backends[0];
    tb.lb(&["vip", "add", &format!("{VIP}/udp"), "--table-size", "251"])
        .unwrap();
    tb.lb(&[
        "backend",
        "add",
        &format!("{VIP}/udp"),
        &SocketAddr::new(b.v4, UDP_PORT).to_string(),
    ])
    .unwrap();
    let vip: SocketAddr = VIP.parse().unwrap();
    let client = tb.client_v4;
    let backend_ip = b.v4.to_string();
    let new_mac = "02:00:00:00:5e:01";
    in_ns(&tb.client, || {
        // The gateway handles a datagram on the CPU that sent it (veth), and the cache is per
        // CPU: one CPU, one cache entry.
        pin_to_one_cpu();
        let s = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
        let mut buf = [0u8; 256];
        // One ping (all of one length: a longer packet than the cache was checked for is
        // looked up); whether a reply came within 5 ms.
        let echo = |i: u64, buf: &mut [u8]| -> bool {
            s.send_to(format!("ping {i:08}").as_bytes(), vip).unwrap();
            s.recv_from(buf).is_ok()
        };
        // The flow works, and the gateway has looked up (and cached) the backend's MAC.
        let mut i = 0;
        let warm = Instant::now();
        while !echo(i, &mut buf) {
            i += 1;
            assert!(
                warm.elapsed() < Duration::from_secs(5),
                "no echo through the VIP"
            );
        }
        for _ in 0..20 {
            i += 1;
            assert!(echo(i, &mut buf), "echo through the VIP before the change");
        }
        // The backend's NIC changes its MAC; the gateway's neighbour entry follows at once.
        b.ns.ip(&["link", "set", "eth0", "address", new_mac])
            .unwrap();
        tb.gateway
            .ip(&[
                "neigh",
                "replace",
                &backend_ip,
                "lladdr",
                new_mac,
                "dev",
                "g1",
                "nud",
                "reachable",
            ])
            .unwrap();
        let changed = Instant::now();
        // Drain replies that were in flight before the change.
        while s.recv_from(&mut buf).is_ok() {}
        loop {
            i += 1;
            if echo(i, &mut buf) {
                return changed.elapsed();
            }
            assert!(
                changed.elapsed() < limit,
                "no echo within {limit:?} of the MAC change"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    })
    .unwrap()
}

/// Pins the calling thread to the first CPU it may run on.
fn pin_to_one_cpu() {
    // SAFETY: cpu_set_t is plain data; the calls get valid pointers and its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        assert_eq!(libc::sched_getaffinity(0, size, &mut set), 0);
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &set))
            .unwrap();
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        assert_eq!(libc::sched_setaffinity(0, size, &one), 0);
    }
}

/// With the default maximum age (100 ms), traffic follows the new MAC within the bound (plus
/// a tick of the data plane's clock and scheduling slack).
#[test]
fn a_changed_neighbour_is_followed_within_the_maximum_age() {
    let outage = outage_after_mac_change(100, Duration::from_secs(5));
    eprintln!("maximum age 100 ms: echoes stopped for {outage:?}");
    assert!(
        outage < Duration::from_millis(400),
        "the gateway sent to the old MAC for {outage:?} (bound: 100 ms)"
    );
}

/// The control: with a long maximum age the same change keeps traffic on the stale MAC for
/// about that long — so the test above measures the cache (it would fail with a cache that
/// ignored its maximum age), and the kernel alone would not have hidden it.
#[test]
fn a_long_maximum_age_keeps_the_stale_mac_that_long() {
    let outage = outage_after_mac_change(2000, Duration::from_secs(6));
    eprintln!("maximum age 2000 ms: echoes stopped for {outage:?}");
    assert!(
        outage >= Duration::from_millis(1500),
        "traffic followed the new MAC after {outage:?}, before the 2 s maximum age"
    );
}
