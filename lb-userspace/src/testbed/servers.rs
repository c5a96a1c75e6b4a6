//! Real servers on the backends: HTTP (answers with the backend's name), a persistent line
//! protocol (each line in → the name back) and UDP echo (each datagram → the name back).
//! Each backend's servers run on threads inside its namespace, listening on all addresses
//! (IPv4 and IPv6), and stop when told to.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;

use super::{Backend, HTTP_PORT, LINE_PORT, UDP_PORT};

const POLL: Duration = Duration::from_millis(20);

/// The servers of every backend; each backend's can be stopped and started again (a server
/// that dies and comes back, for health-check tests).
pub struct Servers {
    running: Vec<Running>,
    /// Extra addresses the UDP echo also binds to (the VIPs of direct server return: a reply
    /// must come from the address the request went to).
    udp_addrs: Vec<std::net::IpAddr>,
}

struct Running {
    name: String,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Servers {
    pub fn start(backends: &[Backend]) -> Result<Servers> {
        Self::start_with(backends, &[])
    }

    /// Like `start`, with the UDP echo also bound to `udp_addrs` (which must be local addresses
    /// of every backend, e.g. VIPs on its loopback).
    pub fn start_with(backends: &[Backend], udp_addrs: &[std::net::IpAddr]) -> Result<Servers> {
        let mut s = Servers {
            running: Vec::new(),
            udp_addrs: udp_addrs.to_vec(),
        };
        for b in backends {
            if let Err(e) = s.start_one(b) {
                s.stop();
                return Err(e);
            }
        }
        Ok(s)
    }

    /// Starts `b`'s servers (if they are not running).
    pub fn start_one(&mut self, b: &Backend) -> Result<()> {
        if self.running.iter().any(|r| r.name == b.name) {
            return Ok(());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let ns_name = b.ns.name.clone();
        let name = b.name.clone();
        let stop2 = stop.clone();
        let udp_addrs = self.udp_addrs.clone();
        let thread = std::thread::spawn(move || {
            let ns = super::NetNs { name: ns_name };
            let setup = (|| -> Result<(TcpListener, TcpListener, Vec<UdpSocket>)> {
                ns.enter()?;
                let http = bind_tcp(HTTP_PORT, 1024)?;
                let line = bind_tcp(LINE_PORT, 1024)?;
                let mut udp = vec![bind_udp(std::net::Ipv6Addr::UNSPECIFIED.into())?];
                for a in &udp_addrs {
                    udp.push(bind_udp(*a)?);
                }
                Ok((http, line, udp))
            })();
            // The namespace handle must not delete the namespace when it goes.
            std::mem::forget(ns);
            let (http, line, udp) = match setup {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            serve(&name, http, line, udp, &stop2);
        });
        let ready = ready_rx.recv().map_err(anyhow::Error::from).and_then(|r| r);
        let r = Running {
            name: b.name.clone(),
            stop,
            thread,
        };
        if let Err(e) = ready {
            r.stop();
            return Err(e);
        }
        self.running.push(r);
        Ok(())
    }

    /// Stops the servers of backend `name`: its listeners close (new connections are
    /// refused) and its open connections are closed, as when a server process dies.
    pub fn stop_one(&mut self, name: &str) {
        if let Some(i) = self.running.iter().position(|r| r.name == name) {
            self.running.remove(i).stop();
        }
    }

    pub fn stop(self) {
        for r in self.running {
            r.stop();
        }
    }
}

impl Running {
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

/// A non-blocking listener on every address (IPv4 and IPv6) with SO_REUSEADDR, so a restarted
/// server can bind again while connections of the previous one are in TIME_WAIT.
pub(crate) fn bind_tcp(port: u16, backlog: i32) -> Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_only_v6(false)?;
    s.bind(&std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    s.listen(backlog)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// A UDP echo socket on `addr`:UDP_PORT. SO_REUSEADDR lets the wildcard socket and sockets on
/// specific addresses share the port (the most specific one receives).
fn bind_udp(addr: std::net::IpAddr) -> Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(!addr.is_unspecified())?;
    }
    s.bind(&std::net::SocketAddr::new(addr, UDP_PORT).into())?;
    s.set_read_timeout(Some(POLL))?;
    Ok(s.into())
}

fn serve(
    name: &str,
    http: TcpListener,
    line: TcpListener,
    udp: Vec<UdpSocket>,
    stop: &Arc<AtomicBool>,
) {
    std::thread::scope(|sc| {
        sc.spawn(|| accept_loop(&http, stop, |s| handle_http(s, name)));
        sc.spawn(|| accept_loop(&line, stop, |s| handle_line(s, name, stop)));
        for u in &udp {
            sc.spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::SeqCst) {
                    // Blocks up to POLL, so the stop flag is seen.
                    if let Ok((_, from)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(name.as_bytes(), from);
                    }
                }
            });
        }
    });
}

/// Accepts until stopped, one thread per connection.
fn accept_loop(l: &TcpListener, stop: &Arc<AtomicBool>, handle: impl Fn(TcpStream) + Sync) {
    std::thread::scope(|sc| {
        while !stop.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((s, _)) => {
                    sc.spawn(|| handle(s));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
}

/// HTTP/1.1 with keep-alive: answers every request on the connection with the backend's
/// name, until the client closes or asks `Connection: close`.
fn handle_http(mut s: TcpStream, name: &str) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_nodelay(true);
    let body = format!("{name}\n");
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") else {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
            if req.len() > 64 * 1024 {
                return;
            }
            continue;
        };
        let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
        let close = head.contains("connection: close");
        req.drain(..end + 4);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if s.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

fn handle_line(s: TcpStream, name: &str, stop: &Arc<AtomicBool>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = s.set_nodelay(true);
    let Ok(w) = s.try_clone() else { return };
    let mut w = w;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if w.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}
