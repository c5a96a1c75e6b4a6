//! The command line. Verbs follow ipvsadm and katranc: a VIP is `ADDRESS:PORT/PROTOCOL`,
//! a backend `ADDRESS:PORT`, IPv6 in brackets.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use lb::{model::parse_socket_addr, Vip};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "lb: an XDP layer-4 load balancer",
    long_about = "lb: an XDP layer-4 load balancer.\n\nThe data plane and its state live in the kernel, pinned under a BPF filesystem \
directory; every lb command works on that state and exits. Exit codes: 0 success, 1 runtime error \
(state, kernel, system), 2 usage error (bad command line or configuration file).",
    after_help = "Example:\n  lb attach eth0\n  lb vip add 10.100.0.100:80/tcp\n  lb backend add 10.100.0.100:80/tcp 10.200.0.11:8080 --weight 3\n  lb stats"
)]
pub struct Cli {
    /// Pin directory on a BPF filesystem (several instances, e.g. one per network namespace,
    /// use different directories).
    #[arg(long, global = true, env = "LB_PIN_DIR", default_value = lb::pin::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the program (once), attach it to interfaces and pin everything; traffic keeps
    /// flowing after lb exits.
    #[command(after_help = "Example:\n  lb attach eth0 eth1\n  lb attach veth0 --mode generic")]
    Attach {
        /// Interfaces to attach to.
        #[arg(required = true)]
        ifaces: Vec<String>,
        /// native: XDP in the driver; tc: the same data plane as a tc program (any Ethernet
        /// interface, correct with every kind of checksum, slower); generic: XDP in the network
        /// stack (can corrupt the checksums of GRO-merged and locally generated packets);
        /// auto: native, or tc where the driver has no native XDP (never generic).
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        #[command(flatten)]
        sizes: Sizes,
        /// The secret flow-hash seed, 32-bit hex (e.g. 0x1a2b3c4d): every gateway behind one
        /// ECMP group needs the same. Default at first load: a random one (see `lb show-config`).
        /// Changing it re-hashes new flows.
        #[arg(long, value_name = "HEX", value_parser = hash_seed)]
        hash_seed: Option<u32>,
        /// New flows per second per CPU above which unconfirmed flows are no longer stored
        /// (flood protection); 0 = no limit. Default at first load: 125000.
        #[arg(long, value_name = "N")]
        flood_threshold: Option<u32>,
        /// How long (ms) the data plane uses a next hop it looked up before looking it up
        /// again: the longest a changed neighbour or route goes unnoticed. 0 = no cache (a
        /// route lookup for every packet). Default at first load: 100.
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(0..=lb_common::MAX_NEXTHOP_MAX_AGE_MS as i64))]
        nexthop_max_age_ms: Option<u32>,
    },
    /// Detach from interfaces (all of them if none is named); --purge also removes the
    /// program and all state (VIPs, backends, conntrack, counters).
    #[command(after_help = "Example:\n  lb detach eth1\n  lb detach --purge")]
    Detach {
        ifaces: Vec<String>,
        #[arg(long)]
        purge: bool,
    },
    /// Where lb is attached, the program id and how full the maps are.
    #[command(after_help = "Example:\n  lb status\n  lb status --json")]
    Status,
    /// Manage virtual services.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Manage the backends of a virtual service.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Counters: per VIP and per backend, and the global verdict counters.
    #[command(after_help = "Example:\n  lb stats\n  lb stats --watch 2\n  lb stats --json")]
    Stats {
        /// Redraw every SECONDS with rates, until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1")]
        watch: Option<u64>,
    },
    /// Connection-tracking entries (flow → backend) of both tables, optionally of one VIP:
    /// client, VIP, backend, state (opening, established, closing, closed, udp), age (seconds
    /// since the last packet) and whether the flow is confirmed.
    #[command(after_help = "Example:
  lb flows
  lb flows 10.100.0.100:80/tcp --json
  lb flows --sweep        # first delete expired and stale entries and settle active counts")]
    Flows {
        vip: Option<Vip>,
        /// First sweep both tables once: delete the entries past their timeout or whose VIP or
        /// backend is gone, and settle every backend's active-flow count (to the flows found
        /// when none opens or closes meanwhile; taking off the ones evicted from the table).
        /// Prints a summary on stderr.
        #[arg(long)]
        sweep: bool,
    },
    /// A VIP's selection table: each backend's share of the slots against its weight.
    #[command(
        after_help = "Example:\n  lb table 10.100.0.100:80/tcp\n  lb table 10.100.0.100:80/tcp --digest   # compare gateways behind ECMP"
    )]
    Table {
        vip: Vip,
        /// Print only the SHA-256 of the selection (slot → backend endpoint): equal on every
        /// gateway with the same configuration.
        #[arg(long)]
        digest: bool,
    },
    /// The next-hop cache the data plane keeps from its own route lookups (each used for at
    /// most the maximum age, `nexthop_max_age_ms`): show or empty it.
    #[command(subcommand)]
    Nexthop(NexthopCommand),
    /// Make the kernel state equal to a configuration file, with the fewest changes.
    #[command(
        after_help = "Example:\n  lb apply -f /etc/lb/lb.toml\n  lb show-config > a.toml && lb apply -f a.toml   # changes nothing"
    )]
    Apply {
        /// The configuration file (TOML; see `lb show-config` for the format).
        #[arg(short, long)]
        file: PathBuf,
        #[command(flatten)]
        sizes: Sizes,
    },
    /// Print the current state as a configuration file.
    #[command(
        name = "show-config",
        after_help = "Example:\n  lb show-config > lb.toml"
    )]
    ShowConfig,
    /// Verify the pinned state's invariants: tables name backends of their own VIP and are what
    /// the backends and weights give; reverse-NAT entries match backends; the port filter
    /// matches VIPs and backends; ids and generations are consistent. Exits 1 naming each
    /// violation (`lb apply` repairs what an interrupted command left).
    #[command(after_help = "Example:\n  lb check && echo consistent")]
    Check,
    /// Run the agent: apply the file and keep it applied as it changes, health-check backends
    /// (taking failed ones out of the tables), drain removed backends, serve metrics. Stopping
    /// or killing it leaves the data plane forwarding; a new agent adopts the pinned state.
    #[command(after_help = "Example:
  lb run -f /etc/lb/lb.toml --attach eth0 --metrics 127.0.0.1:9650
  RUST_LOG=debug lb run -f lb.toml

