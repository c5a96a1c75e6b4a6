//! Frames built byte by byte, for what etherparse does not build: option-less IP headers with
//! chosen fields, ICMP too-big messages and the packets they quote.

use std::net::{IpAddr, SocketAddr};

use lb_common::csum::checksum;

use super::packets::Mac;

pub fn v4(a: SocketAddr) -> [u8; 4] {
    match a.ip() {
        IpAddr::V4(x) => x.octets(),
        _ => panic!("not IPv4: {a}"),
    }
}

pub fn v6(a: SocketAddr) -> [u8; 16] {
    match a.ip() {
        IpAddr::V6(x) => x.octets(),
        _ => panic!("not IPv6: {a}"),
    }
}

pub fn eth(dst: Mac, src: Mac, ether_type: u16) -> Vec<u8> {
    let mut e = Vec::with_capacity(14);
    e.extend_from_slice(&dst);
    e.extend_from_slice(&src);
    e.extend_from_slice(&ether_type.to_be_bytes());
    e
}

/// An option-less IPv4 header with its checksum.
#[allow(clippy::too_many_arguments)]
pub fn ipv4(
    tos: u8,
    total: usize,
    id: u16,
    df: bool,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
) -> Vec<u8> {
    let mut h = vec![0x45, tos];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&(if df { 0x4000u16 } else { 0 }).to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

pub fn ipv6(flow: u32, payload: usize, next: u8, src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    let mut h = ((6u32 << 28) | (flow & 0xf_ffff)).to_be_bytes().to_vec();
    h.extend_from_slice(&(payload as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h
}

/// An ICMPv4 message (type, code, 4 bytes of rest) with its checksum.
pub fn icmp4(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An ICMPv6 message with its checksum (pseudo-header included).
pub fn icmp6(ty: u8, rest: [u8; 4], body: &[u8], src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&(m.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&m);
    let c = checksum(&pseudo);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// The first 28 (IPv4) / 48 (IPv6) bytes of an IP packet a VIP sent to a client: what a router
/// quotes in a too-big message. TCP (seq 0x11223344) or UDP.
pub fn quote(src: SocketAddr, dst: SocketAddr, udp: bool) -> Vec<u8> {
    let proto = if udp { 17 } else { 6 };
    let mut l4 = src.port().to_be_bytes().to_vec();
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&0x1122_3344u32.to_be_bytes());
    let mut q = if src.is_ipv4() {
        ipv4(0, 1500, 7, true, proto, v4(src), v4(dst))
    } else {
        ipv6(0, 1460, proto, v6(src), v6(dst))
    };
    q.extend_from_slice(&l4);
    q
}

/// A too-big message from `router` to `to` about the quoted packet, as a frame.
#[allow(clippy::too_many_arguments)]
pub fn too_big_frame(
    dmac: Mac,
    smac: Mac,
    router: IpAddr,
    to: IpAddr,
    mtu: u32,
    quoted_src: SocketAddr,
    quoted_dst: SocketAddr,
    udp: bool,
) -> Vec<u8> {
    let q = quote(quoted_src, quoted_dst, udp);
    match (router, to) {
        (IpAddr::V4(r), IpAddr::V4(t)) => {
            let m = icmp4(3, 4, [0, 0, (mtu >> 8) as u8, mtu as u8], &q);
            let mut f = eth(dmac, smac, 0x0800);
            f.extend(ipv4(0, 20 + m.len(), 9, false, 1, r.octets(), t.octets()));
            f.extend(m);
            f
        }
        (IpAddr::V6(r), IpAddr::V6(t)) => {
            let m = icmp6(2, mtu.to_be_bytes(), &q, r.octets(), t.octets());
            let mut f = eth(dmac, smac, 0x86dd);
            f.extend(ipv6(0, m.len(), 58, r.octets(), t.octets()));
            f.extend(m);
            f
        }
        _ => panic!("mixed families"),
    }
}
