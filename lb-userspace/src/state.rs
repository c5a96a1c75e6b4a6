//! The map layer: VIPs, backends and selection tables, kept in the data plane's BPF maps.
//!
//! The maps are the only state: nothing here caches across calls, so a second process that
//! opens the same (pinned) maps sees exactly what the first one wrote. Every free id, free table
//! range and backend list is derived from the maps on demand.
//!
//! Update order is chosen so that a packet never meets an invalid reference:
//! * a new backend's entry is written before any table slot points at it;
//! * a removed backend's slots are rewritten before its entry is invalidated;
//! * a new backend's entry is written before its reverse-NAT entry, and a removed backend
//!   leaves its reverse-NAT set before its entry is invalidated;
//! * a new VIP's table is filled before the VIP becomes visible, and a VIP is hidden before
//!   its backends go.

use std::net::SocketAddr;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::{
    names, Backend, CountEvents, CtEntry, Endpoint, FlowKey, GlobalConf, NextHop, RevNat,
    RevNatEntry, Timeouts, TrafficStats, VipById, VipInfo, BACKEND_F_DOWN, BACKEND_F_VALID,
    COUNTER_COUNT, MAX_BACKENDS, MAX_TABLE_SIZE, MAX_VIPS, MAX_VIPS_PER_BACKEND, NO_BACKEND,
};

use crate::{
    error::{LbError, MapContext, MAX_WEIGHT, MIN_SLOTS_PER_BACKEND, MIN_TABLE_SIZE},
    maglev::{self, TableEntry},
    model::{socket_addr, Proto, Vip},
};

type Result<T, E = LbError> = std::result::Result<T, E>;

mod check;
pub use check::Repair;

/// Typed handles on all of the data plane's maps.
pub struct LbMaps {
    vips: HashMap<MapData, Endpoint, VipInfo>,
    /// Each VIP again by id (written after and cleared before its `vips` entry).
    vip_by_id: Array<MapData, VipById>,
    /// Which low 16 bits of a destination some VIP's address has (a lookup-order hint).
    vip_addrs: Array<MapData, u8>,
    backends: Array<MapData, Backend>,
    table: crate::slots::SlotArray,
    /// The backends in use, by VIP id, while a many-step change runs (`with_backend_index`):
    /// every read of "the backends of a VIP" otherwise costs a pass over all of them.
    index: std::sync::Mutex<Option<BackendIndex>>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    /// Unconfirmed flows (a separate LRU, so a flood never evicts a confirmed flow).
    ct_new: HashMap<MapData, FlowKey, CtEntry>,
    /// Flow timeouts per VIP, by vip_id.
    timeouts: Array<MapData, Timeouts>,
    /// Deployment-wide settings (one entry): hash seed, flood threshold.
    conf: Array<MapData, GlobalConf>,
    revnat: HashMap<MapData, Endpoint, RevNat>,
    stats: PerCpuArray<MapData, u64>,
    vip_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
    /// Per CPU: each CPU's own cache.
    nexthop: PerCpuArray<MapData, NextHop>,
    active: Array<MapData, u64>,
    /// Per backend id and CPU, flows put on and taken off the active count (monotonic).
    ct_counts: PerCpuArray<MapData, CountEvents>,
    ports: Array<MapData, u8>,
}

/// A backend as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendState {
    /// Index in the backend array (and the per-backend counters).
    pub id: u32,
    pub addr: SocketAddr,
    pub weight: u32,
    /// False when health checks took it out of the table (`BACKEND_F_DOWN`).
    pub healthy: bool,
}

/// What a backend update did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: u32,
    pub removed: u32,
    pub reweighted: u32,
    /// Table slots rewritten (only the slots whose backend changed are written).
    pub slots_written: u32,
}

/// (used, capacity) of each map, for `lb status`.
#[derive(Clone, Copy, Debug)]
pub struct Fill {
    pub vips: (u64, u64),
    pub backends: (u64, u64),
    pub table_slots: (u64, u64),
    pub conntrack: (u64, u64),
    /// Unconfirmed flows.
    pub conntrack_new: (u64, u64),
    pub revnat: (u64, u64),
}

/// A conntrack entry.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub key: FlowKey,
    pub entry: CtEntry,
    /// Which table holds it.
    pub table: CtTable,
}

/// One of the two conntrack tables (same key and value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CtTable {
    /// `names::CONNTRACK`: confirmed flows.
    Confirmed = 0,
    /// `names::CT_NEW`: flows not yet confirmed.
    Unconfirmed = 1,
}

impl CtTable {
    pub const ALL: [CtTable; 2] = [CtTable::Confirmed, CtTable::Unconfirmed];

    /// "confirmed" or "unconfirmed" (metric labels).
    pub fn name(self) -> &'static str {
        match self {
            CtTable::Confirmed => "confirmed",
            CtTable::Unconfirmed => "unconfirmed",
        }
    }
}

impl LbMaps {
    /// Takes the maps out of a freshly loaded program.
    pub fn from_maps(mut take: impl FnMut(&str) -> Option<Map>) -> anyhow::Result<Self> {
        let mut get = |name: &str| take(name).ok_or_else(|| anyhow::anyhow!("map {name} missing"));
        Ok(LbMaps {
            vips: get(names::VIPS)?.try_into()?,
            backends: get(names::BACKENDS)?.try_into()?,
            table: crate::slots::SlotArray::new(get(names::TABLE)?)?,
            index: std::sync::Mutex::new(None),
            vip_by_id: get(names::VIP_BY_ID)?.try_into()?,
            vip_addrs: get(names::VIP_ADDRS)?.try_into()?,
            conntrack: get(names::CONNTRACK)?.try_into()?,
            ct_new: get(names::CT_NEW)?.try_into()?,
            timeouts: get(names::TIMEOUTS)?.try_into()?,
            conf: get(names::CONF)?.try_into()?,
            revnat: get(names::REVNAT)?.try_into()?,
            stats: get(names::STATS)?.try_into()?,
            vip_stats: get(names::VIP_STATS)?.try_into()?,
            backend_stats: get(names::BACKEND_STATS)?.try_into()?,
            nexthop: get(names::NEXTHOP)?.try_into()?,
            active: get(names::ACTIVE)?.try_into()?,
            ct_counts: get(names::CT_COUNTS)?.try_into()?,
            ports: get(names::PORTS)?.try_into()?,
        })
    }

    /// Capacity of the shared table array.
    pub fn table_capacity(&self) -> u32 {
        self.table.len()
    }

    // ---- VIPs ----

    /// All VIPs, sorted.
    pub fn vips(&self) -> Result<Vec<(Vip, VipInfo)>> {
        let mut out = Vec::new();
        for kv in self.vips.iter() {
            let (k, v) = kv.ctx(|| "reading the VIP map".into())?;
            if let Some(vip) = Vip::from_endpoint(&k) {
                out.push((vip, v));
            }
        }
        out.sort_by_key(|(vip, _)| *vip);
        Ok(out)
    }

    /// One VIP's entry.
    pub fn vip(&self, vip: &Vip) -> Result<VipInfo> {
        match self.vips.get(&vip.endpoint(), 0) {
            Ok(v) => Ok(v),
            Err(aya::maps::MapError::KeyNotFound) => Err(LbError::VipNotFound(*vip)),
            Err(e) => Err(e).ctx(|| format!("looking up VIP {vip}")),
        }
    }

    /// Writes a VIP's entry, then its mirror by id (a packet that reads the mirror before it
    /// changes gets the entry as it was a moment before, as through `vips`).
    fn put_vip(&mut self, vip: &Vip, info: VipInfo, what: impl Fn() -> String) -> Result<()> {
        let slot = vip_slot(vip);
        if self.vip_addrs.get(&slot, 0).ctx(&what)? == 0 {
            self.vip_addrs.set(slot, 1, 0).ctx(&what)?;
        }
        self.vips.insert(vip.endpoint(), info, 0).ctx(&what)?;
        self.vip_by_id
            .set(
                info.vip_id,
                VipById {
                    vip: vip.endpoint(),
                    info,
                },
                0,
            )
            .ctx(|| format!("{} (by id)", what()))
    }

    /// Makes the mirror by id and the address hints exactly what `vips` says: every VIP's
    /// slot written, every other slot emptied (`lb upgrade`: they may be new, or written by an
    /// older lb that did not know them). Returns how many VIPs.
    pub fn mirror_vips(&mut self) -> Result<usize> {
        let vips = self.vips()?;
        let (slots, hints) = self.mirror_differences(&vips)?;
        for (id, want) in slots {
            self.vip_by_id
                .set(id, want, 0)
                .ctx(|| format!("mirroring VIP {id}"))?;
        }
        for (slot, want) in hints {
            self.vip_addrs
                .set(slot, want, 0)
                .ctx(|| format!("writing hint {slot}"))?;
        }
        Ok(vips.len())
    }

    /// The mirror slots and address hints that differ from what `vips` says, with the value
    /// each should have.
    #[allow(clippy::type_complexity)]
    fn mirror_differences(
        &self,
        vips: &[(Vip, VipInfo)],
    ) -> Result<(Vec<(u32, VipById)>, Vec<(u32, u8)>)> {
        let mut slots = Vec::new();
        for id in 0..MAX_VIPS {
            let want = mirror_slot(vips, id);
            let have = self
                .vip_by_id
                .get(&id, 0)
                .ctx(|| format!("reading VIP {id} (by id)"))?;
            if have != want {
                slots.push((id, want));
            }
        }
        let hints = vip_hints(vips);
        let mut differ = Vec::new();
        for slot in 0..65_536u32 {
            let want = hints.contains(&slot) as u8;
            let have = self
                .vip_addrs
                .get(&slot, 0)
                .ctx(|| format!("reading hint {slot}"))?;
            if have != want {
                differ.push((slot, want));
            }
        }
        Ok((slots, differ))
    }

