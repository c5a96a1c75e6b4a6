//! stats, flows, table.

use std::{collections::BTreeMap, time::Duration};

use lb::{model::socket_addr, pin::PinDir, LbMaps, Vip};
use lb_common::{TrafficStats, COUNTER_NAMES, NO_BACKEND, VERDICT_COUNT};
use serde::Serialize;

use super::{print_json, table_fmt, CmdResult};

#[derive(Serialize, Clone, Default)]
struct Traffic {
    packets: u64,
    bytes: u64,
    new_flows: u64,
    reply_packets: u64,
    reply_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    packets_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bits_per_sec: Option<f64>,
}

impl From<TrafficStats> for Traffic {
    fn from(s: TrafficStats) -> Self {
        Traffic {
            packets: s.packets,
            bytes: s.bytes,
            new_flows: s.new_flows,
            reply_packets: s.rev_packets,
            reply_bytes: s.rev_bytes,
            ..Default::default()
        }
    }
}

#[derive(Serialize, Clone)]
struct BackendStats {
    backend: String,
    weight: u32,
    #[serde(flatten)]
    traffic: Traffic,
}

#[derive(Serialize, Clone)]
struct VipStats {
    vip: String,
    #[serde(flatten)]
    traffic: Traffic,
    backends: Vec<BackendStats>,
}

#[derive(Serialize, Clone)]
struct Snapshot {
    vips: Vec<VipStats>,
    /// Verdict counters (one per packet) and event counters, by name.
    counters: BTreeMap<String, u64>,
    /// Sum of the verdict counters: every packet the program has seen.
    packets_seen: u64,
}

fn snapshot(maps: &LbMaps) -> anyhow::Result<Snapshot> {
    let mut vips = Vec::new();
    for (vip, info) in maps.vips()? {
        let mut backends = Vec::new();
        for b in maps.backends(&vip)? {
            backends.push(BackendStats {
                backend: b.addr.to_string(),
                weight: b.weight,
                traffic: maps.counters.backend(b.id)?.into(),
            });
        }
        vips.push(VipStats {
            vip: vip.to_string(),
            traffic: maps.counters.vip(info.vip_id)?.into(),
            backends,
        });
    }
    let c = maps.counters.verdicts()?;
    Ok(Snapshot {
        counters: COUNTER_NAMES
            .iter()
            .zip(&c)
            .map(|(n, v)| (n.to_string(), *v))
            .collect(),
        packets_seen: c[..VERDICT_COUNT as usize].iter().sum(),
        vips,
    })
}

fn with_rates(now: &mut Snapshot, before: &Snapshot, secs: f64) {
    let rate = |t: &mut Traffic, b: Option<&Traffic>| {
        if let Some(b) = b {
            t.packets_per_sec = Some((t.packets.saturating_sub(b.packets)) as f64 / secs);
            t.bits_per_sec = Some(8.0 * (t.bytes.saturating_sub(b.bytes)) as f64 / secs);
        }
    };
    for v in &mut now.vips {
        let bv = before.vips.iter().find(|x| x.vip == v.vip);
        rate(&mut v.traffic, bv.map(|x| &x.traffic));
        for b in &mut v.backends {
            let bb = bv.and_then(|x| x.backends.iter().find(|y| y.backend == b.backend));
            rate(&mut b.traffic, bb.map(|x| &x.traffic));
        }
    }
}

fn print_snapshot(s: &Snapshot) {
    let mut rows = Vec::new();
    for v in &s.vips {
        rows.push(traffic_row(&v.vip, "", &v.traffic));
        for b in &v.backends {
            rows.push(traffic_row(
                &format!("  -> {}", b.backend),
                &b.weight.to_string(),
                &b.traffic,
            ));
        }
    }
    table_fmt::print(
        &[
            "VIP / BACKEND",
            "WEIGHT",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "REPLIES",
            "PKT/S",
            "BIT/S",
        ],
        &rows,
    );
    outln!();
    let counters: Vec<Vec<String>> = s
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| vec![k.clone(), v.to_string()])
        .collect();
    outln!("packets seen: {}", s.packets_seen);
    table_fmt::print(&["COUNTER", "VALUE"], &counters);
}

fn traffic_row(name: &str, weight: &str, t: &Traffic) -> Vec<String> {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), table_fmt::human);
    vec![
        name.to_string(),
        weight.to_string(),
        t.packets.to_string(),
        table_fmt::human(t.bytes as f64),
        t.new_flows.to_string(),
        t.reply_packets.to_string(),
        opt(t.packets_per_sec),
        opt(t.bits_per_sec),
    ]
}

pub fn stats(dir: &mut PinDir, watch: Option<u64>, json: bool) -> CmdResult {
    let maps = dir.maps()?;
    let Some(interval) = watch else {
        maps.index_backends()?;
        let s = snapshot(&maps)?;
        if json {
            print_json(&s);
        } else {
            print_snapshot(&s);
        }
        return Ok(());
    };
    // The maps stay open without the lock: watching must not block other commands.
    dir.unlock();
    let interval = interval.max(1);
    let mut before = snapshot(&maps)?;
    loop {
        std::thread::sleep(Duration::from_secs(interval));
        let mut now = snapshot(&maps)?;
        with_rates(&mut now, &before, interval as f64);
        if json {
            outln!("{}", serde_json::to_string(&now).expect("serializable"));
        } else {
            out!("\x1b[2J\x1b[H"); // clear the screen
            outln!("every {interval}s — Ctrl-C to stop\n");
            print_snapshot(&now);
        }
        if !super::output::flush_or_exit() {
            return Ok(()); // the reader is gone
        }
        before = now;
    }
}

