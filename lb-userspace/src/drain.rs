//! When a drained backend (weight 0: no new flows) is finished: no active flow left for
//! `DRAIN_GRACE` (TCP), no packet for `DRAIN_IDLE` (UDP, whose flows have no visible end), or
//! the drain timeout reached. Used by the agent for backends removed from the file and by
//! `lb backend del --drain`.

use std::time::{Duration, Instant};

use crate::LbMaps;

/// A UDP backend is finished once it has had no packet for this long.
pub const DRAIN_IDLE: Duration = Duration::from_secs(10);
/// A TCP backend is finished once it has had no active flow for this long (a flow stops counting
/// when FINs have passed both ways or its entry expires; the grace covers the last segments).
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// A backend being drained.
#[derive(Clone, Debug)]
pub struct Drain {
    started: Instant,
    timeout: Duration,
    /// Packets forwarded to it when last looked, and when that number last changed.
    packets: u64,
    last_traffic: Instant,
    /// UDP: finished by idleness; TCP: by the active count.
    udp: bool,
    /// Since when the active count has been zero.
    zero_since: Option<Instant>,
}

impl Drain {
    /// Starts watching backend `id` (already at weight 0).
    pub fn start(maps: &LbMaps, id: u32, timeout: Duration, udp: bool) -> Drain {
        let now = Instant::now();
        Drain {
            started: now,
            timeout,
            packets: maps.counters.backend(id).map(|t| t.packets).unwrap_or(0),
            last_traffic: now,
            udp,
            zero_since: None,
        }
    }

    /// Whether backend `id` is finished, and why.
    pub fn finished(&mut self, maps: &LbMaps, id: u32) -> Option<&'static str> {
        let now = Instant::now();
        let packets = maps.counters.backend(id).map(|t| t.packets).unwrap_or(0);
        if packets != self.packets {
            self.packets = packets;
            self.last_traffic = now;
        }
        let zero = maps.flows.active(id).is_ok_and(|n| n == 0);
        self.zero_since = match (zero, self.zero_since) {
            (true, None) => Some(now),
            (true, since) => since,
            (false, _) => None,
        };
        if !self.udp && self.zero_since.is_some_and(|t| now - t >= DRAIN_GRACE) {
            Some("no active flows")
        } else if self.udp && now - self.last_traffic >= DRAIN_IDLE {
            Some("idle")
        } else if now - self.started >= self.timeout {
            Some("drain timeout")
        } else {
            None
        }
    }
}
