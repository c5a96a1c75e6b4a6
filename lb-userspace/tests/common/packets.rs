//! Packets built with etherparse: a small description → wire bytes.

use std::net::{IpAddr, SocketAddr};

use etherparse::{IpHeaders, IpNumber, Ipv4Header, Ipv4Options, PacketBuilder};

pub type Mac = [u8; 6];

/// TCP flags of a test packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tcp {
    Syn,
    Ack,
    SynAck,
    /// FIN with ACK.
    Fin,
    /// RST alone (no ACK), as a stack answers a segment without a connection.
    Rst,
    /// RST with ACK.
    RstAck,
}

/// What a test packet is.
#[derive(Clone, Debug)]
pub struct Spec {
    pub smac: Mac,
    pub dmac: Mac,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `Some` for TCP with these flags, `None` for UDP.
    pub tcp: Option<Tcp>,
    pub payload: Vec<u8>,
    /// IPv4 options (multiple of 4 bytes, at most 40).
    pub ipv4_options: Vec<u8>,
    /// IPv4 TTL / IPv6 hop limit.
    pub ttl: u8,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP acknowledgment number (sent with the flags that carry ACK).
    pub ack: u32,
}

/// The sequence and acknowledgment numbers `Spec::tcp` gives a packet.
pub const SEQ: u32 = 0x1000_0000;
pub const ACK: u32 = 0x2000_0000;

impl Spec {
    pub fn tcp(smac: Mac, dmac: Mac, src: SocketAddr, dst: SocketAddr, flags: Tcp) -> Spec {
        Spec {
            smac,
            dmac,
            src,
            dst,
            tcp: Some(flags),
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            ipv4_options: vec![],
            ttl: 64,
            seq: SEQ,
            ack: ACK,
        }
    }

    pub fn udp(smac: Mac, dmac: Mac, src: SocketAddr, dst: SocketAddr) -> Spec {
        Spec {
            tcp: None,
            payload: b"ping over udp".to_vec(),
            ..Spec::tcp(smac, dmac, src, dst, Tcp::Syn)
        }
    }

    /// The same packet with other endpoints and MACs.
    pub fn with(&self, smac: Mac, dmac: Mac, src: SocketAddr, dst: SocketAddr) -> Spec {
        Spec {
            smac,
            dmac,
            src,
            dst,
            ..self.clone()
        }
    }

    /// The same packet with this TTL / hop limit.
    pub fn ttl(&self, ttl: u8) -> Spec {
        Spec {
            ttl,
            ..self.clone()
        }
    }

    /// The same packet one hop later (TTL / hop limit one less), as a router forwards it.
    pub fn hop(&self) -> Spec {
        self.ttl(self.ttl - 1)
    }

    /// The same packet with these TCP sequence and acknowledgment numbers.
    pub fn seq_ack(&self, seq: u32, ack: u32) -> Spec {
        Spec {
            seq,
            ack,
            ..self.clone()
        }
    }

    /// Wire bytes, with every checksum computed.
    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.smac, self.dmac);
        let ip = match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h =
                    Ipv4Header::new(0, self.ttl, IpNumber::TCP, s.octets(), d.octets()).unwrap();
                h.identification = 0x4c42;
                h.dont_fragment = true;
                h.options = Ipv4Options::try_from(&self.ipv4_options[..]).unwrap();
                eth.ip(IpHeaders::Ipv4(h, Default::default()))
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), self.ttl),
            _ => panic!("mixed address families"),
        };
        let mut out = Vec::new();
        match self.tcp {
            Some(flags) => {
                let b = ip.tcp(self.src.port(), self.dst.port(), self.seq, 64240);
                let b = match flags {
                    Tcp::Syn => b.syn(),
                    Tcp::Ack => b.ack(self.ack),
                    Tcp::SynAck => b.syn().ack(self.ack),
                    Tcp::Fin => b.fin().ack(self.ack),
                    Tcp::Rst => b.rst(),
                    Tcp::RstAck => b.rst().ack(self.ack),
                };
                b.write(&mut out, &self.payload).unwrap();
            }
            None => ip
                .udp(self.src.port(), self.dst.port())
                .write(&mut out, &self.payload)
                .unwrap(),
        }
        out
    }
}

