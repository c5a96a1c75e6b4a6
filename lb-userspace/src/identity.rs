//! Acting as another user from root: for `lb detach`, which follows what the agent — the
//! service user — recorded in its runtime directory. Root must not write where that record
//! says or run birdc on the socket it names with root's rights, or a compromised service could
//! have root overwrite any file. So root reads and writes those files with the owner's file
//! identity (`setfsuid`/`setfsgid`: the kernel also drops root's file capabilities meanwhile)
//! and runs birdc as the owner, with the owner's groups (BIRD's socket is group `bird`'s).

use std::{ffi::CString, os::unix::fs::MetadataExt, path::Path, process::Command};

use anyhow::{Context, Result};

/// A user other than root that this root process acts as.
#[derive(Clone, Debug)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from the group database; just `gid` for an unnamed uid).
    pub groups: Vec<u32>,
}

impl Identity {
    /// The owner of `path` (not followed if a link), when this process is root and the owner
    /// is not: whose rights files there must be used with. None otherwise.
    pub fn of_owner(path: &Path) -> Result<Option<Identity>> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let m = std::fs::symlink_metadata(path)
            .with_context(|| format!("reading {}", path.display()))?;
        if m.uid() == 0 {
            return Ok(None);
        }
        Ok(Some(Identity {
            uid: m.uid(),
            gid: m.gid(),
            groups: groups_of(m.uid(), m.gid()),
        }))
    }

    /// File access as this user until the guard is dropped (this thread only).
    pub fn files(&self) -> FilesAs {
        // SAFETY: plain syscalls; they change this thread's file identity only.
        unsafe {
            libc::setfsgid(self.gid);
            libc::setfsuid(self.uid);
        }
        FilesAs
    }

    /// Makes `cmd` run as this user, with its groups.
    pub fn run_as(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let id = self.clone();
        // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
        // (on memory allocated before the fork).
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                if libc::setgroups(id.groups.len(), id.groups.as_ptr()) != 0
                    || libc::setresgid(id.gid, id.gid, id.gid) != 0
                    || libc::setresuid(id.uid, id.uid, id.uid) != 0
                {
                    return fail();
                }
                Ok(())
            });
        }
    }
}

/// Root's file identity again when dropped.
pub struct FilesAs;

impl Drop for FilesAs {
    fn drop(&mut self) {
        // SAFETY: as in `files`.
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
        }
    }
}

/// The name of `uid` in the user database.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: all-zero is a valid passwd; getpwuid_r writes into it and `buf` only.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: the pointers are valid for the lengths given.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// `uid`'s groups: its primary `gid` and those the group database lists it in.
fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let Some(name) = user_name(uid).and_then(|n| CString::new(n).ok()) else {
        return vec![gid];
    };
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: `groups` has room for `n` entries; getgrouplist writes at most that many.
    let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
    if rc < 0 {
        return vec![gid];
    }
    groups.truncate(n.max(0) as usize);
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root: files written with another user's identity are that user's, and that user's
    /// permissions apply (a root-only directory refuses); root's identity comes back.
    #[test]
    fn files_as_the_owner() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "run the tests as root");
        let base = std::env::temp_dir().join(format!("lb-identity-{}", std::process::id()));
        let theirs = base.join("theirs");
        let roots = base.join("roots");
        std::fs::create_dir_all(&theirs).unwrap();
        std::fs::create_dir_all(&roots).unwrap();
        std::fs::set_permissions(&roots, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        std::os::unix::fs::chown(&theirs, Some(64_370), Some(64_371)).unwrap();
        let id = Identity::of_owner(&theirs).unwrap().expect("not root's");
        let (made, refused) = {
            let _as = id.files();
            let made = std::fs::write(theirs.join("f"), "x").is_ok();
            let refused = std::fs::write(roots.join("f"), "x").is_err();
            (made, refused)
        };
        let back = std::fs::write(roots.join("g"), "x").is_ok();
        let owner = std::fs::metadata(theirs.join("f")).map(|m| (m.uid(), m.gid()));
        std::fs::remove_dir_all(&base).unwrap();
        assert_eq!(
            (made, refused, back, owner.ok()),
            (true, true, true, Some((64_370, 64_371)))
        );
    }
}
