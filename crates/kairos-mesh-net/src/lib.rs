//! The mesh's libp2p host (async: tokio and libp2p live here and in the VPN crate only).
//!
//! A [`Node`] speaks TCP + Noise + Yamux with an Ed25519 identity (the same PeerID
//! `kairos_mesh::identity` computes), joins the ledger topic its token derives, and gossips
//! the ledger: every local change at once, the whole block again every
//! [`Options::sync_interval`], each sealed with the current seal key. The topic and key
//! rotate with the token's interval; around a rotation both the old and the new are kept for
//! [`Options::overlap`] (EdgeVPN rebuilds its router at the boundary and loses messages, G5).
//!
//! Between our own peers (kairos-rs nodes, which also join a second, sync topic that EdgeVPN
//! never sees) the ledger travels as deltas: a change sends only its entries, and the
//! periodic sync compares digests with one peer over a stream, and sends whole blocks only
//! when the two differ ([`exchange`]). As soon as one member of the
//! network is not ours (an EdgeVPN peer) or `ownership` is off, every node falls back to
//! EdgeVPN's whole-block gossip.
//!
//! Gossipsub is set up as EdgeVPN's go-libp2p is: message id = source ‖ seqno (G1), strict
//! signing, flood publish, peer exchange, the token's `max_message_size`.
//!
//! Peers are found by [`mdns`] on the LAN (the token's service name) and dialled from
//! [`Options::peers`]; [`Node::control`] opens and accepts streams (the VPN's packet path).

pub mod exchange;
pub mod mdns;

use std::sync::{Arc, Mutex};

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
    /// Find peers on the LAN by mDNS under the token's service name.
    pub mdns: bool,
    /// Interfaces mDNS leaves alone (the VPN's own).
    pub skip_interfaces: Vec<String>,
    /// Most connections at once; more are refused (default 64).
    pub max_connections: u32,
    /// A connected peer that has not joined our topic by then is disconnected (a node of
    /// another network, or not a mesh node at all).
    pub stranger_grace: Duration,
    /// Static peers that are not connected are dialled again this often.
    pub redial: Duration,
    /// Deltas and digests between our own peers (see the crate's docs); off, the node
    /// behaves as an EdgeVPN peer does (whole blocks only, no sync topic).
    pub delta: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("a valid multiaddr")],
            peers: Vec::new(),
            sync_interval: Duration::from_secs(10),
            overlap: Duration::from_secs(30),
            ownership: Ownership::Enforce,
            mdns: true,
            skip_interfaces: Vec::new(),
            max_connections: 64,
            stranger_grace: Duration::from_secs(30),
            redial: Duration::from_secs(30),
            delta: true,
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    stream: libp2p_stream::Behaviour,
    limits: libp2p::connection_limits::Behaviour,
    kad: libp2p::kad::Behaviour<libp2p::kad::store::MemoryStore>,
}

/// go-libp2p-pubsub's default message id: the source's PeerID bytes followed by the sequence
/// number as 8 bytes big-endian (G1).
pub fn message_id(m: &gossipsub::Message) -> MessageId {
    let mut id = m.source.map(|p| p.to_bytes()).unwrap_or_default();
    id.extend_from_slice(&m.sequence_number.unwrap_or(0).to_be_bytes());
    MessageId::from(id)
}

pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

enum Command {
    Put(String, String, String, oneshot::Sender<()>),
    Get(String, String, oneshot::Sender<Option<String>>),
    Status(oneshot::Sender<Status>),
    Dial(PeerId, Vec<Multiaddr>),
    Connect(PeerId),
    Block(Vec<(std::net::Ipv4Addr, u8)>),
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
    /// `delta` (every member is ours) or `full` (EdgeVPN's whole-block gossip).
    pub sync: &'static str,
    /// Deltas sent, ledger comparisons opened, whole blocks merged from comparisons that
    /// differed.
    pub deltas: u64,
    pub comparisons: u64,
    pub exchanges: u64,
}

/// A handle to a running node.
#[derive(Clone)]
pub struct Node {
    tx: mpsc::Sender<Command>,
    pub peer_id: String,
    ledger: Arc<Mutex<Ledger>>,
    changed: Arc<tokio::sync::Notify>,
    control: libp2p_stream::Control,
    listen: Arc<Mutex<Vec<Multiaddr>>>,
}

