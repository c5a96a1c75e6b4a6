//! The maps. Sizes marked "set at load" are defaults that userspace overrides with
//! `EbpfLoader::set_max_entries` before loading.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use lb_common::{
    Backend, Counter, CtEntry, Endpoint, FlowKey, Handoff, NextHop, RevNat, TrafficStats, VipInfo,
    COUNTER_CAPACITY, DEFAULT_CT_CAPACITY, DEFAULT_TABLE_CAPACITY, MAX_BACKENDS, MAX_VIPS,
};

#[btf_map(name = "LB_VIPS_V2")]
pub(crate) static VIPS: HashMap<Endpoint, VipInfo, { MAX_VIPS as usize }> = HashMap::new();

#[btf_map(name = "LB_BACKENDS_V1")]
pub(crate) static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// Set at load.
#[btf_map(name = "LB_TABLE_V1")]
pub(crate) static TABLE: Array<u32, { DEFAULT_TABLE_CAPACITY as usize }> = Array::new();

/// Set at load. A shared (not per-CPU) LRU: a flow whose packets land on several CPUs still
/// sees one entry.
#[btf_map(name = "LB_CT_V2")]
pub(crate) static CONNTRACK: LruHashMap<FlowKey, CtEntry, { DEFAULT_CT_CAPACITY as usize }> =
    LruHashMap::new();

#[btf_map(name = "LB_REVNAT_V1")]
pub(crate) static REVNAT: HashMap<Endpoint, RevNat, { MAX_BACKENDS as usize }> = HashMap::new();

/// Active (open) flows per backend: +1 when a flow gets the backend, −1 when its TCP FIN or
/// RST is seen. Shared, updated atomically.
#[btf_map(name = "LB_ACTIVE_V1")]
pub(crate) static ACTIVE: Array<u64, { MAX_BACKENDS as usize }> = Array::new();

/// Port filter: `PORT_F_VIP` / `PORT_F_BACKEND` per port (host order).
#[btf_map(name = "LB_PORTS_V1")]
pub(crate) static PORTS: Array<u8, 65536> = Array::new();

/// Each CPU's position in each round-robin VIP's sequence (per CPU: no atomics, no contention).
#[btf_map(name = "LB_RRPOS_V1")]
pub(crate) static RR_POS: PerCpuArray<u32, { MAX_VIPS as usize }> = PerCpuArray::new();

/// Optional next-hop cache, written by `lb nexthop refresh`.
#[btf_map(name = "LB_NEXTHOP_V1")]
pub(crate) static NEXTHOP: Array<NextHop, { MAX_BACKENDS as usize }> = Array::new();

#[btf_map(name = "LB_STATS_V3")]
pub(crate) static STATS: PerCpuArray<u64, { COUNTER_CAPACITY as usize }> = PerCpuArray::new();

#[btf_map(name = "LB_VIPSTATS_V1")]
pub(crate) static VIP_STATS: PerCpuArray<TrafficStats, { MAX_VIPS as usize }> = PerCpuArray::new();

#[btf_map(name = "LB_BESTATS_V1")]
pub(crate) static BACKEND_STATS: PerCpuArray<TrafficStats, { MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// The tail-called programs (`PROG_*` slots), filled by userspace at load.
#[btf_map(name = "LB_PROGS_V1")]
pub(crate) static PROGS: ProgramArray<2> = ProgramArray::new();

#[btf_map(name = "LB_HANDOFF_V1")]
pub(crate) static HANDOFF: PerCpuArray<Handoff, 1> = PerCpuArray::new();

/// Adds one to a global counter.
#[inline(always)]
pub(crate) fn count(c: Counter) {
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently with us.
        unsafe { *p += 1 };
    }
}
