//! Keys and values of the BPF maps, and the map names.
//!
//! A pinned map is reused by name without any check of its layout, so every map name carries a
//! layout version (`_V1`): change a layout, bump the version.

use bytemuck::{Pod, Zeroable};

/// Address family tag stored in keys (not the AF_* numbers, which differ between systems).
pub const FAMILY_V4: u8 = 4;
/// Address family tag stored in keys.
pub const FAMILY_V6: u8 = 6;

/// IANA protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IANA protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IANA protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IANA protocol number of IPv4 encapsulated in IP (IPIP).
pub const PROTO_IPIP: u8 = 4;
/// IANA protocol number of IPv6 encapsulated in IP.
pub const PROTO_IPV6: u8 = 41;

/// `names::PROGS` slot of `lb_ipip` (encapsulation, too-big answers).
pub const PROG_IPIP: u32 = 0;
/// `names::PROGS` slot of `lb_icmp` (ICMP errors about VIP flows).
pub const PROG_ICMP: u32 = 1;
/// Names of the tail-called programs, by slot.
pub const TAIL_PROGRAMS: [&str; 2] = ["lb_ipip", "lb_icmp"];
/// The same for `lb_xdp_generic` (`names::GENERIC_PROGS`).
pub const GENERIC_TAIL_PROGRAMS: [&str; 2] = ["lb_ipip_generic", "lb_icmp_generic"];
/// The same for `lb_tc` (`names::TC_PROGS`).
pub const TC_TAIL_PROGRAMS: [&str; 2] = ["lb_tc_ipip", "lb_tc_icmp"];

/// What `lb_xdp` hands `lb_ipip` in `names::HANDOFF`: the chosen backend and the flow's
/// encapsulation hash (`hash::encap_hash`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Handoff {
    pub backend_id: u32,
    pub hash: u32,
}
const _: () = assert!(core::mem::size_of::<Handoff>() == 8);

/// `VipInfo::fwd`: rewrite the destination address and port (replies come back through lb).
pub const FWD_NAT: u8 = 0;
/// `VipInfo::fwd`: rewrite only the destination MAC to the backend's (direct server return on
/// one L2 segment; the backend holds the VIP on a loopback interface).
pub const FWD_DSR_L2: u8 = 1;
/// `VipInfo::fwd`: encapsulate in an outer IP header to the backend (IPv4 in IPv4, IPv6 in
/// IPv6, IPv4 in IPv6), which decapsulates and answers the client directly.
pub const FWD_IPIP: u8 = 2;

/// Outer source addresses of IPIP packets: this /16 (IPv4) or /96 (IPv6), with the low 16 / 32
/// bits taken from the flow hash, so that backends' receive-side scaling spreads flows over
/// queues while one flow stays on one queue (as Katran does). Nothing is ever sent to them.
pub const ENCAP_SRC_V4_BE: u32 = u32::from_ne_bytes([172, 16, 0, 0]);
/// IPv6 outer source prefix: 100::/64 is the discard-only prefix (RFC 6666).
pub const ENCAP_SRC_V6_BE: [u32; 3] = [u32::from_ne_bytes([0x01, 0, 0, 0]), 0, 0];
/// TTL / hop limit of outer headers and of ICMP messages lb writes.
pub const LB_TTL: u8 = 64;

/// Capacity of the VIP map; a VIP's `vip_id` is below this.
pub const MAX_VIPS: u32 = 1024;
/// Capacity of the backend array; a backend id is below this.
pub const MAX_BACKENDS: u32 = 65_536;
/// Default number of slots of a VIP's selection table (a prime).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Largest selection table a single VIP may have.
pub const MAX_TABLE_SIZE: u32 = 1_048_573;
/// Default capacity of the slot array shared by all VIPs' tables (16 tables of 65537 slots).
pub const DEFAULT_TABLE_CAPACITY: u32 = 16 * DEFAULT_TABLE_SIZE;
/// Default capacity of the connection-tracking LRU map (confirmed flows).
pub const DEFAULT_CT_CAPACITY: u32 = 1 << 20;
/// Default capacity of the unconfirmed-flow LRU map.
pub const DEFAULT_CT_NEW_CAPACITY: u32 = 1 << 18;
/// Slot value meaning "no backend": the packet is dropped and counted.
pub const NO_BACKEND: u32 = u32::MAX;