SIGHUP re-reads the file at once; SIGTERM/SIGINT stop the agent (not the data plane).")]
    Run {
        /// The configuration file, watched for changes.
        #[arg(short, long)]
        file: PathBuf,
        /// Serve Prometheus metrics at http://ADDR/metrics ("off" to disable).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9650")]
        metrics: String,
        /// Attach to these interfaces if lb is not attached to them yet.
        #[arg(long, value_name = "IFACE")]
        attach: Vec<String>,
        /// Mode for --attach (auto: native, or tc where the driver has no native XDP).
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// How often the file is checked for changes (and drains for progress).
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration)]
        poll: std::time::Duration,
        /// Announce the VIPs this node can serve through BIRD: write them as static routes to
        /// this file (which bird.conf includes) and reload BIRD.
        #[arg(long, value_name = "FILE", requires = "bird_socket")]
        bird_include: Option<std::path::PathBuf>,
        /// BIRD's control socket (birdc -s).
        #[arg(long, value_name = "PATH", requires = "bird_include")]
        bird_socket: Option<std::path::PathBuf>,
        /// Withdraw every VIP from BIRD when the agent stops (to drain this gateway). By
        /// default a stopping agent keeps the routes: the data plane keeps forwarding, and a
        /// restart must not move flows.
        #[arg(long, requires = "bird_include")]
        withdraw_on_exit: bool,
        #[command(flatten)]
        sizes: Sizes,
    },
    /// On a backend of ipip VIPs: the program that strips lb's outer header (this kernel needs
    /// no ipip module), so the inner packet reaches the VIP held on a loopback interface.
    #[command(subcommand)]
    Decap(DecapCommand),
    /// Replace the running XDP program (by default with the one built into this lb) without
    /// losing state: the new program uses the pinned maps and every link switches atomically.
    #[command(after_help = "Example:
  lb upgrade
  lb upgrade --object ./lb-xdp.o")]
    Upgrade {
        /// An lb XDP object file to load instead of the built-in one.
        #[arg(long)]
        object: Option<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    #[command(
        after_help = "Example:\n  lb completions bash > /usr/share/bash-completion/completions/lb\n  source <(lb completions bash)"
    )]
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (lb(1) and one per subcommand) into a directory (packaging).
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// Withdraw the VIPs an agent recorded for PIN_DIR, or with --forget remove its record:
    /// what root's `lb detach` runs as the record's owner (lb::announce).
    #[command(hide = true)]
    WithdrawRecorded {
        pin_dir: PathBuf,
        #[arg(long)]
        forget: bool,
    },
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

