//! Spoofed traffic: Ethernet frames built here (every checksum computed) and sent from a
//! namespace's interface through an AF_PACKET socket, so they reach the next hop exactly as
//! written — any source address and port, any TCP flags and sequence numbers. Used by the
//! flow-state tests (floods, blind FIN/SYN/RST, martian sources); everything stays inside the
//! testbed's namespaces.

use std::{
    ffi::CString,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use etherparse::PacketBuilder;

use super::{in_ns, NetNs};

pub type Mac = [u8; 6];

/// TCP header flag bits.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// One TCP segment to spoof.
#[derive(Clone, Copy, Debug)]
pub struct TcpSeg {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `tcp_flags` bits (FIN, SYN, RST, PSH, ACK).
    pub flags: u8,
    pub seq: u32,
    /// Used only with ACK.
    pub ack: u32,
    /// TTL / hop limit.
    pub ttl: u8,
}

impl TcpSeg {
    /// A segment with TTL 64 and sequence numbers 0.
    pub fn new(src: SocketAddr, dst: SocketAddr, flags: u8) -> TcpSeg {
        TcpSeg {
            src,
            dst,
            flags,
            seq: 0,
            ack: 0,
            ttl: 64,
        }
    }
}

/// The Ethernet addresses of spoofed frames: from `src` (the sending interface) to `dst` (the
/// next hop, e.g. the gateway's interface).
#[derive(Clone, Copy, Debug)]
pub struct L2 {
    pub src: Mac,
    pub dst: Mac,
}

impl L2 {
    /// A TCP frame (no payload, window 64240), with the IPv4 header checksum and the TCP
    /// checksum (pseudo-header included) computed.
    pub fn tcp(&self, s: &TcpSeg) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src, self.dst);
        let ip = match (s.src.ip(), s.dst.ip()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => eth.ipv4(a.octets(), b.octets(), s.ttl),
            (IpAddr::V6(a), IpAddr::V6(b)) => eth.ipv6(a.octets(), b.octets(), s.ttl),
            _ => panic!("mixed address families: {} → {}", s.src, s.dst),
        };
        let mut b = ip.tcp(s.src.port(), s.dst.port(), s.seq, 64240);
        if s.flags & tcp_flags::FIN != 0 {
            b = b.fin();
        }
        if s.flags & tcp_flags::SYN != 0 {
            b = b.syn();
        }
        if s.flags & tcp_flags::RST != 0 {
            b = b.rst();
        }
        if s.flags & tcp_flags::PSH != 0 {
            b = b.psh();
        }
        if s.flags & tcp_flags::ACK != 0 {
            b = b.ack(s.ack);
        }
        let mut out = Vec::with_capacity(80);
        b.write(&mut out, &[]).expect("writing a frame to a Vec");
        out
    }

    /// A UDP frame with `payload`, every checksum computed.
    pub fn udp(&self, src: SocketAddr, dst: SocketAddr, ttl: u8, payload: &[u8]) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src, self.dst);
        let ip = match (src.ip(), dst.ip()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => eth.ipv4(a.octets(), b.octets(), ttl),
            (IpAddr::V6(a), IpAddr::V6(b)) => eth.ipv6(a.octets(), b.octets(), ttl),
            _ => panic!("mixed address families: {src} → {dst}"),
        };
        let mut out = Vec::with_capacity(64 + payload.len());
        ip.udp(src.port(), dst.port())
            .write(&mut out, payload)
            .expect("writing a frame to a Vec");
        out
    }
}

/// The MAC address of interface `iface` in namespace `ns`.
pub fn mac_of(ns: &NetNs, iface: &str) -> Result<Mac> {
    let v = ip_json(ns, &["link", "show", "dev", iface])?;
    let s = v[0]["address"]
        .as_str()
        .with_context(|| format!("no address for {iface} in {}", ns.name))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {s}");
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {s}"))?;
    }
    Ok(mac)
}

/// Packets and drops of interface `iface` in `ns` (`ip -s link`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub tx_packets: u64,
    pub tx_dropped: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
}

