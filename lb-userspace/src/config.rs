//! The declarative configuration (`lb.toml`): parse and validate it completely before touching
//! the kernel, apply it with the fewest changes, and print the kernel state in the same format.
//!
//! ```toml
//! hash_seed = "0x1a2b3c4d"      # optional: the secret flow-hash seed (same on every gateway)
//! flood_threshold = 125000      # optional: new flows/s per CPU stored at most (0 = no limit)
//! nexthop_max_age_ms = 100      # optional: how long a looked-up next hop is used (0 = no cache)
//!
//! [[vip]]
//! address = "10.100.0.100:80/tcp"
//! table_size = 65537            # optional, a prime; default 65537
//!
//! forward = "nat"              # optional: nat (default) | dsr-l2 | ipip
//! reverse = "tracked"          # optional: tracked (default) | stateless (ECMP gateways)
//! when_all_down = "fail-open"  # optional: fail-open (default) | drop | withdraw
//! drain_timeout = "5m"          # optional (agent): how long a removed backend drains
//!
//! [vip.health]                  # optional (agent): health checks of every backend
//! check = "http"                # tcp | http | https | udp
//! path = "/healthz"             # http(s); expect_status = 200, host = "…" optional
//! interval = "2s"               # timeout = "1s", rise = 2, fall = 3, port = backend's
//!
//! [vip.timeouts]                # optional: flow timeouts in seconds (0 = never)
//! established = 7200            # opening, established, closing, closed, udp
//!
//! [[vip.backend]]
//! address = "10.200.0.11:8080"
//! weight = 3                    # optional, default 1; 0 drains
//! ```

use std::{collections::HashMap, fmt::Write as _, net::SocketAddr, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    error::{LbError, MAX_WEIGHT, MIN_SLOTS_PER_BACKEND},
    health::{CheckKind, HealthCheck},
    model::{parse_socket_addr, Vip},
    state::{check_table_size, LbMaps},
};
use lb_common::{Timeouts, DEFAULT_TABLE_SIZE, MAX_BACKENDS, MAX_VIPS};

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The flow-hash seed (`hash_seed`); None: leave the one in the maps.
    pub hash_seed: Option<u32>,
    /// The flood threshold (`flood_threshold`); None: leave the one in the maps.
    pub flood_threshold: Option<u32>,
    /// How long the data plane uses a next hop it looked up, ms (`nexthop_max_age_ms`; 0: no
    /// cache); None: leave the one in the maps.
    pub nexthop_max_age_ms: Option<u32>,
    pub vips: Vec<VipConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipConfig {
    pub vip: Vip,
    pub algorithm: crate::model::Algorithm,
    pub forward: crate::model::Forward,
    pub table_size: u32,
    pub backends: Vec<(SocketAddr, u32)>,
    /// Every backend with a weight down: drop new flows (true) or fail open (false).
    pub drop_when_all_down: bool,
    /// Every backend with a weight down: withdraw the VIP from BGP (failing open meanwhile).
    pub withdraw_when_all_down: bool,
    /// Replies without a conntrack entry here are checked against the table (ECMP gateways).
    pub stateless_reverse: bool,
    /// Health checks of the backends (run by the agent, `lb run`).
    pub health: Option<HealthCheck>,
    /// How long the agent lets a backend removed from the file drain before removing it.
    pub drain_timeout: Duration,
    /// Flow timeouts (`[vip.timeouts]`).
    pub timeouts: Timeouts,
}

/// Default `drain_timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// A configuration error, with the 1-based line it is about.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    hash_seed: Option<Spanned<String>>,
    flood_threshold: Option<Spanned<u32>>,
    nexthop_max_age_ms: Option<Spanned<u32>>,
    #[serde(default)]
    vip: Vec<RawVip>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: Spanned<String>,
    algorithm: Option<Spanned<String>>,
    forward: Option<Spanned<String>>,
    reverse: Option<Spanned<String>>,
    source_prefix: Option<Spanned<u8>>,
    table_size: Option<Spanned<u32>>,
    when_all_down: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    health: Option<Spanned<RawHealth>>,
    timeouts: Option<Spanned<RawTimeouts>>,
    #[serde(default)]
    backend: Vec<RawBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    opening: Option<Spanned<u64>>,
    established: Option<Spanned<u64>>,
    closing: Option<Spanned<u64>>,
    closed: Option<Spanned<u64>>,
    udp: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Spanned<String>,
    port: Option<Spanned<u16>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    expect_status: Option<Spanned<u16>>,
    send: Option<Spanned<String>>,
    expect: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    weight: Option<Spanned<u32>>,
}