/// Map names, at most 15 characters (the kernel cuts object names there).
pub mod names {
    /// `HashMap<Endpoint, VipInfo>`: the configured VIPs.
    pub const VIPS: &str = "LB_VIPS_V2";
    /// `Array<VipById>`: each VIP again, by `vip_id`, so that a packet whose conntrack entry
    /// names a backend (and so a `vip_id`) needs no `VIPS` lookup. A mirror of `VIPS` that
    /// userspace writes with it (cleared before a VIP goes); an empty or different slot only
    /// sends the packet the `VIPS` way.
    pub const VIP_BY_ID: &str = "LB_VIPBYID_V1";
    /// `Array<u8>` (65,536): 1 where some VIP's address has these low 16 bits
    /// (`vip_addr_slot`). Only a hint of which lookup to make first — conntrack (likely a VIP)
    /// or `VIPS` (likely not) — never a filter: a wrong hint costs a lookup, not a verdict.
    pub const VIP_ADDRS: &str = "LB_VIPADDRS_V1";
    /// `HashMap<Endpoint, u8>`: each VIP address (port and protocol 0) → 1. Traffic to one
    /// that no VIP claims is dropped (`DropVipUnclaimed`), never routed back.
    pub const VIP_IPS: &str = "LB_VIPIPS_V1";
    /// `Array<u8>`: per port (host order), whether some VIP listens on it (`PORT_F_VIP`) and
    /// whether some backend serves from it (`PORT_F_BACKEND`): a cheap filter before the hash
    /// lookups, so traffic not for lb pays two array reads instead of two hash lookups.
    pub const PORTS: &str = "LB_PORTS_V1";
    /// `PerCpuArray<u32>`: each CPU's position in a round-robin VIP's sequence, by `vip_id`.
    pub const RR_POS: &str = "LB_RRPOS_V1";
    /// `Array<Backend>`: every backend of every VIP, indexed by backend id.
    pub const BACKENDS: &str = "LB_BACKENDS_V1";
    /// `Array<u32>`: the selection tables of all VIPs, one contiguous run of slots each.
    /// (V2: mappable, `BPF_F_MMAPABLE`; `lb upgrade` copies V1's tables into it.)
    pub const TABLE: &str = "LB_TABLE_V2";
    /// `LruHashMap<FlowKey, CtEntry>`: confirmed flow → backend (connection tracking).
    pub const CONNTRACK: &str = "LB_CT_V3";
    /// `LruHashMap<FlowKey, CtEntry>`: flows not yet confirmed (a separate, bounded LRU, so
    /// that a flood of them never evicts a confirmed flow).
    pub const CT_NEW: &str = "LB_CTNEW_V1";
    /// `Array<Timeouts>`: flow timeouts per VIP, by `vip_id`.
    pub const TIMEOUTS: &str = "LB_TIMEOUTS_V1";
    /// `Array<GlobalConf>` (one entry): hash seed, flood threshold.
    pub const CONF: &str = "LB_CONF_V1";
    /// `PerCpuArray<RateWindow>` (one entry): this CPU's new-flow rate.
    pub const RATE: &str = "LB_RATE_V1";
    /// `Array<u64>` (one entry): when some CPU last exceeded the flood threshold (the data
    /// plane's clock, ns); replies of flows without an entry from a member of the VIP are
    /// translated until the VIP's established timeout after it.
    pub const FLOOD: &str = "LB_FLOOD_V1";
    /// `PerCpuArray<CountEvents>`: per backend id, flows put on and taken off its active count.
    pub const CT_COUNTS: &str = "LB_CTCOUNT_V1";
    /// `Array<u64>`: active (open) flows per backend, by backend id.
    pub const ACTIVE: &str = "LB_ACTIVE_V1";
    /// `HashMap<Endpoint, RevNat>`: backend endpoint → the VIPs it serves (replies are rewritten
    /// to the one whose flow it is).
    pub const REVNAT: &str = "LB_REVNAT_V2";
    /// `PerCpuArray<u64>`: the decapsulation program's counters, indexed by `DecapCounter`.
    pub const DECAP_STATS: &str = "LB_DECAP_STATS_V2";
    /// `LpmTrie<DecapAddr, u8>`: the outer sources `lb_decap` accepts (the gateways'
    /// encapsulation prefixes, `lb decap attach --from`).
    pub const DECAP_FROM: &str = "LB_DECAP_FROM_V1";
    /// `HashMap<Endpoint, u8>`: the VIPs (addresses; port and protocol 0) an inner packet may
    /// be addressed to (`lb decap attach --vip`, or the loopback's addresses).
    pub const DECAP_VIPS: &str = "LB_DECAP_VIPS_V1";
    /// `HashMap<Endpoint, u8>`: this host's addresses (port and protocol 0), the outer
    /// destinations `lb_decap` accepts (read at `lb decap attach`).
    pub const DECAP_LOCAL: &str = "LB_DECAP_LOCAL_V1";
    /// `ProgramArray`: the programs `lb_xdp` tail-calls for its rarer paths (`PROG_*`), each
    /// with a whole stack of its own.
    /// (V3: `lb_xdp` and its tail programs are multi-buffer programs, and a program array
    /// takes only programs that agree with its first user on that; V1 and V2, of single-buffer
    /// programs, are removed by the `lb upgrade` that makes V3.)
    pub const PROGS: &str = "LB_PROGS_V3";
    /// `ProgramArray`: the same for `lb_xdp_generic`, the single-buffer programs of generic
    /// mode (`GENERIC_TAIL_PROGRAMS`).
    pub const GENERIC_PROGS: &str = "LB_GENPROGS_V1";
    /// `ProgramArray`: the same for `lb_tc` (`TC_TAIL_PROGRAMS`).
    pub const TC_PROGS: &str = "LB_TCPROGS_V1";
    /// `PerCpuArray<Handoff>`: what `lb_xdp` hands a tail-called program (same CPU, same
    /// packet).
    pub const HANDOFF: &str = "LB_HANDOFF_V1";
    /// `PerCpuArray<u64>`: global verdict and event counters, indexed by `Counter`
    /// (`COUNTER_CAPACITY` entries, so counters can be added without a new layout).
    pub const STATS: &str = "LB_STATS_V5";
    /// `PerCpuArray<NextHop>`: the next-hop cache the data plane fills from its own route
    /// lookups, indexed by backend id.
    pub const NEXTHOP: &str = "LB_NEXTHOP_V2";
    /// `PerCpuArray<TrafficStats>`: per-VIP traffic, indexed by `vip_id`.
    pub const VIP_STATS: &str = "LB_VIPSTATS_V1";
    /// `PerCpuArray<TrafficStats>`: per-backend traffic, indexed by backend id.
    pub const BACKEND_STATS: &str = "LB_BESTATS_V1";
}

