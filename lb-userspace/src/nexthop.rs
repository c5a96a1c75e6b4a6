//! The next-hop cache: resolve, from the kernel's routing table and neighbour cache, how each
//! backend is reached (egress interface, source and destination MAC), so that the data plane
//! can skip its per-packet route lookup.
//!
//! The cache is a snapshot: refresh it when routes or neighbours change (a backend replaced,
//! a router's MAC changed). A backend whose neighbour is not resolved (yet) is left out and
//! keeps the route lookup per packet. Without a refresh, lb uses route lookups only.

use std::{net::IpAddr, process::Command};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::state::LbMaps;

/// How a backend is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub dev: String,
    pub ifindex: u32,
    /// The address whose MAC is used: the backend itself, or its gateway.
    pub via: IpAddr,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

fn ip_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing `ip -j {}`", args.join(" ")))
}

fn mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .filter_map(|x| u8::from_str_radix(x, 16).ok())
        .collect();
    v.try_into().ok()
}

/// Resolves `addr` in the caller's network namespace; None if its neighbour is not known in
/// a usable state.
pub fn resolve(addr: IpAddr) -> Result<Option<Resolved>> {
    // No usable route (unreachable, blackhole, prohibit): not cacheable.
    let Ok(route) = ip_json(&["route", "get", &addr.to_string()]) else {
        return Ok(None);
    };
    let r = &route[0];
    let dev = r["dev"]
        .as_str()
        .context("route without a device")?
        .to_string();
    if r["type"].as_str().is_some_and(|t| t != "unicast") {
        return Ok(None);
    }
    let via: IpAddr = match r["gateway"].as_str() {
        Some(g) => g.parse()?,
        None => addr,
    };
    let neigh = ip_json(&["neigh", "show", "to", &via.to_string(), "dev", &dev])?;
    let Some(n) = neigh.as_array().and_then(|a| a.first()) else {
        return Ok(None);
    };
    let usable = n["state"].as_array().is_some_and(|st| {
        st.iter().any(|s| {
            matches!(
                s.as_str(),
                Some("REACHABLE" | "STALE" | "DELAY" | "PROBE" | "PERMANENT" | "NOARP")
            )
        })
    });
    let Some(dmac) = n["lladdr"].as_str().and_then(mac) else {
        return Ok(None);
    };
    if !usable {
        return Ok(None);
    }
    let link = ip_json(&["link", "show", "dev", &dev])?;
    let l = &link[0];
    let ifindex = l["ifindex"].as_u64().context("link without ifindex")? as u32;
    let smac = l["address"]
        .as_str()
        .and_then(mac)
        .context("link without a MAC address")?;
    Ok(Some(Resolved {
        dev,
        ifindex,
        via,
        smac,
        dmac,
    }))
}

/// One backend's outcome of a refresh.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RefreshRow {
    pub vip: String,
    pub backend: String,
    pub dev: Option<String>,
    pub via: Option<String>,
    pub mac: Option<String>,
}

/// Resolves every backend of every VIP and writes the cache; unresolved backends are cleared
/// (route lookup per packet).
pub fn refresh(maps: &mut LbMaps) -> Result<Vec<RefreshRow>> {
    let mut rows = Vec::new();
    for (vip, _) in maps.vips()? {
        for b in maps.backends(&vip)? {
            let r = resolve(b.addr.ip())?;
            match &r {
                Some(r) => maps.set_nexthop(b.id, r.ifindex, r.smac, r.dmac)?,
                None => maps.clear_nexthop(b.id)?,
            }
            rows.push(RefreshRow {
                vip: vip.to_string(),
                backend: b.addr.to_string(),
                dev: r.as_ref().map(|r| r.dev.clone()),
                via: r.as_ref().map(|r| r.via.to_string()),
                mac: r.as_ref().map(|r| {
                    r.dmac
                        .iter()
                        .map(|x| format!("{x:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                }),
            });
        }
    }
    Ok(rows)
}

/// Clears the whole cache: route lookups for every packet again.
pub fn clear(maps: &mut LbMaps) -> Result<u32> {
    let mut n = 0;
    for (vip, _) in maps.vips()? {
        for b in maps.backends(&vip)? {
            maps.clear_nexthop(b.id)?;
            n += 1;
        }
    }
    Ok(n)
}
