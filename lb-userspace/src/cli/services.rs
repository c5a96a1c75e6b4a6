//! vip add/del/list, backend add/del/set/list.

use lb::{pin::PinDir, Vip};
use serde::Serialize;

use super::{
    args::{BackendCommand, NexthopCommand, VipCommand},
    CmdResult,
};

#[derive(Serialize)]
struct VipRow {
    vip: String,
    algorithm: String,
    forward: &'static str,
    reverse: &'static str,
    table_size: u32,
    backends: usize,
    active_backends: usize,
    /// Flow timeouts in seconds, by state (0 = never).
    timeouts: std::collections::BTreeMap<&'static str, u32>,
}

#[derive(Serialize)]
struct BackendRow {
    vip: String,
    backend: String,
    weight: u32,
    /// "up", or "down" when health checks took it out of the table.
    health: &'static str,
    active_flows: u64,
    id: u32,
}

/// The note `--reverse stateless` prints on stderr: every gateway of the ECMP group must hash
/// with the same seed, and where to see and set this one's.
fn stateless_seed_note(seed: u32) {
    let set = "set it with `lb attach --hash-seed HEX` or `hash_seed` in lb.toml";
    if seed == 0 {
        eprintln!("lb: stateless reverse NAT needs the same hash seed on every gateway: this one has none (0); {set}");
    } else {
        eprintln!("lb: stateless reverse NAT needs the same hash seed on every gateway: see lb show-config ({set})");
    }
}

pub fn vip(dir: &PinDir, cmd: VipCommand, json: bool) -> CmdResult {
    match cmd {
        VipCommand::Add {
            vip,
            table_size,
            algo,
            forward,
            reverse,
            timeout,
            sizes,
        } => {
            // Validate before loading anything, so bad input leaves no trace.
            lb::state::check_table_size(table_size)?;
            let timeouts = parse_timeouts(&timeout, lb_common::Timeouts::DEFAULT)?;
            let algorithm = algo.algorithm()?;
            algorithm.check_for(&vip)?;
            let stateless = reverse == super::args::Reverse::Stateless;
            if stateless
                && !matches!(
                    algorithm,
                    lb::Algorithm::Maglev | lb::Algorithm::SourceHash { .. }
                )
            {
                return Err(lb::LbError::StatelessReverseNeedsHash(vip).into());
            }
            let mut maps = dir.maps_or_load(sizes.load_options())?;
            maps.add_vip_with(&vip, table_size, &timeouts)?;
            if algorithm != lb::Algorithm::Maglev {
                maps.set_algorithm(&vip, algorithm)?;
            }
            maps.set_forward(&vip, forward)?;
            maps.set_stateless_reverse(&vip, stateless)?;
            outln!("added VIP {vip} ({algorithm}, {forward}, table of {table_size} slots)");
            if stateless {
                stateless_seed_note(maps.conf()?.hash_seed);
            }
        }
        VipCommand::Set {
            vip,
            algo,
            source_prefix,
            forward,
            reverse,
            timeout,
        } => {
            // The syntax of every timeout is checked before the maps are opened.
            parse_timeouts(&timeout, lb_common::Timeouts::DEFAULT)?;
            let algorithm = match &algo {
                Some(a) => Some(
                    lb::Algorithm::parse(a, source_prefix)
                        .map_err(|e| super::Failure::Usage(e.0))?,
                ),
                None => None,
            };
            let mut maps = dir.maps()?;
            // Both checked before either is written.
            if let Some(a) = algorithm {
                a.check_for(&vip)?;
            }
            if let Some(f) = forward {
                for b in maps.backends(&vip)? {
                    f.check_backend(&vip, b.addr)?;
                }
            }
            let info = maps.vip(&vip)?;
            let final_algo =
                algorithm.unwrap_or(lb::Algorithm::from_codes(info.algo, info.src_prefix_len));
            let final_stateless = match reverse {
                Some(r) => r == super::args::Reverse::Stateless,
                None => info.flags & lb_common::VIP_F_STATELESS_REVERSE != 0,
            };
            if final_stateless
                && !matches!(
                    final_algo,
                    lb::Algorithm::Maglev | lb::Algorithm::SourceHash { .. }
                )
            {
                return Err(lb::LbError::StatelessReverseNeedsHash(vip).into());
            }
            if reverse == Some(super::args::Reverse::Stateless)
                && info.flags & lb_common::VIP_F_STATELESS_REVERSE == 0
            {
                maps.check_backends_unshared(&vip)?;
            }
            let timeouts = parse_timeouts(&timeout, maps.timeouts(info.vip_id)?)?;
            if reverse == Some(super::args::Reverse::Tracked) {
                maps.set_stateless_reverse(&vip, false)?;
            }
            if let Some(f) = forward {
                if maps.set_forward(&vip, f)? {
                    outln!("VIP {vip}: forwarding {f} (flows established before break)");
                } else {
                    outln!("VIP {vip}: forwarding {f} (unchanged)");
                }
            }
            if let Some(a) = algorithm {
                let n = maps.set_algorithm(&vip, a)?;
                outln!(
                    "VIP {vip}: {a}; {n} table slots changed (established flows keep their backends)"
                );
            }
            if reverse == Some(super::args::Reverse::Stateless) {
                maps.set_stateless_reverse(&vip, true)?;
            }
            if let Some(r) = reverse {
                outln!(
                    "VIP {vip}: {} reverse NAT",
                    if r == super::args::Reverse::Stateless {
                        "stateless"
                    } else {
                        "tracked"
                    }
                );
                if r == super::args::Reverse::Stateless {
                    stateless_seed_note(maps.conf()?.hash_seed);
                }
            }
            if !timeout.is_empty() {
                let changed = maps.set_timeouts(&vip, timeouts)?;
                outln!(
                    "VIP {vip}: flow timeouts {}{}",
                    timeouts_cell(&timeouts),
                    if changed { "" } else { " (unchanged)" }
                );
            }
        }
        VipCommand::Del { vip } => {
            let mut maps = dir.maps()?;
            maps.del_vip(&vip)?;
            outln!("removed VIP {vip}");
        }
        VipCommand::List => {
            let maps = dir.maps()?;
            maps.index_backends()?;
            let mut rows = Vec::new();
            for (vip, info) in maps.vips()? {
                let b = maps.backends(&vip)?;
                rows.push(VipRow {
                    vip: vip.to_string(),
                    algorithm: lb::Algorithm::from_codes(info.algo, info.src_prefix_len)
                        .to_string(),
                    forward: lb::model::Forward::from_code(info.fwd).name(),
                    reverse: if info.flags & lb_common::VIP_F_STATELESS_REVERSE != 0 {
                        "stateless"
                    } else {
                        "tracked"
                    },
                    table_size: info.table_size,
                    backends: b.len(),
                    active_backends: b.iter().filter(|b| b.weight > 0).count(),
                    timeouts: lb::model::timeout_values(&maps.timeouts(info.vip_id)?)
                        .into_iter()
                        .collect(),
                });
            }
            super::print_rows(
                json,
                &rows,
                &[
                    "VIP",
                    "ALGORITHM",
                    "FORWARD",
                    "TABLE",
                    "BACKENDS",
                    "ACTIVE",
                    "TIMEOUTS s (OPENING/ESTABLISHED/CLOSING/CLOSED/UDP)",
                ],
                |r| {
                    vec![
                        r.vip.clone(),
                        r.algorithm.clone(),
                        r.forward.to_string(),
                        r.table_size.to_string(),
                        r.backends.to_string(),
                        r.active_backends.to_string(),
                        lb::model::TIMEOUT_STATES
                            .iter()
                            .map(|s| r.timeouts[s].to_string())
                            .collect::<Vec<_>>()
                            .join("/"),
                    ]
                },
            );
        }
    }
    Ok(())
}

