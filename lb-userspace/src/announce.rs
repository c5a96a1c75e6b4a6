//! VIP announcement through BIRD 2: the agent writes the VIPs this node can serve as static
//! routes into a file the operator's `bird.conf` includes, and asks BIRD to reload (`birdc
//! configure`). BIRD exports them over BGP; the upstream router spreads flows over every
//! gateway announcing a VIP (ECMP). A VIP is announced while this gateway can forward it: the
//! data plane attached, and a backend in service — or, failing open (the default), any backend
//! with a weight. `when_all_down = "withdraw"` also withdraws a VIP whose backends are all down
//! (anycast over sites); `"drop"` does too (it no longer forwards). An agent that stops keeps
//! the routes (the data plane keeps forwarding; a restart must not flap them) unless run with
//! `--withdraw-on-exit`; `lb detach` withdraws (`withdraw_recorded`).
//!
//! The file (for `include "/run/lb/bird-vips.conf";` at the top level of bird.conf):
//!
//! ```text
//! protocol static lb_vips4 { ipv4; route 10.100.0.100/32 blackhole; }
//! protocol static lb_vips6 { ipv6; route fd10::100/128 blackhole; }
//! ```
//!
//! Export them to BGP only (`export where proto ~ "lb_vips*";`), not to the kernel.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::LbMaps;

/// Where the announcements go.
#[derive(Clone, Debug)]
pub struct Bird {
    /// The file bird.conf includes.
    pub include: PathBuf,
    /// BIRD's control socket (`birdc -s`).
    pub socket: PathBuf,
    /// What was last written and loaded (None: nothing yet).
    announced: Option<BTreeSet<IpAddr>>,
}

impl Bird {
    pub fn new(include: PathBuf, socket: PathBuf) -> Bird {
        Bird {
            include,
            socket,
            announced: None,
        }
    }

    /// The VIP addresses announced now.
    pub fn announced(&self) -> Vec<IpAddr> {
        self.announced
            .as_ref()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Announces exactly `vips` (writes the file and reloads BIRD if that changes anything).
    /// Returns whether it changed. The file is compared too: something else (`lb detach`)
    /// may have rewritten it. A new agent always reloads BIRD once (an earlier one may have
    /// died between writing the file and `birdc configure`); BIRD reconfigures an unchanged
    /// static protocol without touching its routes, so a restart withdraws nothing.
    pub fn announce(&mut self, vips: &BTreeSet<IpAddr>) -> Result<bool> {
        let text = render(vips);
        let file_says = std::fs::read_to_string(&self.include).is_ok_and(|t| t == text);
        if self.announced.as_ref() == Some(vips) && file_says {
            return Ok(false);
        }
        if !file_says {
            write_atomically(&self.include, &text, 0o644)?;
        }
        let mut cmd = Command::new("birdc");
        cmd.arg("-s").arg(&self.socket).arg("configure");
        let out =
            output_within(cmd, BIRDC_TIMEOUT).context("running birdc (is bird2 installed?)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains("Reconfigur") {
            bail!(
                "birdc configure: {}{}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.announced = Some(vips.clone());
        Ok(true)
    }
}

/// The longest `birdc configure` may take: the agent's loop waits for it.
pub const BIRDC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `cmd` to its end, its output collected, or kills it after `timeout` (an error). Its
/// output must fit a pipe (birdc's few lines do): it is read once the command has ended.
pub fn output_within(
    mut cmd: Command,
    timeout: std::time::Duration,
) -> Result<std::process::Output> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("gave up after {} s", timeout.as_secs_f64());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The VIP addresses this node can serve: the data plane is attached somewhere, and some VIP
/// on the address forwards new flows — a backend with a weight that is not down, or, failing
/// open (every weighted backend down, `when_all_down = "fail-open"`), any backend with a
/// weight. A failure every gateway shares (a common dependency, an ACL that drops the probes)
/// then leaves the VIP announced and served. `"withdraw"` and `"drop"` VIPs whose backends
/// are all down are not announced.
pub fn servable(maps: &LbMaps, attached: bool) -> Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    if !attached {
        return Ok(out);
    }
    let backends = maps.backends_by_vip()?;
    for (vip, info) in maps.vips()? {
        let bs = backends.get(&info.vip_id).map(Vec::as_slice).unwrap_or(&[]);
        let up = bs.iter().any(|b| b.weight > 0 && b.healthy);
        let weighted = bs.iter().any(|b| b.weight > 0);
        let withdraw = info.flags
            & (lb_common::VIP_F_DROP_WHEN_ALL_DOWN | lb_common::VIP_F_WITHDRAW_WHEN_ALL_DOWN)
            != 0;
        if up || (weighted && !withdraw) {
            out.insert(vip.addr.ip());
        }
    }
    Ok(out)
}

/// Where an agent records its BIRD settings for the pin directory `pin_dir`, so that `lb
/// detach` can withdraw its VIPs when no agent runs (bpffs holds no plain files).
pub fn record_path(pin_dir: &Path) -> PathBuf {
    let name: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    runtime_dir().join("announce").join(name)
}

/// lb's runtime directory: /run/lb (the unit's `RuntimeDirectory=lb`), or `$LB_RUNTIME_DIR` —
/// the same place for the agent and for `lb detach` (test beds give each run its own).
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("LB_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/lb"))
}

