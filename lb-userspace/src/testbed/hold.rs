//! Servers for the flow-state tests, on ports of their own beside the standard servers:
//! - `HoldServers` (TCP, line protocol): keeps every accepted connection and can push a line
//!   to all of them on demand (server push over idle connections, the traffic that finds a
//!   flow entry gone first); each line in gets the backend's name back, `close` makes the
//!   server close first, end of input makes it close after the client;
//! - `TtlServers` (UDP): records each datagram with the TTL / hop limit it arrived with.
//!
//! Each runs on threads inside every backend's namespace and stops on drop.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use super::{Backend, NetNs};

const POLL: Duration = Duration::from_millis(100);

/// Runs `body` on a new thread inside the namespace named `ns_name`; returns once `setup`
/// (run first, inside the namespace) has succeeded or failed.
pub(super) fn spawn_in<S: Send + 'static>(
    ns_name: &str,
    setup: impl FnOnce() -> Result<S> + Send + 'static,
    body: impl FnOnce(S) + Send + 'static,
) -> Result<JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    let ns_name = ns_name.to_string();
    let thread = std::thread::spawn(move || {
        let ns = NetNs { name: ns_name };
        let entered = ns.enter();
        // The handle must not delete the namespace when it goes.
        std::mem::forget(ns);
        let s = match entered.and_then(|_| setup()) {
            Ok(s) => {
                let _ = tx.send(Ok(()));
                s
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        body(s);
    });
    rx.recv()
        .context("server thread ended before it was ready")??;
    Ok(thread)
}

struct Held {
    id: u64,
    stream: TcpStream,
}

struct HoldServer {
    name: String,
    conns: Arc<Mutex<Vec<Held>>>,
    accepted: Arc<AtomicU64>,
}

/// A `HoldServer` on every backend (see the module docs).
pub struct HoldServers {
    servers: Vec<HoldServer>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl HoldServers {
    /// Listens on `[::]:port` (IPv4 and IPv6) in every backend's namespace.
    pub fn start(backends: &[Backend], port: u16) -> Result<HoldServers> {
        let mut s = HoldServers {
            servers: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for b in backends {
            let conns = Arc::new(Mutex::new(Vec::new()));
            let accepted = Arc::new(AtomicU64::new(0));
            let (name, stop, conns2, accepted2) = (
                b.name.clone(),
                s.stop.clone(),
                conns.clone(),
                accepted.clone(),
            );
            let t = spawn_in(
                &b.ns.name,
                move || super::servers::bind_tcp(port, 4096),
                move |l| accept_loop(&l, &name, &stop, &conns2, &accepted2),
            )
            .with_context(|| format!("starting the hold server of {}", b.name))?;
            s.threads.push(t);
            s.servers.push(HoldServer {
                name: b.name.clone(),
                conns,
                accepted,
            });
        }
        Ok(s)
    }

    /// Writes `push <backend name>` to every connection the servers hold; returns how many
    /// writes succeeded and the errors of the others.
    pub fn push_all(&self) -> (usize, Vec<String>) {
        let mut ok = 0;
        let mut errors = Vec::new();
        for s in &self.servers {
            let conns = s.conns.lock().unwrap();
            for c in conns.iter() {
                match (&c.stream).write_all(format!("push {}\n", s.name).as_bytes()) {
                    Ok(()) => ok += 1,
                    Err(e) => errors.push(format!("{} connection {}: {e}", s.name, c.id)),
                }
            }
        }
        (ok, errors)
    }

    /// Connections each backend holds open now, by backend name.
    pub fn open(&self) -> Vec<(String, usize)> {
        self.servers
            .iter()
            .map(|s| (s.name.clone(), s.conns.lock().unwrap().len()))
            .collect()
    }

    /// Connections accepted so far, all backends.
    pub fn accepted(&self) -> u64 {
        self.servers
            .iter()
            .map(|s| s.accepted.load(Ordering::SeqCst))
            .sum()
    }
}

impl Drop for HoldServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in &self.servers {
            for c in s.conns.lock().unwrap().drain(..) {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    l: &TcpListener,
    name: &str,
    stop: &AtomicBool,
    conns: &Mutex<Vec<Held>>,
    accepted: &AtomicU64,
) {
    std::thread::scope(|sc| {
        while !stop.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((s, _)) => {
                    let id = accepted.fetch_add(1, Ordering::SeqCst);
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(POLL));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
                    let Ok(clone) = s.try_clone() else { continue };
                    conns.lock().unwrap().push(Held { id, stream: clone });
                    sc.spawn(move || serve_conn(s, id, name, stop, conns));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
}

fn serve_conn(s: TcpStream, id: u64, name: &str, stop: &AtomicBool, conns: &Mutex<Vec<Held>>) {
    let forget = || conns.lock().unwrap().retain(|c| c.id != id);
    let Ok(mut w) = s.try_clone() else {
        forget();
        return;
    };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match r.read_line(&mut line) {
            // The client closed (or half-closed): close our side too.
            Ok(0) => break,
            Ok(_) if line.ends_with('\n') => {
                let close = line.trim() == "close";
                line.clear();
                if close {
                    // The server closes first: FIN from the backend.
                    let _ = w.write_all(format!("bye {name}\n").as_bytes());
                    forget();
                    let _ = w.shutdown(Shutdown::Write);
                    // Wait (bounded) for the client's FIN, so that nothing unread is left
                    // to turn the close into an RST.
                    let _ = r.get_ref().set_read_timeout(Some(Duration::from_secs(3)));
                    let mut rest = String::new();
                    let _ = r.read_line(&mut rest);
                    return;
                }
                if w.write_all(format!("{name}\n").as_bytes()).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    forget();
    let _ = w.shutdown(Shutdown::Both);
}

/// One datagram a `TtlServers` server received.
#[derive(Clone, Debug)]
pub struct TtlDatagram {
    pub backend: String,
    pub payload: String,
    /// TTL (IPv4) or hop limit (IPv6) as it arrived.
    pub ttl: Option<u8>,
}

/// A UDP server on every backend (`0.0.0.0:port` and `[::]:port`) that records each datagram
/// with its TTL / hop limit (IP_RECVTTL, IPV6_RECVHOPLIMIT) and answers nothing.
pub struct TtlServers {
    received: Arc<Mutex<Vec<TtlDatagram>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TtlServers {
    pub fn start(backends: &[Backend], port: u16) -> Result<TtlServers> {
        let mut s = TtlServers {
            received: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for b in backends {
            let (name, stop, received) = (b.name.clone(), s.stop.clone(), s.received.clone());
            let t = spawn_in(
                &b.ns.name,
                move || Ok((ttl_socket(false, port)?, ttl_socket(true, port)?)),
                move |(v4, v6)| {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::SeqCst) {
                        for sock in [&v4, &v6] {
                            if let Ok((n, ttl)) = recv_with_ttl(sock, &mut buf) {
                                received.lock().unwrap().push(TtlDatagram {
                                    backend: name.clone(),
                                    payload: String::from_utf8_lossy(&buf[..n]).into_owned(),
                                    ttl,
                                });
                            }
                        }
                    }
                },
            )
            .with_context(|| format!("starting the TTL server of {}", b.name))?;
            s.threads.push(t);
        }
        Ok(s)
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<TtlDatagram> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for TtlServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn ttl_socket(v6: bool, port: u16) -> Result<socket2::Socket> {
    let (domain, addr): (_, SocketAddr) = if v6 {
        (
            socket2::Domain::IPV6,
            (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
        )
    } else {
        (
            socket2::Domain::IPV4,
            (std::net::Ipv4Addr::UNSPECIFIED, port).into(),
        )
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    if v6 {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.set_read_timeout(Some(Duration::from_millis(20)))?;
    let (level, opt) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT)
    } else {
        (libc::IPPROTO_IP, libc::IP_RECVTTL)
    };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if r != 0 {
        anyhow::bail!(
            "enabling TTL reception: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(s)
}

/// One datagram and the TTL / hop limit from its control message.
fn recv_with_ttl(s: &socket2::Socket, buf: &mut [u8]) -> std::io::Result<(usize, Option<u8>)> {
    let mut cbuf = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr points at live buffers of the stated sizes; the cmsg walk uses the libc
    // macros within msg_controllen.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let n = libc::recvmsg(s.as_raw_fd(), &mut msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ttl = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            if (h.cmsg_level == libc::IPPROTO_IP && h.cmsg_type == libc::IP_TTL)
                || (h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_HOPLIMIT)
            {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                ttl = Some(v as u8);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok((n as usize, ttl))
    }
}
