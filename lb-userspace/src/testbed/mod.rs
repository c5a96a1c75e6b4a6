//! A virtual network in namespaces — a client, a gateway running the real `lb` binary on all
//! its NICs, and N backends running real servers — for the demo and the end-to-end tests.
//!
//! ```text
//!  client ns            gateway ns (lb attached to g0, g1…gN)         backend ns i
//!  eth0 10.0.0.2  ───── g0 10.0.0.1                     g<i> 10.1.<i>.1 ───── eth0 10.1.<i>.2
//!       fd00::2            fd00::1                          fd01:<i>::1          fd01:<i>::2
//! ```
//!
//! Every name carries a per-run prefix, so runs never collide; everything is removed on drop
//! (and `cleanup_prefix` removes the leftovers of a run that was killed). All addresses are
//! inside the namespaces. Client and backend veths have TX checksum offload off: veth would
//! otherwise hand the gateway packets with partial checksums, which a real NIC never does.

mod ecmp;
pub mod hold;
mod lan;
mod netns;
mod servers;
pub mod service;
pub mod spoof;
pub mod transfer;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context, Result};

pub use ecmp::Ecmp;
pub use netns::{in_ns, NetNs};
pub use servers::Servers;

/// Ports the backends serve on.
pub const HTTP_PORT: u16 = 8080;
/// A persistent line protocol: each line in gets the backend's name back.
pub const LINE_PORT: u16 = 9000;
/// UDP: each datagram gets the backend's name back.
pub const UDP_PORT: u16 = 5353;

/// Socket timeouts: every client operation is bounded.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

static RUN: AtomicU32 = AtomicU32::new(0);

pub struct Backend {
    pub name: String,
    pub ns: NetNs,
    pub v4: IpAddr,
    pub v6: IpAddr,
}

/// The hash seed test beds load lb with (a deployment has a secret one of its own).
pub const TEST_HASH_SEED: &str = "0x1a2b3c4d";

pub struct Testbed {
    pub prefix: String,
    pub client: NetNs,
    pub gateway: NetNs,
    pub backends: Vec<Backend>,
    pub client_v4: IpAddr,
    pub client_v6: IpAddr,
    lb_bin: PathBuf,
    pin_dir: String,
    servers: Option<Servers>,
    /// Other namespaces of the topology (the LAN's switch).
    extra: Vec<NetNs>,
}

impl Testbed {
    /// A client and a gateway namespace under a new per-run prefix, nothing connected yet.
    fn empty(lb_bin: &Path) -> Result<Testbed> {
        let prefix = format!("{}{}", run_prefix(), RUN.fetch_add(1, Ordering::SeqCst));
        Ok(Testbed {
            pin_dir: format!("/sys/fs/bpf/{prefix}"),
            client: NetNs::new(&format!("{prefix}-client"))?,
            gateway: NetNs::new(&format!("{prefix}-gw"))?,
            prefix,
            backends: Vec::new(),
            client_v4: "10.0.0.2".parse().unwrap(),
            client_v6: "fd00::2".parse().unwrap(),
            lb_bin: lb_bin.to_path_buf(),
            servers: None,
            extra: Vec::new(),
        })
    }

    /// Builds the network with `n` backends (names `backend-1`…), starts their servers and
    /// attaches lb to every gateway interface in `mode` (`native` or `generic`).
    pub fn new(n: usize, mode: &str, lb_bin: &Path) -> Result<Testbed> {
        let sizes = ["--table-capacity", "262144", "--conntrack-size", "65536"];
        Testbed::with_attach(n, mode, lb_bin, &sizes)
    }

