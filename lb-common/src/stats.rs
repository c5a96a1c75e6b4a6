//! The global counters: every packet increments exactly one *verdict* counter (the reason for
//! what happened to it), and possibly some *event* counters.

/// Index into the global per-CPU counter array (`names::STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    // ---- verdicts: exactly one per packet ----
    /// Not IPv4 or IPv6 (ARP, LLDP, …): passed.
    PassNotIp = 0,
    /// Frame shorter than an Ethernet header: passed.
    PassMalformedEth,
    /// IP header truncated, wrong version, IHL < 5 or total length beyond the frame: passed.
    PassMalformedIp,
    /// IPv4 fragment or IPv6 fragment header: passed, lb does not reassemble.
    PassFragment,
    /// IPv6 with extension headers before the L4 header: passed.
    PassIpv6Ext,
    /// Neither TCP nor UDP (ICMP, …): passed.
    PassNotTcpUdp,
    /// TCP/UDP header truncated, or TCP data offset < 5 or beyond the packet: passed.
    PassMalformedL4,
    /// Well-formed TCP/UDP for neither a VIP nor from a backend: passed untouched.
    PassNotVip,
    /// Addressed to a VIP that has no usable backend: dropped.
    DropNoBackend,
    /// Rewritten and sent back out of the interface it came in on.
    Tx,
    /// Rewritten and redirected to another interface.
    Redirect,
    /// Rewritten; the next hop's MAC is not known yet: given to the kernel, which resolves it.
    PassNoNeigh,
    /// Rewritten; the route lookup said the kernel must handle it (local destination,
    /// forwarding disabled, MTU exceeded, …): given to the kernel.
    PassFibOther,
    /// Rewritten; the route is blackhole / unreachable / prohibit: dropped.
    DropFibUnreachable,
    /// dsr-l2: the backend's MAC is not known yet (no neighbour entry). Dropped: a packet still
    /// addressed to the VIP cannot be handed to the kernel (the client retransmits; the
    /// gateway resolves backends it talks to, e.g. for health checks).
    DropNoNeigh,
    /// dsr-l2: the backend is not on a directly connected network (the route has a gateway):
    /// dropped, since only the MAC is rewritten.
    DropNotOnLink,
    /// ipip: the encapsulated packet would exceed the egress MTU and no ICMP could be sent
    /// (IPv4 without DF, or with IP options): dropped.
    DropTooBig,
    /// ipip: the encapsulation program is not installed (cannot happen once lb is loaded):
    /// dropped.
    DropNoProgram,
    /// ipip: the encapsulated packet would exceed the egress MTU: an ICMP fragmentation-needed
    /// / packet-too-big with the MTU left after encapsulation was sent back to the client.
    TxIcmpTooBig,
    /// To a VIP from a source that cannot be a real client (0/8, 127/8, multicast, broadcast
    /// and 240/4, 169.254/16, ::, ::1, ff00::/8, fe80::/10, or the VIP's own address): dropped.
    DropMartian,
    /// To a VIP with source port 0: dropped.
    DropPortZero,
    /// To a VIP or a reply, with TTL / hop limit <= 1: given to the kernel, which answers
    /// "time exceeded" as a router does.
    PassTtlExceeded,
    /// To a VIP's address, but no VIP of lb's: another port or protocol, ICMP other than a
    /// too-big about a VIP flow (echo, other errors, neighbour discovery), a fragment, IPv6
    /// extension headers, a malformed TCP/UDP header. Passed to the kernel it
    /// would be routed back towards the router that sent it (a loop until its TTL runs out).
    DropVipUnclaimed,

    // ---- events ----
    /// A client → VIP packet took its backend from conntrack.
    CtHit,
    /// A flow got a backend from the selection table (new flow).
    CtMiss,
    /// A conntrack entry pointed at a backend that is gone; the flow was selected afresh.
    CtStale,
    /// Inserting a conntrack entry failed (the flow is still forwarded).
    CtInsertFailed,
    /// A backend → client reply was rewritten back to the VIP.
    RevNat,
    /// A packet to a backend was sent with the next-hop cache (no route lookup).
    NextHopCached,
    /// A client → VIP packet was forwarded with NAT.
    FwdNat,
    /// A client → VIP packet was forwarded with dsr-l2 (MAC rewrite).
    FwdDsrL2,
    /// A client → VIP packet was forwarded with ipip (encapsulated).
    FwdIpip,
    /// An ICMP fragmentation-needed / packet-too-big about a VIP flow was sent to the flow's
    /// backend (PMTU discovery keeps working behind lb).
    IcmpToBackend,
    /// A flow entry older than its state's timeout was found and treated as absent.
    CtExpired,
    /// A flow was confirmed (moved to the confirmed table and counted active).
    CtConfirmed,
    /// A new flow above the flood threshold: no unconfirmed entry stored, backend chosen by
    /// the flow hash.
    CtFloodSkip,
    /// A client ACK on an unconfirmed NAT flow did not acknowledge the backend's SYN-ACK: not
    /// confirmed.
    CtBadAck,
    /// A SYN on a closed flow (FINs both ways): a new connection, selected afresh.
    CtReopened,
    /// An unconfirmed flow removed because its backend answered with an RST.
    CtRefused,
    /// A reply without a flow entry matched through the VIP's table (stateless reverse, or
    /// after a flood).
    RevStateless,
    /// A route lookup towards a backend (none cached, or the cached one too old or too short
    /// for the packet) filled its next-hop cache entry.
    NextHopLookedUp,
    /// A packet whose headers lie partly beyond its directly accessible part (XDP: the first
    /// buffer of a multi-buffer frame; tc: the socket buffer's linear part, after pulling the
    /// usual headers into it): passed untouched, with the malformed-header verdict.
    HeadersNotLinear,
}

