//! Selection tables: building a VIP's table and writing it so that no packet meets a slot
//! without a backend; reading tables back, their digest, and a flow's slot.

use super::*;

impl LbMaps {
    /// A free run of `table_size` slots in the table array, beside the VIPs' `existing` tables.
    pub(super) fn free_table_range(
        &self,
        existing: &[(Vip, VipInfo)],
        table_size: u32,
    ) -> Result<u32> {
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
    pub(super) fn write_table(
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
}

/// The slots of a VIP's table for its algorithm, and the round-robin sequence length (0 for
/// the other algorithms). Round robin: the smooth weighted sequence from slot 0, the rest empty.
pub(super) fn table_content(
    vip: &Vip,
    info: &VipInfo,
    backends: &[BackendState],
) -> (Vec<u32>, u32) {
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
pub(super) fn effective(info: &VipInfo, backends: &[BackendState]) -> Vec<BackendState> {
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

/// Round robin's sequence must fit in the table.
pub(super) fn check_rr_len(weights: &[u32], table_size: u32) -> Result<()> {
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
pub(super) fn table_entries(vip: &Vip, backends: &[BackendState]) -> Vec<TableEntry<u32>> {
    backends
        .iter()
        .map(|b| TableEntry {
            identity: bytemuck::bytes_of(&crate::model::endpoint(b.addr, vip.proto)).to_vec(),
            weight: b.weight,
            value: b.id,
        })
        .collect()
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

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::free_range;

    #[test]
    pub(super) fn free_range_finds_gaps() {
        assert_eq!(free_range([].into_iter(), 10, 100), Some(0));
        assert_eq!(free_range([(0, 10)].into_iter(), 10, 100), Some(10));
        assert_eq!(free_range([(10, 10), (0, 5)].into_iter(), 5, 100), Some(5));
        assert_eq!(free_range([(10, 10), (0, 5)].into_iter(), 6, 100), Some(20));
        assert_eq!(free_range([(0, 95)].into_iter(), 6, 100), None);
        assert_eq!(free_range([(0, 94)].into_iter(), 6, 100), Some(94));
    }
}
