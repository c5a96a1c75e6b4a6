//! The invariants of the pinned state (`lb check`), and the repair of what an interrupted
//! command can leave behind that the next `lb apply` would not otherwise touch.
//!
//! Every change is ordered so that an interruption at any point leaves a state that forwards
//! correctly (`state.rs`); what it can leave is extra: a port flag no VIP or backend needs any
//! more, a backend entry still marked valid that no VIP uses, a table half rewritten towards
//! weights that were about to change. `check` names each such thing; `repair` (run by every
//! apply) removes the extras, and the apply itself rewrites the tables.

use std::collections::{HashMap, HashSet};

use lb_common::{Backend, VipInfo, MAX_BACKENDS, MAX_VIPS, NO_BACKEND};

use super::{revnat_entries, table_content, BackendState, LbMaps, Result};
use crate::{
    error::MapContext,
    model::{socket_addr, Vip},
};

/// Port filter flags, for all 65536 ports.
const PORTS: u32 = 1 << 16;

/// What `repair` changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repair {
    /// Port filter entries set to what the VIPs and backends need.
    pub ports_fixed: u32,
    /// Backend entries marked valid that no VIP used, invalidated.
    pub orphans_removed: u32,
}

impl LbMaps {
    /// Every violated invariant, in words (empty: the state is consistent):
    /// - each VIP's table range lies in the slot array and overlaps no other's; ids unique;
    /// - each table slot is empty or names a backend of its VIP, and the table is exactly what
    ///   the VIP's backends, weights and health give (else a change was interrupted);
    /// - reverse-NAT entries match backends: each names a valid backend with that address and
    ///   port, of the VIP it names, with that VIP's id; no backend in two entries;
    /// - no backend entry is valid that no reverse-NAT entry names;
    /// - the port filter has exactly the VIPs' ports and the backends' ports;
    /// - the VIP mirror and address hints match the VIPs; backend generations are never 0.
    pub fn check(&self) -> Result<Vec<String>> {
        let mut bad = Vec::new();
        let vips = self.vips()?;
        let capacity = self.table.len();

        // ---- VIPs ----
        let mut ids = HashSet::new();
        for (vip, info) in &vips {
            if info.vip_id >= MAX_VIPS || !ids.insert(info.vip_id) {
                bad.push(format!(
                    "VIP {vip}: id {} is out of range or used twice",
                    info.vip_id
                ));
            }
            if info.table_off as u64 + info.table_size as u64 > capacity as u64 {
                bad.push(format!(
                    "VIP {vip}: its table (slots {}..{}) runs past the slot array ({capacity} slots)",
                    info.table_off,
                    info.table_off as u64 + info.table_size as u64
                ));
            }
        }
        let mut ranges: Vec<(u32, u32, &Vip)> = vips
            .iter()
            .map(|(v, i)| (i.table_off, i.table_off.saturating_add(i.table_size), v))
            .collect();
        ranges.sort();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                bad.push(format!(
                    "VIPs {} and {}: their tables overlap",
                    w[0].2, w[1].2
                ));
            }
        }
        if !self.mirror_matches()? {
            bad.push(
                "the VIP mirror (by id), the address hints or the VIP addresses differ from the VIP map"
                    .to_string(),
            );
        }

        // ---- backends, through the reverse-NAT map ----
        let by_endpoint: HashMap<_, _> = vips.iter().map(|(v, i)| (v.endpoint(), (v, i))).collect();
        let mut in_use: HashMap<u32, Backend> = HashMap::new();
        for kv in self.revnat.iter() {
            let (key, set) = kv.ctx(|| "reading the reverse-NAT map".into())?;
            let at = socket_addr(key.family, key.addr_be, key.port_be)
                .map_or_else(|| "(bad address)".to_string(), |a| a.to_string());
            for e in revnat_entries(&set) {
                let what = format!("reverse-NAT entry of {at} for backend id {}", e.backend_id);
                if e.backend_id >= MAX_BACKENDS {
                    bad.push(format!("{what}: the id is out of range"));
                    continue;
                }
                let b = self
                    .backends
                    .get(&e.backend_id, 0)
                    .ctx(|| format!("reading backend {}", e.backend_id))?;
                if !b.is_valid() {
                    bad.push(format!("{what}: that backend is not valid"));
                    continue;
                }
                if (b.addr_be, b.port_be, b.family) != (key.addr_be, key.port_be, key.family) {
                    bad.push(format!("{what}: that backend has another address"));
                }
                if b.vip_id != e.vip_id {
                    bad.push(format!(
                        "{what}: the entry says VIP id {}, the backend {}",
                        e.vip_id, b.vip_id
                    ));
                }
                match by_endpoint.get(&e.vip) {
                    None => bad.push(format!("{what}: its VIP does not exist")),
                    Some((v, i)) if i.vip_id != e.vip_id || v.proto.number() != key.proto => {
                        bad.push(format!("{what}: VIP {v} has id {}", i.vip_id))
                    }
                    Some(_) => {}
                }
                if b.generation == 0 {
                    bad.push(format!("{what}: generation 0 (ids are given out from 1)"));
                }
                if in_use.insert(e.backend_id, b).is_some() {
                    bad.push(format!(
                        "backend id {} is in two reverse-NAT entries",
                        e.backend_id
                    ));
                }
            }
        }
        for id in self.orphan_backends(&in_use)? {
            bad.push(format!(
                "backend id {id} is marked valid, but no VIP uses it (an interrupted removal)"
            ));
        }

        // ---- tables ----
        for (vip, info) in &vips {
            self.check_table(vip, info, &in_use, &mut bad)?;
        }

        // ---- port filter ----
        let (want_vip, want_backend) = wanted_ports(&vips, &in_use);
        let ports = self.ports_all()?;
        for port in 0..PORTS {
            let flags = ports.get(port as usize).copied().unwrap_or(0);
            for (flag, want, what) in [
                (lb_common::PORT_F_VIP, &want_vip, "a VIP"),
                (lb_common::PORT_F_BACKEND, &want_backend, "a backend"),
            ] {
                match (flags & flag != 0, want.contains(&(port as u16))) {
                    (false, true) => bad.push(format!(
                        "port {port}: {what} uses it, but the port filter does not say so (its packets skip lb)"
                    )),
                    (true, false) => bad.push(format!(
                        "port {port}: the port filter marks it for {what}, but none uses it"
                    )),
                    _ => {}
                }
            }
        }
        Ok(bad)
    }

    fn check_table(
        &self,
        vip: &Vip,
        info: &VipInfo,
        in_use: &HashMap<u32, Backend>,
        bad: &mut Vec<String>,
    ) -> Result<()> {
        let Ok(slots) = self.table.range(info.table_off, info.table_size) else {
            return Ok(()); // reported with the ranges
        };
        let foreign: Vec<(usize, u32)> = slots
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, id)| {
                *id != NO_BACKEND && in_use.get(id).is_none_or(|b| b.vip_id != info.vip_id)
            })
            .collect();
        if let Some((i, id)) = foreign.first() {
            bad.push(format!(
                "VIP {vip}: {} table slots name no backend of this VIP (slot {i}: id {id})",
                foreign.len()
            ));
        }
        let backends: Vec<BackendState> = self.backends(vip)?;
        let (want, seq_len) = table_content(vip, info, &backends);
        let differ = want.iter().zip(&slots).filter(|(a, b)| a != b).count();
        if differ > 0 {
            bad.push(format!(
                "VIP {vip}: {differ} table slots differ from what its backends, weights and health give (an interrupted change: `lb apply` rewrites them)"
            ));
        }
        if seq_len != info.seq_len {
            bad.push(format!(
                "VIP {vip}: round-robin sequence of {} slots, its backends give {seq_len}",
                info.seq_len
            ));
        }
        Ok(())
    }

    /// Ids of backend entries marked valid that no reverse-NAT entry names.
    fn orphan_backends(&self, in_use: &HashMap<u32, Backend>) -> Result<Vec<u32>> {
        Ok(self
            .backends_all()?
            .iter()
            .enumerate()
            .filter(|(id, b)| b.is_valid() && !in_use.contains_key(&(*id as u32)))
            .map(|(id, _)| id as u32)
            .collect())
    }

    /// Removes what an interrupted command can leave that no apply step touches: port filter
    /// flags no VIP or backend needs (and sets any that are missing), and backend entries
    /// still marked valid that no VIP uses (invalidated, keeping their generation). Also makes
    /// the VIP mirror exact. Run at the end of every apply.
    pub fn repair(&mut self) -> Result<Repair> {
        let mut r = Repair::default();
        self.mirror_vips()?;
        let vips = self.vips()?;
        let mut in_use = HashMap::new();
        for (id, b) in self.valid_backends()? {
            in_use.insert(id, b);
        }
        for id in self.orphan_backends(&in_use)? {
            let mut b = self
                .backends
                .get(&id, 0)
                .ctx(|| format!("reading backend {id}"))?;
            b.flags &= !lb_common::BACKEND_F_VALID;
            self.put_backend(id, b)
                .ctx(|| format!("invalidating backend {id}"))?;
            r.orphans_removed += 1;
        }
        let (want_vip, want_backend) = wanted_ports(&vips, &in_use);
        let ports = self.ports_all()?;
        for port in 0..PORTS {
            let flags = ports.get(port as usize).copied().unwrap_or(0);
            let mut want = flags & !(lb_common::PORT_F_VIP | lb_common::PORT_F_BACKEND);
            if want_vip.contains(&(port as u16)) {
                want |= lb_common::PORT_F_VIP;
            }
            if want_backend.contains(&(port as u16)) {
                want |= lb_common::PORT_F_BACKEND;
            }
            if want != flags {
                self.ports
                    .set(port, want, 0)
                    .ctx(|| format!("writing port {port}"))?;
                r.ports_fixed += 1;
            }
        }
        Ok(r)
    }
}

/// The ports the VIPs use and the ports the backends in use listen on.
fn wanted_ports(
    vips: &[(Vip, VipInfo)],
    in_use: &HashMap<u32, Backend>,
) -> (HashSet<u16>, HashSet<u16>) {
    (
        vips.iter().map(|(v, _)| v.addr.port()).collect(),
        in_use.values().map(|b| u16::from_be(b.port_be)).collect(),
    )
}