    /// Sets one address hint as given (tests: a hint that is wrong must cost a lookup, never a
    /// verdict; `mirror_vips` puts them right).
    pub fn set_address_hint(&mut self, slot: u32, on: bool) -> Result<()> {
        self.vip_addrs
            .set(slot, on as u8, 0)
            .ctx(|| format!("writing hint {slot}"))
    }

    /// Writes one slot of the mirror by id as given (tests: a stale mirror must send packets
    /// the `vips` way; `mirror_vips` puts it right).
    pub fn set_mirror_slot(&mut self, id: u32, slot: VipById) -> Result<()> {
        self.vip_by_id
            .set(id, slot, 0)
            .ctx(|| format!("writing VIP {id} (by id)"))
    }

    /// Whether the mirror by id and the address hints are exactly what `vips` says (tests).
    pub fn mirror_matches(&self) -> Result<bool> {
        let (slots, hints) = self.mirror_differences(&self.vips()?)?;
        Ok(slots.is_empty() && hints.is_empty())
    }

    /// A free run of `table_size` slots in the table array, beside the VIPs' `existing` tables.
    fn free_table_range(&self, existing: &[(Vip, VipInfo)], table_size: u32) -> Result<u32> {
        free_range(
            existing.iter().map(|(_, i)| (i.table_off, i.table_size)),
            table_size,
            self.table_capacity(),
        )
        .ok_or(LbError::TableCapacity {
            size: table_size,
            capacity: self.table_capacity(),
        })
    }

    /// Adds a VIP with an empty table of `table_size` slots (a prime) and the default flow
    /// timeouts.
    pub fn add_vip(&mut self, vip: &Vip, table_size: u32) -> Result<VipInfo> {
        self.add_vip_with(vip, table_size, &Timeouts::DEFAULT)
    }

    /// Adds a VIP with an empty table of `table_size` slots (a prime) and the given flow
    /// timeouts (written before the VIP becomes visible).
    pub fn add_vip_with(
        &mut self,
        vip: &Vip,
        table_size: u32,
        timeouts: &Timeouts,
    ) -> Result<VipInfo> {
        check_table_size(table_size)?;
        check_timeouts(timeouts)?;
        let existing = self.vips()?;
        if existing.iter().any(|(v, _)| v == vip) {
            return Err(LbError::VipExists(*vip));
        }
        let vip_id = (0..MAX_VIPS)
            .find(|id| !existing.iter().any(|(_, i)| i.vip_id == *id))
            .ok_or(LbError::TooManyVips(MAX_VIPS))?;
        let table_off = self.free_table_range(&existing, table_size)?;
        for slot in table_off..table_off + table_size {
            self.table
                .set(slot, NO_BACKEND)
                .ctx(|| format!("clearing table slot {slot}"))?;
        }
        self.reset_stats_vip(vip_id)?;
        self.timeouts
            .set(vip_id, *timeouts, 0)
            .ctx(|| format!("writing the flow timeouts of VIP {vip}"))?;
        let info = VipInfo {
            vip_id,
            table_off,
            table_size,
            seq_len: 0,
            algo: 0,
            src_prefix_len: 0,
            flags: 0,
            fwd: lb_common::FWD_NAT,
        };
        // The port filter must let the VIP's packets through before the VIP exists.
        self.claim_port(vip.addr.port(), lb_common::PORT_F_VIP)?;
        self.put_vip(vip, info, || format!("adding VIP {vip}"))?;
        Ok(info)
    }

    /// Removes a VIP and all its backends. Its conntrack entries age out of the LRU.
    pub fn del_vip(&mut self, vip: &Vip) -> Result<()> {
        let info = self.vip(vip)?;
        let backends = self.backends(vip)?;
        // Whether another VIP keeps the address hint: read before anything is written.
        let slot = vip_slot(vip);
        let hint_shared = self
            .vips()?
            .iter()
            .any(|(v, _)| v != vip && vip_slot(v) == slot);
        // The mirror first: from then on every packet of the VIP goes through `vips`.
        self.vip_by_id
            .set(info.vip_id, VipById::default(), 0)
            .ctx(|| format!("removing VIP {vip} (by id)"))?;
        self.vips
            .remove(&vip.endpoint())
            .ctx(|| format!("removing VIP {vip}"))?;
        if !hint_shared {
            self.vip_addrs
                .set(slot, 0, 0)
                .ctx(|| format!("removing VIP {vip} (address hint)"))?;
        }
        for b in &backends {
            self.retire_backend(vip, b)?;
        }
        self.release_port(vip.addr.port(), lb_common::PORT_F_VIP)?;
        for b in &backends {
            self.release_port(b.addr.port(), lb_common::PORT_F_BACKEND)?;
        }
        Ok(())
    }

    /// Gives a VIP a table of another size, keeping its backends (and so its conntrack
    /// entries): the new table is built in a free range, then the VIP entry is switched to it
    /// in one map update. Returns the number of slots written.
    pub fn resize_vip(&mut self, vip: &Vip, table_size: u32) -> Result<u32> {
        check_table_size(table_size)?;
        let info = self.vip(vip)?;
        let backends = self.backends(vip)?;
        let active = backends.iter().filter(|b| b.weight > 0).count() as u32;
        if active > 0 && table_size / MIN_SLOTS_PER_BACKEND < active {
            return Err(LbError::TableTooSmall {
                size: table_size,
                backends: active,
                need: active * MIN_SLOTS_PER_BACKEND,
            });
        }
        if info.algo == lb_common::ALGO_ROUND_ROBIN {
            let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
            check_rr_len(&weights, table_size)?;
        }
        self.write_table(vip, &info, &VipInfo { table_size, ..info }, &backends)
    }

    /// Writes the table for the VIP entry `want` (its algorithm) and `backends`, then the entry
    /// itself (with the round-robin sequence length) if it differs from `stored`, the one in
    /// the map now. No packet ever meets a slot without a backend that the table should have:
    /// - when the slots keep their meaning (same algorithm and size: a weight, backend or
    ///   health change, a round-robin sequence of another length), only the slots that differ
    ///   are written, in place: those naming a backend before the entry, those made empty
    ///   after it, so every slot a packet reads names a backend under either entry;
    /// - otherwise (another algorithm or source prefix, another size), the new table is
    ///   written to a free range and the entry switched to it in one update; the old range is
    ///   free from then on.
    ///
    /// Returns the slots written.
    fn write_table(
        &mut self,
        vip: &Vip,
        stored: &VipInfo,
        want: &VipInfo,
        backends: &[BackendState],
    ) -> Result<u32> {
        let (table, seq_len) = table_content(vip, want, backends);
        let mut new = VipInfo { seq_len, ..*want };
        let same_range = new.table_off == stored.table_off && new.table_size == stored.table_size;
        let same_meaning = new.algo == stored.algo && new.src_prefix_len == stored.src_prefix_len;
        let old = self
            .table
            .range(stored.table_off, stored.table_size)
            .ctx(|| format!("reading the table of VIP {vip}"))?;
        // (An empty table, e.g. a new VIP's, has no meaning to keep.)
        let empty = old.iter().all(|s| *s == NO_BACKEND);
        if same_range && (same_meaning || empty) {
            // Backends first, then the entry (a round-robin sequence's new length), then the
            // slots that become empty: under either entry every slot read names a backend
            // (a sequence that shrinks is cut only after the entry stops reading its tail).
            let changed: Vec<(u32, u32)> = table
                .iter()
                .zip(old)
                .enumerate()
                .filter(|(_, (value, old))| *value != old)
                .map(|(i, (value, _))| (new.table_off + i as u32, *value))
                .collect();
            for (index, value) in changed.iter().filter(|(_, v)| *v != NO_BACKEND) {
                self.table
                    .set(*index, *value)
                    .ctx(|| format!("writing table slot {index}"))?;
            }
            if new != *stored {
                self.put_vip(vip, new, || format!("updating VIP {vip}"))?;
            }
            for (index, value) in changed.iter().filter(|(_, v)| *v == NO_BACKEND) {
                self.table
                    .set(*index, *value)
                    .ctx(|| format!("writing table slot {index}"))?;
            }
            return Ok(changed.len() as u32);
        }
        let existing = self.vips()?;
        new.table_off = self.free_table_range(&existing, new.table_size)?;
        for (i, value) in table.iter().enumerate() {
            let index = new.table_off + i as u32;
            self.table
                .set(index, *value)
                .ctx(|| format!("writing table slot {index}"))?;
        }
        // Another range: the entry always changes.
        self.put_vip(vip, new, || format!("switching VIP {vip} to its new table"))?;
        Ok(new.table_size)
    }

    /// Changes how a VIP's new flows pick their backend. Established flows keep theirs
    /// (conntrack). Returns the table slots written.
    pub fn set_algorithm(&mut self, vip: &Vip, algo: crate::model::Algorithm) -> Result<u32> {
        let info = self.vip(vip)?;
        algo.check_for(vip)?;
        let (code, prefix) = algo.codes();
        if info.flags & lb_common::VIP_F_STATELESS_REVERSE != 0
            && code != lb_common::ALGO_MAGLEV
            && code != lb_common::ALGO_SOURCE_HASH
        {
            return Err(LbError::StatelessReverseNeedsHash(*vip));
        }
        let backends = self.backends(vip)?;
        if code == lb_common::ALGO_ROUND_ROBIN {
            let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
            check_rr_len(&weights, info.table_size)?;
        }
        let want = VipInfo {
            algo: code,
            src_prefix_len: prefix,
            ..info
        };
        self.write_table(vip, &info, &want, &backends)
    }

