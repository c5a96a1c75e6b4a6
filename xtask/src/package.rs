//! `cargo xtask package`: the Debian package, built with dpkg-deb from a staged tree; `--check`
//! installs it on this machine and on a fresh Debian (debootstrap), checks what a new user
//! would (`lb --version`, `man -w lb`, the completions, the service user and its files, the
//! unit's exposure from `systemd-analyze security`), and purges it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use crate::cmd;

/// Where the package's files go, relative to the staged root.
const BIN: &str = "usr/sbin/lb";
const UNIT: &str = "lib/systemd/system/lb.service";
const CONFIG: &str = "etc/lb/lb.toml";
const TMPFILES: &str = "usr/lib/tmpfiles.d/lb.conf";
const MAN: &str = "usr/share/man/man1";
const DOC: &str = "usr/share/doc/lb";
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "usr/share/bash-completion/completions/lb"),
    ("zsh", "usr/share/zsh/vendor-completions/_lb"),
    ("fish", "usr/share/fish/vendor_completions.d/lb.fish"),
];

/// Makes the service user (kept on purge, as Debian does with system users), gives it the
/// configuration to read and BIRD's control socket to use, and its directories.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd lb >/dev/null; then
    adduser --system --group --quiet --home /nonexistent --no-create-home lb
  elif [ "$(id -u lb)" -ge 1000 ]; then
    echo "lb: the user lb exists and is not a system user; the service runs as it" >&2
  fi
  # The configuration holds the hash seed: root's, readable by the agent. An operator's
  # own choice of owner (not root:root) is kept.
  if [ "$(stat -c %U:%G /etc/lb/lb.toml)" = root:root ]; then
    chgrp lb /etc/lb/lb.toml
    chmod 0640 /etc/lb/lb.toml
  fi
  if getent group bird >/dev/null; then
    adduser --quiet lb bird
  fi
  # From a version whose agent ran as root: its pins and records are root's. Handed over
  # while the directories are still root's (nobody else could have put anything there).
  for d in /sys/fs/bpf/lb /run/lb; do
    if [ -d "$d" ] && [ "$(stat -c %U "$d")" = root ]; then
      chown -R lb:lb "$d"
    fi
  done
  if command -v systemd-tmpfiles >/dev/null; then
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/lb.conf || true
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
  fi
fi
exit 0
"#;

/// Purging removes the runtime directory and an empty pin directory; a data plane still
/// pinned keeps running (`lb detach --purge` first removes it).
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = purge ]; then
  rm -rf /run/lb
  rmdir /sys/fs/bpf/lb 2>/dev/null || true
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
exit 0
"#;

/// Exposure (`systemd-analyze security`) the installed unit may have at most.
const MAX_EXPOSURE: f64 = 3.0;