#[derive(Serialize)]
struct FlowRow {
    client: String,
    vip: String,
    /// The backend's address, or `#id` if that backend is gone or was replaced (stale).
    backend: String,
    /// `CT_STATE_NAMES`: opening, established, closing, closed, udp.
    state: &'static str,
    /// Seconds since the flow's last packet (refreshed about once a second).
    age_s: u64,
    /// In the table of confirmed flows (else: handshake not completed / no reply yet).
    confirmed: bool,
}

pub fn flows(dir: &PinDir, vip: Option<Vip>, sweep: bool, json: bool) -> CmdResult {
    let mut maps = dir.maps()?;
    if let Some(v) = &vip {
        maps.vip(v)?;
    }
    if sweep {
        let r = maps.sweep_now()?;
        eprintln!(
            "swept: {} expired and {} stale entries deleted, {} evicted flows settled, {} active counts corrected",
            r.expired, r.stale, r.evictions_settled, r.active_written
        );
    }
    let now = lb::sweep::now_ns(&maps)?;
    let mut rows = Vec::new();
    let mut backends_of: std::collections::HashMap<Vip, Vec<lb::BackendState>> = Default::default();
    for f in maps.flows.list()? {
        let Some(proto) = lb::Proto::from_number(f.key.proto) else {
            continue;
        };
        let (Some(client), Some(dst)) = (
            socket_addr(f.key.family, f.key.src_be, f.key.sport_be),
            socket_addr(f.key.family, f.key.dst_be, f.key.dport_be),
        ) else {
            continue;
        };
        let flow_vip = Vip::new(dst, proto);
        if vip.is_some_and(|v| v != flow_vip) {
            continue;
        }
        let bs = backends_of
            .entry(flow_vip)
            .or_insert_with(|| maps.backends(&flow_vip).unwrap_or_default());
        let backend = bs.iter().find(|b| b.id == f.entry.backend_id).copied();
        rows.push(FlowRow {
            client: client.to_string(),
            vip: flow_vip.to_string(),
            backend: backend.map_or(format!("#{}", f.entry.backend_id), |b| b.addr.to_string()),
            state: lb_common::CT_STATE_NAMES
                .get(f.entry.state as usize)
                .copied()
                .unwrap_or("none"),
            age_s: lb::sweep::age_s(now, f.entry.last_seen_ns),
            confirmed: f.table == lb::CtTable::Confirmed,
        });
    }
    rows.sort_by(|a, b| (&a.vip, &a.client).cmp(&(&b.vip, &b.client)));
    super::print_rows(
        json,
        &rows,
        &["CLIENT", "VIP", "BACKEND", "STATE", "AGE", "CONFIRMED"],
        |r| {
            vec![
                r.client.clone(),
                r.vip.clone(),
                r.backend.clone(),
                r.state.to_string(),
                format!("{}s", r.age_s),
                if r.confirmed { "yes" } else { "no" }.to_string(),
            ]
        },
    );
    Ok(())
}

#[derive(Serialize)]
struct ShareRow {
    backend: String,
    weight: u32,
    slots: u64,
    weight_share_percent: f64,
    slot_share_percent: f64,
}

#[derive(Serialize)]
struct TableReport {
    vip: String,
    table_size: u32,
    empty_slots: u64,
    backends: Vec<ShareRow>,
}

pub fn digest(dir: &PinDir, vip: &Vip, json: bool) -> CmdResult {
    let d = dir.maps()?.table_digest(vip)?;
    if json {
        print_json(&serde_json::json!({ "vip": vip.to_string(), "digest": d }));
    } else {
        outln!("{d}");
    }
    Ok(())
}

pub fn table(dir: &PinDir, vip: &Vip, json: bool) -> CmdResult {
    let maps = dir.maps()?;
    let info = maps.vip(vip)?;
    let slots = maps.table(vip)?;
    let backends = maps.backends(vip)?;
    let total_weight: u64 = backends.iter().map(|b| b.weight as u64).sum();
    let m = info.table_size as f64;
    let rows: Vec<ShareRow> = backends
        .iter()
        .map(|b| {
            let n = slots.iter().filter(|s| **s == b.id).count() as u64;
            ShareRow {
                backend: b.addr.to_string(),
                weight: b.weight,
                slots: n,
                weight_share_percent: if total_weight == 0 {
                    0.0
                } else {
                    100.0 * b.weight as f64 / total_weight as f64
                },
                slot_share_percent: 100.0 * n as f64 / m,
            }
        })
        .collect();
    let report = TableReport {
        vip: vip.to_string(),
        table_size: info.table_size,
        empty_slots: slots.iter().filter(|s| **s == NO_BACKEND).count() as u64,
        backends: rows,
    };
    if json {
        print_json(&report);
        return Ok(());
    }
    outln!(
        "{}: {} slots, {} empty",
        report.vip,
        report.table_size,
        report.empty_slots
    );
    let cells: Vec<Vec<String>> = report
        .backends
        .iter()
        .map(|r| {
            vec![
                r.backend.clone(),
                r.weight.to_string(),
                format!("{:.3}%", r.weight_share_percent),
                r.slots.to_string(),
                format!("{:.3}%", r.slot_share_percent),
            ]
        })
        .collect();
    table_fmt::print(
        &["BACKEND", "WEIGHT", "WEIGHT SHARE", "SLOTS", "SLOT SHARE"],
        &cells,
    );
    Ok(())
}
