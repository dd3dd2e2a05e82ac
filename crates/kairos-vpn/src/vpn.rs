//! The packet path: TUN → the peer that owns the destination address → its TUN.
//!
//! Routes come from the ledger's `machines` bucket (address → PeerID), keeping only owners
//! that are alive (a `healthcheck` heartbeat within the ownership TTL, EdgeVPN's
//! `IsOwnerLive`); they are re-read every second.
//!
//! Two protocols carry packets:
//! - [`KAIROS_VPN`] `/kairos/vpn/1.0.0`, between our own nodes: one long-lived stream per
//!   peer, packets back to back (each IP header says where it ends) — no stream set-up per
//!   packet;
//! - [`EDGEVPN`] `/edgevpn/0.1`, EdgeVPN's: one packet per stream, written and closed (G4).
//!   A peer that refuses ours (a Go node) is sent to this way.
//!
//! Inbound streams are accepted only from peers that own a live `machines` entry, so a node
//! outside the network — even one that connected — cannot put a packet on our device.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;

use crate::packet;
use crate::tun::Tun;

pub const KAIROS_VPN: StreamProtocol = StreamProtocol::new("/kairos/vpn/1.0.0");
pub const EDGEVPN: StreamProtocol = StreamProtocol::new("/edgevpn/0.1");
/// Packets waiting for one peer; more are dropped (a NIC's queue).
const QUEUE: usize = 512;

/// Counters shown by `p2p status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub packets_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub packets_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Packets for an address no live peer owns.
    pub no_route: AtomicU64,
    /// Inbound streams refused: the peer owns no live address here.
    pub refused_streams: AtomicU64,
    /// Packets dropped because a peer's queue was full or its stream failed.
    pub dropped: AtomicU64,
}

impl Counters {
    pub fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "packets_out": g(&self.packets_out), "bytes_out": g(&self.bytes_out),
            "packets_in": g(&self.packets_in), "bytes_in": g(&self.bytes_in),
            "no_route": g(&self.no_route), "refused_streams": g(&self.refused_streams),
            "dropped": g(&self.dropped),
        })
    }
}

/// Address → peer, and the peers allowed to send.
#[derive(Debug, Default, Clone)]
pub struct Routes {
    pub by_ip: HashMap<Ipv4Addr, PeerId>,
    pub allowed: HashSet<PeerId>,
}

impl Routes {
    /// Routes from `machines` entries whose owner is in `live`.
    pub fn from_machines(
        machines: &std::collections::BTreeMap<Ipv4Addr, String>,
        live: &[String],
        me: &PeerId,
    ) -> Routes {
        let mut r = Routes::default();
        for (ip, peer) in machines {
            if !live.contains(peer) {
                continue;
            }
            let Ok(id) = peer.parse::<PeerId>() else {
                continue;
            };
            if &id != me {
                r.by_ip.insert(*ip, id);
                r.allowed.insert(id);
            }
        }
        r
    }
}

/// The running packet path.
pub struct Vpn {
    pub routes: Arc<RwLock<Routes>>,
    pub counters: Arc<Counters>,
}

impl Vpn {
    /// Starts moving packets between `tun` and the peers of `control`'s host.
    pub fn start(tun: Tun, mut control: libp2p_stream::Control) -> Vpn {
        let routes = Arc::new(RwLock::new(Routes::default()));
        let counters = Arc::new(Counters::default());
        for proto in [KAIROS_VPN, EDGEVPN] {
            let Ok(mut incoming) = control.accept(proto) else {
                continue;
            };
            let (tun, routes, counters) = (tun.clone(), routes.clone(), counters.clone());
            tokio::spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    let ok = routes
                        .read()
                        .map(|r| r.allowed.contains(&peer))
                        .unwrap_or(false);
                    if !ok {
                        counters.refused_streams.fetch_add(1, Ordering::Relaxed);
                        drop(stream);
                        continue;
                    }
                    tokio::spawn(receive(stream, tun.clone(), counters.clone()));
                }
            });
        }
        tokio::spawn(outbound(tun, control, routes.clone(), counters.clone()));
        Vpn { routes, counters }
    }
}