/// Byte order, once for all types here: a field named `*_be` holds the bytes exactly as they
/// are on the wire (network byte order). `u16`/`u32` words are used instead of byte arrays so
/// that the data plane moves them with word loads and stores; their numeric value is therefore
/// the wire bytes read in host order (`u16::from_ne_bytes(wire)`), not the port or address.
/// Convert with `u16::to_be`/`from_be` and `addr_words`/`addr_octets`.
///
/// An L4 endpoint: address, port and protocol. Key of the VIP map (the VIP) and of the
/// reverse-NAT map (a backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Endpoint {
    /// Address, network byte order. IPv4 uses word 0; words 1..4 are zero.
    pub addr_be: [u32; 4],
    /// Port, network byte order.
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);

/// Value of the VIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipInfo {
    /// Index of this VIP in the per-VIP statistics array; unique among VIPs, below `MAX_VIPS`.
    pub vip_id: u32,
    /// Index of this VIP's first slot in the shared slot array (`names::TABLE`).
    pub table_off: u32,
    /// Number of slots M of this VIP's table (a prime). The slot of a flow is `hash % M`.
    pub table_size: u32,
    /// Round robin only: the length of the sequence stored at the start of the table
    /// (0 = no backend). Zero for the other algorithms.
    pub seq_len: u32,
    /// How new flows pick their backend: `ALGO_*`.
    pub algo: u8,
    /// Source hash only: the client address prefix length that is hashed (0 = whole address).
    pub src_prefix_len: u8,
    /// `VIP_F_*` bits.
    pub flags: u8,
    /// How packets reach the backend: `FWD_NAT`, `FWD_DSR_L2` or `FWD_IPIP`.
    pub fwd: u8,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 20);

