//! Loading the XDP program and attaching it to interfaces.

use anyhow::{Context, Result};
use aya::{
    programs::{Program, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{
    names, GlobalConf, DEFAULT_CT_CAPACITY, DEFAULT_CT_NEW_CAPACITY, DEFAULT_FLOOD_RATE,
    DEFAULT_TABLE_CAPACITY,
};

use crate::{
    object::{LB_TC_PROGRAM, LB_XDP_GENERIC_PROGRAM, LB_XDP_OBJECT, LB_XDP_PROGRAM},
    state::LbMaps,
};

/// Sizes fixed when the program is loaded.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Slots of the table array shared by all VIPs.
    pub table_capacity: u32,
    /// Entries of the conntrack LRU (confirmed flows).
    pub ct_capacity: u32,
    /// Entries of the LRU of flows not yet confirmed.
    pub ct_new_capacity: u32,
    /// The flow-hash seed written at load; None: a random one.
    pub hash_seed: Option<u32>,
    /// The flood threshold written at load: new flows per second per CPU (0 = no limit).
    pub flood_rate: u32,
    /// `GlobalConf::nexthop_max_age_ms` written at load (0: the default).
    pub nexthop_max_age_ms: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            table_capacity: DEFAULT_TABLE_CAPACITY,
            ct_capacity: DEFAULT_CT_CAPACITY,
            ct_new_capacity: DEFAULT_CT_NEW_CAPACITY,
            hash_seed: None,
            flood_rate: DEFAULT_FLOOD_RATE,
            nexthop_max_age_ms: 0,
        }
    }
}

/// A loaded (not necessarily attached) lb program and its maps.
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub maps: LbMaps,
}

/// How the program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// XDP in the driver (fastest; needs driver support).
    Native,
    /// XDP in the generic network stack (works on every interface, but can corrupt the
    /// checksums of GRO-merged and locally generated packets: only by an operator's choice).
    Generic,
    /// `lb_tc`, the same data plane as a tc ingress program (tcx): works on every interface,
    /// with the kernel's checksum helpers.
    Tc,
    /// Native; where the driver has no native XDP, tc (said so). `lb decap` falls back to
    /// generic.
    Auto,
}

/// Loads the programs `lb_xdp`, `lb_xdp_generic` and `lb_tc` tail-call
/// (`lb_common::TAIL_PROGRAMS`, `GENERIC_TAIL_PROGRAMS`, `TC_TAIL_PROGRAMS`: all of them, each
/// verified once) and then puts them in their program arrays (`only`: those arrays; None: all),
/// each in its slot (an atomic replacement per slot). A verifier rejection therefore writes no
/// slot.
pub fn install_tail_programs(ebpf: &mut Ebpf, only: Option<&[&str]>) -> Result<()> {
    let arrays = [
        (names::PROGS, lb_common::TAIL_PROGRAMS),
        (names::GENERIC_PROGS, lb_common::GENERIC_TAIL_PROGRAMS),
        (names::TC_PROGS, lb_common::TC_TAIL_PROGRAMS),
    ];
    let mut fds = Vec::new();
    for (array, programs) in arrays {
        for (slot, name) in programs.into_iter().enumerate() {
            let prog = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?;
            load_program(prog)
                .with_context(|| format!("loading {name} into the kernel (verifier)"))?;
            if only.is_none_or(|o| o.contains(&array)) {
                fds.push((array, slot as u32, name, prog.fd()?.try_clone()?));
            }
        }
    }
    for (array, slot, name, fd) in &fds {
        let map = ebpf
            .map_mut(array)
            .with_context(|| format!("map {array} missing from the object"))?;
        aya::maps::ProgramArray::try_from(map)?
            .set(*slot, fd, 0)
            .with_context(|| format!("installing {name}"))?;
    }
    Ok(())
}

