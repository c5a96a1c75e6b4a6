//! Who owns the pin directory and its pins.
//!
//! On a gateway the directory belongs to the service user (the package makes it at install,
//! 0700, owned by `lb`) and so must every pin in it: the kernel makes pins 0600, owned by
//! whoever pinned. A pin that root makes — `lb attach` or `lb upgrade` from a root shell — is
//! therefore handed to the directory's owner before the lock is given up, or the agent could
//! not open it. Errors for a directory lb may not use say whose it is and what to do.

use std::{ffi::CString, fs, os::unix::fs::MetadataExt, path::Path};

use anyhow::{anyhow, Context, Result};

/// Gives every pin in the locked directory `locked` (opened from `path`, not through a link)
/// that the directory's owner does not own to that owner, when this process is root and the
/// directory is not root's (a service user's). Returns the names it changed.
///
/// The directory's owner is not trusted with more than its directory:
/// - only a directory on bpffs whose parent only root may write is handed to (on a bpffs
///   anyone may write, anyone could have made `lb` first and be given the data plane);
/// - names are resolved relative to the locked descriptor, links are never followed, and only
///   regular files with one link are changed (a hard link to another pin on the same bpffs
///   would give that pin away too).
pub fn hand_over(locked: &fs::File, path: &Path) -> Result<Vec<String>> {
    use std::os::fd::AsRawFd;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Vec::new());
    }
    let meta = locked
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if meta.uid() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: all-zero is a valid statfs; fstatfs writes into it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out pointer.
    if unsafe { libc::fstatfs(locked.as_raw_fd(), &mut st) } != 0
        || st.f_type as i64 != super::BPF_FS_MAGIC
    {
        anyhow::bail!("{} is not on a BPF filesystem", path.display());
    }
    // The parent of the locked directory itself (not of the path, which may be relative or
    // renamed since).
    let dotdot = CString::new("..").expect("no NUL");
    // SAFETY: all-zero is a valid stat; fstatat writes into it.
    let mut parent: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, C string and out pointer.
    if unsafe { libc::fstatat(locked.as_raw_fd(), dotdot.as_ptr(), &mut parent, 0) } != 0 {
        anyhow::bail!(
            "reading the parent of {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    let parent_mode = parent.st_mode & 0o7777;
    if parent.st_uid != 0 || parent_mode & 0o022 != 0 {
        let parent = path.parent().unwrap_or(Path::new(".."));
        anyhow::bail!(
            "pins made here stay root's: {} belongs to {}, but its parent {} is writable by others (mode {:04o}), so anyone could have made it — chmod 0711 {} (the package's tmpfiles.d does), or run lb as that user",
            path.display(),
            crate::identity::describe_user(meta.uid()),
            parent.display(),
            parent_mode,
            parent.display()
        );
    }
    let mut changed = Vec::new();
    let mut failed = Vec::new();
    for entry in fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        let name = entry?.file_name();
        let c = CString::new(name.as_encoded_bytes()).context("a name with NUL")?;
        // SAFETY: all-zero is a valid stat; fstatat writes into it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, C string and out pointer.
        let rc = unsafe {
            libc::fstatat(
                locked.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        // (Gone meanwhile, or not in the locked directory: nothing to hand over.)
        if rc != 0
            || st.st_mode & libc::S_IFMT != libc::S_IFREG
            || st.st_nlink != 1
            || (st.st_uid, st.st_gid) == (meta.uid(), meta.gid())
        {
            continue;
        }
        // SAFETY: as above.
        let rc = unsafe {
            libc::fchownat(
                locked.as_raw_fd(),
                c.as_ptr(),
                meta.uid(),
                meta.gid(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        let name = name.to_string_lossy().into_owned();
        if rc != 0 {
            failed.push(format!("{name}: {}", std::io::Error::last_os_error()));
        } else {
            changed.push(name);
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "could not give these pins in {} to its owner: {}",
            path.display(),
            failed.join("; ")
        );
    }
    Ok(changed)
}

/// "user lb (uid 105)", or "uid 105" for a user without a name.
/// The error for a pin directory this process may not open (`EACCES`).
pub fn denied(path: &Path) -> anyhow::Error {
    let owner = fs::metadata(path)
        .map(|m| {
            format!(
                "it belongs to {}, mode {:04o}",
                crate::identity::describe_user(m.uid()),
                m.mode() & 0o7777
            )
        })
        .unwrap_or_else(|_| "it belongs to another user".into());
    anyhow!(
        "permission denied on the pin directory {} ({owner}): run lb as that user or as root",
        path.display()
    )
}

/// An error naming the owner if this process may not read and write the pin `path` (a pin
/// another user made: root's, say, from before lb ran as a service user).
pub fn require_access(path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("a path with NUL")?;
    // SAFETY: valid C string; faccessat only reads it.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::R_OK | libc::W_OK,
            libc::AT_EACCESS,
        )
    };
    if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EACCES) {
        return Ok(());
    }
    let owner = fs::symlink_metadata(path)
        .map(|m| crate::identity::describe_user(m.uid()))
        .unwrap_or_else(|_| "another user".into());
    anyhow::bail!(
        "permission denied on the pin {} (it belongs to {owner}): run lb as that user or as root; after an upgrade from an lb that ran as root, give the pins to the service user (chown -R lb:lb {}; the package does it)",
        path.display(),
        path.parent().unwrap_or(path).display()
    )
}

/// The error for a pin directory behind a parent this process may not search.
pub fn unreachable(path: &Path) -> anyhow::Error {
    anyhow!(
        "cannot reach the pin directory {}: permission denied in a parent. Every parent must be searchable by lb's user: systemd mounts /sys/fs/bpf 0700, and the package's /usr/lib/tmpfiles.d/lb.conf makes it 0711 at boot and install (systemd-tmpfiles --create lb.conf; by hand: chmod 0711 /sys/fs/bpf)",
        path.display()
    )
}

/// The error for a pin directory this process may not create (`EACCES` on its parent).
pub fn cannot_create(path: &Path) -> anyhow::Error {
    anyhow!(
        "cannot create the pin directory {}: permission denied in its parent. The package makes it at boot and install for the service user (systemd-tmpfiles --create lb.conf); by hand, as root: install -d -m 0700 -o lb -g lb {}",
        path.display(),
        path.display()
    )
}

/// Mounts bpffs at /sys/fs/bpf, naming the capability it needs if this process lacks it.
pub fn mount_bpffs() -> Result<()> {
    if !crate::privileges::missing(&[caps::Capability::CAP_SYS_ADMIN]).is_empty() {
        anyhow::bail!(
            "no BPF filesystem is mounted at /sys/fs/bpf, and mounting one needs CAP_SYS_ADMIN, which lb does not have: mount it at boot (systemd does; or the fstab line `bpf /sys/fs/bpf bpf mode=0711 0 0`), or run lb once as root"
        );
    }
    let src = CString::new("bpf").expect("no NUL");
    let dst = CString::new("/sys/fs/bpf").expect("no NUL");
    // Root's, searchable by a service user, writable by nobody else (bpffs's default is 1777).
    let options = CString::new("mode=0711").expect("no NUL");
    // SAFETY: valid C strings; mounting bpffs has no other preconditions.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "no BPF filesystem at /sys/fs/bpf and mounting one failed: {}",
            std::io::Error::last_os_error()
        );
    }
    eprintln!("lb: mounted a BPF filesystem at /sys/fs/bpf");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A bpffs instance of the test's own, unmounted and removed however the test ends.
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.0.join("fs"))
                .status();
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sh(args: &[&str]) {
        let ok = Command::new(args[0]).args(&args[1..]).status().unwrap();
        assert!(ok.success(), "{args:?}");
    }

    /// As root, on a bpffs whose root only root may write: a pin root made goes to the
    /// directory's owner; a symbolic link planted there and what it points to, a hard link to
    /// a pin elsewhere, and a subdirectory stay as they are. On a bpffs anyone may write,
    /// nothing is handed over.
    #[test]
    fn root_hands_over_pins_and_nothing_else() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "run the tests as root");
        let base =
            Scratch(std::env::temp_dir().join(format!("lb-handover-{}", std::process::id())));
        let bpffs = base.0.join("fs");
        fs::create_dir_all(&bpffs).unwrap();
        let at = |p: &Path| p.to_str().unwrap().to_string();
        sh(&["mount", "-t", "bpf", "-o", "mode=0711", "bpf", &at(&bpffs)]);
        let dir = bpffs.join("pins");
        let other = bpffs.join("other");
        fs::create_dir(&dir).unwrap();
        fs::create_dir(&other).unwrap();
        let outside = base.0.join("outside");
        fs::write(&outside, "root's").unwrap();
        let map = |p: &Path| {
            sh(&[
                "bpftool",
                "map",
                "create",
                &at(p),
                "type",
                "array",
                "key",
                "4",
                "value",
                "4",
                "entries",
                "1",
                "name",
                "lb_handover",
            ])
        };
        map(&dir.join("pin"));
        map(&other.join("shared"));
        fs::hard_link(other.join("shared"), dir.join("hard")).unwrap();
        fs::create_dir(dir.join("sub")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        let (uid, gid) = (64_360, 64_361);
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        let locked = fs::File::open(&dir).unwrap();
        let changed = hand_over(&locked, &dir).unwrap();
        let owner = |p: &Path| {
            let m = fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(
            (
                changed,
                owner(&dir.join("pin")),
                owner(&dir.join("hard")),
                owner(&dir.join("sub")),
                owner(&dir.join("link")),
                owner(&outside),
            ),
            (
                vec!["pin".to_string()],
                (uid, gid),
                (0, 0),
                (0, 0),
                (0, 0),
                (0, 0)
            )
        );

        // A bpffs anyone may write: a directory there may be anyone's.
        map(&dir.join("pin2"));
        fs::set_permissions(&bpffs, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
        let e = hand_over(&locked, &dir).unwrap_err();
        assert!(format!("{e}").contains("writable by others"), "{e}");
        assert_eq!(owner(&dir.join("pin2")), (0, 0));
    }
}