/// The slot of `names::VIP_ADDRS` for a destination address: its low 16 bits (the last two
/// bytes of the IPv4 or IPv6 address).
#[inline(always)]
pub fn vip_addr_slot(family: u8, addr_be: &[u32; 4]) -> u32 {
    let w = if family == FAMILY_V4 {
        addr_be[0]
    } else {
        addr_be[3]
    };
    u32::from_be(w) & 0xffff
}

/// The data of a `names::DECAP_FROM` key (an LPM trie, whose key is a prefix length and this):
/// the family and padding (32 bits, always significant), then the address. A prefix of `n`
/// address bits has length `32 + n` (`DecapAddr::prefix_len`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DecapAddr {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network byte order; IPv4 uses word 0.
    pub addr_be: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<DecapAddr>() == 20);

impl DecapAddr {
    /// The trie's prefix length for `bits` significant address bits.
    pub const fn prefix_len(bits: u32) -> u32 {
        32 + bits
    }
}

/// Value of `names::VIP_BY_ID`: a VIP's endpoint and entry. Empty (all zero, family 0) when no
/// VIP has the id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipById {
    pub vip: Endpoint,
    pub info: VipInfo,
}
const _: () = assert!(core::mem::size_of::<VipById>() == 40);

/// Weighted consistent hash of the 5-tuple through the Maglev table (default).
pub const ALGO_MAGLEV: u8 = 0;
/// A random slot of the Maglev table (so a backend's chance is its share of slots).
pub const ALGO_RANDOM: u8 = 1;
/// Smooth weighted round robin: each CPU walks the VIP's sequence in turn.
pub const ALGO_ROUND_ROBIN: u8 = 2;
/// Consistent hash of the client address (or its prefix) through the Maglev table.
pub const ALGO_SOURCE_HASH: u8 = 3;
/// The less loaded (active flows / weight) of two random Maglev slots' backends (TCP only).
pub const ALGO_LEAST_CONN: u8 = 4;

/// `names::PORTS` flag: some VIP has this port.
pub const PORT_F_VIP: u8 = 1;
/// `names::PORTS` flag: some backend has this port.
pub const PORT_F_BACKEND: u8 = 2;

/// `Backend::flags`: the entry is in use.
pub const BACKEND_F_VALID: u8 = 1;
/// `Backend::flags`: health checks found the backend down, so it has no table slots (its
/// established flows are left alone). Set and cleared by the agent; kept in the map so that a
/// restarted agent adopts it instead of sending new flows to a dead backend again.
pub const BACKEND_F_DOWN: u8 = 2;

/// `VipInfo::flags`: when every backend with a weight is down, give the VIP an empty table
/// (new flows dropped and counted as `no_backend`). Without it the VIP fails open: new flows
/// go to all its backends with a weight, as if they were healthy.
pub const VIP_F_DROP_WHEN_ALL_DOWN: u8 = 1;
/// `VipInfo::flags`: a backend's reply with no conntrack entry here is still the VIP's if the
/// backend is a current member of the VIP (several gateways behind ECMP, where the client's
/// packets may have gone through another one). Only for maglev and source-hash VIPs.
pub const VIP_F_STATELESS_REVERSE: u8 = 2;
/// `VipInfo::flags`: withdraw the VIP's address from BGP while every backend with a weight is
/// down (anycast over sites: another site should take its traffic). The data plane ignores
/// it (it fails open meanwhile); the agent's announcements read it.
pub const VIP_F_WITHDRAW_WHEN_ALL_DOWN: u8 = 4;

/// Value of the backend array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    /// Address, network byte order (IPv4 in word 0).
    pub addr_be: [u32; 4],
    /// Port, network byte order.
    pub port_be: u16,
    /// `FAMILY_V4` or `FAMILY_V6`; always the VIP's family (NAT does not translate families).
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// The VIP this backend serves. The data plane refuses a backend of another VIP.
    pub vip_id: u32,
    /// Relative weight; 0 = drained (no new flows, established flows continue). Only userspace
    /// reads it: the data plane sees weights through the selection table.
    pub weight: u32,
    /// Bumped every time the id is given to a new backend, so that a conntrack entry made for
    /// an earlier holder of the id is recognised as stale.
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 32);

