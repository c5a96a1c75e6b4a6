//! The agent, `lb run -f lb.toml`: applies the configuration file and keeps applying it as it
//! changes, health-checks backends and takes failed ones out of the selection tables, drains
//! backends removed from the file before removing them, and serves Prometheus metrics.
//!
//! The agent holds no state the data plane needs: everything lives in the pinned maps, so
//! killing the agent (even with SIGKILL) leaves traffic flowing, and a new agent adopts what is
//! pinned — the health flags included — and rewrites only what differs from the file.
//!
//! One task runs the loop below; each checked backend has a probe task that sends results to
//! it over a channel. Map writes take the pin-directory lock, so `lb` commands run alongside.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{signal::unix::SignalKind, sync::mpsc, task::JoinHandle};
use tracing::{error, info, warn};

use crate::{
    config::{apply, ApplySummary, Config, ConfigError, VipConfig},
    drain::Drain,
    health::{Health, HealthCheck},
    pin::PinDir,
    AttachMode, LbMaps, LoadOptions, Vip,
};

/// How `lb run` was started.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    /// Where `/metrics` is served; None: no metrics server.
    pub metrics: Option<SocketAddr>,
    /// Interfaces to attach to (if lb is not attached to them yet).
    pub attach: Vec<String>,
    pub mode: AttachMode,
    pub load: LoadOptions,
    /// How often the file is read for changes and drains are checked.
    pub poll: Duration,
    /// Keep the next-hop cache (`lb nexthop refresh`) fresh: re-resolve every backend's
    /// neighbour this often and after every change. None: the agent leaves the cache alone.
    pub nexthop_refresh: Option<Duration>,
}

/// A backend of a VIP.
pub type Key = (Vip, SocketAddr);

/// The agent's counters (exported as metrics).
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub last_reload_ok: bool,
    pub table_rebuilds: u64,
    pub slots_written: u64,
    pub drained: u64,
}

/// State shared by the loop and the metrics server.
pub struct Shared {
    pub maps: LbMaps,
    pub health: HashMap<Key, Health>,
    pub draining: HashMap<Key, Drain>,
    pub counters: Counters,
}

/// One probe result, tagged with the probe task that made it.
struct ProbeResult {
    key: Key,
    task: u64,
    result: Result<(), String>,
}

struct Checker {
    check: HealthCheck,
    task: u64,
    handle: JoinHandle<()>,
}

