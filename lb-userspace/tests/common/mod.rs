//! Shared test support: network namespaces, packet building, running the real program.
#![allow(dead_code)]

pub mod model;
pub mod mutate;
pub mod netns;
pub mod oracle;
pub mod packets;
pub mod raw;
pub mod testrun;
pub mod topology;