/// Reads packets off a peer's stream into the device until it ends or turns out garbage.
///
/// The buffer starts at one MTU's worth and grows only for a packet that needs it (to at most
/// two maximum packets): EdgeVPN peers open a stream per packet, so this runs per packet.
async fn receive(mut stream: libp2p::Stream, tun: Tun, counters: Arc<Counters>) {
    let mut buf = vec![0u8; 4096];
    let mut have = 0;
    loop {
        if have == buf.len() {
            if buf.len() >= 2 * packet::MAX_PACKET {
                return; // a "packet" longer than any IP packet
            }
            buf.resize((buf.len() * 2).min(2 * packet::MAX_PACKET), 0);
        }
        let n = match stream.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        have += n;
        let Ok((packets, used)) = packet::split(&buf[..have]) else {
            return;
        };
        for p in packets {
            if tun.send(p).is_ok() {
                counters.packets_in.fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes_in
                    .fetch_add(p.len() as u64, Ordering::Relaxed);
            }
        }
        buf.copy_within(used..have, 0);
        have -= used;
    }
}

/// Reads the device and hands each packet to the sender of the peer owning its destination.
async fn outbound(
    tun: Tun,
    control: libp2p_stream::Control,
    routes: Arc<RwLock<Routes>>,
    counters: Arc<Counters>,
) {
    let mut senders: HashMap<PeerId, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; packet::MAX_PACKET];
    loop {
        let n = match tun.recv(&mut buf).await {
            Ok(n) => n,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let p = &buf[..n];
        let Some(IpAddr::V4(dst)) = packet::destination(p) else {
            continue;
        };
        let peer = routes.read().ok().and_then(|r| r.by_ip.get(&dst).copied());
        let Some(peer) = peer else {
            counters.no_route.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let tx = senders.entry(peer).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(send_to(peer, rx, control.clone(), counters.clone()));
            tx
        });
        match tx.try_send(p.to_vec()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                senders.remove(&peer);
            }
        }
    }
}

/// Sends one peer's packets: on our stream while the peer speaks it, else one EdgeVPN stream
/// per packet.
async fn send_to(
    peer: PeerId,
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut control: libp2p_stream::Control,
    counters: Arc<Counters>,
) {
    let mut edgevpn = false;
    let mut stream: Option<libp2p::Stream> = None;
    let count = |p: &[u8]| {
        counters.packets_out.fetch_add(1, Ordering::Relaxed);
        counters
            .bytes_out
            .fetch_add(p.len() as u64, Ordering::Relaxed);
    };
    while let Some(first) = rx.recv().await {
        if edgevpn {
            if send_edgevpn(&mut control, peer, &first).await {
                count(&first);
            } else {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        if stream.is_none() {
            match tokio::time::timeout(
                Duration::from_secs(15),
                control.open_stream(peer, KAIROS_VPN),
            )
            .await
            {
                Ok(Ok(s)) => stream = Some(s),
                Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => {
                    // A Go node: this packet and the next go the EdgeVPN way.
                    edgevpn = true;
                    if send_edgevpn(&mut control, peer, &first).await {
                        count(&first);
                    } else {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                _ => {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        let Some(s) = stream.as_mut() else { continue };
        // Write what is queued in one go, then flush.
        let mut batch = first;
        let mut n = 1u64;
        while batch.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(p) => {
                    batch.extend_from_slice(&p);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        match s.write_all(&batch).await {
            Ok(()) => {
                let _ = s.flush().await;
                counters.packets_out.fetch_add(n, Ordering::Relaxed);
                counters
                    .bytes_out
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                counters.dropped.fetch_add(n, Ordering::Relaxed);
                stream = None;
            }
        }
    }
}

/// One packet on its own `/edgevpn/0.1` stream, written and closed (G4), within EdgeVPN's
/// 15 s timeout.
async fn send_edgevpn(control: &mut libp2p_stream::Control, peer: PeerId, packet: &[u8]) -> bool {
    let sent = tokio::time::timeout(Duration::from_secs(15), async {
        let mut s = control.open_stream(peer, EDGEVPN).await.ok()?;
        s.write_all(packet).await.ok()?;
        s.close().await.ok()
    })
    .await;
    matches!(sent, Ok(Some(())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn routes_keep_live_owners_other_than_me() {
        let (a, b, me) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut m = BTreeMap::new();
        m.insert(Ipv4Addr::new(10, 1, 0, 1), me.to_string());
        m.insert(Ipv4Addr::new(10, 1, 0, 2), a.to_string());
        m.insert(Ipv4Addr::new(10, 1, 0, 3), b.to_string());
        m.insert(Ipv4Addr::new(10, 1, 0, 4), "not a peer id".into());
        let live = vec![me.to_string(), a.to_string(), "not a peer id".into()];
        let r = Routes::from_machines(&m, &live, &me);
        assert_eq!(r.by_ip.len(), 1);
        assert_eq!(r.by_ip[&Ipv4Addr::new(10, 1, 0, 2)], a);
        assert!(r.allowed.contains(&a) && !r.allowed.contains(&b) && !r.allowed.contains(&me));
    }
}