/// Checks every checksum of a frame: IPv4 header, TCP/UDP (with pseudo-header). Returns a
/// description of the first problem.
pub fn checksums_ok(frame: &[u8]) -> Result<(), String> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).map_err(|e| format!("does not parse: {e}"))?;
    match (&p.net, &p.transport) {
        (Some(NetSlice::Ipv4(ip)), t) => {
            let h = ip.header().to_header();
            if h.calc_header_checksum() != h.header_checksum {
                return Err("IPv4 header checksum".into());
            }
            let (src, dst) = (ip.header().source(), ip.header().destination());
            match t {
                Some(TransportSlice::Tcp(tcp)) => {
                    let want = tcp
                        .to_header()
                        .calc_checksum_ipv4_raw(src, dst, tcp.payload())
                        .unwrap();
                    (want == tcp.checksum())
                        .then_some(())
                        .ok_or("TCP checksum".into())
                }
                Some(TransportSlice::Udp(udp)) => {
                    if udp.checksum() == 0 {
                        return Ok(());
                    }
                    let want = udp
                        .to_header()
                        .calc_checksum_ipv4_raw(src, dst, udp.payload())
                        .unwrap();
                    (want == udp.checksum())
                        .then_some(())
                        .ok_or("UDP checksum".into())
                }
                _ => Err("no TCP/UDP header".into()),
            }
        }
        (Some(NetSlice::Ipv6(ip)), t) => {
            let (src, dst) = (ip.header().source(), ip.header().destination());
            match t {
                Some(TransportSlice::Tcp(tcp)) => {
                    let want = tcp
                        .to_header()
                        .calc_checksum_ipv6_raw(src, dst, tcp.payload())
                        .unwrap();
                    (want == tcp.checksum())
                        .then_some(())
                        .ok_or("TCP checksum".into())
                }
                Some(TransportSlice::Udp(udp)) => {
                    let want = udp
                        .to_header()
                        .calc_checksum_ipv6_raw(src, dst, udp.payload())
                        .unwrap();
                    (want == udp.checksum())
                        .then_some(())
                        .ok_or("UDP checksum".into())
                }
                _ => Err("no TCP/UDP header".into()),
            }
        }
        _ => Err("not IP".into()),
    }
}

/// (src, dst, proto is UDP) of a frame that parses as IP + TCP/UDP.
pub fn endpoints(f: &[u8]) -> Option<(SocketAddr, SocketAddr, bool)> {
    let p = etherparse::SlicedPacket::from_ethernet(f).ok()?;
    let (s, d): (IpAddr, IpAddr) = match p.net? {
        etherparse::NetSlice::Ipv4(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        etherparse::NetSlice::Ipv6(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => return None,
    };
    match p.transport? {
        etherparse::TransportSlice::Tcp(t) => Some((
            SocketAddr::new(s, t.source_port()),
            SocketAddr::new(d, t.destination_port()),
            false,
        )),
        etherparse::TransportSlice::Udp(u) => Some((
            SocketAddr::new(s, u.source_port()),
            SocketAddr::new(d, u.destination_port()),
            true,
        )),
        _ => None,
    }
}

/// 802.1Q / 802.1ad tag protocol identifiers.
pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

/// `f` with VLAN tags (TPID, VLAN id) inserted after its MACs, outermost first.
pub fn tag(f: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut out = f[..12].to_vec();
    for (tpid, vid) in tags {
        out.extend(tpid.to_be_bytes());
        out.extend((vid & 0x0fff).to_be_bytes());
    }
    out.extend(&f[12..]);
    out
}

/// The VLAN tags lb reads in `f` (up to two, either TPID) as their bytes, and `f` without
/// them. None: `f` ends inside a tag (or the type after it), which lb passes as a malformed
/// Ethernet header.
pub fn untag(f: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut off = 12;
    while off < 12 + 8 {
        if f.len() < off + 2 {
            break;
        }
        let ty = u16::from_be_bytes([f[off], f[off + 1]]);
        if ty != TPID_8021Q && ty != TPID_8021AD {
            break;
        }
        if f.len() < off + 6 {
            return None;
        }
        off += 4;
    }
    let mut plain = f[..12.min(f.len())].to_vec();
    plain.extend(&f[off.min(f.len())..]);
    Some((plain, f[12.min(f.len())..off.min(f.len())].to_vec()))
}