/// What `withdraw-recorded` prints when it withdrew.
pub const WITHDREW: &str = "withdrew";

/// Runs `lb withdraw-recorded PIN_DIR [--forget]` as `owner`: this very binary in a child
/// that is that user entirely (groups, gid, uid), bounded in time.
fn as_owner(owner: &crate::identity::Identity, pin_dir: &Path, forget: bool) -> Result<String> {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("withdraw-recorded")
        .arg(pin_dir)
        .env("LB_RUNTIME_DIR", runtime_dir());
    if forget {
        cmd.arg("--forget");
    }
    owner.run_as(&mut cmd);
    let out = output_within(cmd, BIRDC_TIMEOUT * 2)
        .with_context(|| format!("running lb as {}", owner.describe()))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Removes the record for `pin_dir` (`lb detach --purge`): as its owner when that is not us.
pub fn forget_record(pin_dir: &Path) -> Result<()> {
    match crate::identity::Identity::of_owner(&runtime_dir()) {
        Ok(Some(owner)) => as_owner(&owner, pin_dir, true).map(|_| ()),
        Ok(None) => forget_record_here(pin_dir),
        Err(_) => Ok(()), // no runtime directory: nothing recorded
    }
}

/// `forget_record` in this process.
pub fn forget_record_here(pin_dir: &Path) -> Result<()> {
    match std::fs::remove_file(record_path(pin_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Records `bird`'s settings for `pin_dir` (`record_path`). Not by root in another user's
/// runtime directory (a root-run agent on a gateway made for the service user): root would
/// write through whatever that user put there.
pub fn record(pin_dir: &Path, bird: &Bird) -> Result<()> {
    if let Ok(Some(owner)) = crate::identity::Identity::of_owner(&runtime_dir()) {
        bail!(
            "not recording the BIRD settings in {}, which belongs to {}, as root: `lb detach` will not withdraw this agent's VIPs (run the agent as that user, or set LB_RUNTIME_DIR to a directory of root's)",
            runtime_dir().display(),
            owner.describe()
        );
    }
    let text = format!("{}\n{}\n", bird.include.display(), bird.socket.display());
    write_atomically(&record_path(pin_dir), &text, 0o600)
}

/// Withdraws every VIP announced for `pin_dir` by an agent that recorded its BIRD settings
/// (`record`). Ok(false): nothing recorded.
///
/// The record is the agent's: when root runs this and the runtime directory is another user's
/// (the service user's), the record is read, the include file written and birdc run by a
/// child that is that user (`as_owner`), never with root's rights.
pub fn withdraw_recorded(pin_dir: &Path) -> Result<bool> {
    match crate::identity::Identity::of_owner(&runtime_dir()) {
        Ok(Some(owner)) => Ok(as_owner(&owner, pin_dir, false)? == WITHDREW),
        Ok(None) => withdraw_recorded_here(pin_dir),
        Err(_) => Ok(false), // no runtime directory: nothing recorded
    }
}

/// `withdraw_recorded` in this process. The record is read as a regular file only, never
/// through a link, at most 64 KiB.
pub fn withdraw_recorded_here(pin_dir: &Path) -> Result<bool> {
    use std::io::Read;
    let path = record_path(pin_dir);
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path);
    let file = match opened {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        r => r.with_context(|| format!("opening {}", path.display()))?,
    };
    if !file.metadata()?.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let mut text = String::new();
    file.take(64 * 1024)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let (Some(include), Some(socket)) = (lines.next(), lines.next()) else {
        bail!(
            "{} is not an announcement record",
            record_path(pin_dir).display()
        );
    };
    Bird::new(include.into(), socket.into()).announce(&BTreeSet::new())?;
    Ok(true)
}

/// The include file for `vips`.
pub fn render(vips: &BTreeSet<IpAddr>) -> String {
    let mut out = String::from("# Written by `lb run`: the VIPs this node announces.\n");
    for (name, v4) in [("lb_vips4", true), ("lb_vips6", false)] {
        out.push_str(&format!(
            "protocol static {name} {{\n  {};\n",
            if v4 { "ipv4" } else { "ipv6" }
        ));
        for ip in vips.iter().filter(|ip| ip.is_ipv4() == v4) {
            let len = if v4 { 32 } else { 128 };
            out.push_str(&format!("  route {ip}/{len} blackhole;\n"));
        }
        out.push_str("}\n");
    }
    out
}

/// Writes `text` to `path` by renaming a new file of `mode` over it (whatever the umask: the
/// include file is read by BIRD, which runs as another user).
fn write_atomically(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // (Per process: the agent and `lb detach` may write the same file.) A new file, never
    // through a link; a stale one of a process gone with this pid is removed first.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    // The mode whatever the umask (fchmod on the open file).
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_families() {
        let vips: BTreeSet<IpAddr> = ["10.100.0.100", "fd10::100", "10.100.0.101"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let r = render(&vips);
        assert!(r.contains("protocol static lb_vips4 {\n  ipv4;\n  route 10.100.0.100/32 blackhole;\n  route 10.100.0.101/32 blackhole;\n}"));
        assert!(
            r.contains("protocol static lb_vips6 {\n  ipv6;\n  route fd10::100/128 blackhole;\n}")
        );
        let empty = render(&BTreeSet::new());
        assert!(empty.contains("protocol static lb_vips4 {\n  ipv4;\n}"));
    }
}
