//! What `lb_decap` (on a backend of ipip VIPs) accepts: outer sources in the gateways'
//! encapsulation prefixes (`--from`), outer destinations among this host's addresses, inner
//! destinations among the VIPs it serves (`--vip`, or the loopback's addresses). Written into
//! the program's maps at every `lb decap attach`.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, Map, MapData};
use lb_common::{names, DecapAddr, Endpoint};

use crate::model::addr_words;

/// The decapsulation's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecapConfig {
    /// Gateway prefixes (address, prefix length) outer sources must be in.
    pub from: Vec<(IpAddr, u8)>,
    /// This host's addresses: the outer destinations accepted.
    pub local: Vec<IpAddr>,
    /// The VIPs inner packets may be addressed to.
    pub vips: Vec<IpAddr>,
}

impl DecapConfig {
    /// The configuration for `--from` prefixes and `--vip` addresses (none: the loopback's
    /// addresses other than 127.0.0.0/8 and ::1), with this host's addresses now.
    pub fn for_host(from: &[String], vips: &[IpAddr]) -> Result<DecapConfig> {
        if from.is_empty() {
            bail!("give the gateways' encapsulation prefixes with --from PREFIX (lb encapsulates from 172.16.0.0/16 and 100::/64)");
        }
        let from = from
            .iter()
            .map(|p| parse_prefix(p))
            .collect::<Result<Vec<_>>>()?;
        let addrs = interface_addresses()?;
        let vips = if vips.is_empty() {
            let on_lo: Vec<IpAddr> = addrs
                .iter()
                .filter(|(iface, ip)| iface == "lo" && !ip.is_loopback())
                .map(|(_, ip)| *ip)
                .collect();
            if on_lo.is_empty() {
                bail!("no VIP to accept: give --vip ADDR, or put the VIPs on lo first");
            }
            on_lo
        } else {
            vips.to_vec()
        };
        Ok(DecapConfig {
            from,
            local: addrs.into_iter().map(|(_, ip)| ip).collect(),
            vips,
        })
    }

    /// Makes the maps say exactly this (`take` gives each map by name).
    pub fn write(&self, mut take: impl FnMut(&str) -> Result<Map>) -> Result<()> {
        let mut from: LpmTrie<MapData, DecapAddr, u8> = take(names::DECAP_FROM)?.try_into()?;
        let old: Vec<Key<DecapAddr>> = from.keys().collect::<Result<_, _>>()?;
        let want: Vec<Key<DecapAddr>> = self
            .from
            .iter()
            .map(|(ip, len)| {
                let (addr_be, family) = addr_words(*ip);
                Key::new(
                    DecapAddr::prefix_len(*len as u32),
                    DecapAddr {
                        family,
                        _pad: [0; 3],
                        addr_be,
                    },
                )
            })
            .collect();
        for k in &want {
            from.insert(k, 1, 0).context("writing a gateway prefix")?;
        }
        for k in old {
            let kept = want
                .iter()
                .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data());
            if !kept {
                from.remove(&k).context("removing a gateway prefix")?;
            }
        }
        for (name, addrs) in [
            (names::DECAP_LOCAL, &self.local),
            (names::DECAP_VIPS, &self.vips),
        ] {
            let mut map: HashMap<MapData, Endpoint, u8> = take(name)?.try_into()?;
            let want: Vec<Endpoint> = addrs.iter().map(|ip| address_key(*ip)).collect();
            for k in &want {
                map.insert(k, 1, 0)
                    .with_context(|| format!("writing {name}"))?;
            }
            let old: Vec<Endpoint> = map.keys().collect::<Result<_, _>>()?;
            for k in old.iter().filter(|k| !want.contains(k)) {
                map.remove(k).with_context(|| format!("writing {name}"))?;
            }
        }
        Ok(())
    }
}

/// The map key of an address (port and protocol 0).
fn address_key(ip: IpAddr) -> Endpoint {
    let (addr_be, family) = addr_words(ip);
    Endpoint {
        addr_be,
        port_be: 0,
        proto: 0,
        family,
    }
}

/// `ADDR/LEN` (or an address alone: all its bits).
pub fn parse_prefix(s: &str) -> Result<(IpAddr, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .parse()
        .with_context(|| format!("invalid prefix {s:?}: {addr:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => bail!("invalid prefix {s:?}: the length must be 0 to {max}"),
        },
    };
    // Host bits set: the trie would match by the prefix alone, and a later corrected prefix
    // would be taken for another one.
    let bits = match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    };
    let host = if len == 0 {
        u128::MAX
    } else {
        !(u128::MAX << (128 - len as u32))
    };
    if bits & host != 0 {
        let net = bits & !host;
        let net = match ip {
            IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::from((net >> 96) as u32)),
            IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(net)),
        };
        bail!("invalid prefix {s:?}: host bits set (the prefix is {net}/{len})");
    }
    Ok((ip, len))
}

/// Every (interface, address) of this host (its network namespace).
fn interface_addresses() -> Result<Vec<(String, IpAddr)>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing the host's addresses");
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let a = unsafe { &*p };
        p = a.ifa_next;
        if a.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string of the node.
        let name = unsafe { std::ffi::CStr::from_ptr(a.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points at a sockaddr whose family says which one.
        let ip = match unsafe { (*a.ifa_addr).sa_family } as i32 {
            libc::AF_INET => {
                // SAFETY: as above: a sockaddr_in.
                let sin = unsafe { &*(a.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: as above: a sockaddr_in6.
                let sin6 = unsafe { &*(a.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        out.push((name, ip));
    }
    // SAFETY: the list getifaddrs made.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(
            parse_prefix("172.16.0.0/16").unwrap(),
            ("172.16.0.0".parse().unwrap(), 16)
        );
        assert_eq!(
            parse_prefix("100::/64").unwrap(),
            ("100::".parse().unwrap(), 64)
        );
        assert_eq!(
            parse_prefix("10.2.1.2").unwrap(),
            ("10.2.1.2".parse().unwrap(), 32)
        );
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "gw1/8",
            "10.0.0.0/x",
            "172.16.5.0/16",
            "100::1/64",
        ] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_loopback_is_read() {
        let addrs = interface_addresses().unwrap();
        assert!(addrs
            .iter()
            .any(|(i, ip)| i == "lo" && *ip == IpAddr::from([127, 0, 0, 1])));
    }
}
