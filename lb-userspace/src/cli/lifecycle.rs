//! attach, detach, status.

use anyhow::Context;
use lb::{
    pin::{mode_name, PinDir},
    AttachMode,
};
use serde::Serialize;

use super::{
    args::{DecapCommand, Mode, Sizes},
    print_json, table_fmt, CmdResult,
};

pub fn attach_mode(mode: Mode) -> AttachMode {
    match mode {
        Mode::Native => AttachMode::Native,
        Mode::Generic => AttachMode::Generic,
        Mode::Tc => AttachMode::Tc,
        Mode::Auto => AttachMode::Auto,
    }
}

/// Checks every interface before anything is attached, so that a bad name changes nothing:
/// it exists and `what` is not attached to it yet.
fn check_ifaces(ifaces: &[String], attached: &[lb::pin::Attachment], what: &str) -> CmdResult {
    for iface in ifaces {
        let c = std::ffi::CString::new(iface.as_str())
            .map_err(|_| anyhow::anyhow!("invalid interface name {iface:?}"))?;
        // SAFETY: valid C string.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
            return Err(anyhow::anyhow!("interface {iface} does not exist").into());
        }
        // A link whose interface is gone is replaced.
        if attached.iter().any(|a| &a.iface == iface && !a.gone) {
            return Err(anyhow::anyhow!("{what} is already attached to {iface}").into());
        }
    }
    Ok(())
}

/// Deployment-wide settings given to `lb attach`.
pub struct Global {
    pub hash_seed: Option<u32>,
    pub flood_threshold: Option<u32>,
    pub nexthop_max_age_ms: Option<u32>,
}

pub fn attach(
    dir: &PinDir,
    ifaces: &[String],
    mode: Mode,
    sizes: Sizes,
    global: Global,
    json: bool,
) -> CmdResult {
    let mode = attach_mode(mode);
    check_ifaces(ifaces, &dir.attachments().unwrap_or_default(), "lb")?;
    let was_loaded = dir.is_loaded();
    let mut opts = sizes.load_options();
    opts.hash_seed = global.hash_seed;
    if let Some(f) = global.flood_threshold {
        opts.flood_rate = f;
    }
    if let Some(a) = global.nexthop_max_age_ms {
        opts.nexthop_max_age_ms = lb_common::nexthop_age_to_conf(a);
    }
    let mut done = Vec::new();
    for iface in ifaces {
        match dir.attach(iface, mode, opts) {
            Ok(used) => done.push(Attached {
                iface: iface.clone(),
                mode: mode_name(used),
                state: "attached",
            }),
            Err(e) => {
                // Undo this command's attachments (and load), leaving the state as it was.
                for a in &done {
                    let _ = dir.detach(&a.iface);
                }
                if !was_loaded {
                    dir.unload();
                }
                return Err(e.into());
            }
        }
    }
    if was_loaded {
        // Already loaded: the settings given are written now (a first load wrote them).
        set_global(dir, &global)?;
    }
    if json {
        print_json(&done);
    } else {
        for a in &done {
            outln!("attached to {} ({} mode)", a.iface, a.mode);
        }
    }
    Ok(())
}

/// Writes the deployment-wide settings given (the others stay), saying on stderr when the
/// hash seed changes.
fn set_global(dir: &PinDir, global: &Global) -> CmdResult {
    if global.hash_seed.is_none()
        && global.flood_threshold.is_none()
        && global.nexthop_max_age_ms.is_none()
    {
        return Ok(());
    }
    let mut maps = dir.maps()?;
    let old = maps.conf()?;
    let new = lb_common::GlobalConf {
        hash_seed: global.hash_seed.unwrap_or(old.hash_seed),
        flood_rate: global.flood_threshold.unwrap_or(old.flood_rate),
        nexthop_max_age_ms: global
            .nexthop_max_age_ms
            .map_or(old.nexthop_max_age_ms, lb_common::nexthop_age_to_conf),
        ..old
    };
    maps.set_conf(new)?;
    if new.hash_seed != old.hash_seed {
        eprintln!("lb: hash seed changed: new flows are hashed with the new seed (flows with a conntrack entry keep their backend); every gateway of this deployment needs the same seed");
    }
    Ok(())
}