    /// Changes how packets reach a VIP's backends. Every current backend must suit the new
    /// mode. Flows already established under another mode break (the backends see different
    /// packets): change the mode of an idle VIP.
    pub fn set_forward(&mut self, vip: &Vip, fwd: crate::model::Forward) -> Result<bool> {
        let info = self.vip(vip)?;
        if info.fwd == fwd.code() {
            return Ok(false);
        }
        for b in self.backends(vip)? {
            fwd.check_backend(vip, b.addr)?;
        }
        let new = VipInfo {
            fwd: fwd.code(),
            ..info
        };
        self.put_vip(vip, new, || format!("updating VIP {vip}"))?;
        Ok(true)
    }

    /// Whether replies with no conntrack entry on this gateway are checked against the VIP's
    /// table (`VIP_F_STATELESS_REVERSE`, for several gateways behind ECMP). Needs an algorithm
    /// that is a function of the packet: maglev or source-hash. Returns whether it changed.
    pub fn set_stateless_reverse(&mut self, vip: &Vip, on: bool) -> Result<bool> {
        let info = self.vip(vip)?;
        if on && info.algo != lb_common::ALGO_MAGLEV && info.algo != lb_common::ALGO_SOURCE_HASH {
            return Err(LbError::StatelessReverseNeedsHash(*vip));
        }
        let flags = with_flag(info.flags, lb_common::VIP_F_STATELESS_REVERSE, on);
        if flags == info.flags {
            return Ok(false);
        }
        if on {
            self.check_backends_unshared(vip)?;
        }
        self.put_vip(vip, VipInfo { flags, ..info }, || {
            format!("updating VIP {vip}")
        })?;
        Ok(true)
    }

    /// Checks that no backend of `vip` serves another VIP, as stateless reverse NAT requires
    /// (it finds a reply's VIP from the backend alone).
    pub fn check_backends_unshared(&self, vip: &Vip) -> Result<()> {
        for b in self.backends(vip)? {
            let others: Vec<Vip> = self
                .other_vips_of(vip, b.addr)?
                .into_iter()
                .map(|(v, _)| v)
                .collect();
            if !others.is_empty() {
                return Err(LbError::StatelessBackendShared {
                    backend: b.addr,
                    stateless: vip.to_string(),
                    others: join_vips(&others),
                });
            }
        }
        Ok(())
    }

    /// What a VIP does when every backend with a weight is down: `drop` new flows (an empty
    /// table) or fail open (the default). Returns the table slots written.
    pub fn set_all_down_drop(&mut self, vip: &Vip, drop: bool) -> Result<u32> {
        let info = self.vip(vip)?;
        let flags = with_flag(info.flags, lb_common::VIP_F_DROP_WHEN_ALL_DOWN, drop);
        if flags == info.flags {
            return Ok(0);
        }
        let backends = self.backends(vip)?;
        self.write_table(vip, &info, &VipInfo { flags, ..info }, &backends)
    }

    /// The flow timeouts of VIP `vip_id`.
    pub fn timeouts(&self, vip_id: u32) -> Result<Timeouts> {
        self.timeouts
            .get(&vip_id, 0)
            .ctx(|| format!("reading the flow timeouts of VIP id {vip_id}"))
    }

    /// Sets a VIP's flow timeouts (they apply to its existing entries at once). Returns
    /// whether they changed.
    pub fn set_timeouts(&mut self, vip: &Vip, timeouts: Timeouts) -> Result<bool> {
        check_timeouts(&timeouts)?;
        let info = self.vip(vip)?;
        if self.timeouts(info.vip_id)? == timeouts {
            return Ok(false);
        }
        self.timeouts
            .set(info.vip_id, timeouts, 0)
            .ctx(|| format!("writing the flow timeouts of VIP {vip}"))?;
        Ok(true)
    }

    // ---- deployment-wide settings ----

    /// The deployment-wide settings: hash seed and flood threshold.
    pub fn conf(&self) -> Result<GlobalConf> {
        self.conf
            .get(&0, 0)
            .ctx(|| "reading the global settings".into())
    }

    /// Writes the deployment-wide settings. A new hash seed re-hashes every flow without a
    /// conntrack entry (and moves every table-selected flow of maglev and source-hash VIPs).
    /// Returns whether they changed.
    pub fn set_conf(&mut self, conf: GlobalConf) -> Result<bool> {
        if self.conf()? == conf {
            return Ok(false);
        }
        self.conf
            .set(0, conf, 0)
            .ctx(|| "writing the global settings".into())?;
        Ok(true)
    }

    /// Marks a backend up or down (health checks). A backend that is down keeps its entry,
    /// weight and established flows but gets no table slots. Returns the slots written.
    pub fn set_health(&mut self, vip: &Vip, addr: SocketAddr, healthy: bool) -> Result<u32> {
        let info = self.vip(vip)?;
        let mut backends = self.backends(vip)?;
        let Some(b) = backends.iter_mut().find(|b| b.addr == addr) else {
            return Err(LbError::BackendNotFound {
                vip: *vip,
                backend: addr,
            });
        };
        if b.healthy == healthy {
            return Ok(0);
        }
        b.healthy = healthy;
        let id = b.id;
        let mut entry = self
            .backends
            .get(&id, 0)
            .ctx(|| format!("reading backend {addr}"))?;
        entry.flags = with_flag(entry.flags, BACKEND_F_DOWN, !healthy);
        self.put_backend(id, entry)
            .ctx(|| format!("updating backend {addr}"))?;
        self.write_table(vip, &info, &info, &backends)
    }

    // ---- backends ----