impl Config {
    /// Parses and validates `text` (named `file` in errors).
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let err = |offset: usize, message: String| ConfigError {
            file: file.to_string(),
            line: line_of(offset),
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            err(offset, e.message().to_string())
        })?;
        let hash_seed = match &raw.hash_seed {
            None => None,
            Some(s) => Some(
                crate::model::parse_hash_seed(s.get_ref()).map_err(|e| err(s.span().start, e.0))?,
            ),
        };
        let flood_threshold = raw.flood_threshold.as_ref().map(|f| *f.get_ref());
        let nexthop_max_age_ms = match &raw.nexthop_max_age_ms {
            Some(a) if *a.get_ref() > lb_common::MAX_NEXTHOP_MAX_AGE_MS => {
                return Err(err(
                    a.span().start,
                    format!(
                    "nexthop_max_age_ms = {} is too long (at most {} ms; 0 turns the cache off)",
                    a.get_ref(),
                    lb_common::MAX_NEXTHOP_MAX_AGE_MS
                ),
                ))
            }
            a => a.as_ref().map(|a| *a.get_ref()),
        };
        let mut vips: Vec<VipConfig> = Vec::new();
        // backend endpoint (address, protocol) → the VIPs that have it (and whether each has
        // stateless reverse NAT), across the whole file
        let mut owners: HashMap<(SocketAddr, crate::Proto), Vec<(Vip, bool)>> = HashMap::new();
        let mut total_backends = 0usize;
        for rv in raw.vip {
            let vip: Vip = rv
                .address
                .get_ref()
                .parse()
                .map_err(|e: crate::model::ParseError| err(rv.address.span().start, e.0))?;
            if vips.iter().any(|v| v.vip == vip) {
                return Err(err(
                    rv.address.span().start,
                    format!("VIP {vip} is listed twice"),
                ));
            }
            let table_size = match &rv.table_size {
                Some(s) => {
                    check_table_size(*s.get_ref())
                        .map_err(|e| err(s.span().start, e.to_string()))?;
                    *s.get_ref()
                }
                None => DEFAULT_TABLE_SIZE,
            };
            let forward = match &rv.forward {
                None => crate::model::Forward::Nat,
                Some(f) => crate::model::Forward::parse(f.get_ref())
                    .map_err(|e| err(f.span().start, e.0))?,
            };
            let mut backends: Vec<(SocketAddr, u32)> = Vec::new();
            // where each backend is written, for the sharing checks below
            let mut backend_at: Vec<usize> = Vec::new();
            for rb in &rv.backend {
                let at = rb.address.span().start;
                let addr =
                    parse_socket_addr(rb.address.get_ref(), "backend").map_err(|e| err(at, e.0))?;
                forward
                    .check_backend(&vip, addr)
                    .map_err(|e| err(at, e.to_string()))?;
                if backends.iter().any(|(a, _)| *a == addr) {
                    return Err(err(
                        at,
                        format!("backend {addr} of VIP {vip} is listed twice"),
                    ));
                }
                let weight = match &rb.weight {
                    Some(w) if *w.get_ref() > MAX_WEIGHT => {
                        return Err(err(
                            w.span().start,
                            LbError::WeightOutOfRange(*w.get_ref()).to_string(),
                        ))
                    }
                    Some(w) => *w.get_ref(),
                    None => 1,
                };
                backend_at.push(at);
                backends.push((addr, weight));
            }
            let active = backends.iter().filter(|(_, w)| *w > 0).count() as u32;
            if active > 0 && table_size / MIN_SLOTS_PER_BACKEND < active {
                let at = rv
                    .table_size
                    .as_ref()
                    .map_or(rv.address.span().start, |s| s.span().start);
                return Err(err(
                    at,
                    LbError::TableTooSmall {
                        size: table_size,
                        backends: active,
                        need: active * MIN_SLOTS_PER_BACKEND,
                    }
                    .to_string(),
                ));
            }
            let algorithm = match &rv.algorithm {
                Some(a) => crate::model::Algorithm::parse(
                    a.get_ref(),
                    rv.source_prefix.as_ref().map(|p| *p.get_ref()),
                )
                .map_err(|e| err(a.span().start, e.0))?,
                None => match &rv.source_prefix {
                    Some(p) => {
                        return Err(err(
                            p.span().start,
                            "source_prefix needs algorithm = \"source-hash\"".into(),
                        ))
                    }
                    None => crate::model::Algorithm::Maglev,
                },
            };
            if let (Some(p), crate::model::Algorithm::SourceHash { prefix_len }) =
                (&rv.source_prefix, algorithm)
            {
                let max = if vip.addr.is_ipv4() { 32 } else { 128 };
                if prefix_len > max {
                    return Err(err(
                        p.span().start,
                        format!("source prefix /{prefix_len} is longer than the VIP's addresses"),
                    ));
                }
            }
            if algorithm == crate::model::Algorithm::LeastConn && vip.proto != crate::Proto::Tcp {
                let at = rv
                    .algorithm
                    .as_ref()
                    .map_or(rv.address.span().start, |a| a.span().start);
                return Err(err(at, LbError::LeastConnNeedsTcp(vip).to_string()));
            }
            if algorithm == crate::model::Algorithm::RoundRobin {
                let weights: Vec<u32> = backends.iter().map(|(_, w)| *w).collect();
                let len = crate::schedule::sequence_len(&weights);
                if len > table_size as u64 {
                    let at = rv
                        .algorithm
                        .as_ref()
                        .map_or(rv.address.span().start, |a| a.span().start);
                    return Err(err(
                        at,
                        LbError::RoundRobinTooLong {
                            len,
                            size: table_size,
                        }
                        .to_string(),
                    ));
                }
            }
            let stateless_reverse = match &rv.reverse {
                None => false,
                Some(r) => match r.get_ref().as_str() {
                    "tracked" => false,
                    "stateless" => {
                        if !matches!(
                            algorithm,
                            crate::model::Algorithm::Maglev
                                | crate::model::Algorithm::SourceHash { .. }
                        ) {
                            return Err(err(
                                r.span().start,
                                LbError::StatelessReverseNeedsHash(vip).to_string(),
                            ));
                        }
                        true
                    }
                    other => {
                        return Err(err(
                            r.span().start,
                            format!("unknown reverse {other:?} (use \"tracked\" or \"stateless\")"),
                        ))
                    }
                },
            };
            let (drop_when_all_down, withdraw_when_all_down) = match &rv.when_all_down {
                None => (false, false),
                Some(s) => match s.get_ref().as_str() {
                    "fail-open" => (false, false),
                    "drop" => (true, false),
                    "withdraw" => (false, true),
                    other => {
                        return Err(err(
                            s.span().start,
                            format!(
                                "unknown when_all_down {other:?} (use \"fail-open\", \"drop\" or \"withdraw\")"
                            ),
                        ))
                    }
                },
            };
            let drain_timeout = match &rv.drain_timeout {
                None => DEFAULT_DRAIN_TIMEOUT,
                Some(s) => parse_duration("drain_timeout", s.get_ref())
                    .map_err(|m| err(s.span().start, m))?,
            };
            let health = match &rv.health {
                None => None,
                Some(h) => Some(
                    parse_health(h.get_ref(), vip.proto)
                        .map_err(|(offset, m)| err(offset.unwrap_or(h.span().start), m))?,
                ),
            };
            let timeouts = match &rv.timeouts {
                None => Timeouts::DEFAULT,
                Some(t) => parse_timeouts(t.get_ref()).map_err(|(offset, m)| err(offset, m))?,
            };
            // One backend endpoint may serve several VIPs, but at most MAX_VIPS_PER_BACKEND,
            // and none besides a VIP with stateless reverse NAT.
            for ((addr, _), at) in backends.iter().zip(&backend_at) {
                let others = owners.entry((*addr, vip.proto)).or_default();
                if let Some(e) = crate::state::sharing_error(&vip, stateless_reverse, *addr, others)
                {
                    return Err(err(*at, e.to_string()));
                }
                others.push((vip, stateless_reverse));
            }
            total_backends += backends.len();
            vips.push(VipConfig {
                vip,
                algorithm,
                forward,
                table_size,
                backends,
                drop_when_all_down,
                withdraw_when_all_down,
                stateless_reverse,
                health,
                drain_timeout,
                timeouts,
            });
        }
        if vips.len() > MAX_VIPS as usize {
            return Err(err(text.len(), LbError::TooManyVips(MAX_VIPS).to_string()));
        }
        if total_backends > MAX_BACKENDS as usize {
            return Err(err(
                text.len(),
                format!("too many backends: {total_backends} (the maximum is {MAX_BACKENDS})"),
            ));
        }
        Ok(Config {
            hash_seed,
            flood_threshold,
            nexthop_max_age_ms,
            vips,
        })
    }

    /// A warning (not an error) when a VIP has stateless reverse NAT but the file sets no
    /// `hash_seed`: the gateways of an ECMP group must all pick the same backend for a flow,
    /// and a gateway that loaded without a seed from the file or `lb attach --hash-seed`
    /// generated a random one of its own.
    pub fn seed_warning(&self) -> Option<String> {
        if self.hash_seed.is_some() {
            return None;
        }
        let v = self.vips.iter().find(|v| v.stateless_reverse)?;
        Some(format!(
            "VIP {} has reverse = \"stateless\" but the file sets no hash_seed: every gateway must share a hash_seed (set `hash_seed` in lb.toml; `lb show-config` prints this gateway's)",
            v.vip
        ))
    }

    /// The current kernel state as a configuration.
    pub fn from_maps(maps: &LbMaps) -> Result<Config, LbError> {
        let conf = maps.conf()?;
        let mut vips = Vec::new();
        for (vip, info) in maps.vips()? {
            let backends = maps
                .backends(&vip)?
                .iter()
                .map(|b| (b.addr, b.weight))
                .collect();
            vips.push(VipConfig {
                vip,
                algorithm: crate::model::Algorithm::from_codes(info.algo, info.src_prefix_len),
                forward: crate::model::Forward::from_code(info.fwd),
                table_size: info.table_size,
                backends,
                drop_when_all_down: info.flags & lb_common::VIP_F_DROP_WHEN_ALL_DOWN != 0,
                withdraw_when_all_down: info.flags & lb_common::VIP_F_WITHDRAW_WHEN_ALL_DOWN != 0,
                stateless_reverse: info.flags & lb_common::VIP_F_STATELESS_REVERSE != 0,
                health: None,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                timeouts: maps.timeouts(info.vip_id)?,
            });
        }
        Ok(Config {
            hash_seed: (conf.hash_seed != 0).then_some(conf.hash_seed),
            flood_threshold: Some(conf.flood_rate),
            nexthop_max_age_ms: Some(lb_common::nexthop_age_from_conf(conf.nexthop_max_age_ms)),
            vips,
        })
    }

    /// The configuration as TOML, in the format `parse` reads (sorted, so the output of the
    /// same state is always the same text).
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# lb configuration (lb show-config)\n");
        if let Some(seed) = self.hash_seed {
            let _ = writeln!(
                out,
                "hash_seed = \"{}\"",
                crate::model::format_hash_seed(seed)
            );
        }
        if let Some(f) = self.flood_threshold {
            let _ = writeln!(out, "flood_threshold = {f}");
        }
        if let Some(a) = self.nexthop_max_age_ms {
            let _ = writeln!(out, "nexthop_max_age_ms = {a}");
        }
        let mut vips = self.vips.clone();
        vips.sort_by_key(|v| v.vip);
        for v in vips {
            let _ = write!(
                out,
                "\n[[vip]]\naddress = \"{}\"\nalgorithm = \"{}\"\n",
                v.vip,
                v.algorithm.name()
            );
            if let crate::model::Algorithm::SourceHash { prefix_len } = v.algorithm {
                if prefix_len > 0 {
                    let _ = writeln!(out, "source_prefix = {prefix_len}");
                }
            }
            if v.forward != crate::model::Forward::Nat {
                let _ = writeln!(out, "forward = \"{}\"", v.forward);
            }
            let _ = writeln!(out, "table_size = {}", v.table_size);
            if v.drop_when_all_down {
                let _ = writeln!(out, "when_all_down = \"drop\"");
            } else if v.withdraw_when_all_down {
                let _ = writeln!(out, "when_all_down = \"withdraw\"");
            }
            if v.stateless_reverse {
                let _ = writeln!(out, "reverse = \"stateless\"");
            }
            if v.drain_timeout != DEFAULT_DRAIN_TIMEOUT {
                let _ = writeln!(
                    out,
                    "drain_timeout = \"{}\"",
                    humantime::format_duration(v.drain_timeout)
                );
            }
            if let Some(h) = &v.health {
                out.push_str(&h.to_toml());
            }
            if v.timeouts != Timeouts::DEFAULT {
                out.push_str("\n[vip.timeouts]\n");
                for (state, secs) in crate::model::timeout_values(&v.timeouts) {
                    let _ = writeln!(out, "{state} = {secs}");
                }
            }
            let mut backends = v.backends.clone();
            backends.sort();
            for (addr, weight) in backends {
                let _ = write!(
                    out,
                    "\n[[vip.backend]]\naddress = \"{addr}\"\nweight = {weight}\n"
                );
            }
        }
        out
    }
}