/// The counters of interface `iface` in namespace `ns`.
pub fn link_counters(ns: &NetNs, iface: &str) -> Result<LinkCounters> {
    let v = ip_json(ns, &["-s", "link", "show", "dev", iface])?;
    let s = &v[0]["stats64"];
    let n = |dir: &str, f: &str| s[dir][f].as_u64().unwrap_or(0);
    Ok(LinkCounters {
        tx_packets: n("tx", "packets"),
        tx_dropped: n("tx", "dropped"),
        rx_packets: n("rx", "packets"),
        rx_dropped: n("rx", "dropped"),
    })
}

fn ip_json(ns: &NetNs, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-j"])
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip -n {} {} failed: {}",
            ns.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("ip printed invalid JSON")
}

/// An AF_PACKET socket bound to one interface of one namespace: sends whole Ethernet frames
/// out of it (receives nothing: protocol 0). The socket belongs to the namespace it was made
/// in, so it can be used from any thread.
pub struct RawSender {
    fd: OwnedFd,
    /// Frames sent by `send_all` over the sender's life.
    pub sent: u64,
    /// Times the interface's queue was full and a frame was retried.
    pub retries: u64,
}

/// How `RawSender::send_all` went.
#[derive(Clone, Copy, Debug, Default)]
pub struct SendReport {
    pub sent: u64,
    pub retries: u64,
    pub elapsed: Duration,
}

impl SendReport {
    pub fn per_sec(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl RawSender {
    /// Opens the socket on `iface` inside `ns`.
    pub fn open(ns: &NetNs, iface: &str) -> Result<RawSender> {
        let iface = iface.to_string();
        let ns_name = ns.name.clone();
        let fd = in_ns(ns, move || -> Result<OwnedFd> {
            let name = CString::new(iface.clone())?;
            // SAFETY: plain syscalls on values we own; the fd is wrapped at once.
            unsafe {
                let ifindex = libc::if_nametoindex(name.as_ptr());
                if ifindex == 0 {
                    bail!("no interface {iface} in {ns_name}");
                }
                let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
                if raw < 0 {
                    bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
                }
                let fd = OwnedFd::from_raw_fd(raw);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_ifindex = ifindex as i32;
                if libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ) != 0
                {
                    bail!(
                        "binding an AF_PACKET socket to {iface}: {}",
                        std::io::Error::last_os_error()
                    );
                }
                Ok(fd)
            }
        })??;
        Ok(RawSender {
            fd,
            sent: 0,
            retries: 0,
        })
    }

    /// Sends one frame, waiting (up to 2 s) while the interface's queue is full.
    pub fn send(&mut self, frame: &[u8]) -> Result<()> {
        let start = Instant::now();
        loop {
            // SAFETY: the buffer is valid for its length; the fd is ours.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                )
            };
            if n == frame.len() as isize {
                self.sent += 1;
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            let full = matches!(
                e.raw_os_error(),
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EBUSY)
            );
            if n >= 0 || !full || start.elapsed() > Duration::from_secs(2) {
                bail!("sending a {}-byte frame: {e} (returned {n})", frame.len());
            }
            self.retries += 1;
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Sends every frame of `frames`, but at most `limit` of them, and gives up (with an error)
    /// after `deadline`. Every `batch` frames it yields the CPU, so that the receiving side
    /// (on a small machine often the same CPU) keeps up instead of dropping.
    pub fn send_all(
        &mut self,
        frames: impl IntoIterator<Item = Vec<u8>>,
        limit: usize,
        deadline: Duration,
    ) -> Result<SendReport> {
        let start = Instant::now();
        let (sent0, retries0) = (self.sent, self.retries);
        for (i, f) in frames.into_iter().take(limit).enumerate() {
            self.send(&f)?;
            if i % 256 == 255 {
                if start.elapsed() > deadline {
                    bail!(
                        "sending took more than {deadline:?} ({} frames sent)",
                        i + 1
                    );
                }
                std::thread::yield_now();
            }
        }
        Ok(SendReport {
            sent: self.sent - sent0,
            retries: self.retries - retries0,
            elapsed: start.elapsed(),
        })
    }
}