    /// The backends of a VIP, sorted by address.
    pub fn backends(&self, vip: &Vip) -> Result<Vec<BackendState>> {
        let info = self.vip(vip)?;
        // (The guard is dropped before `valid_backends`, which takes the lock too.)
        let indexed = self
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|ix| ix.of_vip(info.vip_id));
        let of_vip = match indexed {
            Some(v) => v,
            None => self.valid_backends()?,
        };
        let mut out: Vec<BackendState> = of_vip
            .iter()
            .filter(|(_, b)| b.vip_id == info.vip_id)
            .filter_map(|(id, b)| {
                Some(BackendState {
                    id: *id,
                    addr: socket_addr(b.family, b.addr_be, b.port_be)?,
                    weight: b.weight,
                    healthy: b.flags & BACKEND_F_DOWN == 0,
                })
            })
            .collect();
        out.sort_by_key(|b| b.addr);
        Ok(out)
    }

    /// Adds one backend.
    pub fn add_backend(&mut self, vip: &Vip, addr: SocketAddr, weight: u32) -> Result<Change> {
        let mut want = self.wanted(vip)?;
        if want.iter().any(|(a, _)| *a == addr) {
            return Err(LbError::BackendExists {
                vip: *vip,
                backend: addr,
            });
        }
        want.push((addr, weight));
        self.set_backends(vip, &want)
    }

    /// Removes one backend. Its flows are selected afresh on their next packet.
    pub fn del_backend(&mut self, vip: &Vip, addr: SocketAddr) -> Result<Change> {
        let mut want = self.wanted(vip)?;
        let before = want.len();
        want.retain(|(a, _)| *a != addr);
        if want.len() == before {
            return Err(LbError::BackendNotFound {
                vip: *vip,
                backend: addr,
            });
        }
        self.set_backends(vip, &want)
    }

    /// Changes one backend's weight; 0 drains it (no new flows, established flows continue).
    pub fn set_weight(&mut self, vip: &Vip, addr: SocketAddr, weight: u32) -> Result<Change> {
        let mut want = self.wanted(vip)?;
        let Some(entry) = want.iter_mut().find(|(a, _)| *a == addr) else {
            return Err(LbError::BackendNotFound {
                vip: *vip,
                backend: addr,
            });
        };
        entry.1 = weight;
        self.set_backends(vip, &want)
    }

    fn wanted(&self, vip: &Vip) -> Result<Vec<(SocketAddr, u32)>> {
        Ok(self
            .backends(vip)?
            .iter()
            .map(|b| (b.addr, b.weight))
            .collect())
    }

    /// Makes the VIP's backends exactly `want` (address, weight), rewriting only the table
    /// slots that change. Everything is validated before anything is written.
    pub fn set_backends(&mut self, vip: &Vip, want: &[(SocketAddr, u32)]) -> Result<Change> {
        let info = self.vip(vip)?;
        // ---- validate ----
        for (i, (addr, weight)) in want.iter().enumerate() {
            if want[..i].iter().any(|(a, _)| a == addr) {
                return Err(LbError::DuplicateBackend(*addr));
            }
            crate::model::Forward::from_code(info.fwd).check_backend(vip, *addr)?;
            if *weight > MAX_WEIGHT {
                return Err(LbError::WeightOutOfRange(*weight));
            }
            self.check_sharing(vip, &info, *addr)?;
        }
        if info.algo == lb_common::ALGO_ROUND_ROBIN {
            let weights: Vec<u32> = want.iter().map(|(_, w)| *w).collect();
            check_rr_len(&weights, info.table_size)?;
        }
        let active = want.iter().filter(|(_, w)| *w > 0).count() as u32;
        if active > 0 && (info.table_size / MIN_SLOTS_PER_BACKEND) < active {
            return Err(LbError::TableTooSmall {
                size: info.table_size,
                backends: active,
                need: active * MIN_SLOTS_PER_BACKEND,
            });
        }
        let current = self.raw_backends_of(info.vip_id)?;
        let find_current = |addr: &SocketAddr| {
            current
                .iter()
                .find(|(_, b)| socket_addr(b.family, b.addr_be, b.port_be).as_ref() == Some(addr))
                .copied()
        };
        let new: Vec<&(SocketAddr, u32)> = want
            .iter()
            .filter(|(a, _)| find_current(a).is_none())
            .collect();
        let used: std::collections::HashSet<u32> = if new.is_empty() {
            Default::default()
        } else {
            self.valid_backends()?.iter().map(|(id, _)| *id).collect()
        };
        let free: Vec<u32> = (0..MAX_BACKENDS)
            .filter(|id| !used.contains(id))
            .take(new.len())
            .collect();
        if free.len() < new.len() {
            let total_free = MAX_BACKENDS - used.len() as u32;
            return Err(LbError::TooManyBackends {
                need: new.len() as u32,
                free: total_free,
                capacity: MAX_BACKENDS,
            });
        }

        // ---- 1. new backends and weight changes, before any slot points at them ----
        let mut change = Change::default();
        let mut states: Vec<BackendState> = Vec::new();
        for (addr, weight) in want {
            if let Some((id, mut b)) = find_current(addr) {
                if b.weight != *weight {
                    b.weight = *weight;
                    self.put_backend(id, b)
                        .ctx(|| format!("updating backend {addr}"))?;
                    change.reweighted += 1;
                }
                states.push(BackendState {
                    id,
                    addr: *addr,
                    weight: *weight,
                    healthy: b.flags & BACKEND_F_DOWN == 0,
                });
            }
        }
        for ((addr, weight), id) in new.iter().zip(&free) {
            let (addr_be, family) = crate::model::addr_words(addr.ip());
            let backend = Backend {
                addr_be,
                port_be: addr.port().to_be(),
                family,
                flags: BACKEND_F_VALID,
                vip_id: info.vip_id,
                weight: *weight,
                generation: self
                    .backends
                    .get(id, 0)
                    .ctx(|| format!("reading backend slot {id}"))?
                    .generation
                    .wrapping_add(1),
            };
            self.reset_stats_backend(*id)?;
            self.active
                .set(*id, 0, 0)
                .ctx(|| format!("resetting the active flows of backend {id}"))?;
            self.put_backend(*id, backend)
                .ctx(|| format!("adding backend {addr}"))?;
            self.claim_port(addr.port(), lb_common::PORT_F_BACKEND)?;
            // The endpoint's reverse-NAT set gains this VIP, in one map update.
            let key = crate::model::endpoint(*addr, vip.proto);
            let mut set = self.revnat_set(&key)?;
            let vip_key = vip.endpoint();
            revnat_retain(&mut set, |e| e.vip != vip_key);
            revnat_push(
                &mut set,
                RevNatEntry {
                    vip: vip_key,
                    vip_id: info.vip_id,
                    backend_id: *id,
                },
            );
            self.revnat
                .insert(key, set, 0)
                .ctx(|| format!("adding reverse NAT for backend {addr}"))?;
            states.push(BackendState {
                id: *id,
                addr: *addr,
                weight: *weight,
                healthy: true,
            });
            change.added += 1;
        }

        // ---- 2. the table: write only the slots that change ----
        change.slots_written += self.write_table(vip, &info, &info, &states)?;

        // ---- 3. removed backends, now that no slot points at them ----
        for (id, b) in &current {
            let Some(addr) = socket_addr(b.family, b.addr_be, b.port_be) else {
                continue;
            };
            if !want.iter().any(|(a, _)| *a == addr) {
                self.retire_backend(
                    vip,
                    &BackendState {
                        id: *id,
                        addr,
                        weight: b.weight,
                        healthy: true,
                    },
                )?;
                self.release_port(addr.port(), lb_common::PORT_F_BACKEND)?;
                change.removed += 1;
            }
        }
        Ok(change)
    }

    // ---- port filter ----

    /// The port filter's flags for `port` (`PORT_F_*`).
    pub fn port_flags(&self, port: u16) -> Result<u8> {
        self.ports
            .get(&(port as u32), 0)
            .ctx(|| format!("reading port {port}"))
    }

    /// Sets `flag` on `port` (before a VIP or backend using it is written).
    fn claim_port(&mut self, port: u16, flag: u8) -> Result<()> {
        let p = port as u32;
        let cur = self
            .ports
            .get(&p, 0)
            .ctx(|| format!("reading port {port}"))?;
        if cur & flag == 0 {
            self.ports
                .set(p, cur | flag, 0)
                .ctx(|| format!("writing port {port}"))?;
        }
        Ok(())
    }

    /// Clears `flag` on `port` if no VIP (`PORT_F_VIP`) or backend (`PORT_F_BACKEND`) uses
    /// it any more (after the last one was removed).
    fn release_port(&mut self, port: u16, flag: u8) -> Result<()> {
        let used = if flag == lb_common::PORT_F_VIP {
            self.vips()?.iter().any(|(v, _)| v.addr.port() == port)
        } else {
            self.valid_backends()?
                .iter()
                .any(|(_, b)| u16::from_be(b.port_be) == port)
        };
        if !used {
            let p = port as u32;
            let cur = self
                .ports
                .get(&p, 0)
                .ctx(|| format!("reading port {port}"))?;
            if cur & flag != 0 {
                self.ports
                    .set(p, cur & !flag, 0)
                    .ctx(|| format!("writing port {port}"))?;
            }
        }
        Ok(())
    }

    // ---- next-hop cache ----

    /// Writes `nh` as every CPU's cached next hop of backend `id` (what the data plane
    /// writes after a route lookup; for tests and benchmarks that need a given entry).
    pub fn set_nexthop(&mut self, id: u32, nh: NextHop) -> Result<()> {
        let cpus = aya::util::nr_cpus().expect("reading the number of possible CPUs");
        let v = PerCpuValues::try_from(vec![nh; cpus]).expect("one value per CPU");
        self.nexthop
            .set(id, v, 0)
            .ctx(|| format!("writing the next hop of backend {id}"))
    }

    /// Removes backend `id`'s cached next hop on every CPU: its next packet is routed by a
    /// lookup, which caches the answer again.
    pub fn clear_nexthop(&mut self, id: u32) -> Result<()> {
        self.set_nexthop(id, NextHop::default())
    }

    /// Every CPU's cached next hop of backend `id` that was made for its current holder
    /// (valid, same generation); not checked for age.
    pub fn nexthops(&self, id: u32) -> Result<Vec<NextHop>> {
        let per_cpu = self
            .nexthop
            .get(&id, 0)
            .ctx(|| format!("reading the next hop of backend {id}"))?;
        let b = self
            .backends
            .get(&id, 0)
            .ctx(|| format!("reading backend {id}"))?;
        Ok(per_cpu
            .iter()
            .filter(|nh| {
                nh.flags & lb_common::NEXTHOP_F_VALID != 0
                    && nh.generation == b.generation
                    && b.is_valid()
            })
            .copied()
            .collect())
    }

    /// Removes a backend's reverse-NAT entry and cached next hop, then invalidates its entry
    /// (keeping its generation, so the next holder of the id gets a new one).
    ///
    /// The reverse-NAT entry goes first, so no packet finds a set entry pointing at an
    /// invalid backend (the mirror of adding one, whose backend entry is written before its
    /// reverse-NAT entry). If invalidating then fails, the id is no longer in use (ids in use
    /// are found through the reverse-NAT map) and its next holder gets a new generation.
    fn retire_backend(&mut self, vip: &Vip, b: &BackendState) -> Result<()> {
        self.clear_nexthop(b.id)?;
        // The endpoint's reverse-NAT set loses this backend's entry (the key goes with the last).
        let key = crate::model::endpoint(b.addr, vip.proto);
        let mut set = self.revnat_set(&key)?;
        revnat_retain(&mut set, |e| e.backend_id != b.id);
        let r = if set.count == 0 {
            match self.revnat.remove(&key) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            }
        } else {
            self.revnat.insert(key, set, 0)
        };
        r.ctx(|| format!("removing reverse NAT of {}", b.addr))?;
        let mut entry = self
            .backends
            .get(&b.id, 0)
            .ctx(|| format!("reading backend {}", b.addr))?;
        entry.flags &= !BACKEND_F_VALID;
        self.put_backend(b.id, entry)
            .ctx(|| format!("removing backend {}", b.addr))
    }

    /// Writes backend entry `id`, keeping the index (if any) exact.
    pub(crate) fn put_backend(
        &mut self,
        id: u32,
        b: Backend,
    ) -> std::result::Result<(), aya::maps::MapError> {
        self.backends.set(id, b, 0)?;
        if let Some(ix) = self.index.get_mut().unwrap_or_else(|p| p.into_inner()) {
            ix.remove(id);
            if b.is_valid() {
                ix.insert(id, b);
            }
        }
        Ok(())
    }

    /// Indexes the backends in use by VIP for the rest of this handle's life, for a command
    /// that reads every VIP's backends while it holds the pin-directory lock (shared or
    /// exclusive): no other process writes meanwhile, and this handle's writes keep it exact.
    pub fn index_backends(&self) -> Result<()> {
        let ix = BackendIndex::from(self.valid_backends()?);
        *self.index.lock().unwrap_or_else(|p| p.into_inner()) = Some(ix);
        Ok(())
    }

    /// Forgets the index `index_backends` made.
    pub fn drop_backend_index(&self) {
        *self.index.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Runs `f` with the backends in use indexed by VIP (read once, kept exact by every
    /// write through this handle): for many-step changes under the pin-directory lock
    /// (`config::apply`), whose reads would otherwise each pass over every backend.
    pub fn with_backend_index<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Result<T> {
        if self
            .index
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Ok(f(self)); // indexed already (by a caller): it keeps it
        }
        let ix = BackendIndex::from(self.valid_backends()?);
        *self.index.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(ix);
        let r = f(self);
        *self.index.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(r)
    }

    /// The reverse-NAT set of a backend endpoint (empty if it has none).
    fn revnat_set(&self, key: &Endpoint) -> Result<RevNat> {
        match self.revnat.get(key, 0) {
            Ok(r) => Ok(r),
            Err(aya::maps::MapError::KeyNotFound) => Ok(RevNat::default()),
            Err(e) => Err(e).ctx(|| "reading the reverse-NAT map".into()),
        }
    }

    /// The VIPs other than `vip` that the backend endpoint `addr` (with `vip`'s protocol)
    /// serves, with their flags (0 for a VIP no longer in the VIP map).
    fn other_vips_of(&self, vip: &Vip, addr: SocketAddr) -> Result<Vec<(Vip, u8)>> {
        let set = self.revnat_set(&crate::model::endpoint(addr, vip.proto))?;
        let me = vip.endpoint();
        let mut out = Vec::new();
        for e in revnat_entries(&set).iter().filter(|e| e.vip != me) {
            let Some(other) = Vip::from_endpoint(&e.vip) else {
                continue;
            };
            let flags = self.vips.get(&e.vip, 0).map_or(0, |i| i.flags);
            out.push((other, flags));
        }
        Ok(out)
    }

    /// Whether backend `addr` may serve `vip` (entry `info`) besides the VIPs it serves now:
    /// at most `MAX_VIPS_PER_BACKEND` VIPs, and none besides a VIP with stateless reverse NAT
    /// (which finds the VIP of a reply from the backend alone).
    fn check_sharing(&self, vip: &Vip, info: &VipInfo, addr: SocketAddr) -> Result<()> {
        let stateless = |flags: u8| flags & lb_common::VIP_F_STATELESS_REVERSE != 0;
        let others: Vec<(Vip, bool)> = self
            .other_vips_of(vip, addr)?
            .into_iter()
            .map(|(v, f)| (v, stateless(f)))
            .collect();
        match sharing_error(vip, stateless(info.flags), addr, &others) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The backends of every VIP, by VIP id, each list sorted by address: one pass over the
    /// backends in use (`backends` for each VIP would make one pass per VIP).
    pub fn backends_by_vip(&self) -> Result<std::collections::HashMap<u32, Vec<BackendState>>> {
        let mut out: std::collections::HashMap<u32, Vec<BackendState>> = Default::default();
        for (id, b) in self.valid_backends()? {
            let Some(addr) = socket_addr(b.family, b.addr_be, b.port_be) else {
                continue;
            };
            out.entry(b.vip_id).or_default().push(BackendState {
                id,
                addr,
                weight: b.weight,
                healthy: b.flags & BACKEND_F_DOWN == 0,
            });
        }
        for list in out.values_mut() {
            list.sort_by_key(|b| b.addr);
        }
        Ok(out)
    }

    /// Every backend in use, with its id. Found through the reverse-NAT map, whose sets hold
    /// exactly one entry per backend in use (written and removed together with the backend
    /// entry), so this costs one lookup per backend rather than a scan of the whole array.
    fn valid_backends(&self) -> Result<Vec<(u32, Backend)>> {
        let indexed = self
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(BackendIndex::all);
        if let Some(all) = indexed {
            return Ok(all);
        }
        let mut ids: Vec<u32> = self
            .revnat_all()?
            .iter()
            .flat_map(|(_, rev)| revnat_entries(rev).iter().map(|e| e.backend_id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        // Many backends: the whole array in a few batched reads; few: one read each.
        let all = if ids.len() > 2048 {
            Some(self.backends_all()?)
        } else {
            None
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let b = match &all {
                Some(all) => all.get(id as usize).copied().unwrap_or_default(),
                None => self
                    .backends
                    .get(&id, 0)
                    .ctx(|| format!("reading backend {id}"))?,
            };
            if b.is_valid() {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    /// The entries of VIP `vip_id`'s backends in use, by id (from the index if there is one).
    fn raw_backends_of(&self, vip_id: u32) -> Result<Vec<(u32, Backend)>> {
        let indexed = self
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|ix| ix.of_vip(vip_id));
        match indexed {
            Some(v) => Ok(v),
            None => Ok(self
                .valid_backends()?
                .into_iter()
                .filter(|(_, b)| b.vip_id == vip_id)
                .collect()),
        }
    }

    /// Every entry of the reverse-NAT map, in batched reads (`BPF_MAP_LOOKUP_BATCH`).
    fn revnat_all(&self) -> Result<Vec<(Endpoint, RevNat)>> {
        use aya::maps::IterableMap;
        read_all(self.revnat.map(), 4096, "the reverse-NAT map")
    }

    /// The whole port filter (flags by port), in batched reads.
    fn ports_all(&self) -> Result<Vec<u8>> {
        use aya::maps::IterableMap;
        let all: Vec<(u32, u8)> = read_all(self.ports.map(), 65_536, "the port filter")?;
        Ok(all.into_iter().map(|(_, v)| v).collect())
    }

    /// The whole backend array, in batched reads.
    fn backends_all(&self) -> Result<Vec<Backend>> {
        use aya::maps::IterableMap;
        let all: Vec<(u32, Backend)> = read_all(self.backends.map(), 8192, "the backend array")?;
        Ok(all.into_iter().map(|(_, v)| v).collect())
    }

    /// Copies every VIP's table from `old`, the slot array of an older layout (same indices),
    /// into the slot array (`lb upgrade`). Returns the slots copied.
    pub fn copy_tables_from(&mut self, old: &Array<MapData, u32>) -> Result<u64> {
        let mut copied = 0;
        for (_, info) in self.vips()? {
            for i in info.table_off..info.table_off + info.table_size {
                let v = old
                    .get(&i, 0)
                    .ctx(|| format!("reading slot {i} of the old slot array"))?;
                self.table
                    .set(i, v)
                    .ctx(|| format!("writing table slot {i}"))?;
                copied += 1;
            }
        }
        Ok(copied)
    }

    /// Slots `off .. off + len` of the slot array, whichever VIP they belong to (tests, `lb
    /// check`).
    pub fn slot_range(&self, off: u32, len: u32) -> Result<Vec<u32>> {
        self.table
            .range(off, len)
            .ctx(|| format!("reading slots {off}..{}", off as u64 + len as u64))
    }

    /// A VIP's table: backend id per slot (`NO_BACKEND` for none).
    pub fn table(&self, vip: &Vip) -> Result<Vec<u32>> {
        let info = self.vip(vip)?;
        self.slot_range(info.table_off, info.table_size)
    }

    /// SHA-256 of a VIP's selection as every gateway must have it: the hash seed, the VIP, its
    /// algorithm, and for each slot the backend's endpoint (not its id, which is local to this
    /// gateway) or nothing. Gateways with the same configuration print the same digest (`lb table
    /// --digest`), which is how to check several gateways behind ECMP agree.
    pub fn table_digest(&self, vip: &Vip) -> Result<String> {
        use sha2::{Digest, Sha256};
        let info = self.vip(vip)?;
        let backends = self.backends(vip)?;
        let seed = self.conf()?.hash_seed;
        let mut h = Sha256::new();
        // The seed decides which slot a flow hashes to: gateways that must agree need the same.
        h.update(seed.to_le_bytes());
        h.update(bytemuck::bytes_of(&vip.endpoint()));
        h.update([info.algo, info.src_prefix_len, info.fwd]);
        h.update(info.table_size.to_le_bytes());
        h.update(info.seq_len.to_le_bytes());
        for id in self.table(vip)? {
            match backends.iter().find(|b| b.id == id) {
                Some(b) => {
                    h.update([1u8]);
                    h.update(bytemuck::bytes_of(&crate::model::endpoint(
                        b.addr, vip.proto,
                    )));
                }
                None => h.update([0u8]),
            }
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The backend a flow gets from its hash alone (the data plane's `hashed_index`), or None
    /// if the slot is empty: for maglev and source-hash what every new flow gets; for the other
    /// algorithms what a flow gets without an entry (above the flood threshold, or a TCP
    /// segment that is not a SYN) — round robin hashes into its sequence.
    pub fn table_backend(&self, vip: &Vip, key: &FlowKey) -> Result<Option<BackendState>> {
        let info = self.vip(vip)?;
        let seed = self.conf()?.hash_seed;
        let index = match info.algo {
            lb_common::ALGO_SOURCE_HASH => {
                lb_common::hash::source_hash(&key.src_be, key.family, info.src_prefix_len, seed)
                    % info.table_size
            }
            lb_common::ALGO_ROUND_ROBIN => {
                if info.seq_len == 0 || info.seq_len > info.table_size {
                    return Ok(None);
                }
                lb_common::hash::flow_hash(key, seed) % info.seq_len
            }
            _ => lb_common::hash::flow_hash(key, seed) % info.table_size,
        };
        let slot = info.table_off + index;
        let id = self
            .table
            .get(slot)
            .ctx(|| format!("reading table slot {slot}"))?;
        if id == NO_BACKEND {
            return Ok(None);
        }
        let b = self
            .backends
            .get(&id, 0)
            .ctx(|| format!("reading backend {id}"))?;
        if !b.is_valid() || b.vip_id != info.vip_id {
            return Ok(None);
        }
        Ok(
            socket_addr(b.family, b.addr_be, b.port_be).map(|addr| BackendState {
                id,
                addr,
                weight: b.weight,
                healthy: b.flags & BACKEND_F_DOWN == 0,
            }),
        )
    }

    /// How full the maps are: (used, capacity) for each.
    pub fn fill(&self) -> anyhow::Result<Fill> {
        use aya::maps::IterableMap;
        let cap = |m: &MapData| -> anyhow::Result<u64> { Ok(m.info()?.max_entries() as u64) };
        let vips = self.vips()?;
        let backends = self.valid_backends()?.len() as u64;
        Ok(Fill {
            vips: (vips.len() as u64, cap(self.vips.map())?),
            backends: (backends, MAX_BACKENDS as u64),
            table_slots: (
                vips.iter().map(|(_, i)| i.table_size as u64).sum(),
                self.table_capacity() as u64,
            ),
            conntrack: (
                self.conntrack.keys().count() as u64,
                cap(self.conntrack.map())?,
            ),
            conntrack_new: (self.ct_new.keys().count() as u64, cap(self.ct_new.map())?),
            revnat: (self.revnat.keys().count() as u64, cap(self.revnat.map())?),
        })
    }

    // ---- counters ----

    /// Global counters summed over CPUs, indexed by `lb_common::Counter`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..COUNTER_COUNT)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .ctx(|| format!("reading counter {i}"))
            })
            .collect()
    }

    /// A VIP's traffic counters summed over CPUs.
    pub fn vip_stats(&self, vip_id: u32) -> Result<TrafficStats> {
        sum_stats(&self.vip_stats, vip_id)
    }

    /// A backend's traffic counters summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<TrafficStats> {
        sum_stats(&self.backend_stats, id)
    }

    fn reset_stats_vip(&mut self, id: u32) -> Result<()> {
        self.vip_stats
            .set(id, zero_per_cpu(), 0)
            .ctx(|| format!("resetting counters of VIP id {id}"))
    }

    fn reset_stats_backend(&mut self, id: u32) -> Result<()> {
        self.backend_stats
            .set(id, zero_per_cpu(), 0)
            .ctx(|| format!("resetting counters of backend id {id}"))
    }

    // ---- conntrack ----

    fn ct_map(&self, table: CtTable) -> &HashMap<MapData, FlowKey, CtEntry> {
        match table {
            CtTable::Confirmed => &self.conntrack,
            CtTable::Unconfirmed => &self.ct_new,
        }
    }

    fn ct_map_mut(&mut self, table: CtTable) -> &mut HashMap<MapData, FlowKey, CtEntry> {
        match table {
            CtTable::Confirmed => &mut self.conntrack,
            CtTable::Unconfirmed => &mut self.ct_new,
        }
    }

    /// All entries of both conntrack tables (confirmed first). Read with batched lookups:
    /// an entry deleted meanwhile does not restart the walk.
    pub fn flows(&self) -> Result<Vec<Flow>> {
        let mut out = self.flows_in(CtTable::Confirmed)?;
        out.extend(self.flows_in(CtTable::Unconfirmed)?);
        Ok(out)
    }

    /// All entries of one conntrack table, read as `flows` reads them.
    fn flows_in(&self, table: CtTable) -> Result<Vec<Flow>> {
        let mut out = Vec::new();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut cursor = None;
        loop {
            let (n, next) = self.ct_batch(table, cursor, 4096, &mut keys, &mut values)?;
            out.extend((0..n).map(|i| Flow {
                key: keys[i],
                entry: values[i],
                table,
            }));
            match next {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// Up to `max` entries of `table` from batch cursor `cursor` (None: the start) into
    /// `keys`/`values`: how many, and the cursor to go on from (None: the end was reached).
    pub(crate) fn ct_batch(
        &self,
        table: CtTable,
        cursor: Option<u32>,
        max: usize,
        keys: &mut Vec<FlowKey>,
        values: &mut Vec<CtEntry>,
    ) -> Result<(usize, Option<u32>)> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        let fd = self.ct_map(table).map().fd().as_fd();
        crate::sweep::lookup_batch(fd, cursor, max, keys, values)
            .map_err(|io_error| {
                aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error,
                })
            })
            .ctx(|| format!("reading the {} conntrack table", table.name()))
    }

    /// One entry of `table`.
    pub(crate) fn ct_get(&self, table: CtTable, key: &FlowKey) -> Result<Option<CtEntry>> {
        match self.ct_map(table).get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).ctx(|| format!("reading the {} conntrack table", table.name())),
        }
    }

    /// Deletes an entry of `table`; false if it was not there.
    pub(crate) fn ct_remove(&mut self, table: CtTable, key: &FlowKey) -> Result<bool> {
        match self.ct_map_mut(table).remove(key) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).ctx(|| format!("deleting from the {} conntrack table", table.name())),
        }
    }

    /// Inserts an entry in either table (tests).
    #[cfg(test)]
    pub(crate) fn ct_insert(
        &mut self,
        table: CtTable,
        key: &FlowKey,
        entry: &CtEntry,
    ) -> Result<()> {
        self.ct_map_mut(table)
            .insert(key, entry, 0)
            .ctx(|| "inserting a conntrack entry".into())
    }

    /// Capacity of a conntrack table.
    pub fn ct_capacity(&self, table: CtTable) -> anyhow::Result<u64> {
        use aya::maps::IterableMap;
        Ok(self.ct_map(table).map().info()?.max_entries() as u64)
    }

    /// The backend array's entry `id` as stored (None if `id` is out of range).
    pub fn backend_entry(&self, id: u32) -> Result<Option<Backend>> {
        if id >= MAX_BACKENDS {
            return Ok(None);
        }
        self.backends
            .get(&id, 0)
            .map(Some)
            .ctx(|| format!("reading backend {id}"))
    }

    /// (id, generation) of every backend in use.
    pub(crate) fn backend_generations(&self) -> Result<Vec<(u32, u32)>> {
        Ok(self
            .valid_backends()?
            .iter()
            .map(|(id, b)| (*id, b.generation))
            .collect())
    }

    /// Overwrites backend `id`'s active-flow count (the sweep's settlement).
    pub(crate) fn set_active_flows(&mut self, id: u32, n: u64) -> Result<()> {
        self.active
            .set(id, n, 0)
            .ctx(|| format!("writing the active flows of backend {id}"))
    }

    /// Backend `id`'s count events summed over CPUs: how many flows the data plane ever put
    /// on its active count and took off it (monotonic, wrapping; never reset, also not when
    /// the id is reused: only differences over a time the id kept its generation mean
    /// anything).
    pub(crate) fn count_events(&self, id: u32) -> Result<CountEvents> {
        let v = self
            .ct_counts
            .get(&id, 0)
            .ctx(|| format!("reading the count events of backend {id}"))?;
        Ok(v.iter().fold(CountEvents::default(), |a, e| CountEvents {
            counted: a.counted.wrapping_add(e.counted),
            uncounted: a.uncounted.wrapping_add(e.uncounted),
        }))
    }

    /// Adds to backend `id`'s count events, on the first CPU, as the data plane would (tests).
    #[cfg(test)]
    pub(crate) fn add_count_events(&mut self, id: u32, add: CountEvents) -> Result<()> {
        let mut v: Vec<CountEvents> = self
            .ct_counts
            .get(&id, 0)
            .ctx(|| format!("reading the count events of backend {id}"))?
            .iter()
            .copied()
            .collect();
        v[0].counted = v[0].counted.wrapping_add(add.counted);
        v[0].uncounted = v[0].uncounted.wrapping_add(add.uncounted);
        let v = PerCpuValues::try_from(v).expect("one value per CPU");
        self.ct_counts
            .set(id, v, 0)
            .ctx(|| format!("writing the count events of backend {id}"))
    }

    /// Deletes every entry of the unconfirmed table (benchmarks empty it before each new-flow
    /// row); returns how many were deleted. Not for the confirmed table: its entries are on the
    /// backends' active counts, which only the sweep may settle.
    pub fn flush_unconfirmed(&mut self) -> Result<u64> {
        let table = CtTable::Unconfirmed;
        let mut deleted = 0;
        for f in self.flows_in(table)? {
            deleted += self.ct_remove(table, &f.key)? as u64;
        }
        Ok(deleted)
    }

    /// Inserts a conntrack entry (benchmarks use it to fill the table).
    pub fn insert_flow(&mut self, key: &FlowKey, entry: &CtEntry) -> Result<()> {
        self.conntrack
            .insert(key, entry, 0)
            .ctx(|| "inserting a conntrack entry".into())
    }

    /// Kernel id of the conntrack map (for `bpftool map show id`).
    pub fn conntrack_map_id(&self) -> anyhow::Result<u32> {
        use aya::maps::IterableMap;
        Ok(self.conntrack.map().info()?.id())
    }

    /// Active flows of a backend: its confirmed flows (TCP handshake completed, UDP answered)
    /// that have not closed (FINs both ways), expired or been evicted. The data plane counts
    /// them; the sweep (`crate::sweep`) settles what it cannot see.
    pub fn active_flows(&self, id: u32) -> Result<u64> {
        self.active
            .get(&id, 0)
            .ctx(|| format!("reading the active flows of backend {id}"))
    }

    /// The entry conntrack holds for a flow, if any: the confirmed table's, else the
    /// unconfirmed table's.
    pub fn flow(&self, key: &FlowKey) -> Option<CtEntry> {
        self.conntrack
            .get(key, 0)
            .or_else(|_| self.ct_new.get(key, 0))
            .ok()
    }

    /// The entry a flow has in one of the two tables, if any.
    pub fn flow_in(&self, table: CtTable, key: &FlowKey) -> Option<CtEntry> {
        self.ct_map(table).get(key, 0).ok()
    }
}

