//! The mesh's libp2p host (async: tokio and libp2p live here and in the VPN crate only).
//!
//! A [`Node`] speaks TCP + Noise + Yamux with an Ed25519 identity (the same PeerID
//! `kairos_mesh::identity` computes), joins the ledger topic its token derives, and gossips
//! the ledger: every local change at once, the whole block again every
//! [`Options::sync_interval`], each sealed with the current seal key. The topic and key
//! rotate with the token's interval; around a rotation both the old and the new are kept for
//! [`Options::overlap`] (EdgeVPN rebuilds its router at the boundary and loses messages, G5).
//!
//! Gossipsub is set up as EdgeVPN's go-libp2p is: message id = source ‖ seqno (G1), strict
//! signing, flood publish, peer exchange, the token's `max_message_size`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kairos_mesh::Token;
use kairos_mesh::ledger;
use kairos_mesh::state::{Ledger, Ownership};
use libp2p::gossipsub::{self, IdentTopic, MessageId};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, identity, noise, tcp, yamux};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("mesh host: {0}")]
    Host(String),
    #[error("listening on {addr}: {why}")]
    Listen { addr: String, why: String },
    #[error("the mesh node has stopped")]
    Stopped,
}

/// How a node runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen (`/ip4/0.0.0.0/tcp/0` picks a port).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (`/ip4/…/tcp/…/p2p/<id>`).
    pub peers: Vec<Multiaddr>,
    /// The whole ledger is sent again this often (EdgeVPN: 10 s).
    pub sync_interval: Duration,
    /// How long the previous topic and seal key stay in use after a rotation.
    pub overlap: Duration,
    pub ownership: Ownership,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("a valid multiaddr")],
            peers: Vec::new(),
            sync_interval: Duration::from_secs(10),
            overlap: Duration::from_secs(30),
            ownership: Ownership::Enforce,
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
}

/// go-libp2p-pubsub's default message id: the source's PeerID bytes followed by the sequence
/// number as 8 bytes big-endian (G1).
pub fn message_id(m: &gossipsub::Message) -> MessageId {
    let mut id = m.source.map(|p| p.to_bytes()).unwrap_or_default();
    id.extend_from_slice(&m.sequence_number.unwrap_or(0).to_be_bytes());
    MessageId::from(id)
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

enum Command {
    Put(String, String, String, oneshot::Sender<()>),
    Get(String, String, oneshot::Sender<Option<String>>),
    Status(oneshot::Sender<Status>),
}

/// What a node sees.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub peer_id: String,
    pub listen: Vec<String>,
    pub peers: Vec<String>,
    pub topic: String,
    /// Blocks received that did not open with the network's key (outsiders, stale rotations).
    pub unsealable: u64,
    /// Ledger blocks this node has sent (or tried to: nobody may listen yet).
    pub published: u64,
    pub ledger_index: u64,
}

/// A handle to a running node.
#[derive(Clone)]
pub struct Node {
    tx: mpsc::Sender<Command>,
    pub peer_id: String,
}

impl Node {
    /// Starts a node for `token` with the identity of `seed`; returns once it listens.
    pub async fn start(token: Token, seed: [u8; 32], opts: Options) -> Result<Node, NetError> {
        let mut seed_bytes = seed;
        let key = identity::Keypair::ed25519_from_bytes(&mut seed_bytes)
            .map_err(|e| NetError::Host(e.to_string()))?;
        let max = token.max_message_size as usize;
        let gs_config = gossipsub::ConfigBuilder::default()
            .message_id_fn(message_id)
            .validation_mode(gossipsub::ValidationMode::Strict)
            .flood_publish(true)
            .do_px()
            .max_transmit_size(max + (64 << 10))
            .heartbeat_interval(Duration::from_secs(1))
            .build()
            .map_err(|e| NetError::Host(e.to_string()))?;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| NetError::Host(e.to_string()))?
            .with_behaviour(|key| {
                Ok(Behaviour {
                    gossipsub: gossipsub::Behaviour::new(
                        gossipsub::MessageAuthenticity::Signed(key.clone()),
                        gs_config,
                    )?,
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/ipfs/id/1.0.0".into(),
                        key.public(),
                    )),
                })
            })
            .map_err(|e| NetError::Host(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        let peer_id = swarm.local_peer_id().to_string();
        for a in &opts.listen {
            swarm.listen_on(a.clone()).map_err(|e| NetError::Listen {
                addr: a.to_string(),
                why: e.to_string(),
            })?;
        }
        // Wait for the first address, so callers can hand it to other nodes.
        let mut listen = Vec::new();
        while listen.is_empty() {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                listen.push(address.to_string());
            }
        }
        for p in &opts.peers {
            let _ = swarm.dial(p.clone());
        }
        let (tx, rx) = mpsc::channel(64);
        let task = Task {
            swarm,
            token,
            ledger: Ledger::new(opts.ownership, &ledger::go_utc_string(unix_nanos() as i128)),
            identity: kairos_mesh::identity::Identity::from_seed(&seed),
            topics: BTreeMap::new(),
            opts,
            listen,
            unsealable: 0,
            published: 0,
        };
        tokio::spawn(task.run(rx));
        Ok(Node { tx, peer_id })
    }

    /// Writes a value (JSON text) into the ledger and gossips it.
    pub async fn put(&self, bucket: &str, key: &str, value_json: &str) -> Result<(), NetError> {
        let (t, r) = oneshot::channel();
        self.tx
            .send(Command::Put(
                bucket.into(),
                key.into(),
                value_json.into(),
                t,
            ))
            .await
            .map_err(|_| NetError::Stopped)?;
        r.await.map_err(|_| NetError::Stopped)
    }

    /// A live value (JSON text) of the ledger.
    pub async fn get(&self, bucket: &str, key: &str) -> Result<Option<String>, NetError> {
        let (t, r) = oneshot::channel();
        self.tx
            .send(Command::Get(bucket.into(), key.into(), t))
            .await
            .map_err(|_| NetError::Stopped)?;
        r.await.map_err(|_| NetError::Stopped)
    }

    pub async fn status(&self) -> Result<Status, NetError> {
        let (t, r) = oneshot::channel();
        self.tx
            .send(Command::Status(t))
            .await
            .map_err(|_| NetError::Stopped)?;
        r.await.map_err(|_| NetError::Stopped)
    }
}

