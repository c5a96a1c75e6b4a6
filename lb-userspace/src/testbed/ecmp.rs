//! Scale-out: two lb gateways behind a router that learns the VIPs from both over BGP (BIRD on
//! every node) and spreads flows over them with ECMP (layer-4 hashing), as Maglev and Katran are
//! deployed. The gateways share nothing; each runs the real agent (`lb run`) with the same
//! configuration, announcing the VIPs through its BIRD.
//!
//! ```text
//!  client 10.0.0.2 ── router 10.0.0.1 ─┬─ r1 10.2.1.1 ── eth0 10.2.1.2 gw1 eth1 10.1.0.1 ─┐
//!                     (BIRD, ECMP)     └─ r2 10.2.2.1 ── eth0 10.2.2.2 gw2 eth1 10.1.0.2 ─┤ bridge
//!                                                        backends 10.1.0.11 … 10.1.0.1n ─┘
//! ```
//!
//! Backends send through both gateways too (an ECMP default route), so replies often go through
//! the gateway that did not see the flow's first packet: reverse NAT must not need it.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{Backend, NetNs, Servers, RUN};

pub struct Ecmp {
    pub prefix: String,
    pub client: NetNs,
    pub router: NetNs,
    pub gateways: Vec<NetNs>,
    pub backends: Vec<Backend>,
    _switch: NetNs,
    lb_bin: PathBuf,
    /// Configuration files, logs and BIRD sockets.
    pub dir: PathBuf,
    /// BIRD of the router, gw1 and gw2 (None once killed).
    birds: Vec<Option<Child>>,
    /// Extra arguments of each gateway's agent.
    pub agent_args: [Vec<String>; 2],
    agents: Vec<Option<Child>>,
    servers: Option<Servers>,
}