/// Builds lb (release) and the package; returns the .deb's path.
pub fn build(root: &Path) -> Result<PathBuf> {
    crate::build_release(&["--bin", "lb"])?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = output("dpkg", &["--print-architecture"])?;
    let name = format!("lb_{version}_{arch}");
    let stage = root.join("target/package").join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let put = |rel: &str, bytes: &[u8], mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let p = stage.join(rel);
        std::fs::create_dir_all(p.parent().context("a parent")?)?;
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let lb = root.join("target/release/lb");
    put(
        BIN,
        &std::fs::read(&lb).context("reading target/release/lb")?,
        0o755,
    )?;
    let unit = std::fs::read_to_string(root.join("deploy/lb.service"))?;
    ensure!(
        unit.contains("ExecStart=/usr/sbin/lb "),
        "deploy/lb.service must start /usr/sbin/lb"
    );
    put(UNIT, unit.as_bytes(), 0o644)?;
    let config = std::fs::read(root.join("deploy/lb.toml"))?;
    // It holds the hash seed, a secret: root's, readable by the service (postinst).
    put(CONFIG, &config, 0o640)?;
    put(&format!("{DOC}/examples/lb.toml"), &config, 0o644)?;
    put(
        &format!("{DOC}/examples/grafana-dashboard.json"),
        &std::fs::read(root.join("deploy/grafana-dashboard.json"))?,
        0o644,
    )?;
    put(
        &format!("{DOC}/README.md"),
        &std::fs::read(root.join("README.md"))?,
        0o644,
    )?;
    put(
        &format!("{DOC}/copyright"),
        b"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: lb\n\nFiles: *\nLicense: MIT or Apache-2.0\n",
        0o644,
    )?;
    // The pin directory on the BPF filesystem (systemd mounts it at /sys/fs/bpf at boot) and
    // the runtime directory: the service user's, made at boot and at install.
    put(
        TMPFILES,
        &std::fs::read(root.join("deploy/lb-tmpfiles.conf"))?,
        0o644,
    )?;
    // Man pages and completions, from the clap definitions of the binary just built.
    let man = stage.join(MAN);
    cmd(
        lb.to_str().context("path")?,
        &["manpages", man.to_str().context("path")?],
    )?;
    for entry in std::fs::read_dir(&man)? {
        let p = entry?.path();
        cmd("gzip", &["-9n", p.to_str().context("path")?])?;
    }
    for (shell, rel) in COMPLETIONS {
        let script = Command::new(&lb)
            .args(["completions", shell])
            .output()
            .context("running lb completions")?;
        ensure!(script.status.success(), "lb completions {shell} failed");
        put(rel, &script.stdout, 0o644)?;
    }
    let size_kib = dir_size(&stage)? / 1024;
    let control = format!(
        "Package: lb\nVersion: {version}\nArchitecture: {arch}\nMaintainer: lb developers <lb@localhost>\nInstalled-Size: {size_kib}\nDepends: libc6, adduser\nRecommends: bird2\nSection: net\nPriority: optional\nDescription: XDP layer-4 load balancer\n lb balances TCP and UDP flows to virtual IPs over backends inside the kernel (XDP or tc),\n with Maglev and four other algorithms, NAT, DSR and ipip, an agent with health checks,\n BGP announcements through BIRD and Prometheus metrics.\n"
    );
    put("DEBIAN/control", control.as_bytes(), 0o644)?;
    put("DEBIAN/conffiles", format!("/{CONFIG}\n").as_bytes(), 0o644)?;
    put("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;
    let deb = root.join("target/package").join(format!("{name}.deb"));
    cmd(
        "dpkg-deb",
        &[
            "--root-owner-group",
            "--build",
            stage.to_str().context("path")?,
            deb.to_str().context("path")?,
        ],
    )?;
    println!("built {}", deb.display());
    Ok(deb)
}

/// Where the package is checked: this machine, or a fresh Debian made with debootstrap.
struct Machine {
    root: PathBuf,
}

impl Machine {
    fn host() -> Machine {
        Machine { root: "/".into() }
    }

    fn is_host(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `rel` (no leading slash) on this machine.
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// `program args` as run on this machine: as it is, or through `chroot ROOT`.
    fn argv<'a>(&'a self, program: &'a str, args: &[&'a str]) -> Result<(&'a str, Vec<&'a str>)> {
        if self.is_host() {
            return Ok((program, args.to_vec()));
        }
        let mut all = vec![self.root.to_str().context("path")?, program];
        all.extend(args);
        Ok(("chroot", all))
    }

    /// A command on this machine; its trimmed stdout.
    fn output(&self, program: &str, args: &[&str]) -> Result<String> {
        let (program, args) = self.argv(program, args)?;
        output(program, &args)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let (program, args) = self.argv(program, args)?;
        cmd(program, &args)
    }
}