impl Node {
    /// Starts a node for `token` with the identity of `seed`; returns once it listens.
    pub async fn start(token: Token, seed: [u8; 32], opts: Options) -> Result<Node, NetError> {
        let mut seed_bytes = seed;
        let key = identity::Keypair::ed25519_from_bytes(&mut seed_bytes)
            .map_err(|e| NetError::Host(e.to_string()))?;
        let max = token.max_message_size as usize;
        let max_conns = opts.max_connections.max(1);
        let dht_protocol = libp2p::StreamProtocol::try_from_owned(token.network_dht_protocol())
            .map_err(|e| NetError::Host(e.to_string()))?;
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
                    identify: identify::Behaviour::new(
                        identify::Config::new("/ipfs/id/1.0.0".into(), key.public())
                            .with_agent_version(format!("kairos-rs/{}", env!("CARGO_PKG_VERSION"))),
                    ),
                    stream: libp2p_stream::Behaviour::new(),
                    kad: {
                        // The token's own protocol: strangers cannot query it or get into
                        // its tables.
                        let mut cfg = libp2p::kad::Config::new(dht_protocol.clone());
                        // Members' addresses come from identify as they connect; a refresh
                        // every ten minutes is enough (at one a minute, the refresh queries
                        // were most of a ten-node mesh's idle traffic).
                        cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(600)));
                        let id = key.public().to_peer_id();
                        let mut k = libp2p::kad::Behaviour::with_config(
                            id,
                            libp2p::kad::store::MemoryStore::new(id),
                            cfg,
                        );
                        // Answer our peers' lookups even without a confirmed public address:
                        // the DHT here is the network's own (its peers only), for addresses.
                        k.set_mode(Some(libp2p::kad::Mode::Server));
                        k
                    },
                    limits: libp2p::connection_limits::Behaviour::new(
                        libp2p::connection_limits::ConnectionLimits::default()
                            .with_max_established(Some(max_conns))
                            .with_max_established_per_peer(Some(2))
                            .with_max_pending_incoming(Some(max_conns / 2 + 1)),
                    ),
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
        // Wait for the first address, so callers can hand it to other nodes — but not for
        // ever: a node whose network is not up yet (not even loopback) starts anyway, and
        // its addresses come as interfaces do.
        let listen = Arc::new(Mutex::new(Vec::new()));
        let first = async {
            loop {
                if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                    return address;
                }
            }
        };
        if let Ok(address) = tokio::time::timeout(Duration::from_secs(5), first).await {
            lock(&listen).push(address);
        }
        let (tx, rx) = mpsc::channel(64);
        let ledger = Arc::new(Mutex::new(Ledger::new(
            opts.ownership,
            &ledger::go_utc_string(unix_nanos() as i128),
        )));
        let control = swarm.behaviour().stream.new_control();
        let changed = Arc::new(tokio::sync::Notify::new());
        let shared = exchange::Shared {
            ledger: ledger.clone(),
            changed: changed.clone(),
            token: token.clone(),
            exchanges: Default::default(),
        };
        exchange::serve(control.clone(), shared.clone());
        if opts.mdns {
            let (found_tx, mut found_rx) = mpsc::channel(16);
            let ctx = mdns::Context {
                mdns: token.mdns.clone(),
                local: *swarm.local_peer_id(),
                listen: listen.clone(),
                skip_interfaces: opts.skip_interfaces.clone(),
            };
            tokio::spawn(async move {
                if let Err(e) = mdns::run(ctx, found_tx).await {
                    eprintln!("mesh: mDNS discovery is off: {e}");
                }
            });
            let dial = tx.clone();
            tokio::spawn(async move {
                while let Some((peer, addrs)) = found_rx.recv().await {
                    if dial.send(Command::Dial(peer, addrs)).await.is_err() {
                        return;
                    }
                }
            });
        }
        let task = Task {
            swarm,
            token,
            ledger: ledger.clone(),
            identity: kairos_mesh::identity::Identity::from_seed(&seed),
            topics: BTreeMap::new(),
            opts,
            listen: listen.clone(),
            blocked: Vec::new(),
            strangers: Default::default(),
            members: Default::default(),
            kad_bootstrapped: false,
            identified: Default::default(),
            next_redial: None,
            unsealable: 0,
            published: 0,
            ours: Default::default(),
            shared,
            control: control.clone(),
            deltas: 0,
            comparisons: 0,
        };
        tokio::spawn(task.run(rx));
        Ok(Node {
            tx,
            peer_id,
            ledger,
            changed,
            control,
            listen,
        })
    }

    /// Connects to a peer by its id, at the addresses the network knows for it (a no-op when
    /// connected).
    pub async fn connect(&self, peer: PeerId) -> Result<(), NetError> {
        self.tx
            .send(Command::Connect(peer))
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Returns when a peer's block has changed the ledger since the last call (at once if
    /// it did in between): the daemon acts on a new machine without waiting for its tick.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Reads the ledger as it is now.
    pub fn read<T>(&self, f: impl FnOnce(&Ledger) -> T) -> T {
        f(&lock(&self.ledger))
    }

    /// Opens and accepts streams of other protocols on this host's connections.
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// The addresses this node listens on now.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        lock(&self.listen).clone()
    }

    /// Never dial addresses in these networks (the VPN's own, so the mesh is not carried
    /// over itself).
    pub async fn block_networks(
        &self,
        nets: Vec<(std::net::Ipv4Addr, u8)>,
    ) -> Result<(), NetError> {
        self.tx
            .send(Command::Block(nets))
            .await
            .map_err(|_| NetError::Stopped)
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

/// Merges a peer's block; wakes [`Node::changed`] if it changed anything.
pub(crate) fn merge(ledger: &Mutex<Ledger>, changed: &tokio::sync::Notify, b: &ledger::Block) {
    if lock(ledger).receive(b, unix_nanos()).changed {
        changed.notify_one();
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Task {
    swarm: Swarm<Behaviour>,
    token: Token,
    ledger: Arc<Mutex<Ledger>>,
    identity: kairos_mesh::identity::Identity,
    /// Topic name → until when it is kept (None: the current one).
    topics: BTreeMap<String, Option<std::time::Instant>>,
    opts: Options,
    listen: Arc<Mutex<Vec<Multiaddr>>>,
    blocked: Vec<(std::net::Ipv4Addr, u8)>,
    /// Connected peers not (yet) seen on our topic, since when.
    strangers: std::collections::HashMap<PeerId, std::time::Instant>,
    members: std::collections::HashSet<PeerId>,
    kad_bootstrapped: bool,
    /// Listen addresses identify reported, until the peer joins our topic.
    identified: std::collections::HashMap<PeerId, Vec<Multiaddr>>,
    /// When the static peers are dialled again (None: now).
    next_redial: Option<std::time::Instant>,
    unsealable: u64,
    published: u64,
    /// Members on our sync topic too: kairos-rs peers, which take deltas.
    ours: std::collections::HashSet<PeerId>,
    shared: exchange::Shared,
    control: libp2p_stream::Control,
    deltas: u64,
    comparisons: u64,
}

/// The sync topic of ledger topic `topic` (our own peers only).
fn sync_topic(topic: &str) -> String {
    format!("{topic}/kairos-sync/1")
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
            // The sync topic first: a peer then knows we take deltas by the time we join the
            // ledger topic.
            let mut names = vec![current.clone()];
            if self.opts.delta {
                names.insert(0, sync_topic(&current));
            }
            for t in names {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&IdentTopic::new(t));
            }
            self.topics.insert(current, None);
        }
        let expired: Vec<String> = self
            .topics
            .iter()
            .filter(|(_, u)| u.is_some_and(|u| u <= std::time::Instant::now()))
            .map(|(t, _)| t.clone())
            .collect();
        for t in expired {
            for name in [t.clone(), sync_topic(&t)] {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .unsubscribe(&IdentTopic::new(name));
            }
            self.topics.remove(&t);
        }
    }

    /// EdgeVPN's whole-block gossip is needed: ownership off (deltas cannot be merged), or
    /// a member that is not ours.
    fn full_sync(&self) -> bool {
        !self.opts.delta
            || self.opts.ownership == Ownership::Off
            || self.members.is_empty()
            || self.members.iter().any(|p| !self.ours.contains(p))
    }

    fn publish_sync(&mut self, m: &ledger::SyncMessage) {
        let now = self.now_unix();
        let payload = ledger::sync_to_wire(m, &self.token.seal_key(now));
        let topic = IdentTopic::new(sync_topic(&self.token.topic(now)));
        let _ = self.swarm.behaviour_mut().gossipsub.publish(topic, payload);
    }

    /// A local change: only the changed entry to our own peers, else the whole block.
    fn publish_change(&mut self, bucket: &str, key: &str) {
        if self.full_sync() {
            return self.publish();
        }
        let entry = lock(&self.ledger)
            .last()
            .storage
            .get(bucket)
            .and_then(|b| b.get(key))
            .cloned();
        let Some(entry) = entry else {
            return self.publish();
        };
        let mut storage = ledger::Storage::new();
        storage
            .entry(bucket.to_string())
            .or_default()
            .insert(key.to_string(), entry);
        let delta = ledger::Block {
            storage,
            ..Default::default()
        };
        self.publish_sync(&ledger::SyncMessage::Delta(delta));
        self.deltas += 1;
    }

    /// Every sync interval: compare ledgers with one of our peers (a random one), else
    /// gossip the whole block.
    fn sync(&mut self) {
        if self.full_sync() {
            return self.publish();
        }
        let ours: Vec<PeerId> = self.members.iter().copied().collect();
        if let Some(peer) = ours.get(rand::random_range(0..ours.len().max(1))) {
            self.exchange_with(*peer);
        }
    }

    /// Compares ledgers with `peer`, and exchanges whole blocks if they differ.
    fn exchange_with(&mut self, peer: PeerId) {
        if self.swarm.is_connected(&peer) {
            self.comparisons += 1;
            tokio::spawn(exchange::with(
                self.control.clone(),
                peer,
                self.shared.clone(),
            ));
        }
    }

    /// A message on the sync topic: a delta to merge.
    fn receive_sync(&mut self, data: &[u8]) {
        let keys = self.token.open_keys(self.now_unix());
        let m = keys
            .iter()
            .find_map(|k| ledger::sync_from_wire(data, k, self.token.max_message_size).ok());
        match m {
            Some(ledger::SyncMessage::Delta(b)) if self.opts.ownership == Ownership::Enforce => {
                merge(&self.ledger, &self.shared.changed, &b);
            }
            Some(_) => {}
            None => self.unsealable += 1,
        }
    }

    fn publish(&mut self) {
        let now = self.now_unix();
        let payload = ledger::to_wire(lock(&self.ledger).last(), &self.token.seal_key(now));
        let topic = IdentTopic::new(self.token.topic(now));
        // Nobody to send to yet is not an error: the next sync sends it again.
        let _ = self.swarm.behaviour_mut().gossipsub.publish(topic, payload);
        self.published += 1;
    }

    fn receive(&mut self, data: &[u8]) {
        let keys = self.token.open_keys(self.now_unix());
        let block = keys
            .iter()
            .find_map(|k| ledger::from_wire(data, k, self.token.max_message_size).ok());
        match block {
            Some(b) => merge(&self.ledger, &self.shared.changed, &b),
            None => self.unsealable += 1,
        }
    }

    /// Tells the network's DHT where a member listens (a node behind NAT connected to one of
    /// us then learns where the others are); the first one bootstraps it.
    fn learn_addresses(&mut self, peer: PeerId) {
        let Some(addrs) = self.identified.remove(&peer) else {
            return;
        };
        let kad = &mut self.swarm.behaviour_mut().kad;
        for a in addrs {
            kad.add_address(&peer, a);
        }
        if !self.kad_bootstrapped {
            self.kad_bootstrapped = kad.bootstrap().is_ok();
        }
    }

    /// Not loopback and not in a blocked network (the VPN's own).
    fn dialable(&self, a: &Multiaddr) -> bool {
        !a.iter().any(|p| match p {
            libp2p::multiaddr::Protocol::Ip4(ip) => {
                ip.is_loopback()
                    || self
                        .blocked
                        .iter()
                        .any(|n| kairos_sys::net::in_network(ip, *n))
            }
            _ => false,
        })
    }

    /// Dials the static peers that are not connected: at start, then every
    /// [`Options::redial`] (a peer that was down when we started, or went away, is found
    /// again).
    fn redial_peers(&mut self) {
        if self
            .next_redial
            .is_some_and(|t| t > std::time::Instant::now())
        {
            return;
        }
        self.next_redial = Some(std::time::Instant::now() + self.opts.redial);
        for a in self.opts.peers.clone() {
            let peer = a.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                _ => None,
            });
            match peer {
                Some(id) if self.swarm.is_connected(&id) => {}
                _ => {
                    let _ = self.swarm.dial(a);
                }
            }
        }
    }

    /// Disconnects peers that have not joined our topic within the grace time.
    fn drop_strangers(&mut self) {
        let grace = self.opts.stranger_grace;
        let late: Vec<PeerId> = self
            .strangers
            .iter()
            .filter(|(_, since)| since.elapsed() > grace)
            .map(|(p, _)| *p)
            .collect();
        for p in late {
            self.strangers.remove(&p);
            let _ = self.swarm.disconnect_peer_id(p);
        }
    }

    /// Dials a found peer unless already connected; addresses in blocked networks are left out.
    fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self.swarm.is_connected(&peer) {
            return;
        }
        let addrs: Vec<Multiaddr> = addrs.into_iter().filter(|a| self.dialable(a)).collect();
        if addrs.is_empty() {
            return;
        }
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
            .build();
        let _ = self.swarm.dial(opts);
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        self.rotate();
        self.redial_peers();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut sync = tokio::time::interval(self.opts.sync_interval);
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => match ev {
                    SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. })) => {
                        if self.topics.contains_key(message.topic.as_str()) {
                            self.receive(&message.data);
                        } else {
                            self.receive_sync(&message.data);
                        }
                    }
                    SwarmEvent::NewListenAddr { address, .. } => {
                        let mut l = lock(&self.listen);
                        if !l.contains(&address) {
                            l.push(address);
                        }
                    }
                    SwarmEvent::ExpiredListenAddr { address, .. } => {
                        lock(&self.listen).retain(|a| a != &address);
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                        // Where a peer listens (at most 16 addresses), told to the DHT once
                        // the peer has shown it is one of us.
                        let addrs: Vec<Multiaddr> = info
                            .listen_addrs
                            .into_iter()
                            .filter(|a| self.dialable(a))
                            .take(16)
                            .collect();
                        self.identified.insert(peer_id, addrs);
                        if self.members.contains(&peer_id) {
                            self.learn_addresses(peer_id);
                        }
                    }
                    SwarmEvent::ConnectionEstablished { peer_id, .. } if !self.members.contains(&peer_id) => {
                        self.strangers.entry(peer_id).or_insert_with(std::time::Instant::now);
                    }
                    SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                        self.strangers.remove(&peer_id);
                        self.members.remove(&peer_id);
                        self.identified.remove(&peer_id);
                        self.ours.remove(&peer_id);
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic }))
                        if self.topics.contains_key(topic.as_str()) =>
                    {
                        self.strangers.remove(&peer_id);
                        // A new member gets our ledger now, not at the next sync.
                        if self.members.insert(peer_id) {
                            if self.ours.contains(&peer_id) {
                                self.exchange_with(peer_id);
                            } else {
                                self.publish();
                            }
                            self.learn_addresses(peer_id);
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic }))
                        if self.topics.keys().any(|t| sync_topic(t) == topic.as_str()) =>
                    {
                        // One of ours; if it was already a member, bring it in step now.
                        let new = self.ours.insert(peer_id);
                        if new && self.members.contains(&peer_id) {
                            self.exchange_with(peer_id);
                        }
                    }
                    _ => {}
                },
                _ = tick.tick() => {
                    self.rotate();
                    self.drop_strangers();
                    self.redial_peers();
                }
                _ = sync.tick() => self.sync(),
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Command::Put(b, k, v, done)) => {
                        let signer = Some(&self.identity);
                        let changed = lock(&self.ledger).put(&b, &k, &v, signer, unix_nanos()).is_some();
                        if changed {
                            self.publish_change(&b, &k);
                        }
                        let _ = done.send(());
                    }
                    Some(Command::Get(b, k, reply)) => {
                        let _ = reply.send(lock(&self.ledger).get(&b, &k).map(|e| e.value.clone()));
                    }
                    Some(Command::Dial(peer, addrs)) => self.dial(peer, addrs),
                    Some(Command::Connect(peer)) => {
                        if !self.swarm.is_connected(&peer) {
                            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                                .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
                                .build();
                            let _ = self.swarm.dial(opts);
                        }
                    }
                    Some(Command::Block(nets)) => self.blocked = nets,
                    Some(Command::Status(reply)) => {
                        let peers: Vec<String> = self.swarm.connected_peers().map(PeerId::to_string).collect();
                        let _ = reply.send(Status {
                            peer_id: self.swarm.local_peer_id().to_string(),
                            listen: lock(&self.listen).iter().map(|a| a.to_string()).collect(),
                            peers,
                            topic: self.token.topic(self.now_unix()),
                            unsealable: self.unsealable,
                            published: self.published,
                            ledger_index: lock(&self.ledger).last().index,
                            sync: if self.full_sync() { "full" } else { "delta" },
                            deltas: self.deltas,
                            comparisons: self.comparisons,
                            exchanges: self.shared.exchanges.load(std::sync::atomic::Ordering::Relaxed),
                        });
                    }
                },
            }
        }
    }
}
