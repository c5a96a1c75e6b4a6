//! Reference implementations the tests check lb against, written from the published algorithms
//! and from ARCHITECTURE.md, not from lb's code: MurmurHash3 (x86, 32 bit), the flow and source
//! hashes over their documented byte layouts, and the weighted Maglev table build. Nothing here
//! calls `lb_common::hash` or `lb::maglev`.

use std::net::{IpAddr, SocketAddr};

/// MurmurHash3_x86_32 (Appleby's reference, little-endian block reads).
pub fn murmur3(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let blocks = data.chunks_exact(4);
    let tail = blocks.remainder();
    for b in blocks {
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, byte) in tail.iter().enumerate() {
            k |= (*byte as u32) << (8 * i);
        }
        h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// An address as the data plane's keys hold it: 16 bytes, IPv4 in the first 4.
fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// The family tag of the key layouts (ARCHITECTURE.md: 4 or 6).
fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        4
    } else {
        6
    }
}

/// The flow hash: MurmurHash3 of the 40-byte flow key — client address (16), VIP address (16),
/// client port and VIP port (network order), protocol, family, 2 zero bytes.
pub fn flow_hash(client: SocketAddr, vip: SocketAddr, udp: bool, seed: u32) -> u32 {
    let mut key = Vec::with_capacity(40);
    key.extend_from_slice(&addr16(client.ip()));
    key.extend_from_slice(&addr16(vip.ip()));
    key.extend_from_slice(&client.port().to_be_bytes());
    key.extend_from_slice(&vip.port().to_be_bytes());
    key.push(if udp { 17 } else { 6 });
    key.push(family(client.ip()));
    key.extend_from_slice(&[0, 0]);
    murmur3(&key, seed)
}

