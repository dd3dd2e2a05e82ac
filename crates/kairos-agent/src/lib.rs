//! The `kairos-agent` program as a library: its CLI and commands, so they can be tested
//! without spawning the binary.

pub mod bridge;
pub mod cli;
pub mod cluster;
pub mod kubernetes;
pub mod lifecycle;
pub mod p2p;
pub mod pair;