/// `--timeout STATE=SECONDS` arguments applied to `base` (a usage error if one is invalid).
fn parse_timeouts(
    args: &[String],
    base: lb_common::Timeouts,
) -> Result<lb_common::Timeouts, super::Failure> {
    lb::model::parse_timeouts(args, base).map_err(|e| super::Failure::Usage(e.0))
}

/// "opening=60 established=3600 …".
fn timeouts_cell(t: &lb_common::Timeouts) -> String {
    lb::model::timeout_values(t)
        .iter()
        .map(|(s, v)| format!("{s}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn backend(dir: &mut PinDir, cmd: BackendCommand, json: bool) -> CmdResult {
    let mut maps = dir.maps()?;
    match cmd {
        BackendCommand::Add {
            vip,
            backend,
            weight,
        } => {
            let c = maps.add_backend(&vip, backend, weight)?;
            outln!(
                "added backend {backend} (weight {weight}) to {vip}: {} table slots changed",
                c.slots_written
            );
        }
        BackendCommand::Del {
            vip,
            backend,
            drain: true,
            timeout,
        } => {
            drop(maps);
            return drain_and_delete(dir, vip, backend, timeout);
        }
        BackendCommand::Del { vip, backend, .. } => {
            let c = maps.del_backend(&vip, backend)?;
            outln!(
                "removed backend {backend} from {vip}: {} table slots changed",
                c.slots_written
            );
        }
        BackendCommand::Set {
            vip,
            backend,
            weight,
            health,
        } => {
            // Both checked before either is written.
            if !maps.backends(&vip)?.iter().any(|b| b.addr == backend) {
                return Err(lb::LbError::BackendNotFound { vip, backend }.into());
            }
            if let Some(w) = weight {
                if w > lb::error::MAX_WEIGHT {
                    return Err(lb::LbError::WeightOutOfRange(w).into());
                }
            }
            if let Some(weight) = weight {
                let c = maps.set_weight(&vip, backend, weight)?;
                let what = if weight == 0 {
                    " (drained: no new flows)".to_string()
                } else {
                    String::new()
                };
                outln!(
                    "backend {backend} of {vip}: weight {weight}{what}; {} table slots changed",
                    c.slots_written
                );
            }
            if let Some(h) = health {
                let up = matches!(h, super::args::HealthArg::Up);
                let n = maps.set_health(&vip, backend, up)?;
                outln!(
                    "backend {backend} of {vip}: {}; {n} table slots changed",
                    if up { "up" } else { "down" }
                );
            }
        }
        BackendCommand::List { vip } => {
            maps.index_backends()?;
            let vips: Vec<Vip> = match vip {
                Some(v) => {
                    maps.vip(&v)?;
                    vec![v]
                }
                None => maps.vips()?.into_iter().map(|(v, _)| v).collect(),
            };
            let mut rows = Vec::new();
            for v in vips {
                for b in maps.backends(&v)? {
                    rows.push(BackendRow {
                        vip: v.to_string(),
                        backend: b.addr.to_string(),
                        weight: b.weight,
                        health: if b.healthy { "up" } else { "down" },
                        active_flows: maps.flows.active(b.id)?,
                        id: b.id,
                    });
                }
            }
            super::print_rows(
                json,
                &rows,
                &["VIP", "BACKEND", "WEIGHT", "HEALTH", "ACTIVE FLOWS", "ID"],
                |r| {
                    vec![
                        r.vip.clone(),
                        r.backend.clone(),
                        r.weight.to_string(),
                        r.health.to_string(),
                        r.active_flows.to_string(),
                        r.id.to_string(),
                    ]
                },
            );
        }
    }
    Ok(())
}

/// `lb backend del --drain`: weight 0, wait without holding the lock (other commands and the
/// agent go on), then remove — unless someone changed the backend meanwhile.
fn drain_and_delete(
    dir: &mut PinDir,
    vip: Vip,
    backend: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> CmdResult {
    let mut maps = dir.maps()?;
    let find = |maps: &lb::LbMaps| -> Result<lb::BackendState, lb::LbError> {
        maps.backends(&vip)?
            .into_iter()
            .find(|b| b.addr == backend)
            .ok_or(lb::LbError::BackendNotFound { vip, backend })
    };
    let b = find(&maps)?;
    if b.weight > 0 {
        maps.set_weight(&vip, backend, 0)?;
    }
    dir.unlock();
    outln!(
        "draining backend {backend} of {vip} (no new flows; at most {})",
        humantime::format_duration(timeout)
    );
    // Said now, not when the drain ends (the lock is given up already).
    let _ = super::output::flush_or_exit();
    let mut watch = lb::drain::Drain::start(&maps, b.id, timeout, vip.proto == lb::Proto::Udp);
    let why = loop {
        if let Some(why) = watch.finished(&maps, b.id) {
            break why;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let dir = PinDir::open(dir.path())?;
    let maps = &mut dir.maps()?;
    match find(maps) {
        Ok(now) if now.id == b.id && now.weight == 0 => {
            let c = maps.del_backend(&vip, backend)?;
            outln!(
                "removed backend {backend} from {vip} ({why}): {} table slots changed",
                c.slots_written
            );
            Ok(())
        }
        _ => Err(anyhow::anyhow!(
            "backend {backend} of {vip} was changed or removed while it drained; not removing it"
        )
        .into()),
    }
}

pub fn nexthop(dir: &PinDir, cmd: NexthopCommand, json: bool) -> CmdResult {
    let mut maps = dir.maps()?;
    match cmd {
        NexthopCommand::Show => {
            let rows = lb::nexthop::show(&maps)?;
            let headers = [
                "VIP", "BACKEND", "DEV", "MAC", "ON-LINK", "AGE-MS", "MAX-LEN", "CPUS",
            ];
            let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
            super::print_rows(json, &rows, &headers, |r| {
                vec![
                    r.vip.clone(),
                    r.backend.clone(),
                    opt(r.dev.clone()),
                    r.mac
                        .clone()
                        .unwrap_or_else(|| "none: the next packet is looked up".into()),
                    if r.on_link { "yes" } else { "no" }.into(),
                    opt(r.age_ms.map(|a| a.to_string())),
                    opt(r.max_len.map(|l| l.to_string())),
                    r.cpus.to_string(),
                ]
            });
        }
        NexthopCommand::Clear => {
            let n = lb::nexthop::clear(&mut maps)?;
            outln!("cleared the next hop of {n} backends");
        }
    }
    Ok(())
}