/// The encapsulation hash (ipip's outer source and flow label): from the seed, each of the
/// first nine little-endian u32 words of the flow key (client address, VIP address, client
/// port and VIP port in network byte order) xored in, multiplied by 0x9e3779b1 and rotated
/// left by 13, then MurmurHash3's finalizer.
pub fn encap_hash(client: SocketAddr, vip: SocketAddr, seed: u32) -> u32 {
    let mut key = Vec::with_capacity(36);
    key.extend_from_slice(&addr16(client.ip()));
    key.extend_from_slice(&addr16(vip.ip()));
    key.extend_from_slice(&client.port().to_be_bytes());
    key.extend_from_slice(&vip.port().to_be_bytes());
    let mut h = seed;
    for w in key.chunks(4) {
        let w = u32::from_le_bytes(w.try_into().unwrap());
        h = (h ^ w).wrapping_mul(0x9e37_79b1).rotate_left(13);
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The source hash: MurmurHash3, with the seed xor "lb_2", of the client address masked to
/// `prefix_len` bits (0: all) followed by its family as a little-endian u32.
pub fn source_hash(client: IpAddr, prefix_len: u8, seed: u32) -> u32 {
    let bits = if client.is_ipv4() { 32 } else { 128 };
    let keep = if prefix_len == 0 || prefix_len as u32 > bits {
        bits
    } else {
        prefix_len as u32
    };
    let mut a = addr16(client);
    for (i, byte) in a.iter_mut().enumerate() {
        let from = 8 * i as u32;
        if from >= keep {
            *byte = 0;
        } else if keep - from < 8 {
            *byte &= 0xffu8 << (8 - (keep - from));
        }
    }
    let mut key = a.to_vec();
    key.extend_from_slice(&[family(client), 0, 0, 0]);
    murmur3(&key, seed ^ 0x6c62_5f32)
}

/// A backend's identity in the table build: its endpoint as the maps store it — address (16
/// bytes), port (network order), protocol, family.
pub fn identity(backend: SocketAddr, udp: bool) -> Vec<u8> {
    let mut id = addr16(backend.ip()).to_vec();
    id.extend_from_slice(&backend.port().to_be_bytes());
    id.push(if udp { 17 } else { 6 });
    id.push(family(backend.ip()));
    id
}

/// The two permutation seeds of the table format ("magl", "ev01").
const OFFSET_SEED: u32 = 0x6d61_676c;
const SKIP_SEED: u32 = 0x6576_3031;

/// Weighted Maglev (Eisenbud et al., NSDI 2016, with ARCHITECTURE.md's weights): which input
/// backend (index into `backends`, given as (identity, weight)) owns each of the `m` slots.
///
/// Backends with weight 0 own nothing. The others, in identity order, each walk the
/// permutation `offset + j·skip (mod m)`; each gets a quota of slots — `m·w/ΣW` rounded down,
/// the leftover slots going one each by largest remainder (ties: earlier in identity order) —
/// and they take turns: every round each backend under its quota earns its weight in credit
/// and, per largest weight of credit, claims the next free slot on its permutation.
pub fn maglev(backends: &[(Vec<u8>, u32)], m: u32) -> Vec<Option<usize>> {
    struct Walker {
        input: usize,
        weight: u64,
        offset: u64,
        skip: u64,
        step: u64,
        quota: u64,
        owned: u64,
        credit: u64,
    }
    let m = m as u64;
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
    order.sort_by(|&a, &b| backends[a].0.cmp(&backends[b].0).then(a.cmp(&b)));
    order.dedup_by(|a, b| backends[*a].0 == backends[*b].0);
    let mut slots = vec![None; m as usize];
    if order.is_empty() {
        return slots;
    }
    let total: u64 = order.iter().map(|&i| backends[i].1 as u64).sum();
    let mut walkers: Vec<Walker> = order
        .iter()
        .map(|&i| {
            let (id, w) = &backends[i];
            Walker {
                input: i,
                weight: *w as u64,
                offset: murmur3(id, OFFSET_SEED) as u64 % m,
                skip: murmur3(id, SKIP_SEED) as u64 % (m - 1) + 1,
                step: 0,
                quota: m * *w as u64 / total,
                owned: 0,
                credit: 0,
            }
        })
        .collect();
    let leftover = m - walkers.iter().map(|w| w.quota).sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..walkers.len()).collect();
    by_remainder.sort_by_key(|&k| (std::cmp::Reverse(m * walkers[k].weight % total), k));
    for &k in by_remainder.iter().take(leftover as usize) {
        walkers[k].quota += 1;
    }
    let heaviest = walkers.iter().map(|w| w.weight).max().unwrap();
    let mut free = m;
    while free > 0 {
        for w in walkers.iter_mut() {
            if w.owned == w.quota {
                continue;
            }
            w.credit += w.weight;
            while w.credit >= heaviest && w.owned < w.quota {
                w.credit -= heaviest;
                let slot = loop {
                    let s = ((w.offset + w.step * w.skip) % m) as usize;
                    w.step += 1;
                    if slots[s].is_none() {
                        break s;
                    }
                };
                slots[slot] = Some(w.input);
                w.owned += 1;
                free -= 1;
            }
        }
    }
    slots
}

/// The reference table of a configured VIP: the backend owning each slot, from the VIP's
/// backends as configured (address, weight, health; README: a down backend gets no slots
/// unless every weighted backend is down and the VIP fails open).
pub fn vip_table(
    maps: &lb::LbMaps,
    vip: &lb::Vip,
) -> (lb_common::VipInfo, Vec<Option<SocketAddr>>) {
    let info = maps.vip(vip).expect("VIP configured");
    let backends = maps.backends(vip).expect("backends readable");
    let udp = vip.proto == lb::Proto::Udp;
    let any_up = backends.iter().any(|b| b.weight > 0 && b.healthy);
    let fail_open = info.flags & lb_common::VIP_F_DROP_WHEN_ALL_DOWN == 0;
    let input: Vec<(Vec<u8>, u32)> = backends
        .iter()
        .map(|b| {
            let w = if b.healthy || (!any_up && fail_open) {
                b.weight
            } else {
                0
            };
            (identity(b.addr, udp), w)
        })
        .collect();
    let table = maglev(&input, info.table_size)
        .into_iter()
        .map(|s| s.map(|i| backends[i].addr))
        .collect();
    (info, table)
}

/// The backend the reference gives a flow from `client` by its hash alone: the VIP's hash
/// (the source hash for source-hash VIPs, else the flow hash) into its table. Not for round
/// robin, whose table holds its sequence.
pub fn hashed_backend(maps: &lb::LbMaps, vip: &lb::Vip, client: SocketAddr) -> Option<SocketAddr> {
    let (info, table) = vip_table(maps, vip);
    let seed = maps.conf().expect("conf readable").hash_seed;
    assert_ne!(info.algo, lb_common::ALGO_ROUND_ROBIN, "{vip}: round robin");
    let h = if info.algo == lb_common::ALGO_SOURCE_HASH {
        source_hash(client.ip(), info.src_prefix_len, seed)
    } else {
        flow_hash(client, vip.addr, vip.proto == lb::Proto::Udp, seed)
    };
    table[(h % info.table_size) as usize]
}
