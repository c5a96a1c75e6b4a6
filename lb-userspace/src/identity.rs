//! Acting as another user from root: for `lb detach`, which follows what the agent — the
//! service user — recorded in its runtime directory. Root must not write where that record
//! says or run birdc on the socket it names with root's rights, or a compromised service could
//! have root overwrite any file. So that work runs in a child that is that user entirely:
//! its groups from the user database (BIRD's socket is group `bird`'s), its gid, its uid.

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
    /// is not: whose rights work there must be done with. None otherwise.
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
        let uid = m.uid();
        // The user's own group, as its processes have it; the file's for an unnamed uid.
        let gid = user_gid(uid).unwrap_or(m.gid());
        Ok(Some(Identity {
            uid,
            gid,
            groups: groups_of(uid, gid),
        }))
    }

    /// "user lb (uid 105)" or "uid 64350".
    pub fn describe(&self) -> String {
        describe_user(self.uid)
    }

    /// Makes `cmd` run as this user: its groups, gid and uid, set in the child before exec
    /// (a child that cannot set them fails to start).
    pub fn run_as(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let id = self.clone();
        // SAFETY: between fork and exec the closure makes only async-signal-safe system calls,
        // on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(id.groups.len(), id.groups.as_ptr()) != 0
                    || libc::setresgid(id.gid, id.gid, id.gid) != 0
                    || libc::setresuid(id.uid, id.uid, id.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// "user lb (uid 105)", or "uid 64350" for a user without a name.
pub fn describe_user(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("user {name} (uid {uid})"),
        None => format!("uid {uid}"),
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

/// The primary group of `uid` in the user database.
fn user_gid(uid: u32) -> Option<u32> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: as in `user_name`.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: the pointers are valid for the lengths given.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    (rc == 0 && !result.is_null()).then_some(pwd.pw_gid)
}

/// `uid`'s groups: its primary `gid` and those the group database lists it in.
fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let Some(name) = user_name(uid).and_then(|n| CString::new(n).ok()) else {
        return vec![gid];
    };
    let mut groups = vec![0 as libc::gid_t; 64];
    for _ in 0..2 {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: `groups` has room for `n` entries; getgrouplist writes at most that many
        // and says how many there are.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        groups.resize(n.max(1) as usize, 0);
    }
    vec![gid]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root: work for a directory another user owns runs as that user, groups and all.
    #[test]
    fn children_run_as_the_owner() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "run the tests as root");
        let dir = std::env::temp_dir().join(format!("lb-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(64_370), Some(64_371)).unwrap();
        let id = Identity::of_owner(&dir).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        let id = id.expect("not root's");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "id -u; id -g; id -G"]);
        id.run_as(&mut cmd);
        let out = cmd.output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "64370\n64371\n64371\n"
        );
    }
}