pub fn detach(dir: PinDir, ifaces: &[String], purge: bool) -> CmdResult {
    let attached = dir.attachments()?;
    for iface in ifaces {
        if !attached.iter().any(|a| &a.iface == iface) {
            return Err(anyhow::anyhow!("lb is not attached to {iface}").into());
        }
    }
    let targets: Vec<String> = if ifaces.is_empty() {
        attached.iter().map(|a| a.iface.clone()).collect()
    } else {
        ifaces.to_vec()
    };
    for iface in &targets {
        dir.detach(iface)?;
        if attached.iter().any(|a| &a.iface == iface && a.gone) {
            outln!("removed the link of {iface} (the interface is gone)");
        } else {
            outln!("detached from {iface}");
        }
    }
    // Detached everywhere: this gateway no longer forwards, so its VIPs are withdrawn (a
    // running agent sees it too; this covers a gateway without one).
    if dir.attachments()?.is_empty() {
        match lb::announce::withdraw_recorded(dir.path()) {
            Ok(true) => outln!("withdrew the VIPs from BIRD"),
            Ok(false) => {}
            Err(e) => eprintln!("warning: withdrawing the VIPs from BIRD failed: {e:#}"),
        }
    }
    if purge {
        let path = dir.path().to_path_buf();
        dir.purge().context("removing the pinned state")?;
        if let Err(e) = lb::announce::forget_record(&path) {
            eprintln!("warning: removing the announcement record failed: {e:#}");
        }
        outln!("removed the program and all state from {}", path.display());
    }
    Ok(())
}

#[derive(Serialize)]
struct Attached {
    iface: String,
    mode: &'static str,
    /// "attached", or "gone": the interface was deleted (the kernel detached the link; its pin
    /// is left until `lb detach` or a new `lb attach`).
    state: &'static str,
}

impl Attached {
    fn of(a: lb::pin::Attachment) -> Attached {
        Attached {
            iface: a.iface,
            mode: mode_name(a.mode),
            state: if a.gone { "gone" } else { "attached" },
        }
    }
}

#[derive(Serialize)]
struct Fill {
    map: &'static str,
    used: u64,
    capacity: u64,
}

#[derive(Serialize)]
struct Status {
    pin_dir: String,
    program_id: u32,
    attached: Vec<Attached>,
    maps: Vec<Fill>,
    /// Backends that health checks took out of the tables.
    backends_down: Vec<String>,
    /// New flows per second per CPU above which unconfirmed flows are not stored (0 = none).
    flood_threshold: u32,
    /// How long (ms) a looked-up next hop is used (0: no cache).
    nexthop_max_age_ms: u32,
    /// Whether a flow-hash seed is set (the seed itself is in `lb show-config`).
    hash_seed_set: bool,
}

