//! The next-hop cache: per backend and CPU, the route lookup's answer the data plane keeps.

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use lb_common::NextHop;

use super::Result;
use crate::error::MapContext;

/// The next-hop cache map.
pub struct NextHops {
    /// Per CPU: each CPU's own cache.
    pub(super) nexthop: PerCpuArray<MapData, NextHop>,
}

impl NextHops {
    /// Writes `nh` as every CPU's cached next hop of backend `id` (what the data plane
    /// writes after a route lookup; for tests and benchmarks that need a given entry).
    pub fn set(&mut self, id: u32, nh: NextHop) -> Result<()> {
        let cpus = aya::util::nr_cpus().expect("reading the number of possible CPUs");
        let v = PerCpuValues::try_from(vec![nh; cpus]).expect("one value per CPU");
        self.nexthop
            .set(id, v, 0)
            .ctx(|| format!("writing the next hop of backend {id}"))
    }

    /// Removes backend `id`'s cached next hop on every CPU: its next packet is routed by a
    /// lookup, which caches the answer again.
    pub fn clear(&mut self, id: u32) -> Result<()> {
        self.set(id, NextHop::default())
    }

    /// Every CPU's cached next hop of backend `id` as stored (valid or not).
    pub fn per_cpu(&self, id: u32) -> Result<Vec<NextHop>> {
        Ok(self
            .nexthop
            .get(&id, 0)
            .ctx(|| format!("reading the next hop of backend {id}"))?
            .iter()
            .copied()
            .collect())
    }
}
