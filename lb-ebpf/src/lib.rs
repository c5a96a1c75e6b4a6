//! Code shared by the programs of this crate (`lb-xdp`, `lb-decap`, `lb-bench`).
#![no_std]

pub mod bounds;
pub mod headers;
