//! Bulk transfers whose integrity the ends check, and the kernel counters that say whether the
//! receivers dropped segments with bad checksums:
//! - `DigestServer` (TCP): for each connection, reads exactly `n_in` bytes, answers with their
//!   SHA-256 (32 bytes), then sends `n_out` bytes of `pattern(seed, n_out)` and closes;
//! - `pattern`: deterministic pseudo-random bytes (both ends generate the same);
//! - `nstat`: absolute values of kernel counters inside a namespace (`nstat -asz`).
//!
//! Every wait is bounded (socket timeouts and a deadline per connection).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{hold::spawn_in, NetNs};

/// Longest a `DigestServer` spends on one connection.
const CONN_LIMIT: Duration = Duration::from_secs(60);
/// Socket read/write timeouts of the server.
const SOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// `len` deterministic pseudo-random bytes from `seed` (splitmix64).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(data);
    h.finalize().into()
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A `DigestServer` in one namespace (see the module docs); stops on drop.
pub struct DigestServer {
    stop: Arc<AtomicBool>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl DigestServer {
    /// Listens on `[::]:port` (IPv4 and IPv6) in `ns`.
    pub fn start(ns: &NetNs, port: u16, n_in: usize, n_out: usize, seed: u64) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (stop2, errors2) = (stop.clone(), errors.clone());
        let out = Arc::new(pattern(seed, n_out));
        let thread = spawn_in(
            &ns.name,
            move || super::servers::bind_tcp(port, 16),
            move |l| {
                while !stop2.load(Ordering::SeqCst) {
                    match l.accept() {
                        Ok((s, peer)) => {
                            if let Err(e) = serve(s, n_in, &out) {
                                errors2.lock().unwrap().push(format!("{peer}: {e:#}"));
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            errors2.lock().unwrap().push(format!("accept: {e}"));
                            return;
                        }
                    }
                }
            },
        )
        .with_context(|| format!("starting the digest server in {}", ns.name))?;
        Ok(DigestServer {
            stop,
            errors,
            thread: Some(thread),
        })
    }

    /// What went wrong on the server's side so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }
}

impl Drop for DigestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut s: TcpStream, n_in: usize, out: &[u8]) -> Result<()> {
    let deadline = Instant::now() + CONN_LIMIT;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(SOCK_TIMEOUT))?;
    s.set_write_timeout(Some(SOCK_TIMEOUT))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < n_in {
        if Instant::now() > deadline {
            bail!("read {got} of {n_in} bytes in {CONN_LIMIT:?}");
        }
        let want = buf.len().min(n_in - got);
        let n = s
            .read(&mut buf[..want])
            .with_context(|| format!("reading after {got} bytes"))?;
        if n == 0 {
            bail!("end of input after {got} of {n_in} bytes");
        }
        h.update(&buf[..n]);
        got += n;
    }
    let digest: [u8; 32] = h.finalize().into();
    s.write_all(&digest).context("writing the digest")?;
    write_bounded(&mut s, out, deadline)?;
    s.shutdown(Shutdown::Write)?;
    // Wait (bounded) for the client to close, so that the last segments are not reset.
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Writes all of `data` to `s` in chunks, failing past `deadline`.
pub fn write_bounded(s: &mut TcpStream, data: &[u8], deadline: Instant) -> Result<()> {
    for (i, chunk) in data.chunks(256 * 1024).enumerate() {
        if Instant::now() > deadline {
            bail!(
                "wrote {} of {} bytes before the deadline",
                i * 256 * 1024,
                data.len()
            );
        }
        s.write_all(chunk)
            .with_context(|| format!("writing after {} bytes", i * 256 * 1024))?;
    }
    Ok(())
}

/// Absolute values of the kernel counters `names` in namespace `ns` (`nstat -asz`: zero
/// counters included, nstat's history left alone).
pub fn nstat(ns: &NetNs, names: &[&str]) -> Result<BTreeMap<String, u64>> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nstat", "-asz"])
        .args(names)
        .output()
        .context("running nstat")?;
    if !out.status.success() {
        bail!(
            "nstat in {} failed: {}",
            ns.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut m = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split_whitespace();
        if let (Some(k), Some(v)) = (f.next(), f.next()) {
            if let Ok(v) = v.parse() {
                m.insert(k.to_string(), v);
            }
        }
    }
    for n in names {
        if !m.contains_key(*n) {
            bail!("nstat in {} did not print {n}", ns.name);
        }
    }
    Ok(m)
}

