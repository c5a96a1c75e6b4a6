//! Counters: the verdict and drop counters, and the traffic counters of each VIP and backend
//! (per-CPU arrays, summed here).

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use lb_common::{TrafficStats, COUNTER_COUNT};

use super::{read_all_per_cpu, Result};
use crate::error::MapContext;

/// The counter maps.
pub struct Counters {
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) vip_stats: PerCpuArray<MapData, TrafficStats>,
    pub(super) backend_stats: PerCpuArray<MapData, TrafficStats>,
}

impl Counters {
    /// Global counters summed over CPUs, indexed by `lb_common::Counter`.
    pub fn verdicts(&self) -> Result<Vec<u64>> {
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
    pub fn vip(&self, vip_id: u32) -> Result<TrafficStats> {
        sum_stats(&self.vip_stats, vip_id)
    }

    /// A backend's traffic counters summed over CPUs.
    pub fn backend(&self, id: u32) -> Result<TrafficStats> {
        sum_stats(&self.backend_stats, id)
    }

    /// Every VIP's traffic counters, by VIP id, summed over CPUs (batched reads).
    pub fn all_vips(&self) -> Result<Vec<TrafficStats>> {
        all_summed(&self.vip_stats, "the VIP counters")
    }

    /// Every backend's traffic counters, by backend id, summed over CPUs (batched reads: a
    /// scrape reads them all at once).
    pub fn all_backends(&self) -> Result<Vec<TrafficStats>> {
        all_summed(&self.backend_stats, "the backend counters")
    }

    pub(super) fn reset_vip(&mut self, id: u32) -> Result<()> {
        self.vip_stats
            .set(id, zero_per_cpu(), 0)
            .ctx(|| format!("resetting counters of VIP id {id}"))
    }

    pub(super) fn reset_backend(&mut self, id: u32) -> Result<()> {
        self.backend_stats
            .set(id, zero_per_cpu(), 0)
            .ctx(|| format!("resetting counters of backend id {id}"))
    }
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

/// Every entry of a per-CPU array of traffic counters, summed over CPUs, by index.
fn all_summed(map: &PerCpuArray<MapData, TrafficStats>, what: &str) -> Result<Vec<TrafficStats>> {
    use aya::maps::IterableMap;
    let summed: Vec<(u32, TrafficStats)> = read_all_per_cpu(map.map(), 4096, what, |cpus| {
        let mut total = TrafficStats::default();
        for s in cpus {
            total.add(s);
        }
        total
    })?;
    Ok(summed.into_iter().map(|(_, s)| s).collect())
}

/// Zeroed per-CPU counters, one value per possible CPU.
fn zero_per_cpu() -> PerCpuValues<TrafficStats> {
    let cpus = aya::util::nr_cpus().expect("reading the number of possible CPUs");
    PerCpuValues::try_from(vec![TrafficStats::default(); cpus]).expect("one value per CPU")
}
