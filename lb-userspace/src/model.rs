//! The user-facing vocabulary: VIPs and backends as people write them
//! (`10.100.0.100:80/tcp`, `[2001:db8::100]:80/udp`, `10.200.0.11:8080`), and their
//! conversion to the data plane's `Endpoint`.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use lb_common::{Endpoint, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

/// An L4 protocol lb balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    /// From an IANA protocol number.
    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(ParseError(format!(
                "unknown protocol {s:?} (expected tcp or udp)"
            ))),
        }
    }
}

/// How packets reach a VIP's backends (ipvsadm's `-m` / `-g` / `-i`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Forward {
    /// Destination address and port rewritten; replies come back through lb.
    #[default]
    Nat,
    /// Only the destination MAC rewritten (backends on the same L2 segment hold the VIP).
    DsrL2,
    /// Encapsulated in IP to the backend, which decapsulates and answers directly.
    Ipip,
}

impl Forward {
    pub fn code(self) -> u8 {
        match self {
            Forward::Nat => lb_common::FWD_NAT,
            Forward::DsrL2 => lb_common::FWD_DSR_L2,
            Forward::Ipip => lb_common::FWD_IPIP,
        }
    }

    pub fn from_code(c: u8) -> Forward {
        match c {
            lb_common::FWD_DSR_L2 => Forward::DsrL2,
            lb_common::FWD_IPIP => Forward::Ipip,
            _ => Forward::Nat,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Forward::Nat => "nat",
            Forward::DsrL2 => "dsr-l2",
            Forward::Ipip => "ipip",
        }
    }

    pub fn parse(s: &str) -> Result<Forward, ParseError> {
        match s.to_ascii_lowercase().as_str() {
            "nat" | "masq" => Ok(Forward::Nat),
            "dsr-l2" | "dr" | "dsr" => Ok(Forward::DsrL2),
            "ipip" | "tun" => Ok(Forward::Ipip),
            _ => Err(ParseError(format!(
                "unknown forwarding mode {s:?} (expected nat, dsr-l2 or ipip)"
            ))),
        }
    }