/// The backends in use: by id, and the ids of each VIP.
#[derive(Default)]
struct BackendIndex {
    by_id: std::collections::BTreeMap<u32, Backend>,
    by_vip: std::collections::HashMap<u32, std::collections::BTreeSet<u32>>,
}

impl BackendIndex {
    fn from(all: Vec<(u32, Backend)>) -> Self {
        let mut ix = BackendIndex::default();
        for (id, b) in all {
            ix.insert(id, b);
        }
        ix
    }

    fn insert(&mut self, id: u32, b: Backend) {
        self.by_vip.entry(b.vip_id).or_default().insert(id);
        self.by_id.insert(id, b);
    }

    fn remove(&mut self, id: u32) {
        if let Some(old) = self.by_id.remove(&id) {
            if let Some(ids) = self.by_vip.get_mut(&old.vip_id) {
                ids.remove(&id);
            }
        }
    }

    /// Every backend, by id.
    fn all(&self) -> Vec<(u32, Backend)> {
        self.by_id.iter().map(|(i, b)| (*i, *b)).collect()
    }

    /// The backends of VIP `vip_id`, by id.
    fn of_vip(&self, vip_id: u32) -> Vec<(u32, Backend)> {
        self.by_vip
            .get(&vip_id)
            .map(|ids| ids.iter().map(|i| (*i, self.by_id[i])).collect())
            .unwrap_or_default()
    }
}