impl Backend {
    /// Whether the entry is in use.
    #[inline(always)]
    pub fn is_valid(&self) -> bool {
        self.flags & BACKEND_F_VALID != 0
    }
}

/// A flow as seen by the gateway on the way in (client → VIP). Key of the conntrack map and
/// input of the flow hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    /// Source (client) address, network byte order, IPv4 in word 0.
    pub src_be: [u32; 4],
    /// Destination (VIP) address, network byte order.
    pub dst_be: [u32; 4],
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Always zero (hashed and compared as part of the key).
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of both conntrack maps (`names::CONNTRACK`: confirmed flows; `names::CT_NEW`: flows
/// not yet confirmed). See ARCHITECTURE.md, "Flow state".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    /// The backend this flow is pinned to.
    pub backend_id: u32,
    /// `Backend::generation` when the entry was made; a mismatch means the backend was replaced.
    pub generation: u32,
    /// When a packet last refreshed the entry, on the data plane's clock: `jiffies ×
    /// GlobalConf::ns_per_tick` nanoseconds (the kernel's tick counter, which the verifier
    /// reads inline, where a clock helper would cost every packet a call). Refreshed at most
    /// about once a second.
    pub last_seen_ns: u64,
    /// `CT_F_*` bits (64-bit: the data plane changes them with atomic fetch-or / fetch-and,
    /// which BPF has for 64-bit words).
    pub flags: u64,
    /// NAT, TCP, not yet confirmed, with `CT_F_SYNACK`: the acknowledgment number (host order)
    /// the client's handshake-completing ACK carries (the backend's initial sequence + 1).
    pub ack_expect: u32,
    /// `CT_S_*`.
    pub state: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);

/// `CtEntry::state`: TCP, a SYN (or, with `CT_F_PICKUP`, a mid-stream packet) was seen; the
/// handshake has not been shown to complete. Only in `names::CT_NEW`.
pub const CT_S_OPENING: u8 = 1;
/// `CtEntry::state`: TCP, confirmed (handshake completed, or picked up mid-stream and answered).
pub const CT_S_ESTABLISHED: u8 = 2;
/// `CtEntry::state`: TCP, a FIN from one side: still forwarded, shorter timeout.
pub const CT_S_CLOSING: u8 = 3;
/// `CtEntry::state`: TCP, FINs from both sides (over: a SYN on it is a new connection), or an
/// RST (off the active count, short timeout, backend kept: a non-RST packet from the side that
/// sent the RST shows the flow goes on and undoes it).
pub const CT_S_CLOSED: u8 = 4;
/// `CtEntry::state`: UDP (confirmed in `names::CONNTRACK` by a reply, unconfirmed in
/// `names::CT_NEW`).
pub const CT_S_UDP: u8 = 5;
/// Names of the states, by `CT_S_*` (index 0 unused).
pub const CT_STATE_NAMES: [&str; 6] =
    ["none", "opening", "established", "closing", "closed", "udp"];

/// `CtEntry::flags`: the flow counts in its backend's active-flow count (`names::ACTIVE`).
/// Cleared with an atomic fetch-and by whoever takes it off the count, so that happens once.
pub const CT_F_COUNTED: u64 = 1;
/// `CtEntry::flags`: a FIN from the client was seen.
pub const CT_F_FIN_CLIENT: u64 = 2;
/// `CtEntry::flags`: a FIN from the backend was seen (NAT: the gateway sees replies).
pub const CT_F_FIN_BACKEND: u64 = 4;
/// `CtEntry::flags`: an RST from the client, and no ordinary packet from the client since.
pub const CT_F_RST: u64 = 8;
/// `CtEntry::flags`: an RST from the backend, and no ordinary packet from the backend since.
pub const CT_F_RST_BACKEND: u64 = 128;
/// `CtEntry::flags`: NAT, unconfirmed: the backend's SYN-ACK was seen; `ack_expect` is valid.
pub const CT_F_SYNACK: u64 = 16;
/// `CtEntry::flags`: unconfirmed entry made for a mid-stream packet (no SYN seen).
pub const CT_F_PICKUP: u64 = 32;
/// `CtEntry::flags`: the client sent a packet after the one that made the entry (DSR
/// confirmation evidence).
pub const CT_F_CLIENT_AGAIN: u64 = 64;
/// `CtEntry::flags`: the flow's VIP forwards without NAT (dsr-l2, ipip). Its backend answers
/// the client directly, from the VIP; nothing from the backend's own address is a reply of it.
pub const CT_F_DIRECT: u64 = 256;

