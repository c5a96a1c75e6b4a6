//! Types and pure functions shared by the lb XDP program (`lb-ebpf`) and userspace.
//!
//! Every type that crosses the kernel/user boundary is `#[repr(C)]`, has explicit padding
//! fields, states the byte order of multi-byte fields in the field name (`_be` = network byte
//! order, exactly as on the wire; no suffix = host order), derives `bytemuck::Pod` (which refuses
//! implicit padding at compile time) and has a compile-time size check.
//!
//! The hash and checksum code lives here too so that the kernel and userspace run the very same
//! code: userspace can predict the backend the data plane picks, and both are unit-tested on the
//! host.
#![no_std]

pub mod bench;
pub mod csum;
pub mod hash;
pub mod maps;
pub mod stats;

pub use maps::*;
pub use stats::*;