impl Ecmp {
    /// Builds the network with `n` backends (holding `vips` on their loopback, for ipip),
    /// starts BIRD on the router and both gateways, and the servers.
    pub fn new(n: usize, lb_bin: &Path, vips: &[IpAddr]) -> Result<Ecmp> {
        let prefix = format!(
            "{}{}",
            super::run_prefix(),
            RUN.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("{prefix}-ecmp"));
        std::fs::create_dir_all(&dir)?;
        let ns = |tag: &str| NetNs::new(&format!("{prefix}-{tag}"));
        let client = ns("client")?;
        let router = ns("rt")?;
        let gateways = vec![ns("gw1")?, ns("gw2")?];
        let switch = ns("sw")?;
        let mut e = Ecmp {
            prefix: prefix.clone(),
            client,
            router,
            gateways,
            backends: Vec::new(),
            _switch: switch,
            lb_bin: lb_bin.to_path_buf(),
            dir,
            birds: Vec::new(),
            agent_args: Default::default(),
            agents: vec![None, None],
            servers: None,
        };
        pair(
            &e.router,
            "rc",
            "10.0.0.1/24",
            &e.client,
            "eth0",
            "10.0.0.2/24",
        )?;
        e.client
            .ip(&["route", "add", "default", "via", "10.0.0.1"])?;
        e.router.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv4.fib_multipath_hash_policy=1",
            // A next hop behind a link that went down is skipped at once (as a router's
            // hardware does), not only when BGP notices.
            "net.ipv4.conf.all.ignore_routes_with_linkdown=1",
        ])?;
        e._switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        e._switch.ip(&["link", "set", "br0", "up"])?;
        for (i, gw) in e.gateways.iter().enumerate() {
            let k = i + 1;
            pair(
                &e.router,
                &format!("r{k}"),
                &format!("10.2.{k}.1/24"),
                gw,
                "eth0",
                &format!("10.2.{k}.2/24"),
            )?;
            gw.ip(&["route", "add", "default", "via", &format!("10.2.{k}.1")])?;
            gw.sysctl(&[
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ])?;
            super::bridge_port(
                &e._switch,
                &format!("pg{k}"),
                gw,
                "eth1",
                &[&format!("10.1.0.{k}/24")],
            )?;
        }
        // Each gateway's way out if its uplink is cut: through the other gateway (over the
        // backend LAN), so that what it still receives — backends' replies — gets out.
        for (i, gw) in e.gateways.iter().enumerate() {
            let other = format!("10.1.0.{}", 2 - i);
            gw.ip(&["route", "add", "default", "via", &other, "metric", "100"])?;
        }
        for i in 1..=n {
            let b = NetNs::new(&format!("{prefix}-b{i}"))?;
            let addr = format!("10.1.0.{}", 10 + i);
            super::bridge_port(
                &e._switch,
                &format!("pb{i}"),
                &b,
                "eth0",
                &[&format!("{addr}/24")],
            )?;
            // Replies leave through either gateway (layer-4 hash).
            b.sysctl(&[
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
            ])?;
            b.ip(&[
                "route", "add", "default", "nexthop", "via", "10.1.0.1", "nexthop", "via",
                "10.1.0.2",
            ])?;
            for vip in vips {
                b.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
            }
            e.backends.push(Backend {
                name: format!("backend-{i}"),
                ns: b,
                v4: addr.parse().unwrap(),
                v6: "::".parse().unwrap(),
            });
        }
        e.servers = Some(Servers::start(&e.backends)?);
        e.start_birds()?;
        Ok(e)
    }

    fn bird_socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.ctl"))
    }

    /// The file gateway `i` (0-based)'s BIRD includes for the VIPs its agent announces.
    pub fn vips_include(&self, i: usize) -> PathBuf {
        self.dir.join(format!("gw{}-vips.conf", i + 1))
    }

    fn start_birds(&mut self) -> Result<()> {
        // BFD on every session (100 ms × 3): a gateway whose BIRD dies while its link stays up
        // is dropped within a third of a second, not when the BGP hold time runs out.
        let router_conf = "router id 10.0.0.1;\n\
            protocol device { scan time 1; }\n\
            protocol kernel { merge paths yes; ipv4 { import none; export all; }; }\n\
            protocol bfd { interface \"r*\" { interval 100 ms; multiplier 3; }; }\n\
            template bgp lbgw { local as 65000; hold time 3; keepalive time 1; connect retry time 1;\n\
              error wait time 1, 5; bfd on;\n\
              ipv4 { import all; export none; }; }\n\
            protocol bgp gw1 from lbgw { neighbor 10.2.1.2 as 65100; }\n\
            protocol bgp gw2 from lbgw { neighbor 10.2.2.2 as 65100; }\n";
        self.spawn_bird("rt", &self.router.name.clone(), router_conf)?;
        for i in 0..2 {
            let k = i + 1;
            let include = self.vips_include(i);
            std::fs::write(&include, crate::announce::render(&Default::default()))?;
            let conf = format!(
                "router id 10.2.{k}.2;\n\
                 protocol device {{ scan time 1; }}\n\
                 include \"{}\";\n\
                 protocol bfd {{ interface \"eth0\" {{ interval 100 ms; multiplier 3; }}; }}\n\
                 protocol bgp up {{ local 10.2.{k}.2 as 65100; neighbor 10.2.{k}.1 as 65000;\n\
                   hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 5; bfd on;\n\
                   ipv4 {{ import none; export where proto ~ \"lb_vips*\"; }}; }}\n",
                include.display()
            );
            let ns = self.gateways[i].name.clone();
            self.spawn_bird(&format!("gw{k}"), &ns, &conf)?;
        }
        Ok(())
    }

    fn spawn_bird(&mut self, name: &str, ns: &str, conf: &str) -> Result<()> {
        let path = self.dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf)?;
        let log = std::fs::File::create(self.dir.join(format!("{name}.bird.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "bird", "-f", "-c"])
            .arg(&path)
            .arg("-s")
            .arg(self.bird_socket(name))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting bird (is bird2 installed? cargo xtask setup installs it)")?;
        self.birds.push(Some(child));
        Ok(())
    }

    /// Kills gateway `i`'s BIRD (SIGKILL: no goodbye to the router), its link staying up.
    pub fn kill_bird(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.birds[i + 1].take() {
            // `ip netns exec` execs bird: the child is BIRD itself.
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Freezes gateway `i`'s BIRD (SIGSTOP: its sessions stay open but silent, as when a host
    /// hangs) or lets it go on (SIGCONT).
    pub fn freeze_bird(&mut self, i: usize, frozen: bool) -> Result<()> {
        let Some(c) = &self.birds[i + 1] else {
            bail!("gw{}'s BIRD is not running", i + 1);
        };
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: plain syscall on our child's pid.
        if unsafe { libc::kill(c.id() as i32, sig) } != 0 {
            bail!(
                "signalling gw{}'s BIRD: {}",
                i + 1,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Starts gateway `i`'s BIRD again (after `kill_bird`), with the same configuration.
    pub fn restart_bird(&mut self, i: usize) -> Result<()> {
        let name = format!("gw{}", i + 1);
        let conf = std::fs::read_to_string(self.dir.join(format!("{name}.conf")))?;
        let ns = self.gateways[i].name.clone();
        let _ = std::fs::remove_file(self.bird_socket(&name));
        self.spawn_bird(&name, &ns, &conf)?;
        // (spawn_bird appends; put it back in its place.)
        let c = self.birds.pop().flatten();
        self.birds[i + 1] = c;
        Ok(())
    }

    /// Packets the router forwarded to `dst` (address and TCP port) so far: an nftables
    /// counter on its forward hook, added on first use.
    pub fn router_forwarded(&self, dst: std::net::SocketAddr) -> Result<u64> {
        let set = format!("lbtb_{}", dst.port());
        let nft = |args: &str| -> Result<String> {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.router.name, "nft"])
                .args(args.split(' '))
                .output()?;
            if !out.status.success() {
                bail!("nft {args}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        if nft(&format!("list chain inet {set} lbfwd")).is_err() {
            nft(&format!("add table inet {set}"))?;
            nft(&format!(
                "add chain inet {set} lbfwd {{ type filter hook forward priority 0 ; }}"
            ))?;
            nft(&format!(
                "add rule inet {set} lbfwd ip daddr {} tcp dport {} counter",
                dst.ip(),
                dst.port()
            ))?;
        }
        let text = nft(&format!("list chain inet {set} lbfwd"))?;
        let n = text
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .context("reading the router's counter")?;
        Ok(n)
    }

    /// Writes the agents' configuration (the same on both gateways).
    pub fn write_config(&self, text: &str) -> Result<PathBuf> {
        let p = self.dir.join("lb.toml");
        let tmp = self.dir.join("lb.toml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &p)?;
        Ok(p)
    }

    fn pin_dir(&self, i: usize) -> String {
        format!("/sys/fs/bpf/{}-gw{}", self.prefix, i + 1)
    }

    /// The agent's log of gateway `i`.
    pub fn agent_log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("gw{}-agent.log", i + 1))
    }

    /// Starts the agent on gateway `i` (attaching lb to both its interfaces, generic XDP).
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log(i))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.gateways[i].name))
            .arg(&self.lb_bin)
            .arg("run")
            .arg("-f")
            .arg(self.dir.join("lb.toml"))
            .args([
                "--attach",
                "eth0",
                "--attach",
                "eth1",
                "--mode",
                "generic",
                "--metrics",
                "off",
                "--poll",
                "200ms",
                "--table-capacity",
                "65536",
                "--conntrack-size",
                "65536",
            ])
            .arg("--bird-include")
            .arg(self.vips_include(i))
            .arg("--bird-socket")
            .arg(self.bird_socket(&format!("gw{}", i + 1)))
            .args(&self.agent_args[i])
            .env("LB_PIN_DIR", self.pin_dir(i))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting lb run")?;
        self.agents[i] = Some(child);
        Ok(())
    }

    /// Stops the agent on gateway `i` with SIGTERM (its VIPs stay announced unless it runs
    /// with `--withdraw-on-exit`) and waits for it.
    pub fn stop_agent(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.agents[i].take() {
            // SAFETY: plain syscall on our child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while c.try_wait()?.is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    bail!("the agent on gw{} did not stop", i + 1);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// `lb …` on gateway `i`; stdout.
    pub fn lb(&self, i: usize, args: &[&str]) -> Result<String> {
        super::run_lb(&self.lb_bin, &self.gateways[i], &self.pin_dir(i), args)
    }

    /// `lb … --json` on gateway `i`, parsed.
    pub fn lb_json(&self, i: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.lb(i, &a)?).context("lb printed invalid JSON")
    }

    /// `lb decap attach eth0` on every backend.
    pub fn decap_on_backends(&self) -> Result<()> {
        for b in &self.backends {
            let pin_dir = format!("/sys/fs/bpf/{}", b.ns.name);
            let args = [
                "decap",
                "attach",
                "eth0",
                "--mode",
                "generic",
                "--from",
                "172.16.0.0/16",
                "--from",
                "100::/64",
            ];
            super::run_lb(&self.lb_bin, &b.ns, &pin_dir, &args)?;
        }
        Ok(())
    }

    /// The router's next hops for `vip` now (from its kernel routing table).
    pub fn router_next_hops(&self, vip: IpAddr) -> Result<Vec<IpAddr>> {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.router.name,
                "-j",
                "route",
                "show",
                &format!("{vip}/32"),
            ])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mut hops = Vec::new();
        for r in v.as_array().into_iter().flatten() {
            if let Some(g) = r["gateway"].as_str() {
                hops.push(g.parse()?);
            }
            for nh in r["nexthops"].as_array().into_iter().flatten() {
                if let Some(g) = nh["gateway"].as_str() {
                    hops.push(g.parse()?);
                }
            }
        }
        hops.sort();
        Ok(hops)
    }

    /// Cuts (or restores) gateway `i`'s uplink to the router.
    pub fn set_uplink(&self, i: usize, up: bool) -> Result<()> {
        let gw = &self.gateways[i];
        gw.ip(&["link", "set", "eth0", if up { "up" } else { "down" }])?;
        if up {
            // The kernel dropped the route through the link when it went down.
            gw.ip(&[
                "route",
                "replace",
                "default",
                "via",
                &format!("10.2.{}.1", i + 1),
                "metric",
                "0",
            ])?;
        }
        Ok(())
    }

    /// A TCP request–response service client in the client namespace: see `Testbed`.
    pub fn as_client(&self) -> super::Client<'_> {
        super::Client {
            ns: &self.client,
            v4: "10.0.0.2".parse().unwrap(),
            v6: "::".parse().unwrap(),
        }
    }
}