/// Installs `deb`, checks it as a new user would, and purges it (also when a check fails):
/// on this machine, then on a fresh Debian (`debootstrap --variant=minbase`, in a chroot),
/// which has nothing but what the package and its dependencies bring.
pub fn check(deb: &Path) -> Result<()> {
    if Path::new("/usr/sbin/lb").exists() || installed(&Machine::host())? {
        bail!("lb is installed on this machine already: the check installs and purges its own");
    }
    if Path::new("/sys/fs/bpf/lb").exists() {
        bail!("/sys/fs/bpf/lb exists (a data plane pinned there?): the check makes its own");
    }
    let host = Machine::host();
    if let Err(e) = host.run("dpkg", &["-i", deb.to_str().context("path")?]) {
        // Half-installed: purged, so that the next check can run.
        let _ = host.run("dpkg", &["--purge", "lb"]);
        return Err(e);
    }
    check_and_purge(&host)?;
    println!("package check: installed, checked and purged on this machine");

    let fresh = deb.with_file_name("fresh-debian");
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh)?;
    }
    let r = check_fresh(deb, &fresh);
    let removed = std::fs::remove_dir_all(&fresh);
    r?;
    removed.context("removing the fresh Debian")?;
    println!("package check: installed, checked and purged on a fresh Debian");
    Ok(())
}

/// The fresh machine: Debian of this machine's release, minimal; the package installed with
/// apt (which brings its dependencies, as on a gateway), with man-db and bash-completion,
/// which a fresh minimal system lacks and a user's has.
fn check_fresh(deb: &Path, root: &Path) -> Result<()> {
    let release = std::fs::read_to_string("/etc/os-release")?
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_string))
        .context("no VERSION_CODENAME in /etc/os-release")?;
    let dir = root.to_str().context("path")?;
    eprintln!("+ debootstrap --variant=minbase {release} {dir} (quiet unless it fails)");
    output(
        "debootstrap",
        &[
            "--variant=minbase",
            &release,
            dir,
            "http://deb.debian.org/debian",
        ],
    )?;
    let m = Machine {
        root: root.to_path_buf(),
    };
    std::fs::copy(deb, m.path("tmp/lb.deb"))?;
    m.run("apt-get", &["update", "-q"])?;
    m.run(
        "apt-get",
        &[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "/tmp/lb.deb",
            "man-db",
            "bash-completion",
        ],
    )?;
    check_and_purge(&m)
}

/// Checks the installed package on `m`, purges it, and checks that nothing is left.
fn check_and_purge(m: &Machine) -> Result<()> {
    let r = check_installed(m);
    let purged = m.run("dpkg", &["--purge", "lb"]);
    r?;
    purged?;
    for rel in [BIN, UNIT, CONFIG, TMPFILES, DOC, "run/lb", "sys/fs/bpf/lb"] {
        ensure!(
            !m.path(rel).exists(),
            "{} is still there after the purge",
            m.path(rel).display()
        );
    }
    ensure!(!installed(m)?, "dpkg still lists lb after the purge");
    Ok(())
}

fn check_installed(m: &Machine) -> Result<()> {
    let v = m.output("lb", &["--version"])?;
    ensure!(
        v == format!("lb {}", env!("CARGO_PKG_VERSION")),
        "lb --version said {v:?}"
    );
    let page = m.output("man", &["-w", "lb"])?;
    ensure!(page.ends_with("lb.1.gz"), "man -w lb said {page:?}");
    let sub = m.output("man", &["-w", "lb-vip-add"])?;
    ensure!(
        sub.ends_with("lb-vip-add.1.gz"),
        "man -w lb-vip-add said {sub:?}"
    );
    for (shell, rel) in COMPLETIONS {
        let text = std::fs::read_to_string(m.path(rel))
            .with_context(|| format!("the {shell} completions"))?;
        ensure!(
            text.contains("attach"),
            "the {shell} completions lack subcommands"
        );
    }
    // bash completes a subcommand from the installed script.
    let words = m.output(
        "bash",
        &[
            "-c",
            // (As bash calls it: the command, the word being completed, the one before.)
            "source /usr/share/bash-completion/completions/lb; COMP_WORDS=(lb vi); COMP_CWORD=1; COMP_LINE='lb vi'; COMP_POINT=5; _lb lb vi lb; echo ${COMPREPLY[@]}",
        ],
    )?;
    ensure!(
        words.split_whitespace().any(|w| w == "vip"),
        "bash completed {words:?}"
    );
    let conffiles = m.output("dpkg-query", &["-W", "-f=${Conffiles}", "lb"])?;
    ensure!(
        conffiles.contains("/etc/lb/lb.toml"),
        "conffiles: {conffiles:?}"
    );
    service_user(m)?;
    // (systemd-analyze of this machine reads the unit file: a fresh minimal Debian has no
    // systemd of its own.)
    let unit = m.path(UNIT);
    let exposure = output(
        "systemd-analyze",
        &["security", "--offline=true", unit.to_str().context("path")?],
    )?;
    let level = exposure_level(&exposure)?;
    ensure!(
        level <= MAX_EXPOSURE,
        "the installed unit's exposure is {level}, above {MAX_EXPOSURE}:\n{exposure}"
    );
    println!(
        "package check: lb --version: {v}; man -w lb: {page}; unit exposure {level} (at most {MAX_EXPOSURE})"
    );
    Ok(())
}

