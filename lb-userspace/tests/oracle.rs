//! The reference implementations in `common::oracle` against published vectors, and lb's
//! table builder, hashes and data-plane tables against them.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::{oracle, topology::Gateway};
use lb::{maglev::TableEntry, Vip};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A fixed seed for CI, plus LB_ORACLE_SEED to replay another.
fn rng() -> StdRng {
    let seed: u64 = std::env::var("LB_ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6f72_6163);
    println!("LB_ORACLE_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

#[test]
fn murmur3_published_vectors() {
    // Vectors published with the reference implementation and its ports.
    assert_eq!(oracle::murmur3(b"", 0), 0);
    assert_eq!(oracle::murmur3(b"", 1), 0x514e_28b7);
    assert_eq!(oracle::murmur3(b"", 0xffff_ffff), 0x81f1_6f39);
    assert_eq!(oracle::murmur3(&[0, 0, 0, 0], 0), 0x2362_f9de);
    assert_eq!(oracle::murmur3(b"a", 0x9747_b28c), 0x7fa0_9ea6);
    assert_eq!(oracle::murmur3(b"abcd", 0x9747_b28c), 0xf047_8627);
    assert_eq!(oracle::murmur3(b"Hello, world!", 0x9747_b28c), 0x2488_4cba);
    assert_eq!(
        oracle::murmur3(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
        0x2fa8_26cd
    );
}

fn random_ip(rng: &mut StdRng, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(rng.random::<u128>().into())
    } else {
        IpAddr::V4(rng.random::<u32>().into())
    }
}

#[test]
fn flow_encap_and_source_hashes_match_the_reference() {
    let mut rng = rng();
    for _ in 0..20_000 {
        let v6 = rng.random_bool(0.5);
        let udp = rng.random_bool(0.5);
        let client = SocketAddr::new(random_ip(&mut rng, v6), rng.random());
        let vip_addr = SocketAddr::new(random_ip(&mut rng, v6), rng.random());
        let vip = Vip::new(vip_addr, if udp { lb::Proto::Udp } else { lb::Proto::Tcp });
        let seed: u32 = rng.random();
        let key = lb::model::flow_key(client, &vip);
        assert_eq!(
            lb_common::hash::flow_hash(&key, seed),
            oracle::flow_hash(client, vip_addr, udp, seed),
            "flow hash of {client} → {vip}, seed {seed:#x}"
        );
        assert_eq!(
            lb_common::hash::encap_hash(&key, seed),
            oracle::encap_hash(client, vip_addr, seed),
            "encapsulation hash of {client} → {vip}, seed {seed:#x}"
        );
        let prefix = rng.random_range(0..=if v6 { 129 } else { 33 });
        let family = if v6 {
            lb_common::FAMILY_V6
        } else {
            lb_common::FAMILY_V4
        };
        assert_eq!(
            lb_common::hash::source_hash(&key.src_be, family, prefix, seed),
            oracle::source_hash(client.ip(), prefix, seed),
            "source hash of {client} /{prefix}, seed {seed:#x}"
        );
    }
}

const PRIMES: [u32; 12] = [2, 3, 5, 7, 11, 13, 31, 97, 251, 257, 1009, 4099];

/// lb's builder gives every slot to the backend the reference gives it, on thousands of small
/// random configurations (weights 0–6, duplicate-free random identities, given in random order).
#[test]
fn table_builder_matches_the_reference_maglev() {
    let mut rng = rng();
    let mut checked = 0;
    for _ in 0..3000 {
        let m = PRIMES[rng.random_range(0..PRIMES.len())];
        let n = rng.random_range(1..=12);
        let backends: Vec<(Vec<u8>, u32)> = (0..n)
            .map(|i| {
                let mut id: Vec<u8> = (0..rng.random_range(1..24)).map(|_| rng.random()).collect();
                id.push(i as u8); // distinct
                (id, rng.random_range(0..=6))
            })
            .collect();
        let want = oracle::maglev(&backends, m);
        let entries: Vec<TableEntry<usize>> = backends
            .iter()
            .enumerate()
            .map(|(i, (id, w))| TableEntry {
                identity: id.clone(),
                weight: *w,
                value: i,
            })
            .collect();
        let got = lb::maglev::build(&entries, m);
        assert_eq!(got, want, "m {m}, backends {backends:?}");
        // The reference's own property: each share is its quota, within one slot of exact.
        let total: u32 = backends.iter().map(|b| b.1).sum();
        for (i, (_, w)) in backends.iter().enumerate() {
            let owned = want.iter().filter(|s| **s == Some(i)).count() as f64;
            let exact = if total == 0 {
                0.0
            } else {
                m as f64 * *w as f64 / total as f64
            };
            assert!((owned - exact).abs() < 1.0, "share {owned} vs {exact}");
        }
        checked += 1;
    }
    assert_eq!(checked, 3000);
}

/// The data plane's table for a VIP, as the map layer writes it, is the reference's build of
/// the VIP's backends (identities = their endpoints), for random backend sets and weights.
#[test]
fn vip_tables_in_the_maps_match_the_reference() {
    let mut rng = rng();
    let mut gw = Gateway::new("oracle");
    for round in 0..40 {
        let udp = rng.random_bool(0.3);
        let v6 = rng.random_bool(0.3);
        let m = [251u32, 1009, 4099][rng.random_range(0..3)];
        let addr = if v6 {
            format!("[fd10::{:x}]:80", 0x200 + round)
        } else {
            format!("10.100.1.{}:80", 1 + round)
        };
        let vip = Vip::new(
            addr.parse().unwrap(),
            if udp { lb::Proto::Udp } else { lb::Proto::Tcp },
        );
        gw.dp.maps.add_vip(&vip, m).unwrap();
        let n = rng.random_range(1..=10);
        let backends: Vec<(SocketAddr, u32)> = (0..n)
            .map(|i| {
                let ip: IpAddr = if v6 {
                    format!("fd01::{:x}:{:x}", round + 1, i + 1)
                        .parse()
                        .unwrap()
                } else {
                    format!("10.3.{}.{}", round + 1, i + 1).parse().unwrap()
                };
                (
                    SocketAddr::new(ip, rng.random_range(1..=65535)),
                    rng.random_range(1..=9),
                )
            })
            .collect();
        gw.dp.maps.set_backends(&vip, &backends).unwrap();
        let reference = oracle::maglev(
            &backends
                .iter()
                .map(|(a, w)| (oracle::identity(*a, udp), *w))
                .collect::<Vec<_>>(),
            m,
        );
        let by_id: std::collections::HashMap<u32, SocketAddr> = gw
            .dp
            .maps
            .backends(&vip)
            .unwrap()
            .iter()
            .map(|b| (b.id, b.addr))
            .collect();
        let table = gw.dp.maps.table(&vip).unwrap();
        assert_eq!(table.len(), m as usize);
        for (slot, (id, want)) in table.iter().zip(&reference).enumerate() {
            assert_eq!(
                by_id.get(id).copied(),
                want.map(|i| backends[i].0),
                "{vip} slot {slot} (round {round})"
            );
        }
    }
}
