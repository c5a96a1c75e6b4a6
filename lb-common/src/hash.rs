//! The flow hash: MurmurHash3 (x86, 32-bit) seeded with the deployment's secret seed.
//!
//! The selection slot of a flow is `flow_hash(key, seed) % table_size`. The hash is a fixed,
//! documented function of the packet's 5-tuple and the seed (`GlobalConf::hash_seed`, chosen
//! per deployment) — no CPU-specific instruction — so every lb gateway with the same seed (and
//! userspace, which runs this same code) maps a flow to the same slot, while nobody without the
//! seed can precompute which source ports land on which backend.

use crate::FlowKey;

/// A fixed seed for tests and examples ("lb_1"). Deployments use a secret one.
pub const FLOW_HASH_SEED: u32 = 0x6c62_5f31;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix_k(k: u32) -> u32 {
    k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2)
}

#[inline(always)]
fn mix_h(h: u32, k: u32) -> u32 {
    (h ^ mix_k(k))
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3_x86_32 of `data` (the reference algorithm; used by userspace for table
/// permutations and to check `flow_hash` against published vectors).
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    let mut h = seed;
    let (chunks, tail) = data.as_chunks::<4>();
    for c in chunks {
        h = mix_h(h, u32::from_le_bytes(*c));
    }
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, b) in tail.iter().enumerate() {
            k |= (*b as u32) << (8 * i);
        }
        h ^= mix_k(k);
    }
    fmix(h, data.len() as u32)
}

/// The flow hash: `murmur3_32(bytes of key, seed)` on a little-endian machine (x86-64, arm64
/// and the `bpfel` target lb builds for), written out word by word so that the eBPF compiler
/// produces straight-line code.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let mut h = seed;
    for w in address_and_port_words(key) {
        h = mix_h(h, w);
    }
    h = mix_h(
        h,
        key.proto as u32 | (key.family as u32) << 8 | (key._pad as u32) << 16,
    );
    fmix(h, core::mem::size_of::<FlowKey>() as u32)
}

/// The key's first nine 32-bit words, as little-endian reads of its first 36 bytes: source
/// address, destination address, the two ports.
#[inline(always)]
fn address_and_port_words(key: &FlowKey) -> [u32; 9] {
    let (s, d) = (key.src_be, key.dst_be);
    [
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
        key.sport_be as u32 | (key.dport_be as u32) << 16,
    ]
}

/// One step of `encap_hash`.
#[inline(always)]
fn encap_step(h: u32, w: u32) -> u32 {
    (h ^ w).wrapping_mul(0x9e37_79b1).rotate_left(13)
}

/// The encapsulation hash, for ipip's outer header (source address, IPv6 flow label): a
/// per-flow value that only has to spread flows over paths and queues, computed for every
/// packet — a quarter of `flow_hash`'s work. Starting from the seed, each of the key's first
/// nine 32-bit words (the source address, the destination address, the two ports: the key's
/// first 36 bytes read as little-endian u32) is xored in, multiplied by 0x9e3779b1 and rotated
/// left by 13; the result goes through MurmurHash3's finalizer (`fmix32`, no length).
#[inline(always)]
pub fn encap_hash(key: &FlowKey, seed: u32) -> u32 {
    let mut h = seed;
    for w in address_and_port_words(key) {
        h = encap_step(h, w);
    }
    fmix(h, 0)
}

/// Mixed into the deployment's seed for the source hash, so that the two hashes differ.
pub const SOURCE_HASH_TWEAK: u32 = 0x6c62_5f32; // "lb_2"

