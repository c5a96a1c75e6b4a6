//! When a drained backend (weight 0: no new flows) is finished: no active flow left, no packet
//! for `DRAIN_IDLE`, or the drain timeout reached. Used by the agent for backends removed from
//! the file and by `lb backend del --drain`.

use std::time::{Duration, Instant};

use crate::LbMaps;

/// A drained backend is finished once it has had no packet for this long, even if flows are
/// still counted as active (UDP flows, and TCP flows that ended without a FIN/RST seen).
pub const DRAIN_IDLE: Duration = Duration::from_secs(10);

/// A backend being drained.
#[derive(Clone, Debug)]
pub struct Drain {
    started: Instant,
    timeout: Duration,
    /// Packets forwarded to it when last looked, and when that number last changed.
    packets: u64,
    last_traffic: Instant,
}

impl Drain {
    /// Starts watching backend `id` (already at weight 0).
    pub fn start(maps: &LbMaps, id: u32, timeout: Duration) -> Drain {
        let now = Instant::now();
        Drain {
            started: now,
            timeout,
            packets: maps.backend_stats(id).map(|t| t.packets).unwrap_or(0),
            last_traffic: now,
        }
    }

    /// Whether backend `id` is finished, and why.
    pub fn finished(&mut self, maps: &LbMaps, id: u32) -> Option<&'static str> {
        let now = Instant::now();
        let packets = maps.backend_stats(id).map(|t| t.packets).unwrap_or(0);
        if packets != self.packets {
            self.packets = packets;
            self.last_traffic = now;
        }
        if maps.active_flows(id).is_ok_and(|n| n == 0) {
            Some("no active flows")
        } else if now - self.last_traffic >= DRAIN_IDLE {
            Some("idle")
        } else if now - self.started >= self.timeout {
            Some("drain timeout")
        } else {
            None
        }
    }
}