/// Every (key, value) of `map` (a hash map, or an array: then in index order), `chunk` entries
/// a batched read (`BPF_MAP_LOOKUP_BATCH`); `what` names the map in errors.
fn read_all<K: Copy + Default, V: Copy + Default>(
    map: &MapData,
    chunk: usize,
    what: &str,
) -> Result<Vec<(K, V)>> {
    use std::os::fd::AsFd;
    let fd = map.fd().as_fd();
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let (n, next) = crate::sweep::lookup_batch(fd, cursor, chunk, &mut keys, &mut values)
            .map_err(batch_error)
            .ctx(|| format!("reading {what}"))?;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match next {
            Some(c) => cursor = Some(c),
            None => return Ok(out),
        }
    }
}

/// A failed batched map read as a map error.
fn batch_error(io_error: std::io::Error) -> aya::maps::MapError {
    aya::maps::MapError::SyscallError(aya::sys::SyscallError {
        call: "bpf_map_lookup_batch",
        io_error,
    })
}

/// The slots of a VIP's table for its algorithm, and the round-robin sequence length (0 for
/// the other algorithms). Round robin: the smooth weighted sequence from slot 0, the rest empty.
fn table_content(vip: &Vip, info: &VipInfo, backends: &[BackendState]) -> (Vec<u32>, u32) {
    let backends = &effective(info, backends);
    if info.algo == lb_common::ALGO_ROUND_ROBIN {
        let mut sorted = backends.to_vec();
        sorted.sort_by_key(|b| b.addr);
        let seq = crate::schedule::smooth_wrr(
            &sorted.iter().map(|b| (b.id, b.weight)).collect::<Vec<_>>(),
        );
        let mut t = vec![NO_BACKEND; info.table_size as usize];
        t[..seq.len()].copy_from_slice(&seq);
        (t, seq.len() as u32)
    } else {
        let t = maglev::build(&table_entries(vip, backends), info.table_size);
        (t.into_iter().map(|s| s.unwrap_or(NO_BACKEND)).collect(), 0)
    }
}

