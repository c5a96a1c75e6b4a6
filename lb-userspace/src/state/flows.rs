//! Flows: the two conntrack tables and the backends' active-flow counts.

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use lb_common::{CountEvents, CtEntry, FlowKey};

use super::{read_all, read_all_per_cpu, CtTable, Flow, Result};
use crate::error::MapContext;

/// The flow maps.
pub struct Flows {
    pub(super) conntrack: HashMap<MapData, FlowKey, CtEntry>,
    /// Unconfirmed flows (a separate LRU, so a flood never evicts a confirmed flow).
    pub(super) ct_new: HashMap<MapData, FlowKey, CtEntry>,
    pub(super) active: Array<MapData, u64>,
    /// Per backend id and CPU, flows put on and taken off the active count (monotonic).
    pub(super) ct_counts: PerCpuArray<MapData, CountEvents>,
}

impl Flows {
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
    pub fn list(&self) -> Result<Vec<Flow>> {
        let mut out = self.list_in(CtTable::Confirmed)?;
        out.extend(self.list_in(CtTable::Unconfirmed)?);
        Ok(out)
    }

    /// All entries of one conntrack table, read as `flows` reads them.
    fn list_in(&self, table: CtTable) -> Result<Vec<Flow>> {
        let mut out = Vec::new();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut cursor = None;
        loop {
            let (n, next) = self.batch(table, cursor, 4096, &mut keys, &mut values)?;
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
    pub(crate) fn batch(
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
    pub(crate) fn get(&self, table: CtTable, key: &FlowKey) -> Result<Option<CtEntry>> {
        match self.ct_map(table).get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).ctx(|| format!("reading the {} conntrack table", table.name())),
        }
    }

    /// Deletes an entry of `table`; false if it was not there.
    pub(crate) fn remove(&mut self, table: CtTable, key: &FlowKey) -> Result<bool> {
        match self.ct_map_mut(table).remove(key) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).ctx(|| format!("deleting from the {} conntrack table", table.name())),
        }
    }

    /// Inserts an entry in either table (tests).
    #[cfg(test)]
    pub(crate) fn insert(&mut self, table: CtTable, key: &FlowKey, entry: &CtEntry) -> Result<()> {
        self.ct_map_mut(table)
            .insert(key, entry, 0)
            .ctx(|| "inserting a conntrack entry".into())
    }

    /// Capacity of a conntrack table.
    pub fn capacity(&self, table: CtTable) -> anyhow::Result<u64> {
        use aya::maps::IterableMap;
        Ok(self.ct_map(table).map().info()?.max_entries() as u64)
    }

    /// Overwrites backend `id`'s active-flow count (the sweep's settlement).
    pub(crate) fn set_active(&mut self, id: u32, n: u64) -> Result<()> {
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
        Ok(sum_events(v.iter()))
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
        let v = aya::maps::PerCpuValues::try_from(v).expect("one value per CPU");
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
        for f in self.list_in(table)? {
            deleted += self.remove(table, &f.key)? as u64;
        }
        Ok(deleted)
    }

    /// Inserts a conntrack entry (benchmarks use it to fill the table).
    pub fn insert_confirmed(&mut self, key: &FlowKey, entry: &CtEntry) -> Result<()> {
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
    pub fn active(&self, id: u32) -> Result<u64> {
        self.active
            .get(&id, 0)
            .ctx(|| format!("reading the active flows of backend {id}"))
    }

    /// The entry conntrack holds for a flow, if any: the confirmed table's, else the
    /// unconfirmed table's.
    pub fn lookup(&self, key: &FlowKey) -> Option<CtEntry> {
        self.conntrack
            .get(key, 0)
            .or_else(|_| self.ct_new.get(key, 0))
            .ok()
    }

    /// The entry a flow has in one of the two tables, if any.
    pub fn lookup_in(&self, table: CtTable, key: &FlowKey) -> Option<CtEntry> {
        self.ct_map(table).get(key, 0).ok()
    }

    /// Every backend's active-flow count, by id (batched reads).
    pub(crate) fn all_active(&self) -> Result<Vec<u64>> {
        use aya::maps::IterableMap;
        let all: Vec<(u32, u64)> = read_all(self.active.map(), 8192, "the active flows")?;
        Ok(all.into_iter().map(|(_, n)| n).collect())
    }

    /// Every backend's count events summed over CPUs, by id (batched reads; see
    /// `count_events`).
    pub(crate) fn all_count_events(&self) -> Result<Vec<CountEvents>> {
        use aya::maps::IterableMap;
        let all: Vec<(u32, CountEvents)> =
            read_all_per_cpu(self.ct_counts.map(), 4096, "the count events", |c| {
                sum_events(c)
            })?;
        Ok(all.into_iter().map(|(_, e)| e).collect())
    }
}

/// Count events summed over CPUs (wrapping).
fn sum_events<'a>(cpus: impl IntoIterator<Item = &'a CountEvents>) -> CountEvents {
    cpus.into_iter()
        .fold(CountEvents::default(), |a, e| CountEvents {
            counted: a.counted.wrapping_add(e.counted),
            uncounted: a.uncounted.wrapping_add(e.uncounted),
        })
}

#[cfg(test)]
mod tests {
    use lb_common::CountEvents;

    /// The batched whole-array reads the sweep uses for many backends give what one lookup
    /// per id gives: each key's per-CPU run summed, at its index.
    #[test]
    fn batched_reads_match_single_reads() {
        let Some(mut maps) = crate::sweep::standalone_maps() else {
            eprintln!("skipped: cannot create BPF maps");
            return;
        };
        for (id, c, u) in [(0u32, 5u64, 2u64), (7, 1, 0), (4095, 9, 9), (65_535, 3, 1)] {
            let add = CountEvents {
                counted: c,
                uncounted: u,
            };
            maps.flows.add_count_events(id, add).unwrap();
            maps.flows.add_count_events(id, add).unwrap();
            maps.flows.set_active(id, c * 10 + u).unwrap();
        }
        let events = maps.flows.all_count_events().unwrap();
        let active = maps.flows.all_active().unwrap();
        assert_eq!(events.len(), lb_common::MAX_BACKENDS as usize);
        assert_eq!(active.len(), lb_common::MAX_BACKENDS as usize);
        for id in [0u32, 1, 7, 4095, 4096, 65_535] {
            assert_eq!(
                events[id as usize],
                maps.flows.count_events(id).unwrap(),
                "{id}"
            );
            assert_eq!(active[id as usize], maps.flows.active(id).unwrap(), "{id}");
        }
        assert_eq!(events[7].counted, 2);
        assert_eq!(events[65_535].uncounted, 2);
    }
}
