//! The maps. Sizes marked "set at load" are defaults that userspace overrides with
//! `EbpfLoader::set_max_entries` before loading.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use lb_common::{
    Backend, CountEvents, Counter, CtEntry, Endpoint, FlowKey, GlobalConf, Handoff, NextHop,
    RateWindow, RevNat, Timeouts, TrafficStats, VipById, VipInfo, COUNTER_CAPACITY,
    DEFAULT_CT_CAPACITY, DEFAULT_CT_NEW_CAPACITY, DEFAULT_TABLE_CAPACITY, MAX_BACKENDS, MAX_VIPS,
};

#[btf_map(name = "LB_VIPS_V2")]
pub(crate) static VIPS: HashMap<Endpoint, VipInfo, { MAX_VIPS as usize }> = HashMap::new();

/// Each VIP again by `vip_id`: a packet whose conntrack entry names its backend finds its VIP
/// here, without a hash lookup.
#[btf_map(name = "LB_VIPBYID_V1")]
pub(crate) static VIP_BY_ID: Array<VipById, { MAX_VIPS as usize }> = Array::new();

/// Where some VIP's address has these low 16 bits: a hint to look in conntrack first.
#[btf_map(name = "LB_VIPADDRS_V1")]
pub(crate) static VIP_ADDRS: Array<u8, 65536> = Array::new();

/// Every VIP address (`Endpoint` with port and protocol 0): `names::VIP_IPS`.
#[btf_map(name = "LB_VIPIPS_V1")]
pub(crate) static VIP_IPS: HashMap<Endpoint, u8, { MAX_VIPS as usize }> = HashMap::new();

#[btf_map(name = "LB_BACKENDS_V1")]
pub(crate) static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// Set at load.
/// Every VIP's selection table, each in its range (`VipInfo::table_off`, `table_size`).
/// Mappable (`BPF_F_MMAPABLE`): `lb` reads and writes slots in memory (`slots.rs`).
#[btf_map(name = "LB_TABLE_V2")]
pub(crate) static TABLE: Array<u32, { DEFAULT_TABLE_CAPACITY as usize }, { BPF_F_MMAPABLE }> =
    Array::new();

/// `BPF_F_MMAPABLE` (include/uapi/linux/bpf.h).
const BPF_F_MMAPABLE: usize = 1 << 10;

/// Confirmed flows. Set at load. A shared (not per-CPU) LRU: a flow whose packets land on
/// several CPUs still sees one entry. Only confirmed flows enter it, so a flood of new flows
/// never evicts one.
#[btf_map(name = "LB_CT_V3")]
pub(crate) static CONNTRACK: LruHashMap<FlowKey, CtEntry, { DEFAULT_CT_CAPACITY as usize }> =
    LruHashMap::new();

/// Flows not yet confirmed: a bounded LRU of their own. Set at load.
#[btf_map(name = "LB_CTNEW_V1")]
pub(crate) static CT_NEW: LruHashMap<FlowKey, CtEntry, { DEFAULT_CT_NEW_CAPACITY as usize }> =
    LruHashMap::new();

/// Flow timeouts per VIP, by `vip_id`.
#[btf_map(name = "LB_TIMEOUTS_V1")]
pub(crate) static TIMEOUTS: Array<Timeouts, { MAX_VIPS as usize }> = Array::new();

/// Hash seed and flood threshold.
#[btf_map(name = "LB_CONF_V1")]
pub(crate) static CONF: Array<GlobalConf, 1> = Array::new();

/// This CPU's new-flow count in the current one-second window.
#[btf_map(name = "LB_RATE_V1")]
pub(crate) static RATE: PerCpuArray<RateWindow, 1> = PerCpuArray::new();

/// When a CPU last went over the flood threshold (coarse monotonic ns).
#[btf_map(name = "LB_FLOOD_V1")]
pub(crate) static FLOOD: Array<u64, 1> = Array::new();

/// Per backend, flows put on and taken off the active count (for the sweep's settlement).
#[btf_map(name = "LB_CTCOUNT_V1")]
pub(crate) static CT_COUNTS: PerCpuArray<CountEvents, { MAX_BACKENDS as usize }> =
    PerCpuArray::new();

#[btf_map(name = "LB_REVNAT_V2")]
pub(crate) static REVNAT: HashMap<Endpoint, RevNat, { MAX_BACKENDS as usize }> = HashMap::new();

/// Active flows per backend: +1 when a flow is confirmed, −1 once when it closes or is found
/// expired (the agent's sweep settles evictions). Shared, updated atomically.
#[btf_map(name = "LB_ACTIVE_V1")]
pub(crate) static ACTIVE: Array<u64, { MAX_BACKENDS as usize }> = Array::new();

/// Port filter: `PORT_F_VIP` / `PORT_F_BACKEND` per port (host order).
#[btf_map(name = "LB_PORTS_V1")]
pub(crate) static PORTS: Array<u8, 65536> = Array::new();

/// Each CPU's position in each round-robin VIP's sequence (per CPU: no atomics, no contention).
#[btf_map(name = "LB_RRPOS_V1")]
pub(crate) static RR_POS: PerCpuArray<u32, { MAX_VIPS as usize }> = PerCpuArray::new();

/// The next-hop cache, per CPU, by backend id (`nexthop.rs`).
#[btf_map(name = "LB_NEXTHOP_V2")]
pub(crate) static NEXTHOP: PerCpuArray<NextHop, { MAX_BACKENDS as usize }> = PerCpuArray::new();

#[btf_map(name = "LB_STATS_V5")]
pub(crate) static STATS: PerCpuArray<u64, { COUNTER_CAPACITY as usize }> = PerCpuArray::new();

#[btf_map(name = "LB_VIPSTATS_V1")]
pub(crate) static VIP_STATS: PerCpuArray<TrafficStats, { MAX_VIPS as usize }> = PerCpuArray::new();

#[btf_map(name = "LB_BESTATS_V1")]
pub(crate) static BACKEND_STATS: PerCpuArray<TrafficStats, { MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// The tail-called programs (`PROG_*` slots), filled by userspace at load: `lb_xdp`'s, which
/// are multi-buffer programs (a program array takes only programs that agree with its first
/// user on that).
#[btf_map(name = "LB_PROGS_V3")]
pub(crate) static PROGS: ProgramArray<2> = ProgramArray::new();

/// `lb_xdp_generic`'s tail-called programs (single-buffer).
#[btf_map(name = "LB_GENPROGS_V1")]
pub(crate) static GENERIC_PROGS: ProgramArray<2> = ProgramArray::new();

/// `lb_tc`'s tail-called programs (a program array holds programs of one type).
#[btf_map(name = "LB_TCPROGS_V1")]
pub(crate) static TC_PROGS: ProgramArray<2> = ProgramArray::new();

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