/// The client's ACK confirms a NAT TCP flow when its acknowledgment number is at most this far
/// past `CtEntry::ack_expect`: the handshake's ACK carries exactly `ack_expect`; the window
/// allows for response data a TCP Fast Open server sends before it. A blind spoofer hits it
/// with probability 2^-16 per try.
pub const ACK_WINDOW: u32 = 1 << 16;

/// Per backend (per CPU), how often a flow was put on its active count and taken off
/// (`names::CT_COUNTS`): monotonic, so the sweep can tell a race from a leak.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CountEvents {
    /// Flows put on the backend's active count.
    pub counted: u64,
    /// Flows taken off it.
    pub uncounted: u64,
}
const _: () = assert!(core::mem::size_of::<CountEvents>() == 16);

/// Flow timeouts of one VIP, in seconds (`names::TIMEOUTS`, indexed by `vip_id`). An entry
/// whose last packet is older than its state's timeout is treated as absent. 0 = never expires.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Timeouts {
    /// TCP, handshake not completed (`CT_S_OPENING`).
    pub opening_s: u32,
    /// TCP, established.
    pub established_s: u32,
    /// TCP, one FIN or an RST seen.
    pub closing_s: u32,
    /// TCP, FINs both ways.
    pub closed_s: u32,
    /// UDP.
    pub udp_s: u32,
}
const _: () = assert!(core::mem::size_of::<Timeouts>() == 20);

impl Timeouts {
    /// Defaults, in the range of IPVS (SYN_RECV 60 s, ESTABLISHED 900 s, FIN_WAIT 120 s, CLOSE
    /// 10 s, UDP 300 s) and Cilium (SYN 60 s, TCP 6 h, close 10 s, other 60 s).
    pub const DEFAULT: Timeouts = Timeouts {
        opening_s: 60,
        established_s: 3600,
        closing_s: 120,
        closed_s: 10,
        udp_s: 300,
    };

    /// The timeout of state `s` (`CT_S_*`), seconds.
    #[inline(always)]
    pub fn of_state(&self, s: u8) -> u32 {
        match s {
            CT_S_OPENING => self.opening_s,
            CT_S_ESTABLISHED => self.established_s,
            CT_S_CLOSING => self.closing_s,
            CT_S_CLOSED => self.closed_s,
            _ => self.udp_s,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts::DEFAULT
    }
}

/// Deployment-wide settings (`names::CONF`, one entry), written by userspace at load and by
/// `lb apply`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GlobalConf {
    /// Seed of the flow hash and the source hash. Secret per deployment; every gateway of one
    /// deployment must have the same.
    pub hash_seed: u32,
    /// New flows per second per CPU above which no unconfirmed entry is stored (the flood
    /// threshold); 0 = no limit.
    pub flood_rate: u32,
    /// Nanoseconds per kernel tick (10^9 / CONFIG_HZ), measured at first load: the data
    /// plane's clock is `jiffies × ns_per_tick`. 0: not measured; the data plane then uses
    /// `bpf_ktime_get_coarse_ns` (`CLOCK_MONOTONIC_COARSE`) instead.
    pub ns_per_tick: u32,
    /// How long (ms) a next hop the data plane looked up is used before it looks it up again;
    /// 0: the default (`DEFAULT_NEXTHOP_MAX_AGE_MS`; also what a deployment from before this
    /// field has), `NEXTHOP_CACHE_OFF`: a route lookup for every packet.
    pub nexthop_max_age_ms: u32,
}
const _: () = assert!(core::mem::size_of::<GlobalConf>() == 16);

/// Default flood threshold: new flows per second per CPU (Katran's `MAX_CONN_RATE`).
pub const DEFAULT_FLOOD_RATE: u32 = 125_000;

/// Per-CPU new-flow rate window (`names::RATE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RateWindow {
    /// Start of the current one-second window, on the data plane's clock (ns).
    pub start_ns: u64,
    /// New flows seen in this window.
    pub count: u64,
}
const _: () = assert!(core::mem::size_of::<RateWindow>() == 16);