struct Task {
    swarm: Swarm<Behaviour>,
    token: Token,
    ledger: Ledger,
    identity: kairos_mesh::identity::Identity,
    /// Topic name → until when it is kept (None: the current one).
    topics: BTreeMap<String, Option<std::time::Instant>>,
    opts: Options,
    listen: Vec<String>,
    unsealable: u64,
    published: u64,
}

impl Task {
    fn now_unix(&self) -> u64 {
        unix_nanos() / 1_000_000_000
    }

    /// Joins the current topic; keeps the previous one for the overlap, then leaves it.
    fn rotate(&mut self) {
        let now = self.now_unix();
        let current = self.token.topic(now);
        if !self.topics.contains_key(&current) {
            for until in self.topics.values_mut() {
                if until.is_none() {
                    *until = Some(std::time::Instant::now() + self.opts.overlap);
                }
            }
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&IdentTopic::new(current.clone()));
            self.topics.insert(current, None);
        }
        let expired: Vec<String> = self
            .topics
            .iter()
            .filter(|(_, u)| u.is_some_and(|u| u <= std::time::Instant::now()))
            .map(|(t, _)| t.clone())
            .collect();
        for t in expired {
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .unsubscribe(&IdentTopic::new(t.clone()));
            self.topics.remove(&t);
        }
    }

    fn publish(&mut self) {
        let now = self.now_unix();
        let payload = ledger::to_wire(self.ledger.last(), &self.token.seal_key(now));
        let topic = IdentTopic::new(self.token.topic(now));
        // Nobody to send to yet is not an error: the next sync sends it again.
        let _ = self.swarm.behaviour_mut().gossipsub.publish(topic, payload);
        self.published += 1;
    }

    fn receive(&mut self, data: &[u8]) {
        let now = self.now_unix();
        // The current key, then the previous interval's (a sender on the other side of a
        // rotation).
        let interval = self.token.otp.crypto.interval.max(1);
        let keys = [now, now.saturating_sub(interval)];
        let block = keys.iter().find_map(|t| {
            ledger::from_wire(data, &self.token.seal_key(*t), self.token.max_message_size).ok()
        });
        match block {
            Some(b) => {
                self.ledger.receive(&b, unix_nanos());
            }
            None => self.unsealable += 1,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        self.rotate();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut sync = tokio::time::interval(self.opts.sync_interval);
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => {
                    if let SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. })) = ev {
                        self.receive(&message.data);
                    }
                }
                _ = tick.tick() => self.rotate(),
                _ = sync.tick() => self.publish(),
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Command::Put(b, k, v, done)) => {
                        let signer = Some(&self.identity);
                        if self.ledger.put(&b, &k, &v, signer, unix_nanos()).is_some() {
                            self.publish();
                        }
                        let _ = done.send(());
                    }
                    Some(Command::Get(b, k, reply)) => {
                        let _ = reply.send(self.ledger.get(&b, &k).map(|e| e.value.clone()));
                    }
                    Some(Command::Status(reply)) => {
                        let peers: Vec<String> = self.swarm.connected_peers().map(PeerId::to_string).collect();
                        let _ = reply.send(Status {
                            peer_id: self.swarm.local_peer_id().to_string(),
                            listen: self.listen.clone(),
                            peers,
                            topic: self.token.topic(self.now_unix()),
                            unsealable: self.unsealable,
                            published: self.published,
                            ledger_index: self.ledger.last().index,
                        });
                    }
                },
            }
        }
    }
}