    /// Like `new`, with `attach` as the options of `lb attach` (sizes, flood threshold…)
    /// instead of `new`'s sizes.
    pub fn with_attach(n: usize, mode: &str, lb_bin: &Path, attach: &[&str]) -> Result<Testbed> {
        let tb = Testbed::unattached(n, lb_bin)?;
        let mut args = vec!["attach".to_string()];
        args.extend(tb.interfaces());
        args.extend(["--mode".into(), mode.into()]);
        // A fixed hash seed unless the caller gives one: every run of a test or the demo
        // hashes alike, so fixed-port flows land on the same backends each time.
        if !attach.contains(&"--hash-seed") {
            args.extend(["--hash-seed".into(), TEST_HASH_SEED.into()]);
        }
        args.extend(attach.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tb.lb(&args)?;
        Ok(tb)
    }

    /// The gateway's interfaces: g0 to the client, g1…gN to the backends.
    pub fn interfaces(&self) -> Vec<String> {
        (0..=self.backends.len()).map(|i| format!("g{i}")).collect()
    }

    /// The network with `n` backends and their servers, lb not attached (for a test whose
    /// agent attaches it).
    pub fn unattached(n: usize, lb_bin: &Path) -> Result<Testbed> {
        assert!((1..=200).contains(&n));
        let mut tb = Testbed::empty(lb_bin)?;
        let prefix = tb.prefix.clone();
        let gw = &tb.gateway;
        gw.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ])?;
        link_pair(
            gw,
            "g0",
            &tb.client,
            "10.0.0.1/24",
            "10.0.0.2/24",
            "fd00::1/64",
            "fd00::2/64",
        )?;
        tb.client
            .ip(&["route", "add", "default", "via", "10.0.0.1"])?;
        tb.client
            .ip(&["-6", "route", "add", "default", "via", "fd00::1"])?;
        for i in 1..=n {
            let ns = NetNs::new(&format!("{prefix}-b{i}"))?;
            link_backend(&tb.gateway, i, &ns)?;
            tb.backends.push(Backend {
                name: format!("backend-{i}"),
                ns,
                v4: format!("10.1.{i}.2").parse().unwrap(),
                v6: format!("fd01:{i:x}::2").parse().unwrap(),
            });
        }
        tb.servers = Some(Servers::start(&tb.backends)?);
        Ok(tb)
    }

    /// Deletes the veth pair between the gateway and backend `i` (1-based), as a driver reload
    /// or an unplugged NIC would: the gateway's `g<i>` and the backend's `eth0` go.
    pub fn delete_backend_link(&self, i: usize) -> Result<()> {
        self.gateway.ip(&["link", "del", &format!("g{i}")])
    }

    /// Makes the link to backend `i` again, as `new` made it (same names and addresses, the
    /// backend's default routes).
    pub fn recreate_backend_link(&self, i: usize) -> Result<()> {
        link_backend(&self.gateway, i, &self.backends[i - 1].ns)
    }

    /// The names of the backends the VIP's table gives flows from `clients` (read from the
    /// gateway's pinned maps), in order: what a test expects when flows are chosen by hash.
    pub fn table_choices(&self, vip: &crate::Vip, clients: &[SocketAddr]) -> Result<Vec<String>> {
        let maps = crate::pin::PinDir::open(std::path::Path::new(&self.pin_dir))?.maps()?;
        clients
            .iter()
            .map(|c| {
                let b = maps
                    .table_backend(vip, &crate::model::flow_key(*c, vip))?
                    .with_context(|| format!("{vip}: the table slot of {c} has no backend"))?
                    .addr
                    .ip();
                self.backends
                    .iter()
                    .find(|x| x.v4 == b || x.v6 == b)
                    .map(|x| x.name.clone())
                    .with_context(|| format!("table backend {b} is not a testbed backend"))
            })
            .collect()
    }

    /// Runs the real `lb` binary in the gateway's namespace; returns stdout.
    pub fn lb(&self, args: &[&str]) -> Result<String> {
        run_lb(&self.lb_bin, &self.gateway, &self.pin_dir, args)
    }

    /// Starts the real `lb` binary in the gateway's namespace as a child process (the agent),
    /// its stderr (the log) going to `log`.
    pub fn spawn_lb(&self, args: &[&str], log: &Path) -> Result<std::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.gateway.name))
            .arg(&self.lb_bin)
            .args(args)
            .env("LB_PIN_DIR", &self.pin_dir)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting lb")
    }

    /// Puts this test bed's pin directory at `dir` (on a bpffs of the test's own) before
    /// anything is pinned.
    pub fn set_pin_dir(&mut self, dir: &Path) {
        self.pin_dir = dir.display().to_string();
    }

    /// Makes the pin directory for the service user `uid`, as the package does at install
    /// (tmpfiles: 0700, the user's).
    pub fn make_pin_dir_for(&self, uid: u32, gid: u32) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.pin_dir)?;
        std::os::unix::fs::chown(&self.pin_dir, Some(uid), Some(gid))?;
        Ok(())
    }

    /// Starts the real `lb` binary in the gateway's namespace as `service` runs it (the unit's
    /// user, capabilities `caps`, umask; traced), its stderr going to `log`.
    pub fn spawn_lb_as(
        &self,
        service: &service::ServiceRun,
        caps: &str,
        args: &[&str],
        log: &Path,
    ) -> Result<std::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        use std::os::unix::process::CommandExt;
        service
            .command(
                &self.gateway.name,
                caps,
                &[Path::new(&self.pin_dir)],
                &self.lb_bin,
                args,
            )?
            .env("LB_PIN_DIR", &self.pin_dir)
            // Its own process group: strace and lb go together (`service::kill_group`).
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting lb as the service user")
    }

    /// The `lb` binary as a command in the gateway's namespace with this test bed's pin
    /// directory, for a test to set its input and output and run or spawn.
    pub fn lb_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.gateway.name))
            .arg(&self.lb_bin)
            .args(args)
            .env("LB_PIN_DIR", &self.pin_dir);
        c
    }

    /// The pin directory of this test bed's lb.
    pub fn pin_dir(&self) -> &Path {
        Path::new(&self.pin_dir)
    }

    /// Stops the servers of backend `name` (as if the process died).
    pub fn stop_server(&mut self, name: &str) {
        if let Some(s) = self.servers.as_mut() {
            s.stop_one(name);
        }
    }

    /// Starts the servers of backend `name` again.
    pub fn start_server(&mut self, name: &str) -> Result<()> {
        let b = self
            .backends
            .iter()
            .find(|b| b.name == name)
            .with_context(|| format!("no backend {name}"))?;
        self.servers
            .as_mut()
            .context("servers not running")?
            .start_one(b)
    }

    /// An HTTP GET from inside the gateway's namespace (e.g. the agent's /metrics on
    /// loopback); returns the body if the status is 200.
    pub fn gateway_http_get(&self, addr: SocketAddr, path: &str) -> Result<String> {
        let path = path.to_string();
        in_ns(&self.gateway, move || -> Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let (head, body) = resp
                .split_once("\r\n\r\n")
                .ok_or_else(|| anyhow::anyhow!("bad HTTP response"))?;
            if !head.starts_with("HTTP/1.1 200") {
                bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
            }
            let chunked = head
                .lines()
                .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
            if chunked {
                return dechunk(body);
            }
            Ok(body.to_string())
        })?
    }

    /// `lb … --json`, parsed.
    pub fn lb_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.lb(&a)?).context("lb printed invalid JSON")
    }

    /// The gateway's counters by name (`lb stats --json`).
    pub fn counters(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let s = self.lb_json(&["stats"])?;
        Ok(s["counters"]
            .as_object()
            .context("lb stats --json has no counters")?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
            .collect())
    }

    pub fn backend_by_name(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The client side of the network.
    pub fn as_client(&self) -> Client<'_> {
        Client {
            ns: &self.client,
            v4: self.client_v4,
            v6: self.client_v6,
        }
    }

    /// One HTTP request from the client to `addr` on a new connection. Returns the name of the
    /// backend that answered and the client's source port.
    pub fn http_get(&self, addr: SocketAddr) -> Result<(String, u16)> {
        self.as_client().http_get_from(addr, 0)
    }

    /// Like `http_get`, from source port `port` (0: any).
    pub fn http_get_from(&self, addr: SocketAddr, port: u16) -> Result<(String, u16)> {
        self.as_client().http_get_from(addr, port)
    }

    /// Opens a persistent connection from the client to `addr` (a LINE_PORT service).
    pub fn open_line(&self, addr: SocketAddr) -> Result<LineConn> {
        self.as_client().open_line(addr)
    }

    /// Sends `count` datagrams from one client socket (one UDP flow) to `addr`; returns
    /// (source address of the reply, backend name) for each.
    pub fn udp_flow(&self, addr: SocketAddr, count: usize) -> Result<Vec<(SocketAddr, String)>> {
        self.as_client().udp_flow_from(addr, 0, count)
    }

    /// Like `udp_flow`, from client port `port` (0: any).
    pub fn udp_flow_from(
        &self,
        addr: SocketAddr,
        port: u16,
        count: usize,
    ) -> Result<Vec<(SocketAddr, String)>> {
        self.as_client().udp_flow_from(addr, port, count)
    }

    /// Whether `ping` from the client reaches `ip` (one packet, 2 s).
    pub fn ping(&self, ip: IpAddr) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.client.name,
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                &ip.to_string(),
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