/// What `apply` changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub vips_added: u32,
    pub vips_removed: u32,
    pub tables_resized: u32,
    pub backends_added: u32,
    pub backends_removed: u32,
    pub backends_reweighted: u32,
    pub slots_written: u32,
    pub algorithms_changed: u32,
    /// VIPs whose `when_all_down` changed.
    pub policies_changed: u32,
    /// VIPs whose forwarding mode changed.
    pub forwards_changed: u32,
    /// VIPs whose flow timeouts changed.
    pub timeouts_changed: u32,
    /// Whether the deployment-wide settings (hash seed, flood threshold) changed.
    pub settings_changed: u32,
    /// What an interrupted command had left and this apply removed (`LbMaps::repair`).
    pub repaired: crate::state::Repair,
}

impl ApplySummary {
    pub fn is_empty(&self) -> bool {
        *self == ApplySummary::default()
    }
}

/// Makes the kernel state equal to `cfg` with the fewest map changes. The configuration was
/// validated as a whole by `Config::parse`, so the steps below do not fail on bad input.
/// The deployment-wide settings are written last, once every other step has succeeded: an
/// apply that fails (table room, a map write) leaves the hash seed and the flood threshold
/// as they were (a new seed re-hashes every flow without an entry).
pub fn apply(maps: &mut LbMaps, cfg: &Config) -> Result<ApplySummary, LbError> {
    maps.with_backend_index(|maps| apply_indexed(maps, cfg))?
}

