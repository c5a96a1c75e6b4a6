//! Header parsing: Ethernet → IPv4 (any IHL) or IPv6 → TCP or UDP. Every access is checked
//! against `data_end`; anything that does not parse is passed to the kernel with the counter
//! that names the reason (the kernel applies its own validation and drops what is invalid).

use aya_ebpf::programs::XdpContext;
use lb_common::{Counter, Endpoint, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr};

use crate::Verdict;

pub(crate) const ETH_LEN: usize = core::mem::size_of::<EthHdr>();
pub(crate) const IPV4_MIN_LEN: usize = core::mem::size_of::<Ipv4Hdr>();
pub(crate) const IPV6_LEN: usize = core::mem::size_of::<Ipv6Hdr>();
pub(crate) const TCP_MIN_LEN: usize = 20;
pub(crate) const UDP_LEN: usize = 8;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_FRAGMENT: u8 = 44;

/// A parsed TCP or UDP packet: everything the data plane needs, copied out of the headers.
pub(crate) struct Packet {
    pub family: u8,
    pub proto: u8,
    /// Offset of the TCP/UDP header from the start of the frame.
    pub l4_off: usize,
    /// Source address, network byte order (IPv4 in bytes 0..4).
    pub src: [u8; 16],
    /// Destination address, network byte order.
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// Length of the whole frame, for byte counters.
    pub frame_len: u64,
    /// IP total length (IPv4 total length; IPv6 payload length + 40), host order.
    pub ip_len: u16,
    /// IPv4 TOS byte, or the IPv6 flow label (network byte order), for the route lookup.
    pub tos_or_flow: u32,
}

impl Packet {
    #[inline(always)]
    pub(crate) fn dst_endpoint(&self) -> Endpoint {
        Endpoint {
            addr_be: self.dst,
            port_be: self.dport,
            proto: self.proto,
            family: self.family,
        }
    }

    #[inline(always)]
    pub(crate) fn src_endpoint(&self) -> Endpoint {
        Endpoint {
            addr_be: self.src,
            port_be: self.sport,
            proto: self.proto,
            family: self.family,
        }
    }
}

type ParseResult = Result<Packet, Verdict>;

#[inline(always)]
pub(crate) fn parse(ctx: &XdpContext) -> ParseResult {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_LEN > end {
        return Err(Verdict::pass(Counter::PassMalformedEth));
    }
    // SAFETY: the Ethernet header is within [data, end), checked above.
    let ether_type = u16::from_be(unsafe { (*(data as *const EthHdr)).ether_type });
    match ether_type {
        ETH_P_IP => parse_v4(data, end),
        ETH_P_IPV6 => parse_v6(data, end),
        _ => Err(Verdict::pass(Counter::PassNotIp)),
    }
}

#[inline(always)]
fn parse_v4(data: usize, end: usize) -> ParseResult {
    let ip = data + ETH_LEN;
    if ip + IPV4_MIN_LEN > end {
        return Err(Verdict::pass(Counter::PassMalformedIp));
    }
    // SAFETY: the fixed IPv4 header is within bounds, checked above.
    let h = unsafe { &*(ip as *const Ipv4Hdr) };
    let ihl = (h.vihl & 0x0f) as usize;
    if h.vihl >> 4 != 4 || ihl < 5 {
        return Err(Verdict::pass(Counter::PassMalformedIp));
    }
    let hdr_len = ihl * 4;
    let tot_len = u16::from_be_bytes(h.tot_len) as usize;
    if tot_len < hdr_len || ip + tot_len > end {
        return Err(Verdict::pass(Counter::PassMalformedIp));
    }
    // More-fragments flag or a fragment offset: lb does not reassemble.
    if u16::from_be_bytes(h.frags) & 0x3fff != 0 {
        return Err(Verdict::pass(Counter::PassFragment));
    }
    let proto = h.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Verdict::pass(Counter::PassNotTcpUdp));
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&h.src_addr);
    dst[..4].copy_from_slice(&h.dst_addr);
    let l4_off = ETH_LEN + hdr_len;
    let (sport, dport) = parse_l4(data, end, proto, l4_off, ETH_LEN + tot_len)?;
    Ok(Packet {
        family: FAMILY_V4,
        proto,
        l4_off,
        src,
        dst,
        sport,
        dport,
        frame_len: (end - data) as u64,
        ip_len: tot_len as u16,
        tos_or_flow: h.tos as u32,
    })
}

#[inline(always)]
fn parse_v6(data: usize, end: usize) -> ParseResult {
    let ip = data + ETH_LEN;
    if ip + IPV6_LEN > end {
        return Err(Verdict::pass(Counter::PassMalformedIp));
    }
    // SAFETY: the IPv6 header is within bounds, checked above.
    let h = unsafe { &*(ip as *const Ipv6Hdr) };
    if h.vcf[0] >> 4 != 6 {
        return Err(Verdict::pass(Counter::PassMalformedIp));
    }
    let payload_len = u16::from_be_bytes(h.payload_len) as usize;
    if ip + IPV6_LEN + payload_len > end {
        return Err(Verdict::pass(Counter::PassMalformedIp));
    }
    let proto = h.next_hdr;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Verdict::pass(match proto {
            IPV6_FRAGMENT => Counter::PassFragment,
            // Hop-by-hop, routing, destination options, AH, mobility, HIP, shim6.
            0 | 43 | 60 | 51 | 135 | 139 | 140 => Counter::PassIpv6Ext,
            _ => Counter::PassNotTcpUdp,
        }));
    }
    let l4_off = ETH_LEN + IPV6_LEN;
    let (sport, dport) = parse_l4(data, end, proto, l4_off, l4_off + payload_len)?;
    Ok(Packet {
        family: FAMILY_V6,
        proto,
        l4_off,
        src: h.src_addr,
        dst: h.dst_addr,
        sport,
        dport,
        frame_len: (end - data) as u64,
        ip_len: (IPV6_LEN + payload_len) as u16,
        tos_or_flow: u32::from_ne_bytes([h.vcf[0] & 0x0f, h.vcf[1], h.vcf[2], h.vcf[3]]),
    })
}

/// Checks the TCP/UDP header at `l4_off` (which must end within the IP packet, `ip_end`) and
/// returns the source and destination ports.
#[inline(always)]
fn parse_l4(
    data: usize,
    end: usize,
    proto: u8,
    l4_off: usize,
    ip_end: usize,
) -> Result<([u8; 2], [u8; 2]), Verdict> {
    let l4 = data + l4_off;
    let malformed = Err(Verdict::pass(Counter::PassMalformedL4));
    if proto == PROTO_TCP {
        if l4 + TCP_MIN_LEN > end || l4_off + TCP_MIN_LEN > ip_end {
            return malformed;
        }
        // SAFETY: 20 bytes at l4 are within bounds, checked above.
        let b = unsafe { &*(l4 as *const [u8; TCP_MIN_LEN]) };
        let doff = (b[12] >> 4) as usize;
        if doff < 5 || l4_off + doff * 4 > ip_end {
            return malformed;
        }
        Ok(([b[0], b[1]], [b[2], b[3]]))
    } else {
        if l4 + UDP_LEN > end || l4_off + UDP_LEN > ip_end {
            return malformed;
        }
        // SAFETY: 8 bytes at l4 are within bounds, checked above.
        let b = unsafe { &*(l4 as *const [u8; UDP_LEN]) };
        let len = u16::from_be_bytes([b[4], b[5]]) as usize;
        if len < UDP_LEN || l4_off + len > ip_end {
            return malformed;
        }
        Ok(([b[0], b[1]], [b[2], b[3]]))
    }
}