/// Loads an XDP or tc program of the object (once).
fn load_program(prog: &mut Program) -> Result<()> {
    match prog {
        Program::Xdp(p) if p.fd().is_err() => p.load()?,
        Program::SchedClassifier(p) if p.fd().is_err() => p.load()?,
        Program::Xdp(_) | Program::SchedClassifier(_) => {}
        _ => anyhow::bail!("not an XDP or tc program"),
    }
    Ok(())
}

/// Loads `lb_xdp_generic`, the single-buffer XDP program of generic mode.
pub fn load_generic(ebpf: &mut Ebpf) -> Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut(LB_XDP_GENERIC_PROGRAM)
        .context("program lb_xdp_generic missing from the object")?
        .try_into()?;
    prog.load()
        .context("loading lb_xdp_generic into the kernel (verifier)")?;
    Ok(())
}

/// Loads `lb_tc`, the data plane as a tc program.
pub fn load_tc(ebpf: &mut Ebpf) -> Result<()> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(LB_TC_PROGRAM)
        .context("program lb_tc missing from the object")?
        .try_into()?;
    prog.load()
        .context("loading lb_tc into the kernel (verifier)")?;
    Ok(())
}

impl Dataplane {
    /// Loads the program into the kernel (verifying it) and creates its maps.
    pub fn load(opts: LoadOptions) -> Result<Self> {
        Self::load_with(opts, |_| Ok(()))
    }

    /// Like `load`, running `before_take` (e.g. to pin the maps) while the maps are still
    /// owned by the `Ebpf` object.
    pub fn load_with(
        opts: LoadOptions,
        before_take: impl FnOnce(&Ebpf) -> Result<()>,
    ) -> Result<Self> {
        crate::privileges::require_for_loading("loading lb's XDP program")?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::TABLE, opts.table_capacity)
            .map_max_entries(names::CONNTRACK, opts.ct_capacity)
            .map_max_entries(names::CT_NEW, opts.ct_new_capacity)
            .load(LB_XDP_OBJECT)
            .context("loading the lb XDP object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(LB_XDP_PROGRAM)
            .context("program lb_xdp missing from the object")?
            .try_into()?;
        prog.load()
            .context("loading lb_xdp into the kernel (verifier)")?;
        load_generic(&mut ebpf)?;
        load_tc(&mut ebpf)?;
        install_tail_programs(&mut ebpf, None)?;
        before_take(&ebpf)?;
        let mut maps = LbMaps::from_maps(|name| ebpf.take_map(name))?;
        // The seed is never left 0: without one given, a random one.
        let hash_seed = match opts.hash_seed {
            Some(s) => s,
            None => crate::model::random_hash_seed().context("generating a hash seed")?,
        };
        maps.set_conf(GlobalConf {
            hash_seed,
            flood_rate: opts.flood_rate,
            // Without a tick length both sides use the coarse monotonic clock: correct, only
            // slower per packet.
            ns_per_tick: crate::clock::measure_ns_per_tick().unwrap_or_else(|e| {
                eprintln!(
                    "lb: warning: measuring the kernel's tick length: {e:#}; flow state is timed with the coarse monotonic clock instead (a helper call per packet)"
                );
                0
            }),
            nexthop_max_age_ms: opts.nexthop_max_age_ms,
        })?;
        Ok(Dataplane { ebpf, maps })
    }

    /// The XDP program.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(LB_XDP_PROGRAM)
            .expect("loaded in Dataplane::load")
            .try_into()
            .expect("lb_xdp is an XDP program")
    }

    /// The XDP program of generic mode.
    pub fn generic_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(LB_XDP_GENERIC_PROGRAM)
            .expect("loaded in Dataplane::load")
            .try_into()
            .expect("lb_xdp_generic is an XDP program")
    }

    /// The tc program.
    pub fn tc_program(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(LB_TC_PROGRAM)
            .expect("loaded in Dataplane::load")
            .try_into()
            .expect("lb_tc is a tc program")
    }
}