pub fn status(dir: &PinDir, json: bool) -> CmdResult {
    let maps = dir.maps()?;
    maps.index_backends()?;
    let f = maps.fill()?;
    let mut backends_down = Vec::new();
    for (vip, _) in maps.vips()? {
        for b in maps.backends(&vip)? {
            if !b.healthy {
                backends_down.push(format!("{vip} -> {}", b.addr));
            }
        }
    }
    let conf = maps.conf()?;
    let s = Status {
        backends_down,
        flood_threshold: conf.flood_rate,
        nexthop_max_age_ms: lb_common::nexthop_age_from_conf(conf.nexthop_max_age_ms),
        hash_seed_set: conf.hash_seed != 0,
        pin_dir: dir.path().display().to_string(),
        program_id: dir.program_id()?,
        attached: dir.attachments()?.into_iter().map(Attached::of).collect(),
        maps: [
            ("vips", f.vips),
            ("backends", f.backends),
            ("table slots", f.table_slots),
            ("conntrack", f.conntrack),
            ("conntrack new", f.conntrack_new),
            ("reverse nat", f.revnat),
        ]
        .into_iter()
        .map(|(map, (used, capacity))| Fill {
            map,
            used,
            capacity,
        })
        .collect(),
    };
    if json {
        print_json(&s);
        return Ok(());
    }
    outln!("pin directory: {}", s.pin_dir);
    outln!("program id:    {}", s.program_id);
    if s.attached.is_empty() {
        outln!("attached:      nowhere (loaded, not attached)");
    } else {
        let list: Vec<String> = s
            .attached
            .iter()
            .map(|a| match a.state {
                "gone" => format!(
                    "{} ({}, GONE: the interface was deleted; `lb attach {}` again or `lb detach {}`)",
                    a.iface, a.mode, a.iface, a.iface
                ),
                _ => format!("{} ({})", a.iface, a.mode),
            })
            .collect();
        outln!("attached:      {}", list.join(", "));
    }
    outln!(
        "hash seed:     {}",
        if s.hash_seed_set {
            "set (lb show-config prints it)"
        } else {
            "NOT SET (0): set one with lb attach --hash-seed or hash_seed in lb.toml"
        }
    );
    if s.flood_threshold == 0 {
        outln!("flood limit:   none (every new flow is stored)");
    } else {
        outln!(
            "flood limit:   {} new flows/s per CPU (above it, unconfirmed flows are not stored)",
            s.flood_threshold
        );
    }
    if s.nexthop_max_age_ms == 0 {
        outln!("next hops:     no cache (a route lookup for every packet)");
    } else {
        outln!(
            "next hops:     cached from route lookups, each used for at most {} ms",
            s.nexthop_max_age_ms
        );
    }
    outln!();
    let rows: Vec<Vec<String>> = s
        .maps
        .iter()
        .map(|m| {
            vec![
                m.map.to_string(),
                m.used.to_string(),
                m.capacity.to_string(),
                format!("{:.1}%", 100.0 * m.used as f64 / m.capacity.max(1) as f64),
            ]
        })
        .collect();
    table_fmt::print(&["MAP", "USED", "CAPACITY", "FILL"], &rows);
    outln!();
    if s.backends_down.is_empty() {
        outln!("health:        no backend down");
    } else {
        outln!("health:        {} backends down", s.backends_down.len());
        for b in &s.backends_down {
            outln!("  {b}");
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct DecapStatus {
    attached: Vec<Attached>,
    counters: std::collections::BTreeMap<&'static str, u64>,
}

pub fn decap(dir: &PinDir, cmd: DecapCommand, json: bool) -> CmdResult {
    match cmd {
        DecapCommand::Attach {
            ifaces,
            mode,
            from,
            vip,
        } => {
            let mode = attach_mode(mode);
            check_ifaces(&ifaces, &dir.decap_attachments()?, "lb decap")?;
            let config = lb::decap::DecapConfig::for_host(&from, &vip)?;
            let mut done = Vec::new();
            for iface in &ifaces {
                match dir.decap_attach(iface, mode, &config) {
                    Ok(m) => {
                        outln!("lb decap attached to {iface} ({} mode)", mode_name(m));
                        done.push(iface.clone());
                    }
                    Err(e) => {
                        for d in &done {
                            let _ = dir.decap_detach(d);
                        }
                        return Err(e.into());
                    }
                }
            }
        }
        DecapCommand::Set { from, vip } => {
            let config = lb::decap::DecapConfig::for_host(&from, &vip)?;
            dir.decap_configure(&config)?;
            let from: Vec<String> = config
                .from
                .iter()
                .map(|(a, l)| format!("{a}/{l}"))
                .collect();
            let vips: Vec<String> = config.vips.iter().map(|a| a.to_string()).collect();
            outln!(
                "lb decap accepts: from {}; VIPs {}",
                from.join(", "),
                vips.join(", ")
            );
        }
        DecapCommand::Detach { ifaces } => {
            let attached = dir.decap_attachments()?;
            let ifaces: Vec<String> = if ifaces.is_empty() {
                attached.iter().map(|a| a.iface.clone()).collect()
            } else {
                for i in &ifaces {
                    if !attached.iter().any(|a| &a.iface == i) {
                        return Err(anyhow::anyhow!("lb decap is not attached to {i}").into());
                    }
                }
                ifaces
            };
            for i in &ifaces {
                dir.decap_detach(i)?;
                outln!("lb decap detached from {i}");
            }
        }
        DecapCommand::Status => {
            let s = DecapStatus {
                attached: dir
                    .decap_attachments()?
                    .into_iter()
                    .map(Attached::of)
                    .collect(),
                counters: lb_common::DECAP_COUNTER_NAMES
                    .iter()
                    .copied()
                    .zip(dir.decap_counters()?)
                    .collect(),
            };
            if json {
                print_json(&s);
            } else {
                let list: Vec<String> = s
                    .attached
                    .iter()
                    .map(|a| format!("{} ({})", a.iface, a.mode))
                    .collect();
                outln!(
                    "attached: {}",
                    if list.is_empty() {
                        "nowhere".to_string()
                    } else {
                        list.join(", ")
                    }
                );
                let rows: Vec<Vec<String>> = s
                    .counters
                    .iter()
                    .map(|(k, v)| vec![k.to_string(), v.to_string()])
                    .collect();
                table_fmt::print(&["COUNTER", "VALUE"], &rows);
            }
        }
    }
    Ok(())
}
