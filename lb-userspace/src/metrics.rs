//! Prometheus metrics of the agent (`lb run --metrics ADDR`, path `/metrics`): read from the
//! maps at every scrape (the kernel counters are the truth; nothing is cached), plus the
//! agent's own health-check, reload and table-rebuild counters, in the Prometheus text format
//! (0.0.4), which `promtool check metrics` checks.

use std::net::SocketAddr;

use std::fmt::Write as _;

use crate::{agent::Shared, CtTable, LbMaps};
use lb_common::{COUNTER_NAMES, CT_STATE_NAMES, VERDICT_COUNT};

/// The page being written, in the Prometheus text exposition format (0.0.4). Written directly
/// rather than through a metrics registry: at 1,000 VIPs × 64 backends the page has over half
/// a million series, and a registry's per-series maps and label vectors cost seconds.
struct Page {
    out: String,
    /// Where full chunks go while the page is written (the HTTP response streams them as
    /// they come, so writing and sending overlap); None: the page is returned whole.
    sink: Option<Sink>,
}

/// What goes from the page's writer to the HTTP response.
pub enum Chunk {
    Data(axum::body::Bytes),
    /// The page is whole.
    End,
    /// A read failed (only ever before the first chunk: the reads come first).
    Failed(String),
}

/// The chunks of a page on its way out.
pub type Sink = tokio::sync::mpsc::Sender<Chunk>;

/// A chunk is sent once this much is written.
const CHUNK: usize = 1 << 20;

impl Page {
    /// Sends what is written so far if it makes a chunk. Every read that can fail comes
    /// before the first chunk, so a page that started never ends in an error.
    fn flush_if_full(&mut self) {
        if self.out.len() >= CHUNK {
            if let Some(sink) = &self.sink {
                let chunk = std::mem::replace(&mut self.out, String::with_capacity(2 * CHUNK));
                if sink.blocking_send(Chunk::Data(chunk.into())).is_err() {
                    self.sink = None; // the client went away: the rest is not sent
                }
            }
        }
    }

    /// Starts a metric family: its help and type lines. Counter names end in `_total`.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        debug_assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of the family begun last.
    fn sample(&mut self, name: &str, labels: &[(&str, &dyn std::fmt::Display)], v: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                let start = self.out.len();
                let _ = write!(self.out, "{val}");
                if self.out[start..].contains(['\\', '"', '\n']) {
                    let escaped = escape(&self.out[start..]);
                    self.out.truncate(start);
                    self.out.push_str(&escaped);
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {v}");
    }

    /// One sample with labels already written as the text format wants them
    /// (`k="v",k2="v2"`): for series of many families with the same labels.
    fn sample_with(&mut self, name: &str, labels: &str, extra: &str, v: u64) {
        self.out.push_str(name);
        self.out.push('{');
        self.out.push_str(labels);
        self.out.push_str(extra);
        self.out.push_str("} ");
        self.out.push_str(itoa::Buffer::new().format(v));
        self.out.push('\n');
        self.flush_if_full();
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], v);
    }
}

/// Each backend's labels as the text format wants them: `vip="…",backend="…"`.
fn labels_of(rows: &[(crate::Vip, crate::BackendState)]) -> Vec<String> {
    rows.iter()
        .map(|(vip, b)| {
            let mut l = String::with_capacity(64);
            let _ = write!(l, "vip=\"{vip}\",backend=\"{}\"", b.addr);
            // (Addresses and ports never need escaping; the check keeps the format safe.)
            if l.contains(['\\', '\n']) || l.matches('"').count() != 4 {
                l = format!(
                    "vip=\"{}\",backend=\"{}\"",
                    escape(&vip.to_string()),
                    escape(&b.addr.to_string())
                );
            }
            l
        })
        .collect()
}

/// A label value as the text format needs it: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

/// What the page needs of the agent's state, copied under the agent's lock (`Shared::snapshot`):
/// the page is then rendered from the maps without it, so a scrape never holds up the agent.
pub struct Snapshot {
    /// Health-check results (ok, failed) per (VIP, backend), in no order (a plain copy keeps
    /// the agent's lock short; the page sorts them).
    pub checks: Vec<(crate::agent::Key, (u64, u64))>,
    pub draining: std::collections::HashSet<crate::agent::Key>,
    pub counters: crate::agent::Counters,
    pub digests: std::collections::HashMap<crate::Vip, String>,
    pub announced: Vec<std::net::IpAddr>,
    pub sweep_last: Option<crate::sweep::SweepReport>,
    pub sweep_totals: crate::sweep::SweepTotals,
    pub pin_dir: std::path::PathBuf,
}

