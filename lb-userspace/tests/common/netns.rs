//! Network namespaces that tests create, enter and always delete.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a unique name, deleted (with every interface in it) on drop,
/// also when the test panics.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `lbt-<pid>-<n>-<tag>`.
    pub fn new(tag: &str) -> NetNs {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("lbt-{}-{n}-{tag}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n <ns> ARGS`, panicking with the command's output if it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// Enables IPv4 and IPv6 forwarding inside the namespace.
    pub fn enable_forwarding(&self) {
        self.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
    }

    /// Moves the calling thread into the namespace (for BPF_PROG_TEST_RUN, whose route lookups
    /// use the caller's namespace). Only this thread moves.
    pub fn enter(&self) {
        let f = File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        // SAFETY: plain syscall on a valid fd.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// The interface index of `iface` inside the namespace.
    pub fn ifindex(&self, iface: &str) -> u32 {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", iface])
            .output()
            .expect("ip link show");
        let s = String::from_utf8_lossy(&out.stdout);
        s.split(':')
            .next()
            .unwrap()
            .trim()
            .parse()
            .expect("ifindex")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