fn apply_indexed(maps: &mut LbMaps, cfg: &Config) -> Result<ApplySummary, LbError> {
    let mut s = ApplySummary::default();
    let current = maps.vips()?;
    let wanted = |vip: &Vip| cfg.vips.iter().find(|v| v.vip == *vip);
    check_table_room(maps, &current, cfg)?;
    // The settings wanted, where the file gives them (written in step 4).
    let want_conf = wanted_conf(cfg, maps.conf()?);
    // 1. VIPs that go away.
    for (vip, _) in &current {
        if wanted(vip).is_none() {
            s.backends_removed += maps.backends(vip)?.len() as u32;
            maps.del_vip(vip)?;
            s.vips_removed += 1;
        }
    }
    // 2. Backends that leave a VIP that stays (before another VIP may take them). The others
    //    keep their current weights here, so no table needs more room than it has.
    for (vip, _) in &current {
        if let Some(w) = wanted(vip) {
            let keep: Vec<(SocketAddr, u32)> = maps
                .backends(vip)?
                .iter()
                .filter(|b| w.backends.iter().any(|(a, _)| *a == b.addr))
                .map(|b| (b.addr, b.weight))
                .collect();
            let c = maps.set_backends(vip, &keep)?;
            s.backends_removed += c.removed;
            s.slots_written += c.slots_written;
            // Stateless reverse NAT goes off before any backend is added anywhere: another
            // VIP may be about to share one of this VIP's backends.
            if !w.stateless_reverse && maps.set_stateless_reverse(vip, false)? {
                s.policies_changed += 1;
            }
        }
    }
    // 3. New VIPs, new table sizes, and the full backend sets. A table that grows is resized
    //    before its backends are set, one that shrinks after, so that every intermediate state
    //    satisfies the slots-per-backend rule.
    for v in &cfg.vips {
        let old_size = current
            .iter()
            .find(|(vip, _)| *vip == v.vip)
            .map(|(_, i)| i.table_size);
        match old_size {
            None => {
                maps.add_vip_with(&v.vip, v.table_size, &v.timeouts)?;
                s.vips_added += 1;
            }
            Some(old) if v.table_size > old => {
                s.slots_written += maps.resize_vip(&v.vip, v.table_size)?;
                s.tables_resized += 1;
            }
            Some(_) => {}
        }
        // Backends that do not suit the new mode have left in step 2 (the file's all do).
        if maps.set_forward(&v.vip, v.forward)? && old_size.is_some() {
            s.forwards_changed += 1;
        }
        if old_size.is_some() && maps.set_timeouts(&v.vip, v.timeouts)? {
            s.timeouts_changed += 1;
        }
        // Stateless reverse NAT went off in step 2 (before an algorithm change); it goes on
        // after the backends are set (it needs a hash algorithm, and backends no other VIP
        // has).
        let current_algo = maps.vip(&v.vip)?;
        let new_vip = old_size.is_none();
        let algo_changes =
            crate::model::Algorithm::from_codes(current_algo.algo, current_algo.src_prefix_len)
                != v.algorithm;
        if new_vip && algo_changes {
            s.slots_written += maps.set_algorithm(&v.vip, v.algorithm)?;
        }
        let c = maps.set_backends(&v.vip, &v.backends)?;
        s.backends_added += c.added;
        s.backends_removed += c.removed;
        s.backends_reweighted += c.reweighted;
        s.slots_written += c.slots_written;
        if !new_vip && algo_changes {
            s.slots_written += maps.set_algorithm(&v.vip, v.algorithm)?;
            s.algorithms_changed += 1;
        }
        if old_size.is_some_and(|old| v.table_size < old) {
            s.slots_written += maps.resize_vip(&v.vip, v.table_size)?;
            s.tables_resized += 1;
        }
        if v.stateless_reverse && maps.set_stateless_reverse(&v.vip, true)? {
            s.policies_changed += 1;
        }
        let was_drop = maps.vip(&v.vip)?.flags & lb_common::VIP_F_DROP_WHEN_ALL_DOWN != 0;
        if was_drop != v.drop_when_all_down {
            s.slots_written += maps.set_all_down_drop(&v.vip, v.drop_when_all_down)?;
            s.policies_changed += 1;
        }
        if maps.set_withdraw_when_all_down(&v.vip, v.withdraw_when_all_down)? {
            s.policies_changed += 1;
        }
    }
    // 4. Deployment-wide settings, now that nothing else can fail.
    if maps.set_conf(want_conf)? {
        s.settings_changed += 1;
    }
    // 5. What an interrupted command may have left that the steps above do not touch.
    s.repaired = maps.repair()?;
    Ok(s)
}

/// The deployment-wide settings once `cfg` is applied over `current`: the file's hash seed and
/// flood threshold where it gives them, the current ones where it does not.
fn wanted_conf(cfg: &Config, current: lb_common::GlobalConf) -> lb_common::GlobalConf {
    lb_common::GlobalConf {
        hash_seed: cfg.hash_seed.unwrap_or(current.hash_seed),
        flood_rate: cfg.flood_threshold.unwrap_or(current.flood_rate),
        // The same age as now (0 in the maps is the default's) changes nothing.
        nexthop_max_age_ms: match cfg.nexthop_max_age_ms {
            Some(a) if a != lb_common::nexthop_age_from_conf(current.nexthop_max_age_ms) => {
                lb_common::nexthop_age_to_conf(a)
            }
            _ => current.nexthop_max_age_ms,
        },
        ..current
    }
}

/// Checks, before anything is written, that the table array has room for every new table and
/// for each resized table's new range while its old range is still in use.
fn check_table_room(
    maps: &LbMaps,
    current: &[(Vip, lb_common::VipInfo)],
    cfg: &Config,
) -> Result<(), LbError> {
    let capacity = maps.table_capacity();
    // Ranges in use after the VIPs that go away are removed.
    let mut used: Vec<(u32, u32)> = current
        .iter()
        .filter(|(vip, _)| cfg.vips.iter().any(|v| v.vip == *vip))
        .map(|(_, i)| (i.table_off, i.table_size))
        .collect();
    for v in &cfg.vips {
        let old = current
            .iter()
            .find(|(vip, _)| *vip == v.vip)
            .map(|(_, i)| *i);
        // A VIP keeps its range unless its size or its algorithm changes (a new table is then
        // built beside the old one: `LbMaps::write_table`).
        let same_algo = |i: &lb_common::VipInfo| {
            crate::model::Algorithm::from_codes(i.algo, i.src_prefix_len) == v.algorithm
        };
        if old.is_some_and(|i| i.table_size == v.table_size && same_algo(&i)) {
            continue;
        }
        let off = crate::state::free_range(used.iter().copied(), v.table_size, capacity).ok_or(
            LbError::TableCapacity {
                size: v.table_size,
                capacity,
            },
        )?;
        used.push((off, v.table_size));
        if let Some(i) = old {
            used.retain(|r| *r != (i.table_off, i.table_size));
        }
    }
    Ok(())
}

/// `[vip.timeouts]`; an error carries the offset of the value it is about.
fn parse_timeouts(t: &RawTimeouts) -> Result<Timeouts, (usize, String)> {
    let mut out = Timeouts::DEFAULT;
    for (state, v) in [
        ("opening", &t.opening),
        ("established", &t.established),
        ("closing", &t.closing),
        ("closed", &t.closed),
        ("udp", &t.udp),
    ] {
        if let Some(v) = v {
            let secs = crate::model::check_timeout(state, *v.get_ref())
                .map_err(|e| (v.span().start, e.0))?;
            *crate::model::timeout_field(&mut out, state).expect("known state") = secs;
        }
    }
    Ok(out)
}

/// A duration such as "500ms", "2s" or "5m".
fn parse_duration(what: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid {what} {s:?}: {e} (e.g. \"2s\", \"500ms\")"))
}

