//! Incremental Internet checksum update (RFC 1624, equation 3: HC' = ~(~HC + ~m + m')).
//!
//! The ones' complement sum is independent of byte order (RFC 1071 §2(B)), so callers may load
//! the checksum field and the 16-bit words in host order, as long as they do so consistently and
//! store the result the same way.

/// An incremental checksum update in progress: start from the old checksum, feed every 16-bit
/// word that changes (old and new value), then `finish`.
#[derive(Clone, Copy, Debug)]
pub struct CsumUpdate {
    acc: u32,
}

impl CsumUpdate {
    /// Starts from the checksum field's current value.
    #[inline(always)]
    pub fn new(old_csum: u16) -> Self {
        CsumUpdate {
            acc: (!old_csum) as u32,
        }
    }

    /// Collects changes without a checksum yet, to be applied with `rebase` (for fields that
    /// two checksums cover, like an IPv4 address in the IP header and the L4 pseudo-header).
    #[inline(always)]
    pub fn delta() -> Self {
        CsumUpdate { acc: 0 }
    }

    /// The changes collected so far, applied to the checksum field `old_csum`.
    #[inline(always)]
    pub fn rebase(self, old_csum: u16) -> Self {
        CsumUpdate {
            acc: self.acc + (!old_csum) as u32,
        }
    }

    /// Both sets of changes (of two `delta`s).
    #[inline(always)]
    pub fn merge(self, other: Self) -> Self {
        CsumUpdate {
            acc: self.acc + other.acc,
        }
    }

    /// The changes collected by a `delta` as a ones' complement sum (unfolded): what the
    /// kernel's `bpf_l4_csum_replace` takes as a difference.
    #[inline(always)]
    pub fn sum(self) -> u32 {
        self.acc
    }

    /// One 16-bit word changes from `old` to `new`.
    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        self.acc += (!old) as u32 + new as u32;
    }

    /// A 32-bit word (two 16-bit words, loaded in host order) changes.
    #[inline(always)]
    pub fn word32(&mut self, old: u32, new: u32) {
        self.word(old as u16, new as u16);
        self.word((old >> 16) as u16, (new >> 16) as u16);
    }

    /// An address stored as four 32-bit words changes (IPv6; IPv4 uses `word32`).
    #[inline(always)]
    pub fn addr(&mut self, old: &[u32; 4], new: &[u32; 4]) {
        self.word32(old[0], new[0]);
        self.word32(old[1], new[1]);
        self.word32(old[2], new[2]);
        self.word32(old[3], new[3]);
    }

    /// The new checksum value. At most 20 words can have been fed before this without the
    /// 32-bit accumulator needing more than two folds.
    #[inline(always)]
    pub fn finish(self) -> u16 {
        let mut s = self.acc;
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }
}

/// The full Internet checksum of `data` (for tests and userspace; the data plane only updates).
pub fn checksum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    let (chunks, tail) = data.as_chunks::<2>();
    for c in chunks {
        s += u16::from_be_bytes(*c) as u32;
    }
    if let [b] = tail {
        s += (*b as u32) << 8;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_csum(buf: &mut [u8], at: usize) {
        buf[at] = 0;
        buf[at + 1] = 0;
        let c = checksum(buf);
        buf[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn checksum_matches_known_answers() {
        // RFC 1071, section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded); the
        // checksum is its complement.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        // An IPv4 header (192.168.0.1 → 192.168.0.199, UDP, TTL 64) whose checksum field is
        // b861, as captured on the wire.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(checksum(&h), 0);
        // An odd length pads with a zero byte.
        assert_eq!(checksum(&[0x01]), !0x0100);
        assert_eq!(checksum(&[]), 0xffff);
    }

    #[test]
    fn incremental_update_equals_recomputation() {
        // A pseudo-random buffer whose bytes 8..24 (an "address") and 24..26 (a "port") change.
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..10_000 {
            let mut buf = [0u8; 40];
            for b in buf.iter_mut() {
                *b = next() as u8;
            }
            set_csum(&mut buf, 2);
            assert_eq!(checksum(&buf), 0);
            let old_addr = crate::addr_words(buf[8..24].try_into().unwrap());
            let old_port = u16::from_ne_bytes([buf[24], buf[25]]);
            let new_addr = [next(), next(), next(), next()];
            let new_port = next() as u16;
            let mut d = CsumUpdate::delta();
            d.addr(&old_addr, &new_addr);
            let mut u = d.rebase(u16::from_ne_bytes([buf[2], buf[3]]));
            u.word(old_port, new_port);
            buf[8..24].copy_from_slice(&crate::addr_octets(new_addr));
            buf[24..26].copy_from_slice(&new_port.to_ne_bytes());
            buf[2..4].copy_from_slice(&u.finish().to_ne_bytes());
            assert_eq!(checksum(&buf), 0, "checksum invalid after update: {buf:?}");
        }
    }
}