/// Number of counters (size of the global counter array).
pub const COUNTER_COUNT: u32 = Counter::HeadersNotLinear as u32 + 1;
/// Entries of the counter array: room for counters added later without a new map layout.
pub const COUNTER_CAPACITY: u32 = 64;
const _: () = assert!(COUNTER_COUNT <= COUNTER_CAPACITY);
/// Counters `0..VERDICT_COUNT` are verdicts; their sum is the number of packets seen.
pub const VERDICT_COUNT: u32 = Counter::DropVipUnclaimed as u32 + 1;

/// Names of the counters, as shown by `lb stats` and exported as metric labels.
pub const COUNTER_NAMES: [&str; COUNTER_COUNT as usize] = [
    "pass_not_ip",
    "pass_malformed_eth",
    "pass_malformed_ip",
    "pass_fragment",
    "pass_ipv6_ext",
    "pass_not_tcp_udp",
    "pass_malformed_l4",
    "pass_not_vip",
    "drop_no_backend",
    "tx",
    "redirect",
    "pass_no_neigh",
    "pass_fib_other",
    "drop_fib_unreachable",
    "drop_no_neigh",
    "drop_not_on_link",
    "drop_too_big",
    "drop_no_program",
    "tx_icmp_too_big",
    "drop_martian",
    "drop_port_zero",
    "pass_ttl_exceeded",
    "drop_vip_unclaimed",
    "ct_hit",
    "ct_miss",
    "ct_stale",
    "ct_insert_failed",
    "rev_nat",
    "nexthop_cached",
    "fwd_nat",
    "fwd_dsr_l2",
    "fwd_ipip",
    "icmp_to_backend",
    "ct_expired",
    "ct_confirmed",
    "ct_flood_skip",
    "ct_bad_ack",
    "ct_reopened",
    "ct_refused",
    "rev_stateless",
    "nexthop_looked_up",
    "headers_not_linear",
];

/// Counters of the decapsulation program (`lb_decap`, map `LB_DECAP_STATS_V1`): one per packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapCounter {
    /// Not IPIP / IPv6-in-IPv6 / IPv4-in-IPv6: passed untouched.
    PassNotEncap = 0,
    /// Encapsulated, but with IPv4 options, a fragment, or an inner header of the wrong
    /// version: passed untouched (the kernel drops it: nothing here handles protocol 4/41).
    PassMalformed,
    /// IPv4 in IPv4 decapsulated and passed up.
    DecapV4InV4,
    /// IPv6 in IPv6 decapsulated and passed up.
    DecapV6InV6,
    /// IPv4 in IPv6 decapsulated and passed up.
    DecapV4InV6,
    /// The frame could not be shrunk after its header was moved: dropped (not seen in
    /// practice).
    Dropped,
    /// Encapsulated, but the outer source is not among the configured gateway prefixes
    /// (`--from`): passed untouched (the kernel drops it: nothing here handles protocol 4/41).
    PassForeign,
    /// Encapsulated, but the outer destination is not an address of this host (a relay
    /// through it): passed untouched.
    PassNotLocal,
    /// Encapsulated, but the inner destination is not one of the VIPs this backend serves
    /// (`--vip`): passed untouched, never stripped.
    PassNotVip,
    /// The outer header was marked CE (congestion) but the inner packet is not ECN-capable:
    /// dropped, as RFC 6040 says (the congestion signal must not be lost).
    DroppedEcn,
}

/// Number of decap counters.
pub const DECAP_COUNTER_COUNT: u32 = DecapCounter::DroppedEcn as u32 + 1;
/// Entries of the decap counter array (room for more counters without a new layout).
pub const DECAP_COUNTER_CAPACITY: u32 = 16;
const _: () = assert!(DECAP_COUNTER_COUNT <= DECAP_COUNTER_CAPACITY);

/// Names of the decap counters, as `lb decap status` shows them.
pub const DECAP_COUNTER_NAMES: [&str; DECAP_COUNTER_COUNT as usize] = [
    "pass_not_encap",
    "pass_malformed",
    "decap_v4_in_v4",
    "decap_v6_in_v6",
    "decap_v4_in_v6",
    "dropped",
    "pass_foreign",
    "pass_not_local",
    "pass_not_vip",
    "dropped_ecn",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_come_first_then_events() {
        // The verdicts are exactly the counters before the first event.
        assert_eq!(VERDICT_COUNT, 23);
        assert_eq!(
            COUNTER_NAMES[VERDICT_COUNT as usize - 1],
            "drop_vip_unclaimed"
        );
        assert_eq!(COUNTER_NAMES[VERDICT_COUNT as usize], "ct_hit");
        assert_eq!(VERDICT_COUNT, Counter::CtHit as u32);
        assert_eq!(
            COUNTER_NAMES[COUNTER_COUNT as usize - 1],
            "headers_not_linear"
        );
        assert_eq!(
            DECAP_COUNTER_NAMES[DecapCounter::PassForeign as usize],
            "pass_foreign"
        );
    }
}