/// `[vip.health]`; an error carries the offset of the field it is about.
fn parse_health(
    h: &RawHealth,
    proto: crate::Proto,
) -> Result<HealthCheck, (Option<usize>, String)> {
    let at = |s: usize| Some(s);
    let dur = |f: &Option<Spanned<String>>, what: &str, default: Duration| match f {
        None => Ok(default),
        Some(s) => parse_duration(what, s.get_ref()).map_err(|m| (at(s.span().start), m)),
    };
    let interval = dur(&h.interval, "interval", crate::health::DEFAULT_INTERVAL)?;
    // The default timeout never exceeds the interval.
    let timeout = dur(
        &h.timeout,
        "timeout",
        crate::health::DEFAULT_TIMEOUT.min(interval),
    )?;
    if interval < crate::health::MIN_INTERVAL {
        let s = h.interval.as_ref().map(|s| s.span().start);
        return Err((
            s,
            format!(
                "interval must be at least {}",
                humantime::format_duration(crate::health::MIN_INTERVAL)
            ),
        ));
    }
    if timeout.is_zero() || timeout > interval {
        let s = h.timeout.as_ref().map(|s| s.span().start);
        return Err((
            s,
            "timeout must be more than 0 and at most the interval".into(),
        ));
    }
    let count = |f: &Option<Spanned<u32>>, what: &str, default: u32| match f {
        None => Ok(default),
        Some(n) if (1..=100).contains(n.get_ref()) => Ok(*n.get_ref()),
        Some(n) => Err((
            at(n.span().start),
            format!("{what} must be between 1 and 100"),
        )),
    };
    let rise = count(&h.rise, "rise", crate::health::DEFAULT_RISE)?;
    let fall = count(&h.fall, "fall", crate::health::DEFAULT_FALL)?;
    let check = h.check.get_ref().as_str();
    let only = |f: Option<usize>, field: &str| -> Result<(), (Option<usize>, String)> {
        match f {
            Some(o) => Err((
                at(o),
                format!("{field} does not apply to check = \"{check}\""),
            )),
            None => Ok(()),
        }
    };
    let http_fields = [
        h.path.as_ref().map(|s| (s.span().start, "path")),
        h.host.as_ref().map(|s| (s.span().start, "host")),
        h.expect_status
            .as_ref()
            .map(|s| (s.span().start, "expect_status")),
    ];
    let udp_fields = [
        h.send.as_ref().map(|s| (s.span().start, "send")),
        h.expect.as_ref().map(|s| (s.span().start, "expect")),
    ];
    let kind = match check {
        "tcp" | "http" | "https" if proto != crate::Proto::Tcp => {
            return Err((
                at(h.check.span().start),
                format!("check = \"{check}\" needs a TCP VIP"),
            ))
        }
        "udp" if proto != crate::Proto::Udp => {
            return Err((
                at(h.check.span().start),
                "check = \"udp\" needs a UDP VIP".into(),
            ))
        }
        "tcp" => {
            for (o, f) in http_fields.iter().chain(&udp_fields).flatten() {
                only(Some(*o), f)?;
            }
            CheckKind::Tcp
        }
        "http" | "https" => {
            for (o, f) in udp_fields.iter().flatten() {
                only(Some(*o), f)?;
            }
            let path = h
                .path
                .as_ref()
                .map_or("/".to_string(), |p| p.get_ref().clone());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                let o = h.path.as_ref().map(|p| p.span().start);
                return Err((
                    o,
                    format!("invalid path {path:?}: it must start with / and have no spaces"),
                ));
            }
            if let Some(host) = &h.host {
                if host.get_ref().is_empty()
                    || host
                        .get_ref()
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err((
                        at(host.span().start),
                        format!("invalid host {:?}", host.get_ref()),
                    ));
                }
            }
            let expect_status = match &h.expect_status {
                None => 200,
                Some(s) if (100..=599).contains(s.get_ref()) => *s.get_ref(),
                Some(s) => {
                    return Err((
                        at(s.span().start),
                        format!("expect_status {} is not an HTTP status", s.get_ref()),
                    ))
                }
            };
            CheckKind::Http {
                tls: check == "https",
                path,
                host: h.host.as_ref().map(|s| s.get_ref().clone()),
                expect_status,
            }
        }
        "udp" => {
            for (o, f) in http_fields.iter().flatten() {
                only(Some(*o), f)?;
            }
            CheckKind::Udp {
                send: h
                    .send
                    .as_ref()
                    .map_or("ping".to_string(), |s| s.get_ref().clone()),
                expect: h.expect.as_ref().map(|s| s.get_ref().clone()),
            }
        }
        other => {
            return Err((
                at(h.check.span().start),
                format!("unknown check {other:?} (use tcp, http, https or udp)"),
            ))
        }
    };
    if let Some(p) = h.port.as_ref().filter(|p| *p.get_ref() == 0) {
        return Err((at(p.span().start), "port 0 cannot be checked".into()));
    }
    Ok(HealthCheck {
        kind,
        port: h.port.as_ref().map(|p| *p.get_ref()),
        interval,
        timeout,
        rise,
        fall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[vip]]
address = "10.100.0.100:80/tcp"
table_size = 251

[[vip.backend]]
address = "10.200.0.11:8080"
weight = 3

[[vip.backend]]
address = "10.200.0.12:8080"

[[vip]]
address = "[2001:db8::100]:53/udp"
"#;

    #[test]
    fn parses_a_good_file() {
        let c = Config::parse("lb.toml", GOOD).unwrap();
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.vips[0].table_size, 251);
        assert_eq!(
            c.vips[0].backends,
            vec![
                ("10.200.0.11:8080".parse().unwrap(), 3),
                ("10.200.0.12:8080".parse().unwrap(), 1)
            ]
        );
        assert_eq!(c.vips[1].table_size, DEFAULT_TABLE_SIZE);
        assert_eq!(c.vips[1].algorithm, crate::model::Algorithm::Maglev);
        // Round trip through the printer.
        let again = Config::parse("x", &c.to_toml()).unwrap();
        let mut sorted = c.clone();
        sorted.vips.sort_by_key(|v| v.vip);
        assert_eq!(again, sorted);
    }

    #[test]
    fn health_checks_parse_and_print() {
        let text = r#"
[[vip]]
address = "10.100.0.100:80/tcp"
when_all_down = "drop"
drain_timeout = "30s"
reverse = "stateless"
forward = "ipip"

[vip.health]
check = "https"
port = 8443
path = "/healthz"
host = "svc.example"
expect_status = 204
interval = "500ms"
rise = 3

[[vip]]
address = "[2001:db8::100]:53/udp"

[vip.health]
check = "udp"
send = "hello"
expect = "hi"
"#;
        let c = Config::parse("lb.toml", text).unwrap();
        let v = &c.vips[0];
        assert!(v.drop_when_all_down);
        assert!(v.stateless_reverse);
        assert_eq!(v.forward, crate::model::Forward::Ipip);
        assert_eq!(v.drain_timeout, Duration::from_secs(30));
        let h = v.health.as_ref().unwrap();
        assert_eq!(h.name(), "https");
        assert_eq!(h.port, Some(8443));
        assert_eq!(h.interval, Duration::from_millis(500));
        // The default timeout (1 s) is capped at the interval.
        assert_eq!(h.timeout, Duration::from_millis(500));
        assert_eq!((h.rise, h.fall), (3, crate::health::DEFAULT_FALL));
        assert_eq!(
            h.target("10.1.1.2:8080".parse().unwrap()),
            "10.1.1.2:8443".parse().unwrap()
        );
        let u = c.vips[1].health.as_ref().unwrap();
        assert_eq!(
            u.kind,
            CheckKind::Udp {
                send: "hello".into(),
                expect: Some("hi".into())
            }
        );
        // Round trip through the printer.
        let mut sorted = c.clone();
        sorted.vips.sort_by_key(|v| v.vip);
        assert_eq!(Config::parse("x", &c.to_toml()).unwrap(), sorted);
    }

    #[test]
    fn timeouts_and_global_settings_parse_and_print() {
        let text = r#"
hash_seed = "0x1A2B3C4D"
flood_threshold = 0

[[vip]]
address = "10.100.0.100:80/tcp"

[vip.timeouts]
established = 7200
udp = 0

[[vip]]
address = "10.100.0.101:80/tcp"
"#;
        let c = Config::parse("lb.toml", text).unwrap();
        assert_eq!(c.hash_seed, Some(0x1a2b_3c4d));
        assert_eq!(c.flood_threshold, Some(0));
        let t = c.vips[0].timeouts;
        assert_eq!(
            (t.established_s, t.udp_s, t.opening_s),
            (7200, 0, Timeouts::DEFAULT.opening_s)
        );
        assert_eq!(c.vips[1].timeouts, Timeouts::DEFAULT);
        let printed = c.to_toml();
        assert!(
            printed.contains("hash_seed = \"0x1a2b3c4d\"\n"),
            "{printed}"
        );
        assert!(printed.contains("flood_threshold = 0\n"), "{printed}");
        // Only the VIP whose timeouts differ from the defaults gets the table.
        assert_eq!(printed.matches("[vip.timeouts]").count(), 1, "{printed}");
        let again = Config::parse("x", &printed).unwrap();
        assert_eq!(again, c);
        assert_eq!(Config::parse("x", &again.to_toml()).unwrap(), again);
        // Without the keys, nothing is set (the maps keep theirs).
        let bare = Config::parse("x", "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n").unwrap();
        assert_eq!((bare.hash_seed, bare.flood_threshold), (None, None));
        assert!(!bare.to_toml().contains("hash_seed"));
    }

    #[test]
    fn stateless_reverse_without_a_seed_is_warned_about() {
        let vip = |i: usize, extra: &str| {
            format!("[[vip]]\naddress = \"10.0.0.{i}:80/tcp\"\n{extra}[[vip.backend]]\naddress = \"10.9.0.{i}:8080\"\n")
        };
        let stateless = "reverse = \"stateless\"\n";
        let two = format!("{}{}{}", vip(1, ""), vip(2, stateless), vip(3, stateless));
        let w = Config::parse("x", &two).unwrap().seed_warning().unwrap();
        assert!(w.contains("VIP 10.0.0.2:80/tcp"), "{w}");
        assert!(w.contains("every gateway must share a hash_seed"), "{w}");
        // With a seed, or without a stateless VIP: nothing to say.
        let seeded = format!("hash_seed = \"0x1\"\n{two}");
        assert_eq!(Config::parse("x", &seeded).unwrap().seed_warning(), None);
        let tracked = Config::parse("x", &vip(1, "")).unwrap();
        assert_eq!(tracked.seed_warning(), None);
    }

    #[test]
    fn backends_may_serve_several_vips_within_the_rules() {
        let vip = |i: usize, extra: &str| {
            format!("[[vip]]\naddress = \"10.0.0.{i}:80/tcp\"\n{extra}[[vip.backend]]\naddress = \"10.9.0.1:8080\"\n")
        };
        // Four tracked VIPs share a backend; a UDP VIP with the same address:port is another
        // endpoint.
        let four: String = (1..=4).map(|i| vip(i, "")).collect();
        let udp = "[[vip]]\naddress = \"10.0.0.9:80/udp\"\n[[vip.backend]]\naddress = \"10.9.0.1:8080\"\n";
        let c = Config::parse("lb.toml", &format!("{four}{udp}")).unwrap();
        assert_eq!(c.vips.len(), 5);
        // A fifth TCP VIP is one too many.
        let e = error_of(&format!("{four}{}", vip(5, "")));
        assert!(e.message.contains("already serves VIPs 10.0.0.1:80/tcp, 10.0.0.2:80/tcp, 10.0.0.3:80/tcp and 10.0.0.4:80/tcp"), "{e}");
        assert!(e.message.contains("at most 4 VIPs"), "{e}");
        assert_eq!(e.line, 20, "the fifth VIP's backend");
        // A stateless VIP's backend serves no other VIP, whichever comes first.
        let stateless = "reverse = \"stateless\"\n";
        let e = error_of(&format!("{}{}", vip(1, ""), vip(2, stateless)));
        assert!(e.message.contains("backend 10.9.0.1:8080 cannot serve both VIP 10.0.0.2:80/tcp (reverse = stateless) and VIP 10.0.0.1:80/tcp"), "{e}");
        let e = error_of(&format!("{}{}", vip(1, stateless), vip(2, "")));
        assert!(
            e.message
                .contains("VIP 10.0.0.1:80/tcp (reverse = stateless) and VIP 10.0.0.2:80/tcp"),
            "{e}"
        );
        // Alone, a stateless VIP's backends are fine.
        Config::parse("lb.toml", &vip(1, stateless)).unwrap();
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let c = Config::parse("deploy/lb.toml", include_str!("../../deploy/lb.toml")).unwrap();
        assert_eq!(c.vips.len(), 2);
        assert!(c.vips.iter().all(|v| v.health.is_some()));
    }

    fn error_of(text: &str) -> ConfigError {
        Config::parse("lb.toml", text).unwrap_err()
    }

    #[test]
    fn errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("[[vip]]\naddress = \"10.0.0.1:80/sctp\"\n", 2, "unknown protocol"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\ntable_size = 100\n", 3, "not a prime"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip.backend]]\naddress = \"10.0.0.2\"\n", 4, "invalid backend address"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip.backend]]\naddress = \"[::1]:80\"\n", 4, "different address families"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\nweight = 70000\n", 5, "weight 70000"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n\n[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n", 5, "listed twice"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\ncolour = 1\n", 3, "unknown field"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\ntable_size = 7\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\n", 3, "too small"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nreverse = \"stateless\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\n[[vip]]\naddress = \"10.0.0.9:80/tcp\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\n", 9, "VIP 10.0.0.1:80/tcp (reverse = stateless) and VIP 10.0.0.9:80/tcp"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\n[[vip]]\naddress = \"10.0.0.9:80/tcp\"\nreverse = \"stateless\"\n[[vip.backend]]\naddress = \"10.0.0.2:80\"\n", 9, "VIP 10.0.0.9:80/tcp (reverse = stateless) and VIP 10.0.0.1:80/tcp"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.timeouts]\nestablished = 604801\n", 4, "too long"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.timeouts]\nestablished = -1\n", 4, "invalid value"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.timeouts]\nsyn_sent = 5\n", 4, "unknown field"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.timeouts]\nudp = \"5m\"\n", 4, "invalid type"),
            ("hash_seed = \"0xnope\"\n", 1, "invalid hash seed"),
            ("\nnexthop_max_age_ms = 3600001\n", 2, "nexthop_max_age_ms = 3600001 is too long"),
            ("\nhash_seed = \"0\"\n", 2, "0 is not allowed"),
            ("hash_seed = 12345\n", 1, "invalid type"),
            ("flood_threshold = -5\n", 1, "invalid value"),
            ("hash_seeds = \"0x1\"\n", 1, "unknown field"),
            ("[[vip]\n", 1, ""),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nalgorithm = \"fastest\"\n", 3, "unknown algorithm"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nalgorithm = \"random\"\nsource_prefix = 24\n", 3, "applies only to source-hash"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nsource_prefix = 24\n", 3, "needs algorithm"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nalgorithm = \"source-hash\"\nsource_prefix = 40\n", 4, "longer than"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nwhen_all_down = \"panic\"\n", 3, "unknown when_all_down"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nreverse = \"maybe\"\n", 3, "unknown reverse"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nalgorithm = \"random\"\nreverse = \"stateless\"\n", 4, "maglev or source-hash"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nforward = \"gre\"\n", 3, "unknown forwarding mode"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nforward = \"dsr-l2\"\n[[vip.backend]]\naddress = \"10.0.0.2:8080\"\n", 5, "VIP's port 80"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\ndrain_timeout = \"soon\"\n", 3, "invalid drain_timeout"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"icmp\"\n", 4, "unknown check"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"udp\"\n", 4, "needs a UDP VIP"),
            ("[[vip]]\naddress = \"10.0.0.1:53/udp\"\n[vip.health]\ncheck = \"http\"\n", 4, "needs a TCP VIP"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"tcp\"\ninterval = \"fast\"\n", 5, "invalid interval"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"tcp\"\ninterval = \"10ms\"\n", 5, "at least"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"tcp\"\ninterval = \"1s\"\ntimeout = \"2s\"\n", 6, "at most the interval"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"tcp\"\nrise = 0\n", 5, "between 1 and 100"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"http\"\npath = \"healthz\"\n", 5, "invalid path"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"http\"\nexpect_status = 42\n", 5, "not an HTTP status"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"tcp\"\nsend = \"x\"\n", 5, "does not apply"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"tcp\"\nport = 0\n", 5, "port 0"),
            ("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"tcp\"\ncolour = 1\n", 5, "unknown field"),
        ];
        for (text, line, needle) in cases {
            let e = error_of(text);
            assert_eq!(e.line, *line, "{text:?}: {e}");
            assert!(e.message.contains(needle), "{text:?}: {e}");
        }
    }

    /// One TCP VIP with `extra` settings and these (address, weight) backends.
    fn vip_file(extra: &str, backends: &[(&str, u32)]) -> String {
        let mut t = format!("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n{extra}");
        for (a, w) in backends {
            let _ = write!(t, "[[vip.backend]]\naddress = \"{a}\"\nweight = {w}\n");
        }
        t
    }

    #[test]
    fn the_largest_weight_is_accepted() {
        let c = Config::parse("lb.toml", &vip_file("", &[("10.0.0.2:80", MAX_WEIGHT)])).unwrap();
        assert_eq!(c.vips[0].backends[0].1, 65_535);
        let e = error_of(&vip_file("", &[("10.0.0.2:80", MAX_WEIGHT + 1)]));
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("weight 65536 is out of range"), "{e}");
    }

    #[test]
    fn tables_need_ten_slots_per_backend_with_a_weight() {
        // 23 slots hold two backends (20 slots), not three; a backend of weight 0 takes none.
        let two = [("10.0.0.2:80", 1), ("10.0.0.3:80", 5), ("10.0.0.4:80", 0)];
        let c = Config::parse("lb.toml", &vip_file("table_size = 23\n", &two)).unwrap();
        assert_eq!(c.vips[0].backends.len(), 3);
        let three = [("10.0.0.2:80", 1), ("10.0.0.3:80", 5), ("10.0.0.4:80", 1)];
        let e = error_of(&vip_file("table_size = 23\n", &three));
        assert_eq!(e.line, 3, "{e}");
        assert_eq!(
            e.message,
            "table size 23 is too small for 3 backends with a weight above zero: it must be at \
             least 10 slots per backend (30)"
        );
    }

    #[test]
    fn source_prefixes_may_be_the_whole_address() {
        let v4 = "algorithm = \"source-hash\"\nsource_prefix = 32\n";
        let c = Config::parse("lb.toml", &vip_file(v4, &[])).unwrap();
        assert_eq!(
            c.vips[0].algorithm,
            crate::model::Algorithm::SourceHash { prefix_len: 32 }
        );
        let v6 = "[[vip]]\naddress = \"[2001:db8::1]:80/tcp\"\nalgorithm = \"source-hash\"\nsource_prefix = 128\n";
        let c = Config::parse("lb.toml", v6).unwrap();
        assert_eq!(
            c.vips[0].algorithm,
            crate::model::Algorithm::SourceHash { prefix_len: 128 }
        );
        let e = error_of(&vip_file("algorithm = \"sh\"\nsource_prefix = 33\n", &[]));
        assert_eq!(
            (e.line, e.message.as_str()),
            (4, "source prefix /33 is longer than the VIP's addresses")
        );
    }

    #[test]
    fn least_conn_needs_tcp() {
        let c = Config::parse("lb.toml", &vip_file("algorithm = \"least-conn\"\n", &[])).unwrap();
        assert_eq!(c.vips[0].algorithm, crate::model::Algorithm::LeastConn);
        let e = error_of("[[vip]]\naddress = \"10.0.0.1:53/udp\"\nalgorithm = \"least-conn\"\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(
            e.message
                .starts_with("least-conn needs a TCP VIP: 10.0.0.1:53/udp is UDP"),
            "{e}"
        );
    }

    #[test]
    fn round_robin_sequences_must_fit_the_table() {
        // Weights 1 and 22 make a sequence of 23 turns: it fits a table of 23 slots exactly;
        // 1 and 30 make 31 turns, which do not. Other algorithms have no sequence.
        let rr = "table_size = 23\nalgorithm = \"round-robin\"\n";
        let fits = [("10.0.0.2:80", 1), ("10.0.0.3:80", 22)];
        let c = Config::parse("lb.toml", &vip_file(rr, &fits)).unwrap();
        assert_eq!(c.vips[0].algorithm, crate::model::Algorithm::RoundRobin);
        let long = [("10.0.0.2:80", 1), ("10.0.0.3:80", 30)];
        let e = error_of(&vip_file(rr, &long));
        assert_eq!(e.line, 4, "{e}");
        assert!(
            e.message
                .starts_with("round robin needs a sequence of 31 slots for these weights"),
            "{e}"
        );
        assert!(e.message.contains("but the table has 23"), "{e}");
        Config::parse("lb.toml", &vip_file("table_size = 23\n", &long)).unwrap();
    }

    /// `vips` TCP VIPs with `per_vip` backends each (distinct addresses), one more backend on
    /// the last VIP if `extra`.
    fn many(vips: usize, per_vip: usize, extra: bool) -> String {
        let mut t = String::new();
        let mut n = 0usize;
        for v in 0..vips {
            let _ = write!(
                t,
                "[[vip]]\naddress = \"10.0.{}.{}:80/tcp\"\nbackend = [",
                v / 256,
                v % 256
            );
            let count = per_vip + usize::from(extra && v == vips - 1);
            for _ in 0..count {
                let _ = write!(
                    t,
                    "{{address = \"10.{}.{}.{}:8080\"}},",
                    100 + n / 65_536,
                    (n / 256) % 256,
                    n % 256
                );
                n += 1;
            }
            t.push_str("]\n");
        }
        t
    }

    #[test]
    fn the_vip_and_backend_limits_are_inclusive() {
        // 1024 VIPs with 64 backends each: exactly the maximum of both.
        let per_vip = (MAX_BACKENDS / MAX_VIPS) as usize;
        let full = many(MAX_VIPS as usize, per_vip, false);
        let c = Config::parse("lb.toml", &full).unwrap();
        assert_eq!(c.vips.len(), 1024);
        let backends: usize = c.vips.iter().map(|v| v.backends.len()).sum();
        assert_eq!(backends, 65_536);
        // One backend more, or one VIP more: refused, at the end of the file.
        let e = error_of(&many(MAX_VIPS as usize, per_vip, true));
        assert_eq!(e.message, "too many backends: 65537 (the maximum is 65536)");
        assert_eq!(e.line, 3 * 1024 + 1, "three lines per VIP");
        let e = error_of(&many(MAX_VIPS as usize + 1, 0, false));
        assert_eq!(e.message, "too many VIPs: the maximum is 1024");
    }

    #[test]
    fn health_check_bounds() {
        let tcp = |extra: &str| {
            format!(
                "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"tcp\"\n{extra}"
            )
        };
        // The shortest interval is allowed; a shorter one is not.
        let c = Config::parse("lb.toml", &tcp("interval = \"100ms\"\n")).unwrap();
        let h = c.vips[0].health.as_ref().unwrap();
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_millis(100), Duration::from_millis(100))
        );
        let e = error_of(&tcp("interval = \"99ms\"\n"));
        assert_eq!(
            (e.line, e.message.as_str()),
            (5, "interval must be at least 100ms")
        );
        let http = |extra: &str| {
            format!(
                "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[vip.health]\ncheck = \"http\"\n{extra}"
            )
        };
        // Paths start with / and have no spaces or control characters; hosts are not empty and
        // have neither.
        for path in [r#""/a b""#, r#""/a\u0001b""#, r#""/a\tb""#] {
            let e = error_of(&http(&format!("path = {path}\n")));
            assert_eq!(e.line, 5, "{path}: {e}");
            assert!(e.message.starts_with("invalid path"), "{path}: {e}");
        }
        for host in [r#""""#, r#""a b""#, r#""a\u0001b""#] {
            let e = error_of(&http(&format!("host = {host}\n")));
            assert_eq!(e.line, 5, "{host}: {e}");
            assert!(e.message.starts_with("invalid host"), "{host}: {e}");
        }
        let c = Config::parse(
            "lb.toml",
            &http("path = \"/a/b?c=d\"\nhost = \"svc.example\"\n"),
        )
        .unwrap();
        assert_eq!(
            c.vips[0].health.as_ref().unwrap().kind,
            CheckKind::Http {
                tls: false,
                path: "/a/b?c=d".into(),
                host: Some("svc.example".into()),
                expect_status: 200
            }
        );
    }

    #[test]
    fn to_toml_prints_what_differs_from_the_defaults() {
        let text = r#"
hash_seed = "0xc0ffee"
flood_threshold = 5000

[[vip]]
address = "10.0.0.2:80/tcp"
algorithm = "source-hash"
source_prefix = 24
table_size = 251
when_all_down = "drop"
reverse = "stateless"
drain_timeout = "90s"

[vip.timeouts]
closed = 5

[[vip.backend]]
address = "10.9.0.2:8080"
weight = 2

[[vip.backend]]
address = "10.9.0.1:8080"

[[vip]]
address = "10.0.0.1:53/udp"
algorithm = "sh"
forward = "dsr"

[[vip.backend]]
address = "10.9.0.3:53"
weight = 0
"#;
        let c = Config::parse("lb.toml", text).unwrap();
        let want = r#"# lb configuration (lb show-config)
hash_seed = "0x00c0ffee"
flood_threshold = 5000

[[vip]]
address = "10.0.0.1:53/udp"
algorithm = "source-hash"
forward = "dsr-l2"
table_size = 65537

[[vip.backend]]
address = "10.9.0.3:53"
weight = 0

[[vip]]
address = "10.0.0.2:80/tcp"
algorithm = "source-hash"
source_prefix = 24
table_size = 251
when_all_down = "drop"
reverse = "stateless"
drain_timeout = "1m 30s"

[vip.timeouts]
opening = 60
established = 3600
closing = 120
closed = 5
udp = 300

[[vip.backend]]
address = "10.9.0.1:8080"
weight = 1

[[vip.backend]]
address = "10.9.0.2:8080"
weight = 2
"#;
        assert_eq!(c.to_toml(), want);
        assert_eq!(Config::parse("x", want).unwrap().to_toml(), want);
    }

    #[test]
    fn apply_summaries_are_empty_only_without_changes() {
        assert!(ApplySummary::default().is_empty());
        let one = ApplySummary {
            timeouts_changed: 1,
            ..ApplySummary::default()
        };
        assert!(!one.is_empty());
    }

    #[test]
    fn the_file_sets_the_settings_it_gives() {
        let current = lb_common::GlobalConf {
            hash_seed: 0x1111,
            flood_rate: 2222,
            ns_per_tick: 4_000_000,
            nexthop_max_age_ms: 0,
        };
        let mut cfg = Config::parse("x", "hash_seed = \"0x5\"\n").unwrap();
        assert_eq!(
            wanted_conf(&cfg, current),
            lb_common::GlobalConf {
                hash_seed: 5,
                ..current
            }
        );
        cfg.hash_seed = None;
        cfg.flood_threshold = Some(7);
        assert_eq!(
            wanted_conf(&cfg, current),
            lb_common::GlobalConf {
                flood_rate: 7,
                ..current
            }
        );
        cfg.flood_threshold = None;
        assert_eq!(wanted_conf(&cfg, current), current);
        // The next-hop cache's maximum age: 0 in the file turns it off.
        let cfg = Config::parse("x", "nexthop_max_age_ms = 250\n").unwrap();
        assert_eq!(wanted_conf(&cfg, current).nexthop_max_age_ms, 250);
        let default = Config::parse("x", "nexthop_max_age_ms = 100\n").unwrap();
        assert_eq!(wanted_conf(&default, current), current, "0 is the default");
        let cfg = Config::parse("x", "nexthop_max_age_ms = 0\n").unwrap();
        assert_eq!(
            wanted_conf(&cfg, current).nexthop_max_age_ms,
            lb_common::NEXTHOP_CACHE_OFF
        );
        // What the maps hold reads back as the file's value (0 there: the default).
        let from = |v| lb_common::nexthop_age_from_conf(v);
        assert_eq!(from(0), lb_common::DEFAULT_NEXTHOP_MAX_AGE_MS);
        assert_eq!(from(lb_common::NEXTHOP_CACHE_OFF), 0);
        assert_eq!(from(250), 250);
    }
}
