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
    /// Announce servable VIPs through BIRD: (the file bird.conf includes, BIRD's socket).
    pub bird: Option<(PathBuf, PathBuf)>,
    /// Withdraw every VIP when the agent stops (draining this gateway); by default the routes
    /// stay, as the data plane keeps forwarding.
    pub withdraw_on_exit: bool,
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
    /// `LbMaps::table_digest` of every VIP, recomputed after each change the agent makes.
    pub digests: HashMap<Vip, String>,
    /// VIP addresses announced through BIRD now.
    pub announced: Vec<std::net::IpAddr>,
    /// The conntrack sweep (a bounded part every poll tick) and its last complete pass.
    pub sweeper: crate::sweep::Sweeper,
    /// The pin directory (the metrics page reads the links' state there).
    pub pin_dir: PathBuf,
}

impl Shared {
    /// Recomputes every VIP's digest (after an apply).
    fn refresh_digests(&mut self) {
        let mut d = HashMap::new();
        if let Ok(vips) = self.maps.vips() {
            for (vip, _) in vips {
                if let Ok(x) = self.maps.table_digest(&vip) {
                    d.insert(vip, x);
                }
            }
        }
        self.digests = d;
    }

    /// Recomputes the digest of `vip` only (after a change to it); forgets it if it is gone.
    fn refresh_digest(&mut self, vip: &Vip) {
        match self.maps.table_digest(vip) {
            Ok(x) => {
                self.digests.insert(*vip, x);
            }
            Err(_) => {
                self.digests.remove(vip);
            }
        }
    }

    /// What the metrics page needs of the agent's own state (the maps it reads itself,
    /// outside the agent's lock).
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        crate::metrics::Snapshot {
            checks: self
                .health
                .iter()
                .map(|(k, h)| (*k, (h.checks_ok, h.checks_failed)))
                .collect(),
            draining: self.draining.keys().copied().collect(),
            counters: self.counters.clone(),
            digests: self.digests.clone(),
            announced: self.announced.clone(),
            sweep_last: self.sweeper.last().copied(),
            sweep_totals: self.sweeper.totals(),
            pin_dir: self.pin_dir.clone(),
        }
    }
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
    /// The text of the file last applied (or found invalid).
    config_text: String,
    /// A changed text seen once: applied when the next read finds it again, so that a file
    /// caught half-written is never applied.
    pending_text: Option<String>,
    /// The last reload error logged (the same error is not logged every poll).
    last_error: Option<String>,
    checkers: HashMap<Key, Checker>,
    next_task: u64,
    results: mpsc::Sender<ProbeResult>,
    bird: Option<crate::announce::Bird>,
    /// The last announcement error logged.
    bird_error: Option<String>,
    /// When `announce` last ran.
    last_announce_check: std::time::Instant,
    /// How long the idle announcement check waits after the last: `ANNOUNCE_RECHECK`, or 499
    /// times what that check cost if more (at most 0.2% of a CPU).
    announce_every: std::time::Duration,
    /// How long `lock_dir` waits.
    lock_wait: Duration,
    /// Time the sweep's steps took in the pass under way, and when the next pass may begin.
    sweep_busy: Duration,
    sweep_resume_at: std::time::Instant,
    /// The last conntrack-sweep error logged.
    sweep_error: Option<String>,
    /// The last re-attach error logged per interface.
    attach_errors: HashMap<String, String>,
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

/// How often an idle agent checks which VIPs it can serve (for changes made with `lb`
/// commands; its own changes are announced at once).
const ANNOUNCE_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// The longest pause between two conntrack sweep passes.
const SWEEP_MAX_WAIT: Duration = Duration::from_secs(60);

/// The longest the agent waits for the lock at its first apply.
const STARTUP_LOCK_WAIT: Duration = Duration::from_secs(60);