/// Above this many backends, their counters are read as whole arrays (a few batched reads)
/// rather than with a lookup each.
const BATCH_READ_FROM: usize = 512;

/// The page: the maps' counters and state, and the agent's (`shared`). One pass over the
/// backends in use; the per-backend counters in batched reads when there are many.
pub fn render(maps: &LbMaps, shared: &Snapshot) -> anyhow::Result<String> {
    render_with(maps, shared, &mut PageCache::default(), None)
}

/// What one scrape keeps for the next: the backends' label strings (rewritten only when the
/// set of (VIP, backend) changes) and how many there were (whether to read their counters
/// as whole arrays, in parallel with the backend array).
#[derive(Default)]
pub struct PageCache {
    keys: Vec<crate::agent::Key>,
    labels: Vec<String>,
}

/// `render`, reusing what `cache` kept from the last page and keeping this one's.
pub fn render_with(
    maps: &LbMaps,
    shared: &Snapshot,
    cache: &mut PageCache,
    sink: Option<Sink>,
) -> anyhow::Result<String> {
    let capacity = if sink.is_some() {
        2 * CHUNK
    } else {
        cache.keys.len() * 900 + 64 * 1024
    };
    let mut p = Page {
        out: String::with_capacity(capacity),
        sink,
    };
    // Global counters: verdicts (one per packet) and events.
    let counters = maps.counters.verdicts()?;
    p.family(
        "lb_packets_total",
        "counter",
        "Packets seen by the data plane, by verdict (exactly one per packet).",
    );
    for (i, v) in counters.iter().enumerate().take(VERDICT_COUNT as usize) {
        p.sample("lb_packets_total", &[("verdict", &COUNTER_NAMES[i])], *v);
    }
    p.family(
        "lb_events_total",
        "counter",
        "Data-plane events (conntrack, reverse NAT, …).",
    );
    for (i, v) in counters.iter().enumerate().skip(VERDICT_COUNT as usize) {
        p.sample("lb_events_total", &[("event", &COUNTER_NAMES[i])], *v);
    }

    let vips = maps.vips()?;
    // Many backends last time: their counters are read as whole arrays, on threads of their
    // own while this one reads the backend array (three kernel walks of 65,536 entries).
    let (by_vip, early) = if cache.keys.len() >= BATCH_READ_FROM {
        let (counters, flows) = (&maps.counters, &maps.flows);
        std::thread::scope(|sc| {
            let stats = sc.spawn(|| counters.all_backends());
            let active = sc.spawn(|| flows.all_active());
            let by_vip = maps.backends_by_vip();
            let stats = stats
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            let active = active
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            Ok::<_, crate::LbError>((by_vip?, Some((stats?, active?))))
        })?
    } else {
        (maps.backends_by_vip()?, None)
    };
    let mut by_vip = by_vip;
    let many = by_vip.values().map(Vec::len).sum::<usize>() >= BATCH_READ_FROM;
    let vip_stats = if vips.len() >= BATCH_READ_FROM / 8 {
        maps.counters.all_vips()?
    } else {
        let mut v = vec![Default::default(); lb_common::MAX_VIPS as usize];
        for (_, info) in &vips {
            v[info.vip_id as usize] = maps.counters.vip(info.vip_id)?;
        }
        v
    };
    let vip_stat = |id: u32| vip_stats.get(id as usize).copied().unwrap_or_default();
    for (name, help, get) in [
        (
            "lb_vip_packets_total",
            "Client packets forwarded for a VIP.",
            (|s: &lb_common::TrafficStats| s.packets) as fn(&lb_common::TrafficStats) -> u64,
        ),
        (
            "lb_vip_bytes_total",
            "Bytes of client packets forwarded for a VIP (whole frames as received).",
            |s| s.bytes,
        ),
        (
            "lb_vip_new_flows_total",
            "New flows of a VIP (selection table used).",
            |s| s.new_flows,
        ),
        (
            "lb_vip_reply_packets_total",
            "Backend replies rewritten back to the VIP.",
            |s| s.rev_packets,
        ),
    ] {
        p.family(name, "counter", help);
        for (vip, info) in &vips {
            p.sample(name, &[("vip", vip)], get(&vip_stat(info.vip_id)));
        }
    }

    // The backends, in VIP order, with their counters and active-flow counts.
    let mut rows = Vec::new();
    for (vip, info) in &vips {
        for b in by_vip.remove(&info.vip_id).unwrap_or_default() {
            rows.push((*vip, b));
        }
    }
    let (stats, active) = if many {
        let (stats, active) = match early {
            Some(read) => read,
            None => (maps.counters.all_backends()?, maps.flows.all_active()?),
        };
        rows.iter()
            .map(|(_, b)| {
                (
                    stats.get(b.id as usize).copied().unwrap_or_default(),
                    active.get(b.id as usize).copied().unwrap_or_default(),
                )
            })
            .unzip()
    } else {
        let mut stats = Vec::with_capacity(rows.len());
        let mut active = Vec::with_capacity(rows.len());
        for (_, b) in &rows {
            stats.push(maps.counters.backend(b.id)?);
            active.push(maps.flows.active(b.id)?);
        }
        (stats, active)
    };
    let stats: Vec<lb_common::TrafficStats> = stats;
    let active: Vec<u64> = active;
    type Get<'a> = Box<dyn Fn(usize) -> u64 + 'a>;
    let per_backend: [(&str, &str, &str, Get); 8] = [
        (
            "lb_backend_packets_total",
            "counter",
            "Client packets forwarded to a backend.",
            Box::new(|i| stats[i].packets),
        ),
        (
            "lb_backend_bytes_total",
            "counter",
            "Bytes forwarded to a backend (whole frames as received).",
            Box::new(|i| stats[i].bytes),
        ),
        (
            "lb_backend_new_flows_total",
            "counter",
            "New flows given to a backend.",
            Box::new(|i| stats[i].new_flows),
        ),
        (
            "lb_backend_reply_packets_total",
            "counter",
            "Replies of a backend rewritten back to the VIP.",
            Box::new(|i| stats[i].rev_packets),
        ),
        (
            "lb_backend_active_flows",
            "gauge",
            "Confirmed flows of a backend that have not closed, expired or been evicted.",
            Box::new(|i| active[i]),
        ),
        (
            "lb_backend_up",
            "gauge",
            "1 if the backend is healthy (or not checked), 0 if health checks took it out.",
            Box::new(|i| rows[i].1.healthy as u64),
        ),
        (
            "lb_backend_weight",
            "gauge",
            "Configured weight (0 = drained).",
            Box::new(|i| rows[i].1.weight as u64),
        ),
        (
            "lb_backend_draining",
            "gauge",
            "1 while a backend removed from the configuration drains.",
            Box::new(|i| {
                let (vip, b) = &rows[i];
                (!shared.draining.is_empty() && shared.draining.contains(&(*vip, b.addr))) as u64
            }),
        ),
    ];
    // Each backend's labels are written once, for all its series.
    let ct_capacity = [
        maps.flows.capacity(CtTable::Confirmed)?,
        maps.flows.capacity(CtTable::Unconfirmed)?,
    ];
    // From here on nothing can fail: the page may start going out.
    let keys: Vec<crate::agent::Key> = rows.iter().map(|(v, b)| (*v, b.addr)).collect();
    if keys != cache.keys {
        cache.labels = labels_of(&rows);
        cache.keys = keys;
    }
    let row_labels = &cache.labels;
    for (name, kind, help, get) in &per_backend {
        p.family(name, kind, help);
        for (i, labels) in row_labels.iter().enumerate() {
            p.sample_with(name, labels, "", get(i));
        }
    }
    p.family(
        "lb_health_checks_total",
        "counter",
        "Health-check probes, by result.",
    );
    // Rows and checks are both sorted by (VIP, backend): one merge pass.
    let mut checks = shared.checks.clone();
    checks.sort_unstable_by_key(|(k, _)| *k);
    let mut checks = checks.iter().peekable();
    for (i, (vip, b)) in rows.iter().enumerate() {
        let key = (*vip, b.addr);
        while checks.next_if(|(k, _)| *k < key).is_some() {}
        if let Some((_, (ok, failed))) = checks.next_if(|(k, _)| *k == key) {
            let name = "lb_health_checks_total";
            p.sample_with(name, &row_labels[i], ",result=\"ok\"", *ok);
            p.sample_with(name, &row_labels[i], ",result=\"failed\"", *failed);
        }
    }

    conntrack(&mut p, &ct_capacity, shared);

    p.family(
        "lb_vip_table_info",
        "gauge",
        "A VIP's selection digest (lb table --digest): equal on gateways with the same configuration.",
    );
    let mut digests: Vec<_> = shared.digests.iter().collect();
    digests.sort();
    for (vip, d) in digests {
        p.sample("lb_vip_table_info", &[("vip", vip), ("digest", d)], 1);
    }
    p.family(
        "lb_vip_announced",
        "gauge",
        "1 for each VIP address this node announces through BIRD.",
    );
    for ip in &shared.announced {
        p.sample("lb_vip_announced", &[("address", ip)], 1);
    }
    let c = &shared.counters;
    p.single(
        "lb_table_rebuilds_total",
        "counter",
        "Selection-table updates made by the agent (config changes, health transitions, drains).",
        c.table_rebuilds,
    );
    p.single(
        "lb_table_slots_written_total",
        "counter",
        "Table slots the agent rewrote.",
        c.slots_written,
    );
    p.family(
        "lb_config_reloads_total",
        "counter",
        "Configuration reloads, by result.",
    );
    p.sample(
        "lb_config_reloads_total",
        &[("result", &"ok")],
        c.reloads_ok,
    );
    p.sample(
        "lb_config_reloads_total",
        &[("result", &"error")],
        c.reloads_failed,
    );
    p.single(
        "lb_config_last_reload_ok",
        "gauge",
        "1 if the last configuration read was valid and applied.",
        c.last_reload_ok as u64,
    );
    p.single(
        "lb_backends_drained_total",
        "counter",
        "Backends removed after draining (no active flows, idle, or the drain timeout).",
        c.drained,
    );

    p.family(
        "lb_attached",
        "gauge",
        "lb's data-plane links, by interface and mode: 1 attached, 0 gone (the interface was deleted).",
    );
    for a in crate::pin::attachments_in(&shared.pin_dir).unwrap_or_default() {
        p.sample(
            "lb_attached",
            &[
                ("iface", &a.iface),
                ("mode", &crate::pin::mode_name(a.mode)),
            ],
            !a.gone as u64,
        );
    }
    Ok(p.out)
}

