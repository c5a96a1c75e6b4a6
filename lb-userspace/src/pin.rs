//! The pin directory: where `lb` keeps the program, its links and its maps on a BPF filesystem,
//! so that the data plane and its state outlive every `lb` process.
//!
//! ```text
//! /sys/fs/bpf/lb/            (0700; flock'ed by every lb command: concurrent runs serialize)
//!   prog_lb_xdp, prog_lb_xdp_generic, prog_lb_tc
//!                            the loaded program: as XDP program (multi-buffer, for native
//!                            mode; single-buffer, for generic mode) and as tc program
//!   link_<iface>_<mode>      one link per interface (mode: native | generic — XDP — or tc, a
//!                            tcx ingress link; `.` and `%` in the interface name
//!                            percent-encoded: links.rs)
//!   LB_VIPS_V2 …             the maps (names from lb_common::names)
//!   prog_lb_decap, decap_<iface>_<mode>, LB_DECAP_STATS_V2, LB_DECAP_FROM_V1,
//!   LB_DECAP_LOCAL_V1, LB_DECAP_VIPS_V1
//!                            the decapsulation program (on backends of ipip VIPs)
//! ```

use std::{
    ffi::CString,
    fs::{self, File},
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Map, MapData},
    programs::{
        links::FdLink, tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
};
use aya_obj::programs::XdpAttachType;
use lb_common::names;

mod ownership;

use crate::{
    dataplane::{AttachMode, Dataplane, LoadOptions},
    links,
    state::LbMaps,
};

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
/// Environment variable that overrides the default pin directory.
pub const PIN_DIR_ENV: &str = "LB_PIN_DIR";
const PROG_PIN: &str = "prog_lb_xdp";
const GENERIC_PROG_PIN: &str = "prog_lb_xdp_generic";
const TC_PROG_PIN: &str = "prog_lb_tc";
const DECAP_PROG_PIN: &str = "prog_lb_decap";

/// The counters of an older `lb_decap` (before it had a configuration).
const OLD_DECAP_STATS: &str = "LB_DECAP_STATS_V1";

/// The decapsulation program's maps, pinned beside it.
const DECAP_MAPS: [&str; 4] = [
    names::DECAP_STATS,
    names::DECAP_FROM,
    names::DECAP_LOCAL,
    names::DECAP_VIPS,
];
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const ALL_MAPS: [&str; 25] = [
    names::PROGS,
    names::GENERIC_PROGS,
    names::TC_PROGS,
    names::HANDOFF,
    names::PORTS,
    names::ACTIVE,
    names::CT_COUNTS,
    names::RR_POS,
    names::NEXTHOP,
    names::VIPS,
    names::VIP_BY_ID,
    names::VIP_ADDRS,
    names::VIP_IPS,
    names::BACKENDS,
    names::TABLE,
    names::CONNTRACK,
    names::CT_NEW,
    names::TIMEOUTS,
    names::CONF,
    names::RATE,
    names::FLOOD,
    names::REVNAT,
    names::STATS,
    names::VIP_STATS,
    names::BACKEND_STATS,
];

/// Maps that hold only what can be made again from the others — a cache the data plane
/// refills by itself, mirrors of the VIPs, the program arrays the upgrade fills — or counters
/// of a new layout (which start from zero), which `lb upgrade` creates (and fills) when the
/// running program does not have them (an older layout keeps its own until the purge).
const CACHE_MAPS: [&str; 8] = [
    names::NEXTHOP,
    names::VIP_BY_ID,
    names::VIP_ADDRS,
    names::VIP_IPS,
    names::STATS,
    names::PROGS,
    names::GENERIC_PROGS,
    names::TC_PROGS,
];

/// The program arrays, one per kind of program.
const PROG_ARRAYS: [&str; 3] = [names::PROGS, names::GENERIC_PROGS, names::TC_PROGS];

/// The pins of the loaded programs.
const PROG_PINS: [&str; 3] = [PROG_PIN, GENERIC_PROG_PIN, TC_PROG_PIN];

/// Pins of maps that earlier layouts had and this one does not use: removed once an upgrade
/// has switched every link (and by unload and purge).
const LEGACY_MAPS: [&str; 5] = [
    "LB_NEXTHOP_V1",
    "LB_PROGS_V1",
    "LB_PROGS_V2",
    "LB_STATS_V4",
    OLD_TABLE,
];

/// The slot array before it was mappable: `lb upgrade` makes `names::TABLE` with as many slots
/// and copies every VIP's table into it.
const OLD_TABLE: &str = "LB_TABLE_V1";

/// An attachment of the program to an interface, as recorded by its link pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub iface: String,
    pub mode: AttachMode,
    /// The interface the link was made on is gone (deleted, perhaps re-created since): the
    /// kernel detached the link; only its pin is left.
    pub gone: bool,
}

/// What `PinDir::upgrade` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Upgrade {
    pub old_program_id: u32,
    pub new_program_id: u32,
    /// Interfaces whose link now runs the new program.
    pub interfaces: Vec<String>,
}