/// The backends with the weights the table gives them: a backend that is down gets none. When
/// every backend with a weight is down, the VIP fails open (all of them keep their weights) or,
/// with `VIP_F_DROP_WHEN_ALL_DOWN`, gets an empty table.
fn effective(info: &VipInfo, backends: &[BackendState]) -> Vec<BackendState> {
    let any_up = backends.iter().any(|b| b.weight > 0 && b.healthy);
    let drop_all = info.flags & lb_common::VIP_F_DROP_WHEN_ALL_DOWN != 0;
    backends
        .iter()
        .map(|b| BackendState {
            weight: if b.healthy || (!any_up && !drop_all) {
                b.weight
            } else {
                0
            },
            ..*b
        })
        .collect()
}

/// The entries in use of a reverse-NAT set.
pub fn revnat_entries(r: &RevNat) -> &[RevNatEntry] {
    &r.vips[..(r.count as usize).min(MAX_VIPS_PER_BACKEND)]
}

/// Keeps the entries of a reverse-NAT set for which `keep` holds, in order, packed at the
/// front (unused entries zeroed).
fn revnat_retain(r: &mut RevNat, keep: impl Fn(&RevNatEntry) -> bool) {
    let kept: Vec<RevNatEntry> = revnat_entries(r).iter().copied().filter(keep).collect();
    *r = RevNat::default();
    for e in kept {
        revnat_push(r, e);
    }
}

/// Appends an entry to a reverse-NAT set (callers checked there is room).
fn revnat_push(r: &mut RevNat, e: RevNatEntry) {
    let n = r.count as usize;
    debug_assert!(n < MAX_VIPS_PER_BACKEND, "reverse-NAT set full");
    if n < MAX_VIPS_PER_BACKEND {
        r.vips[n] = e;
        r.count += 1;
    }
}

/// Why backend `addr` may not serve `vip` (with stateless reverse NAT or not) besides the
/// VIPs `others` (with theirs), if it may not: a backend endpoint serves at most
/// `MAX_VIPS_PER_BACKEND` VIPs, and a backend of a VIP with stateless reverse NAT serves no
/// other VIP (that VIP's replies are recognised from the backend alone). The map layer and
/// the configuration check apply this same rule.
pub(crate) fn sharing_error(
    vip: &Vip,
    stateless: bool,
    addr: SocketAddr,
    others: &[(Vip, bool)],
) -> Option<LbError> {
    let vips: Vec<Vip> = others.iter().map(|(v, _)| *v).collect();
    if others.is_empty() {
        None
    } else if others.len() >= MAX_VIPS_PER_BACKEND {
        Some(LbError::TooManyVipsPerBackend {
            backend: addr,
            vips: join_vips(&vips),
        })
    } else if stateless {
        Some(LbError::StatelessBackendShared {
            backend: addr,
            stateless: vip.to_string(),
            others: join_vips(&vips),
        })
    } else {
        others
            .iter()
            .find(|(_, s)| *s)
            .map(|(s, _)| LbError::StatelessBackendShared {
                backend: addr,
                stateless: s.to_string(),
                others: vip.to_string(),
            })
    }
}

/// "A, B and C" for error messages.
fn join_vips(vips: &[Vip]) -> String {
    let names: Vec<String> = vips.iter().map(|v| v.to_string()).collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// Checks flow timeouts: each at most `MAX_TIMEOUT_S` (0 = never expires).
pub fn check_timeouts(t: &Timeouts) -> Result<()> {
    for (state, secs) in crate::model::timeout_values(t) {
        if secs > crate::model::MAX_TIMEOUT_S {
            return Err(LbError::TimeoutOutOfRange {
                state,
                seconds: secs as u64,
            });
        }
    }
    Ok(())
}

/// `flags` with `flag` set or cleared.
fn with_flag(flags: u8, flag: u8, on: bool) -> u8 {
    if on {
        flags | flag
    } else {
        flags & !flag
    }
}

/// Round robin's sequence must fit in the table.
fn check_rr_len(weights: &[u32], table_size: u32) -> Result<()> {
    let len = crate::schedule::sequence_len(weights);
    if len > table_size as u64 {
        return Err(LbError::RoundRobinTooLong {
            len,
            size: table_size,
        });
    }
    Ok(())
}

/// Table builder input for a VIP's backends: identity = the backend's endpoint bytes.
fn table_entries(vip: &Vip, backends: &[BackendState]) -> Vec<TableEntry<u32>> {
    backends
        .iter()
        .map(|b| TableEntry {
            identity: bytemuck::bytes_of(&crate::model::endpoint(b.addr, vip.proto)).to_vec(),
            weight: b.weight,
            value: b.id,
        })
        .collect()
}

fn sum_stats(map: &PerCpuArray<MapData, TrafficStats>, id: u32) -> Result<TrafficStats> {
    let v = map
        .get(&id, 0)
        .ctx(|| format!("reading counters of id {id}"))?;
    let mut total = TrafficStats::default();
    for s in v.iter() {
        total.add(s);
    }
    Ok(total)
}

/// Zeroed per-CPU counters, one value per possible CPU.
fn zero_per_cpu() -> PerCpuValues<TrafficStats> {
    let cpus = aya::util::nr_cpus().expect("reading the number of possible CPUs");
    PerCpuValues::try_from(vec![TrafficStats::default(); cpus]).expect("one value per CPU")
}

/// Checks a table size: prime and within range.
pub fn check_table_size(size: u32) -> Result<()> {
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) {
        return Err(LbError::TableSizeOutOfRange {
            size,
            max: MAX_TABLE_SIZE,
        });
    }
    if !maglev::is_prime(size) {
        return Err(LbError::TableSizeNotPrime(size));
    }
    Ok(())
}

