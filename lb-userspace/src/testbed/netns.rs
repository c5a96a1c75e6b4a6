//! Network namespaces: create, configure with `ip -n`, run code inside, delete on drop.

use std::{fs::File, os::fd::AsRawFd, process::Command};

use anyhow::{bail, Context, Result};

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> Result<NetNs> {
        run(&["ip", "netns", "add", name])?;
        let ns = NetNs {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// A command inside the namespace (`ip netns exec`).
    pub fn exec(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        let mut args = vec!["sysctl", "-qw"];
        args.extend_from_slice(settings);
        self.exec(&args)
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> Result<()> {
        let f = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))?;
        // SAFETY: plain syscall on a valid fd.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Quietly: the testbed's cleanup may have removed it already.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `f` on a fresh thread inside `ns` (sockets it creates belong to `ns` for good).
pub fn in_ns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            ns.enter()?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", ns.name))?
    })
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