/// The service user and what belongs to it: the user, the configuration it may read, its
/// runtime directory (where systemd-tmpfiles is) and, on this machine where bpffs is mounted,
/// its pin directory.
fn service_user(machine: &Machine) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let entry = machine
        .output("getent", &["passwd", "lb"])
        .context("the service user lb")?;
    let fields: Vec<&str> = entry.split(':').collect();
    let uid: u32 = fields.get(2).context("uid")?.parse()?;
    let gid: u32 = fields.get(3).context("gid")?.parse()?;
    ensure!(uid > 0 && uid < 1000, "lb is not a system user: {entry}");
    ensure!(
        fields
            .get(6)
            .is_some_and(|sh| sh.ends_with("nologin") || sh.ends_with("false")),
        "lb has a login shell: {entry}"
    );
    let owned = |rel: &str, mode: u32, owner: (u32, u32)| -> Result<()> {
        let path = machine.path(rel);
        let m = std::fs::metadata(&path)
            .with_context(|| format!("{} after install", path.display()))?;
        ensure!(
            (m.mode() & 0o7777, m.uid(), m.gid()) == (mode, owner.0, owner.1),
            "{}: mode {:o}, owner {}:{} (expected {mode:o}, {}:{})",
            path.display(),
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            owner.0,
            owner.1
        );
        Ok(())
    };
    owned("etc/lb/lb.toml", 0o640, (0, gid))?;
    if machine.path("usr/bin/systemd-tmpfiles").exists() {
        owned("run/lb", 0o755, (uid, gid))?;
        owned("run/lb/bird-vips.conf", 0o644, (uid, gid))?;
    }
    if machine.is_host() && is_bpffs("/sys/fs/bpf") {
        owned("sys/fs/bpf", 0o711, (0, 0))?;
        owned("sys/fs/bpf/lb", 0o700, (uid, gid))?;
        // The service user opens its pin directory: lb says nothing is loaded there (not
        // "permission denied").
        let out = Command::new("setpriv")
            .args([
                "--reuid=lb",
                "--regid=lb",
                "--init-groups",
                "/usr/sbin/lb",
                "vip",
                "list",
            ])
            .output()
            .context("running setpriv")?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("lb is not loaded"),
            "lb vip list as user lb said: {err}"
        );
    }
    Ok(())
}

fn is_bpffs(path: &str) -> bool {
    output("stat", &["-f", "-c", "%T", path]).is_ok_and(|t| t == "bpf_fs")
}

/// The number in "→ Overall exposure level for lb.service: 1.8 OK".
fn exposure_level(report: &str) -> Result<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .context("systemd-analyze printed no overall exposure level")?;
    let number = line
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .context("no number after the colon")?;
    number
        .parse()
        .with_context(|| format!("reading the exposure in {line:?}"))
}

fn installed(m: &Machine) -> Result<bool> {
    // (dpkg-query fails for a package it never saw: not installed.)
    Ok(m.output("dpkg-query", &["-W", "-f=${Status}", "lb"])
        .is_ok_and(|status| status.contains("ok installed")))
}

/// A command's stdout, trimmed; an error if it fails.
fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}