#[derive(Clone, Copy)]
enum Lock {
    Exclusive,
    Shared,
}

/// Takes `kind` of flock on `file`: blocking, or until `deadline`.
fn flock(file: &File, kind: Lock, deadline: Option<std::time::Instant>) -> Result<()> {
    let op = match kind {
        Lock::Exclusive => libc::LOCK_EX,
        Lock::Shared => libc::LOCK_SH,
    };
    let Some(deadline) = deadline else {
        // SAFETY: plain syscall on a valid fd.
        if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        return Ok(());
    };
    loop {
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e.into());
        }
        if std::time::Instant::now() >= deadline {
            bail!("another lb command holds the lock (gave up waiting)");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// An open (and locked) pin directory.
pub struct PinDir {
    path: PathBuf,
    /// Holding the open directory holds the flock.
    lock: Option<File>,
    /// Whether the lock is exclusive: this command may have pinned something.
    exclusive: bool,
}

impl Drop for PinDir {
    /// Before the lock is given up, pins root made go to the directory's owner (the service
    /// user): whatever the command did, also when it failed half-way.
    fn drop(&mut self) {
        self.release();
    }
}

impl PinDir {
    /// Opens the directory, creating it (mode 0700) and mounting bpffs at /sys/fs/bpf if needed,
    /// and takes an exclusive lock that serializes concurrent `lb` commands.
    pub fn open(path: &Path) -> Result<PinDir> {
        Self::open_locked(path, Lock::Exclusive, None)
    }

    /// `open` with a shared lock, for commands that only read: they run side by side, and a
    /// writer waits only while one reads the maps (they print after giving the lock up).
    pub fn open_shared(path: &Path) -> Result<PinDir> {
        Self::open_locked(path, Lock::Shared, None)
    }

    /// `open`, waiting at most `wait` for the lock (the agent, which must never hang on a
    /// command that holds it): an error after that.
    pub fn open_within(path: &Path, wait: std::time::Duration) -> Result<PinDir> {
        Self::open_locked(path, Lock::Exclusive, Some(wait))
    }

    fn open_locked(path: &Path, kind: Lock, wait: Option<std::time::Duration>) -> Result<PinDir> {
        ensure_bpffs(path)?;
        let deadline = wait.map(|w| std::time::Instant::now() + w);
        // Lock the directory. If it was removed (`lb detach --purge`) or replaced while we
        // waited, lock the one that is there now, so commands stay serialized.
        for _ in 0..100 {
            match fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => {
                    bail!(
                        "the pin directory {} is a symbolic link: refused",
                        path.display()
                    )
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let made = fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(path);
                    match made {
                        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                            return Err(ownership::cannot_create(path))
                        }
                        r => {
                            r.with_context(|| format!("creating pin directory {}", path.display()))?
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(ownership::unreachable(path))
                }
                Err(e) => return Err(anyhow!(e).context(format!("reading {}", path.display()))),
            }
            // Never through a symbolic link: the lock and the hand-over (`ownership`) work on
            // this very directory.
            let opened = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(path);
            let lock = match opened {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(ownership::denied(path))
                }
                // (Made a link since: O_NOFOLLOW|O_DIRECTORY says ENOTDIR.)
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    bail!(
                        "the pin directory {} is not a directory: refused",
                        path.display()
                    )
                }
                r => r.with_context(|| format!("opening {}", path.display()))?,
            };
            flock(&lock, kind, deadline).with_context(|| format!("locking {}", path.display()))?;
            let same = fs::metadata(path)
                .ok()
                .zip(lock.metadata().ok())
                .is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev());
            if same {
                return Ok(PinDir {
                    path: path.to_path_buf(),
                    lock: Some(lock),
                    exclusive: matches!(kind, Lock::Exclusive),
                });
            }
        }
        bail!("could not lock {}: it keeps being replaced", path.display())
    }

    /// Gives up the lock (for long-running readers such as `lb stats --watch`, which must not
    /// block other commands).
    pub fn unlock(&mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(locked) = self.lock.take() {
            if self.exclusive && self.path.exists() {
                if let Err(e) = ownership::hand_over(&locked, &self.path) {
                    eprintln!("lb: warning: {e:#}");
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a program and its maps are pinned here.
    pub fn is_loaded(&self) -> bool {
        self.path.join(PROG_PIN).exists() && self.path.join(names::VIPS).exists()
    }

    /// The pinned maps, while an upgrade pins the new ones (the old slot array is still
    /// there).
    fn maps_during_upgrade(&self) -> Result<LbMaps> {
        LbMaps::from_maps(|name| {
            let data = MapData::from_pin(self.path.join(name)).ok()?;
            Map::from_map_data(data).ok()
        })
        .with_context(|| format!("opening the maps pinned in {}", self.path.display()))
    }

    /// The pinned maps; an error that says what to do if there are none.
    pub fn maps(&self) -> Result<LbMaps> {
        if !self.is_loaded() {
            bail!(
                "lb is not loaded: nothing pinned in {} (run `lb attach IFACE`, `lb vip add` or `lb apply` first, or set --pin-dir / {PIN_DIR_ENV})",
                self.path.display()
            );
        }
        // A program pinned by an earlier lb lacks the maps this one added, or still runs on
        // the old slot array: name the remedy.
        if self.path.join(OLD_TABLE).exists() {
            bail!(
                "the program pinned in {} predates this lb (its tables are in {OLD_TABLE}): run `lb upgrade` first",
                self.path.display()
            );
        }
        ownership::require_access(&self.path.join(names::VIPS))?;
        for name in CACHE_MAPS.into_iter().chain([names::TABLE]) {
            if !self.path.join(name).exists() {
                bail!(
                    "the program pinned in {} predates this lb (it has no map {name}): run `lb upgrade` first",
                    self.path.display()
                );
            }
        }
        self.maps_during_upgrade()
    }

    /// The pinned maps, loading the program and pinning it and its maps first if nothing is
    /// pinned yet (the program is not attached anywhere until `attach`).
    pub fn maps_or_load(&self, opts: LoadOptions) -> Result<LbMaps> {
        if !self.is_loaded() {
            self.load(opts)?;
        }
        self.maps()
    }

    fn load(&self, opts: LoadOptions) -> Result<()> {
        let r = self.load_and_pin(opts);
        if r.is_err() {
            // Leave nothing half-pinned behind: a later load would find stale maps.
            self.unload();
        }
        r
    }

    /// Removes the program and map pins (not the links).
    pub fn unload(&self) {
        for name in ALL_MAPS
            .iter()
            .chain(&LEGACY_MAPS)
            .copied()
            .chain(PROG_PINS)
        {
            let _ = fs::remove_file(self.path.join(name));
        }
    }

    fn load_and_pin(&self, opts: LoadOptions) -> Result<()> {
        let mut dp = Dataplane::load_with(opts, |ebpf| {
            for name in ALL_MAPS {
                let map = ebpf
                    .map(name)
                    .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
                map.pin(self.path.join(name))
                    .with_context(|| format!("pinning map {name}"))?;
            }
            Ok(())
        })?;
        dp.tc_program()
            .pin(self.path.join(TC_PROG_PIN))
            .context("pinning the tc program")?;
        dp.generic_program()
            .pin(self.path.join(GENERIC_PROG_PIN))
            .context("pinning the generic-mode program")?;
        dp.program()
            .pin(self.path.join(PROG_PIN))
            .context("pinning the program")?;
        Ok(())
    }

    /// Attaches the pinned program (loading it first if needed) to `iface` and pins the link.
    pub fn attach(&self, iface: &str, mode: AttachMode, opts: LoadOptions) -> Result<AttachMode> {
        let name = CString::new(iface).map_err(|_| anyhow!("invalid interface name {iface:?}"))?;
        // SAFETY: valid C string.
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            bail!("interface {iface} does not exist");
        }
        if let Some(a) = self.attachments()?.into_iter().find(|a| a.iface == iface) {
            if !a.gone {
                bail!(
                    "lb is already attached to {iface} ({} mode)",
                    mode_name(a.mode)
                );
            }
            // The interface was deleted (and made again): its old link is detached already.
            self.detach(iface)?;
        }
        if !self.is_loaded() {
            self.load(opts)?;
        }
        require_ethernet(iface)?;
        let link = match mode {
            AttachMode::Tc => self.attach_tc(iface)?,
            AttachMode::Native | AttachMode::Generic | AttachMode::Auto => {
                let pin = if mode == AttachMode::Generic {
                    self.program_pin_for(GENERIC_PROG_PIN, "generic")?
                } else {
                    self.path.join(PROG_PIN)
                };
                let mut prog = Xdp::from_pin(pin, XdpAttachType::Interface)
                    .context("opening the pinned program")?;
                let (m, used) = if mode == AttachMode::Generic {
                    (XdpMode::Skb, AttachMode::Generic)
                } else {
                    (XdpMode::Driver, AttachMode::Native)
                };
                match prog.attach(iface, m) {
                    Ok(id) => {
                        let link = prog.take_link(id).context("taking the XDP link")?;
                        let link = FdLink::try_from(link)
                            .context("the kernel gave no BPF link to pin")?;
                        (link, used)
                    }
                    // A driver without native XDP: never generic mode on its own (it can corrupt
                    // partial checksums), but the tc program, which is correct everywhere, and
                    // a word about it. (Any other failure — say, another XDP program there — is
                    // an error.)
                    Err(e) if mode == AttachMode::Auto && no_native_xdp(&e) => {
                        let r = self.attach_tc(iface).with_context(|| {
                            format!("{iface}: the driver refused native XDP ({e}), and tc mode failed too")
                        })?;
                        eprintln!(
                            "lb: {iface}: the driver refused native XDP ({e}); attached in tc mode (the same data plane as a tc program, correct on every device, slower)"
                        );
                        r
                    }
                    Err(e) => bail!(
                        "attaching to {iface} in {} mode: {e} (does the interface already have an XDP program? --mode tc works on every interface)",
                        mode_name(used)
                    ),
                }
            }
        };
        let (fd_link, used) = link;
        fd_link
            .pin(
                self.path
                    .join(links::pin_name("link_", iface, mode_name(used))),
            )
            .context("pinning the link")?;
        Ok(used)
    }

    /// Attaches `lb_tc` to `iface`'s ingress (tcx, ahead of other tc programs there).
    fn attach_tc(&self, iface: &str) -> Result<(FdLink, AttachMode)> {
        let pin = self.program_pin_for(TC_PROG_PIN, "tc")?;
        let mut prog = SchedClassifier::from_pin(&pin).context("opening the pinned tc program")?;
        let id = prog
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .with_context(|| format!("attaching to {iface} in tc mode (tcx ingress)"))?;
        let link = prog.take_link(id).context("taking the tc link")?;
        let link = FdLink::try_from(link).context("the kernel gave no BPF link to pin")?;
        Ok((link, AttachMode::Tc))
    }

    /// The path of program pin `name`, for `mode`; an error that says what to do if the
    /// running program predates it.
    fn program_pin_for(&self, name: &str, mode: &str) -> Result<PathBuf> {
        let pin = self.path.join(name);
        if !pin.exists() {
            bail!(
                "the program pinned in {} predates this lb's {mode} mode (no {name}): run `lb upgrade` first",
                self.path.display()
            );
        }
        Ok(pin)
    }

    /// Detaches from `iface` by removing its link pin (the kernel then drops the link).
    pub fn detach(&self, iface: &str) -> Result<()> {
        let a = self
            .attachments()?
            .into_iter()
            .find(|a| a.iface == iface)
            .ok_or_else(|| anyhow!("lb is not attached to {iface}"))?;
        let pin = self
            .path
            .join(links::pin_name("link_", iface, mode_name(a.mode)));
        fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))
    }

    /// Where the program is attached, from the link pins.
    pub fn attachments(&self) -> Result<Vec<Attachment>> {
        self.links_with_prefix("link_")
    }

    fn links_with_prefix(&self, prefix: &str) -> Result<Vec<Attachment>> {
        links_in(&self.path, prefix)
    }

    /// The kernel id of the pinned program.
    pub fn program_id(&self) -> Result<u32> {
        let prog = Xdp::from_pin(self.path.join(PROG_PIN), XdpAttachType::Interface)
            .context("opening the pinned program")?;
        Ok(prog.info().context("program info")?.id())
    }

    /// Replaces the running program with the one in `object` without touching its state: the
    /// new program is loaded against the pinned maps (conntrack, tables, counters carry over),
    /// then every pinned link is switched to it atomically (`BPF_LINK_UPDATE`: no packet sees
    /// no program), and the program pin is replaced. Refused, with nothing changed, if the new
    /// object's maps do not match the pinned ones (a layout change needs a purge or migration).
    pub fn upgrade(&self, object: &[u8]) -> Result<Upgrade> {
        if !self.is_loaded() {
            bail!(
                "lb is not loaded: nothing pinned in {} to upgrade",
                self.path.display()
            );
        }
        crate::privileges::require_for_loading("loading the new program")?;
        let old_id = self.program_id()?;
        let obj = aya_obj::Object::parse(object).context("parsing the new object")?;
        let mut loader = aya::EbpfLoader::new();
        // The old slot array, while the running program uses it: its tables are copied into
        // the new one (made afresh, as large, by every upgrade until one succeeds, so that a
        // failed one leaves nothing stale behind).
        let old_table = if self.path.join(OLD_TABLE).exists() {
            let old = MapData::from_pin(self.path.join(OLD_TABLE))
                .context("opening the old slot array")?;
            let info = old.info().context("old slot array info")?;
            let _ = fs::remove_file(self.path.join(names::TABLE));
            loader.map_max_entries(names::TABLE, info.max_entries());
            Some(old)
        } else {
            None
        };
        for name in ALL_MAPS {
            let Some(new) = obj.maps.get(name) else {
                bail!("the new program has no map {name}: its map layout differs from the running one (upgrading needs `lb detach --purge` and a fresh start)");
            };
            let migrated = name == names::TABLE && old_table.is_some();
            if !self.path.join(name).exists() && (CACHE_MAPS.contains(&name) || migrated) {
                continue;
            }
            if !self.path.join(name).exists() {
                bail!("map {name} is not pinned: the running program predates it (upgrading needs `lb detach --purge` and a fresh start)");
            }
            let pinned = MapData::from_pin(self.path.join(name))
                .with_context(|| format!("opening pinned map {name}"))?;
            let info = pinned.info().with_context(|| format!("map {name} info"))?;
            if (info.key_size(), info.value_size()) != (new.key_size(), new.value_size()) {
                bail!(
                    "map {name} differs: pinned key/value {}/{} bytes, new program {}/{} bytes; refusing to upgrade",
                    info.key_size(),
                    info.value_size(),
                    new.key_size(),
                    new.value_size()
                );
            }
        }
        let fresh: Vec<&str> = ALL_MAPS
            .into_iter()
            .filter(|name| !self.path.join(name).exists())
            .collect();
        for name in ALL_MAPS {
            if !fresh.contains(&name) {
                loader.map_pin_path(name, self.path.join(name));
            }
        }
        let mut ebpf = loader.load(object).context("loading the new object")?;
        // A new cache map is pinned before the program that uses it runs anywhere (so `lb`
        // commands find it); if the upgrade fails later, it stays, empty and unused.
        for name in &fresh {
            ebpf.map(name)
                .with_context(|| format!("map {name} missing from the new object"))?
                .pin(self.path.join(name))
                .with_context(|| format!("pinning the new map {name}"))?;
        }
        // Every upgrade makes the mirror exact before the new program runs: it may be new, or
        // left by a retried upgrade, or written meanwhile by an older lb that does not know it.
        let mut maps = self.maps_during_upgrade()?;
        maps.mirror_vips().context("filling the VIP mirror")?;
        if let Some(old) = old_table {
            let old: aya::maps::Array<MapData, u32> =
                aya::maps::Array::try_from(Map::from_map_data(old)?)?;
            maps.copy_tables_from(&old)
                .context("copying the tables into the new slot array")?;
        }
        drop(maps);
        let prog: &mut Xdp = ebpf
            .program_mut(crate::object::LB_XDP_PROGRAM)
            .context("program lb_xdp missing from the new object")?
            .try_into()?;
        prog.load()
            .context("loading the new lb_xdp into the kernel (verifier)")?;
        let new_id = prog.info().context("program info")?.id();
        // Pinned beside the old one before anything switches, then renamed over it (atomic on
        // bpffs). bpffs names cannot contain dots.
        let tmp = self.path.join(format!("{PROG_PIN}_new"));
        let _ = fs::remove_file(&tmp);
        prog.pin(&tmp).context("pinning the new program")?;
        let tc_tmp = self.path.join(format!("{TC_PROG_PIN}_new"));
        let _ = fs::remove_file(&tc_tmp);
        let generic_tmp = self.path.join(format!("{GENERIC_PROG_PIN}_new"));
        let _ = fs::remove_file(&generic_tmp);
        let r = crate::dataplane::load_tc(&mut ebpf)
            .and_then(|()| {
                self.tc_program_of(&mut ebpf)?
                    .pin(&tc_tmp)
                    .context("pinning the new tc program")
            })
            .and_then(|()| crate::dataplane::load_generic(&mut ebpf))
            .and_then(|()| {
                self.xdp_program_of(&mut ebpf, AttachMode::Generic)?
                    .pin(&generic_tmp)
                    .context("pinning the new generic-mode program")
            });
        // Every tail program is verified now, before any link switches (so the install after
        // the switch cannot fail on the verifier); the program arrays this upgrade made, which
        // no running program uses, are filled now too, so the new programs never find them
        // empty.
        let new_arrays: Vec<&str> = PROG_ARRAYS
            .into_iter()
            .filter(|a| fresh.contains(a))
            .collect();
        let r = r.and_then(|()| {
            crate::dataplane::install_tail_programs(&mut ebpf, Some(&new_arrays))?;
            self.switch_to(&mut ebpf, &new_arrays)
        });
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&tc_tmp);
            let _ = fs::remove_file(&generic_tmp);
        }
        let switched = r?;
        fs::rename(&tmp, self.path.join(PROG_PIN)).context("replacing the program pin")?;
        fs::rename(&tc_tmp, self.path.join(TC_PROG_PIN)).context("replacing the tc program pin")?;
        fs::rename(&generic_tmp, self.path.join(GENERIC_PROG_PIN))
            .context("replacing the generic-mode program pin")?;
        // No program uses them any more.
        for name in LEGACY_MAPS {
            let _ = fs::remove_file(self.path.join(name));
        }
        Ok(Upgrade {
            old_program_id: old_id,
            new_program_id: new_id,
            interfaces: switched,
        })
    }

    /// The new object's XDP program for `mode` (loaded): `lb_xdp_generic` for generic mode,
    /// `lb_xdp` for native.
    fn xdp_program_of<'a>(&self, ebpf: &'a mut aya::Ebpf, mode: AttachMode) -> Result<&'a mut Xdp> {
        let name = if mode == AttachMode::Generic {
            crate::object::LB_XDP_GENERIC_PROGRAM
        } else {
            crate::object::LB_XDP_PROGRAM
        };
        Ok(ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the new object"))?
            .try_into()?)
    }

    /// The new object's `lb_tc` (loaded).
    fn tc_program_of<'a>(&self, ebpf: &'a mut aya::Ebpf) -> Result<&'a mut SchedClassifier> {
        Ok(ebpf
            .program_mut(crate::object::LB_TC_PROGRAM)
            .context("program lb_tc missing from the new object")?
            .try_into()?)
    }

    /// Switches every pinned link to the new object's program of its mode, then their tail-called
    /// programs, all or nothing: links are opened before any switches, and on a failure the
    /// links already switched go back to the pinned (old) programs; the program arrays are
    /// written last, so a rollback never has to restore them. (Between the two steps the new
    /// programs call the old tail programs: the hand-off between them must keep its layout
    /// across versions — a change there needs a new map name, which the map check refuses.)
    fn switch_to(&self, ebpf: &mut aya::Ebpf, filled: &[&str]) -> Result<Vec<String>> {
        let mut links = Vec::new();
        // A gone link (its interface was deleted) has nothing to switch: the kernel refuses to
        // update it. It keeps its pin until `lb attach` or `lb detach`.
        for a in self.attachments()?.into_iter().filter(|a| !a.gone) {
            let pin = self
                .path
                .join(links::pin_name("link_", &a.iface, mode_name(a.mode)));
            let link: FdLink = aya::programs::links::PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening {}", pin.display()))?
                .into();
            links.push((a, pin, link));
        }
        let mut switched: Vec<(Attachment, std::path::PathBuf)> = Vec::new();
        for (a, pin, link) in links {
            let r = if a.mode == AttachMode::Tc {
                let prog = self.tc_program_of(ebpf)?;
                aya::programs::tc::SchedClassifierLink::try_from(link)
                    .with_context(|| format!("{} is not a tc link", pin.display()))
                    .and_then(|link| {
                        let id = prog.attach_to_link(link)?;
                        // The pin keeps the link; our handle on it can go.
                        drop(prog.take_link(id));
                        Ok(())
                    })
            } else {
                let prog = self.xdp_program_of(ebpf, a.mode)?;
                aya::programs::xdp::XdpLink::try_from(link)
                    .with_context(|| format!("{} is not an XDP link", pin.display()))
                    .and_then(|link| {
                        let id = prog.attach_to_link(link)?;
                        drop(prog.take_link(id));
                        Ok(())
                    })
            };
            match r {
                Ok(()) => switched.push((a, pin)),
                Err(e) => {
                    let e = e.context(format!(
                        "switching the link on {} to the new program",
                        a.iface
                    ));
                    let back = self.switch_back(&switched);
                    return Err(match back {
                        Ok(()) => e.context("upgrade undone: every link runs the old program"),
                        Err(b) => e.context(format!(
                            "and switching the links already moved back failed too ({b:#}): run `lb upgrade` again"
                        )),
                    });
                }
            }
        }
        let shared: Vec<&str> = PROG_ARRAYS
            .into_iter()
            .filter(|a| !filled.contains(a))
            .collect();
        if let Err(e) = crate::dataplane::install_tail_programs(ebpf, Some(&shared)) {
            let back = self.switch_back(&switched);
            return Err(match back {
                Ok(()) => e.context("upgrade undone: every link runs the old program"),
                Err(b) => e.context(format!(
                    "and switching the links back failed too ({b:#}): run `lb upgrade` again"
                )),
            });
        }
        Ok(switched.into_iter().map(|(a, _)| a.iface).collect())
    }

    /// Switches links back to the programs pinned under `PROG_PINS`.
    fn switch_back(&self, links: &[(Attachment, std::path::PathBuf)]) -> Result<()> {
        for (a, pin) in links {
            let link: FdLink = aya::programs::links::PinnedLink::from_pin(pin)?.into();
            if a.mode == AttachMode::Tc {
                let mut old = SchedClassifier::from_pin(self.path.join(TC_PROG_PIN))
                    .context("opening the pinned tc program")?;
                let id = old.attach_to_link(link.try_into()?)?;
                drop(old.take_link(id));
            } else {
                // A generic link of an older layout ran `PROG_PIN`'s program, and goes back to
                // it if this layout's generic program was not pinned yet.
                let generic = self.path.join(GENERIC_PROG_PIN);
                let pin = if a.mode == AttachMode::Generic && generic.exists() {
                    generic
                } else {
                    self.path.join(PROG_PIN)
                };
                let mut old = Xdp::from_pin(pin, XdpAttachType::Interface)
                    .context("opening the pinned program")?;
                let id = old.attach_to_link(aya::programs::xdp::XdpLink::try_from(link)?)?;
                drop(old.take_link(id));
            }
        }
        Ok(())
    }

    // ---- the decapsulation program (backends of ipip VIPs) ----

    /// Attaches `lb_decap` to `iface` (loading and pinning it first if needed), accepting what
    /// `config` says (written over what an earlier attach wrote, for every interface).
    pub fn decap_attach(
        &self,
        iface: &str,
        mode: AttachMode,
        config: &crate::decap::DecapConfig,
    ) -> Result<AttachMode> {
        if mode == AttachMode::Tc {
            bail!("lb decap has no tc mode: use --mode native or generic");
        }
        require_ethernet(iface)?;
        let name = CString::new(iface).map_err(|_| anyhow!("invalid interface name {iface:?}"))?;
        // SAFETY: valid C string.
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            bail!("interface {iface} does not exist");
        }
        if let Some(a) = self
            .decap_attachments()?
            .into_iter()
            .find(|a| a.iface == iface)
        {
            if !a.gone {
                bail!(
                    "lb decap is already attached to {iface} ({} mode)",
                    mode_name(a.mode)
                );
            }
            // Its interface was deleted and made again: only the old link's pin is left.
            let pin = self
                .path
                .join(links::pin_name("decap_", iface, mode_name(a.mode)));
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        }
        if self.path.join(DECAP_PROG_PIN).exists() && !self.path.join(names::DECAP_FROM).exists() {
            bail!(
                "the lb_decap pinned in {} predates this lb (it strips any encapsulation from 172.16.0.0/16): run `lb decap detach`, then attach again",
                self.path.display()
            );
        }
        if !self.path.join(DECAP_PROG_PIN).exists() {
            crate::privileges::require_for_loading("loading lb_decap")?;
            let mut ebpf = aya::EbpfLoader::new()
                .load(crate::object::LB_DECAP_OBJECT)
                .context("loading the decap object")?;
            for name in DECAP_MAPS {
                ebpf.map(name)
                    .with_context(|| format!("decap map {name} missing from the object"))?
                    .pin(self.path.join(name))
                    .with_context(|| format!("pinning {name}"))?;
            }
            let prog: &mut Xdp = ebpf
                .program_mut(crate::object::LB_DECAP_PROGRAM)
                .context("program lb_decap missing from the object")?
                .try_into()?;
            let r = prog
                .load()
                .context("loading lb_decap into the kernel (verifier)")
                .and_then(|()| {
                    prog.pin(self.path.join(DECAP_PROG_PIN))
                        .context("pinning lb_decap")
                });
            if let Err(e) = r {
                for name in DECAP_MAPS {
                    let _ = fs::remove_file(self.path.join(name));
                }
                return Err(e);
            }
        }
        self.decap_configure(config)?;
        let mut prog = Xdp::from_pin(self.path.join(DECAP_PROG_PIN), XdpAttachType::Interface)
            .context("opening the pinned decap program")?;
        let (id, used) = match mode {
            AttachMode::Native => (prog.attach(iface, XdpMode::Driver), AttachMode::Native),
            AttachMode::Generic => (prog.attach(iface, XdpMode::Skb), AttachMode::Generic),
            AttachMode::Tc => unreachable!("refused above"),
            AttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => (Ok(id), AttachMode::Native),
                Err(_) => (prog.attach(iface, XdpMode::Skb), AttachMode::Generic),
            },
        };
        let id = id.map_err(|e| {
            anyhow!(
                "attaching lb_decap to {iface} in {} mode: {e} (does the interface already have an XDP program?)",
                mode_name(used)
            )
        })?;
        let link = prog.take_link(id).context("taking the XDP link")?;
        FdLink::try_from(link)
            .context("the kernel gave no BPF link to pin")?
            .pin(
                self.path
                    .join(links::pin_name("decap_", iface, mode_name(used))),
            )
            .context("pinning the decap link")?;
        Ok(used)
    }

    /// Rewrites what the loaded `lb_decap` accepts (`lb decap attach`, `lb decap set`).
    pub fn decap_configure(&self, config: &crate::decap::DecapConfig) -> Result<()> {
        if !self.path.join(DECAP_PROG_PIN).exists() {
            bail!("lb decap is not attached anywhere (lb decap attach IFACE …)");
        }
        if !self.path.join(names::DECAP_FROM).exists() {
            bail!(
                "the lb_decap pinned in {} predates this lb (it strips any encapsulation from 172.16.0.0/16): run `lb decap detach`, then attach again",
                self.path.display()
            );
        }
        config
            .write(|name| {
                Ok(Map::from_map_data(MapData::from_pin(
                    self.path.join(name),
                )?)?)
            })
            .context("writing what lb_decap accepts")
    }

    /// Detaches `lb_decap` from `iface`; the last detach also removes its program and counters.
    pub fn decap_detach(&self, iface: &str) -> Result<()> {
        let a = self
            .decap_attachments()?
            .into_iter()
            .find(|a| a.iface == iface)
            .ok_or_else(|| anyhow!("lb decap is not attached to {iface}"))?;
        let pin = self
            .path
            .join(links::pin_name("decap_", iface, mode_name(a.mode)));
        fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        if self.decap_attachments()?.is_empty() {
            let _ = fs::remove_file(self.path.join(DECAP_PROG_PIN));
            for name in DECAP_MAPS.iter().chain(&[OLD_DECAP_STATS]) {
                let _ = fs::remove_file(self.path.join(name));
            }
        }
        Ok(())
    }

    /// Where `lb_decap` is attached.
    pub fn decap_attachments(&self) -> Result<Vec<Attachment>> {
        self.links_with_prefix("decap_")
    }

    /// The decap counters summed over CPUs (zeros if it is not loaded).
    pub fn decap_counters(&self) -> Result<Vec<u64>> {
        let p = self.path.join(names::DECAP_STATS);
        if !p.exists() {
            return Ok(vec![0; lb_common::DECAP_COUNTER_COUNT as usize]);
        }
        let map = Map::from_map_data(MapData::from_pin(&p)?)?;
        let arr: aya::maps::PerCpuArray<MapData, u64> = map.try_into()?;
        (0..lb_common::DECAP_COUNTER_COUNT)
            .map(|i| Ok(arr.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// Detaches everywhere and removes the program, the maps and the directory: all state. A
    /// directory made for another user (the service user's, made at install) is left empty:
    /// that user could not make it again.
    pub fn purge(self) -> Result<()> {
        for a in self.attachments()? {
            self.detach(&a.iface)?;
        }
        for a in self.decap_attachments()? {
            self.decap_detach(&a.iface)?;
        }
        for name in ALL_MAPS
            .iter()
            .chain(&LEGACY_MAPS)
            .copied()
            .chain(PROG_PINS)
        {
            let p = self.path.join(name);
            if p.exists() {
                fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
        let owner = fs::metadata(&self.path)?.uid();
        // SAFETY: geteuid has no preconditions.
        if owner != unsafe { libc::geteuid() } {
            return Ok(());
        }
        match fs::remove_dir(&self.path) {
            // The service user in a parent only root may write (made at install): it stays.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
            r => r.with_context(|| format!("removing {}", self.path.display())),
        }
    }
}

/// The links of `prefix` (`link_`, `decap_`) pinned in `dir`, with their state.
fn links_in(dir: &Path, prefix: &str) -> Result<Vec<Attachment>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some((iface, mode)) = links::parse_pin_name(prefix, &name) else {
            continue;
        };
        let mode = match mode.as_str() {
            "native" => AttachMode::Native,
            "generic" => AttachMode::Generic,
            "tc" => AttachMode::Tc,
            _ => continue,
        };
        // The link's interface, as the kernel has it: 0 once the interface was deleted
        // (also when one of that name was made since). A pin that cannot be read as a
        // link counts as gone too, so that `lb detach` can remove it — but not one this
        // user may not open: that is not gone, and must not be replaced.
        let pin = dir.join(&name);
        ownership::require_access(&pin)?;
        let gone = links::link_ifindex(&pin).unwrap_or(0) == 0;
        out.push(Attachment { iface, mode, gone });
    }
    out.sort_by(|a, b| a.iface.cmp(&b.iface));
    Ok(out)
}

/// Where lb's XDP program is attached, from the pins in `dir` (read without the lock: a
/// snapshot, for the metrics page).
pub fn attachments_in(dir: &Path) -> Result<Vec<Attachment>> {
    links_in(dir, "link_")
}

/// Whether any XDP link of lb is pinned in `dir` and attached (its interface not gone; read
/// without the lock: a snapshot).
pub fn has_attachments(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("link_")
                && links::link_ifindex(&e.path()).is_ok_and(|i| i != 0)
        })
    })
}