#[derive(Subcommand)]
pub enum VipCommand {
    /// Add a VIP (ADDRESS:PORT/PROTOCOL) with an empty selection table.
    #[command(
        after_help = "Example:\n  lb vip add 10.100.0.100:80/tcp\n  lb vip add [2001:db8::100]:443/tcp --table-size 4099"
    )]
    Add {
        vip: Vip,
        /// Slots in the selection table: a prime, at least 10 per backend.
        #[arg(long, default_value_t = lb_common::DEFAULT_TABLE_SIZE)]
        table_size: u32,
        #[command(flatten)]
        algo: AlgoArgs,
        /// How packets reach the backends: nat (rewrite address and port; replies return
        /// through lb), dsr-l2 (rewrite the MAC; backends on this L2 segment answer clients
        /// directly) or ipip (encapsulate; backends decapsulate, see `lb decap`, and answer
        /// directly).
        #[arg(long, default_value = "nat", value_parser = forward)]
        forward: lb::model::Forward,
        /// tracked: a backend's reply is rewritten only for a flow this gateway saw; stateless:
        /// also when the VIP's table gives the flow to that backend (several gateways behind
        /// ECMP; maglev or source-hash only).
        #[arg(long, value_enum, default_value_t = Reverse::Tracked)]
        reverse: Reverse,
        /// A flow timeout, STATE=SECONDS (repeatable; states opening, established, closing,
        /// closed, udp; 0 = never; at most 7 days). The others keep their defaults.
        #[arg(long, value_name = "STATE=SECONDS")]
        timeout: Vec<String>,
        #[command(flatten)]
        sizes: Sizes,
    },
    /// Change how a VIP's new flows pick their backend (established flows keep theirs), or how
    /// packets reach its backends (established flows break: change the mode of an idle VIP).
    #[command(
        after_help = "Example:\n  lb vip set 10.100.0.100:80/tcp --algo round-robin\n  lb vip set 10.100.0.100:80/tcp --algo source-hash --source-prefix 24\n  lb vip set 10.100.0.100:80/tcp --forward ipip"
    )]
    Set {
        vip: Vip,
        /// maglev, random, round-robin, source-hash or least-conn.
        #[arg(long, required_unless_present_any = ["forward", "reverse", "timeout"])]
        algo: Option<String>,
        /// source-hash only: hash the first N bits of the client address.
        #[arg(long, value_name = "BITS", requires = "algo")]
        source_prefix: Option<u8>,
        /// nat, dsr-l2 or ipip.
        #[arg(long, value_parser = forward)]
        forward: Option<lb::model::Forward>,
        /// tracked or stateless reverse NAT (see `lb vip add --help`).
        #[arg(long, value_enum)]
        reverse: Option<Reverse>,
        /// A flow timeout, STATE=SECONDS (repeatable; see `lb vip add --help`); the states not
        /// named keep their current timeouts. Applies to existing flows too.
        #[arg(long, value_name = "STATE=SECONDS")]
        timeout: Vec<String>,
    },
    /// Remove a VIP and its backends.
    #[command(after_help = "Example:\n  lb vip del 10.100.0.100:80/tcp")]
    Del { vip: Vip },
    /// List VIPs.
    #[command(after_help = "Example:\n  lb vip list --json")]
    List,
}