/// Receivers' counters that must not grow in a verified transfer: bad TCP checksums (IPv4 and
/// IPv6 share them), bad IPv4 header checksums (or other header errors), IPv6 header errors.
pub const CSUM_COUNTERS: [&str; 3] = ["TcpInCsumErrors", "IpInHdrErrors", "Ip6InHdrErrors"];

/// What one `exchange` moved, and how it went.
pub struct Exchange {
    /// Why the connection failed, if it did.
    pub error: Option<String>,
    /// Whether the server's SHA-256 of what it received equals the sent data's.
    pub up_intact: bool,
    /// Bytes received back.
    pub down_bytes: usize,
    /// Whether they equal what a `DigestServer` with `seed` sends.
    pub down_intact: bool,
    pub took: Duration,
    /// Growth of `CSUM_COUNTERS` at each end named in the call.
    pub csum_errors: Vec<(String, String, u64)>,
}

impl Exchange {
    /// The checksum counters' growth at each end, as "end counter +n" items.
    pub fn csum_summary(&self) -> String {
        self.csum_errors
            .iter()
            .map(|(end, c, n)| format!("{end} {c} +{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The problems, if any, as sentences ("" when intact with no checksum errors).
    pub fn failures(&self, what: &str) -> Vec<String> {
        let mut f = Vec::new();
        if let Some(e) = &self.error {
            f.push(format!("{what}: {e} (after {:.2?})", self.took));
        } else if !self.up_intact {
            f.push(format!(
                "{what}: the server's SHA-256 of the upload differs"
            ));
        }
        if self.error.is_none() && !self.down_intact {
            f.push(format!(
                "{what}: the client got {} bytes, not the server's",
                self.down_bytes
            ));
        }
        for (end, c, n) in &self.csum_errors {
            if *n > 0 {
                f.push(format!("{what}: {c} grew by {n} in the {end}"));
            }
        }
        f
    }
}

/// A TCP connection from `client` to `addr` (a `DigestServer` with `seed`, `n` bytes each
/// way behind it): sends `n` bytes, reads the server's digest and its `n` bytes, compares both
/// and reads the checksum counters of `ends` (name, namespace) before and after. Bounded by a
/// 90 s deadline.
pub fn exchange(
    client: &NetNs,
    addr: std::net::SocketAddr,
    n: usize,
    seed: u64,
    ends: &[(&str, &NetNs)],
) -> Result<Exchange> {
    let up = pattern(seed ^ 0xc11e_0000, n);
    let expect_up = sha256(&up);
    let expect_down = sha256(&pattern(seed, n));
    let snap = || -> Result<Vec<BTreeMap<String, u64>>> {
        ends.iter()
            .map(|(_, ns)| nstat(ns, &CSUM_COUNTERS))
            .collect()
    };
    let before = snap()?;
    let start = Instant::now();
    let got = super::in_ns(client, move || -> Result<([u8; 32], [u8; 32], usize)> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut s = TcpStream::connect_timeout(&addr, super::IO_TIMEOUT).context("connect")?;
        s.set_read_timeout(Some(SOCK_TIMEOUT))?;
        s.set_write_timeout(Some(SOCK_TIMEOUT))?;
        write_bounded(&mut s, &up, deadline).context("client → server")?;
        let mut digest = [0u8; 32];
        s.read_exact(&mut digest).context("reading the digest")?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            if Instant::now() > deadline {
                bail!("server → client: {got} bytes before the deadline");
            }
            let k = s
                .read(&mut buf)
                .with_context(|| format!("server → client after {got} bytes"))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            got += k;
        }
        let _ = s.shutdown(Shutdown::Both);
        Ok((digest, h.finalize().into(), got))
    })?;
    let took = start.elapsed();
    let after = snap()?;
    let mut csum_errors = Vec::new();
    for (i, (end, _)) in ends.iter().enumerate() {
        for c in CSUM_COUNTERS {
            let g = after[i][c].saturating_sub(before[i][c]);
            csum_errors.push((end.to_string(), c.to_string(), g));
        }
    }
    Ok(match got {
        Ok((up_digest, down_digest, down_bytes)) => Exchange {
            error: None,
            up_intact: up_digest == expect_up,
            down_bytes,
            down_intact: down_bytes == n && down_digest == expect_down,
            took,
            csum_errors,
        },
        Err(e) => Exchange {
            error: Some(format!("{e:#}")),
            up_intact: false,
            down_bytes: 0,
            down_intact: false,
            took,
            csum_errors,
        },
    })
}