/// `NextHop::flags`: the entry may be used.
pub const NEXTHOP_F_VALID: u16 = 1;
/// `NextHop::flags`: the next hop is the backend itself (directly connected), as dsr-l2 needs.
pub const NEXTHOP_F_ONLINK: u16 = 2;

/// Value of the next-hop cache (per CPU, by backend id): how the last route lookup for a
/// backend said to reach it. The data plane writes it after each successful `bpf_fib_lookup`
/// towards a backend and uses it instead of a lookup while it is younger than the
/// deployment's `nexthop_max_age_ms` (so a changed route or neighbour is followed within that
/// bound), `generation` equals the backend's (the id was not reused) and the packet is no
/// longer than `max_len` (the lookup's MTU check passed for that length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHop {
    /// When the route lookup that filled it ran (the data plane's clock, ns).
    pub checked_ns: u64,
    /// Egress interface.
    pub ifindex: u32,
    /// `Backend::generation` this entry was resolved for.
    pub generation: u32,
    /// Destination MAC: the backend's, or its router's.
    pub dmac: [u8; 6],
    /// Source MAC: the egress interface's.
    pub smac: [u8; 6],
    /// The longest IP packet (total length, an outer header included) a lookup for this
    /// entry has passed the egress MTU check with; longer packets are looked up.
    pub max_len: u16,
    /// `NEXTHOP_F_*` bits.
    pub flags: u16,
    pub _pad: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 40);

/// How long a cached next hop is used before the route is looked up again, by default (ms):
/// the longest a changed neighbour or route goes unnoticed.
pub const DEFAULT_NEXTHOP_MAX_AGE_MS: u32 = 100;
/// `GlobalConf::nexthop_max_age_ms`: no cache, a route lookup for every packet.
pub const NEXTHOP_CACHE_OFF: u32 = u32::MAX;
/// The largest maximum age the setting takes (ms): an hour.
pub const MAX_NEXTHOP_MAX_AGE_MS: u32 = 3_600_000;

/// `GlobalConf::nexthop_max_age_ms` for the setting `nexthop_max_age_ms` (0: no cache).
pub const fn nexthop_age_to_conf(ms: u32) -> u32 {
    if ms == 0 {
        NEXTHOP_CACHE_OFF
    } else {
        ms
    }
}

/// The setting `nexthop_max_age_ms` (0: no cache) that a `GlobalConf::nexthop_max_age_ms` means.
pub const fn nexthop_age_from_conf(v: u32) -> u32 {
    match v {
        0 => DEFAULT_NEXTHOP_MAX_AGE_MS,
        NEXTHOP_CACHE_OFF => 0,
        v => v,
    }
}

/// One VIP a backend endpoint serves: what its replies in that VIP's flows are rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RevNatEntry {
    /// The VIP: replies get this address and port as their source.
    pub vip: Endpoint,
    /// The VIP's id (per-VIP reply counters, timeouts).
    pub vip_id: u32,
    /// The backend's id for that VIP (per-backend reply counters).
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<RevNatEntry>() == 28);

/// How many VIPs one backend address:port may serve.
pub const MAX_VIPS_PER_BACKEND: usize = 4;

/// Value of the reverse-NAT map: the VIPs a backend endpoint serves. A reply belongs to the
/// first of them whose conntrack holds the flow for this backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RevNat {
    /// Entries in use (`1..=MAX_VIPS_PER_BACKEND`).
    pub count: u32,
    pub vips: [RevNatEntry; MAX_VIPS_PER_BACKEND],
}
const _: () = assert!(core::mem::size_of::<RevNat>() == 116);

/// Traffic counters of one VIP or one backend (per CPU in the kernel; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TrafficStats {
    /// Client → VIP packets forwarded.
    pub packets: u64,
    /// Bytes of those packets (whole frames as received).
    pub bytes: u64,
    /// Flows that got a backend from the selection table (conntrack misses).
    pub new_flows: u64,
    /// Backend → client replies rewritten back to the VIP.
    pub rev_packets: u64,
    /// Bytes of those replies.
    pub rev_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficStats>() == 40);