#[derive(Subcommand)]
pub enum BackendCommand {
    /// Add a backend (ADDRESS:PORT) to a VIP.
    #[command(
        after_help = "Example:\n  lb backend add 10.100.0.100:80/tcp 10.200.0.11:8080 --weight 3"
    )]
    Add {
        vip: Vip,
        #[arg(value_parser = backend_addr)]
        backend: SocketAddr,
        /// Relative weight, 0..=65535 (0 drains: no new flows).
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Remove a backend; its flows move to other backends on their next packet. With --drain,
    /// first stop its new flows and wait until it has no active flow, has been idle for 10 s,
    /// or --timeout passes.
    #[command(
        after_help = "Example:\n  lb backend del 10.100.0.100:80/tcp 10.200.0.11:8080\n  lb backend del 10.100.0.100:80/tcp 10.200.0.11:8080 --drain --timeout 5m"
    )]
    Del {
        vip: Vip,
        #[arg(value_parser = backend_addr)]
        backend: SocketAddr,
        /// Drain before removing (weight 0, wait for the flows to end).
        #[arg(long)]
        drain: bool,
        /// --drain: the longest wait.
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration, requires = "drain")]
        timeout: std::time::Duration,
    },
    /// Change a backend's weight (--weight 0 drains it: established flows continue), or mark
    /// it up or down by hand (what the agent's health checks do).
    #[command(
        after_help = "Example:\n  lb backend set 10.100.0.100:80/tcp 10.200.0.11:8080 --weight 0\n  lb backend set 10.100.0.100:80/tcp 10.200.0.11:8080 --health up"
    )]
    Set {
        vip: Vip,
        #[arg(value_parser = backend_addr)]
        backend: SocketAddr,
        #[arg(long, required_unless_present = "health")]
        weight: Option<u32>,
        /// up: back in the selection table; down: out of it (established flows stay).
        #[arg(long, value_enum)]
        health: Option<HealthArg>,
    },
    /// List backends, of one VIP or of all.
    #[command(after_help = "Example:\n  lb backend list 10.100.0.100:80/tcp")]
    List { vip: Option<Vip> },
}

#[derive(Subcommand)]
pub enum DecapCommand {
    /// Attach the decapsulation program to interfaces.
    #[command(
        after_help = "Only lb's encapsulation to this backend's VIPs is stripped: the outer source in a --from prefix, the outer destination an address of this host, the inner destination a VIP (--vip, or by default the addresses on lo other than 127/8 and ::1). Attaching again rewrites what is accepted.\n\nExample:\n  lb decap attach eth0 --from 172.16.0.0/16 --from 100::/64\n  lb decap attach eth0 --mode generic --from 172.16.0.0/16 --vip 10.100.0.100"
    )]
    Attach {
        #[arg(required = true)]
        ifaces: Vec<String>,
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// The gateways' encapsulation prefix (repeat for several): lb encapsulates from
        /// 172.16.0.0/16 (IPv4) and 100::/64 (IPv6).
        #[arg(long, value_name = "PREFIX")]
        from: Vec<String>,
        /// A VIP this backend serves (repeat for several; default: the addresses on lo).
        #[arg(long, value_name = "ADDR")]
        vip: Vec<std::net::IpAddr>,
    },
    /// Change what it accepts, where it is attached (without detaching: ipip traffic keeps
    /// flowing).
    #[command(
        after_help = "Example:\n  lb decap set --from 172.16.0.0/16 --vip 10.100.0.100 --vip 10.100.0.101"
    )]
    Set {
        /// The gateways' encapsulation prefix (repeat for several).
        #[arg(long, value_name = "PREFIX")]
        from: Vec<String>,
        /// A VIP this backend serves (repeat; default: the addresses on lo).
        #[arg(long, value_name = "ADDR")]
        vip: Vec<std::net::IpAddr>,
    },
    /// Detach it (from all interfaces if none is named).
    #[command(after_help = "Example:\n  lb decap detach eth0")]
    Detach { ifaces: Vec<String> },
    /// Where it is attached and its counters.
    #[command(after_help = "Example:\n  lb decap status --json")]
    Status,
}

