//! Wire headers with word-sized fields, so that the compiler moves addresses and ports with
//! 16/32-bit loads and stores rather than byte by byte. Multi-byte fields hold the wire bytes
//! (network byte order) read in host order, like every `*_be` field in `lb_common`.
//! (Packet data may be unaligned for these types; x86-64 and arm64 JITs allow that, and the
//! verifier does not enforce alignment on them.)

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type_be: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class, flow label.
    pub vtc_flow_be: u32,
    pub payload_len_be: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
}

/// The first 20 bytes of TCP and the 8 of UDP, as far as lb touches them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub sport_be: u16,
    pub dport_be: u16,
    pub seq: u32,
    pub ack: u32,
    /// Data offset (high 4 bits) and reserved bits.
    pub doff_res: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub sport_be: u16,
    pub dport_be: u16,
    pub len_be: u16,
    pub check: u16,
}

pub const ETH_LEN: usize = core::mem::size_of::<EthHdr>();
pub const IPV4_MIN_LEN: usize = core::mem::size_of::<Ipv4Hdr>();
pub const IPV6_LEN: usize = core::mem::size_of::<Ipv6Hdr>();
pub const TCP_MIN_LEN: usize = core::mem::size_of::<TcpHdr>();
pub const UDP_LEN: usize = core::mem::size_of::<UdpHdr>();

const _: () = assert!(ETH_LEN == 14 && IPV4_MIN_LEN == 20 && IPV6_LEN == 40);
const _: () = assert!(TCP_MIN_LEN == 20 && UDP_LEN == 8);
