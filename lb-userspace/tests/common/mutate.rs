//! Changes to built packets, for malformed and unusual cases. Offsets assume Ethernet + IPv4
//! without options (or IPv6 without extension headers).

use lb_common::csum::checksum;

pub const IP: usize = 14;

/// Recomputes the IPv4 header checksum (after a header field was changed).
pub fn fix_ipv4_csum(f: &mut [u8]) {
    let hl = ((f[IP] & 0x0f) as usize) * 4;
    f[IP + 10] = 0;
    f[IP + 11] = 0;
    let c = checksum(&f[IP..IP + hl]);
    f[IP + 10..IP + 12].copy_from_slice(&c.to_be_bytes());
}

/// Sets a 16-bit IPv4 header field (offset within the IP header) and fixes the checksum.
pub fn set_ipv4_u16(f: &mut [u8], off: usize, v: u16) {
    f[IP + off..IP + off + 2].copy_from_slice(&v.to_be_bytes());
    fix_ipv4_csum(f);
}

/// Sets a byte of the IPv4 header and fixes the checksum.
pub fn set_ipv4_u8(f: &mut [u8], off: usize, v: u8) {
    f[IP + off] = v;
    fix_ipv4_csum(f);
}

/// Offset of the L4 header in an IPv4 frame.
pub fn l4_v4(f: &[u8]) -> usize {
    IP + ((f[IP] & 0x0f) as usize) * 4
}