/// The client end of a test network: its namespace and addresses.
pub struct Client<'a> {
    pub ns: &'a NetNs,
    pub v4: IpAddr,
    pub v6: IpAddr,
}

impl Client<'_> {
    /// One HTTP request to `addr` on a new connection: the backend that answered and the
    /// client's source port.
    pub fn http_get(&self, addr: SocketAddr) -> Result<(String, u16)> {
        self.http_get_from(addr, 0)
    }

    /// Like `http_get`, from source port `port` (0: any), so that a test can choose its flows
    /// (and so their hashes) instead of leaving them to the kernel.
    pub fn http_get_from(&self, addr: SocketAddr, port: u16) -> Result<(String, u16)> {
        let client = if addr.is_ipv4() { self.v4 } else { self.v6 };
        in_ns(self.ns, move || {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            // A chosen port is bound first; any port is left to connect(), which picks it for
            // this destination: a port bound first (SO_REUSEADDR) soon repeats a 4-tuple whose
            // last connection the server still holds in TIME_WAIT, and such a SYN may be
            // answered by the old connection's ACK instead (a timeout here, not lb's doing).
            if port != 0 {
                sock.set_reuse_address(true)?;
                sock.bind(&SocketAddr::new(client, port).into())?;
            }
            if let Err(e) = sock.connect_timeout(&addr.into(), IO_TIMEOUT) {
                // (The port the kernel chose, for a failure to be traced.)
                let from = sock
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .map(|a| a.port())
                    .unwrap_or(0);
                return Err(anyhow::Error::from(e)
                    .context(format!("connecting to {addr} from port {from}")));
            }
            let mut s: TcpStream = sock.into();
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            let port = s.local_addr()?.port();
            // One write: a request split over segments would wait on Nagle + delayed ACK.
            let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes())?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)
                .context("reading the response")?;
            let body = resp
                .split_once("\r\n\r\n")
                .map(|(h, b)| (h, b.trim()))
                .filter(|(h, _)| h.starts_with("HTTP/1.1 200"))
                .map(|(_, b)| b.to_string())
                .ok_or_else(|| anyhow::anyhow!("bad HTTP response {resp:?}"))?;
            Ok((body, port))
        })?
    }

    /// Opens a persistent connection from the client to `addr` (a LINE_PORT service).
    pub fn open_line(&self, addr: SocketAddr) -> Result<LineConn> {
        let stream = in_ns(self.ns, move || -> Result<TcpStream> {
            let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(s)
        })??;
        let mut c = LineConn {
            reader: BufReader::new(stream.try_clone()?),
            stream,
            backend: String::new(),
        };
        c.backend = c.ping()?;
        Ok(c)
    }

    /// Sends `count` datagrams from one client socket (one UDP flow) to `addr`; returns
    /// (source address of the reply, backend name) for each.
    pub fn udp_flow(&self, addr: SocketAddr, count: usize) -> Result<Vec<(SocketAddr, String)>> {
        self.udp_flow_from(addr, 0, count)
    }

    /// Like `udp_flow`, from client port `port` (0: any).
    pub fn udp_flow_from(
        &self,
        addr: SocketAddr,
        port: u16,
        count: usize,
    ) -> Result<Vec<(SocketAddr, String)>> {
        let client = if addr.is_ipv4() { self.v4 } else { self.v6 };
        in_ns(self.ns, move || -> Result<Vec<(SocketAddr, String)>> {
            let s = UdpSocket::bind(SocketAddr::new(client, port))?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let mut out = Vec::new();
            let mut buf = [0u8; 256];
            for i in 0..count {
                s.send_to(format!("ping {i}").as_bytes(), addr)?;
                let (n, from) = s
                    .recv_from(&mut buf)
                    .with_context(|| format!("no UDP reply from {addr}"))?;
                out.push((from, String::from_utf8_lossy(&buf[..n]).trim().to_string()));
            }
            Ok(out)
        })?
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Some(s) = self.servers.take() {
            s.stop();
        }
        let _ = self.lb(&["detach", "--purge"]);
        // This testbed's names only ("…x1-" must not match "…x10-").
        cleanup_prefix(&format!("{}-", self.prefix));
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Runs the real `lb` binary in namespace `ns` with pin directory `pin_dir`; returns stdout,
/// or an error with its stderr.
fn run_lb(lb_bin: &Path, ns: &NetNs, pin_dir: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg(lb_bin)
        .args(args)
        .env("LB_PIN_DIR", pin_dir)
        .output()
        .context("running lb")?;
    if !out.status.success() {
        // The status too: a process the kernel killed (an oops in a syscall) says nothing.
        bail!(
            "lb {} in {} failed ({}): {}",
            args.join(" "),
            ns.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Connects `node`'s interface `iface` to the bridge `br0` in `sw` with a veth pair (`port` on
/// the bridge) and gives it `addrs` (IPv4 and IPv6 with prefix lengths). Full checksums on
/// the wire and NAPI (GRO) on both ends, as everywhere in the testbeds.
fn bridge_port(sw: &NetNs, port: &str, node: &NetNs, iface: &str, addrs: &[&str]) -> Result<()> {
    sw.ip(&[
        "link", "add", port, "type", "veth", "peer", "name", iface, "netns", &node.name,
    ])?;
    sw.ip(&["link", "set", port, "master", "br0", "up"])?;
    for a in addrs {
        if a.contains(':') {
            node.ip(&["-6", "addr", "add", a, "dev", iface, "nodad"])?;
        } else {
            node.ip(&["addr", "add", a, "dev", iface])?;
        }
    }
    node.ip(&["link", "set", iface, "up"])?;
    node.exec(&["ethtool", "-K", iface, "tx", "off", "gro", "on"])?;
    sw.exec(&["ethtool", "-K", port, "gro", "on"])?;
    Ok(())
}

/// Fails the test with every collected failure listed, if there are any.
pub fn assert_none(failures: &[String], what: &str) {
    assert!(
        failures.is_empty(),
        "{what}: {} failures:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// How much counter `name` grew between two `Testbed::counters` (0 if this lb has no such
/// counter).
pub fn grew(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    name: &str,
) -> u64 {
    let b = before.get(name).copied().unwrap_or(0);
    after.get(name).copied().unwrap_or(0).saturating_sub(b)
}

/// The body of a chunked HTTP/1.1 response (a streamed /metrics page); an error if it was
/// cut before its last chunk.
fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .context("a chunk without its size line")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).context("a chunk cut short")?;
        out.push_str(chunk);
        rest = after[size..]
            .strip_prefix("\r\n")
            .context("a chunk without its CRLF")?;
    }
}

/// Polls `f` every 50 ms until it is true or `limit` passes (then panics naming `what`);
/// returns how long it took. Every wait in the tests is bounded this way.
pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// The prefix of every name this process gives its testbeds.
pub fn run_prefix() -> String {
    format!("lbe{}x", std::process::id())
}

/// Removes every namespace and pin directory whose name starts with `prefix` (after a run that
/// was interrupted).
pub fn cleanup_prefix(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(prefix) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A veth pair between `a` (named `a_name`) and `b` (named eth0), with addresses, up, and
/// the endpoint's offloads set as described in the module docs.
/// The link between the gateway (`g<i>`) and backend `i`'s namespace, with the backend's
/// addresses and default routes through the gateway.
fn link_backend(gw: &NetNs, i: usize, ns: &NetNs) -> Result<()> {
    link_pair(
        gw,
        &format!("g{i}"),
        ns,
        &format!("10.1.{i}.1/24"),
        &format!("10.1.{i}.2/24"),
        &format!("fd01:{i:x}::1/64"),
        &format!("fd01:{i:x}::2/64"),
    )?;
    ns.ip(&["route", "add", "default", "via", &format!("10.1.{i}.1")])?;
    ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("fd01:{i:x}::1"),
    ])
}

fn link_pair(
    a: &NetNs,
    a_name: &str,
    b: &NetNs,
    a_v4: &str,
    b_v4: &str,
    a_v6: &str,
    b_v6: &str,
) -> Result<()> {
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", "eth0", "netns", &b.name,
    ])?;
    a.ip(&["addr", "add", a_v4, "dev", a_name])?;
    a.ip(&["-6", "addr", "add", a_v6, "dev", a_name, "nodad"])?;
    b.ip(&["addr", "add", b_v4, "dev", "eth0"])?;
    b.ip(&["-6", "addr", "add", b_v6, "dev", "eth0", "nodad"])?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["link", "set", "eth0", "up"])?;
    // Full checksums on the wire; NAPI (GRO) on the endpoint so that frames the gateway sends
    // with native XDP_TX/XDP_REDIRECT are delivered.
    b.exec(&["ethtool", "-K", "eth0", "tx", "off", "gro", "on"])?;
    Ok(())
}

/// A persistent TCP connection to a LINE_PORT service.
pub struct LineConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The backend that answered the first ping.
    pub backend: String,
}

impl LineConn {
    /// Sends a line; returns the name of the backend that answered.
    pub fn ping(&mut self) -> Result<String> {
        self.send_line("ping")
    }

    /// Sends `line` (any length); returns the name of the backend that answered.
    pub fn send_line(&mut self, line: &str) -> Result<String> {
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(line.trim().to_string())
    }
}
