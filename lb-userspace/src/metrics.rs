//! Prometheus metrics of the agent (`lb run --metrics ADDR`, path `/metrics`): read from the
//! maps at every scrape (the kernel counters are the truth; nothing is cached), plus the
//! agent's own health-check, reload and table-rebuild counters. The format is OpenMetrics text
//! (what the prometheus-client crate writes), which Prometheus scrapes natively.

use std::net::SocketAddr;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{agent::Shared, CtTable, LbMaps};
use lb_common::{COUNTER_NAMES, CT_STATE_NAMES, VERDICT_COUNT};

type Labels = Vec<(String, String)>;

/// Families registered on a fresh registry per scrape.
struct Families {
    reg: Registry,
}

impl Families {
    fn counter(&mut self, name: &str, help: &str) -> Family<Labels, Counter> {
        let f = Family::<Labels, Counter>::default();
        self.reg.register(name, help, f.clone());
        f
    }

    fn plain_counter(&mut self, name: &str, help: &str, v: u64) {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        self.reg.register(name, help, c);
    }

    fn plain_gauge(&mut self, name: &str, help: &str, v: i64) {
        let g = Gauge::<i64>::default();
        g.set(v);
        self.reg.register(name, help, g);
    }

    fn gauge(&mut self, name: &str, help: &str) -> Family<Labels, Gauge> {
        let f = Family::<Labels, Gauge>::default();
        self.reg.register(name, help, f.clone());
        f
    }
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// The metrics page, in the Prometheus text format.
/// What the page needs of the agent's state, copied under the agent's lock (`Shared::snapshot`):
/// the page is then rendered from the maps without it, so a scrape never holds up the agent.
pub struct Snapshot {
    /// Health-check results (ok, failed) per (VIP, backend).
    pub checks: std::collections::HashMap<crate::agent::Key, (u64, u64)>,
    pub draining: std::collections::HashSet<crate::agent::Key>,
    pub counters: crate::agent::Counters,
    pub digests: std::collections::HashMap<crate::Vip, String>,
    pub announced: Vec<std::net::IpAddr>,
    pub sweep_last: Option<crate::sweep::SweepReport>,
    pub sweep_totals: crate::sweep::SweepTotals,
    pub pin_dir: std::path::PathBuf,
}

/// The page: the maps' counters and state, and the agent's (`shared`). One pass over the
/// backends in use, one read per VIP and per backend for their counters.
pub fn render(maps: &LbMaps, shared: &Snapshot) -> anyhow::Result<String> {
    let mut f = Families {
        reg: Registry::default(),
    };
    // Global counters: verdicts (one per packet) and events.
    let verdicts = f.counter(
        "lb_packets",
        "Packets seen by the XDP program, by verdict (exactly one per packet).",
    );
    let events = f.counter(
        "lb_events",
        "Data-plane events (conntrack, reverse NAT, …).",
    );
    for (i, v) in maps.counters()?.iter().enumerate() {
        let fam = if (i as u32) < VERDICT_COUNT {
            &verdicts
        } else {
            &events
        };
        let key = if (i as u32) < VERDICT_COUNT {
            "verdict"
        } else {
            "event"
        };
        fam.get_or_create(&labels(&[(key, COUNTER_NAMES[i].to_string())]))
            .inc_by(*v);
    }

    let vip_packets = f.counter("lb_vip_packets", "Client packets forwarded for a VIP.");
    let vip_bytes = f.counter(
        "lb_vip_bytes",
        "Bytes of client packets forwarded for a VIP.",
    );
    let vip_new = f.counter(
        "lb_vip_new_flows",
        "New flows of a VIP (selection table used).",
    );
    let vip_rev = f.counter(
        "lb_vip_reply_packets",
        "Backend replies rewritten back to the VIP.",
    );
    let be_packets = f.counter(
        "lb_backend_packets",
        "Client packets forwarded to a backend.",
    );
    let be_bytes = f.counter("lb_backend_bytes", "Bytes forwarded to a backend.");
    let be_new = f.counter("lb_backend_new_flows", "New flows given to a backend.");
    let be_rev = f.counter(
        "lb_backend_reply_packets",
        "Replies of a backend rewritten.",
    );
    let be_active = f.gauge(
        "lb_backend_active_flows",
        "Confirmed flows of a backend that have not closed, expired or been evicted.",
    );
    let be_up = f.gauge(
        "lb_backend_up",
        "1 if the backend is healthy (or not checked), 0 if health checks took it out.",
    );
    let be_weight = f.gauge("lb_backend_weight", "Configured weight (0 = drained).");
    let be_draining = f.gauge(
        "lb_backend_draining",
        "1 while a backend removed from the configuration drains.",
    );
    let checks = f.counter("lb_health_checks", "Health-check probes, by result.");
    let mut backends = maps.backends_by_vip()?;
    for (vip, info) in maps.vips()? {
        let vl = labels(&[("vip", vip.to_string())]);
        let s = maps.vip_stats(info.vip_id)?;
        vip_packets.get_or_create(&vl).inc_by(s.packets);
        vip_bytes.get_or_create(&vl).inc_by(s.bytes);
        vip_new.get_or_create(&vl).inc_by(s.new_flows);
        vip_rev.get_or_create(&vl).inc_by(s.rev_packets);
        for b in backends.remove(&info.vip_id).unwrap_or_default() {
            let bl = labels(&[("vip", vip.to_string()), ("backend", b.addr.to_string())]);
            let s = maps.backend_stats(b.id)?;
            be_packets.get_or_create(&bl).inc_by(s.packets);
            be_bytes.get_or_create(&bl).inc_by(s.bytes);
            be_new.get_or_create(&bl).inc_by(s.new_flows);
            be_rev.get_or_create(&bl).inc_by(s.rev_packets);
            be_active
                .get_or_create(&bl)
                .set(maps.active_flows(b.id)? as i64);
            be_up.get_or_create(&bl).set(b.healthy as i64);
            be_weight.get_or_create(&bl).set(b.weight as i64);
            be_draining
                .get_or_create(&bl)
                .set(shared.draining.contains(&(vip, b.addr)) as i64);
            if let Some((checks_ok, checks_failed)) = shared.checks.get(&(vip, b.addr)) {
                let mut ok = bl.clone();
                ok.push(("result".into(), "ok".into()));
                checks.get_or_create(&ok).inc_by(*checks_ok);
                let mut failed = bl.clone();
                failed.push(("result".into(), "failed".into()));
                checks.get_or_create(&failed).inc_by(*checks_failed);
            }
        }
    }

    conntrack(&mut f, maps, shared)?;

    let digest = f.gauge(
        "lb_vip_table_info",
        "A VIP's selection digest (lb table --digest): equal on gateways with the same configuration.",
    );
    for (vip, d) in &shared.digests {
        digest
            .get_or_create(&labels(&[("vip", vip.to_string()), ("digest", d.clone())]))
            .set(1);
    }
    let announced = f.gauge(
        "lb_vip_announced",
        "1 for each VIP address this node announces through BIRD.",
    );
    for ip in &shared.announced {
        announced
            .get_or_create(&labels(&[("address", ip.to_string())]))
            .set(1);
    }
    let c = &shared.counters;
    f.plain_counter(
        "lb_table_rebuilds",
        "Selection-table updates made by the agent (config changes, health transitions, drains).",
        c.table_rebuilds,
    );
    f.plain_counter(
        "lb_table_slots_written",
        "Table slots the agent rewrote.",
        c.slots_written,
    );
    let reloads = f.counter("lb_config_reloads", "Configuration reloads, by result.");
    reloads
        .get_or_create(&labels(&[("result", "ok".into())]))
        .inc_by(c.reloads_ok);
    reloads
        .get_or_create(&labels(&[("result", "error".into())]))
        .inc_by(c.reloads_failed);
    f.plain_gauge(
        "lb_config_last_reload_ok",
        "1 if the last configuration read was valid and applied.",
        c.last_reload_ok as i64,
    );
    f.plain_counter(
        "lb_backends_drained",
        "Backends removed after draining (no active flows, idle, or the drain timeout).",
        c.drained,
    );

    let links = f.gauge(
        "lb_attached",
        "lb's XDP links, by interface and mode: 1 attached, 0 gone (the interface was deleted).",
    );
    for a in crate::pin::attachments_in(&shared.pin_dir).unwrap_or_default() {
        links
            .get_or_create(&labels(&[
                ("iface", a.iface.clone()),
                ("mode", crate::pin::mode_name(a.mode).into()),
            ]))
            .set(!a.gone as i64);
    }

    let mut out = String::new();
    encode(&mut out, &f.reg)?;
    Ok(out)
}

/// The conntrack tables: entries by table and state as the agent's last complete sweep pass
/// found them, capacities, and what the sweeps removed and settled.
fn conntrack(f: &mut Families, maps: &LbMaps, shared: &Snapshot) -> anyhow::Result<()> {
    let capacity = f.gauge(
        "lb_conntrack_capacity",
        "Entries a conntrack table holds (confirmed flows; unconfirmed: handshake not completed or no reply yet).",
    );
    for t in CtTable::ALL {
        capacity
            .get_or_create(&labels(&[("table", t.name().into())]))
            .set(maps.ct_capacity(t)? as i64);
    }
    let entries = f.gauge(
        "lb_conntrack_entries",
        "Conntrack entries by table and state, at the end of the agent's last complete sweep.",
    );
    if let Some(r) = &shared.sweep_last {
        for t in CtTable::ALL {
            for (state, name) in CT_STATE_NAMES.iter().enumerate().skip(1) {
                entries
                    .get_or_create(&labels(&[
                        ("table", t.name().into()),
                        ("state", name.to_string()),
                    ]))
                    .set(r.entries[t as usize][state] as i64);
            }
        }
    }
    let totals = shared.sweep_totals;
    f.plain_counter(
        "lb_conntrack_expired",
        "Conntrack entries the agent deleted because they were past their state's timeout.",
        totals.expired,
    );
    f.plain_counter(
        "lb_conntrack_stale",
        "Conntrack entries the agent deleted because their VIP or backend was gone or replaced.",
        totals.stale,
    );
    f.plain_counter(
        "lb_conntrack_evicted",
        "Flows taken off active-flow counts because their entries vanished (LRU evictions), settled by the agent's sweep.",
        totals.evicted,
    );
    f.plain_counter(
        "lb_conntrack_sweeps",
        "Complete sweeps of both conntrack tables by the agent.",
        totals.passes,
    );
    Ok(())
}

/// Serves `/metrics` on `addr` until the process ends. `maps`: the page's own handles on the
/// pinned maps, read without the agent's lock, on a blocking thread (a scrape never stalls the
/// agent's loop).
pub async fn serve(
    addr: SocketAddr,
    shared: std::sync::Arc<std::sync::Mutex<Shared>>,
    maps: LbMaps,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let maps = std::sync::Arc::new(maps);
    use axum::{http::StatusCode, response::IntoResponse, routing::get, Router};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics: listening on {addr}: {e}"))?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let shared = shared.clone();
            let maps = maps.clone();
            async move {
                let snapshot = shared.lock().expect("agent state lock").snapshot();
                let page = tokio::task::spawn_blocking(move || render(&maps, &snapshot))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("rendering the page: {e}")));
                match page {
                    Ok(text) => (
                        StatusCode::OK,
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(e) => {
                        (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
                    }
                }
            }
        }),
    );
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_metrics() {
        let Some(mut maps) = crate::sweep::standalone_maps() else {
            return;
        };
        let mut sweeper = crate::sweep::Sweeper::new();
        while sweeper.step(&mut maps, 10).unwrap().is_none() {}
        let snapshot = Snapshot {
            checks: Default::default(),
            draining: Default::default(),
            counters: Default::default(),
            digests: Default::default(),
            announced: Vec::new(),
            sweep_last: sweeper.last().copied(),
            sweep_totals: sweeper.totals(),
            pin_dir: "/nonexistent".into(),
        };
        let page = render(&maps, &snapshot).unwrap();
        for line in [
            "lb_conntrack_capacity{table=\"confirmed\"} 8192",
            "lb_conntrack_capacity{table=\"unconfirmed\"} 8192",
            "lb_conntrack_entries{table=\"confirmed\",state=\"established\"} 0",
            "lb_conntrack_entries{table=\"unconfirmed\",state=\"opening\"} 0",
            "lb_conntrack_expired_total 0",
            "lb_conntrack_stale_total 0",
            "lb_conntrack_evicted_total 0",
            "lb_conntrack_sweeps_total 1",
            "lb_events_total{event=\"ct_flood_skip\"} 0",
            "lb_events_total{event=\"rev_stateless\"} 0",
        ] {
            assert!(page.contains(line), "{line} missing from\n{page}");
        }
    }
}
