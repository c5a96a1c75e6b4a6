//! lb userspace: builds selection tables, loads and attaches the XDP program and manages its
//! maps. The `lb` binary (src/main.rs) is a thin command line over this library.

pub mod maglev;
pub mod object;
