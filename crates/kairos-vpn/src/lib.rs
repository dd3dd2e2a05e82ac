//! The mesh VPN and the `p2p run` daemon (async: tokio lives here and in kairos-mesh-net
//! only; kairos-immucore links neither).
//!
//! - [`settings`]: the daemon's settings from the cloud-config's `p2p:` block (pure);
//! - [`packet`]: IP packet addresses and stream splitting (pure);
//! - [`tun`]: the TUN device as async packet reader/writer;
//! - [`vpn`]: the packet path over libp2p streams, EdgeVPN's and ours;
//! - [`dns`]: mesh names and the `dns` bucket, forwarding the rest;
//! - [`daemon`]: everything together, with DHCP over the ledger, heartbeats and the status
//!   socket.

pub mod daemon;
pub mod dns;
pub mod packet;
pub mod settings;
pub mod tun;
pub mod vpn;
