//! The data plane's specification: a table of input packet → verdict → exact output packet,
//! run in order through the real program with BPF_PROG_TEST_RUN inside a namespace whose
//! routes and neighbours make the route lookups deterministic (see common/topology.rs).
//! Configuration changes between cases are steps of the table too. Rows about flow state also
//! check the conntrack tables (which table holds the flow, its state and flags) and the active
//! counts. Counters are checked at the end against what the cases say.
//!
//! The tables: `fixture_table` (forwarding, reverse path, parsing, next hops, draining),
//! `flow_state_table` (the checks before any state, TTL, the TCP/UDP flow states and their
//! transitions, RST semantics, a backend id reused by another backend, timeouts, one backend
//! behind two VIPs), and `flood_threshold`, `flood_threshold_lowered` and
//! `flows_begun_in_a_flood_keep_their_backend` (the new-flow rate limit, and the hashed choice
//! for segments without an entry; they pin their thread to one CPU, as the rate is counted per
//! CPU).

mod common;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use common::{
    mutate::{fix_ipv4_csum, l4_v4, set_ipv4_u16, set_ipv4_u8, IP},
    oracle,
    packets::{checksums_ok, endpoints, tag, Mac, Spec, Tcp, SEQ, TPID_8021AD, TPID_8021Q},
    testrun::{
        action_name, run, run_kind, tc_verdict, Kind, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
    },
    topology::{mac_of, pin_to_current_cpu, Gateway, CLIENT_MAC, GW_MAC_A, GW_MAC_B},
};
use lb::{model::flow_key, Algorithm, CtTable, Vip};
use lb_common::{
    Counter, CtEntry, GlobalConf, Timeouts, ACK_WINDOW, ALGO_ROUND_ROBIN, COUNTER_NAMES,
    CT_F_CLIENT_AGAIN, CT_F_COUNTED, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CT_F_PICKUP, CT_F_RST,
    CT_F_RST_BACKEND, CT_F_SYNACK, CT_STATE_NAMES, CT_S_CLOSED, CT_S_CLOSING, CT_S_ESTABLISHED,
    CT_S_OPENING, CT_S_UDP, VERDICT_COUNT,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn vip(s: &str) -> Vip {
    s.parse().unwrap()
}

/// One row of the table.
struct Case {
    desc: String,
    ingress: u32,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    reason: Counter,
}

struct Table {
    gw: Gateway,
    /// The program the rows go through.
    kind: Kind,
    reasons: Vec<Counter>,
    rows: usize,
    /// Counters when the table started.
    before: Vec<u64>,
    /// Per destination endpoint (address:port, is UDP): rows whose verdict comes after a
    /// backend was chosen (sent, or handed to the kernel or dropped by the route), and the
    /// conntrack misses those rows counted — what the VIP's traffic counters must show.
    to_vip: HashMap<(SocketAddr, bool), (u64, u64)>,
}

/// Verdicts a packet to a VIP gets only after its backend was chosen.
const AFTER_SELECTION: [Counter; 8] = [
    Counter::Tx,
    Counter::Redirect,
    Counter::PassNoNeigh,
    Counter::PassFibOther,
    Counter::DropFibUnreachable,
    Counter::DropNoNeigh,
    Counter::DropNotOnLink,
    Counter::DropTooBig,
];

/// Where a flow's entry must be, and what it must say.
struct Want {
    table: CtTable,
    state: u8,
    flags: u64,
    backend: SocketAddr,
}

impl Table {
    fn new(tag: &str) -> Table {
        Table::with(tag, Kind::Xdp)
    }

    fn with(tag: &str, kind: Kind) -> Table {
        let gw = Gateway::new(tag);
        let before = gw.dp.maps.counters.verdicts().unwrap();
        Table {
            gw,
            kind,
            reasons: vec![],
            rows: 0,
            before,
            to_vip: HashMap::new(),
        }
    }

    fn check(&mut self, c: Case) {
        let at_start = self.counters();
        let misses = at_start[Counter::CtMiss as usize];
        // (None: a frame the kernel makes no socket buffer of, shorter than any real frame:
        // such rows are XDP's only.)
        let Some((action, out)) = run_kind(&mut self.gw.dp, self.kind, c.ingress, &c.input) else {
            return;
        };
        let want = if self.kind == Kind::Tc {
            tc_verdict(c.verdict)
        } else {
            c.verdict
        };
        self.rows += 1;
        if let Some((_, dst, udp)) = endpoints(&c.input) {
            let new_misses = self.counters()[Counter::CtMiss as usize] - misses;
            let e = self.to_vip.entry((dst, udp)).or_default();
            if AFTER_SELECTION.contains(&c.reason) {
                e.0 += 1;
            }
            e.1 += new_misses;
        }
        if action != want {
            let now = self.counters();
            let counted: Vec<&str> = (0..now.len())
                .filter(|&i| now[i] > at_start[i])
                .map(|i| COUNTER_NAMES[i])
                .collect();
            panic!(
                "case {:?} ({:?}): verdict {}, not {}, counting {counted:?}",
                c.desc,
                self.kind,
                action_name(action),
                action_name(want)
            );
        }
        if out != c.output {
            panic!(
                "case {:?}: output differs\n   got {}\n  want {}",
                c.desc,
                hex(&out),
                hex(&c.output)
            );
        }
        if c.verdict == XDP_TX || c.verdict == XDP_REDIRECT {
            checksums_ok(&out).unwrap_or_else(|e| panic!("case {:?}: {e}", c.desc));
        }
        self.reasons.push(c.reason);
    }

    /// The backend a new flow from `client` to `vip` gets now: the reference Maglev build of
    /// the VIP's configured backends, indexed by the reference hash (`common::oracle`, not
    /// lb's builder, hash or table).
    fn predict(&self, client: SocketAddr, v: &Vip) -> SocketAddr {
        oracle::hashed_backend(&self.gw.dp.maps, v, client).expect("table slot has a backend")
    }

    /// The backend a flow from `client` to `v` gets from its hash alone (what the data plane
    /// gives a flow without an entry when its first packet is not a SYN, or above the flood
    /// threshold): for round robin the flow hash (the reference's) into its sequence (the
    /// table's first `seq_len` slots, read from the maps); else as `predict`.
    fn hashed(&self, client: SocketAddr, v: &Vip) -> SocketAddr {
        let m = &self.gw.dp.maps;
        let info = m.vip(v).unwrap();
        if info.algo != ALGO_ROUND_ROBIN {
            return self.predict(client, v);
        }
        let h = oracle::flow_hash(
            client,
            v.addr,
            v.proto == lb::Proto::Udp,
            m.conf().unwrap().hash_seed,
        );
        assert!(info.seq_len > 0, "{v}: empty sequence");
        let id = m.table(v).unwrap()[(h % info.seq_len) as usize];
        self.backend_addr(v, id)
    }

    /// The backend conntrack holds for an established flow.
    fn predict_existing(&self, client: SocketAddr, v: &Vip) -> SocketAddr {
        let e = self
            .gw
            .dp
            .maps
            .flows
            .lookup(&flow_key(client, v))
            .expect("flow in conntrack");
        self.backend_addr(v, e.backend_id)
    }

    fn backend_addr(&self, v: &Vip, id: u32) -> SocketAddr {
        self.gw
            .dp
            .maps
            .backends(v)
            .unwrap()
            .into_iter()
            .find(|b| b.id == id)
            .unwrap_or_else(|| panic!("{v} has no backend with id {id}"))
            .addr
    }

    fn backend_id(&self, v: &Vip, addr: SocketAddr) -> u32 {
        self.gw
            .dp
            .maps
            .backends(v)
            .unwrap()
            .into_iter()
            .find(|b| b.addr == addr)
            .unwrap_or_else(|| panic!("{addr} is not a backend of {v}"))
            .id
    }

    /// Case: client → VIP, forwarded to `backend` wherever it is (XDP_TX on interface A,
    /// XDP_REDIRECT to interface B for 10.2.0.21), one hop later.
    fn forward_to(&mut self, desc: &str, spec: &Spec, backend: SocketAddr) {
        let (smac, verdict, reason) = if backend.ip().to_string() == "10.2.0.21" {
            (GW_MAC_B, XDP_REDIRECT, Counter::Redirect)
        } else {
            (GW_MAC_A, XDP_TX, Counter::Tx)
        };
        self.check(Case {
            desc: desc.into(),
            ingress: self.gw.ifindex_a,
            input: spec.build(),
            verdict,
            output: spec
                .with(smac, mac_of(backend), spec.src, backend)
                .hop()
                .build(),
            reason,
        });
    }

    /// Case: like `forward_to`, for the frame with VLAN `tags`: the same rewrite, the tags
    /// kept — sent back out of interface A, or (a backend behind interface B, whose VLANs lb
    /// does not know) given to the kernel with the MACs it came with.
    fn forward_tagged(
        &mut self,
        desc: &str,
        spec: &Spec,
        backend: SocketAddr,
        tags: &[(u16, u16)],
    ) {
        let elsewhere = backend.ip().to_string() == "10.2.0.21";
        let (smac, dmac, verdict, reason) = if elsewhere {
            (spec.smac, spec.dmac, XDP_PASS, Counter::PassFibOther)
        } else {
            (GW_MAC_A, mac_of(backend), XDP_TX, Counter::Tx)
        };
        self.check(Case {
            desc: desc.into(),
            ingress: self.gw.ifindex_a,
            input: tag(&spec.build(), tags),
            verdict,
            output: tag(
                &spec.with(smac, dmac, spec.src, backend).hop().build(),
                tags,
            ),
            reason,
        });
    }

    /// Case: a backend's packet to a client (on interface A), its source rewritten to `vip`,
    /// one hop later.
    fn reply_as(&mut self, desc: &str, spec: &Spec, v: &Vip) {
        self.check(Case {
            desc: desc.into(),
            ingress: self.gw.ifindex_a,
            input: spec.build(),
            verdict: XDP_TX,
            output: spec
                .with(GW_MAC_A, CLIENT_MAC, v.addr, spec.dst)
                .hop()
                .build(),
            reason: Counter::Tx,
        });
    }

    /// Case: the frame passes (or is dropped) unchanged.
    fn unchanged(&mut self, desc: &str, input: Vec<u8>, verdict: u32, reason: Counter) {
        self.check(Case {
            desc: desc.into(),
            ingress: self.gw.ifindex_a,
            output: input.clone(),
            input,
            verdict,
            reason,
        });
    }

    /// Every entry the conntrack tables hold for the flow `client` → `v`.
    fn entries(&self, client: SocketAddr, v: &Vip) -> Vec<(CtTable, CtEntry)> {
        let key = flow_key(client, v);
        self.gw
            .dp
            .maps
            .flows
            .list()
            .unwrap()
            .into_iter()
            .filter(|f| f.key == key)
            .map(|f| (f.table, f.entry))
            .collect()
    }

    /// The flow `client` → `v` has exactly one entry, as `want` says.
    fn expect_entry(&self, desc: &str, client: SocketAddr, v: &Vip, want: Want) -> CtEntry {
        let got = self.entries(client, v);
        let [(table, e)] = got[..] else {
            panic!("case {desc:?}: want one entry for {client} → {v}, got {got:?}");
        };
        let shown = |table: CtTable, state: u8, flags: u64| {
            format!(
                "{} {}, flags {}",
                table.name(),
                CT_STATE_NAMES.get(state as usize).unwrap_or(&"?"),
                flag_names(flags)
            )
        };
        assert_eq!(
            shown(table, e.state, e.flags),
            shown(want.table, want.state, want.flags),
            "case {desc:?}: entry of {client} → {v} (table, state, flags)"
        );
        assert_eq!(
            self.backend_addr(v, e.backend_id),
            want.backend,
            "case {desc:?}: entry's backend"
        );
        e
    }

    /// The flow `client` → `v` has no entry in either table.
    fn expect_no_entry(&self, desc: &str, client: SocketAddr, v: &Vip) {
        let got = self.entries(client, v);
        assert!(
            got.is_empty(),
            "case {desc:?}: want no entry for {client} → {v}, got {got:?}"
        );
    }

    /// Backend `b` of `v`'s active-flow count.
    fn active(&self, v: &Vip, b: SocketAddr) -> u64 {
        self.gw.dp.maps.flows.active(self.backend_id(v, b)).unwrap()
    }

    fn expect_active(&self, desc: &str, v: &Vip, b: SocketAddr, n: u64) {
        assert_eq!(self.active(v, b), n, "case {desc:?}: active flows of {b}");
    }

    fn counters(&self) -> Vec<u64> {
        self.gw.dp.maps.counters.verdicts().unwrap()
    }

    /// The event counters in `want` went up by exactly that much since `since`; every other
    /// flow-state event counter named in `FLOW_EVENTS` not at all.
    fn expect_events(&self, desc: &str, since: &[u64], want: &[(Counter, u64)]) {
        let now = self.counters();
        for c in FLOW_EVENTS {
            let n = want.iter().find(|(w, _)| *w == c).map_or(0, |(_, n)| *n);
            assert_eq!(
                now[c as usize] - since[c as usize],
                n,
                "case {desc:?}: counter {}",
                COUNTER_NAMES[c as usize]
            );
        }
    }

    /// Every backend's active count equals its counted confirmed entries (exact counts).
    fn expect_counts_exact(&self, vips: &[Vip]) {
        let flows = self.gw.dp.maps.flows.list().unwrap();
        for v in vips {
            for b in self.gw.dp.maps.backends(v).unwrap() {
                let counted = flows
                    .iter()
                    .filter(|f| {
                        f.table == CtTable::Confirmed
                            && f.entry.backend_id == b.id
                            && f.entry.flags & CT_F_COUNTED != 0
                    })
                    .count() as u64;
                assert_eq!(
                    self.gw.dp.maps.flows.active(b.id).unwrap(),
                    counted,
                    "active flows of {} ({v}) = its counted confirmed entries",
                    b.addr
                );
            }
        }
        for f in &flows {
            match f.table {
                CtTable::Unconfirmed => assert!(
                    (f.entry.state == CT_S_OPENING || f.entry.state == CT_S_UDP)
                        && f.entry.flags & CT_F_COUNTED == 0,
                    "unconfirmed entry {f:?}"
                ),
                CtTable::Confirmed => assert!(
                    f.entry.state != CT_S_OPENING
                        && (f.entry.flags & CT_F_COUNTED != 0) == (f.entry.state != CT_S_CLOSED),
                    "confirmed entry {f:?}: counted exactly while not closed"
                ),
            }
        }
    }

    /// One verdict per packet, each as the cases say.
    fn finish(&self) -> Vec<u64> {
        let after = self.counters();
        let mut want: HashMap<usize, u64> = HashMap::new();
        for r in &self.reasons {
            *want.entry(*r as usize).or_default() += 1;
        }
        for i in 0..VERDICT_COUNT as usize {
            assert_eq!(
                after[i] - self.before[i],
                want.get(&i).copied().unwrap_or(0),
                "counter {}",
                COUNTER_NAMES[i]
            );
        }
        let total: u64 = (0..VERDICT_COUNT as usize)
            .map(|i| after[i] - self.before[i])
            .sum();
        assert_eq!(
            total, self.rows as u64,
            "verdict counters sum to the packets run"
        );
        after
    }
}

/// The flow-state events `expect_events` checks.
const FLOW_EVENTS: [Counter; 10] = [
    Counter::CtMiss,
    Counter::CtStale,
    Counter::CtExpired,
    Counter::CtConfirmed,
    Counter::CtFloodSkip,
    Counter::CtBadAck,
    Counter::CtReopened,
    Counter::CtRefused,
    Counter::RevStateless,
    Counter::RevNat,
];

/// `CT_F_*` bits by name, for messages.
fn flag_names(flags: u64) -> String {
    let names = [
        (CT_F_COUNTED, "counted"),
        (CT_F_FIN_CLIENT, "fin_client"),
        (CT_F_FIN_BACKEND, "fin_backend"),
        (CT_F_RST, "rst"),
        (CT_F_RST_BACKEND, "rst_backend"),
        (CT_F_SYNACK, "synack"),
        (CT_F_PICKUP, "pickup"),
        (CT_F_CLIENT_AGAIN, "client_again"),
    ];
    let mut out: Vec<String> = names
        .iter()
        .filter(|(f, _)| flags & f != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let rest = names.iter().fold(flags, |acc, (f, _)| acc & !f);
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join("|")
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn client(port: u16) -> SocketAddr {
    SocketAddr::new("10.0.0.2".parse().unwrap(), port)
}

fn client6(port: u16) -> SocketAddr {
    SocketAddr::new("fd00::2".parse().unwrap(), port)
}

fn syn(src: SocketAddr, dst: SocketAddr) -> Spec {
    Spec::tcp(CLIENT_MAC, GW_MAC_A, src, dst, Tcp::Syn)
}

fn ack(src: SocketAddr, dst: SocketAddr) -> Spec {
    Spec::tcp(CLIENT_MAC, GW_MAC_A, src, dst, Tcp::Ack)
}

fn tcp(src: SocketAddr, dst: SocketAddr, flags: Tcp) -> Spec {
    Spec::tcp(CLIENT_MAC, GW_MAC_A, src, dst, flags)
}

fn udp(src: SocketAddr, dst: SocketAddr) -> Spec {
    Spec::udp(CLIENT_MAC, GW_MAC_A, src, dst)
}

/// A TCP packet from backend `b` to client `c` (interface A).
fn from_backend(b: SocketAddr, c: SocketAddr, flags: Tcp) -> Spec {
    Spec::tcp(mac_of(b), GW_MAC_A, b, c, flags)
}

/// A UDP datagram from backend `b` to client `c`.
fn udp_from_backend(b: SocketAddr, c: SocketAddr) -> Spec {
    Spec::udp(mac_of(b), GW_MAC_A, b, c)
}

/// The backend's initial sequence number in the handshakes below.
const ISN_B: u32 = 0x3000_0000;

#[test]
fn fixture_table() {
    fixture_table_through(Kind::Xdp);
}

/// The same table through `lb_tc`: the same code over a socket buffer (the kernel's checksum
/// helpers, tc's actions), with the same outputs byte for byte.
#[test]
fn fixture_table_tc() {
    fixture_table_through(Kind::Tc);
}

fn fixture_table_through(kind: Kind) {
    let mut t = Table::with(
        if kind == Kind::Xdp {
            "fixtures"
        } else {
            "fixtures-tc"
        },
        kind,
    );

    // ---- configuration ----
    let web = vip("10.100.0.100:80/tcp");
    let web6 = vip("[fd10::100]:80/tcp");
    let dns = vip("10.100.0.100:53/udp");
    let dns6 = vip("[fd10::100]:53/udp");
    let far = vip("10.100.0.101:80/tcp"); // backend behind interface B
    let unresolved = vip("10.100.0.102:80/tcp"); // backend without a neighbour entry
    let blackholed = vip("10.100.0.103:80/tcp"); // backend behind a blackhole route
    let empty = vip("10.100.0.104:80/tcp"); // no backends
    let web_backends = [
        sa("10.1.0.11:8080"),
        sa("10.1.0.12:8080"),
        sa("10.1.0.13:8080"),
    ];
    {
        let m = &mut t.gw.dp.maps;
        m.add_vip(&web, 65_537).unwrap();
        for (b, w) in web_backends.iter().zip([1, 2, 3]) {
            m.add_backend(&web, *b, w).unwrap();
        }
        m.add_vip(&web6, 251).unwrap();
        m.set_backends(
            &web6,
            &[(sa("[fd01::11]:8080"), 1), (sa("[fd01::12]:8080"), 1)],
        )
        .unwrap();
        m.add_vip(&dns, 251).unwrap();
        m.add_backend(&dns, sa("10.1.0.11:5353"), 1).unwrap();
        m.add_vip(&dns6, 251).unwrap();
        m.add_backend(&dns6, sa("[fd01::13]:5353"), 1).unwrap();
        m.add_vip(&far, 251).unwrap();
        m.add_backend(&far, sa("10.2.0.21:80"), 1).unwrap();
        m.add_vip(&unresolved, 251).unwrap();
        m.add_backend(&unresolved, sa("10.1.0.99:80"), 1).unwrap();
        m.add_vip(&blackholed, 251).unwrap();
        m.add_backend(&blackholed, sa("10.9.0.1:80"), 1).unwrap();
        m.add_vip(&empty, 251).unwrap();
    }

    // ---- forwarding, IPv4 TCP ----
    let c1 = client(40_001);
    let b1 = t.predict(c1, &web);
    t.forward_to(
        "IPv4 TCP SYN to a VIP → destination rewritten to the chosen backend",
        &syn(c1, web.addr),
        b1,
    );
    t.forward_to(
        "the same flow again (ACK) → same backend, from conntrack",
        &ack(c1, web.addr),
        b1,
    );

    // Many flows, to check the table change below against: at least 32, and at least one on
    // each backend (whatever the hash seed).
    let mut flows: Vec<(SocketAddr, SocketAddr)> = Vec::new();
    for port in 41_000..41_200 {
        if flows.len() >= 32 && web_backends.iter().all(|w| flows.iter().any(|f| f.1 == *w)) {
            break;
        }
        let c = client(port);
        let b = t.predict(c, &web);
        t.forward_to(&format!("new flow from port {port}"), &syn(c, web.addr), b);
        flows.push((c, b));
    }

    // ---- the table changes: established flows keep their backend ----
    {
        let m = &mut t.gw.dp.maps;
        m.set_weight(&web, web_backends[0], 5).unwrap();
        m.set_weight(&web, web_backends[2], 1).unwrap();
        m.add_backend(&web, sa("10.2.0.21:8080"), 4).unwrap();
    }
    let moved = flows
        .iter()
        .filter(|(c, b)| t.predict(*c, &web) != *b)
        .count();
    assert!(
        moved >= 4,
        "the table change moved only {moved} of {} slots; pick a bigger change",
        flows.len()
    );
    for (c, b) in flows.clone() {
        t.forward_to(
            &format!("after the table change, flow from {c} keeps {b}"),
            &ack(c, web.addr),
            b,
        );
    }
    let c2 = client(40_002);
    let b2 = t.predict(c2, &web);
    t.forward_to(
        "a new flow after the change follows the new table",
        &syn(c2, web.addr),
        b2,
    );

    // ---- IPv6, UDP ----
    let c6 = client6(40_003);
    let b6 = t.predict(c6, &web6);
    t.forward_to("IPv6 TCP SYN to a VIP", &syn(c6, web6.addr), b6);
    t.forward_to("IPv6 TCP, same flow", &ack(c6, web6.addr), b6);
    let cu = client(40_004);
    t.forward_to(
        "IPv4 UDP to a VIP",
        &udp(cu, dns.addr),
        sa("10.1.0.11:5353"),
    );
    let mut zero = udp(client(40_005), dns.addr).build();
    let csum_at = l4_v4(&zero) + 6;
    zero[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
    let zero_out_spec = udp(client(40_005), sa("10.1.0.11:5353"))
        .with(
            GW_MAC_A,
            mac_of(sa("10.1.0.11:5353")),
            client(40_005),
            sa("10.1.0.11:5353"),
        )
        .hop();
    let mut zero_out = zero_out_spec.build();
    zero_out[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
    t.check(Case {
        desc: "IPv4 UDP without checksum (0) → forwarded, checksum stays 0".into(),
        ingress: t.gw.ifindex_a,
        input: zero,
        verdict: XDP_TX,
        output: zero_out,
        reason: Counter::Tx,
    });
    t.forward_to(
        "IPv6 UDP to a VIP",
        &udp(client6(40_006), dns6.addr),
        sa("[fd01::13]:5353"),
    );

    // ---- IPv4 options ----
    let mut opt = syn(client(40_007), web.addr);
    opt.ipv4_options = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x01]; // router alert, NOPs
    let bo = t.predict(client(40_007), &web);
    assert_eq!(opt.build()[IP] & 0x0f, 7);
    t.forward_to(
        "IPv4 with options (IHL 7) → L4 found after the options, rewritten",
        &opt,
        bo,
    );

    // ---- next hop ----
    let sf = syn(client(40_008), far.addr);
    t.check(Case {
        desc: "backend behind another interface → XDP_REDIRECT with that interface's MAC".into(),
        ingress: t.gw.ifindex_a,
        input: sf.build(),
        verdict: XDP_REDIRECT,
        output: sf
            .with(
                GW_MAC_B,
                mac_of(sa("10.2.0.21:80")),
                sf.src,
                sa("10.2.0.21:80"),
            )
            .hop()
            .build(),
        reason: Counter::Redirect,
    });
    let su = syn(client(40_009), unresolved.addr);
    t.check(Case {
        desc: "backend's MAC unknown → rewritten packet (TTL decremented) passed to the kernel to resolve it".into(),
        ingress: t.gw.ifindex_a,
        input: su.build(),
        verdict: XDP_PASS,
        output: su
            .with(su.smac, su.dmac, su.src, sa("10.1.0.99:80"))
            .hop()
            .build(),
        reason: Counter::PassNoNeigh,
    });
    let sb = syn(client(40_010), blackholed.addr);
    t.check(Case {
        desc: "backend behind a blackhole route → dropped".into(),
        ingress: t.gw.ifindex_a,
        input: sb.build(),
        verdict: XDP_DROP,
        output: sb
            .with(sb.smac, sb.dmac, sb.src, sa("10.9.0.1:80"))
            .hop()
            .build(),
        reason: Counter::DropFibUnreachable,
    });
    t.unchanged(
        "VIP without backends → dropped",
        syn(client(40_011), empty.addr).build(),
        XDP_DROP,
        Counter::DropNoBackend,
    );

    // ---- reverse path ----
    let (rc, rb) = flows[0];
    t.reply_as(
        "backend's reply → source rewritten back to the VIP",
        &from_backend(rb, rc, Tcp::SynAck),
        &web,
    );
    t.reply_as(
        "IPv6 backend's reply → source rewritten back to the VIP",
        &from_backend(b6, c6, Tcp::Ack),
        &web6,
    );
    t.reply_as(
        "UDP backend's reply → source rewritten back to the VIP",
        &udp_from_backend(sa("10.1.0.11:5353"), cu),
        &dns,
    );
    // ---- VLAN tags: looked through (one, or 802.1ad + 802.1Q), kept ----
    let q100 = [(TPID_8021Q, 100)];
    let qinq = [(TPID_8021AD, 10), (TPID_8021Q, 100)];
    let cv = client(40_900);
    let bv = t.predict(cv, &web);
    t.forward_tagged(
        "802.1Q-tagged IPv4 TCP SYN to a VIP → rewritten, XDP_TX with its tag",
        &syn(cv, web.addr),
        bv,
        &q100,
    );
    t.forward_tagged(
        "the same tagged flow (ACK) → same backend, from conntrack",
        &ack(cv, web.addr),
        bv,
        &q100,
    );
    let cv6 = client6(40_901);
    let bv6 = t.predict(cv6, &web6);
    t.forward_tagged(
        "802.1Q-tagged IPv6 TCP SYN to a VIP → rewritten, tag kept",
        &syn(cv6, web6.addr),
        bv6,
        &q100,
    );
    t.forward_tagged(
        "QinQ (802.1ad + 802.1Q) IPv4 UDP to a VIP → rewritten, both tags kept",
        &udp(client(40_902), dns.addr),
        sa("10.1.0.11:5353"),
        &qinq,
    );
    t.forward_tagged(
        "QinQ IPv6 UDP to a VIP → rewritten, both tags kept",
        &udp(client6(40_903), dns6.addr),
        sa("[fd01::13]:5353"),
        &qinq,
    );
    {
        let rep = from_backend(bv, cv, Tcp::Ack);
        t.check(Case {
            desc: "tagged backend reply → source rewritten to the VIP, tag kept".into(),
            ingress: t.gw.ifindex_a,
            input: tag(&rep.build(), &q100),
            verdict: XDP_TX,
            output: tag(
                &rep.with(GW_MAC_A, CLIENT_MAC, web.addr, rep.dst)
                    .hop()
                    .build(),
                &q100,
            ),
            reason: Counter::Tx,
        });
    }
    {
        // A route out of another interface: XDP cannot know that interface's VLANs (or put on
        // a VLAN device's tag): the rewritten packet goes to the kernel, MACs as they came.
        let cf = client(40_904);
        let sf = syn(cf, far.addr);
        t.check(Case {
            desc: "tagged, to a VIP whose backend is routed out of another interface → rewritten, given to the kernel".into(),
            ingress: t.gw.ifindex_a,
            input: tag(&sf.build(), &q100),
            verdict: XDP_PASS,
            output: tag(
                &sf.with(sf.smac, sf.dmac, cf, sa("10.2.0.21:80")).hop().build(),
                &q100,
            ),
            reason: Counter::PassFibOther,
        });
    }
    t.unchanged(
        "three VLAN tags → not IP to lb, passed",
        tag(
            &syn(client(40_905), web.addr).build(),
            &[(TPID_8021AD, 1), (TPID_8021Q, 2), (TPID_8021Q, 3)],
        ),
        XDP_PASS,
        Counter::PassNotIp,
    );
    {
        let mut cut = tag(&syn(client(40_906), web.addr).build(), &q100);
        cut.truncate(16);
        t.unchanged(
            "a frame that ends inside its VLAN tag → malformed Ethernet, passed",
            cut,
            XDP_PASS,
            Counter::PassMalformedEth,
        );
    }

    t.unchanged(
        "from the backend's service port to a client port lb never forwarded (direct traffic to the backend) → untouched",
        Spec::tcp(mac_of(rb), GW_MAC_A, rb, client(45_000), Tcp::SynAck).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.unchanged(
        "backend traffic from another port is not a reply → passes untouched",
        Spec::tcp(mac_of(rb), GW_MAC_A, sa("10.1.0.11:22"), rc, Tcp::Ack).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );

    // ---- not for a VIP: passes byte-identical ----
    t.unchanged(
        "client to a backend address directly → untouched",
        syn(client(40_012), sa("10.1.0.11:8080")).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.unchanged(
        "VIP address, wrong port → dropped (passed on, it would be routed back to the router)",
        syn(client(40_013), sa("10.100.0.100:81")).build(),
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    t.unchanged(
        "VIP address and port, wrong protocol (UDP to a TCP VIP) → dropped",
        udp(client(40_014), web.addr).build(),
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    t.unchanged(
        "IPv6 not for a VIP → untouched",
        syn(client6(40_015), sa("[fd01::11]:8080")).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    let echo_to = |dst: [u8; 4]| {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC_A)
            .ipv4([10, 0, 0, 2], dst, 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut out, b"ping")
            .unwrap();
        out
    };
    let icmp = echo_to([10, 100, 0, 100]);
    t.unchanged(
        "ICMP echo to a VIP address → dropped (lb does not answer it; not routed back)",
        icmp,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let icmp_other = echo_to([10, 100, 0, 7]);
    t.unchanged(
        "ICMP echo to another address → passed",
        icmp_other,
        XDP_PASS,
        Counter::PassNotTcpUdp,
    );
    let arp = {
        let mut f = etherparse::Ethernet2Header {
            source: CLIENT_MAC,
            destination: [0xff; 6],
            ether_type: etherparse::EtherType::ARP,
        }
        .to_bytes()
        .to_vec();
        f.extend_from_slice(&[0u8; 28]);
        f
    };
    t.unchanged("ARP → passed", arp, XDP_PASS, Counter::PassNotIp);

    // ---- fragments ----
    let mut mf = syn(client(40_016), web.addr).build();
    set_ipv4_u16(&mut mf, 6, 0x2000);
    t.unchanged(
        "IPv4 first fragment (MF) to a VIP → dropped, lb does not reassemble",
        mf,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let mut later = udp(client(40_017), dns.addr).build();
    set_ipv4_u16(&mut later, 6, 0x0010);
    t.unchanged(
        "IPv4 later fragment (offset 128) to a VIP → dropped",
        later,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let mut frag_other = udp(client(40_017), sa("10.100.0.7:53")).build();
    set_ipv4_u16(&mut frag_other, 6, 0x0010);
    t.unchanged(
        "IPv4 fragment to another address → passed",
        frag_other,
        XDP_PASS,
        Counter::PassFragment,
    );
    let mut frag6 = udp(client6(40_018), dns6.addr).build();
    frag6[IP + 6] = 44;
    t.unchanged(
        "IPv6 fragment header, to a VIP → dropped",
        frag6,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let mut hbh = udp(client6(40_019), dns6.addr).build();
    hbh[IP + 6] = 0;
    t.unchanged(
        "IPv6 hop-by-hop extension header, to a VIP → dropped",
        hbh,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let mut hbh_other = udp(client6(40_019), sa("[fd01::11]:53")).build();
    hbh_other[IP + 6] = 0;
    t.unchanged(
        "IPv6 hop-by-hop extension header, to another address → passed",
        hbh_other,
        XDP_PASS,
        Counter::PassIpv6Ext,
    );

    // ---- malformed: passed to the kernel, which validates and drops (to a VIP address with a
    // whole IP header: dropped here, not routed back) ----
    let good = syn(client(40_020), web.addr).build();
    t.unchanged(
        "Ethernet header only",
        good[..14].to_vec(),
        XDP_PASS,
        Counter::PassMalformedIp,
    );
    t.unchanged(
        "IPv4 header cut at 10 bytes",
        good[..24].to_vec(),
        XDP_PASS,
        Counter::PassMalformedIp,
    );
    t.unchanged(
        "IPv4 total length beyond the frame",
        good[..good.len() - 5].to_vec(),
        XDP_PASS,
        Counter::PassMalformedIp,
    );
    let mut ihl4 = good.clone();
    set_ipv4_u8(&mut ihl4, 0, 0x44);
    t.unchanged("IPv4 IHL 4", ihl4, XDP_PASS, Counter::PassMalformedIp);
    let mut v5 = good.clone();
    set_ipv4_u8(&mut v5, 0, 0x55);
    t.unchanged(
        "IP version 5 in an IPv4 frame",
        v5,
        XDP_PASS,
        Counter::PassMalformedIp,
    );
    let good6 = syn(client6(40_021), web6.addr).build();
    t.unchanged(
        "IPv6 header cut",
        good6[..14 + 30].to_vec(),
        XDP_PASS,
        Counter::PassMalformedIp,
    );
    let mut cut_tcp = good.clone();
    set_ipv4_u16(&mut cut_tcp, 2, 20 + 12);
    cut_tcp.truncate(14 + 32);
    t.unchanged(
        "TCP header cut (12 of 20 bytes) (to a VIP address) → dropped",
        cut_tcp,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let mut doff4 = good.clone();
    doff4[l4_v4(&good) + 12] = 0x40;
    t.unchanged(
        "TCP data offset 4 (to a VIP address) → dropped",
        doff4,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let mut doff15 = good.clone();
    doff15[l4_v4(&good) + 12] = 0xf0;
    t.unchanged(
        "TCP data offset beyond the packet (to a VIP address) → dropped",
        doff15,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let mut udp_short = udp(client(40_022), dns.addr).build();
    let at = l4_v4(&udp_short) + 4;
    udp_short[at..at + 2].copy_from_slice(&4u16.to_be_bytes());
    t.unchanged(
        "UDP length 4 (to a VIP address) → dropped",
        udp_short,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let mut cut_udp = udp(client(40_023), dns.addr).build();
    set_ipv4_u16(&mut cut_udp, 2, 20 + 6);
    cut_udp.truncate(14 + 26);
    fix_ipv4_csum(&mut cut_udp);
    t.unchanged(
        "UDP header cut (6 of 8 bytes) (to a VIP address) → dropped",
        cut_udp,
        XDP_DROP,
        Counter::DropVipUnclaimed,
    );
    let other = syn(client(40_024), sa("10.1.0.11:8080")).build();
    let mut doff4_other = other.clone();
    doff4_other[l4_v4(&other) + 12] = 0x40;
    t.unchanged(
        "TCP data offset 4, to another address → passed",
        doff4_other,
        XDP_PASS,
        Counter::PassMalformedL4,
    );

    // ---- draining: weight 0 keeps established flows, takes no new ones ----
    let drained = web_backends[0];
    let (dc, _) = *flows
        .iter()
        .find(|(_, b)| *b == drained)
        .expect("some flow is on the backend to drain");
    t.gw.dp.maps.set_weight(&web, drained, 0).unwrap();
    t.forward_to(
        "drained backend keeps its established flow",
        &ack(dc, web.addr),
        drained,
    );
    for port in 42_000..42_064 {
        let c = client(port);
        let b = t.predict(c, &web);
        assert_ne!(
            b, drained,
            "the table still gives a slot to the drained backend"
        );
        t.forward_to(
            &format!("new flow from port {port} avoids the drained backend"),
            &syn(c, web.addr),
            b,
        );
    }

    // ---- removal: a flow whose backend is gone is selected afresh ----
    let removed = web_backends[1];
    let (rmc, _) = *flows
        .iter()
        .find(|(_, b)| *b == removed)
        .expect("some flow is on the backend to remove");
    let stale_before = t.gw.dp.maps.counters.verdicts().unwrap()[Counter::CtStale as usize];
    t.gw.dp.maps.del_backend(&web, removed).unwrap();
    let nb = t.predict(rmc, &web);
    assert_ne!(nb, removed);
    t.forward_to(
        "flow of a removed backend → selected afresh from the table",
        &ack(rmc, web.addr),
        nb,
    );
    let stale_after = t.gw.dp.maps.counters.verdicts().unwrap()[Counter::CtStale as usize];
    assert_eq!(
        stale_after - stale_before,
        1,
        "ct_stale counts the re-selection"
    );
    t.unchanged(
        "the removed backend's replies are no longer rewritten",
        Spec::tcp(mac_of(removed), GW_MAC_A, removed, rmc, Tcp::Ack).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );

    // ---- next-hop cache: filled by the route lookups of the rows above; a fresh entry is
    // used as written, anything else is looked up again (and the lookup rewrites it) ----
    let shown = lb::nexthop::show(&t.gw.dp.maps).unwrap();
    let row = |b: &str| shown.iter().find(|r| r.backend == b).unwrap().clone();
    let near = row("10.1.0.11:8080");
    assert_eq!(
        (near.dev.as_deref(), near.mac.as_deref(), near.on_link),
        (Some("fxa"), Some("02:00:00:00:01:11"), true),
        "the data plane cached its lookup: {near:?}"
    );
    let far_row = row("10.2.0.21:80");
    assert_eq!(
        (far_row.dev.as_deref(), far_row.on_link),
        (Some("fxb"), true)
    );
    assert_eq!(
        row("10.1.0.99:80").mac,
        None,
        "no neighbour entry: nothing cached"
    );
    assert_eq!(
        row("10.9.0.1:80").mac,
        None,
        "blackhole route: nothing cached"
    );
    // A long maximum age, so that "fresh" cannot turn stale while the rows run.
    let conf = t.gw.dp.maps.conf().unwrap();
    t.gw.dp
        .maps
        .set_conf(lb_common::GlobalConf {
            nexthop_max_age_ms: 60_000,
            ..conf
        })
        .unwrap();
    let far_id = t.gw.dp.maps.backends(&far).unwrap()[0].id;
    let far_generation =
        t.gw.dp
            .maps
            .backend_entry(far_id)
            .unwrap()
            .unwrap()
            .generation;
    let ifindex_a = t.gw.ifindex_a;
    let bogus = |checked_ns: u64, generation: u32, max_len: u16| lb_common::NextHop {
        checked_ns,
        ifindex: ifindex_a,
        generation,
        dmac: [2, 0, 0, 0, 0, 0xdd],
        smac: [2, 0, 0, 0, 0, 0xee],
        max_len,
        flags: lb_common::NEXTHOP_F_VALID | lb_common::NEXTHOP_F_ONLINK,
        _pad: [0; 8],
    };
    let counter = |t: &Table, c: Counter| t.gw.dp.maps.counters.verdicts().unwrap()[c as usize];
    // Each row: a cache entry as given, then a new flow to `far` from its own port.
    let mut port = 43_100;
    let mut row_with =
        |t: &mut Table, desc: &str, nh: lb_common::NextHop, used: bool, fills: u64| {
            t.gw.dp.maps.nexthops.set(far_id, nh).unwrap();
            let (cached0, looked0) = (
                counter(t, Counter::NextHopCached),
                counter(t, Counter::NextHopLookedUp),
            );
            let s = syn(client(port), far.addr);
            port += 1;
            if used {
                t.check(Case {
                    desc: desc.into(),
                    ingress: t.gw.ifindex_a,
                    input: s.build(),
                    verdict: XDP_TX,
                    output: s
                        .with(
                            [2, 0, 0, 0, 0, 0xee],
                            [2, 0, 0, 0, 0, 0xdd],
                            s.src,
                            sa("10.2.0.21:80"),
                        )
                        .hop()
                        .build(),
                    reason: Counter::Tx,
                });
            } else {
                t.forward_to(desc, &s, sa("10.2.0.21:80"));
            }
            let cached = counter(t, Counter::NextHopCached) - cached0;
            let looked = counter(t, Counter::NextHopLookedUp) - looked0;
            assert_eq!(
                (cached, looked),
                if used { (1, 0) } else { (0, fills) },
                "{desc}: nexthop_cached, nexthop_looked_up"
            );
        };
    let now = lb::sweep::now_ns(&t.gw.dp.maps).unwrap();
    row_with(
        &mut t,
        "fresh cached next hop → used as written (XDP_TX with its MACs), no route lookup",
        bogus(now, far_generation, 1500),
        true,
        0,
    );
    row_with(
        &mut t,
        "cached next hop older than the maximum age (stale) → route lookup: REDIRECT to fxb",
        bogus(now.wrapping_sub(61_000_000_000), far_generation, 1500),
        false,
        1,
    );
    let after = lb::nexthop::show(&t.gw.dp.maps).unwrap();
    let refreshed = after.iter().find(|r| r.backend == "10.2.0.21:80").unwrap();
    assert_eq!(
        (refreshed.dev.as_deref(), refreshed.mac.as_deref()),
        (far_row.dev.as_deref(), far_row.mac.as_deref()),
        "the lookup replaced the stale entry: {refreshed:?}"
    );
    assert!(refreshed.age_ms.unwrap() < 10_000, "{refreshed:?}");
    row_with(
        &mut t,
        "cached next hop of the id's previous holder (other generation) → route lookup",
        bogus(now, far_generation.wrapping_add(1), 1500),
        false,
        1,
    );
    row_with(
        &mut t,
        "cached next hop checked only for shorter packets (max_len) → route lookup",
        bogus(now, far_generation, 40),
        false,
        1,
    );
    row_with(
        &mut t,
        "cached next hop not marked valid → route lookup",
        lb_common::NextHop {
            flags: 0,
            ..bogus(now, far_generation, 1500)
        },
        false,
        1,
    );
    t.gw.dp
        .maps
        .set_conf(lb_common::GlobalConf {
            nexthop_max_age_ms: lb_common::NEXTHOP_CACHE_OFF,
            ..conf
        })
        .unwrap();
    row_with(
        &mut t,
        "cache off (nexthop_max_age_ms = 0): a fresh entry is ignored → route lookup, nothing cached",
        bogus(now, far_generation, 1500),
        false,
        0,
    );
    t.gw.dp.maps.set_conf(conf).unwrap();
    let backends: usize = (t.gw.dp.maps.vips().unwrap().iter())
        .map(|(v, _)| t.gw.dp.maps.backends(v).unwrap().len())
        .sum();
    assert_eq!(
        lb::nexthop::clear(&mut t.gw.dp.maps).unwrap() as usize,
        backends
    );
    assert!(
        lb::nexthop::show(&t.gw.dp.maps)
            .unwrap()
            .iter()
            .all(|r| r.mac.is_none() && r.cpus == 0),
        "cleared"
    );
    let b = t.predict_existing(client(43_100), &far);
    t.forward_to(
        "after clearing the cache → route lookup again",
        &ack(client(43_100), far.addr),
        b,
    );

    // ---- the address hint orders the lookups and decides nothing ----
    let web_slot = {
        let e = web.endpoint();
        lb_common::vip_addr_slot(e.family, &e.addr_be)
    };
    t.gw.dp.maps.set_address_hint(web_slot, false).unwrap();
    let b = t.predict_existing(client(43_100), &far);
    t.forward_to(
        "hint missing for a VIP's address → VIP lookup first, same verdict",
        &ack(client(43_100), far.addr),
        b,
    );
    let (hc, hb) = *flows.iter().find(|(_, b)| *b != removed).unwrap();
    t.forward_to(
        "hint missing: an established flow keeps its backend",
        &ack(hc, web.addr),
        hb,
    );
    let other = sa("10.100.7.7:80");
    let other_slot = lb_common::vip_addr_slot(
        lb_common::FAMILY_V4,
        &[u32::from_ne_bytes([10, 100, 7, 7]), 0, 0, 0],
    );
    t.gw.dp.maps.set_address_hint(other_slot, true).unwrap();
    t.unchanged(
        "hint set for an address no VIP has → conntrack, then VIP lookup: not a VIP",
        syn(client(43_200), other).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.gw.dp.maps.mirror_vips().unwrap();
    t.gw.dp.maps.mirror_vips().unwrap();
    assert!(t.gw.dp.maps.mirror_matches().unwrap());

    // ---- the port filter follows the configuration ----
    {
        use lb_common::{PORT_F_BACKEND, PORT_F_VIP};
        let m = &mut t.gw.dp.maps;
        assert_eq!(m.port_flags(80).unwrap() & PORT_F_VIP, PORT_F_VIP);
        assert_eq!(m.port_flags(53).unwrap(), PORT_F_VIP);
        assert_eq!(m.port_flags(8080).unwrap(), PORT_F_BACKEND);
        assert_eq!(m.port_flags(81).unwrap(), 0);
        m.del_vip(&dns).unwrap();
        assert_eq!(
            m.port_flags(53).unwrap(),
            PORT_F_VIP,
            "the IPv6 DNS VIP still uses 53"
        );
        m.del_vip(&dns6).unwrap();
        assert_eq!(m.port_flags(53).unwrap(), 0);
        assert_eq!(
            m.port_flags(5353).unwrap(),
            0,
            "no backend on 5353 any more"
        );
        assert_eq!(m.port_flags(8080).unwrap(), PORT_F_BACKEND);
    }

    // ---- counters: one verdict per packet, each as the cases say ----
    let after = t.finish();
    assert_eq!(
        after[Counter::RevNat as usize] - t.before[Counter::RevNat as usize],
        4, // three untagged replies and one tagged
    );
    let info = t.gw.dp.maps.vip(&web).unwrap();
    let s = t.gw.dp.maps.counters.vip(info.vip_id).unwrap();
    let (packets, new_flows) = t.to_vip[&(web.addr, false)];
    println!("{web}: {packets} packets given a backend, {new_flows} of them new flows");
    assert!(packets > 100, "the table sends {packets} packets to {web}");
    assert_eq!(
        (s.packets, s.new_flows, s.rev_packets),
        // Replies: one untagged, one tagged.
        (packets, new_flows, 2),
        "{web}'s traffic counters: packets, new flows, replies"
    );
    println!("{} fixture cases passed", t.rows);
}

/// The ways a flow's entry is made, confirmed, moved between states, closed, reopened and
/// expired, with the checks before any state and the TTL; each row checks the output bytes,
/// the entry (table, state, flags, backend), the active counts and the flow-state counters.
#[test]
fn flow_state_table() {
    flow_state_table_through(Kind::Xdp);
}

#[test]
fn flow_state_table_tc() {
    flow_state_table_through(Kind::Tc);
}

fn flow_state_table_through(kind: Kind) {
    let mut t = Table::with(
        if kind == Kind::Xdp {
            "flowstate"
        } else {
            "flowstate-tc"
        },
        kind,
    );
    let web = vip("10.100.0.100:80/tcp");
    let web6 = vip("[fd10::100]:80/tcp");
    let dns = vip("10.100.0.100:53/udp");
    let dns6 = vip("[fd10::100]:53/udp");
    let rnd = vip("10.100.0.106:80/tcp"); // random
    let short = vip("10.100.0.105:80/tcp"); // timeouts of 1 s, set before the sleep below
    let short_udp = vip("10.100.0.105:53/udp");
    let va = vip("10.100.0.107:80/tcp"); // one backend, two VIPs
    let vb = vip("10.100.0.108:443/tcp");
    let reused = vip("10.100.0.109:80/tcp"); // a backend replaced by one with its id
    let shared = sa("10.1.0.11:9000");
    let (w1, w2) = (sa("10.1.0.11:8080"), sa("10.1.0.12:8080"));
    let dns_b = sa("10.1.0.13:5353");
    let dns6_b = sa("[fd01::13]:5353");
    let short_b = sa("10.1.0.13:8080");
    let short_udp_b = sa("10.1.0.12:5353");
    let rnd_bs = [
        sa("10.1.0.11:8081"),
        sa("10.1.0.12:8081"),
        sa("10.1.0.13:8081"),
    ];
    {
        let m = &mut t.gw.dp.maps;
        m.add_vip(&web, 251).unwrap();
        m.set_backends(&web, &[(w1, 1), (w2, 1)]).unwrap();
        m.add_vip(&web6, 251).unwrap();
        m.set_backends(
            &web6,
            &[(sa("[fd01::11]:8080"), 1), (sa("[fd01::12]:8080"), 1)],
        )
        .unwrap();
        m.add_vip(&dns, 251).unwrap();
        m.add_backend(&dns, dns_b, 1).unwrap();
        m.add_vip(&dns6, 251).unwrap();
        m.add_backend(&dns6, dns6_b, 1).unwrap();
        m.add_vip(&rnd, 251).unwrap();
        m.set_algorithm(&rnd, Algorithm::Random).unwrap();
        m.set_backends(&rnd, &rnd_bs.map(|b| (b, 1))).unwrap();
        m.add_vip(&short, 251).unwrap();
        m.add_backend(&short, short_b, 1).unwrap();
        m.add_vip(&short_udp, 251).unwrap();
        m.add_backend(&short_udp, short_udp_b, 1).unwrap();
        m.add_vip(&va, 251).unwrap();
        m.add_backend(&va, shared, 1).unwrap();
        m.add_vip(&vb, 251).unwrap();
        m.add_backend(&vb, shared, 1).unwrap();
        m.add_vip(&reused, 251).unwrap();
        m.add_backend(&reused, sa("10.1.0.11:8090"), 1).unwrap();
        // New VIPs get the default timeouts.
        let id = m.vip(&web).unwrap().vip_id;
        assert_eq!(m.timeouts(id).unwrap(), Timeouts::DEFAULT);
    }
    let all_vips = [web, web6, dns, dns6, rnd, short, short_udp, va, vb, reused];
    let confirmed = |state, flags, backend| Want {
        table: CtTable::Confirmed,
        state,
        flags,
        backend,
    };
    let unconfirmed = |state, flags, backend| Want {
        table: CtTable::Unconfirmed,
        state,
        flags,
        backend,
    };

    // ---- checks before any state: martian sources, port 0, TTL ----
    let martians_v4 = [
        "0.1.2.3",         // this network
        "127.0.0.1",       // loopback
        "169.254.1.1",     // link-local
        "224.0.0.1",       // multicast
        "239.255.255.250", // multicast
        "240.0.0.1",       // reserved
        "255.255.255.255", // broadcast
        "10.100.0.100",    // the VIP itself
    ];
    for (i, a) in martians_v4.iter().enumerate() {
        let src = SocketAddr::new(a.parse().unwrap(), 50_000 + i as u16);
        let desc = format!("TCP SYN from martian source {a} → dropped, no entry");
        let since = t.counters();
        t.unchanged(
            &desc,
            syn(src, web.addr).build(),
            XDP_DROP,
            Counter::DropMartian,
        );
        t.expect_no_entry(&desc, src, &web);
        t.expect_events(&desc, &since, &[]);
    }
    let src = sa("127.0.0.1:50010");
    t.unchanged(
        "UDP from loopback → dropped",
        udp(src, dns.addr).build(),
        XDP_DROP,
        Counter::DropMartian,
    );
    t.expect_no_entry("UDP from loopback", src, &dns);
    let martians_v6 = [
        "::",        // unspecified
        "::1",       // loopback
        "fe80::1",   // link-local
        "febf::1",   // link-local (fe80::/10)
        "ff02::1",   // multicast
        "fd10::100", // the VIP itself
    ];
    for (i, a) in martians_v6.iter().enumerate() {
        let src = SocketAddr::new(a.parse().unwrap(), 50_020 + i as u16);
        let desc = format!("IPv6 TCP SYN from martian source {a} → dropped, no entry");
        t.unchanged(
            &desc,
            syn(src, web6.addr).build(),
            XDP_DROP,
            Counter::DropMartian,
        );
        t.expect_no_entry(&desc, src, &web6);
    }
    // Just outside the martian ranges: ordinary clients.
    for (i, a) in [
        "1.0.0.1",
        "126.255.255.255",
        "128.0.0.1",
        "169.253.255.255",
        "169.255.0.1",
        "223.255.255.254",
    ]
    .iter()
    .enumerate()
    {
        let src = SocketAddr::new(a.parse().unwrap(), 50_030 + i as u16);
        let b = t.predict(src, &web);
        let desc = format!("TCP SYN from {a} (not martian) → forwarded");
        t.forward_to(&desc, &syn(src, web.addr), b);
        t.expect_entry(&desc, src, &web, unconfirmed(CT_S_OPENING, 0, b));
    }
    for (i, a) in ["fec0::1", "fe7f::1", "fd00::1:2"].iter().enumerate() {
        let src = SocketAddr::new(a.parse().unwrap(), 50_040 + i as u16);
        let b = t.predict(src, &web6);
        t.forward_to(
            &format!("IPv6 TCP SYN from {a} (not martian) → forwarded"),
            &syn(src, web6.addr),
            b,
        );
    }
    for (desc, spec, v) in [
        ("TCP SYN from port 0", syn(client(0), web.addr), &web),
        ("UDP from port 0", udp(client(0), dns.addr), &dns),
        (
            "IPv6 TCP SYN from port 0",
            syn(client6(0), web6.addr),
            &web6,
        ),
        (
            "martian source and port 0 → counted as port 0",
            syn(sa("127.0.0.1:0"), web.addr),
            &web,
        ),
    ] {
        t.unchanged(desc, spec.build(), XDP_DROP, Counter::DropPortZero);
        t.expect_no_entry(desc, spec.src, v);
    }
    for (desc, spec, v) in [
        (
            "TCP SYN with TTL 1 → to the kernel (time exceeded), no entry",
            syn(client(50_050), web.addr).ttl(1),
            &web,
        ),
        (
            "TCP SYN with TTL 0 → to the kernel",
            syn(client(50_051), web.addr).ttl(0),
            &web,
        ),
        (
            "UDP with TTL 1 → to the kernel",
            udp(client(50_052), dns.addr).ttl(1),
            &dns,
        ),
        (
            "IPv6 TCP SYN with hop limit 1 → to the kernel",
            syn(client6(50_053), web6.addr).ttl(1),
            &web6,
        ),
        (
            "IPv6 UDP with hop limit 1 → to the kernel",
            udp(client6(50_054), dns6.addr).ttl(1),
            &dns6,
        ),
    ] {
        let since = t.counters();
        t.unchanged(desc, spec.build(), XDP_PASS, Counter::PassTtlExceeded);
        t.expect_no_entry(desc, spec.src, v);
        t.expect_events(desc, &since, &[]);
    }
    let c = client(50_055);
    let b = t.predict(c, &web);
    t.forward_to(
        "TTL 2 → forwarded with TTL 1, IPv4 checksum updated",
        &syn(c, web.addr).ttl(2),
        b,
    );
    let c = client(50_056);
    let b = t.predict(c, &web);
    t.forward_to(
        "TTL 255 → forwarded with 254",
        &syn(c, web.addr).ttl(255),
        b,
    );
    let c = client6(50_057);
    let b = t.predict(c, &web6);
    t.forward_to(
        "IPv6 hop limit 2 → forwarded with 1",
        &syn(c, web6.addr).ttl(2),
        b,
    );
    let c = client(50_058);
    t.forward_to(
        "UDP TTL 9 → forwarded with 8, UDP checksum still valid",
        &udp(c, dns.addr).ttl(9),
        dns_b,
    );

    // ---- NAT TCP: SYN → SYN-ACK → ACK confirms ----
    let hc = client(50_100);
    let hb = t.predict(hc, &web);
    let active0 = t.active(&web, hb);
    let since = t.counters();
    let d = "handshake: client SYN → new unconfirmed entry (opening)";
    t.forward_to(d, &syn(hc, web.addr), hb);
    t.expect_entry(d, hc, &web, unconfirmed(CT_S_OPENING, 0, hb));
    t.expect_events(d, &since, &[(Counter::CtMiss, 1)]);
    let d = "handshake: backend SYN-ACK → rewritten to the VIP; entry records the ACK to expect";
    let since = t.counters();
    let synack = from_backend(hb, hc, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1);
    t.reply_as(d, &synack, &web);
    let e = t.expect_entry(d, hc, &web, unconfirmed(CT_S_OPENING, CT_F_SYNACK, hb));
    assert_eq!(e.ack_expect, ISN_B + 1, "case {d:?}: ack_expect");
    t.expect_events(d, &since, &[(Counter::RevNat, 1)]);
    t.expect_active(d, &web, hb, active0);
    let d = "handshake: client ACK of the SYN-ACK → confirmed (established, counted)";
    let since = t.counters();
    t.forward_to(d, &ack(hc, web.addr).seq_ack(SEQ + 1, ISN_B + 1), hb);
    t.expect_entry(d, hc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, hb));
    t.expect_events(d, &since, &[(Counter::CtConfirmed, 1)]);
    t.expect_active(d, &web, hb, active0 + 1);
    let d = "established: data both ways, nothing changes";
    t.forward_to(d, &ack(hc, web.addr).seq_ack(SEQ + 1, ISN_B + 1), hb);
    t.reply_as(
        d,
        &from_backend(hb, hc, Tcp::Ack).seq_ack(ISN_B + 1, SEQ + 19),
        &web,
    );
    t.expect_entry(d, hc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, hb));
    t.expect_active(d, &web, hb, active0 + 1);
    let d = "established: a SYN (spoofed, or a stray retransmission) → same entry, not re-selected";
    let since = t.counters();
    t.forward_to(d, &syn(hc, web.addr), hb);
    t.expect_entry(d, hc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, hb));
    t.expect_events(d, &since, &[]);
    t.expect_active(d, &web, hb, active0 + 1);
    // A confirmed flow finds its VIP in the mirror by id; a stale mirror slot (empty, or
    // naming another endpoint) sends it the VIP-lookup way, with the same result.
    let web_id = t.gw.dp.maps.vip(&web).unwrap().vip_id;
    let est = ack(hc, web.addr).seq_ack(SEQ + 1, ISN_B + 1);
    t.gw.dp
        .maps
        .set_mirror_slot(web_id, lb_common::VipById::default())
        .unwrap();
    t.forward_to(
        "established, mirror slot empty → VIP lookup: same backend",
        &est,
        hb,
    );
    // (With dsr-l2 in it: were the slot used, the packet would leave unrewritten.)
    let info = lb_common::VipInfo {
        fwd: lb_common::FWD_DSR_L2,
        ..t.gw.dp.maps.vip(&web).unwrap()
    };
    let stale = lb_common::VipById {
        vip: dns.endpoint(),
        info,
    };
    t.gw.dp.maps.set_mirror_slot(web_id, stale).unwrap();
    t.forward_to(
        "established, mirror slot naming another endpoint → VIP lookup: same backend, NAT",
        &est,
        hb,
    );
    t.gw.dp.maps.mirror_vips().unwrap();
    assert!(t.gw.dp.maps.mirror_matches().unwrap());
    t.expect_entry(d, hc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, hb));
    t.expect_active(d, &web, hb, active0 + 1);

    // IPv6, the same handshake.
    let hc6 = client6(50_101);
    let hb6 = t.predict(hc6, &web6);
    t.forward_to("IPv6 handshake: SYN", &syn(hc6, web6.addr), hb6);
    t.reply_as(
        "IPv6 handshake: SYN-ACK → rewritten, hop limit decremented",
        &from_backend(hb6, hc6, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &web6,
    );
    let d = "IPv6 handshake: ACK → confirmed";
    t.forward_to(d, &ack(hc6, web6.addr).seq_ack(SEQ + 1, ISN_B + 1), hb6);
    t.expect_entry(
        d,
        hc6,
        &web6,
        confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, hb6),
    );
    t.expect_active(d, &web6, hb6, 1);

    // ---- NAT TCP: an ACK that does not acknowledge the SYN-ACK does not confirm ----
    // The window the rows below are written for (literal, so that a change to the shared
    // constant shows here).
    assert_eq!(ACK_WINDOW, 1 << 16, "ACK_WINDOW");
    let bc = client(50_102);
    let bb = t.predict(bc, &web);
    let active0 = t.active(&web, bb);
    t.forward_to("bad ack: SYN", &syn(bc, web.addr), bb);
    t.reply_as(
        "bad ack: SYN-ACK",
        &from_backend(bb, bc, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &web,
    );
    for (d, ackn) in [
        (
            "bad ack: ACK one below the SYN-ACK's sequence + 1 → not confirmed",
            ISN_B,
        ),
        (
            "bad ack: ACK just past the window (2^16) → not confirmed",
            ISN_B.wrapping_add(1 + (1 << 16)),
        ),
        (
            "bad ack: ACK 2^19 past (inside the old 1 MiB window) → not confirmed",
            ISN_B.wrapping_add(1 + (1 << 19)),
        ),
        ("bad ack: a blind guess → not confirmed", 0x2000_0000),
    ] {
        let since = t.counters();
        t.forward_to(d, &ack(bc, web.addr).seq_ack(SEQ + 1, ackn), bb);
        t.expect_entry(d, bc, &web, unconfirmed(CT_S_OPENING, CT_F_SYNACK, bb));
        t.expect_events(d, &since, &[(Counter::CtBadAck, 1)]);
        t.expect_active(d, &web, bb, active0);
    }
    let d = "bad ack: a SYN retransmission on the unconfirmed flow → same backend, no change";
    let since = t.counters();
    t.forward_to(d, &syn(bc, web.addr), bb);
    t.expect_entry(d, bc, &web, unconfirmed(CT_S_OPENING, CT_F_SYNACK, bb));
    t.expect_events(d, &since, &[]);
    let d = "bad ack: ACK at the far end of the window (2^16 - 1 past) → confirmed";
    let since = t.counters();
    t.forward_to(
        d,
        &ack(bc, web.addr).seq_ack(SEQ + 1, ISN_B.wrapping_add(1 << 16)),
        bb,
    );
    t.expect_entry(d, bc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, bb));
    t.expect_events(d, &since, &[(Counter::CtConfirmed, 1)]);
    t.expect_active(d, &web, bb, active0 + 1);

    // A client ACK before any SYN-ACK: remembered, not confirming, not a bad ack.
    let ec = client(50_103);
    let eb = t.predict(ec, &web);
    t.forward_to("early ACK: SYN", &syn(ec, web.addr), eb);
    let d = "early ACK: client ACK before the backend's SYN-ACK → not confirmed";
    let since = t.counters();
    t.forward_to(d, &ack(ec, web.addr).seq_ack(SEQ + 1, ISN_B + 1), eb);
    t.expect_entry(
        d,
        ec,
        &web,
        unconfirmed(CT_S_OPENING, CT_F_CLIENT_AGAIN, eb),
    );
    t.expect_events(d, &since, &[]);

    // ---- unconfirmed flows refused by the backend ----
    let rc = client(50_104);
    let rb = t.predict(rc, &web);
    t.forward_to("refused: SYN", &syn(rc, web.addr), rb);
    let d =
        "refused: backend answers the SYN with RST+ACK → rewritten to the client, entry removed";
    let since = t.counters();
    t.reply_as(
        d,
        &from_backend(rb, rc, Tcp::RstAck).seq_ack(0, SEQ + 1),
        &web,
    );
    t.expect_no_entry(d, rc, &web);
    t.expect_events(d, &since, &[(Counter::CtRefused, 1), (Counter::RevNat, 1)]);

    // ---- picked up mid-stream ----
    let pc = client(50_105);
    let pb = t.predict(pc, &web);
    let active0 = t.active(&web, pb);
    let d = "pickup: ACK without an entry → selected, unconfirmed entry marked pickup";
    let since = t.counters();
    t.forward_to(d, &ack(pc, web.addr), pb);
    t.expect_entry(d, pc, &web, unconfirmed(CT_S_OPENING, CT_F_PICKUP, pb));
    t.expect_events(d, &since, &[(Counter::CtMiss, 1)]);
    let d = "pickup: the backend's answer → confirmed";
    let since = t.counters();
    t.reply_as(d, &from_backend(pb, pc, Tcp::Ack), &web);
    t.expect_entry(d, pc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, pb));
    t.expect_events(
        d,
        &since,
        &[(Counter::CtConfirmed, 1), (Counter::RevNat, 1)],
    );
    t.expect_active(d, &web, pb, active0 + 1);

    let qc = client(50_106);
    let qb = t.predict(qc, &web);
    let active0 = t.active(&web, qb);
    t.forward_to("spoofed ACK: picked up", &ack(qc, web.addr), qb);
    let d = "spoofed ACK: the backend answers RST → rewritten, entry removed, never counted";
    let since = t.counters();
    t.reply_as(
        d,
        &from_backend(qb, qc, Tcp::Rst).seq_ack(0x2000_0000, 0),
        &web,
    );
    t.expect_no_entry(d, qc, &web);
    t.expect_events(d, &since, &[(Counter::CtRefused, 1), (Counter::RevNat, 1)]);
    t.expect_active(d, &web, qb, active0);

    let d = "RST without an entry → forwarded by the table, no entry made";
    let xc = client(50_107);
    let xb = t.predict(xc, &web);
    let since = t.counters();
    t.forward_to(d, &tcp(xc, web.addr, Tcp::Rst), xb);
    t.expect_no_entry(d, xc, &web);
    t.expect_events(d, &since, &[(Counter::CtMiss, 1)]);
    let d = "RST+ACK without an entry → no entry either";
    t.forward_to(d, &tcp(xc, web.addr, Tcp::RstAck), xb);
    t.expect_no_entry(d, xc, &web);

    // ---- NAT UDP: the first reply confirms ----
    let uc = client(50_108);
    let active0 = t.active(&dns, dns_b);
    let d = "UDP: first datagram → unconfirmed entry";
    let since = t.counters();
    t.forward_to(d, &udp(uc, dns.addr), dns_b);
    t.expect_entry(d, uc, &dns, unconfirmed(CT_S_UDP, 0, dns_b));
    t.expect_events(d, &since, &[(Counter::CtMiss, 1)]);
    let d = "UDP: more datagrams from the client alone → still unconfirmed";
    t.forward_to(d, &udp(uc, dns.addr), dns_b);
    t.expect_entry(d, uc, &dns, unconfirmed(CT_S_UDP, 0, dns_b));
    t.expect_active(d, &dns, dns_b, active0);
    let d = "UDP: the backend's reply → rewritten, confirmed";
    let since = t.counters();
    t.reply_as(d, &udp_from_backend(dns_b, uc), &dns);
    t.expect_entry(d, uc, &dns, confirmed(CT_S_UDP, CT_F_COUNTED, dns_b));
    t.expect_events(
        d,
        &since,
        &[(Counter::CtConfirmed, 1), (Counter::RevNat, 1)],
    );
    t.expect_active(d, &dns, dns_b, active0 + 1);
    let d = "UDP: next datagram → from the confirmed entry";
    t.forward_to(d, &udp(uc, dns.addr), dns_b);
    t.reply_as(d, &udp_from_backend(dns_b, uc), &dns);
    t.expect_entry(d, uc, &dns, confirmed(CT_S_UDP, CT_F_COUNTED, dns_b));
    let uc6 = client6(50_109);
    t.forward_to("IPv6 UDP: datagram", &udp(uc6, dns6.addr), dns6_b);
    let d = "IPv6 UDP: reply → rewritten (hop limit decremented), confirmed";
    t.reply_as(d, &udp_from_backend(dns6_b, uc6), &dns6);
    t.expect_entry(d, uc6, &dns6, confirmed(CT_S_UDP, CT_F_COUNTED, dns6_b));

    // ---- TTL on the reverse path ----
    let d = "reply with TTL 1 → to the kernel, unchanged";
    let since = t.counters();
    t.unchanged(
        d,
        from_backend(hb, hc, Tcp::Ack).ttl(1).build(),
        XDP_PASS,
        Counter::PassTtlExceeded,
    );
    t.expect_events(d, &since, &[]);
    t.expect_entry(d, hc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, hb));
    t.unchanged(
        "IPv6 reply with hop limit 1 → to the kernel",
        udp_from_backend(dns6_b, uc6).ttl(1).build(),
        XDP_PASS,
        Counter::PassTtlExceeded,
    );
    t.reply_as(
        "reply with TTL 2 → rewritten with TTL 1",
        &from_backend(hb, hc, Tcp::Ack).ttl(2),
        &web,
    );

    // ---- FIN both ways: closed, off the active count once ----
    let active1 = t.active(&web, hb);
    let d = "close: client FIN → closing, still counted";
    t.forward_to(d, &tcp(hc, web.addr, Tcp::Fin), hb);
    t.expect_entry(
        d,
        hc,
        &web,
        confirmed(CT_S_CLOSING, CT_F_COUNTED | CT_F_FIN_CLIENT, hb),
    );
    t.expect_active(d, &web, hb, active1);
    let d = "close: backend FIN → closed, active count down by one";
    t.reply_as(d, &from_backend(hb, hc, Tcp::Fin), &web);
    t.expect_entry(
        d,
        hc,
        &web,
        confirmed(CT_S_CLOSED, CT_F_FIN_CLIENT | CT_F_FIN_BACKEND, hb),
    );
    t.expect_active(d, &web, hb, active1 - 1);
    let d = "closed: last ACK and FIN retransmissions → same backend, counted down only once";
    t.forward_to(d, &ack(hc, web.addr), hb);
    t.forward_to(d, &tcp(hc, web.addr, Tcp::Fin), hb);
    t.reply_as(d, &from_backend(hb, hc, Tcp::Fin), &web);
    t.expect_entry(
        d,
        hc,
        &web,
        confirmed(CT_S_CLOSED, CT_F_FIN_CLIENT | CT_F_FIN_BACKEND, hb),
    );
    t.expect_active(d, &web, hb, active1 - 1);
    // A SYN on a closed flow is a new connection: selected afresh. (The old backend is
    // drained first, so the new choice is visibly another one.)
    t.gw.dp.maps.set_weight(&web, hb, 0).unwrap();
    let nb = t.predict(hc, &web);
    assert_ne!(nb, hb);
    let d = "reopen: SYN on a closed flow → selected afresh, new unconfirmed entry";
    let since = t.counters();
    t.forward_to(d, &syn(hc, web.addr), nb);
    t.expect_entry(d, hc, &web, unconfirmed(CT_S_OPENING, 0, nb));
    t.expect_events(d, &since, &[(Counter::CtReopened, 1), (Counter::CtMiss, 1)]);
    t.expect_active(d, &web, hb, active1 - 1);
    t.gw.dp.maps.set_weight(&web, hb, 1).unwrap();

    // The other way round: the backend closes first.
    let d = "close, backend first: backend FIN → closing; client FIN → closed";
    let active1 = t.active(&web, bb);
    t.reply_as(d, &from_backend(bb, bc, Tcp::Fin), &web);
    t.expect_entry(
        d,
        bc,
        &web,
        confirmed(CT_S_CLOSING, CT_F_COUNTED | CT_F_FIN_BACKEND, bb),
    );
    t.forward_to(d, &tcp(bc, web.addr, Tcp::Fin), bb);
    t.expect_entry(
        d,
        bc,
        &web,
        confirmed(CT_S_CLOSED, CT_F_FIN_CLIENT | CT_F_FIN_BACKEND, bb),
    );
    t.expect_active(d, &web, bb, active1 - 1);

    // ---- spoofed FIN, SYN and RST never move a live flow ----
    // Each flow's backend is drained first: any re-selection would visibly move the flow.
    let mut spoofed = Vec::new();
    for (v, c) in [(web, client(50_110)), (rnd, client(50_111))] {
        let desc = |s: &str| format!("spoofed FIN+SYN on {v}: {s}");
        let since = t.counters();
        let b = if v == rnd {
            // Random: the choice is the data plane's; read it back.
            let r = run(t.gw.dp.program(), t.gw.ifindex_a, &syn(c, v.addr).build());
            let b = t.predict_existing(c, &v);
            let out = syn(c, v.addr).with(GW_MAC_A, mac_of(b), c, b).hop().build();
            assert_eq!(
                (action_name(r.0), hex(&r.1)),
                ("XDP_TX", hex(&out)),
                "random VIP SYN"
            );
            t.rows += 1;
            t.reasons.push(Counter::Tx);
            b
        } else {
            let b = t.predict(c, &v);
            t.forward_to(&desc("SYN"), &syn(c, v.addr), b);
            b
        };
        t.reply_as(
            &desc("SYN-ACK"),
            &from_backend(b, c, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
            &v,
        );
        t.forward_to(&desc("ACK"), &ack(c, v.addr).seq_ack(SEQ + 1, ISN_B + 1), b);
        t.expect_entry(
            &desc("confirmed"),
            c,
            &v,
            confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, b),
        );
        t.expect_events(
            &desc("confirmed"),
            &since,
            &[
                (Counter::CtMiss, 1),
                (Counter::CtConfirmed, 1),
                (Counter::RevNat, 1),
            ],
        );
        spoofed.push((v, c, b, t.active(&v, b)));
        t.gw.dp.maps.set_weight(&v, b, 0).unwrap();
    }
    for &(v, c, b, active) in &spoofed {
        let desc = |s: &str| format!("spoofed FIN+SYN on {v}: {s}");
        let since = t.counters();
        let d = desc("FIN from the client's 5-tuple → closing, same backend");
        t.forward_to(&d, &tcp(c, v.addr, Tcp::Fin), b);
        t.expect_entry(
            &d,
            c,
            &v,
            confirmed(CT_S_CLOSING, CT_F_COUNTED | CT_F_FIN_CLIENT, b),
        );
        let d = desc("then SYN → same backend (not re-selected), still closing");
        t.forward_to(&d, &syn(c, v.addr), b);
        t.expect_entry(
            &d,
            c,
            &v,
            confirmed(CT_S_CLOSING, CT_F_COUNTED | CT_F_FIN_CLIENT, b),
        );
        t.expect_events(&d, &since, &[]);
        t.expect_active(&d, &v, b, active);
        let d = desc("the real client's data and the backend's → same backend, still counted");
        t.forward_to(&d, &ack(c, v.addr).seq_ack(SEQ + 1, ISN_B + 1), b);
        t.reply_as(&d, &from_backend(b, c, Tcp::Ack), &v);
        t.expect_active(&d, &v, b, active);
    }

    // RST: closed at once — off the active count, the closed timeout, the backend kept —
    // until a non-RST packet from the side that sent it shows the flow goes on (then counted
    // again, once). The other side's packets do not undo it; a SYN does not reopen it (only
    // FINs both ways make a flow reopenable). The flow's backend is drained, so that any
    // re-selection would visibly move it.
    let (_, sc, sb, _) = spoofed[0];
    let kc = client(50_112);
    let kb = t.predict(kc, &web);
    t.forward_to("RST: SYN", &syn(kc, web.addr), kb);
    t.reply_as(
        "RST: SYN-ACK",
        &from_backend(kb, kc, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &web,
    );
    t.forward_to(
        "RST: ACK",
        &ack(kc, web.addr).seq_ack(SEQ + 1, ISN_B + 1),
        kb,
    );
    t.gw.dp.maps.set_weight(&web, kb, 0).unwrap();
    let kactive = t.active(&web, kb);
    assert!(kactive >= 1, "the RST flow is counted on {kb}");

    let d = "RST from the client → closed (rst), same backend, off the active count at once";
    let since = t.counters();
    t.forward_to(d, &tcp(kc, web.addr, Tcp::Rst), kb);
    t.expect_entry(d, kc, &web, confirmed(CT_S_CLOSED, CT_F_RST, kb));
    t.expect_events(d, &since, &[]);
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "the client's RST again (RST+ACK) → still closed, counted down only once";
    t.forward_to(d, &tcp(kc, web.addr, Tcp::RstAck), kb);
    t.expect_entry(d, kc, &web, confirmed(CT_S_CLOSED, CT_F_RST, kb));
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "then the backend's data (in flight) → rewritten; still closed and off the count";
    let since = t.counters();
    t.reply_as(d, &from_backend(kb, kc, Tcp::Ack), &web);
    t.reply_as(d, &from_backend(kb, kc, Tcp::Fin), &web);
    t.expect_entry(
        d,
        kc,
        &web,
        confirmed(CT_S_CLOSED, CT_F_RST | CT_F_FIN_BACKEND, kb),
    );
    t.expect_events(d, &since, &[(Counter::RevNat, 2)]);
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "then the client's data → the RST was not the end: closing (the backend's FIN), \
             counted again";
    let since = t.counters();
    t.forward_to(d, &ack(kc, web.addr), kb);
    t.expect_entry(
        d,
        kc,
        &web,
        confirmed(CT_S_CLOSING, CT_F_COUNTED | CT_F_FIN_BACKEND, kb),
    );
    t.expect_events(d, &since, &[]);
    t.expect_active(d, &web, kb, kactive);
    let d = "more of the client's data and the backend's → counted again only once";
    t.forward_to(d, &ack(kc, web.addr), kb);
    t.reply_as(d, &from_backend(kb, kc, Tcp::Ack), &web);
    t.forward_to(d, &ack(kc, web.addr), kb);
    t.expect_active(d, &web, kb, kactive);

    // A fresh flow for the rows that need an established one (the FIN above stays). The
    // drained backends take new flows again; the new flow's own backend is drained below.
    t.gw.dp.maps.set_weight(&web, kb, 1).unwrap();
    for (v, _, b, _) in &spoofed {
        t.gw.dp.maps.set_weight(v, *b, 1).unwrap();
    }
    let kc = client(50_113);
    let kb = t.predict(kc, &web);
    t.forward_to("RST 2: SYN", &syn(kc, web.addr), kb);
    t.reply_as(
        "RST 2: SYN-ACK",
        &from_backend(kb, kc, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &web,
    );
    t.forward_to(
        "RST 2: ACK",
        &ack(kc, web.addr).seq_ack(SEQ + 1, ISN_B + 1),
        kb,
    );
    t.gw.dp.maps.set_weight(&web, kb, 0).unwrap();
    let kactive = t.active(&web, kb);
    t.expect_entry(
        "RST 2: confirmed",
        kc,
        &web,
        confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, kb),
    );

    let d = "RST from the backend → closed (rst_backend), off the count";
    let since = t.counters();
    t.reply_as(d, &from_backend(kb, kc, Tcp::RstAck), &web);
    t.expect_entry(d, kc, &web, confirmed(CT_S_CLOSED, CT_F_RST_BACKEND, kb));
    t.expect_events(d, &since, &[(Counter::RevNat, 1)]);
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "then the client's data → still closed (the other side does not undo an RST)";
    t.forward_to(d, &ack(kc, web.addr), kb);
    t.expect_entry(d, kc, &web, confirmed(CT_S_CLOSED, CT_F_RST_BACKEND, kb));
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "then the backend's data → established, counted again";
    t.reply_as(d, &from_backend(kb, kc, Tcp::Ack), &web);
    t.expect_entry(d, kc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, kb));
    t.expect_active(d, &web, kb, kactive);

    let d = "RSTs from both sides → closed, off the count once";
    t.forward_to(d, &tcp(kc, web.addr, Tcp::Rst), kb);
    t.reply_as(d, &from_backend(kb, kc, Tcp::Rst), &web);
    t.expect_entry(
        d,
        kc,
        &web,
        confirmed(CT_S_CLOSED, CT_F_RST | CT_F_RST_BACKEND, kb),
    );
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "then the client's data → still closed: the backend's RST stands";
    t.forward_to(d, &ack(kc, web.addr), kb);
    t.expect_entry(d, kc, &web, confirmed(CT_S_CLOSED, CT_F_RST_BACKEND, kb));
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "then the backend's data → established, counted again once";
    t.reply_as(d, &from_backend(kb, kc, Tcp::Ack), &web);
    t.expect_entry(d, kc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, kb));
    t.expect_active(d, &web, kb, kactive);

    let d = "a spoofed client RST → closed, off the count";
    let since = t.counters();
    t.forward_to(d, &tcp(kc, web.addr, Tcp::Rst).seq_ack(0x5eed_0000, 0), kb);
    t.expect_entry(d, kc, &web, confirmed(CT_S_CLOSED, CT_F_RST, kb));
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "then a SYN → same backend (not reopened, not re-selected); a packet from the \
             client: established, counted again";
    t.forward_to(d, &syn(kc, web.addr), kb);
    t.expect_entry(d, kc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, kb));
    t.expect_events(d, &since, &[]);
    t.expect_active(d, &web, kb, kactive);

    let d = "a spoofed client RST, then the entry outlives its timeout (last seen an hour \
             back): the client's data → same backend (drained: the table would give another), \
             picked up again";
    t.forward_to(d, &tcp(kc, web.addr, Tcp::Rst).seq_ack(0x5eed_0000, 0), kb);
    let mut e = t.expect_entry(d, kc, &web, confirmed(CT_S_CLOSED, CT_F_RST, kb));
    e.last_seen_ns = e.last_seen_ns.saturating_sub(3600 * 1_000_000_000);
    t.gw.dp
        .maps
        .flows
        .insert_confirmed(&flow_key(kc, &web), &e)
        .unwrap();
    let since = t.counters();
    t.forward_to(d, &ack(kc, web.addr), kb);
    t.expect_entry(d, kc, &web, unconfirmed(CT_S_OPENING, CT_F_PICKUP, kb));
    t.expect_events(d, &since, &[(Counter::CtExpired, 1), (Counter::CtMiss, 1)]);
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "then the backend's answer → confirmed again, counted";
    t.reply_as(d, &from_backend(kb, kc, Tcp::Ack), &web);
    t.expect_entry(d, kc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, kb));
    t.expect_active(d, &web, kb, kactive);

    let d = "the backend resets, the client reconnects from the same port: its SYN → same \
             backend, still closed (not reopened)";
    let since = t.counters();
    t.reply_as(d, &from_backend(kb, kc, Tcp::Rst), &web);
    t.forward_to(d, &syn(kc, web.addr), kb);
    t.expect_entry(d, kc, &web, confirmed(CT_S_CLOSED, CT_F_RST_BACKEND, kb));
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "then the backend's SYN-ACK → established, counted again";
    t.reply_as(
        d,
        &from_backend(kb, kc, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &web,
    );
    t.expect_entry(d, kc, &web, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, kb));
    t.expect_events(d, &since, &[(Counter::RevNat, 2)]);
    t.expect_active(d, &web, kb, kactive);

    let d = "FINs both ways → closed, off the count";
    t.forward_to(d, &tcp(kc, web.addr, Tcp::Fin), kb);
    t.reply_as(d, &from_backend(kb, kc, Tcp::Fin), &web);
    t.expect_entry(
        d,
        kc,
        &web,
        confirmed(CT_S_CLOSED, CT_F_FIN_CLIENT | CT_F_FIN_BACKEND, kb),
    );
    t.expect_active(d, &web, kb, kactive - 1);
    let d = "closed by FINs: an RST, then the client's data → still closed, never counted again";
    t.forward_to(d, &tcp(kc, web.addr, Tcp::Rst), kb);
    t.expect_entry(
        d,
        kc,
        &web,
        confirmed(
            CT_S_CLOSED,
            CT_F_FIN_CLIENT | CT_F_FIN_BACKEND | CT_F_RST,
            kb,
        ),
    );
    t.forward_to(d, &ack(kc, web.addr), kb);
    t.expect_entry(
        d,
        kc,
        &web,
        confirmed(CT_S_CLOSED, CT_F_FIN_CLIENT | CT_F_FIN_BACKEND, kb),
    );
    t.expect_active(d, &web, kb, kactive - 1);
    let nb = t.predict(kc, &web);
    assert_ne!(nb, kb, "the drained backend still has the slot");
    let d = "then a SYN → reopened: selected afresh (ct_reopened), the count not touched";
    let since = t.counters();
    t.forward_to(d, &syn(kc, web.addr), nb);
    t.expect_entry(d, kc, &web, unconfirmed(CT_S_OPENING, 0, nb));
    t.expect_events(d, &since, &[(Counter::CtReopened, 1), (Counter::CtMiss, 1)]);
    t.expect_active(d, &web, kb, kactive - 1);

    let d = "RST on a half-closed flow → closed, off the count";
    let active = t.active(&web, sb);
    t.forward_to(d, &tcp(sc, web.addr, Tcp::Rst), sb);
    t.expect_entry(
        d,
        sc,
        &web,
        confirmed(CT_S_CLOSED, CT_F_FIN_CLIENT | CT_F_RST, sb),
    );
    t.expect_active(d, &web, sb, active - 1);
    let d = "then the client's data → closing again (the FIN stays), counted again";
    t.forward_to(d, &ack(sc, web.addr), sb);
    t.expect_entry(
        d,
        sc,
        &web,
        confirmed(CT_S_CLOSING, CT_F_COUNTED | CT_F_FIN_CLIENT, sb),
    );
    t.expect_active(d, &web, sb, active);
    t.gw.dp.maps.set_weight(&web, kb, 1).unwrap();

    // ---- a backend id reused by another backend: its old flows are stale ----
    // B's flows: two confirmed, one unconfirmed. B is removed and C added: C gets B's id (the
    // lowest free one) with the next generation, and an active count of 0. Whoever finds one
    // of B's entries removes it without touching any count: it is on B's count, which C's
    // replaced.
    let (gb, gc) = (sa("10.1.0.11:8090"), sa("10.1.0.12:8090"));
    let (g1, g2, g3) = (client(50_140), client(50_141), client(50_142));
    for g in [g1, g2] {
        t.forward_to("reused id: B's flow, SYN", &syn(g, reused.addr), gb);
        t.reply_as(
            "reused id: B's flow, SYN-ACK",
            &from_backend(gb, g, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
            &reused,
        );
        t.forward_to(
            "reused id: B's flow, ACK → confirmed",
            &ack(g, reused.addr).seq_ack(SEQ + 1, ISN_B + 1),
            gb,
        );
        t.expect_entry(
            "reused id: B's flow",
            g,
            &reused,
            confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, gb),
        );
    }
    t.forward_to(
        "reused id: B's unconfirmed flow, SYN",
        &syn(g3, reused.addr),
        gb,
    );
    t.reply_as(
        "reused id: B's unconfirmed flow, SYN-ACK",
        &from_backend(gb, g3, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &reused,
    );
    t.expect_entry(
        "reused id: B's unconfirmed flow",
        g3,
        &reused,
        unconfirmed(CT_S_OPENING, CT_F_SYNACK, gb),
    );
    t.expect_active("reused id: B's flows", &reused, gb, 2);
    let b_id = t.backend_id(&reused, gb);
    t.gw.dp.maps.del_backend(&reused, gb).unwrap();
    t.gw.dp.maps.add_backend(&reused, gc, 1).unwrap();
    assert_eq!(
        t.backend_id(&reused, gc),
        b_id,
        "C does not have B's id: the rows below test nothing"
    );
    t.expect_active("reused id: C added", &reused, gc, 0);
    let d = "reused id: B's confirmed flow, the client's next packet → stale: removed without \
             touching C's count; picked up by the table (C)";
    let since = t.counters();
    t.forward_to(d, &ack(g1, reused.addr), gc);
    t.expect_entry(d, g1, &reused, unconfirmed(CT_S_OPENING, CT_F_PICKUP, gc));
    t.expect_events(d, &since, &[(Counter::CtStale, 1), (Counter::CtMiss, 1)]);
    t.expect_active(d, &reused, gc, 0);
    let d = "reused id: C's packet with B's confirmed flow's tuple → not that flow's: \
             untouched, the stale entry removed, C's count untouched";
    let since = t.counters();
    t.unchanged(
        d,
        from_backend(gc, g2, Tcp::Ack).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.expect_no_entry(d, g2, &reused);
    t.expect_events(d, &since, &[(Counter::CtStale, 1)]);
    t.expect_active(d, &reused, gc, 0);
    let d = "reused id: C's SYN-ACK with B's unconfirmed flow's tuple → untouched, the stale \
             entry removed";
    let since = t.counters();
    t.unchanged(
        d,
        from_backend(gc, g3, Tcp::SynAck)
            .seq_ack(ISN_B, SEQ + 1)
            .build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.expect_no_entry(d, g3, &reused);
    t.expect_events(d, &since, &[(Counter::CtStale, 1)]);
    let d = "reused id: C answers the flow picked up for it → confirmed, counted on C once";
    let since = t.counters();
    t.reply_as(d, &from_backend(gc, g1, Tcp::Ack), &reused);
    t.expect_entry(
        d,
        g1,
        &reused,
        confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, gc),
    );
    t.expect_events(
        d,
        &since,
        &[(Counter::CtConfirmed, 1), (Counter::RevNat, 1)],
    );
    t.expect_active(d, &reused, gc, 1);

    // ---- one backend behind two VIPs: replies go out as the VIP of their flow ----
    let (ca, cb) = (client(50_120), client(50_121));
    t.forward_to("two VIPs: SYN to the first", &syn(ca, va.addr), shared);
    t.forward_to("two VIPs: SYN to the second", &syn(cb, vb.addr), shared);
    t.reply_as(
        "two VIPs: SYN-ACK of the first VIP's flow → from the first VIP",
        &from_backend(shared, ca, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &va,
    );
    t.reply_as(
        "two VIPs: SYN-ACK of the second VIP's flow → from the second VIP",
        &from_backend(shared, cb, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &vb,
    );
    t.forward_to(
        "two VIPs: ACK to the first",
        &ack(ca, va.addr).seq_ack(SEQ + 1, ISN_B + 1),
        shared,
    );
    t.forward_to(
        "two VIPs: ACK to the second",
        &ack(cb, vb.addr).seq_ack(SEQ + 1, ISN_B + 1),
        shared,
    );
    for (c, v) in [(ca, va), (cb, vb)] {
        let d = format!("two VIPs: confirmed flow to {v}, data → from {v}");
        t.expect_entry(&d, c, &v, confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, shared));
        t.expect_no_entry(&d, c, if v == va { &vb } else { &va });
        t.reply_as(&d, &from_backend(shared, c, Tcp::Ack), &v);
        t.expect_active(&d, &v, shared, 1);
    }
    t.unchanged(
        "two VIPs: the backend's packet to a client of neither → untouched",
        from_backend(shared, client(50_122), Tcp::Ack).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    let e =
        t.gw.dp
            .maps
            .set_stateless_reverse(&va, true)
            .expect_err("stateless reverse NAT with a shared backend");
    assert!(e.to_string().contains("10.1.0.11:9000"), "{e}");

    // ---- timeouts: an expired entry is treated as absent and removed ----
    let (tc, tc2, tc3) = (client(50_130), client(50_131), client(50_132));
    let (tu, tu2) = (client(50_133), client(50_134));
    t.forward_to("expiry: SYN", &syn(tc, short.addr), short_b);
    t.reply_as(
        "expiry: SYN-ACK",
        &from_backend(short_b, tc, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &short,
    );
    t.forward_to(
        "expiry: ACK",
        &ack(tc, short.addr).seq_ack(SEQ + 1, ISN_B + 1),
        short_b,
    );
    t.forward_to(
        "expiry: SYN of a flow left unconfirmed",
        &syn(tc2, short.addr),
        short_b,
    );
    t.forward_to(
        "expiry: SYN of a flow to close",
        &syn(tc3, short.addr),
        short_b,
    );
    t.reply_as(
        "expiry: SYN-ACK of the flow to close",
        &from_backend(short_b, tc3, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &short,
    );
    t.forward_to(
        "expiry: ACK of the flow to close",
        &ack(tc3, short.addr).seq_ack(SEQ + 1, ISN_B + 1),
        short_b,
    );
    t.forward_to("expiry: its FIN", &tcp(tc3, short.addr, Tcp::Fin), short_b);
    t.reply_as(
        "expiry: the backend's FIN",
        &from_backend(short_b, tc3, Tcp::Fin),
        &short,
    );
    t.forward_to(
        "expiry: UDP datagram",
        &udp(tu, short_udp.addr),
        short_udp_b,
    );
    t.reply_as(
        "expiry: UDP reply",
        &udp_from_backend(short_udp_b, tu),
        &short_udp,
    );
    t.forward_to(
        "expiry: UDP datagram left unanswered",
        &udp(tu2, short_udp.addr),
        short_udp_b,
    );
    t.expect_entry(
        "expiry: before",
        tc,
        &short,
        confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, short_b),
    );
    t.expect_entry(
        "expiry: before",
        tc2,
        &short,
        unconfirmed(CT_S_OPENING, 0, short_b),
    );
    t.expect_entry(
        "expiry: before",
        tc3,
        &short,
        confirmed(CT_S_CLOSED, CT_F_FIN_CLIENT | CT_F_FIN_BACKEND, short_b),
    );
    t.expect_entry(
        "expiry: before",
        tu,
        &short_udp,
        confirmed(CT_S_UDP, CT_F_COUNTED, short_udp_b),
    );
    t.expect_entry(
        "expiry: before",
        tu2,
        &short_udp,
        unconfirmed(CT_S_UDP, 0, short_udp_b),
    );
    t.expect_active("expiry: before", &short, short_b, 1);
    t.expect_active("expiry: before", &short_udp, short_udp_b, 1);
    // Timeouts of 1 s for every state, set only now (they apply to existing entries), so
    // that a slow machine cannot expire the entries above before this point.
    let one = Timeouts {
        opening_s: 1,
        established_s: 1,
        closing_s: 1,
        closed_s: 1,
        udp_s: 1,
    };
    for v in [short, short_udp] {
        assert!(t.gw.dp.maps.set_timeouts(&v, one).unwrap());
        let id = t.gw.dp.maps.vip(&v).unwrap().vip_id;
        assert_eq!(t.gw.dp.maps.timeouts(id).unwrap(), one);
    }
    std::thread::sleep(Duration::from_millis(2200));
    let d = "expired established flow: the client's next packet → treated as absent (picked up), off the active count";
    let since = t.counters();
    t.forward_to(d, &ack(tc, short.addr), short_b);
    t.expect_entry(
        d,
        tc,
        &short,
        unconfirmed(CT_S_OPENING, CT_F_PICKUP, short_b),
    );
    t.expect_events(d, &since, &[(Counter::CtExpired, 1), (Counter::CtMiss, 1)]);
    t.expect_active(d, &short, short_b, 0);
    let d = "expired unconfirmed flow: the client's next packet → a new entry";
    let since = t.counters();
    t.forward_to(d, &ack(tc2, short.addr), short_b);
    t.expect_entry(
        d,
        tc2,
        &short,
        unconfirmed(CT_S_OPENING, CT_F_PICKUP, short_b),
    );
    t.expect_events(d, &since, &[(Counter::CtExpired, 1), (Counter::CtMiss, 1)]);
    let d =
        "expired closed flow: a SYN → a new flow, not a reopening; the count is not touched again";
    let since = t.counters();
    t.forward_to(d, &syn(tc3, short.addr), short_b);
    t.expect_entry(d, tc3, &short, unconfirmed(CT_S_OPENING, 0, short_b));
    t.expect_events(d, &since, &[(Counter::CtExpired, 1), (Counter::CtMiss, 1)]);
    t.expect_active(d, &short, short_b, 0);
    let d = "expired UDP flow: the backend's reply → not the VIP's any more (untouched), entry removed, off the count";
    let since = t.counters();
    t.unchanged(
        d,
        udp_from_backend(short_udp_b, tu).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.expect_no_entry(d, tu, &short_udp);
    t.expect_events(d, &since, &[(Counter::CtExpired, 1)]);
    t.expect_active(d, &short_udp, short_udp_b, 0);
    let d = "expired unconfirmed UDP flow: the next datagram → a new entry";
    let since = t.counters();
    t.forward_to(d, &udp(tu2, short_udp.addr), short_udp_b);
    t.expect_entry(d, tu2, &short_udp, unconfirmed(CT_S_UDP, 0, short_udp_b));
    t.expect_events(d, &since, &[(Counter::CtExpired, 1), (Counter::CtMiss, 1)]);
    let d = "the picked-up flow is confirmed by the backend's answer and counted again";
    t.reply_as(d, &from_backend(short_b, tc, Tcp::Ack), &short);
    t.expect_entry(
        d,
        tc,
        &short,
        confirmed(CT_S_ESTABLISHED, CT_F_COUNTED, short_b),
    );
    t.expect_active(d, &short, short_b, 1);

    t.expect_counts_exact(&all_vips);
    t.finish();
    println!("{} flow-state cases passed", t.rows);
}

/// Above `GlobalConf::flood_rate` new flows per second (per CPU) no unconfirmed entry is
/// stored: the backend comes from the flow hash, and for a while replies without an entry are
/// matched through the VIP's table.
#[test]
fn flood_threshold() {
    // The rate window is per CPU: every packet of this table runs on one.
    pin_to_current_cpu();
    let mut t = Table::new("flood");
    let web = vip("10.100.0.100:80/tcp");
    let rnd = vip("10.100.0.106:80/tcp");
    let (w1, w2) = (sa("10.1.0.11:8080"), sa("10.1.0.12:8080"));
    {
        let m = &mut t.gw.dp.maps;
        m.add_vip(&web, 251).unwrap();
        m.set_backends(&web, &[(w1, 1), (w2, 1)]).unwrap();
        m.add_vip(&rnd, 251).unwrap();
        m.set_algorithm(&rnd, Algorithm::Random).unwrap();
        m.set_backends(
            &rnd,
            &[
                (sa("10.1.0.11:8081"), 1),
                (sa("10.1.0.12:8081"), 2),
                (sa("10.1.0.13:8081"), 3),
            ],
        )
        .unwrap();
        let conf = m.conf().unwrap();
        assert!(m
            .set_conf(GlobalConf {
                flood_rate: 3,
                ..conf
            })
            .unwrap());
        assert_eq!(m.conf().unwrap().flood_rate, 3);
        assert_eq!(m.conf().unwrap().hash_seed, conf.hash_seed);
    }
    // A fresh one-second window.
    std::thread::sleep(Duration::from_millis(1100));
    let cs: Vec<SocketAddr> = (50_200..50_206).map(client).collect();
    for (i, c) in cs[..3].iter().enumerate() {
        let d = format!("flood: new flow {} of 3 in the second → stored", i + 1);
        let since = t.counters();
        let b = t.predict(*c, &web);
        t.forward_to(&d, &syn(*c, web.addr), b);
        t.expect_entry(
            &d,
            *c,
            &web,
            Want {
                table: CtTable::Unconfirmed,
                state: CT_S_OPENING,
                flags: 0,
                backend: b,
            },
        );
        t.expect_events(&d, &since, &[(Counter::CtMiss, 1)]);
    }
    let fc = cs[3];
    let fb = t.predict(fc, &web);
    let d = "flood: 4th new flow in the second → backend by the flow hash, no entry";
    let since = t.counters();
    t.forward_to(d, &syn(fc, web.addr), fb);
    t.expect_no_entry(d, fc, &web);
    t.expect_events(
        d,
        &since,
        &[(Counter::CtMiss, 1), (Counter::CtFloodSkip, 1)],
    );
    let rc = cs[4];
    let rb = t.predict(rc, &rnd);
    let d = "flood: a random VIP's new flow → the weighted table by the flow hash, no entry";
    let since = t.counters();
    t.forward_to(d, &syn(rc, rnd.addr), rb);
    t.expect_no_entry(d, rc, &rnd);
    t.expect_events(
        d,
        &since,
        &[(Counter::CtMiss, 1), (Counter::CtFloodSkip, 1)],
    );
    let d = "flood: the unstored flow's next packet → the same backend again";
    t.forward_to(d, &ack(fc, web.addr), fb);
    t.expect_no_entry(d, fc, &web);
    let d = "flood: the backend's reply to an unstored flow → matched by the table, rewritten";
    let since = t.counters();
    t.reply_as(
        d,
        &from_backend(fb, fc, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &web,
    );
    t.expect_events(
        d,
        &since,
        &[(Counter::RevStateless, 1), (Counter::RevNat, 1)],
    );
    let other = if fb == w1 { w2 } else { w1 };
    // (A member of the VIP all the same: its reply of a flow without an entry is the VIP's,
    // as through another gateway or after a table change.)
    let d = "flood: another member's packet with that flow's tuple → rewritten as well";
    let since = t.counters();
    t.reply_as(
        d,
        &from_backend(other, fc, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &web,
    );
    t.expect_events(
        d,
        &since,
        &[(Counter::RevStateless, 1), (Counter::RevNat, 1)],
    );
    let d = "flood: a stored flow's reply → through its entry, as always";
    let since = t.counters();
    let b0 = t.predict(cs[0], &web);
    t.reply_as(
        d,
        &from_backend(b0, cs[0], Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &web,
    );
    t.expect_events(d, &since, &[(Counter::RevNat, 1)]);
    // The next second: below the threshold again.
    std::thread::sleep(Duration::from_millis(1100));
    let nc = cs[5];
    let nb = t.predict(nc, &web);
    let d = "flood over: a new flow in the next second → stored again";
    let since = t.counters();
    t.forward_to(d, &syn(nc, web.addr), nb);
    t.expect_entry(
        d,
        nc,
        &web,
        Want {
            table: CtTable::Unconfirmed,
            state: CT_S_OPENING,
            flags: 0,
            backend: nb,
        },
    );
    t.expect_events(d, &since, &[(Counter::CtMiss, 1)]);
    t.finish();
    println!("{} flood cases passed", t.rows);
}

/// The threshold lowered in the middle of a second, below the new flows this CPU has already
/// seen in it: the flows above it get no entry, so their replies must be matched by the table
/// from then on.
#[test]
fn flood_threshold_lowered() {
    pin_to_current_cpu();
    let mut t = Table::new("flood-lowered");
    let web = vip("10.100.0.100:80/tcp");
    t.gw.dp.maps.add_vip(&web, 251).unwrap();
    t.gw.dp
        .maps
        .set_backends(
            &web,
            &[(sa("10.1.0.11:8080"), 1), (sa("10.1.0.12:8080"), 1)],
        )
        .unwrap();
    // A fresh one-second window, then five new flows under the default threshold.
    std::thread::sleep(Duration::from_millis(1100));
    for port in 50_300..50_305 {
        let c = client(port);
        let b = t.predict(c, &web);
        t.forward_to(
            &format!("new flow from port {port}: stored"),
            &syn(c, web.addr),
            b,
        );
    }
    let conf = t.gw.dp.maps.conf().unwrap();
    t.gw.dp
        .maps
        .set_conf(GlobalConf {
            flood_rate: 3,
            ..conf
        })
        .unwrap();
    let c = client(50_305);
    let b = t.predict(c, &web);
    let d = "threshold lowered to 3 after 5 new flows: the 6th → no entry";
    let since = t.counters();
    t.forward_to(d, &syn(c, web.addr), b);
    t.expect_no_entry(d, c, &web);
    t.expect_events(
        d,
        &since,
        &[(Counter::CtMiss, 1), (Counter::CtFloodSkip, 1)],
    );
    let d = "threshold lowered: the backend's reply to that flow → matched by the table, rewritten";
    let since = t.counters();
    t.reply_as(
        d,
        &from_backend(b, c, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
        &web,
    );
    t.expect_events(
        d,
        &since,
        &[(Counter::RevStateless, 1), (Counter::RevNat, 1)],
    );
    t.finish();
}

/// Flows that began above the flood threshold on VIPs whose choice is not a function of the
/// packet (random, round robin, least-conn) have no entry: their backend came from the flow
/// hash. After the flood — the next second, or the threshold removed — the client's next
/// segment (not a SYN) still has no entry, and must get the same backend from the hash, not a
/// fresh random / round-robin / least-conn choice; it is picked up there, and the backend's
/// answer confirms it.
#[test]
fn flows_begun_in_a_flood_keep_their_backend() {
    pin_to_current_cpu();
    let mut t = Table::new("flood-keep");
    let web = vip("10.100.0.100:80/tcp");
    let rnd = vip("10.100.0.106:80/tcp");
    let rr = vip("10.100.0.107:80/tcp");
    let lc = vip("10.100.0.108:80/tcp");
    let weighted = |port: u16| {
        [
            (SocketAddr::new("10.1.0.11".parse().unwrap(), port), 1),
            (SocketAddr::new("10.1.0.12".parse().unwrap(), port), 2),
            (SocketAddr::new("10.1.0.13".parse().unwrap(), port), 3),
        ]
    };
    {
        let m = &mut t.gw.dp.maps;
        m.add_vip(&web, 251).unwrap();
        m.set_backends(
            &web,
            &[(sa("10.1.0.11:8080"), 1), (sa("10.1.0.12:8080"), 1)],
        )
        .unwrap();
        for (v, algo, port) in [
            (rnd, Algorithm::Random, 8081),
            (rr, Algorithm::RoundRobin, 8082),
            (lc, Algorithm::LeastConn, 8083),
        ] {
            m.add_vip(&v, 251).unwrap();
            m.set_algorithm(&v, algo).unwrap();
            m.set_backends(&v, &weighted(port)).unwrap();
        }
        let conf = m.conf().unwrap();
        assert!(m
            .set_conf(GlobalConf {
                flood_rate: 3,
                ..conf
            })
            .unwrap());
        assert_eq!(m.conf().unwrap().flood_rate, 3);
    }
    let vips = [rnd, rr, lc];
    // Four clients per VIP: the old choice (random, the round-robin position, two random
    // candidates with no active flows) would have matched the hash for all of them with
    // probability below 3% per VIP.
    let flows: Vec<(Vip, SocketAddr)> = vips
        .iter()
        .enumerate()
        .flat_map(|(i, v)| (0..4).map(move |j| (*v, client(50_400 + 10 * i as u16 + j))))
        .collect();
    let mut hashed = HashMap::new();
    for (v, c) in &flows {
        hashed.insert((*v, *c), t.hashed(*c, v));
    }
    for v in vips {
        let distinct: std::collections::HashSet<_> = flows
            .iter()
            .filter(|(w, _)| *w == v)
            .map(|f| hashed[f])
            .collect();
        println!("{v}: the four flows hash to {distinct:?}");
    }

    // A fresh one-second window: three new flows stored, then the flood.
    std::thread::sleep(Duration::from_millis(1100));
    for port in 50_390..50_393 {
        let c = client(port);
        let b = t.predict(c, &web);
        t.forward_to(
            &format!("flood-keep: new flow from {port}, under the threshold"),
            &syn(c, web.addr),
            b,
        );
    }
    for (v, c) in &flows {
        let b = hashed[&(*v, *c)];
        let d =
            format!("flood-keep: {v}: SYN from {c} over the threshold → {b} by the hash, no entry");
        let since = t.counters();
        t.forward_to(&d, &syn(*c, v.addr), b);
        t.expect_no_entry(&d, *c, v);
        t.expect_events(
            &d,
            &since,
            &[(Counter::CtMiss, 1), (Counter::CtFloodSkip, 1)],
        );
        let d = format!("flood-keep: {v}: {b}'s SYN-ACK to {c} → matched by the table");
        let since = t.counters();
        t.reply_as(
            &d,
            &from_backend(b, *c, Tcp::SynAck).seq_ack(ISN_B, SEQ + 1),
            v,
        );
        t.expect_no_entry(&d, *c, v);
        t.expect_events(
            &d,
            &since,
            &[(Counter::RevStateless, 1), (Counter::RevNat, 1)],
        );
    }

    // The next second: under the threshold again. The first client's ACK, with no entry, is
    // the first new flow of the window.
    std::thread::sleep(Duration::from_millis(1100));
    let mut rest = flows.iter();
    let (v0, c0) = rest.next().unwrap();
    let b0 = hashed[&(*v0, *c0)];
    let d = format!(
        "flood-keep: the next second, {v0}: {c0}'s ACK without an entry → {b0} by the hash, \
         picked up"
    );
    let since = t.counters();
    t.forward_to(&d, &ack(*c0, v0.addr).seq_ack(SEQ + 1, ISN_B + 1), b0);
    t.expect_entry(
        &d,
        *c0,
        v0,
        Want {
            table: CtTable::Unconfirmed,
            state: CT_S_OPENING,
            flags: CT_F_PICKUP,
            backend: b0,
        },
    );
    t.expect_events(&d, &since, &[(Counter::CtMiss, 1)]);
    // The flood threshold removed, through the map layer.
    {
        let m = &mut t.gw.dp.maps;
        let conf = m.conf().unwrap();
        assert!(m
            .set_conf(GlobalConf {
                flood_rate: 0,
                ..conf
            })
            .unwrap());
        assert_eq!(m.conf().unwrap().flood_rate, 0);
    }
    for (v, c) in rest {
        let b = hashed[&(*v, *c)];
        let d = format!(
            "flood-keep: no threshold, {v}: {c}'s ACK without an entry → {b} by the hash, \
             picked up"
        );
        let since = t.counters();
        t.forward_to(&d, &ack(*c, v.addr).seq_ack(SEQ + 1, ISN_B + 1), b);
        t.expect_entry(
            &d,
            *c,
            v,
            Want {
                table: CtTable::Unconfirmed,
                state: CT_S_OPENING,
                flags: CT_F_PICKUP,
                backend: b,
            },
        );
        t.expect_events(&d, &since, &[(Counter::CtMiss, 1)]);
    }
    let mut want_active: HashMap<(Vip, SocketAddr), u64> = HashMap::new();
    for (v, c) in &flows {
        let b = hashed[&(*v, *c)];
        let d = format!("flood-keep: {v}: {b} answers {c} → confirmed, counted");
        let since = t.counters();
        t.reply_as(&d, &from_backend(b, *c, Tcp::Ack), v);
        t.expect_entry(
            &d,
            *c,
            v,
            Want {
                table: CtTable::Confirmed,
                state: CT_S_ESTABLISHED,
                flags: CT_F_COUNTED,
                backend: b,
            },
        );
        t.expect_events(
            &d,
            &since,
            &[(Counter::CtConfirmed, 1), (Counter::RevNat, 1)],
        );
        *want_active.entry((*v, b)).or_default() += 1;
        t.expect_active(&d, v, b, want_active[&(*v, b)]);
        let d = format!("flood-keep: {v}: {c}'s data → {b}, from the entry");
        t.forward_to(&d, &ack(*c, v.addr).seq_ack(SEQ + 19, ISN_B + 1), b);
    }
    t.expect_counts_exact(&[web, rnd, rr, lc]);

    // In the flood's aftermath (replies without an entry are matched by the table), a flow
    // that has an entry is still never matched by the table: a random-VIP flow selected before
    // the flood, its entry naming a backend the hash does not give it (planted: a copy of a
    // live entry, uncounted, for a client the hash gives to another backend).
    let (_, c0) = flows.iter().find(|(v, _)| *v == rnd).unwrap();
    let b0 = hashed[&(rnd, *c0)];
    let mut e = t.expect_entry(
        "flood-keep: an entry to copy",
        *c0,
        &rnd,
        Want {
            table: CtTable::Confirmed,
            state: CT_S_ESTABLISHED,
            flags: CT_F_COUNTED,
            backend: b0,
        },
    );
    e.flags = 0;
    let c2 = (50_700..50_800)
        .map(client)
        .find(|c| t.hashed(*c, &rnd) != b0)
        .expect("a client the hash gives to another backend");
    let b2 = t.hashed(c2, &rnd);
    t.gw.dp
        .maps
        .flows
        .insert_confirmed(&flow_key(c2, &rnd), &e)
        .unwrap();
    let since = t.counters();
    t.unchanged(
        &format!("flood-keep: {b2} (the hash's) → {c2}, whose entry names {b0}: not a reply"),
        from_backend(b2, c2, Tcp::Ack).build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.expect_events("flood-keep: not matched by the table", &since, &[]);
    t.reply_as(
        &format!("flood-keep: {b0} (the entry's) → {c2}: its reply"),
        &from_backend(b0, c2, Tcp::Ack),
        &rnd,
    );
    t.finish();
    println!("{} flood-keep cases passed", t.rows);
}

/// Keeps `Mac` in use for readers of this file: MACs are 6 bytes.
const _: Mac = [0; 6];

/// GSO super-packets, which only a tc program sees (GRO-merged, or sent by a local TCP with
/// segmentation offload): a 3000-byte segment of a flow to a VIP, marked as one of 1448-byte
/// segments, is checked against the MTU by its segments' length, so it is forwarded —
/// rewritten exactly as a small one — and the next-hop cache keeps a length a real segment
/// can have. The same packet without the mark is too big for the route: the kernel gets it.
#[test]
fn gso_packets_through_tc() {
    let mut t = Table::with("gso-tc", Kind::Tc);
    let web = vip("10.100.0.100:80/tcp");
    let b = sa("10.1.0.11:8080");
    t.gw.dp.maps.add_vip(&web, 251).unwrap();
    t.gw.dp.maps.add_backend(&web, b, 1).unwrap();
    let c = client(40_100);
    t.forward_to("SYN to a VIP", &syn(c, web.addr), b);
    let mut big = ack(c, web.addr);
    big.payload = (0..3000u32).map(|i| i as u8).collect();
    let want = big.with(GW_MAC_A, mac_of(b), c, b).hop().build();
    let input = big.build();
    let before = t.counters();
    let (action, out) =
        common::testrun::run_tc(t.gw.dp.tc_program(), t.gw.ifindex_a, &input, 1448).unwrap();
    assert_eq!(action_name(action), "XDP_REDIRECT", "GSO packet: verdict");
    assert!(out == want, "GSO packet: output differs");
    checksums_ok(&out).unwrap();
    let after = t.counters();
    assert_eq!(
        after[Counter::Tx as usize] - before[Counter::Tx as usize],
        1
    );
    // The cache's length is the segments' (IP 20 + TCP 20 + 1448), not 3040.
    let id = t.backend_id(&web, b);
    let nh = t.gw.dp.maps.nexthops(id).unwrap();
    let longest = nh.iter().map(|e| e.max_len).max().unwrap();
    assert!(
        longest <= 1500,
        "the next-hop cache took {longest} bytes as checked"
    );

    let before = t.counters();
    let (action, _) =
        common::testrun::run_tc(t.gw.dp.tc_program(), t.gw.ifindex_a, &input, 0).unwrap();
    assert_eq!(
        action_name(action),
        "XDP_PASS",
        "the same packet without GSO"
    );
    let after = t.counters();
    assert_eq!(
        after[Counter::PassFibOther as usize] - before[Counter::PassFibOther as usize],
        1,
        "too big for the route: given to the kernel"
    );
}
/// A frame of several buffers (an interface with an MTU of 9000: XDP multi-buffer, which the
/// programs declare they handle): a 6000-byte segment of an established flow, its headers in
/// the first buffer, is rewritten and sent like a small one, every byte after the headers as
/// it was.
#[test]
fn multi_buffer_frames() {
    let mut t = Table::new("multibuf");
    t.gw.ns.ip(&["link", "set", "fxa", "mtu", "9000"]);
    let web = vip("10.100.0.100:80/tcp");
    let b = sa("10.1.0.11:8080");
    t.gw.dp.maps.add_vip(&web, 251).unwrap();
    t.gw.dp.maps.add_backend(&web, b, 1).unwrap();
    let c = client(40_200);
    t.forward_to("SYN to a VIP", &syn(c, web.addr), b);
    let mut big = ack(c, web.addr);
    big.payload = (0..6000u32).map(|i| (i * 7) as u8).collect();
    t.forward_to(
        "a 6054-byte frame (beyond one page: several buffers) of the flow → rewritten, XDP_TX",
        &big,
        b,
    );
    // The VIP's byte counter has the whole frame, not its first buffer.
    let info = t.gw.dp.maps.vip(&web).unwrap();
    let st = t.gw.dp.maps.counters.vip(info.vip_id).unwrap();
    let want = (syn(c, web.addr).build().len() + big.build().len()) as u64;
    assert_eq!(st.bytes, want, "bytes counted for {web}");
    let mut big6 = ack(client6(40_201), sa("[fd10::100]:80"));
    big6.payload = vec![0x5a; 7000];
    t.unchanged(
        "a multi-buffer frame for no VIP → passed untouched",
        big6.build(),
        XDP_PASS,
        Counter::PassNotVip,
    );
    t.finish();
}