impl Drop for Ecmp {
    fn drop(&mut self) {
        for a in self.agents.iter_mut().flatten() {
            let _ = a.kill();
            let _ = a.wait();
        }
        for b in self.birds.iter_mut().flatten() {
            let _ = b.kill();
            let _ = b.wait();
        }
        if let Some(s) = self.servers.take() {
            s.stop();
        }
        super::cleanup_prefix(&format!("{}-", self.prefix));
        for i in 0..2 {
            let pin = PathBuf::from(self.pin_dir(i));
            let _ = crate::announce::forget_record_here(&pin);
        }
        if std::thread::panicking() {
            for i in 0..2 {
                eprintln!(
                    "---- gw{} agent log ----\n{}",
                    i + 1,
                    std::fs::read_to_string(self.agent_log(i)).unwrap_or_default()
                );
            }
            for name in ["rt", "gw1", "gw2"] {
                eprintln!(
                    "---- {name} bird log ----\n{}",
                    std::fs::read_to_string(self.dir.join(format!("{name}.bird.log")))
                        .unwrap_or_default()
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A veth pair between two namespaces with IPv4 addresses.
fn pair(a: &NetNs, a_if: &str, a_addr: &str, b: &NetNs, b_if: &str, b_addr: &str) -> Result<()> {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    a.ip(&["addr", "add", a_addr, "dev", a_if])?;
    b.ip(&["addr", "add", b_addr, "dev", b_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    for (ns, i) in [(a, a_if), (b, b_if)] {
        ns.exec(&["ethtool", "-K", i, "tx", "off", "gro", "on"])?;
    }
    Ok(())
}
