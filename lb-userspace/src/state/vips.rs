//! VIPs: their entries, the mirror by id and the address hints, flow timeouts, and the
//! deployment-wide settings.

use super::*;

impl LbMaps {
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
    pub(super) fn put_vip(
        &mut self,
        vip: &Vip,
        info: VipInfo,
        what: impl Fn() -> String,
    ) -> Result<()> {
        let slot = vip_slot(vip);
        if self.vip_addrs.get(&slot, 0).ctx(&what)? == 0 {
            self.vip_addrs.set(slot, 1, 0).ctx(&what)?;
        }
        // The address is lb's before the VIP is (traffic to it that no VIP claims is dropped).
        self.vip_ips
            .insert(address_key(vip), 1, 0)
            .ctx(|| format!("{} (address)", what()))?;
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
        let (missing, extra) = self.address_differences(&vips)?;
        for key in missing {
            self.vip_ips
                .insert(key, 1, 0)
                .ctx(|| "writing a VIP address".into())?;
        }
        for key in extra {
            match self.vip_ips.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).ctx(|| "removing a VIP address".into()),
            }
        }
        Ok(vips.len())
    }

    /// The VIP addresses `vips` have that the address map lacks, and those it has that no VIP
    /// has.
    pub(super) fn address_differences(
        &self,
        vips: &[(Vip, VipInfo)],
    ) -> Result<(Vec<Endpoint>, Vec<Endpoint>)> {
        let want: std::collections::BTreeSet<Endpoint> =
            vips.iter().map(|(v, _)| address_key(v)).collect();
        let mut have = std::collections::BTreeSet::new();
        for k in self.vip_ips.keys() {
            have.insert(k.ctx(|| "reading the VIP addresses".into())?);
        }
        Ok((
            want.difference(&have).copied().collect(),
            have.difference(&want).copied().collect(),
        ))
    }

    /// The mirror slots and address hints that differ from what `vips` says, with the value
    /// each should have.
    #[allow(clippy::type_complexity)]
    pub(super) fn mirror_differences(
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
        let vips = self.vips()?;
        let (slots, hints) = self.mirror_differences(&vips)?;
        let (missing, extra) = self.address_differences(&vips)?;
        Ok(slots.is_empty() && hints.is_empty() && missing.is_empty() && extra.is_empty())
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
        self.counters.reset_vip(vip_id)?;
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
        let others = self.vips()?;
        let hint_shared = others.iter().any(|(v, _)| v != vip && vip_slot(v) == slot);
        let address_shared = others
            .iter()
            .any(|(v, _)| v != vip && v.addr.ip() == vip.addr.ip());
        // The mirror first: from then on every packet of the VIP goes through `vips`.
        self.vip_by_id
            .set(info.vip_id, VipById::default(), 0)
            .ctx(|| format!("removing VIP {vip} (by id)"))?;
        self.vips
            .remove(&vip.endpoint())
            .ctx(|| format!("removing VIP {vip}"))?;
        if !address_shared {
            match self.vip_ips.remove(&address_key(vip)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).ctx(|| format!("removing VIP {vip} (address)")),
            }
        }
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

    /// Whether the agent withdraws the VIP from BGP while every backend with a weight is down
    /// (`VIP_F_WITHDRAW_WHEN_ALL_DOWN`; the data plane fails open meanwhile). Returns whether
    /// it changed.
    pub fn set_withdraw_when_all_down(&mut self, vip: &Vip, on: bool) -> Result<bool> {
        let info = self.vip(vip)?;
        let flags = with_flag(info.flags, lb_common::VIP_F_WITHDRAW_WHEN_ALL_DOWN, on);
        if flags == info.flags {
            return Ok(false);
        }
        self.put_vip(vip, VipInfo { flags, ..info }, || {
            format!("updating VIP {vip}")
        })?;
        Ok(true)
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
pub(super) fn with_flag(flags: u8, flag: u8, on: bool) -> u8 {
    if on {
        flags | flag
    } else {
        flags & !flag
    }
}

/// The mirror's slot `id` for `vips`: the VIP with that id, or empty.
pub(super) fn mirror_slot(vips: &[(Vip, VipInfo)], id: u32) -> VipById {
    match vips.iter().find(|(_, i)| i.vip_id == id) {
        Some((vip, info)) => VipById {
            vip: vip.endpoint(),
            info: *info,
        },
        None => VipById::default(),
    }
}

/// The address-hint slot of a VIP (`lb_common::vip_addr_slot`).
pub(super) fn vip_slot(vip: &Vip) -> u32 {
    let e = vip.endpoint();
    lb_common::vip_addr_slot(e.family, &e.addr_be)
}

/// The key of a VIP's address in the address map: port and protocol 0.
pub(super) fn address_key(vip: &Vip) -> Endpoint {
    Endpoint {
        port_be: 0,
        proto: 0,
        ..vip.endpoint()
    }
}

/// The address-hint slots of `vips`.
pub(super) fn vip_hints(vips: &[(Vip, VipInfo)]) -> std::collections::HashSet<u32> {
    vips.iter().map(|(v, _)| vip_slot(v)).collect()
}

#[cfg(test)]
mod mirror_tests {
    use super::*;

    /// Every way a VIP entry changes keeps the mirror by id exactly the VIP map: written after
    /// each change, emptied when a VIP goes (its id then free for the next VIP).
    #[test]
    pub(super) fn the_vip_mirror_follows_every_change() {
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
