//! The agent as its systemd unit runs it, without systemd (the test machines have none running):
//! the unit's settings are read from `deploy/lb.service` itself, so that what is tested is
//! what ships.
//!
//! - user and capabilities: `setpriv` with an unnamed uid in the role of the package's `lb`,
//!   the unit's ambient capabilities (inheritable and bounding sets alike), and
//!   no-new-privileges;
//! - `UMask=`: set by a shell before it execs;
//! - `SystemCallFilter=` and `RestrictAddressFamilies=`: not enforced here (that takes
//!   systemd's seccomp filter) but checked: the agent runs under `strace -f`, and every system
//!   call it and its children made (birdc included) must be in the filter as
//!   `systemd-analyze syscall-filter` expands it, every socket family in the list.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

/// The unit the package installs.
pub const UNIT_FILE: &str = include_str!("../../../deploy/lb.service");

/// A unit file's `[Service]` settings, in order (a key may repeat).
pub struct Unit {
    settings: Vec<(String, String)>,
}

impl Unit {
    pub fn parse(text: &str) -> Unit {
        let mut section = "";
        let mut settings = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line;
            } else if section == "[Service]" && !line.starts_with('#') {
                if let Some((k, v)) = line.split_once('=') {
                    settings.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
        }
        Unit { settings }
    }

    /// The unit the package installs.
    pub fn shipped() -> Unit {
        Unit::parse(UNIT_FILE)
    }

    /// Every value of `key`, in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of `key`, which must be set once.
    pub fn one(&self, key: &str) -> Result<&str> {
        match self.all(key).as_slice() {
            [v] => Ok(v),
            other => bail!("the unit sets {key} {} times", other.len()),
        }
    }

    /// The words of every `key=` line (lists such as capabilities).
    pub fn words(&self, key: &str) -> Vec<String> {
        self.all(key)
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_string))
            .collect()
    }

    /// A list setting that starts as an allow list (`SystemCallFilter=`,
    /// `RestrictAddressFamilies=`): later lines add to it, `~` lines take away; `expand` turns
    /// an item into what it stands for.
    fn allow_list(
        &self,
        key: &str,
        expand: impl Fn(&str) -> Result<BTreeSet<String>>,
    ) -> Result<BTreeSet<String>> {
        let mut set = BTreeSet::new();
        for (i, line) in self.all(key).into_iter().enumerate() {
            let (deny, items) = match line.strip_prefix('~') {
                Some(rest) => (true, rest),
                None => (false, line),
            };
            ensure!(i > 0 || !deny, "{key}= starts as a deny list");
            for item in items.split_whitespace() {
                for name in expand(item)? {
                    if deny {
                        set.remove(&name);
                    } else {
                        set.insert(name);
                    }
                }
            }
        }
        ensure!(!set.is_empty(), "the unit sets no {key}=");
        Ok(set)
    }

    /// The system calls `SystemCallFilter=` allows, groups expanded by systemd itself.
    pub fn allowed_syscalls(&self) -> Result<BTreeSet<String>> {
        let groups = syscall_groups()?;
        self.allow_list("SystemCallFilter", |item| Ok(expand(item, &groups)))
    }

    /// The socket families `RestrictAddressFamilies=` allows (`AF_INET` …).
    pub fn allowed_families(&self) -> Result<BTreeSet<String>> {
        self.allow_list("RestrictAddressFamilies", |item| {
            Ok(BTreeSet::from([item.to_string()]))
        })
    }

    /// `AmbientCapabilities=`, as setpriv names them (`+bpf,+net_admin`).
    pub fn setpriv_caps(&self) -> Result<String> {
        let caps = self.words("AmbientCapabilities");
        ensure!(!caps.is_empty(), "the unit grants no capabilities");
        Ok(caps
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect::<Vec<_>>()
            .join(","))
    }
}

