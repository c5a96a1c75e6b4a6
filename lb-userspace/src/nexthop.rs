//! The next-hop cache as userspace sees it. The data plane fills it from its own route lookups
//! (ARCHITECTURE.md, "Next hop"), per CPU and backend; this module shows it (`lb nexthop
//! show`) and empties it (`lb nexthop clear`: every backend's next packet is looked up again).

use anyhow::Result;

use crate::state::LbMaps;

/// A backend's cached next hop, as the freshest CPU's entry has it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub vip: String,
    pub backend: String,
    /// Egress interface (None: nothing cached for the backend's current holder).
    pub dev: Option<String>,
    /// Destination MAC: the backend's, or its router's.
    pub mac: Option<String>,
    /// The next hop is the backend itself.
    pub on_link: bool,
    /// Milliseconds since the route lookup that made the entry.
    pub age_ms: Option<u64>,
    /// The longest IP packet the lookups passed the MTU check with.
    pub max_len: Option<u16>,
    /// CPUs that hold an entry for the backend (each looks up on its own).
    pub cpus: usize,
}

/// The name of interface `ifindex`, or its number if it has none (any more).
fn ifname(ifindex: u32) -> String {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return format!("ifindex {ifindex}");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Every backend of every VIP with its cached next hop (the freshest of the CPUs' entries).
pub fn show(maps: &LbMaps) -> Result<Vec<Row>> {
    let now = crate::sweep::now_ns(maps)?;
    let mut rows = Vec::new();
    for (vip, _) in maps.vips()? {
        for b in maps.backends(&vip)? {
            let entries = maps.nexthops(b.id)?;
            let freshest = entries.iter().max_by_key(|nh| nh.checked_ns);
            rows.push(Row {
                vip: vip.to_string(),
                backend: b.addr.to_string(),
                dev: freshest.map(|nh| ifname(nh.ifindex)),
                mac: freshest.map(|nh| mac(&nh.dmac)),
                on_link: freshest.is_some_and(|nh| nh.flags & lb_common::NEXTHOP_F_ONLINK != 0),
                age_ms: freshest.map(|nh| now.saturating_sub(nh.checked_ns) / 1_000_000),
                max_len: freshest.map(|nh| nh.max_len),
                cpus: entries.len(),
            });
        }
    }
    Ok(rows)
}

/// Empties the cache of every backend; returns how many backends there are.
pub fn clear(maps: &mut LbMaps) -> Result<u32> {
    let mut n = 0;
    for (vip, _) in maps.vips()? {
        for b in maps.backends(&vip)? {
            maps.nexthops.clear(b.id)?;
            n += 1;
        }
    }
    Ok(n)
}
