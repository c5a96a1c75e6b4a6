//! Errors of the library. Every variant names the problem in words an operator can act on.

use std::net::SocketAddr;

use crate::model::Vip;

/// Largest backend weight (as in ipvsadm).
pub const MAX_WEIGHT: u32 = 65_535;
/// Smallest selection table.
pub const MIN_TABLE_SIZE: u32 = 7;
/// A table must have at least this many slots per backend with a weight above zero, so that
/// every backend's share is within 10% of its weight even in the worst case (±1 slot).
pub const MIN_SLOTS_PER_BACKEND: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("VIP {0} already exists")]
    VipExists(Vip),
    #[error("VIP {0} does not exist")]
    VipNotFound(Vip),
    #[error("backend {backend} of VIP {vip} already exists")]
    BackendExists { vip: Vip, backend: SocketAddr },
    #[error("backend {backend} of VIP {vip} does not exist")]
    BackendNotFound { vip: Vip, backend: SocketAddr },
    #[error("backend {0} is listed twice")]
    DuplicateBackend(SocketAddr),
    #[error("backend {backend} and VIP {vip} are of different address families, which {mode} does not support (only ipip carries IPv4 in IPv6)")]
    FamilyMismatch {
        vip: Vip,
        backend: SocketAddr,
        mode: crate::model::Forward,
    },
    #[error("backend {backend} of VIP {vip}: {mode} does not change the port, so the backend must listen on the VIP's port {}", vip.addr.port())]
    DsrPort {
        vip: Vip,
        backend: SocketAddr,
        mode: crate::model::Forward,
    },
    #[error("backend {backend} already serves VIPs {vips}: one backend address:port can serve at most {} VIPs", lb_common::MAX_VIPS_PER_BACKEND)]
    TooManyVipsPerBackend { backend: SocketAddr, vips: String },
    #[error("backend {backend} cannot serve both VIP {stateless} (reverse = stateless) and VIP {others}: stateless reverse NAT finds a reply's VIP from the backend alone, so a backend of a stateless VIP may serve no other VIP")]
    StatelessBackendShared {
        backend: SocketAddr,
        stateless: String,
        others: String,
    },
    #[error(
        "timeout {state}={seconds} is too long: at most {} seconds (7 days; 0 = never expires)",
        crate::model::MAX_TIMEOUT_S
    )]
    TimeoutOutOfRange { state: &'static str, seconds: u64 },
    #[error("weight {0} is out of range (0..={MAX_WEIGHT}; 0 drains the backend)")]
    WeightOutOfRange(u32),
    #[error("table size {0} is not a prime number (try 65537, 32771, 16411, 4099, 1031 or 251)")]
    TableSizeNotPrime(u32),
    #[error("table size {size} is out of range ({MIN_TABLE_SIZE}..={max})")]
    TableSizeOutOfRange { size: u32, max: u32 },
    #[error("table size {size} is too small for {backends} backends with a weight above zero: it must be at least {MIN_SLOTS_PER_BACKEND} slots per backend ({need})")]
    TableTooSmall { size: u32, backends: u32, need: u32 },
    #[error("source prefix /{prefix} is longer than an IPv{family} address")]
    SourcePrefixTooLong { prefix: u8, family: u8 },
    #[error("round robin needs a sequence of {len} slots for these weights (their sum divided by their greatest common divisor), but the table has {size}: use smaller weights or a larger table")]
    RoundRobinTooLong { len: u64, size: u32 },
    #[error(
        "least-conn needs a TCP VIP: {0} is UDP, whose flows have no end the data plane can see"
    )]
    LeastConnNeedsTcp(Vip),
    #[error("stateless reverse NAT needs an algorithm every gateway computes alike from the packet (maglev or source-hash); VIP {0} would have another")]
    StatelessReverseNeedsHash(Vip),
    #[error("too many VIPs: the maximum is {0}")]
    TooManyVips(u32),
    #[error("too many backends: {need} more needed but only {free} of {capacity} are free")]
    TooManyBackends { need: u32, free: u32, capacity: u32 },
    #[error("no room for a table of {size} slots: the table array has {capacity} slots and no free run that long; use smaller tables or load lb with a larger table capacity")]
    TableCapacity { size: u32, capacity: u32 },
    #[error("reading the data plane's clock: {0}")]
    Clock(String),
    #[error("{context}: {source}")]
    Map {
        context: String,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Adds context to a map error.
pub(crate) trait MapContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, LbError>;
}

impl<T> MapContext<T> for Result<T, aya::maps::MapError> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, LbError> {
        self.map_err(|source| LbError::Map {
            context: context(),
            source,
        })
    }
}