/// systemd's system-call groups (`systemd-analyze syscall-filter`): name → members, which may
/// be groups themselves.
fn syscall_groups() -> Result<BTreeMap<String, Vec<String>>> {
    let out = Command::new("systemd-analyze")
        .arg("syscall-filter")
        .output()
        .context("running systemd-analyze syscall-filter (Debian's systemd package)")?;
    ensure!(
        out.status.success(),
        "systemd-analyze syscall-filter failed"
    );
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with('@') {
            let name = line.split_whitespace().next().unwrap_or(line).to_string();
            groups.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(g), Some(item)) = (&current, line.split_whitespace().next()) {
            if !item.starts_with('#') && line.starts_with(' ') {
                groups
                    .get_mut(g)
                    .expect("made above")
                    .push(item.to_string());
            }
        }
    }
    ensure!(
        groups.contains_key("@system-service"),
        "systemd-analyze listed no @system-service group"
    );
    Ok(groups)
}

/// The system calls `item` (a call or a group) stands for.
fn expand(item: &str, groups: &BTreeMap<String, Vec<String>>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![item.to_string()];
    let mut seen = BTreeSet::new();
    while let Some(i) = todo.pop() {
        if !seen.insert(i.clone()) {
            continue;
        }
        match groups.get(&i) {
            Some(members) => todo.extend(members.iter().cloned()),
            None => {
                out.insert(i);
            }
        }
    }
    out
}

/// What a traced run did: its system calls and socket families.
#[derive(Debug, Default)]
pub struct Trace {
    pub syscalls: BTreeSet<String>,
    pub families: BTreeSet<String>,
    /// Calls that asked for memory both writable and executable (`MemoryDenyWriteExecute`).
    pub write_exec: Vec<String>,
    /// Calls that asked for a new namespace (`RestrictNamespaces`).
    pub namespaces: Vec<String>,
}

