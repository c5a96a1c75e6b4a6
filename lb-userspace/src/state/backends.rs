//! Backends: their entries, reverse-NAT sets and the port filter, with the order of writes
//! that keeps every packet's references valid (see the parent module).

use super::*;

impl LbMaps {
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

    pub(super) fn wanted(&self, vip: &Vip) -> Result<Vec<(SocketAddr, u32)>> {
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
            self.counters.reset_backend(*id)?;
            self.flows
                .active
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

    /// The port filter's flags for `port` (`PORT_F_*`).
    pub fn port_flags(&self, port: u16) -> Result<u8> {
        self.ports
            .get(&(port as u32), 0)
            .ctx(|| format!("reading port {port}"))
    }

    /// Sets `flag` on `port` (before a VIP or backend using it is written).
    pub(super) fn claim_port(&mut self, port: u16, flag: u8) -> Result<()> {
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
    pub(super) fn release_port(&mut self, port: u16, flag: u8) -> Result<()> {
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

    /// Removes a backend's reverse-NAT entry and cached next hop, then invalidates its entry
    /// (keeping its generation, so the next holder of the id gets a new one).
    ///
    /// The reverse-NAT entry goes first, so no packet finds a set entry pointing at an
    /// invalid backend (the mirror of adding one, whose backend entry is written before its
    /// reverse-NAT entry). If invalidating then fails, the id is no longer in use (ids in use
    /// are found through the reverse-NAT map) and its next holder gets a new generation.
    pub(super) fn retire_backend(&mut self, vip: &Vip, b: &BackendState) -> Result<()> {
        self.nexthops.clear(b.id)?;
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
    pub(super) fn revnat_set(&self, key: &Endpoint) -> Result<RevNat> {
        match self.revnat.get(key, 0) {
            Ok(r) => Ok(r),
            Err(aya::maps::MapError::KeyNotFound) => Ok(RevNat::default()),
            Err(e) => Err(e).ctx(|| "reading the reverse-NAT map".into()),
        }
    }

    /// The VIPs other than `vip` that the backend endpoint `addr` (with `vip`'s protocol)
    /// serves, with their flags (0 for a VIP no longer in the VIP map).
    pub(super) fn other_vips_of(&self, vip: &Vip, addr: SocketAddr) -> Result<Vec<(Vip, u8)>> {
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
    pub(super) fn check_sharing(&self, vip: &Vip, info: &VipInfo, addr: SocketAddr) -> Result<()> {
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

    /// The backends of every VIP, by VIP id, each list sorted by address: the valid entries
    /// of the backend array as the data plane sees them, read whole in a few batched reads
    /// (or from the index), so the cost does not grow with the number of VIPs.
    pub fn backends_by_vip(&self) -> Result<std::collections::HashMap<u32, Vec<BackendState>>> {
        let in_use = match self.indexed_backends() {
            Some(all) => all,
            None => (0u32..)
                .zip(self.backends_all()?)
                .filter(|(_, b)| b.is_valid())
                .collect(),
        };
        let mut out: std::collections::HashMap<u32, Vec<BackendState>> = Default::default();
        for (id, b) in in_use {
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

    /// Every backend in use, from the index (None: there is none).
    fn indexed_backends(&self) -> Option<Vec<(u32, Backend)>> {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(BackendIndex::all)
    }

    /// Every backend in use, with its id. Found through the reverse-NAT map, whose sets hold
    /// exactly one entry per backend in use (written and removed together with the backend
    /// entry), so this costs one lookup per backend rather than a scan of the whole array.
    pub(super) fn valid_backends(&self) -> Result<Vec<(u32, Backend)>> {
        if let Some(all) = self.indexed_backends() {
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
    pub(super) fn raw_backends_of(&self, vip_id: u32) -> Result<Vec<(u32, Backend)>> {
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
    pub(super) fn revnat_all(&self) -> Result<Vec<(Endpoint, RevNat)>> {
        use aya::maps::IterableMap;
        read_all(self.revnat.map(), 4096, "the reverse-NAT map")
    }

    /// The whole port filter (flags by port), in batched reads.
    pub(super) fn ports_all(&self) -> Result<Vec<u8>> {
        use aya::maps::IterableMap;
        let all: Vec<(u32, u8)> = read_all(self.ports.map(), 65_536, "the port filter")?;
        Ok(all.into_iter().map(|(_, v)| v).collect())
    }

    /// The whole backend array, in batched reads.
    pub(super) fn backends_all(&self) -> Result<Vec<Backend>> {
        use aya::maps::IterableMap;
        let all: Vec<(u32, Backend)> = read_all(self.backends.map(), 8192, "the backend array")?;
        Ok(all.into_iter().map(|(_, v)| v).collect())
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
}

/// Every (key, value) of `map` (a hash map, or an array: then in index order), `chunk` entries
/// a batched read (`BPF_MAP_LOOKUP_BATCH`); `what` names the map in errors.
pub(super) fn read_all<K: Copy + Default, V: Copy + Default>(
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

/// Every entry of a per-CPU map with one value per possible CPU, in batched reads
/// (`BPF_MAP_LOOKUP_BATCH`: each key's values come as one run, a CPU each).
/// Each key's run goes through `fold` (e.g. a sum over CPUs).
pub(super) fn read_all_per_cpu<K: Copy + Default, V: Copy + Default, T>(
    map: &MapData,
    chunk: usize,
    what: &str,
    fold: impl Fn(&[V]) -> T,
) -> Result<Vec<(K, T)>> {
    use std::os::fd::AsFd;
    // The kernel pads each CPU's value to 8 bytes: V must have that size already.
    const { assert!(std::mem::size_of::<V>().is_multiple_of(8)) };
    let cpus = aya::util::nr_cpus().expect("reading the number of possible CPUs");
    let fd = map.fd().as_fd();
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let (n, next) =
            crate::sweep::lookup_batch_per_key(fd, cursor, chunk, cpus, &mut keys, &mut values)
                .map_err(batch_error)
                .ctx(|| format!("reading {what}"))?;
        out.extend(
            keys[..n]
                .iter()
                .copied()
                .zip(values[..n * cpus].chunks(cpus).map(&fold)),
        );
        match next {
            Some(c) => cursor = Some(c),
            None => return Ok(out),
        }
    }
}

/// A failed batched map read as a map error.
pub(super) fn batch_error(io_error: std::io::Error) -> aya::maps::MapError {
    aya::maps::MapError::SyscallError(aya::sys::SyscallError {
        call: "bpf_map_lookup_batch",
        io_error,
    })
}

/// The entries in use of a reverse-NAT set.
pub fn revnat_entries(r: &RevNat) -> &[RevNatEntry] {
    &r.vips[..(r.count as usize).min(MAX_VIPS_PER_BACKEND)]
}

/// Keeps the entries of a reverse-NAT set for which `keep` holds, in order, packed at the
/// front (unused entries zeroed).
pub(super) fn revnat_retain(r: &mut RevNat, keep: impl Fn(&RevNatEntry) -> bool) {
    let kept: Vec<RevNatEntry> = revnat_entries(r).iter().copied().filter(keep).collect();
    *r = RevNat::default();
    for e in kept {
        revnat_push(r, e);
    }
}

/// Appends an entry to a reverse-NAT set (callers checked there is room).
pub(super) fn revnat_push(r: &mut RevNat, e: RevNatEntry) {
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
pub(super) fn join_vips(vips: &[Vip]) -> String {
    let names: Vec<String> = vips.iter().map(|v| v.to_string()).collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// The backends in use: by id, and the ids of each VIP.
#[derive(Default)]
pub(super) struct BackendIndex {
    by_id: std::collections::BTreeMap<u32, Backend>,
    by_vip: std::collections::HashMap<u32, std::collections::BTreeSet<u32>>,
}

impl BackendIndex {
    pub(super) fn from(all: Vec<(u32, Backend)>) -> Self {
        let mut ix = BackendIndex::default();
        for (id, b) in all {
            ix.insert(id, b);
        }
        ix
    }

    pub(super) fn insert(&mut self, id: u32, b: Backend) {
        self.by_vip.entry(b.vip_id).or_default().insert(id);
        self.by_id.insert(id, b);
    }

    pub(super) fn remove(&mut self, id: u32) {
        if let Some(old) = self.by_id.remove(&id) {
            if let Some(ids) = self.by_vip.get_mut(&old.vip_id) {
                ids.remove(&id);
            }
        }
    }

    /// Every backend, by id.
    pub(super) fn all(&self) -> Vec<(u32, Backend)> {
        self.by_id.iter().map(|(i, b)| (*i, *b)).collect()
    }

    /// The backends of VIP `vip_id`, by id.
    pub(super) fn of_vip(&self, vip_id: u32) -> Vec<(u32, Backend)> {
        self.by_vip
            .get(&vip_id)
            .map(|ids| ids.iter().map(|i| (*i, self.by_id[i])).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
#[cfg(test)]
mod sharing_tests {
    use super::*;

    pub(super) fn vip(s: &str) -> Vip {
        s.parse().unwrap()
    }

    pub(super) fn entry(v: &str, id: u32) -> RevNatEntry {
        RevNatEntry {
            vip: vip(v).endpoint(),
            vip_id: id,
            backend_id: 100 + id,
        }
    }

    #[test]
    pub(super) fn revnat_sets_append_and_remove_in_place() {
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
    pub(super) fn sharing_rules() {
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
    pub(super) fn timeouts_are_checked() {
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