impl TrafficStats {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, o: &TrafficStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_flows += o.new_flows;
        self.rev_packets += o.rev_packets;
        self.rev_bytes += o.rev_bytes;
    }
}

/// An address's 16 wire bytes as the words stored in `*_be: [u32; 4]` fields.
pub fn addr_words(octets: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The 16 wire bytes of an address stored as words.
pub fn addr_octets(words: [u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    o
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `bytemuck::Pod`: plain old data without padding.
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for VipById {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for Timeouts {}
    unsafe impl aya::Pod for GlobalConf {}
    unsafe impl aya::Pod for RateWindow {}
    unsafe impl aya::Pod for CountEvents {}
    unsafe impl aya::Pod for TrafficStats {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for DecapAddr {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_capacities_are_the_documented_ones() {
        // README: the slot array holds 16 tables of the default size; conntrack 1,048,576
        // confirmed and 262,144 unconfirmed flows. The ACK window makes a blind guess succeed
        // with probability 2^-16.
        assert_eq!(DEFAULT_TABLE_CAPACITY, 16 * 65_537);
        assert_eq!(DEFAULT_TABLE_CAPACITY / DEFAULT_TABLE_SIZE, 16);
        assert_eq!(DEFAULT_CT_CAPACITY, 1_048_576);
        assert_eq!(DEFAULT_CT_NEW_CAPACITY, 262_144);
        assert_eq!(ACK_WINDOW, 65_536);
    }

    #[test]
    fn backend_validity_is_the_valid_bit_only() {
        let with = |flags| Backend {
            flags,
            ..Backend::default()
        };
        assert!(!with(0).is_valid());
        assert!(with(BACKEND_F_VALID).is_valid());
        assert!(!with(BACKEND_F_DOWN).is_valid(), "down without valid");
        assert!(with(BACKEND_F_VALID | BACKEND_F_DOWN).is_valid());
    }

    #[test]
    fn each_state_has_its_own_timeout() {
        let t = Timeouts {
            opening_s: 11,
            established_s: 22,
            closing_s: 33,
            closed_s: 44,
            udp_s: 55,
        };
        assert_eq!(t.of_state(CT_S_OPENING), 11);
        assert_eq!(t.of_state(CT_S_ESTABLISHED), 22);
        assert_eq!(t.of_state(CT_S_CLOSING), 33);
        assert_eq!(t.of_state(CT_S_CLOSED), 44);
        assert_eq!(t.of_state(CT_S_UDP), 55);
        // Anything else (0 = none, unknown values) gets the UDP timeout.
        assert_eq!(t.of_state(0), 55);
        assert_eq!(t.of_state(200), 55);
        assert_eq!(Timeouts::default(), Timeouts::DEFAULT);
    }

    #[test]
    fn traffic_stats_add_every_counter() {
        let mut a = TrafficStats {
            packets: 10,
            bytes: 1000,
            new_flows: 3,
            rev_packets: 7,
            rev_bytes: 700,
        };
        a.add(&TrafficStats {
            packets: 2,
            bytes: 300,
            new_flows: 4,
            rev_packets: 5,
            rev_bytes: 60,
        });
        assert_eq!(
            a,
            TrafficStats {
                packets: 12,
                bytes: 1300,
                new_flows: 7,
                rev_packets: 12,
                rev_bytes: 760,
            }
        );
    }

    #[test]
    fn address_words_hold_the_wire_bytes_in_order() {
        let octets: [u8; 16] = core::array::from_fn(|i| 0x10 + i as u8);
        let words = addr_words(octets);
        assert_eq!(words[0].to_ne_bytes(), [0x10, 0x11, 0x12, 0x13]);
        assert_eq!(words[1].to_ne_bytes(), [0x14, 0x15, 0x16, 0x17]);
        assert_eq!(words[2].to_ne_bytes(), [0x18, 0x19, 0x1a, 0x1b]);
        assert_eq!(words[3].to_ne_bytes(), [0x1c, 0x1d, 0x1e, 0x1f]);
        assert_eq!(addr_octets(words), octets);
        // IPv4 10.1.2.3 in word 0, as the data plane loads it from the header.
        let v4 = addr_words([10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(v4, [u32::from_ne_bytes([10, 1, 2, 3]), 0, 0, 0]);
    }
}