impl Trace {
    /// Reads `strace -f -o` output.
    pub fn parse(text: &str) -> Trace {
        let mut t = Trace::default();
        for line in text.lines() {
            // "1234  openat(AT_FDCWD, …) = 3", "1234  <... read resumed>…", "1234  +++ exited…"
            let rest = line
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start();
            let rest = rest.strip_prefix("<... ").unwrap_or(rest);
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let after = &rest[name.len()..];
            if name.is_empty() || !(after.starts_with('(') || after.starts_with(" resumed")) {
                continue;
            }
            if matches!(name.as_str(), "socket" | "socketpair") && after.starts_with('(') {
                let family: String = after[1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                t.families.insert(family);
            }
            // (systemd's rule: no mapping writable and executable, and no mapping made
            // executable later.)
            let exec = after.contains("PROT_EXEC");
            let refused = match name.as_str() {
                "mmap" => exec && after.contains("PROT_WRITE"),
                "mprotect" | "pkey_mprotect" => exec,
                "shmat" => after.contains("SHM_EXEC"),
                _ => false,
            };
            if refused {
                t.write_exec.push(line.to_string());
            }
            let spawn = matches!(name.as_str(), "clone" | "clone3" | "unshare");
            if (spawn && after.contains("CLONE_NEW")) || name == "setns" {
                t.namespaces.push(line.to_string());
            }
            t.syscalls.insert(name);
        }
        t
    }
}

/// What systemd's `ProtectSystem=strict` (with `ProtectKernelTunables`,
/// `ProtectControlGroups`), `ReadWritePaths=`, `RuntimeDirectory=`, `ProtectHome=yes` and
/// `ProcSubset=pid` + `ProtectProc=invisible` make of the file system, done by root in a new
/// mount namespace before it drops to the service user: its arguments are the writable paths,
/// then `--` and the command.
const FILE_SYSTEM_VIEW: &str = r#"set -e
for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$m" in /proc|/proc/*|/dev|/dev/*) continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
writable=$(awk '$5 !~ "^/(proc|dev)(/|$)" && $6 !~ "(^|,)ro(,|$)" {print $5}' /proc/self/mountinfo)
if [ -n "$writable" ]; then echo "still writable: $writable" >&2; exit 1; fi
while [ "$1" != -- ]; do
  mount --bind "$1" "$1"
  mount -o remount,bind,rw "$1"
  shift
done
shift
for h in /home /root /run/user; do
  if [ -d "$h" ]; then mount -t tmpfs -o ro,mode=0755 tmpfs "$h"; fi
done
mount -t proc -o subset=pid,hidepid=invisible proc /proc
exec "$@"
"#;

/// A run of the agent as the unit would run it.
pub struct ServiceRun {
    pub unit: Unit,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (BIRD's, for its control socket).
    pub groups: Vec<u32>,
    /// The service's own directory (its runtime directory and the trace): the uid's.
    pub dir: PathBuf,
}

impl ServiceRun {
    /// Makes `dir` and its `run/` (the runtime directory) for `uid`.
    pub fn new(unit: Unit, uid: u32, gid: u32, groups: Vec<u32>, dir: &Path) -> Result<Self> {
        for d in [dir.to_path_buf(), dir.join("run")] {
            std::fs::create_dir_all(&d)?;
            std::os::unix::fs::chown(&d, Some(uid), Some(gid))?;
            // (Others may read: BIRD reads the include file in run/.)
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(ServiceRun {
            unit,
            uid,
            gid,
            groups,
            dir: dir.to_path_buf(),
        })
    }

    /// The runtime directory (the unit's `RuntimeDirectory=lb`; `$LB_RUNTIME_DIR` here).
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// (In the runtime directory: the rest is read-only to the traced run.)
    pub fn trace_path(&self) -> PathBuf {
        self.runtime_dir().join("strace.out")
    }

    /// `program args…` in namespace `netns` as the unit runs it, with capabilities `caps`
    /// (setpriv's form; the unit's unless the caller takes some away), traced by strace, in a
    /// mount namespace of its own with the unit's file-system view: everything read-only but
    /// `writable` (the pin directory: the unit's `ReadWritePaths`) and the runtime directory,
    /// home directories empty, /proc with only processes.
    pub fn command(
        &self,
        netns: &str,
        caps: &str,
        writable: &[&Path],
        program: &Path,
        args: &[&str],
    ) -> Result<Command> {
        for (key, value) in [
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("ProcSubset", "pid"),
            ("ProtectProc", "invisible"),
        ] {
            ensure!(
                self.unit.one(key)? == value,
                "the unit's {key} is not the {value} this run emulates"
            );
        }
        let umask = self.unit.one("UMask")?;
        ensure!(
            umask.len() <= 4 && umask.chars().all(|c| c.is_digit(8)),
            "UMask={umask}"
        );
        let groups = if self.groups.is_empty() {
            "--clear-groups".to_string()
        } else {
            format!(
                "--groups={}",
                self.groups
                    .iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{netns}"))
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", FILE_SYSTEM_VIEW, "sh"])
            .args(writable)
            .arg(self.runtime_dir())
            .arg("--")
            .arg("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg(groups)
            .arg(format!("--inh-caps=-all{}", prefixed(caps)))
            .arg(format!("--ambient-caps=-all{}", prefixed(caps)))
            .arg(format!("--bounding-set=-all{}", prefixed(caps)));
        if self.unit.one("NoNewPrivileges")? == "yes" {
            c.arg("--no-new-privs");
        }
        c.args(["sh", "-c", &format!("umask {umask} && exec \"$@\""), "sh"])
            .args(["strace", "-f", "-qq", "-o"])
            .arg(self.trace_path())
            .arg(program)
            .args(args)
            .env("LB_RUNTIME_DIR", self.runtime_dir())
            .env_remove("RUST_LOG");
        for e in self.unit.all("Environment") {
            if let Some((k, v)) = e.split_once('=') {
                if k != "LB_PIN_DIR" {
                    c.env(k, v);
                }
            }
        }
        Ok(c)
    }

    /// What the traced runs did so far.
    pub fn trace(&self) -> Result<Trace> {
        let text = std::fs::read_to_string(self.trace_path())
            .with_context(|| format!("reading {}", self.trace_path().display()))?;
        Ok(Trace::parse(&text))
    }

    /// An error naming every system call and socket family the agent used that the unit's
    /// filters would have refused; the trace otherwise.
    pub fn check_trace(&self) -> Result<Trace> {
        let t = self.trace()?;
        ensure!(
            t.syscalls.contains("bpf"),
            "the trace holds no bpf(2) call: did the agent run? {:?}",
            t.syscalls
        );
        let calls = self.unit.allowed_syscalls()?;
        let refused: Vec<&String> = t.syscalls.difference(&calls).collect();
        ensure!(
            refused.is_empty(),
            "system calls the unit's SystemCallFilter refuses: {refused:?}"
        );
        if self.unit.one("MemoryDenyWriteExecute")? == "yes" {
            ensure!(
                t.write_exec.is_empty(),
                "writable and executable memory, which MemoryDenyWriteExecute refuses: {:?}",
                t.write_exec
            );
        }
        if self.unit.one("RestrictNamespaces")? == "yes" {
            ensure!(
                t.namespaces.is_empty(),
                "new namespaces, which RestrictNamespaces refuses: {:?}",
                t.namespaces
            );
        }
        let families = self.unit.allowed_families()?;
        let refused: Vec<&String> = t.families.difference(&families).collect();
        ensure!(
            refused.is_empty(),
            "socket families the unit's RestrictAddressFamilies refuses: {refused:?}"
        );
        Ok(t)
    }
}

/// The process strace (`pid`) runs and traces: lb, for a signal of its own (a signal to
/// strace detaches it and leaves lb running).
pub fn traced_pid(strace: u32) -> Option<i32> {
    let children =
        std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Kills the process group a service run was started in (strace and lb with it).
pub fn kill_group(leader: u32) {
    // SAFETY: plain syscall; the group is our child's.
    unsafe { libc::kill(-(leader as i32), libc::SIGKILL) };
}

/// ",+bpf,…" from "+bpf,…" (nothing from nothing), for after setpriv's "-all".
fn prefixed(caps: &str) -> String {
    if caps.is_empty() {
        String::new()
    } else {
        format!(",{caps}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_parser_reads_service_settings_only() {
        let u = Unit::parse(
            "[Unit]\nUser=no\n[Service]\nUser=lb\n# User=comment\nSystemCallFilter=@a b\nSystemCallFilter=~c\nAmbientCapabilities=CAP_BPF CAP_NET_ADMIN\n[Install]\nUser=no\n",
        );
        assert_eq!(u.all("User"), ["lb"]);
        assert_eq!(u.setpriv_caps().unwrap(), "+bpf,+net_admin");
        let groups = BTreeMap::from([
            ("@a".to_string(), vec!["@n".to_string(), "c".to_string()]),
            ("@n".to_string(), vec!["d".to_string()]),
        ]);
        let set = u
            .allow_list("SystemCallFilter", |i| Ok(expand(i, &groups)))
            .unwrap();
        assert_eq!(set, BTreeSet::from(["b".into(), "d".into()]));
    }

    #[test]
    fn strace_lines_give_calls_and_families() {
        let t = Trace::parse(
            "12 socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_TCP) = 5\n13 <... bpf resumed>) = 0\n12 +++ exited with 0 +++\n13 --- SIGCHLD {si_signo=SIGCHLD} ---\n14 socketpair(AF_UNIX, SOCK_STREAM, 0, [3, 4]) = 0\n15 mmap(NULL, 4096, PROT_READ|PROT_WRITE|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f\n15 mprotect(0x7f, 4096, PROT_READ) = 0\n16 clone3({flags=CLONE_NEWNET|CLONE_VM, exit_signal=0}, 88) = 17\n",
        );
        assert_eq!((t.write_exec.len(), t.namespaces.len()), (1, 1));
        assert_eq!(
            t.syscalls,
            BTreeSet::from([
                "bpf".into(),
                "clone3".into(),
                "mmap".into(),
                "mprotect".into(),
                "socket".into(),
                "socketpair".into()
            ])
        );
        assert_eq!(
            t.families,
            BTreeSet::from(["AF_INET".into(), "AF_UNIX".into()])
        );
    }
}