/// The conntrack tables: entries by table and state as the agent's last complete sweep pass
/// found them, capacities, and what the sweeps removed and settled.
fn conntrack(p: &mut Page, capacity: &[u64; 2], shared: &Snapshot) {
    p.family(
        "lb_conntrack_capacity",
        "gauge",
        "Entries a conntrack table holds (confirmed flows; unconfirmed: handshake not completed or no reply yet).",
    );
    for t in CtTable::ALL {
        p.sample(
            "lb_conntrack_capacity",
            &[("table", &t.name())],
            capacity[t as usize],
        );
    }
    p.family(
        "lb_conntrack_entries",
        "gauge",
        "Conntrack entries by table and state, at the end of the agent's last complete sweep.",
    );
    if let Some(r) = &shared.sweep_last {
        for t in CtTable::ALL {
            for (state, name) in CT_STATE_NAMES.iter().enumerate().skip(1) {
                p.sample(
                    "lb_conntrack_entries",
                    &[("table", &t.name()), ("state", name)],
                    r.entries[t as usize][state],
                );
            }
        }
    }
    let totals = shared.sweep_totals;
    p.single(
        "lb_conntrack_expired_total",
        "counter",
        "Conntrack entries the agent deleted because they were past their state's timeout.",
        totals.expired,
    );
    p.single(
        "lb_conntrack_stale_total",
        "counter",
        "Conntrack entries the agent deleted because their VIP or backend was gone or replaced.",
        totals.stale,
    );
    p.single(
        "lb_conntrack_evicted_total",
        "counter",
        "Flows taken off active-flow counts because their entries vanished (LRU evictions), settled by the agent's sweep.",
        totals.evicted,
    );
    p.single(
        "lb_conntrack_sweeps_total",
        "counter",
        "Complete sweeps of both conntrack tables by the agent.",
        totals.passes,
    );
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
    let cache = std::sync::Arc::new(std::sync::Mutex::new(PageCache::default()));
    use axum::{http::StatusCode, response::IntoResponse, routing::get, Router};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics: listening on {addr}: {e}"))?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let shared = shared.clone();
            let maps = maps.clone();
            let cache = cache.clone();
            async move {
                let snapshot = shared.lock().expect("agent state lock").snapshot();
                let (tx, mut rx) = tokio::sync::mpsc::channel(4);
                tokio::task::spawn_blocking(move || {
                    // (One scrape at a time renders; a second waits for the first.)
                    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
                    match render_with(&maps, &snapshot, &mut cache, Some(tx.clone())) {
                        Ok(rest) => {
                            let _ = tx.blocking_send(Chunk::Data(rest.into()));
                            let _ = tx.blocking_send(Chunk::End);
                        }
                        Err(e) => {
                            let _ = tx.blocking_send(Chunk::Failed(format!("{e:#}")));
                        }
                    }
                    // (A panic drops `tx` without `End`: the response is then cut with an
                    // error, never ended as if whole.)
                });
                // The first chunk (or the whole of a small page) decides the status.
                match rx.recv().await {
                    Some(Chunk::Data(first)) => {
                        let rest = futures_util::stream::unfold(Some(rx), |rx| async move {
                            let mut rx = rx?;
                            match rx.recv().await {
                                Some(Chunk::Data(chunk)) => Some((Ok(chunk), Some(rx))),
                                Some(Chunk::End) => None,
                                Some(Chunk::Failed(e)) => {
                                    Some((Err(std::io::Error::other(e)), None))
                                }
                                None => Some((
                                    Err(std::io::Error::other("the page's writer stopped")),
                                    None,
                                )),
                            }
                        });
                        let body = futures_util::StreamExt::chain(
                            futures_util::stream::once(async move { Ok(first) }),
                            rest,
                        );
                        (
                            StatusCode::OK,
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            axum::body::Body::from_stream(body),
                        )
                            .into_response()
                    }
                    Some(Chunk::Failed(e)) => {
                        (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
                    }
                    Some(Chunk::End) | None => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "rendering the page failed\n",
                    )
                        .into_response(),
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

    /// A page written in chunks is, joined, the page written whole; label values that need
    /// it are escaped.
    #[test]
    fn chunked_page_is_the_whole_page() {
        let write = |p: &mut Page| {
            p.family("lb_x_total", "counter", "A test family.");
            for i in 0..100_000u64 {
                let labels = format!("vip=\"10.0.0.{}:80/tcp\",backend=\"b{i}\"", i % 250);
                p.sample_with("lb_x_total", &labels, ",result=\"ok\"", i * 7);
            }
            p.sample("lb_y", &[("iface", &"a\"b\\c\nd")], 1);
        };
        let mut whole = Page {
            out: String::new(),
            sink: None,
        };
        write(&mut whole);
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let mut chunked = Page {
            out: String::new(),
            sink: Some(tx),
        };
        write(&mut chunked);
        let mut joined = Vec::new();
        let mut chunks = 0;
        while let Ok(c) = rx.try_recv() {
            let Chunk::Data(c) = c else {
                panic!("only data while the page is written");
            };
            joined.extend_from_slice(&c);
            chunks += 1;
        }
        joined.extend_from_slice(chunked.out.as_bytes());
        assert!(chunks >= 3, "{chunks} chunks");
        assert_eq!(joined, whole.out.as_bytes());
        assert!(whole.out.ends_with("lb_y{iface=\"a\\\"b\\\\c\\nd\"} 1\n"));
    }

    /// Every metric the Grafana dashboard (deploy/grafana-dashboard.json) queries is one the
    /// page exports: each expression and variable query is read for `lb_…` names.
    #[test]
    fn the_dashboard_names_only_exported_metrics() {
        let Some(maps) = crate::sweep::standalone_maps() else {
            eprintln!("skipped: cannot create BPF maps");
            return;
        };
        let snapshot = Snapshot {
            checks: Vec::new(),
            draining: Default::default(),
            counters: Default::default(),
            digests: Default::default(),
            announced: Vec::new(),
            sweep_last: None,
            sweep_totals: Default::default(),
            pin_dir: "/nonexistent".into(),
        };
        let page = render(&maps, &snapshot).unwrap();
        let exported: std::collections::BTreeSet<&str> = page
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana-dashboard.json"
        );
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut queries = Vec::new();
        collect_queries(&dashboard, &mut queries);
        assert!(queries.len() > 10, "{} queries found", queries.len());
        let mut named = 0;
        for q in &queries {
            for name in metric_names(q) {
                assert!(
                    exported.contains(name.as_str()),
                    "the dashboard queries {name}, which lb does not export ({q})"
                );
                named += 1;
            }
        }
        assert!(named >= queries.len(), "every query names a metric");
    }

    /// Every `expr` and `query` string in the dashboard.
    fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => collect_queries(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect_queries(v, out)),
            _ => {}
        }
    }

    /// The `lb_…` metric names in a PromQL expression.
    fn metric_names(q: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = q;
        while let Some(i) = rest.find("lb_") {
            let before_ok = rest[..i]
                .chars()
                .last()
                .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len().max(3)..];
            if before_ok {
                out.push(name);
            }
        }
        out
    }

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
