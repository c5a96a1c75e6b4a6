//! apply, show-config.

use std::path::Path;

use anyhow::Context;
use lb::{
    config::{apply as apply_config, Config},
    pin::PinDir,
};

use super::{args::Sizes, CmdResult, Failure};

pub fn apply(dir: &PinDir, file: &Path, sizes: Sizes) -> CmdResult {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading {}", file.display()))
        .map_err(|e| Failure::Usage(format!("{e:#}")))?;
    // The whole file is validated before the kernel is touched.
    let cfg = Config::parse(&file.display().to_string(), &text)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if let Some(w) = cfg.seed_warning() {
        eprintln!("lb: warning: {w}");
    }
    // A first load takes the file's settings, so no other seed is ever in use.
    let mut opts = sizes.load_options();
    opts.hash_seed = cfg.hash_seed;
    if let Some(f) = cfg.flood_threshold {
        opts.flood_rate = f;
    }
    if let Some(a) = cfg.nexthop_max_age_ms {
        opts.nexthop_max_age_ms = lb_common::nexthop_age_to_conf(a);
    }
    let mut maps = dir.maps_or_load(opts)?;
    let seed_before = maps.conf()?.hash_seed;
    let s = apply_config(&mut maps, &cfg)?;
    if maps.conf()?.hash_seed != seed_before {
        eprintln!("lb: hash seed changed: new flows are hashed with the new seed (flows with a conntrack entry keep their backend)");
    }
    if s.is_empty() {
        outln!("no changes");
    } else {
        outln!(
            "applied: {} VIPs added, {} removed, {} tables resized, {} algorithms changed; {} backends added, {} removed, {} reweighted; {} table slots written",
            s.vips_added, s.vips_removed, s.tables_resized, s.algorithms_changed, s.backends_added, s.backends_removed, s.backends_reweighted, s.slots_written
        );
        if s.timeouts_changed > 0 {
            outln!("flow timeouts changed on {} VIPs", s.timeouts_changed);
        }
        if s.settings_changed > 0 {
            outln!("global settings (hash_seed, flood_threshold, nexthop_max_age_ms) changed");
        }
        let r = s.repaired;
        if r != lb::state::Repair::default() {
            outln!(
                "repaired what an interrupted command had left: {} port filter entries, {} unused backend entries",
                r.ports_fixed, r.orphans_removed
            );
        }
    }
    Ok(())
}

/// `lb check`: every violated invariant, one a line; exit 1 if there is any.
pub fn check(dir: &PinDir, json: bool) -> CmdResult {
    let maps = dir.maps()?;
    maps.index_backends()?;
    let bad = maps.check()?;
    let vips = maps.vips()?.len();
    if json {
        super::print_json(&serde_json::json!({ "vips": vips, "violations": bad }));
    } else if bad.is_empty() {
        outln!("consistent: {vips} VIPs, their tables, backends, reverse NAT and port filter");
    } else {
        for b in &bad {
            outln!("violation: {b}");
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(super::Failure::Runtime(anyhow::anyhow!(
            "{} invariant violations (`lb apply` repairs what an interrupted command left)",
            bad.len()
        )))
    }
}

pub fn show(dir: &PinDir) -> CmdResult {
    let maps = dir.maps()?;
    maps.index_backends()?;
    out!("{}", Config::from_maps(&maps)?.to_toml());
    Ok(())
}
