//! What lb needs from the kernel to run, checked up front so that a missing privilege is one
//! clear error naming it instead of an `EPERM` from deep inside a load.
//!
//! lb needs no root: the agent runs as a service user (the package's `lb`) with three
//! capabilities, ambient from its unit:
//! - `CAP_BPF` to create maps and load programs;
//! - `CAP_NET_ADMIN` to load networking programs (XDP, tc) — attaching a loaded one needs only
//!   its file descriptor, i.e. access to the pin;
//! - `CAP_PERFMON` for the verifier to accept lb_xdp's pointer arithmetic (without it, it
//!   refuses: "pointer arithmetic with it prohibited for !root").
//!
//! `CAP_SYS_ADMIN` stands in for any of them, as in the kernel. Everything else
//! lb does with its pins — reading and changing maps, detaching, listing — needs only the
//! file permissions of the pin directory (0700, owned by the service user) and its pins (0600).

use anyhow::{bail, Result};
use caps::{CapSet, Capability};

/// The capabilities that loading lb's programs needs, in the order the error names them.
pub const FOR_LOADING: [Capability; 3] = [
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_PERFMON,
];

/// Whether this process may use `cap` for BPF (the kernel's `bpf_token_capable`: any
/// capability, or `CAP_SYS_ADMIN` in its place).
fn effective(cap: Capability) -> bool {
    let has = |c| caps::has_cap(None, CapSet::Effective, c).unwrap_or(false);
    has(cap) || has(Capability::CAP_SYS_ADMIN)
}

/// The capabilities of `needed` this process lacks.
pub fn missing(needed: &[Capability]) -> Vec<Capability> {
    needed.iter().copied().filter(|c| !effective(*c)).collect()
}

/// An error naming what is missing before `what` (e.g. "loading lb's programs"), if anything.
pub fn require(needed: &[Capability], what: &str) -> Result<()> {
    let lacking = missing(needed);
    if lacking.is_empty() {
        return Ok(());
    }
    bail!("{}", message(&lacking, needed, what))
}

/// Loading lb's programs (attach, the first `vip add` or `apply`, `upgrade`, `decap attach`,
/// `lb run`, and the clock probe behind flow ages).
pub fn require_for_loading(what: &str) -> Result<()> {
    require(&FOR_LOADING, what)
}

fn message(lacking: &[Capability], needed: &[Capability], what: &str) -> String {
    let names = |caps: &[Capability]| {
        caps.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{what} needs {} (missing: {}): run lb as root, or as the lb service user with these capabilities (the unit's AmbientCapabilities; setpriv --ambient-caps or capsh for a shell)",
        names(needed),
        names(lacking)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_what_is_missing() {
        let m = message(
            &[Capability::CAP_PERFMON],
            &FOR_LOADING,
            "loading lb's programs",
        );
        assert!(
            m.starts_with(
                "loading lb's programs needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON (missing: CAP_PERFMON)"
            ),
            "{m}"
        );
    }
}