    /// Whether `backend` can serve `vip` in this mode: NAT and dsr-l2 keep the address family
    /// (ipip also carries IPv4 in IPv6); the DSR modes do not change the port, so the backend
    /// listens on the VIP's.
    pub fn check_backend(self, vip: &Vip, backend: SocketAddr) -> Result<(), crate::LbError> {
        let families_ok = match self {
            Forward::Nat | Forward::DsrL2 => backend.is_ipv4() == vip.addr.is_ipv4(),
            Forward::Ipip => vip.addr.is_ipv4() || backend.is_ipv6(),
        };
        if !families_ok {
            return Err(crate::LbError::FamilyMismatch {
                vip: *vip,
                backend,
                mode: self,
            });
        }
        if self != Forward::Nat && backend.port() != vip.addr.port() {
            return Err(crate::LbError::DsrPort {
                vip: *vip,
                backend,
                mode: self,
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a VIP's new flows pick their backend (ipvsadm's `-s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Algorithm {
    /// Weighted consistent hash of the 5-tuple (Maglev): every gateway picks the same backend.
    #[default]
    Maglev,
    /// A random backend, with probability W(i)/ΣW.
    Random,
    /// Smooth weighted round robin, per CPU.
    RoundRobin,
    /// Consistent hash of the client address, or of its first `prefix_len` bits (0 = all).
    SourceHash { prefix_len: u8 },
    /// Fewest active flows relative to weight (of two random weighted candidates); TCP only.
    LeastConn,
}

impl Algorithm {
    /// The data plane's code (`lb_common::ALGO_*`) and source prefix length.
    pub fn codes(self) -> (u8, u8) {
        match self {
            Algorithm::Maglev => (lb_common::ALGO_MAGLEV, 0),
            Algorithm::Random => (lb_common::ALGO_RANDOM, 0),
            Algorithm::RoundRobin => (lb_common::ALGO_ROUND_ROBIN, 0),
            Algorithm::SourceHash { prefix_len } => (lb_common::ALGO_SOURCE_HASH, prefix_len),
            Algorithm::LeastConn => (lb_common::ALGO_LEAST_CONN, 0),
        }
    }

    pub fn from_codes(algo: u8, prefix_len: u8) -> Algorithm {
        match algo {
            lb_common::ALGO_RANDOM => Algorithm::Random,
            lb_common::ALGO_ROUND_ROBIN => Algorithm::RoundRobin,
            lb_common::ALGO_SOURCE_HASH => Algorithm::SourceHash { prefix_len },
            lb_common::ALGO_LEAST_CONN => Algorithm::LeastConn,
            _ => Algorithm::Maglev,
        }
    }

    /// The name, as `--algo` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Maglev => "maglev",
            Algorithm::Random => "random",
            Algorithm::RoundRobin => "round-robin",
            Algorithm::SourceHash { .. } => "source-hash",
            Algorithm::LeastConn => "least-conn",
        }
    }

    /// Whether this algorithm can serve `vip`: least-conn needs TCP (flows must have a visible
    /// end); a source prefix must fit the VIP's address family.
    pub fn check_for(self, vip: &Vip) -> Result<(), crate::LbError> {
        if self == Algorithm::LeastConn && vip.proto != Proto::Tcp {
            return Err(crate::LbError::LeastConnNeedsTcp(*vip));
        }
        let (_, prefix) = self.codes();
        let max = if vip.addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(crate::LbError::SourcePrefixTooLong {
                prefix,
                family: if vip.addr.is_ipv4() { 4 } else { 6 },
            });
        }
        Ok(())
    }

    /// Builds one from its name and an optional source prefix, which only source-hash takes.
    pub fn parse(name: &str, source_prefix: Option<u8>) -> Result<Algorithm, ParseError> {
        let a = match name.to_ascii_lowercase().as_str() {
            "maglev" | "mh" => Algorithm::Maglev,
            "random" => Algorithm::Random,
            "round-robin" | "rr" | "wrr" => Algorithm::RoundRobin,
            "source-hash" | "sh" => Algorithm::SourceHash {
                prefix_len: source_prefix.unwrap_or(0),
            },
            "least-conn" | "lc" | "wlc" => Algorithm::LeastConn,
            _ => {
                return Err(ParseError(format!(
                    "unknown algorithm {name:?} (expected maglev, random, round-robin, source-hash or least-conn)"
                )))
            }
        };
        if source_prefix.is_some() && !matches!(a, Algorithm::SourceHash { .. }) {
            return Err(ParseError(format!(
                "a source prefix applies only to source-hash, not to {}",
                a.name()
            )));
        }
        Ok(a)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Algorithm::SourceHash { prefix_len } if *prefix_len > 0 => {
                write!(f, "source-hash/{prefix_len}")
            }
            a => f.write_str(a.name()),
        }
    }
}

/// Why a VIP or backend string did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// A virtual service: address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vip {
    pub addr: SocketAddr,
    pub proto: Proto,
}

impl Vip {
    pub fn new(addr: SocketAddr, proto: Proto) -> Self {
        Vip { addr, proto }
    }

    /// The data plane's key for this VIP.
    pub fn endpoint(&self) -> Endpoint {
        endpoint(self.addr, self.proto)
    }

    /// The VIP a data plane key stands for (None for a malformed key).
    pub fn from_endpoint(e: &Endpoint) -> Option<Vip> {
        Some(Vip {
            addr: socket_addr(e.family, e.addr_be, e.port_be)?,
            proto: Proto::from_number(e.proto)?,
        })
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

impl FromStr for Vip {
    type Err = ParseError;
    /// `ADDR:PORT/PROTO`, IPv6 in brackets: `10.0.0.1:80/tcp`, `[2001:db8::1]:53/udp`.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (addr, proto) = s.rsplit_once('/').ok_or_else(|| {
            ParseError(format!(
                "invalid VIP {s:?}: expected ADDRESS:PORT/PROTOCOL, e.g. 10.0.0.1:80/tcp or [2001:db8::1]:80/tcp"
            ))
        })?;
        let addr = parse_socket_addr(addr, "VIP")?;
        let proto = proto.parse()?;
        Ok(Vip { addr, proto })
    }
}

/// Parses `ADDR:PORT` (IPv6 in brackets), rejecting port 0 and unspecified/multicast addresses.
pub fn parse_socket_addr(s: &str, what: &str) -> Result<SocketAddr, ParseError> {
    let a: SocketAddr = s.parse().map_err(|_| {
        ParseError(format!(
            "invalid {what} address {s:?}: expected ADDRESS:PORT, IPv6 in brackets ([2001:db8::1]:80)"
        ))
    })?;
    if a.port() == 0 {
        return Err(ParseError(format!("invalid {what} address {s:?}: port 0")));
    }
    if let SocketAddr::V6(v6) = a {
        if v6.scope_id() != 0 || v6.flowinfo() != 0 {
            return Err(ParseError(format!(
                "invalid {what} address {s:?}: IPv6 scope ids (%…) are not supported"
            )));
        }
    }
    if a.ip().is_unspecified() || a.ip().is_multicast() {
        return Err(ParseError(format!(
            "invalid {what} address {s:?}: {} cannot be a {what} address",
            a.ip()
        )));
    }
    if let IpAddr::V4(v4) = a.ip() {
        if v4.is_broadcast() {
            return Err(ParseError(format!(
                "invalid {what} address {s:?}: broadcast"
            )));
        }
    }
    Ok(a)
}

/// The data plane's endpoint for an address, port and protocol.
pub fn endpoint(addr: SocketAddr, proto: Proto) -> Endpoint {
    let (addr_be, family) = addr_words(addr.ip());
    Endpoint {
        addr_be,
        port_be: addr.port().to_be(),
        proto: proto.number(),
        family,
    }
}

/// The conntrack key / hash input of a client → VIP flow.
pub fn flow_key(client: SocketAddr, vip: &Vip) -> lb_common::FlowKey {
    let (src_be, family) = addr_words(client.ip());
    let (dst_be, _) = addr_words(vip.addr.ip());
    lb_common::FlowKey {
        src_be,
        dst_be,
        sport_be: client.port().to_be(),
        dport_be: vip.addr.port().to_be(),
        proto: vip.proto.number(),
        family,
        _pad: 0,
    }
}

/// An address as the data plane stores it (network order words, IPv4 in word 0) and its
/// family tag.
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => (lb_common::addr_words(v6.octets()), FAMILY_V6),
    }
}

/// The socket address for a data-plane address, family tag and port (network order).
pub fn socket_addr(family: u8, addr_be: [u32; 4], port_be: u16) -> Option<SocketAddr> {
    let ip = match family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(addr_be[0].to_ne_bytes())),
        FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(lb_common::addr_octets(addr_be))),
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::from_be(port_be)))
}

/// The flow states whose timeouts can be set (`--timeout STATE=SECONDS`, `[vip.timeouts]`).
pub const TIMEOUT_STATES: [&str; 5] = ["opening", "established", "closing", "closed", "udp"];

/// Longest flow timeout: 7 days (0 means never).
pub const MAX_TIMEOUT_S: u32 = 7 * 24 * 3600;

/// The timeouts by state name, in `TIMEOUT_STATES` order.
pub fn timeout_values(t: &lb_common::Timeouts) -> [(&'static str, u32); 5] {
    [
        ("opening", t.opening_s),
        ("established", t.established_s),
        ("closing", t.closing_s),
        ("closed", t.closed_s),
        ("udp", t.udp_s),
    ]
}

/// The field of `t` for a state name (None for an unknown name).
pub fn timeout_field<'a>(t: &'a mut lb_common::Timeouts, state: &str) -> Option<&'a mut u32> {
    Some(match state {
        "opening" => &mut t.opening_s,
        "established" => &mut t.established_s,
        "closing" => &mut t.closing_s,
        "closed" => &mut t.closed_s,
        "udp" => &mut t.udp_s,
        _ => return None,
    })
}

/// Checks one timeout: a known state and at most `MAX_TIMEOUT_S` seconds.
pub fn check_timeout(state: &str, seconds: u64) -> Result<u32, ParseError> {
    if !TIMEOUT_STATES.contains(&state) {
        return Err(ParseError(format!(
            "unknown flow state {state:?} in a timeout (expected {})",
            TIMEOUT_STATES.join(", ")
        )));
    }
    if seconds > MAX_TIMEOUT_S as u64 {
        return Err(ParseError(format!(
            "timeout {state}={seconds} is too long: at most {MAX_TIMEOUT_S} seconds (7 days; 0 = never expires)"
        )));
    }
    Ok(seconds as u32)
}

/// Applies `STATE=SECONDS` settings (`--timeout`, repeatable) to `base`.
pub fn parse_timeouts(
    args: &[String],
    mut base: lb_common::Timeouts,
) -> Result<lb_common::Timeouts, ParseError> {
    for a in args {
        let Some((state, secs)) = a.split_once('=') else {
            return Err(ParseError(format!(
                "invalid timeout {a:?}: expected STATE=SECONDS, e.g. established=3600 (states: {})",
                TIMEOUT_STATES.join(", ")
            )));
        };
        let state = state.trim().to_ascii_lowercase();
        let secs = secs.trim();
        let n: u64 = secs.parse().map_err(|_| {
            ParseError(format!(
                "invalid timeout {a:?}: {secs:?} is not a number of seconds for state {state}"
            ))
        })?;
        let n = check_timeout(&state, n)?;
        *timeout_field(&mut base, &state).expect("checked state") = n;
    }
    Ok(base)
}

/// Parses a hash seed: 32-bit hexadecimal, with or without `0x` (`0x1a2b3c4d`, `1a2b3c4d`).
/// 0 is refused: it is what an unset seed looks like.
pub fn parse_hash_seed(s: &str) -> Result<u32, ParseError> {
    let t = s.trim();
    let hex = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t)
        .replace('_', "");
    let bad = || {
        ParseError(format!(
            "invalid hash seed {s:?}: expected up to 8 hexadecimal digits, e.g. 0x1a2b3c4d"
        ))
    };
    if hex.is_empty() || hex.len() > 8 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let v = u32::from_str_radix(&hex, 16).map_err(|_| bad())?;
    if v == 0 {
        return Err(ParseError(format!(
            "invalid hash seed {s:?}: 0 is not allowed (choose a random value, or leave the seed out to have one generated)"
        )));
    }
    Ok(v)
}

/// A hash seed as `parse_hash_seed` reads it.
pub fn format_hash_seed(seed: u32) -> String {
    format!("0x{seed:08x}")
}

/// A random, nonzero hash seed from the kernel's random source.
pub fn random_hash_seed() -> std::io::Result<u32> {
    use std::io::Read;
    let mut f = std::fs::File::open("/dev/urandom")?;
    loop {
        let mut b = [0u8; 4];
        f.read_exact(&mut b)?;
        let v = u32::from_ne_bytes(b);
        if v != 0 {
            return Ok(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_with_clear_errors() {
        let d = lb_common::Timeouts::DEFAULT;
        let t = parse_timeouts(
            &[
                "established=7200".into(),
                "UDP=0".into(),
                "closed = 5".into(),
            ],
            d,
        )
        .unwrap();
        assert_eq!(t.established_s, 7200);
        assert_eq!(t.udp_s, 0);
        assert_eq!(t.closed_s, 5);
        assert_eq!(t.opening_s, d.opening_s);
        assert_eq!(parse_timeouts(&[], d).unwrap(), d);
        for (arg, needles) in [
            (
                "established=abc",
                &["\"abc\"", "established", "not a number"][..],
            ),
            ("established=-1", &["not a number"][..]),
            (
                "synsent=10",
                &["unknown flow state \"synsent\"", "opening"][..],
            ),
            ("established", &["expected STATE=SECONDS"][..]),
            ("udp=604801", &["too long", "604800"][..]),
            ("udp=99999999999999999999", &["not a number"][..]),
        ] {
            let e = parse_timeouts(&[arg.to_string()], d).unwrap_err();
            for n in needles {
                assert!(e.0.contains(n), "{arg}: {e}");
            }
        }
        assert_eq!(
            parse_timeouts(&["udp=604800".into()], d).unwrap().udp_s,
            MAX_TIMEOUT_S
        );
    }

    #[test]
    fn hash_seeds_parse() {
        assert_eq!(parse_hash_seed("0x1a2b3c4d").unwrap(), 0x1a2b_3c4d);
        assert_eq!(parse_hash_seed("1A2B3C4D").unwrap(), 0x1a2b_3c4d);
        assert_eq!(parse_hash_seed("0x1").unwrap(), 1);
        assert_eq!(parse_hash_seed(&format_hash_seed(0xdead)).unwrap(), 0xdead);
        assert_eq!(format_hash_seed(0xdead), "0x0000dead");
        for bad in [
            "",
            "0x",
            "0x123456789",
            "xyz",
            "0x1g",
            "-1",
            "0",
            "0x00000000",
        ] {
            assert!(parse_hash_seed(bad).is_err(), "{bad:?}");
        }
        assert!(parse_hash_seed("0")
            .unwrap_err()
            .0
            .contains("0 is not allowed"));
        assert_ne!(random_hash_seed().unwrap(), 0);
    }

    #[test]
    fn vips_parse_and_print() {
        let v: Vip = "10.100.0.100:80/tcp".parse().unwrap();
        assert_eq!(v.to_string(), "10.100.0.100:80/tcp");
        let v6: Vip = "[2001:db8::100]:53/UDP".parse().unwrap();
        assert_eq!(v6.to_string(), "[2001:db8::100]:53/udp");
        assert_eq!(Vip::from_endpoint(&v6.endpoint()), Some(v6));
        assert_eq!(v.endpoint().port_be.to_ne_bytes(), [0, 80]);
        assert_eq!(v.endpoint().addr_be[0].to_ne_bytes(), [10, 100, 0, 100]);
        assert_eq!(&v.endpoint().addr_be[1..], &[0, 0, 0]);
    }

    #[test]
    fn bad_vips_are_rejected_with_the_reason() {
        for (s, needle) in [
            ("10.0.0.1:80", "expected ADDRESS:PORT/PROTOCOL"),
            ("10.0.0.1:80/icmp", "unknown protocol"),
            ("10.0.0.300:80/tcp", "invalid VIP address"),
            ("10.0.0.1/tcp", "invalid VIP address"),
            ("10.0.0.1:0/tcp", "port 0"),
            ("10.0.0.1:65536/tcp", "invalid VIP address"),
            ("0.0.0.0:80/tcp", "cannot be a VIP"),
            ("2001:db8::1:80/tcp", "invalid VIP address"),
            ("[fe80::1%1]:80/tcp", "scope ids"),
        ] {
            let e = s.parse::<Vip>().unwrap_err();
            assert!(e.0.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn forwarding_modes_round_trip_through_codes_and_names() {
        for (f, code, name) in [
            (Forward::Nat, 0, "nat"),
            (Forward::DsrL2, 1, "dsr-l2"),
            (Forward::Ipip, 2, "ipip"),
        ] {
            assert_eq!(f.code(), code);
            assert_eq!(Forward::from_code(code), f);
            assert_eq!(f.name(), name);
            assert_eq!(f.to_string(), name);
            assert_eq!(Forward::parse(name), Ok(f));
            assert_eq!(Forward::parse(&name.to_uppercase()), Ok(f));
        }
        // ipvsadm's names too.
        for (alias, f) in [
            ("masq", Forward::Nat),
            ("dr", Forward::DsrL2),
            ("dsr", Forward::DsrL2),
            ("tun", Forward::Ipip),
        ] {
            assert_eq!(Forward::parse(alias), Ok(f), "{alias}");
        }
        // A code this version does not know reads as NAT.
        assert_eq!(Forward::from_code(9), Forward::Nat);
        assert_eq!(
            Forward::parse("gre").unwrap_err().0,
            "unknown forwarding mode \"gre\" (expected nat, dsr-l2 or ipip)"
        );
    }

    #[test]
    fn backends_must_suit_the_forwarding_mode() {
        use crate::LbError::{DsrPort, FamilyMismatch};
        let v4: Vip = "10.0.0.1:80/tcp".parse().unwrap();
        let v6: Vip = "[2001:db8::1]:80/tcp".parse().unwrap();
        let check = |f: Forward, vip: &Vip, b: &str| f.check_backend(vip, b.parse().unwrap());
        // NAT: the VIP's family, any port.
        assert!(check(Forward::Nat, &v4, "10.0.0.2:8080").is_ok());
        assert!(check(Forward::Nat, &v6, "[2001:db8::2]:8080").is_ok());
        assert!(matches!(
            check(Forward::Nat, &v4, "[2001:db8::2]:80"),
            Err(FamilyMismatch { .. })
        ));
        assert!(matches!(
            check(Forward::Nat, &v6, "10.0.0.2:80"),
            Err(FamilyMismatch { .. })
        ));
        // dsr-l2: the VIP's family and port.
        assert!(check(Forward::DsrL2, &v4, "10.0.0.2:80").is_ok());
        assert!(matches!(
            check(Forward::DsrL2, &v4, "10.0.0.2:8080"),
            Err(DsrPort { .. })
        ));
        assert!(matches!(
            check(Forward::DsrL2, &v4, "[2001:db8::2]:80"),
            Err(FamilyMismatch { .. })
        ));
        // ipip: an IPv4 VIP to IPv4 or IPv6 backends, an IPv6 VIP to IPv6 ones; the VIP's port.
        assert!(check(Forward::Ipip, &v4, "10.0.0.2:80").is_ok());
        assert!(check(Forward::Ipip, &v4, "[2001:db8::2]:80").is_ok());
        assert!(check(Forward::Ipip, &v6, "[2001:db8::2]:80").is_ok());
        assert!(matches!(
            check(Forward::Ipip, &v6, "10.0.0.2:80"),
            Err(FamilyMismatch { .. })
        ));
        assert!(matches!(
            check(Forward::Ipip, &v6, "[2001:db8::2]:81"),
            Err(DsrPort { .. })
        ));
    }

    #[test]
    fn algorithms_round_trip_through_codes_and_names() {
        use lb_common::{
            ALGO_LEAST_CONN, ALGO_MAGLEV, ALGO_RANDOM, ALGO_ROUND_ROBIN, ALGO_SOURCE_HASH,
        };
        for (a, codes, name, shown) in [
            (Algorithm::Maglev, (ALGO_MAGLEV, 0), "maglev", "maglev"),
            (Algorithm::Random, (ALGO_RANDOM, 0), "random", "random"),
            (
                Algorithm::RoundRobin,
                (ALGO_ROUND_ROBIN, 0),
                "round-robin",
                "round-robin",
            ),
            (
                Algorithm::SourceHash { prefix_len: 0 },
                (ALGO_SOURCE_HASH, 0),
                "source-hash",
                "source-hash",
            ),
            (
                Algorithm::SourceHash { prefix_len: 24 },
                (ALGO_SOURCE_HASH, 24),
                "source-hash",
                "source-hash/24",
            ),
            (
                Algorithm::LeastConn,
                (ALGO_LEAST_CONN, 0),
                "least-conn",
                "least-conn",
            ),
        ] {
            assert_eq!(a.codes(), codes, "{name}");
            assert_eq!(Algorithm::from_codes(codes.0, codes.1), a, "{name}");
            assert_eq!(a.name(), name);
            assert_eq!(a.to_string(), shown);
        }
        assert_eq!(
            [
                ALGO_MAGLEV,
                ALGO_RANDOM,
                ALGO_ROUND_ROBIN,
                ALGO_SOURCE_HASH,
                ALGO_LEAST_CONN
            ],
            [0, 1, 2, 3, 4]
        );
        // A code this version does not know reads as maglev.
        assert_eq!(Algorithm::from_codes(9, 0), Algorithm::Maglev);
    }

    #[test]
    fn algorithms_parse_with_ipvsadm_names() {
        for (names, a) in [
            (&["maglev", "mh", "Maglev"][..], Algorithm::Maglev),
            (&["random", "RANDOM"][..], Algorithm::Random),
            (&["round-robin", "rr", "wrr"][..], Algorithm::RoundRobin),
            (
                &["source-hash", "sh"][..],
                Algorithm::SourceHash { prefix_len: 0 },
            ),
            (&["least-conn", "lc", "wlc"][..], Algorithm::LeastConn),
        ] {
            for n in names {
                assert_eq!(Algorithm::parse(n, None), Ok(a), "{n}");
            }
        }
        assert_eq!(
            Algorithm::parse("sh", Some(16)),
            Ok(Algorithm::SourceHash { prefix_len: 16 })
        );
        assert_eq!(
            Algorithm::parse("rr", Some(16)).unwrap_err().0,
            "a source prefix applies only to source-hash, not to round-robin"
        );
        assert!(Algorithm::parse("fastest", None)
            .unwrap_err()
            .0
            .starts_with("unknown algorithm \"fastest\""));
    }

    #[test]
    fn algorithms_check_the_vip() {
        use crate::LbError::{LeastConnNeedsTcp, SourcePrefixTooLong};
        let tcp4: Vip = "10.0.0.1:80/tcp".parse().unwrap();
        let udp4: Vip = "10.0.0.1:53/udp".parse().unwrap();
        let tcp6: Vip = "[2001:db8::1]:80/tcp".parse().unwrap();
        let sh = |prefix_len| Algorithm::SourceHash { prefix_len };
        assert!(Algorithm::LeastConn.check_for(&tcp4).is_ok());
        assert!(matches!(
            Algorithm::LeastConn.check_for(&udp4),
            Err(LeastConnNeedsTcp(v)) if v == udp4
        ));
        assert!(Algorithm::Maglev.check_for(&udp4).is_ok());
        assert!(Algorithm::RoundRobin.check_for(&udp4).is_ok());
        // A source prefix up to the address length.
        assert!(sh(32).check_for(&tcp4).is_ok());
        assert!(matches!(
            sh(33).check_for(&tcp4),
            Err(SourcePrefixTooLong {
                prefix: 33,
                family: 4
            })
        ));
        assert!(sh(128).check_for(&tcp6).is_ok());
        assert!(matches!(
            sh(129).check_for(&tcp6),
            Err(SourcePrefixTooLong {
                prefix: 129,
                family: 6
            })
        ));
    }

    #[test]
    fn hash_seeds_are_plain_hexadecimal() {
        // At most 8 digits, even when leading zeros would make the value fit; no sign.
        for bad in ["+1", "0x+1", "00000000f", "0x00000000f", " "] {
            assert_eq!(
                parse_hash_seed(bad).unwrap_err().0,
                format!(
                    "invalid hash seed {bad:?}: expected up to 8 hexadecimal digits, e.g. 0x1a2b3c4d"
                )
            );
        }
        assert_eq!(parse_hash_seed("0000000f"), Ok(15));
        assert_eq!(parse_hash_seed(" 0X_dead_BEEF "), Ok(0xdead_beef));
    }

    #[test]
    fn random_hash_seeds_differ() {
        // Eight draws from /dev/urandom are all equal with probability 2^-224.
        let seeds: Vec<u32> = (0..8).map(|_| random_hash_seed().unwrap()).collect();
        assert!(seeds.iter().all(|&s| s != 0));
        assert!(seeds.iter().any(|&s| s != seeds[0]), "{seeds:?}");
    }
}
