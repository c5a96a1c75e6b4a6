//! lb userspace: builds selection tables, loads and attaches the XDP program and manages its
//! maps. The `lb` binary (src/main.rs) is a thin command line over this library.

pub mod agent;
pub mod announce;
pub mod clock;
pub mod config;
pub mod dataplane;
pub mod decap;
pub mod drain;
pub mod error;
pub mod health;
pub mod identity;
pub mod links;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod nexthop;
pub mod object;
pub mod pin;
pub mod privileges;
pub mod schedule;
pub mod slots;
pub mod state;
pub mod sweep;
#[cfg(feature = "testbed")]
pub mod testbed;

pub use dataplane::{AttachMode, Dataplane, LoadOptions};
pub use error::LbError;
pub use model::{Algorithm, Proto, Vip};
pub use state::{BackendState, Change, CtTable, LbMaps};
