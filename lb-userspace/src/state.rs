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

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    names, Backend, CtEntry, Endpoint, FlowKey, GlobalConf, NextHop, RevNat, RevNatEntry, Timeouts,
    VipById, VipInfo, BACKEND_F_DOWN, BACKEND_F_VALID, MAX_BACKENDS, MAX_TABLE_SIZE, MAX_VIPS,
    MAX_VIPS_PER_BACKEND, NO_BACKEND,
};

use crate::{
    error::{LbError, MapContext, MAX_WEIGHT, MIN_SLOTS_PER_BACKEND, MIN_TABLE_SIZE},
    maglev::{self, TableEntry},
    model::{socket_addr, Proto, Vip},
};

type Result<T, E = LbError> = std::result::Result<T, E>;

mod backends;
mod check;
mod counters;
mod flows;
mod nexthops;
mod tables;
mod vips;

pub use backends::revnat_entries;
pub(crate) use backends::sharing_error;
use backends::{join_vips, read_all, read_all_per_cpu, BackendIndex};
pub use check::Repair;
pub use counters::Counters;
pub use flows::Flows;
pub use nexthops::NextHops;
pub use tables::check_table_size;
pub(crate) use tables::free_range;
use tables::{check_rr_len, table_content};
pub use vips::check_timeouts;
use vips::with_flag;

/// Typed handles on all of the data plane's maps, by concern: VIPs, backends and their
/// selection tables here (`vips.rs`, `backends.rs`, `tables.rs`: they change together, in an
/// order that keeps every packet's references valid); flows, counters and the next-hop cache
/// in their own types.
pub struct LbMaps {
    vips: HashMap<MapData, Endpoint, VipInfo>,
    /// Each VIP again by id (written after and cleared before its `vips` entry).
    vip_by_id: Array<MapData, VipById>,
    /// Which low 16 bits of a destination some VIP's address has (a lookup-order hint).
    vip_addrs: Array<MapData, u8>,
    /// Every VIP address (port and protocol 0): traffic to one that no VIP claims is dropped.
    vip_ips: HashMap<MapData, Endpoint, u8>,
    backends: Array<MapData, Backend>,
    table: crate::slots::SlotArray,
    /// The backends in use, by VIP id, while a many-step change runs (`with_backend_index`):
    /// every read of "the backends of a VIP" otherwise costs a pass over all of them.
    index: std::sync::Mutex<Option<BackendIndex>>,
    /// Flow timeouts per VIP, by vip_id.
    timeouts: Array<MapData, Timeouts>,
    /// Deployment-wide settings (one entry): hash seed, flood threshold.
    conf: Array<MapData, GlobalConf>,
    revnat: HashMap<MapData, Endpoint, RevNat>,
    ports: Array<MapData, u8>,
    /// Conntrack and active-flow counts.
    pub flows: Flows,
    /// Verdict and traffic counters.
    pub counters: Counters,
    /// The data plane's next-hop cache.
    pub nexthops: NextHops,
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
            vip_ips: get(names::VIP_IPS)?.try_into()?,
            timeouts: get(names::TIMEOUTS)?.try_into()?,
            conf: get(names::CONF)?.try_into()?,
            revnat: get(names::REVNAT)?.try_into()?,
            ports: get(names::PORTS)?.try_into()?,
            flows: Flows {
                conntrack: get(names::CONNTRACK)?.try_into()?,
                ct_new: get(names::CT_NEW)?.try_into()?,
                active: get(names::ACTIVE)?.try_into()?,
                ct_counts: get(names::CT_COUNTS)?.try_into()?,
            },
            counters: Counters {
                stats: get(names::STATS)?.try_into()?,
                vip_stats: get(names::VIP_STATS)?.try_into()?,
                backend_stats: get(names::BACKEND_STATS)?.try_into()?,
            },
            nexthops: NextHops {
                nexthop: get(names::NEXTHOP)?.try_into()?,
            },
        })
    }

    /// Capacity of the shared table array.
    pub fn table_capacity(&self) -> u32 {
        self.table.len()
    }

    // ---- VIPs ----

    // ---- deployment-wide settings ----

    // ---- backends ----

    // ---- port filter ----

    /// Every CPU's cached next hop of backend `id` that was made for its current holder
    /// (valid, same generation); not checked for age.
    pub fn nexthops(&self, id: u32) -> Result<Vec<NextHop>> {
        let per_cpu = self.nexthops.per_cpu(id)?;
        let b = self
            .backends
            .get(&id, 0)
            .ctx(|| format!("reading backend {id}"))?;
        Ok(per_cpu
            .into_iter()
            .filter(|nh| {
                nh.flags & lb_common::NEXTHOP_F_VALID != 0
                    && nh.generation == b.generation
                    && b.is_valid()
            })
            .collect())
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
                self.flows.conntrack.keys().count() as u64,
                cap(self.flows.conntrack.map())?,
            ),
            conntrack_new: (
                self.flows.ct_new.keys().count() as u64,
                cap(self.flows.ct_new.map())?,
            ),
            revnat: (self.revnat.keys().count() as u64, cap(self.revnat.map())?),
        })
    }
}

/// The protocol of a VIP key, for callers holding raw keys.
pub fn proto_of(e: &Endpoint) -> Option<Proto> {
    Proto::from_number(e.proto)
}