#[derive(Subcommand)]
pub enum NexthopCommand {
    /// Each backend's cached next hop: egress interface, MAC, age (the freshest CPU's entry).
    #[command(after_help = "Example:\n  lb nexthop show --json")]
    Show,
    /// Empty the cache: each backend's next packet is routed by a lookup again (which caches
    /// its answer anew).
    #[command(after_help = "Example:\n  lb nexthop clear")]
    Clear,
}

/// The scheduling algorithm of a VIP.
#[derive(clap::Args, Clone)]
pub struct AlgoArgs {
    /// maglev (weighted consistent hash, default), random, round-robin (smooth weighted, per
    /// CPU) or source-hash (all flows of a client address on one backend).
    #[arg(long, default_value = "maglev")]
    pub algo: String,
    /// source-hash only: hash the first N bits of the client address, so a whole client subnet
    /// sticks together (default: the whole address).
    #[arg(long, value_name = "BITS")]
    pub source_prefix: Option<u8>,
}

impl AlgoArgs {
    pub fn algorithm(&self) -> Result<lb::Algorithm, super::Failure> {
        lb::Algorithm::parse(&self.algo, self.source_prefix).map_err(|e| super::Failure::Usage(e.0))
    }
}

/// Map sizes, used only when the program is first loaded.
#[derive(clap::Args, Clone, Copy)]
pub struct Sizes {
    /// Slots of the table array shared by all VIPs (fixed when lb is first loaded).
    #[arg(long, default_value_t = lb_common::DEFAULT_TABLE_CAPACITY)]
    pub table_capacity: u32,
    /// Entries of the connection-tracking table of confirmed flows (fixed when lb is first
    /// loaded).
    #[arg(long, default_value_t = lb_common::DEFAULT_CT_CAPACITY)]
    pub conntrack_size: u32,
    /// Entries of the table of flows not yet confirmed (handshake not completed, no reply
    /// yet), kept apart so that a flood cannot evict confirmed flows (fixed when lb is first
    /// loaded).
    #[arg(long, default_value_t = lb_common::DEFAULT_CT_NEW_CAPACITY)]
    pub conntrack_new_size: u32,
}

impl Sizes {
    pub fn load_options(&self) -> lb::LoadOptions {
        lb::LoadOptions {
            table_capacity: self.table_capacity,
            ct_capacity: self.conntrack_size,
            ct_new_capacity: self.conntrack_new_size,
            ..Default::default()
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Reverse {
    Tracked,
    Stateless,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum HealthArg {
    Up,
    Down,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    /// XDP in the driver: the fastest.
    Native,
    /// XDP in the generic stack: can corrupt partial checksums (GRO, locally generated
    /// packets); only where every packet arrives with a finished checksum.
    Generic,
    /// The same data plane as a tc ingress program: correct on every device (lb attach only).
    Tc,
    /// Native where the driver supports it, else tc (lb decap: else generic).
    Auto,
}

fn forward(s: &str) -> Result<lb::model::Forward, String> {
    lb::model::Forward::parse(s).map_err(|e| e.0)
}

fn hash_seed(s: &str) -> Result<u32, String> {
    lb::model::parse_hash_seed(s).map_err(|e| e.0)
}

fn backend_addr(s: &str) -> Result<SocketAddr, String> {
    parse_socket_addr(s, "backend").map_err(|e| e.0)
}