pub fn mode_name(m: AttachMode) -> &'static str {
    match m {
        AttachMode::Native => "native",
        AttachMode::Generic => "generic",
        AttachMode::Tc => "tc",
        AttachMode::Auto => "auto",
    }
}

/// Makes sure `path` is (or will be created) on a BPF filesystem, mounting bpffs at
/// /sys/fs/bpf when that is where it belongs and nothing is mounted there.
fn ensure_bpffs(path: &Path) -> Result<()> {
    let mut existing = path;
    while !existing.exists() {
        existing = existing
            .parent()
            .ok_or_else(|| anyhow!("{} has no existing parent", path.display()))?;
    }
    if fs_type(existing)? == BPF_FS_MAGIC {
        return Ok(());
    }
    let bpf_root = Path::new("/sys/fs/bpf");
    if path.starts_with(bpf_root) && bpf_root.exists() && fs_type(bpf_root)? != BPF_FS_MAGIC {
        return ownership::mount_bpffs();
    }
    bail!(
        "{} is not on a BPF filesystem: choose a pin directory under /sys/fs/bpf, or mount one (mount -t bpf bpf DIR)",
        path.display()
    )
}

fn fs_type(path: &Path) -> Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("path with NUL")?;
    // SAFETY: statfs writes into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        bail!(
            "statfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(st.f_type as i64)
}

/// Whether attaching native XDP failed because the driver has none (`EOPNOTSUPP`), rather than
/// for another reason (a program already there, …).
fn no_native_xdp(e: &aya::programs::ProgramError) -> bool {
    matches!(
        e,
        aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. })
            if io_error.raw_os_error() == Some(libc::EOPNOTSUPP)
    )
}

/// lb's programs parse Ethernet frames: an interface that carries none (tun, WireGuard, IP
/// tunnels) is refused, whatever the mode.
fn require_ethernet(iface: &str) -> Result<()> {
    if links::is_ethernet(iface) == Some(false) {
        bail!("{iface} is not an Ethernet interface: lb's programs parse Ethernet frames");
    }
    Ok(())
}
