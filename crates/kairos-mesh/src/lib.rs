//! The P2P mesh of Kairos (EdgeVPN-compatible).
//!
//! - [`token`]: the network token — EdgeVPN's base64 of a YAML document — read, checked and
//!   written exactly, and generated;
//! - [`otp`]: the secrets derived from it that rotate with time (seal key, gossip topic, DHT
//!   rendezvous and its provider key, DHCP lease name);
//! - [`seal`]: sealing ledger messages with the rotating key (AES-256-GCM, hex on the wire);
//! - [`ledger`]: the shared key/value ledger — EdgeVPN's block, its JSON and hash, the merge
//!   rules, the wire format; [`leader`]: the leader function every node computes alike;
//! - [`state`]: a node's ledger view and the decisions taken on it (writes, merges, who is
//!   alive, the DHCP-over-ledger address rule);
//! - [`identity`]: Ed25519 identities and PeerIDs.
//!
//! Everything here is synchronous and pure; the libp2p host and the VPN come on top.

pub mod identity;
pub mod leader;
pub mod ledger;
pub mod otp;
pub mod seal;
pub mod state;
pub mod token;

pub use token::{Otp, Token, TokenError};