/// First offset in `[0, capacity)` where `size` slots fit between the `used` (offset, size) runs.
pub(crate) fn free_range(
    used: impl Iterator<Item = (u32, u32)>,
    size: u32,
    capacity: u32,
) -> Option<u32> {
    let mut runs: Vec<(u32, u32)> = used.collect();
    runs.sort();
    let mut at = 0u64;
    for (off, len) in runs {
        if off as u64 >= at + size as u64 {
            break;
        }
        at = at.max(off as u64 + len as u64);
    }
    (at + size as u64 <= capacity as u64).then_some(at as u32)
}

/// The protocol of a VIP key, for callers holding raw keys.
pub fn proto_of(e: &Endpoint) -> Option<Proto> {
    Proto::from_number(e.proto)
}

#[cfg(test)]
mod tests {
    use super::free_range;

    #[test]
    fn free_range_finds_gaps() {
        assert_eq!(free_range([].into_iter(), 10, 100), Some(0));
        assert_eq!(free_range([(0, 10)].into_iter(), 10, 100), Some(10));
        assert_eq!(free_range([(10, 10), (0, 5)].into_iter(), 5, 100), Some(5));
        assert_eq!(free_range([(10, 10), (0, 5)].into_iter(), 6, 100), Some(20));
        assert_eq!(free_range([(0, 95)].into_iter(), 6, 100), None);
        assert_eq!(free_range([(0, 94)].into_iter(), 6, 100), Some(94));
    }
}

#[cfg(test)]
mod sharing_tests {
    use super::*;

    fn vip(s: &str) -> Vip {
        s.parse().unwrap()
    }

    fn entry(v: &str, id: u32) -> RevNatEntry {
        RevNatEntry {
            vip: vip(v).endpoint(),
            vip_id: id,
            backend_id: 100 + id,
        }
    }

    #[test]
    fn revnat_sets_append_and_remove_in_place() {
        let mut set = RevNat::default();
        for i in 0..3 {
            revnat_push(&mut set, entry(&format!("10.0.0.{i}:80/tcp"), i));
        }
        assert_eq!(revnat_entries(&set).len(), 3);
        revnat_retain(&mut set, |e| e.backend_id != 101);
        assert_eq!(set.count, 2);
        let ids: Vec<u32> = revnat_entries(&set).iter().map(|e| e.vip_id).collect();
        assert_eq!(ids, vec![0, 2]);
        // Unused entries are zeroed, so equal sets are equal values.
        assert_eq!(set.vips[2], RevNatEntry::default());
        revnat_retain(&mut set, |_| false);
        assert_eq!(set, RevNat::default());
        // A count beyond the array (a corrupt entry) is clamped.
        let bad = RevNat {
            count: 99,
            ..RevNat::default()
        };
        assert_eq!(revnat_entries(&bad).len(), MAX_VIPS_PER_BACKEND);
    }

    #[test]
    fn sharing_rules() {
        let b: SocketAddr = "10.9.0.1:8080".parse().unwrap();
        let a = vip("10.0.0.1:80/tcp");
        let others = |n: usize, stateless: bool| -> Vec<(Vip, bool)> {
            (0..n)
                .map(|i| (vip(&format!("10.0.1.{i}:80/tcp")), stateless && i == 0))
                .collect()
        };
        assert!(sharing_error(&a, false, b, &[]).is_none());
        assert!(sharing_error(&a, true, b, &[]).is_none());
        assert!(sharing_error(&a, false, b, &others(MAX_VIPS_PER_BACKEND - 1, false)).is_none());
        let e = sharing_error(&a, false, b, &others(MAX_VIPS_PER_BACKEND, false)).unwrap();
        assert!(matches!(e, LbError::TooManyVipsPerBackend { .. }), "{e}");
        assert!(e.to_string().contains(
            "backend 10.9.0.1:8080 already serves VIPs 10.0.1.0:80/tcp, 10.0.1.1:80/tcp, 10.0.1.2:80/tcp and 10.0.1.3:80/tcp"
        ));
        let e = sharing_error(&a, true, b, &others(1, false)).unwrap();
        assert!(
            e.to_string()
                .contains("VIP 10.0.0.1:80/tcp (reverse = stateless) and VIP 10.0.1.0:80/tcp"),
            "{e}"
        );
        let e = sharing_error(&a, false, b, &others(2, true)).unwrap();
        assert!(
            e.to_string()
                .contains("VIP 10.0.1.0:80/tcp (reverse = stateless) and VIP 10.0.0.1:80/tcp"),
            "{e}"
        );
    }

    #[test]
    fn timeouts_are_checked() {
        check_timeouts(&Timeouts::DEFAULT).unwrap();
        let zero = Timeouts {
            opening_s: 0,
            established_s: 0,
            closing_s: 0,
            closed_s: 0,
            udp_s: 0,
        };
        check_timeouts(&zero).unwrap();
        let long = Timeouts {
            closing_s: crate::model::MAX_TIMEOUT_S + 1,
            ..Timeouts::DEFAULT
        };
        let e = check_timeouts(&long).unwrap_err();
        assert!(e.to_string().contains("timeout closing=604801"), "{e}");
    }
}

/// The mirror's slot `id` for `vips`: the VIP with that id, or empty.
fn mirror_slot(vips: &[(Vip, VipInfo)], id: u32) -> VipById {
    match vips.iter().find(|(_, i)| i.vip_id == id) {
        Some((vip, info)) => VipById {
            vip: vip.endpoint(),
            info: *info,
        },
        None => VipById::default(),
    }
}

/// The address-hint slot of a VIP (`lb_common::vip_addr_slot`).
fn vip_slot(vip: &Vip) -> u32 {
    let e = vip.endpoint();
    lb_common::vip_addr_slot(e.family, &e.addr_be)
}

/// The address-hint slots of `vips`.
fn vip_hints(vips: &[(Vip, VipInfo)]) -> std::collections::HashSet<u32> {
    vips.iter().map(|(v, _)| vip_slot(v)).collect()
}

#[cfg(test)]
mod mirror_tests {
    use super::*;

    /// Every way a VIP entry changes keeps the mirror by id exactly the VIP map: written after
    /// each change, emptied when a VIP goes (its id then free for the next VIP).
    #[test]
    fn the_vip_mirror_follows_every_change() {
        let Some(mut m) = crate::sweep::standalone_maps() else {
            eprintln!("skipped: no privilege to create BPF maps");
            return;
        };
        let a: Vip = "10.100.0.1:80/tcp".parse().unwrap();
        let b: Vip = "[fd10::1]:53/udp".parse().unwrap();
        let be = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let check = |m: &LbMaps, what: &str| assert!(m.mirror_matches().unwrap(), "after {what}");
        m.add_vip(&a, 251).unwrap();
        check(&m, "add a");
        m.add_vip(&b, 251).unwrap();
        check(&m, "add b");
        m.set_backends(&a, &[(be("10.1.0.1:80"), 1), (be("10.1.0.2:80"), 2)])
            .unwrap();
        check(&m, "backends of a");
        m.set_algorithm(&a, crate::model::Algorithm::RoundRobin)
            .unwrap();
        check(&m, "round robin");
        m.resize_vip(&a, 509).unwrap();
        check(&m, "resize");
        m.set_forward(&b, crate::model::Forward::DsrL2).unwrap();
        check(&m, "forward");
        m.set_all_down_drop(&a, true).unwrap();
        check(&m, "drop when all down");
        m.del_vip(&a).unwrap();
        check(&m, "delete a");
        m.add_vip(&a, 251).unwrap();
        check(&m, "add a again");
        m.del_vip(&a).unwrap();
        m.del_vip(&b).unwrap();
        check(&m, "delete both");
        // A stale slot (an older lb wrote the VIP map alone) is put right by a resync.
        m.add_vip(&a, 251).unwrap();
        m.vip_by_id.set(7, VipById::default(), 0).unwrap();
        m.vip_by_id
            .set(
                0,
                VipById {
                    vip: b.endpoint(),
                    info: VipInfo::default(),
                },
                0,
            )
            .unwrap();
        assert!(!m.mirror_matches().unwrap());
        assert_eq!(m.mirror_vips().unwrap(), 1);
        assert!(m.mirror_matches().unwrap());
        // So is a wrong address hint, set or missing.
        m.vip_addrs.set(7, 1, 0).unwrap();
        assert!(!m.mirror_matches().unwrap());
        m.mirror_vips().unwrap();
        m.vip_addrs.set(vip_slot(&a), 0, 0).unwrap();
        assert!(!m.mirror_matches().unwrap());
        m.mirror_vips().unwrap();
        assert!(m.mirror_matches().unwrap());
        // Two VIPs whose addresses share the low 16 bits: the hint stays while either is there.
        let c: Vip = "10.200.0.1:80/tcp".parse().unwrap();
        assert_eq!(vip_slot(&a), vip_slot(&c));
        m.add_vip(&c, 251).unwrap();
        m.del_vip(&a).unwrap();
        assert!(m.mirror_matches().unwrap(), "the hint of c went with a");
        m.del_vip(&c).unwrap();
        assert!(m.mirror_matches().unwrap());
    }
}