/// The source hash: MurmurHash3 of the client address masked to `prefix_len` bits (0 = all),
/// and its family. Every flow of a client (or of a client subnet) gets the same value.
#[inline(always)]
pub fn source_hash(src_be: &[u32; 4], family: u8, prefix_len: u8, seed: u32) -> u32 {
    let bits_total: u32 = if family == crate::FAMILY_V4 { 32 } else { 128 };
    let prefix = if prefix_len == 0 || prefix_len as u32 > bits_total {
        bits_total
    } else {
        prefix_len as u32
    };
    let mut h = seed ^ SOURCE_HASH_TWEAK;
    let mut i = 0;
    while i < 4 {
        let start = 32 * i as u32;
        let keep = if prefix <= start {
            0
        } else if prefix >= start + 32 {
            32
        } else {
            prefix - start
        };
        // Network-order words: the mask is built in wire order, then stored like the words.
        let mask = if keep == 0 {
            0
        } else {
            (u32::MAX << (32 - keep)).to_be()
        };
        h = mix_h(h, src_be[i] & mask);
        i += 1;
    }
    h = mix_h(h, family as u32);
    fmix(h, 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_published_vectors() {
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
            0x2fa8_26cd
        );
    }

    #[test]
    fn flow_hash_is_murmur3_of_the_key_bytes() {
        let mut key = FlowKey::default();
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        for i in 0..16 {
            src[i] = i as u8 * 7 + 1;
            dst[i] = 200 - i as u8 * 3;
        }
        key.src_be = crate::addr_words(src);
        key.dst_be = crate::addr_words(dst);
        key.sport_be = 40000u16.to_be();
        key.dport_be = 80u16.to_be();
        key.proto = crate::PROTO_TCP;
        key.family = crate::FAMILY_V6;
        assert_eq!(
            flow_hash(&key, FLOW_HASH_SEED),
            murmur3_32(bytemuck::bytes_of(&key), FLOW_HASH_SEED)
        );
    }

    #[test]
    fn encap_hash_depends_on_every_field_and_spreads() {
        let mut key = FlowKey::default();
        key.src_be[0] = u32::from_ne_bytes([10, 0, 0, 1]);
        key.dst_be[0] = u32::from_ne_bytes([10, 100, 0, 100]);
        key.sport_be = 40000u16.to_be();
        key.dport_be = 80u16.to_be();
        key.proto = crate::PROTO_TCP;
        key.family = crate::FAMILY_V4;
        // (Its value against the description: tests/oracle.rs, with the other hashes.)
        let h = encap_hash(&key, FLOW_HASH_SEED);
        assert_ne!(h, encap_hash(&key, 1), "the seed changes it");
        // Every address word and both ports change it.
        for i in 0..4 {
            let mut k = key;
            k.src_be[i] ^= 0x0100;
            assert_ne!(encap_hash(&k, FLOW_HASH_SEED), h, "source word {i}");
            let mut k = key;
            k.dst_be[i] ^= 0x0100;
            assert_ne!(encap_hash(&k, FLOW_HASH_SEED), h, "destination word {i}");
        }
        let mut k = key;
        k.sport_be ^= 1;
        assert_ne!(encap_hash(&k, FLOW_HASH_SEED), h, "source port");
        let mut k = key;
        k.dport_be ^= 1;
        assert_ne!(encap_hash(&k, FLOW_HASH_SEED), h, "destination port");
        // Flows that differ only in the source port spread over the 16 bits IPv4 uses.
        let mut seen = [false; 1 << 16];
        let mut distinct = 0;
        for port in 1024..2048u16 {
            let mut k = key;
            k.sport_be = port.to_be();
            let v = (encap_hash(&k, FLOW_HASH_SEED) & 0xffff) as usize;
            distinct += !seen[v] as u32;
            seen[v] = true;
        }
        assert!(distinct > 1000, "{distinct} distinct of 1024");
    }

    #[test]
    fn flow_hash_is_pinned() {
        // Pinned value: if this changes, every deployed gateway would disagree with a new one.
        let mut key = FlowKey::default();
        key.src_be[0] = u32::from_ne_bytes([10, 0, 0, 1]);
        key.dst_be[0] = u32::from_ne_bytes([10, 100, 0, 100]);
        key.sport_be = 40000u16.to_be();
        key.dport_be = 80u16.to_be();
        key.proto = crate::PROTO_TCP;
        key.family = crate::FAMILY_V4;
        assert_eq!(
            flow_hash(&key, FLOW_HASH_SEED),
            murmur3_32(bytemuck::bytes_of(&key), FLOW_HASH_SEED)
        );
        assert_eq!(flow_hash(&key, FLOW_HASH_SEED), PINNED);
        // The seed changes the answer.
        assert_ne!(flow_hash(&key, 1), PINNED);
        assert_eq!(flow_hash(&key, 1), murmur3_32(bytemuck::bytes_of(&key), 1));
    }
    const PINNED: u32 = 3_515_136_274;

    #[test]
    fn flow_hash_is_murmur3_of_every_key_byte() {
        // Every field counts, the padding too: the hash is of the key's 40 bytes as stored.
        let key = FlowKey {
            src_be: [0x0101_0101, 0x0202_0202, 0x0303_0303, 0x0404_0404],
            dst_be: [0x0505_0505, 0x0606_0606, 0x0707_0707, 0x0808_0808],
            sport_be: 0x1234,
            dport_be: 0xabcd,
            proto: 0x5a,
            family: 0xa5,
            _pad: 0xbeef,
        };
        for seed in [0, 1, FLOW_HASH_SEED, u32::MAX] {
            assert_eq!(
                flow_hash(&key, seed),
                murmur3_32(bytemuck::bytes_of(&key), seed)
            );
        }
    }

    /// The source hash spelled out: MurmurHash3, seeded with `seed ^ SOURCE_HASH_TWEAK`, of the
    /// 16 address bytes with every bit after the first `bits` cleared, then the family as a
    /// little-endian u32.
    fn source_hash_reference(addr: [u8; 16], family: u8, bits: u32, seed: u32) -> u32 {
        let mut data = [0u8; 20];
        for (i, b) in addr.iter().enumerate() {
            let keep = bits.saturating_sub(8 * i as u32).min(8);
            data[i] = if keep == 0 {
                0
            } else {
                b & (0xffu8 << (8 - keep))
            };
        }
        data[16..].copy_from_slice(&(family as u32).to_le_bytes());
        murmur3_32(&data, seed ^ SOURCE_HASH_TWEAK)
    }

    #[test]
    fn source_hash_is_murmur3_of_the_masked_address() {
        let v4 = [192, 168, 37, 201, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let v6 = [
            0x20, 0x01, 0x0d, 0xb8, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x0f, 0xed,
            0xcb, 0xa9,
        ];
        let (f4, f6) = (crate::FAMILY_V4, crate::FAMILY_V6);
        for seed in [7, FLOW_HASH_SEED, u32::MAX] {
            for prefix in [1u8, 8, 13, 24, 31, 32] {
                assert_eq!(
                    source_hash(&crate::addr_words(v4), f4, prefix, seed),
                    source_hash_reference(v4, f4, prefix as u32, seed),
                    "IPv4 /{prefix}, seed {seed:#x}"
                );
            }
            for prefix in [1u8, 31, 32, 33, 63, 64, 65, 100, 127, 128] {
                assert_eq!(
                    source_hash(&crate::addr_words(v6), f6, prefix, seed),
                    source_hash_reference(v6, f6, prefix as u32, seed),
                    "IPv6 /{prefix}, seed {seed:#x}"
                );
            }
            // 0 = the whole address.
            assert_eq!(
                source_hash(&crate::addr_words(v4), f4, 0, seed),
                source_hash_reference(v4, f4, 32, seed)
            );
            assert_eq!(
                source_hash(&crate::addr_words(v6), f6, 0, seed),
                source_hash_reference(v6, f6, 128, seed)
            );
        }
    }

    #[test]
    fn source_hash_of_ipv4_reads_only_its_address() {
        // A prefix longer than the family's addresses means the whole address, and the words
        // an IPv4 address does not use are ignored whatever they hold.
        let clean = [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut dirty = clean;
        dirty[4..].fill(0xff);
        let v4 = crate::FAMILY_V4;
        for prefix in [0u8, 24, 32, 33, 40, 64, 128, 255] {
            let bits = if prefix == 0 || prefix > 32 {
                32
            } else {
                prefix
            };
            let want = source_hash(&crate::addr_words(clean), v4, bits, 7);
            assert_eq!(
                source_hash(&crate::addr_words(dirty), v4, prefix, 7),
                want,
                "/{prefix}"
            );
            assert_eq!(source_hash(&crate::addr_words(clean), v4, prefix, 7), want);
        }
        let v6 = crate::addr_words([0x20, 1, 0xd, 0xb8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let f6 = crate::FAMILY_V6;
        assert_eq!(source_hash(&v6, f6, 200, 7), source_hash(&v6, f6, 128, 7));
    }

    #[test]
    fn source_hash_ignores_host_bits_beyond_the_prefix() {
        let a = crate::addr_words([10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let b = crate::addr_words([10, 1, 2, 200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let c = crate::addr_words([10, 1, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let v4 = crate::FAMILY_V4;
        assert_eq!(source_hash(&a, v4, 24, 7), source_hash(&b, v4, 24, 7));
        assert_ne!(source_hash(&a, v4, 24, 7), source_hash(&c, v4, 24, 7));
        assert_ne!(source_hash(&a, v4, 0, 7), source_hash(&b, v4, 0, 7));
        assert_eq!(source_hash(&a, v4, 0, 7), source_hash(&a, v4, 32, 7));
        let x = crate::addr_words([0x20, 1, 0xd, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
        let y = crate::addr_words([0x20, 1, 0xd, 0xb8, 0, 0, 0, 1, 0xff, 0, 0, 0, 0, 0, 0, 2]);
        let v6 = crate::FAMILY_V6;
        assert_eq!(source_hash(&x, v6, 64, 7), source_hash(&y, v6, 64, 7));
        assert_ne!(source_hash(&x, v6, 72, 7), source_hash(&y, v6, 72, 7));
    }
}