/// The longest the agent waits for the pin-directory lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs the agent until SIGTERM or SIGINT. The data plane keeps forwarding after it returns.
pub async fn run(opts: AgentOptions) -> Result<(), StartError> {
    let text = std::fs::read_to_string(&opts.config)
        .map_err(|e| StartError::Unreadable(format!("reading {}: {e}", opts.config.display())))?;
    let config = Config::parse(&opts.config.display().to_string(), &text)?;
    if let Some(w) = config.seed_warning() {
        warn!("{w}");
    }
    let (maps, page_maps, health) = {
        let dir = PinDir::open(&opts.pin_dir)?;
        let adopted = dir.is_loaded();
        // A first load takes the file's settings, so no other hash seed is ever in use.
        let mut load = opts.load;
        load.hash_seed = load.hash_seed.or(config.hash_seed);
        if let Some(f) = config.flood_threshold {
            load.flood_rate = f;
        }
        if let Some(a) = config.nexthop_max_age_ms {
            load.nexthop_max_age_ms = lb_common::nexthop_age_to_conf(a);
        }
        let maps = dir.maps_or_load(load)?;
        // The page's own handles, opened under this lock.
        let page_maps = match opts.metrics {
            Some(_) => Some(dir.maps()?),
            None => None,
        };
        let attached = dir.attachments()?;
        for iface in &opts.attach {
            if attached.iter().any(|a| &a.iface == iface && !a.gone) {
                continue;
            }
            let mode = dir.attach(iface, opts.mode, load)?;
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
        // Health as the pinned maps record it: a restarted agent does not send new flows to
        // a backend the previous one found down (read under the lock, one pass).
        maps.index_backends().map_err(anyhow::Error::from)?;
        let mut health = HashMap::new();
        for (vip, _) in maps.vips().map_err(anyhow::Error::from)? {
            for b in maps.backends(&vip).map_err(anyhow::Error::from)? {
                health.insert((vip, b.addr), Health::new(b.healthy));
            }
        }
        maps.drop_backend_index();
        (maps, page_maps, health)
    };
    let (tx, mut rx) = mpsc::channel(1024);
    let mut agent = Agent {
        shared: Arc::new(Mutex::new(Shared {
            maps,
            health,
            draining: HashMap::new(),
            counters: Counters::default(),
            digests: HashMap::new(),
            announced: Vec::new(),
            sweeper: crate::sweep::Sweeper::new(),
            pin_dir: opts.pin_dir.clone(),
        })),
        config: config.clone(),
        config_text: text,
        pending_text: None,
        last_error: None,
        checkers: HashMap::new(),
        next_task: 0,
        results: tx,
        bird: opts
            .bird
            .clone()
            .map(|(include, socket)| crate::announce::Bird::new(include, socket)),
        bird_error: None,
        last_announce_check: std::time::Instant::now(),
        announce_every: ANNOUNCE_RECHECK,
        lock_wait: LOCK_WAIT,
        sweep_busy: Duration::ZERO,
        sweep_resume_at: std::time::Instant::now(),
        sweep_error: None,
        attach_errors: HashMap::new(),
        opts,
    };
    // The metrics port first: a start that cannot serve it changes nothing.
    if let (Some(addr), Some(page_maps)) = (agent.opts.metrics, page_maps) {
        crate::metrics::serve(addr, agent.shared.clone(), page_maps).await?;
        info!(%addr, "serving metrics on /metrics");
    }
    // So that `lb detach` can withdraw this gateway's VIPs when no agent runs.
    if let Some(bird) = &agent.bird {
        if let Err(e) = crate::announce::record(&agent.opts.pin_dir, bird) {
            warn!("recording the BIRD settings for `lb detach` failed: {e:#}");
        }
    }
    // A command may hold the lock a while (a large apply): the first apply waits longer.
    agent.lock_wait = STARTUP_LOCK_WAIT;
    let first = agent.apply_config(config);
    agent.lock_wait = LOCK_WAIT;
    first?;

    let mut hup = tokio::signal::unix::signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term =
        tokio::signal::unix::signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut tick = tokio::time::interval(agent.opts.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(r) = rx.recv() => agent.on_probe(r),
            _ = tick.tick() => {
                if !agent.state_present() {
                    error!(pin_dir = %agent.opts.pin_dir.display(),
                        "the pinned state is gone (lb detach --purge?): stopping");
                    agent.withdraw_all();
                    return Err(StartError::Runtime(anyhow::anyhow!(
                        "the pinned state in {} was removed while the agent ran",
                        agent.opts.pin_dir.display()
                    )));
                }
                agent.reload_if_changed(false);
                agent.sweep();
                agent.progress_drains();
                agent.reattach();
                // Changes the agent makes announce at once; on idle ticks the full check (a
                // pass over every backend) runs every `ANNOUNCE_RECHECK`, to see changes made
                // with `lb` commands.
                if agent.last_announce_check.elapsed() >= agent.announce_every {
                    agent.announce();
                }
            }
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
    if agent.opts.withdraw_on_exit {
        agent.withdraw_all();
    } else if agent.bird.is_some() {
        info!("keeping the VIPs announced (the data plane keeps forwarding; --withdraw-on-exit or `lb detach` withdraws them)");
    }
    info!("stopping; the data plane keeps forwarding with the current state");
    Ok(())
}

impl Agent {
    /// Attaches again to every `--attach` interface whose link is gone (the interface was
    /// deleted, e.g. by a driver reload) once an interface of that name exists again. Not to
    /// one an operator detached (`lb detach` removes the link: nothing is gone then).
    fn reattach(&mut self) {
        for iface in self.opts.attach.clone() {
            let r = self.lock_dir().and_then(|dir| {
                let gone = dir
                    .attachments()?
                    .into_iter()
                    .find(|a| a.iface == iface && a.gone);
                let Some(gone) = gone else {
                    return Ok(None);
                };
                if crate::links::iface_index(&iface) == 0 {
                    return Ok(None);
                }
                // In the mode the link had (the program is loaded: the load options are
                // not used).
                dir.attach(&iface, gone.mode, self.opts.load).map(Some)
            });
            match r {
                Ok(Some(mode)) => {
                    self.attach_errors.remove(&iface);
                    info!(
                        iface,
                        mode = crate::pin::mode_name(mode),
                        "attached again (the interface is back)"
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    let e = format!("{e:#}");
                    if self.attach_errors.get(&iface) != Some(&e) {
                        warn!(iface, "attaching again failed: {e}");
                        self.attach_errors.insert(iface, e);
                    }
                }
            }
        }
    }

    /// The pin-directory lock, for one write. Waits at most `LOCK_WAIT`: a command that holds
    /// it longer (a large `lb apply`) makes this write fail and be retried later (the next
    /// probe result, poll or sweep step), never stalls the agent.
    fn lock_dir(&self) -> Result<PinDir> {
        PinDir::open_within(&self.opts.pin_dir, self.lock_wait)
    }

    /// Announces (through BIRD) the VIP addresses this node can serve now, withdrawing the
    /// others. Failures are logged once and retried on the next tick.
    fn announce(&mut self) {
        let began = std::time::Instant::now();
        self.last_announce_check = began;
        let Some(bird) = self.bird.as_mut() else {
            return;
        };
        let attached = crate::pin::has_attachments(&self.opts.pin_dir);
        let vips = {
            let s = self.shared.lock().expect("agent state lock");
            crate::announce::servable(&s.maps, attached)
        };
        self.announce_every = ANNOUNCE_RECHECK.max(began.elapsed() * 499);
        let r = vips.and_then(|v| {
            let changed = bird.announce(&v)?;
            Ok((changed, v))
        });
        match r {
            Ok((true, v)) => {
                info!(vips = ?v, attached, "BGP announcements updated");
                self.bird_error = None;
            }
            Ok((false, _)) => self.bird_error = None,
            Err(e) => {
                let m = format!("{e:#}");
                if self.bird_error.as_deref() != Some(m.as_str()) {
                    warn!("announcing through BIRD failed (retrying): {m}");
                    self.bird_error = Some(m);
                }
            }
        }
        let announced = bird.announced();
        self.shared.lock().expect("agent state lock").announced = announced;
    }

    /// Sweeps part of the conntrack tables (`sweep::AGENT_BUDGET` entries): deletes expired and
    /// stale entries and, at the end of each complete pass, settles the active-flow counts.
    /// Logs a line per complete pass that changed something; errors once each.
    fn sweep(&mut self) {
        // At most 0.5% of a CPU: after a pass, the next waits 199 times as long as the pass
        // worked (a pass reads every backend's counts: at 64,000 backends, about a second).
        if std::time::Instant::now() < self.sweep_resume_at {
            return;
        }
        let mut worked = Duration::ZERO;
        let r = self.lock_dir().and_then(|_dir| {
            let mut s = self.shared.lock().expect("agent state lock");
            let s = &mut *s;
            let began = std::time::Instant::now();
            let r = s.sweeper.step(&mut s.maps, crate::sweep::AGENT_BUDGET);
            worked = began.elapsed();
            Ok(r?)
        });
        self.sweep_busy += worked;
        if matches!(r, Ok(Some(_))) {
            self.sweep_resume_at =
                std::time::Instant::now() + (self.sweep_busy * 199).min(SWEEP_MAX_WAIT);
            self.sweep_busy = Duration::ZERO;
        }
        match r {
            Ok(report) => {
                self.sweep_error = None;
                if let Some(r) = report.filter(|r| r.changed()) {
                    info!(
                        expired = r.expired,
                        stale = r.stale,
                        evictions_settled = r.evictions_settled,
                        expired_settled = r.expired_settled,
                        active_counts_written = r.active_written,
                        confirmed = r.table_entries(crate::CtTable::Confirmed),
                        unconfirmed = r.table_entries(crate::CtTable::Unconfirmed),
                        "conntrack sweep"
                    );
                }
            }
            Err(e) => {
                let m = format!("{e:#}");
                if self.sweep_error.as_deref() != Some(m.as_str()) {
                    warn!("sweeping conntrack failed (retrying): {m}");
                    self.sweep_error = Some(m);
                }
            }
        }
    }

    /// Withdraws every VIP from BIRD: this node stops vouching for them, so the router moves
    /// their flows elsewhere.
    fn withdraw_all(&mut self) {
        if let Some(bird) = self.bird.as_mut() {
            match bird.announce(&Default::default()) {
                Ok(_) => info!("withdrew every VIP from BIRD"),
                Err(e) => error!("withdrawing the VIPs from BIRD failed: {e:#}"),
            }
        }
    }

    /// Whether the maps the agent writes are still the pinned ones.
    fn state_present(&self) -> bool {
        self.opts.pin_dir.join(lb_common::names::VIPS).exists()
    }

    /// Reads the file; applies it once the same changed text has been read twice in a row
    /// (or at once with `force`, on SIGHUP). An invalid file is logged and the running state
    /// kept; a valid one that fails to apply is retried at the next poll.
    fn reload_if_changed(&mut self, force: bool) {
        let path = self.opts.config.display().to_string();
        let text = match std::fs::read_to_string(&self.opts.config) {
            Ok(t) => t,
            Err(e) => {
                self.report(format!(
                    "cannot read the configuration {path}: {e}; keeping the running state"
                ));
                return;
            }
        };
        if text == self.config_text && !force {
            self.pending_text = None;
            return;
        }
        if !force && self.pending_text.as_deref() != Some(text.as_str()) {
            self.pending_text = Some(text);
            return;
        }
        self.pending_text = None;
        match Config::parse(&path, &text) {
            Ok(cfg) => match (cfg.seed_warning(), self.apply_config(cfg)) {
                (warning, Ok(())) => {
                    // Once per text applied.
                    if let Some(w) = warning {
                        warn!("{w}");
                    }
                    self.config_text = text;
                    self.last_error = None;
                }
                (_, Err(e)) => self.report(format!(
                    "applying {path} failed: {e:#}; keeping the running state (retrying)"
                )),
            },
            Err(e) => {
                // Not retried: the same text stays invalid.
                self.config_text = text;
                self.report(format!(
                    "invalid configuration, keeping the running state: {e}"
                ));
            }
        }
    }

    /// Logs a reload failure (once per distinct message) and counts it.
    fn report(&mut self, message: String) {
        if self.last_error.as_deref() != Some(message.as_str()) {
            error!("{message}");
            self.last_error = Some(message);
        }
        self.fail_reload();
    }

    fn fail_reload(&mut self) {
        let mut s = self.shared.lock().expect("agent state lock");
        s.counters.reloads_failed += 1;
        s.counters.last_reload_ok = false;
    }

    /// `apply_config`'s map writes, under both locks.
    fn apply_locked(s: &mut Shared, cfg: &Config) -> Result<crate::config::ApplySummary> {
        // Drains change only if the whole apply succeeds.
        let mut draining = s.draining.clone();
        update_drains(cfg, &s.maps, &mut draining)?;
        let effective = with_drains(cfg, &s.maps, &draining)?;
        let summary = apply(&mut s.maps, &effective)?;
        s.draining = draining;
        s.counters.reloads_ok += 1;
        s.counters.last_reload_ok = true;
        count_rebuild(&mut s.counters, &summary);
        // Health as the maps have it (a backend re-added by hand starts up again);
        // backends that left are forgotten.
        let mut present = HashMap::new();
        for (vip, _) in s.maps.vips()? {
            for b in s.maps.backends(&vip)? {
                present.insert((vip, b.addr), b.healthy);
            }
        }
        s.health.retain(|k, _| present.contains_key(k));
        for (k, up) in present {
            s.health.entry(k).or_insert_with(|| Health::new(up)).up = up;
        }
        s.refresh_digests();
        Ok(summary)
    }

    /// Makes the maps match `cfg` (plus the backends still draining), then starts and stops
    /// health checks to match.
    fn apply_config(&mut self, cfg: Config) -> Result<()> {
        let summary = {
            // The pin-directory lock is held for the map writes only (flock: taking it again
            // in this process while holding it would wait forever).
            let _dir = self.lock_dir()?;
            let mut s = self.shared.lock().expect("agent state lock");
            let s = &mut *s;
            // Every VIP's backends are read several times below: indexed once, for this
            // locked section only (other processes write when the lock is free).
            s.maps.index_backends()?;
            let r = Self::apply_locked(s, &cfg);
            s.maps.drop_backend_index();
            r?
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
                timeouts_changed = summary.timeouts_changed,
                settings_changed = summary.settings_changed,
                "configuration applied"
            );
        }
        self.config = cfg;
        self.reconcile_checkers()?;
        let vips: Vec<Vip> = self.config.vips.iter().map(|v| v.vip).collect();
        // One pass over the backends for all VIPs (a point-in-time view, like the reads it
        // replaces), not one per VIP.
        // (Under the pin-directory lock, so the index is exact; without it, no logging.)
        if let Ok(_dir) = self.lock_dir() {
            let indexed = self
                .shared
                .lock()
                .expect("agent state lock")
                .maps
                .index_backends();
            for vip in vips {
                self.log_if_all_down(&vip);
            }
            if indexed.is_ok() {
                self.shared
                    .lock()
                    .expect("agent state lock")
                    .maps
                    .drop_backend_index();
            }
        }
        self.announce();
        Ok(())
    }

    /// Logs the documented choice if every backend of `vip` with a weight is down.
    fn log_if_all_down(&self, vip: &Vip) {
        let s = self.shared.lock().expect("agent state lock");
        let (Ok(info), Ok(backends)) = (s.maps.vip(vip), s.maps.backends(vip)) else {
            return;
        };
        let weighted: Vec<_> = backends.iter().filter(|b| b.weight > 0).collect();
        if weighted.is_empty() || weighted.iter().any(|b| b.healthy) {
            return;
        }
        if info.flags & lb_common::VIP_F_DROP_WHEN_ALL_DOWN != 0 {
            error!(%vip, "every backend is down: new flows are dropped (when_all_down = \"drop\")");
        } else if info.flags & lb_common::VIP_F_WITHDRAW_WHEN_ALL_DOWN != 0 {
            error!(%vip, "every backend is down: withdrawing the VIP, failing open meanwhile (when_all_down = \"withdraw\")");
        } else {
            error!(%vip, "every backend is down: failing open, new flows go to all backends (when_all_down = \"fail-open\")");
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

    /// Writes a health transition to the maps (flag and table). On failure the agent's view
    /// goes back to what the maps say, so the next probe result tries again.
    fn set_health(&mut self, key: Key, up: bool) -> Result<()> {
        let (vip, backend) = key;
        let r = (|| -> Result<()> {
            let _dir = self.lock_dir()?;
            let mut s = self.shared.lock().expect("agent state lock");
            let slots = s.maps.set_health(&vip, backend, up)?;
            s.counters.table_rebuilds += 1;
            s.counters.slots_written += slots as u64;
            s.health.entry(key).or_insert_with(|| Health::new(up)).up = up;
            s.refresh_digest(&vip);
            Ok(())
        })();
        if r.is_err() {
            let mut s = self.shared.lock().expect("agent state lock");
            let in_maps = s
                .maps
                .backends(&vip)
                .ok()
                .and_then(|bs| bs.into_iter().find(|b| b.addr == backend))
                .map(|b| b.healthy);
            match in_maps {
                Some(h) => s.health.entry(key).or_insert_with(|| Health::new(h)).up = h,
                None => {
                    s.health.remove(&key);
                }
            }
        }
        r?;
        self.log_if_all_down(&vip);
        self.announce();
        Ok(())
    }

    /// Removes drained backends (`drain.rs` says when), one by one, without reapplying the
    /// file (changes made with `lb` commands since stay); a VIP that left the file goes with
    /// its last backend.
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
            done
        };
        for (key, why) in done {
            let (vip, backend) = key;
            let in_file = self.config.vips.iter().any(|v| v.vip == vip);
            let r = (|| -> Result<()> {
                let _dir = self.lock_dir()?;
                let mut s = self.shared.lock().expect("agent state lock");
                if s.maps.backends(&vip)?.iter().any(|b| b.addr == backend) {
                    let c = s.maps.del_backend(&vip, backend)?;
                    s.counters.table_rebuilds += 1;
                    s.counters.slots_written += c.slots_written as u64;
                }
                if !in_file && s.maps.backends(&vip)?.is_empty() {
                    s.maps.del_vip(&vip)?;
                    info!(%vip, "VIP left the configuration and has no backend left: removed");
                }
                s.draining.remove(&key);
                s.health.remove(&key);
                s.counters.drained += 1;
                s.refresh_digest(&vip);
                Ok(())
            })();
            match r {
                Ok(()) => info!(%vip, %backend, reason = why, "backend drained: removed"),
                Err(e) => error!(%vip, %backend, "removing the drained backend failed: {e:#}"),
            }
        }
    }
}

fn count_rebuild(c: &mut Counters, s: &ApplySummary) {
    if s.slots_written > 0 {
        c.table_rebuilds += 1;
        c.slots_written += s.slots_written as u64;
    }
}

/// Starts draining the backends in the maps that `cfg` no longer has, and stops draining
/// those that are back. A backend endpoint may serve several VIPs, so one that left a VIP
/// drains there while it serves others — unless that would break the sharing rules `lb
/// apply` checks (at most `MAX_VIPS_PER_BACKEND` VIPs; none besides a VIP with stateless
/// reverse NAT): then it is moved at once.
fn update_drains(cfg: &Config, maps: &LbMaps, draining: &mut HashMap<Key, Drain>) -> Result<()> {
    let in_file = |vip: &Vip, addr: &SocketAddr| {
        cfg.vips
            .iter()
            .any(|v| v.vip == *vip && v.backends.iter().any(|(a, _)| a == addr))
    };
    // A backend that does not suit its VIP's (new) forwarding mode is removed at once: its
    // flows break with the mode change anyway, and it could not stay at weight 0 under it.
    let fits = |vip: &Vip, addr: &SocketAddr| {
        cfg.vips
            .iter()
            .find(|v| v.vip == *vip)
            .is_none_or(|v| v.forward.check_backend(vip, *addr).is_ok())
    };
    // Whether a VIP has stateless reverse NAT in the applied configuration (the file's, or
    // the maps' for a VIP that left the file and stays while its backends drain).
    let stateless = |vip: &Vip| match cfg.vips.iter().find(|v| v.vip == *vip) {
        Some(v) => v.stateless_reverse,
        None => maps
            .vip(vip)
            .is_ok_and(|i| i.flags & lb_common::VIP_F_STATELESS_REVERSE != 0),
    };
    // Whether `key` may drain beside the file's backends and the drains `kept` so far.
    let may_drain = |key: &Key, kept: &HashMap<Key, Drain>| {
        let (vip, addr) = key;
        let mut users: Vec<(Vip, bool)> = cfg
            .vips
            .iter()
            .filter(|v| {
                v.vip != *vip
                    && v.vip.proto == vip.proto
                    && v.backends.iter().any(|(a, _)| a == addr)
            })
            .map(|v| (v.vip, v.stateless_reverse))
            .collect();
        users.extend(
            kept.keys()
                .filter(|(v, a)| a == addr && v.proto == vip.proto && v != vip)
                .map(|(v, _)| (*v, stateless(v))),
        );
        crate::state::sharing_error(vip, stateless(vip), *addr, &users).is_none()
    };
    let mut old: Vec<(Key, Drain)> = draining
        .drain()
        .filter(|((vip, addr), _)| !in_file(vip, addr) && fits(vip, addr))
        .collect();
    old.sort_by_key(|(k, _)| *k);
    let mut kept: HashMap<Key, Drain> = HashMap::new();
    for (key, d) in old {
        if may_drain(&key, &kept) {
            kept.insert(key, d);
        } else {
            info!(vip = %key.0, backend = %key.1,
                "draining backend now serves a VIP it cannot share with: removed at once");
        }
    }
    for (vip, _) in maps.vips()? {
        let timeout = cfg
            .vips
            .iter()
            .find(|v| v.vip == vip)
            .map_or(crate::config::DEFAULT_DRAIN_TIMEOUT, |v| v.drain_timeout);
        for b in maps.backends(&vip)? {
            let key = (vip, b.addr);
            if in_file(&vip, &b.addr) || !fits(&vip, &b.addr) || kept.contains_key(&key) {
                continue;
            }
            if !may_drain(&key, &kept) {
                info!(%vip, backend = %b.addr,
                    "backend left the configuration and cannot drain beside the VIPs it now serves: removed at once");
                continue;
            }
            info!(%vip, backend = %b.addr, timeout = %humantime::format_duration(timeout),
                "backend left the configuration: draining (no new flows)");
            let udp = vip.proto == crate::Proto::Udp;
            kept.insert(key, Drain::start(maps, b.id, timeout, udp));
        }
    }
    *draining = kept;
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
