//! `cargo xtask package`: the Debian package, built with dpkg-deb from a staged tree; `--check`
//! installs it on this machine, checks what a new user would (`lb --version`, `man -w lb`,
//! the completions, the unit, `systemd-analyze security`), and purges it.

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

/// The service user's directories. (`d` on bpffs makes the directory if it is missing; an
/// existing one gets this owner and mode.)
const TMPFILES_TEXT: &str = "\
# lb: the pin directory (program, links, maps) and the runtime directory (BIRD's include
# file, the announcement record), both the service user's.
d /sys/fs/bpf/lb 0700 lb lb -
d /run/lb 0755 lb lb -
";

/// Makes the service user (kept on purge, as Debian does with system users), gives it the
/// configuration to read and BIRD's control socket to use, and its directories.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd lb >/dev/null; then
    adduser --system --group --quiet --home /nonexistent --no-create-home \
      --gecos "lb load balancer" lb
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
    put(TMPFILES, TMPFILES_TEXT.as_bytes(), 0o644)?;
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

/// Installs `deb`, checks it as a new user would, and purges it (also when a check fails).
pub fn check(deb: &Path) -> Result<()> {
    if Path::new("/usr/sbin/lb").exists() || installed()? {
        bail!("lb is installed on this machine already: the check installs and purges its own");
    }
    if Path::new("/sys/fs/bpf/lb").exists() {
        bail!("/sys/fs/bpf/lb exists (a data plane pinned there?): the check makes its own");
    }
    cmd("dpkg", &["-i", deb.to_str().context("path")?])?;
    let r = check_installed();
    let purged = cmd("dpkg", &["--purge", "lb"]);
    r?;
    purged?;
    for rel in [BIN, UNIT, CONFIG, TMPFILES, DOC, "run/lb", "sys/fs/bpf/lb"] {
        ensure!(
            !Path::new("/").join(rel).exists(),
            "/{rel} is still there after the purge"
        );
    }
    ensure!(!installed()?, "dpkg still lists lb after the purge");
    println!("package check: installed, checked and purged");
    Ok(())
}

fn check_installed() -> Result<()> {
    let v = output("lb", &["--version"])?;
    ensure!(
        v == format!("lb {}", env!("CARGO_PKG_VERSION")),
        "lb --version said {v:?}"
    );
    let page = output("man", &["-w", "lb"])?;
    ensure!(page.ends_with("lb.1.gz"), "man -w lb said {page:?}");
    let sub = output("man", &["-w", "lb-vip-add"])?;
    ensure!(
        sub.ends_with("lb-vip-add.1.gz"),
        "man -w lb-vip-add said {sub:?}"
    );
    for (shell, rel) in COMPLETIONS {
        let text = std::fs::read_to_string(Path::new("/").join(rel))
            .with_context(|| format!("the {shell} completions"))?;
        ensure!(
            text.contains("attach"),
            "the {shell} completions lack subcommands"
        );
    }
    // bash completes a subcommand from the installed script.
    let words = output(
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
    let conffiles = output("dpkg-query", &["-W", "-f=${Conffiles}", "lb"])?;
    ensure!(
        conffiles.contains("/etc/lb/lb.toml"),
        "conffiles: {conffiles:?}"
    );
    service_user()?;
    let exposure = output(
        "systemd-analyze",
        &["security", "--offline=true", &format!("/{UNIT}")],
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
/// runtime directory and (where bpffs is mounted) its pin directory.
fn service_user() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let entry = output("getent", &["passwd", "lb"]).context("the service user lb")?;
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
    let owned = |path: &str, mode: u32, owner: (u32, u32)| -> Result<()> {
        let m = std::fs::metadata(path).with_context(|| format!("{path} after install"))?;
        ensure!(
            (m.mode() & 0o7777, m.uid(), m.gid()) == (mode, owner.0, owner.1),
            "{path}: mode {:o}, owner {}:{} (expected {mode:o}, {}:{})",
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            owner.0,
            owner.1
        );
        Ok(())
    };
    owned("/etc/lb/lb.toml", 0o640, (0, gid))?;
    owned("/run/lb", 0o755, (uid, gid))?;
    if is_bpffs("/sys/fs/bpf") {
        owned("/sys/fs/bpf/lb", 0o700, (uid, gid))?;
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

fn installed() -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "lb"])
        .output()
        .context("running dpkg-query")?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("installed"))
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