struct Agent {
    opts: AgentOptions,
    shared: Arc<Mutex<Shared>>,
    config: Config,
    config_text: String,
    checkers: HashMap<Key, Checker>,
    next_task: u64,
    results: mpsc::Sender<ProbeResult>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Unreadable(String),
    #[error("{0:#}")]
    Runtime(#[from] anyhow::Error),
}

/// Runs the agent until SIGTERM or SIGINT. The data plane keeps forwarding after it returns.
pub async fn run(opts: AgentOptions) -> Result<(), StartError> {
    let text = std::fs::read_to_string(&opts.config)
        .map_err(|e| StartError::Unreadable(format!("reading {}: {e}", opts.config.display())))?;
    let config = Config::parse(&opts.config.display().to_string(), &text)?;
    let maps = {
        let dir = PinDir::open(&opts.pin_dir)?;
        let adopted = dir.is_loaded();
        let maps = dir.maps_or_load(opts.load)?;
        let attached = dir.attachments()?;
        for iface in &opts.attach {
            if attached.iter().any(|a| &a.iface == iface) {
                continue;
            }
            let mode = dir.attach(iface, opts.mode, opts.load)?;
            info!(iface, mode = crate::pin::mode_name(mode), "attached");
        }
        if adopted {
            info!(
                pin_dir = %opts.pin_dir.display(),
                vips = maps.vips().map_err(anyhow::Error::from)?.len(),
                "adopting the pinned state (conntrack and counters kept)"
            );
        } else {
            info!(pin_dir = %opts.pin_dir.display(), "loaded the data plane");
        }
        maps
    };
    // Health as the pinned maps record it: a restarted agent does not send new flows to a
    // backend the previous one found down.
    let mut health = HashMap::new();
    for (vip, _) in maps.vips().map_err(anyhow::Error::from)? {
        for b in maps.backends(&vip).map_err(anyhow::Error::from)? {
            health.insert((vip, b.addr), Health::new(b.healthy));
        }
    }
    let (tx, mut rx) = mpsc::channel(1024);
    let mut agent = Agent {
        shared: Arc::new(Mutex::new(Shared {
            maps,
            health,
            draining: HashMap::new(),
            counters: Counters::default(),
        })),
        config: config.clone(),
        config_text: text,
        checkers: HashMap::new(),
        next_task: 0,
        results: tx,
        opts,
    };
    agent.apply_config(config, &[])?;
    if let Some(addr) = agent.opts.metrics {
        crate::metrics::serve(addr, agent.shared.clone()).await?;
        info!(%addr, "serving metrics on /metrics");
    }

    let mut hup = tokio::signal::unix::signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term =
        tokio::signal::unix::signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut tick = tokio::time::interval(agent.opts.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let nexthop_every = agent.opts.nexthop_refresh;
    let mut nexthop_tick =
        tokio::time::interval(nexthop_every.unwrap_or(Duration::from_secs(3600)));
    nexthop_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(r) = rx.recv() => agent.on_probe(r),
            _ = tick.tick() => {
                agent.reload_if_changed(false);
                agent.progress_drains();
            }
            _ = nexthop_tick.tick(), if nexthop_every.is_some() => agent.refresh_nexthops(),
            _ = hup.recv() => {
                info!("SIGHUP: reading the configuration");
                agent.reload_if_changed(true);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    for (_, c) in agent.checkers.drain() {
        c.handle.abort();
    }
    info!("stopping; the data plane keeps forwarding with the current state");
    Ok(())
}

impl Agent {
    fn lock_dir(&self) -> Result<PinDir> {
        PinDir::open(&self.opts.pin_dir)
    }

    /// Reads the file; applies it if its text changed (or `force`). An invalid file is logged
    /// and the running state kept.
    fn reload_if_changed(&mut self, force: bool) {
        let path = self.opts.config.display().to_string();
        let text = match std::fs::read_to_string(&self.opts.config) {
            Ok(t) => t,
            Err(e) => {
                if self.config_text_differs_from_none() {
                    error!(file = %path, "cannot read the configuration: {e}; keeping the running state");
                    self.config_text.clear();
                    self.fail_reload();
                }
                return;
            }
        };
        if text == self.config_text && !force {
            return;
        }
        self.config_text = text.clone();
        match Config::parse(&path, &text) {
            Ok(cfg) => match self.apply_config(cfg, &[]) {
                Ok(()) => {}
                Err(e) => {
                    error!("applying {path} failed: {e:#}; keeping the running state");
                    self.fail_reload();
                }
            },
            Err(e) => {
                error!("invalid configuration, keeping the running state: {e}");
                self.fail_reload();
            }
        }
    }

    fn config_text_differs_from_none(&self) -> bool {
        !self.config_text.is_empty()
    }

    fn fail_reload(&mut self) {
        let mut s = self.shared.lock().expect("agent state lock");
        s.counters.reloads_failed += 1;
        s.counters.last_reload_ok = false;
    }

    /// Makes the maps match `cfg` (plus the backends still draining, minus the `drained` ones
    /// to remove now), then starts and stops health checks to match.
    fn apply_config(&mut self, cfg: Config, drained: &[Key]) -> Result<()> {
        let summary = {
            // The pin-directory lock is held for the map writes only (flock: taking it again
            // in this process while holding it would wait forever).
            let _dir = self.lock_dir()?;
            let mut s = self.shared.lock().expect("agent state lock");
            let s = &mut *s;
            update_drains(&cfg, &s.maps, &mut s.draining, drained)?;
            let effective = with_drains(&cfg, &s.maps, &s.draining)?;
            let summary = apply(&mut s.maps, &effective)?;
            s.counters.reloads_ok += 1;
            s.counters.last_reload_ok = true;
            count_rebuild(&mut s.counters, &summary);
            // Backends that left: forget their health.
            let present: Vec<Key> = effective
                .vips
                .iter()
                .flat_map(|v| v.backends.iter().map(move |(a, _)| (v.vip, *a)))
                .collect();
            s.health.retain(|k, _| present.contains(k));
            summary
        };
        if summary.is_empty() {
            info!("configuration applied: no changes");
        } else {
            info!(
                vips_added = summary.vips_added,
                vips_removed = summary.vips_removed,
                backends_added = summary.backends_added,
                backends_removed = summary.backends_removed,
                backends_reweighted = summary.backends_reweighted,
                slots_written = summary.slots_written,
                "configuration applied"
            );
        }
        self.config = cfg;
        self.reconcile_checkers()?;
        if !summary.is_empty() {
            self.refresh_nexthops();
        }
        Ok(())
    }

    /// Re-resolves the next hop of every backend (if the agent keeps the cache).
    fn refresh_nexthops(&mut self) {
        if self.opts.nexthop_refresh.is_none() {
            return;
        }
        let r = self.lock_dir().and_then(|_dir| {
            let mut s = self.shared.lock().expect("agent state lock");
            crate::nexthop::refresh(&mut s.maps)
        });
        match r {
            Ok(rows) => {
                let unresolved = rows.iter().filter(|r| r.mac.is_none()).count();
                tracing::debug!(
                    backends = rows.len(),
                    unresolved,
                    "next-hop cache refreshed"
                );
            }
            Err(e) => warn!("refreshing the next-hop cache failed: {e:#}"),
        }
    }

    /// One probe task per backend of every VIP with a health check; backends of VIPs without
    /// one are marked up.
    fn reconcile_checkers(&mut self) -> Result<()> {
        let mut wanted: HashMap<Key, HealthCheck> = HashMap::new();
        let mut unchecked: Vec<Key> = Vec::new();
        for v in &self.config.vips {
            for (addr, _) in &v.backends {
                match &v.health {
                    Some(h) => {
                        wanted.insert((v.vip, *addr), h.clone());
                    }
                    None => unchecked.push((v.vip, *addr)),
                }
            }
        }
        self.checkers.retain(|k, c| {
            let keep = wanted.get(k) == Some(&c.check);
            if !keep {
                c.handle.abort();
            }
            keep
        });
        for (key, check) in wanted {
            if self.checkers.contains_key(&key) {
                continue;
            }
            self.next_task += 1;
            let task = self.next_task;
            let handle = tokio::spawn(probe_loop(key, task, check.clone(), self.results.clone()));
            self.checkers.insert(
                key,
                Checker {
                    check,
                    task,
                    handle,
                },
            );
        }
        for key in unchecked {
            let down = self
                .shared
                .lock()
                .expect("agent state lock")
                .health
                .get(&key)
                .is_some_and(|h| !h.up);
            if down {
                info!(vip = %key.0, backend = %key.1, "no health check any more: back in service");
                self.set_health(key, true)?;
            }
        }
        Ok(())
    }

    fn on_probe(&mut self, r: ProbeResult) {
        let Some(checker) = self.checkers.get(&r.key) else {
            return;
        };
        if checker.task != r.task {
            return; // from a probe task that has been replaced
        }
        let (rise, fall) = (checker.check.rise, checker.check.fall);
        let transition = {
            let mut s = self.shared.lock().expect("agent state lock");
            let h = s.health.entry(r.key).or_insert_with(|| Health::new(true));
            h.record(&r.result, rise, fall)
        };
        let Some(up) = transition else {
            return;
        };
        let (vip, backend) = r.key;
        if up {
            info!(%vip, %backend, rise, "backend is up: back in the selection table");
        } else {
            warn!(%vip, %backend, fall, reason = r.result.as_ref().err().map(String::as_str).unwrap_or(""),
                "backend is down: out of the selection table (established flows untouched)");
        }
        if let Err(e) = self.set_health(r.key, up) {
            error!(%vip, %backend, "updating the table failed: {e:#}");
        }
    }

    /// Writes a health transition to the maps (flag and table).
    fn set_health(&mut self, key: Key, up: bool) -> Result<()> {
        let _dir = self.lock_dir()?;
        let mut s = self.shared.lock().expect("agent state lock");
        let (vip, backend) = key;
        s.health.entry(key).or_insert_with(|| Health::new(up)).up = up;
        let slots = s.maps.set_health(&vip, backend, up)?;
        s.counters.table_rebuilds += 1;
        s.counters.slots_written += slots as u64;
        let info = s.maps.vip(&vip)?;
        let backends = s.maps.backends(&vip)?;
        let weighted: Vec<_> = backends.iter().filter(|b| b.weight > 0).collect();
        if !weighted.is_empty() && weighted.iter().all(|b| !b.healthy) {
            if info.flags & lb_common::VIP_F_DROP_WHEN_ALL_DOWN != 0 {
                error!(%vip, "every backend is down: new flows are dropped (when_all_down = \"drop\")");
            } else {
                error!(%vip, "every backend is down: failing open, new flows go to all backends (when_all_down = \"fail-open\")");
            }
        }
        Ok(())
    }

    /// Removes drained backends: no active flow, no traffic for `DRAIN_IDLE`, or the drain
    /// timeout reached.
    fn progress_drains(&mut self) {
        let done: Vec<(Key, &'static str)> = {
            let mut s = self.shared.lock().expect("agent state lock");
            let s = &mut *s;
            let mut done = Vec::new();
            for (key, d) in s.draining.iter_mut() {
                let Some(b) = s
                    .maps
                    .backends(&key.0)
                    .ok()
                    .and_then(|bs| bs.into_iter().find(|b| b.addr == key.1))
                else {
                    done.push((*key, "gone"));
                    continue;
                };
                if let Some(why) = d.finished(&s.maps, b.id) {
                    done.push((*key, why));
                }
            }
            for (key, _) in &done {
                s.draining.remove(key);
            }
            s.counters.drained += done.len() as u64;
            done
        };
        if done.is_empty() {
            return;
        }
        for (key, why) in &done {
            info!(vip = %key.0, backend = %key.1, reason = why, "backend drained: removing it");
        }
        let cfg = self.config.clone();
        let keys: Vec<Key> = done.iter().map(|(k, _)| *k).collect();
        if let Err(e) = self.apply_config(cfg, &keys) {
            error!("removing drained backends failed: {e:#}");
        }
    }
}

fn count_rebuild(c: &mut Counters, s: &ApplySummary) {
    if s.slots_written > 0 {
        c.table_rebuilds += 1;
        c.slots_written += s.slots_written as u64;
    }
}

/// Starts draining the backends in the maps that `cfg` no longer has (unless another VIP of
/// the file takes the same endpoint: that one is moved at once), and stops draining those
/// that are back.
fn update_drains(
    cfg: &Config,
    maps: &LbMaps,
    draining: &mut HashMap<Key, Drain>,
    drained: &[Key],
) -> Result<()> {
    let in_file = |vip: &Vip, addr: &SocketAddr| {
        cfg.vips
            .iter()
            .any(|v| v.vip == *vip && v.backends.iter().any(|(a, _)| a == addr))
    };
    let taken_elsewhere = |vip: &Vip, addr: &SocketAddr| {
        cfg.vips.iter().any(|v| {
            v.vip != *vip && v.vip.proto == vip.proto && v.backends.iter().any(|(a, _)| a == addr)
        })
    };
    draining.retain(|(vip, addr), _| !in_file(vip, addr) && !taken_elsewhere(vip, addr));
    for (vip, _) in maps.vips()? {
        let timeout = cfg
            .vips
            .iter()
            .find(|v| v.vip == vip)
            .map_or(crate::config::DEFAULT_DRAIN_TIMEOUT, |v| v.drain_timeout);
        for b in maps.backends(&vip)? {
            let key = (vip, b.addr);
            if in_file(&vip, &b.addr)
                || taken_elsewhere(&vip, &b.addr)
                || draining.contains_key(&key)
                || drained.contains(&key)
            {
                continue;
            }
            info!(%vip, backend = %b.addr, timeout = %humantime::format_duration(timeout),
                "backend left the configuration: draining (no new flows)");
            draining.insert(key, Drain::start(maps, b.id, timeout));
        }
    }
    Ok(())
}

/// `cfg` plus the draining backends at weight 0 (a VIP that left the file stays, with only
/// its draining backends, until they are all gone).
fn with_drains(cfg: &Config, maps: &LbMaps, draining: &HashMap<Key, Drain>) -> Result<Config> {
    let mut out = cfg.clone();
    let current = Config::from_maps(maps)?;
    let mut keys: Vec<&Key> = draining.keys().collect();
    keys.sort();
    for (vip, addr) in keys {
        if let Some(v) = out.vips.iter_mut().find(|v| v.vip == *vip) {
            v.backends.push((*addr, 0));
            continue;
        }
        let Some(old) = current.vips.iter().find(|v| v.vip == *vip) else {
            continue;
        };
        out.vips.push(VipConfig {
            backends: vec![(*addr, 0)],
            health: None,
            ..old.clone()
        });
    }
    Ok(out)
}

/// Probes `key` every interval until aborted.
async fn probe_loop(key: Key, task: u64, check: HealthCheck, tx: mpsc::Sender<ProbeResult>) {
    let mut every = tokio::time::interval(check.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let result = check.probe(key.1).await;
        if tx.send(ProbeResult { key, task, result }).await.is_err() {
            return;
        }
    }
}
