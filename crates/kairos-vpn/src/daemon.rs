//! The `p2p run` daemon: the mesh host, the VPN, addressing, heartbeats, DNS and the status
//! socket, on one tokio runtime.
//!
//! Each second the daemon re-reads the ledger: routes (live `machines` owners), the DNS
//! zone, and — until it has an address — the DHCP rule. It writes its heartbeat into
//! `healthcheck` every `HEALTHCHECKINTERVAL` and its `machines` entry every
//! `EDGEVPNLEDGERINTERVAL` (only a change makes a new block).
//!
//! The identity seed and the DHCP lease live under the state and lease directories, so a
//! restarted node comes back with the same PeerID and address — its old `machines` entry is
//! still its own, where a new PeerID would have to wait for the old one to expire.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kairos_mesh::state::{self, Ownership};
use kairos_mesh_net::{Node, Options};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::dns::{self, Zone};
use crate::settings::{Addressing, Settings};
use crate::tun::Tun;
use crate::vpn::{Routes, Vpn};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("mesh identity {path}: {why}")]
    Identity { path: PathBuf, why: std::io::Error },
    #[error(transparent)]
    Net(#[from] kairos_mesh_net::NetError),
    #[error("VPN device: {0}")]
    Device(#[from] kairos_sys::net::NetError),
    #[error("status socket {path}: {why}")]
    Socket { path: PathBuf, why: std::io::Error },
    #[error(
        "DNS on {addr}: {why} (another DNS server, such as systemd-resolved, may listen there: stop it, or serve elsewhere with p2p.vpn.env.DNSADDRESS)"
    )]
    Dns { addr: String, why: std::io::Error },
}

/// Where the daemon keeps things (all under the agent's `--root`).
#[derive(Debug, Clone)]
pub struct Paths {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub resolv_conf: PathBuf,
}

/// The cluster's part of the daemon (roles over the mesh), supplied by the agent: the
/// daemon knows the ledger, not Kubernetes. Its ticks run on a blocking thread, one at a
/// time, every [`COORDINATOR_TICK`] and soon after its bucket changes.
pub trait Coordinator: Send + 'static {
    /// The ledger bucket it reads and writes (`p2p.network_id`).
    fn bucket(&self) -> String;
    /// One tick; may take seconds (it writes files and starts services).
    fn tick(&mut self, input: TickInput) -> TickOutput;
}

/// What a coordinator tick sees.
#[derive(Debug, Clone)]
pub struct TickInput {
    /// The bucket's live entries: key → value (JSON text).
    pub entries: std::collections::BTreeMap<String, String>,
    /// Nodes whose heartbeat is recent (`healthcheck`).
    pub active_nodes: usize,
    /// This node's VPN address, once it has one.
    pub vpn_ip: Option<Ipv4Addr>,
    /// The VPN addresses whose machines are alive (their owner's heartbeat is younger than
    /// `HEALTHCHECKMAXINTERVAL`).
    pub live_addresses: Vec<Ipv4Addr>,
    pub now: i64,
}

/// What a coordinator tick does: ledger writes (key, value JSON) into its bucket, and its
/// part of the status document (`cluster`).
#[derive(Debug, Clone, Default)]
pub struct TickOutput {
    pub writes: Vec<(String, String)>,
    pub status: serde_json::Value,
}

/// The coordinator's period (provider-kairos' loop: 10 s).
pub const COORDINATOR_TICK: Duration = Duration::from_secs(10);
/// The shortest gap between two coordinator ticks when its bucket keeps changing.
const COORDINATOR_GAP: Duration = Duration::from_secs(2);

/// A request on the status socket: one JSON line (none at all means `status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// The status document.
    Status,
    /// A bucket's live entries, key → value (JSON text).
    Bucket { bucket: String },
    /// Writes `value` (JSON text) at `bucket`/`key` (as EdgeVPN's API `PUT`).
    Put {
        bucket: String,
        key: String,
        value: String,
    },
}

/// Bounds on what the socket accepts.
const MAX_REQUEST: usize = 1 << 20;
const MAX_NAME: usize = 256;

impl Request {
    /// Checks names and values before they reach the ledger.
    fn check(&self) -> Result<(), String> {
        let name = |what: &str, n: &str| {
            if n.is_empty() || n.len() > MAX_NAME || !n.chars().all(|c| c.is_ascii_graphic()) {
                Err(format!(
                    "{what} {n:?}: 1 to {MAX_NAME} printable characters, no spaces"
                ))
            } else {
                Ok(())
            }
        };
        match self {
            Request::Status => Ok(()),
            Request::Bucket { bucket } => name("bucket", bucket),
            Request::Put { bucket, key, value } => {
                name("bucket", bucket)?;
                name("key", key)?;
                serde_json::from_str::<serde_json::Value>(value)
                    .map(|_| ())
                    .map_err(|e| format!("value of {key}: not JSON ({e})"))
            }
        }
    }
}

type Pending = (Request, tokio::sync::oneshot::Sender<serde_json::Value>);

fn unix_now() -> i64 {
    kairos_sys::time::now_unix()
}

/// The identity seed, made once (0600).
pub fn identity_seed(state_dir: &Path) -> Result<[u8; 32], DaemonError> {
    let path = state_dir.join("identity");
    let err = |why| DaemonError::Identity {
        path: path.clone(),
        why,
    };
    match std::fs::read(&path) {
        Ok(b) if b.len() == 32 => {
            let mut s = [0u8; 32];
            s.copy_from_slice(&b);
            Ok(s)
        }
        Ok(_) => Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a 32-byte seed; remove it to make a new identity (the node gets a new PeerID)",
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed = kairos_mesh::identity::Identity::generate().seed();
            kairos_sys::fs::write_private(&path, &seed).map_err(err)?;
            Ok(seed)
        }
        Err(e) => Err(err(e)),
    }
}

/// EdgeVPN's `machines` value for this node (Go field order).
pub fn machine_json(peer_id: &str, hostname: &str, ip: Ipv4Addr) -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    // A Go struct: fields in declaration order, not sorted as a map's keys would be.
    let fields = [
        ("PeerID", peer_id.to_string()),
        ("Hostname", hostname.to_string()),
        ("OS", "linux".to_string()),
        ("Arch", arch.to_string()),
        ("Address", ip.to_string()),
        (
            "Version",
            format!("kairos-rs {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    let mut out = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        kairos_mesh::ledger::go_json_string(k, &mut out);
        out.push(':');
        kairos_mesh::ledger::go_json_string(v, &mut out);
    }
    out.push('}');
    out
}

/// What the DHCP rule says this node should do now.
#[derive(Debug, PartialEq, Eq)]
pub enum DhcpStep {
    /// Claim leadership (write `dhcp/leader = me`).
    Claim,
    /// I am the recorded leader: take this address.
    Take(Ipv4Addr),
    /// Wait, with the reason for `p2p status`.
    Wait(String),
}

/// EdgeVPN's DHCP-over-ledger rule for one node at one moment.
pub fn dhcp_step(
    me: &str,
    alive: &[String],
    machines: &std::collections::BTreeMap<Ipv4Addr, String>,
    recorded_leader: Option<&str>,
    first: Ipv4Addr,
) -> DhcpStep {
    if alive.len() < 2 {
        return DhcpStep::Wait(format!(
            "waiting for another node: DHCP needs 2 alive nodes, {} seen",
            alive.len()
        ));
    }
    match state::dhcp_leader(alive, machines) {
        Some(l) if l == me => {
            if recorded_leader == Some(me) {
                let used: Vec<Ipv4Addr> = machines.keys().copied().collect();
                match state::next_ip(first, &used) {
                    Some(ip) => DhcpStep::Take(ip),
                    None => DhcpStep::Wait("the address range is full".into()),
                }
            } else {
                DhcpStep::Claim
            }
        }
        Some(l) => DhcpStep::Wait(format!("waiting for {l} to take its address first")),
        None => DhcpStep::Wait("waiting: every alive node has an address".into()),
    }
}

struct Addr {
    ip: Option<(Ipv4Addr, u8)>,
    how: String,
    dhcp: String,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(
    settings: Settings,
    hostname: String,
    paths: Paths,
    coordinator: Option<Box<dyn Coordinator>>,
) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(main(settings, hostname, paths, coordinator))
}

async fn main(
    s: Settings,
    hostname: String,
    paths: Paths,
    coordinator: Option<Box<dyn Coordinator>>,
) -> Result<(), DaemonError> {
    let seed = identity_seed(&paths.state_dir)?;
    let skip = s.vpn.iter().map(|v| v.interface.clone()).collect();
    let opts = Options {
        listen: s.listen.iter().filter_map(|a| a.parse().ok()).collect(),
        peers: s.peers.iter().filter_map(|a| a.parse().ok()).collect(),
        sync_interval: s.intervals.sync,
        overlap: Duration::from_secs(30),
        ownership: Ownership::Enforce,
        mdns: s.mdns,
        skip_interfaces: skip,
        max_connections: s.max_connections,
        ..Options::default()
    };
    let node = Node::start(s.token.clone(), seed, opts).await?;
    let me = node.peer_id.clone();
    let me_id: libp2p::PeerId = me
        .parse()
        .map_err(|_| kairos_mesh_net::NetError::Host("the host's PeerID does not parse".into()))?;

    let mut addr = Addr {
        ip: None,
        how: String::new(),
        dhcp: String::new(),
    };
    let mut vpn: Option<(Vpn, Tun)> = None;
    let mut lease: Option<PathBuf> = None;
    let mut first = Ipv4Addr::new(10, 1, 0, 1);
    let mut prefix = 24;
    if let Some(v) = &s.vpn {
        // Distribution kernels build tun as a module.
        if !Path::new("/dev/net/tun").exists() {
            let _ = kairos_sys::host::modprobe("tun", &[]);
        }
        let tun = Tun::open(&v.interface)?;
        vpn = Some((Vpn::start(tun.clone(), node.control()), tun));
        match &v.addressing {
            Addressing::Static(ip, p) => {
                kairos_sys::net::configure(&v.interface, *ip, *p, v.mtu)?;
                node.block_networks(vec![(*ip, *p)]).await?;
                let a = &mut addr;
                a.ip = Some((*ip, *p));
                a.how = "static".into();
            }
            Addressing::Dhcp {
                first: f,
                prefix: p,
                lease_dir,
            } => {
                (first, prefix) = (*f, *p);
                let path = lease_dir.join(s.token.dhcp_lease());
                let leased = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.trim().parse::<Ipv4Addr>().ok());
                if let Some(ip) = leased {
                    kairos_sys::net::configure(&v.interface, ip, *p, v.mtu)?;
                    node.block_networks(vec![(ip, *p)]).await?;
                    let a = &mut addr;
                    a.ip = Some((ip, *p));
                    a.how = format!("dhcp (lease {})", path.display());
                }
                lease = Some(path);
            }
        }
    }

    let zone = Arc::new(RwLock::new(Zone::new(
        &s.dns.as_ref().map(|d| d.domain.clone()).unwrap_or_default(),
    )));
    if let Some(d) = &s.dns {
        let upstream = paths.state_dir.join("resolv.conf.upstream");
        let forward = match &d.forward {
            Some(f) => f.clone(),
            None => {
                // The servers the node had before we pointed it at ourselves.
                let rc = std::fs::read_to_string(&upstream)
                    .or_else(|_| std::fs::read_to_string(&paths.resolv_conf))
                    .unwrap_or_default();
                let mut f = dns::nameservers(&rc, &d.listen);
                if f.is_empty() {
                    f = crate::settings::DEFAULT_FORWARDERS
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .collect();
                }
                f
            }
        };
        let sock = tokio::net::UdpSocket::bind(d.listen)
            .await
            .map_err(|why| DaemonError::Dns {
                addr: d.listen.to_string(),
                why,
            })?;
        drop(sock);
        if d.listen.ip().is_loopback() && d.listen.port() == 53 {
            use_mesh_dns(&paths.resolv_conf, &upstream);
        }
        let (listen, zone) = (d.listen, zone.clone());
        tokio::spawn(async move {
            if let Err(e) = dns::serve(listen, zone, forward).await {
                eprintln!("p2p: DNS on {listen} stopped: {e}");
            }
        });
    }

    let started = Instant::now();
    let status = Arc::new(Mutex::new(json!({})));
    let (requests, mut pending) = tokio::sync::mpsc::channel::<Pending>(16);
    serve_status(&paths.socket, status.clone(), requests)?;
    let coord_bucket = coordinator.as_ref().map(|c| c.bucket());
    let coordinator = coordinator.map(|c| Arc::new(Mutex::new(c)));
    let mut coord_job: Option<tokio::task::JoinHandle<TickOutput>> = None;
    let mut next_coord = Instant::now();
    let mut last_coord = Instant::now();
    let mut coord_seen: Option<std::collections::BTreeMap<String, String>> = None;
    let mut cluster_status = serde_json::Value::Null;

    let ttl = kairos_mesh::ledger::OWNERSHIP_TTL;
    let maxtime = s.intervals.maxtime.as_secs() as i64;
    let mut next_heartbeat = Instant::now();
    let mut next_announce = Instant::now();
    let mut next_dhcp = Instant::now();
    let mut next_connect = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Runtime)?;
    eprintln!("p2p: running as {me}");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
            // A peer's change (a new machine, a DHCP claim): act now, not at the next tick;
            // changes arriving together are taken together.
            _ = node.changed() => tokio::time::sleep(Duration::from_millis(50)).await,
            Some((req, reply)) = pending.recv() => {
                let answer = match req.check() {
                    Err(e) => json!({"error": e}),
                    Ok(()) => match &req {
                        Request::Status => lock(&status).clone(),
                        Request::Bucket { bucket } => json!({"entries": bucket_entries(&node, bucket)}),
                        Request::Put { bucket, key, value } => match node.put(bucket, key, value).await {
                            Ok(()) => json!({"ok": true}),
                            Err(e) => json!({"error": e.to_string()}),
                        },
                    },
                };
                let _ = reply.send(answer);
                if matches!(req, Request::Put { .. }) {
                    // The coordinator looks at once.
                    next_coord = Instant::now();
                }
                continue;
            }
        }
        let now = unix_now();
        if Instant::now() >= next_heartbeat {
            let stamp = serde_json::Value::String(kairos_sys::time::rfc3339(now));
            let _ = node
                .put("healthcheck", &me, &kairos_mesh::ledger::go_json(&stamp))
                .await;
            next_heartbeat = Instant::now() + s.intervals.healthcheck;
        }
        let (machines, live, alive, leader, hosts, records) = node.read(|l| {
            let entries = l.machine_entries();
            let live = l.alive(now, ttl);
            let alive = l.alive(now, maxtime);
            let leader = l
                .get("dhcp", "leader")
                .and_then(|e| serde_json::from_str::<String>(&e.value).ok());
            let hosts: std::collections::BTreeMap<String, Ipv4Addr> = entries
                .iter()
                .filter(|(_, m)| live.contains(&m.peer) && !m.hostname.is_empty())
                .map(|(ip, m)| (m.hostname.to_ascii_lowercase(), *ip))
                .collect();
            let machines: std::collections::BTreeMap<Ipv4Addr, String> =
                entries.into_iter().map(|(ip, m)| (ip, m.peer)).collect();
            let records: Vec<dns::Entry> = l
                .bucket("dns")
                .into_iter()
                .filter_map(|(k, e)| Some((k.to_string(), serde_json::from_str(&e.value).ok()?)))
                .collect();
            (machines, live, alive, leader, hosts, records)
        });
        if let Some(mut r) = vpn.as_ref().and_then(|(v, _)| v.routes.write().ok()) {
            *r = Routes::from_machines(&machines, &live, &me_id);
        }
        // A full mesh: connect to every live machine's owner (its addresses come from the
        // network's DHT when mDNS cannot see it, e.g. behind NAT).
        if Instant::now() >= next_connect {
            next_connect = Instant::now() + Duration::from_secs(5);
            for p in machines.values().filter(|p| **p != me && live.contains(p)) {
                if let Ok(id) = p.parse() {
                    let _ = node.connect(id).await;
                }
            }
        }
        if let Ok(mut z) = zone.write() {
            z.hosts = hosts;
            z.set_records(records);
        }
        // Addressing.
        let have_ip = addr.ip;
        if let (Some(v), None, Some(path), true) =
            (&s.vpn, have_ip, &lease, Instant::now() >= next_dhcp)
        {
            // EdgeVPN looks every 5 s; here every second and at every change of the ledger
            // (a LAN of three joins in seconds, not 30) — but a claim is left a second to be
            // seen by the others before the address is taken.
            match dhcp_step(&me, &alive, &machines, leader.as_deref(), first) {
                DhcpStep::Claim => {
                    let _ = node
                        .put("dhcp", "leader", &kairos_mesh::ledger::go_json(&json!(me)))
                        .await;
                    addr.dhcp = "claiming the DHCP leadership".into();
                    next_dhcp = Instant::now() + Duration::from_secs(1);
                }
                DhcpStep::Take(ip) => {
                    kairos_sys::net::configure(&v.interface, ip, prefix, v.mtu)?;
                    node.block_networks(vec![(ip, prefix)]).await?;
                    if let Err(e) = kairos_sys::fs::write_private(path, ip.to_string().as_bytes()) {
                        eprintln!("p2p: could not keep the lease in {}: {e}", path.display());
                    }
                    let _ = node
                        .put(
                            "machines",
                            &ip.to_string(),
                            &machine_json(&me, &hostname, ip),
                        )
                        .await;
                    let a = &mut addr;
                    a.ip = Some((ip, prefix));
                    a.how = format!("dhcp (lease {})", path.display());
                    a.dhcp.clear();
                    eprintln!("p2p: took {ip}/{prefix} by DHCP");
                }
                DhcpStep::Wait(why) => addr.dhcp = why,
            }
        }
        if Instant::now() >= next_announce {
            if let Some((ip, _)) = addr.ip {
                let v = machine_json(&me, &hostname, ip);
                let _ = node.put("machines", &ip.to_string(), &v).await;
            }
            next_announce = Instant::now() + s.intervals.announce;
        }
        // The cluster's coordinator: its last tick's writes, then the next tick when due
        // (its period, or its bucket changed and the last tick is a gap old).
        if coord_job.as_ref().is_some_and(|j| j.is_finished())
            && let Some(job) = coord_job.take()
        {
            match job.await {
                Ok(out) => {
                    let bucket = coord_bucket.clone().unwrap_or_default();
                    for (k, v) in &out.writes {
                        if let Err(e) = node.put(&bucket, k, v).await {
                            eprintln!("p2p: writing {bucket}/{k}: {e}");
                        }
                    }
                    cluster_status = out.status;
                }
                Err(e) => eprintln!("p2p: the cluster coordinator stopped: {e}"),
            }
        }
        if let (Some(c), Some(bucket), None) = (&coordinator, &coord_bucket, &coord_job) {
            let entries = bucket_entries(&node, bucket);
            let changed = coord_seen.as_ref() != Some(&entries);
            if Instant::now() >= next_coord || (changed && last_coord.elapsed() >= COORDINATOR_GAP)
            {
                coord_seen = Some(entries.clone());
                let input = TickInput {
                    entries,
                    active_nodes: alive.len(),
                    vpn_ip: addr.ip.map(|(ip, _)| ip),
                    live_addresses: machines
                        .iter()
                        .filter(|(_, p)| alive.contains(p))
                        .map(|(ip, _)| *ip)
                        .collect(),
                    now,
                };
                let c = c.clone();
                coord_job = Some(tokio::task::spawn_blocking(move || lock(&c).tick(input)));
                last_coord = Instant::now();
                next_coord = Instant::now() + COORDINATOR_TICK;
            }
        }
        // Status.
        let st = node.status().await.unwrap_or_default();
        let (keys, index) = node.read(|l| {
            let mut keys = serde_json::Map::new();
            for (b, entries) in &l.last().storage {
                let live: Vec<&String> = entries
                    .iter()
                    .filter(|(_, e)| !e.deleted)
                    .map(|(k, _)| k)
                    .collect();
                keys.insert(b.clone(), json!(live));
            }
            (keys, l.last().index)
        });
        let interval = s.token.otp.crypto.interval.max(1) as i64;
        let next_rotation = (now / interval + 1) * interval;
        let a = &addr;
        let machines_json: Vec<serde_json::Value> = machines
            .iter()
            .map(|(ip, p)| json!({"address": ip.to_string(), "peer": p, "live": live.contains(p), "me": p == &me}))
            .collect();
        let doc = json!({
            "peer_id": me,
            "hostname": hostname,
            "uptime_s": started.elapsed().as_secs(),
            "listen": st.listen,
            "peers": st.peers,
            "topic": st.topic,
            "next_rotation": next_rotation,
            "rotation_in_s": next_rotation - now,
            "ledger": {"index": index, "keys": keys},
            "unsealable": st.unsealable,
            "published": st.published,
            "sync": {"mode": st.sync, "deltas": st.deltas, "comparisons": st.comparisons, "exchanges": st.exchanges},
            "vpn": s.vpn.as_ref().map(|v| json!({
                "interface": v.interface,
                "mtu": v.mtu,
                "address": a.ip.map(|(ip, p)| format!("{ip}/{p}")),
                "addressing": a.how,
                "waiting": (!a.dhcp.is_empty()).then(|| a.dhcp.clone()),
                "route": a.ip.map(|(ip, p)| format!("{}/{p} dev {}", kairos_sys::net::network(ip, p), v.interface)),
            })),
            "traffic": vpn.as_ref().map(|(v, _)| v.counters.json()),
            "machines": machines_json,
            "alive": alive,
            "discovery": {"mdns": s.mdns, "bootstrap_peers": s.peers, "dht": "the network's own (addresses of its peers); no public DHT"},
            "nat": "not probed (no AutoNAT or relay yet): a node behind NAT joins by connecting out to a peer it can reach",
            "dns": s.dns.as_ref().map(|d| json!({"listen": d.listen.to_string(), "domain": d.domain})),
            "cluster": cluster_status,
        });
        *lock(&status) = doc;
    }
    let _ = std::fs::remove_file(&paths.socket);
    Ok(())
}

/// The resolv.conf that sends the node's lookups to the mesh DNS (as Kairos does with
/// `p2p.dns`), keeping its `search`/`options` lines.
pub fn mesh_resolv_conf(old: &str, listen: std::net::IpAddr) -> String {
    let mut out = format!(
        "# kairos-agent p2p (p2p.dns): mesh names, the rest forwarded\nnameserver {listen}\n"
    );
    for l in old.lines() {
        let t = l.trim_start();
        if t.starts_with("search") || t.starts_with("domain") || t.starts_with("options") {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Points the node's resolv.conf at the mesh DNS, keeping the old one as the upstream list
/// (once: a restart must not take our own file as upstream).
fn use_mesh_dns(resolv_conf: &Path, upstream: &Path) {
    let old = std::fs::read_to_string(resolv_conf).unwrap_or_default();
    if !upstream.exists() && !old.contains("kairos-agent p2p") {
        let _ = kairos_sys::fs::write_private(upstream, old.as_bytes());
    }
    let new = mesh_resolv_conf(&old, std::net::IpAddr::V4(Ipv4Addr::LOCALHOST));
    if new != old
        && let Err(e) = kairos_sys::fs::write_atomic(resolv_conf, new.as_bytes(), 0o644)
    {
        eprintln!(
            "p2p: could not point {} at the mesh DNS: {e}",
            resolv_conf.display()
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bucket's live entries.
fn bucket_entries(node: &Node, bucket: &str) -> std::collections::BTreeMap<String, String> {
    node.read(|l| {
        l.bucket(bucket)
            .into_iter()
            .map(|(k, e)| (k.to_string(), e.value.clone()))
            .collect()
    })
}

/// Serves the socket (0600): each connection sends one [`Request`] line (or nothing, for
/// the status), gets one JSON answer and is closed.
fn serve_status(
    path: &Path,
    status: Arc<Mutex<serde_json::Value>>,
    requests: tokio::sync::mpsc::Sender<Pending>,
) -> Result<(), DaemonError> {
    let err = |why| DaemonError::Socket {
        path: path.to_path_buf(),
        why,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket left by a daemon that died is replaced; a live one is not.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another p2p daemon answers there; stop it first",
        )));
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let (status, requests) = (status.clone(), requests.clone());
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt, AsyncReadExt};
                let (rd, mut wr) = conn.into_split();
                let mut line = Vec::new();
                let mut rd = tokio::io::BufReader::new(rd).take(MAX_REQUEST as u64);
                let read =
                    tokio::time::timeout(Duration::from_secs(2), rd.read_until(b'\n', &mut line))
                        .await;
                let req = match read {
                    Ok(Ok(_)) if line.iter().all(u8::is_ascii_whitespace) => Ok(Request::Status),
                    Ok(Ok(_)) => serde_json::from_slice::<Request>(&line)
                        .map_err(|e| format!("not a request: {e}")),
                    // A reader that sends nothing wants the status.
                    _ => Ok(Request::Status),
                };
                let answer = match req {
                    Ok(Request::Status) => lock(&status).clone(),
                    Ok(req) => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        if requests.send((req, tx)).await.is_err() {
                            json!({"error": "the daemon is stopping"})
                        } else {
                            rx.await
                                .unwrap_or_else(|_| json!({"error": "the daemon is stopping"}))
                        }
                    }
                    Err(e) => json!({ "error": e }),
                };
                let _ = wr.write_all(answer.to_string().as_bytes()).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    Ok(())
}

/// Sends `req` to the daemon answering on `socket` and returns its answer; an answer
/// `{"error": …}` is an error.
pub fn request(socket: &Path, req: &Request) -> std::io::Result<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut text = String::new();
    s.take(16 << 20).read_to_string(&mut text)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    match v.get("error").and_then(|e| e.as_str()) {
        Some(e) if v.as_object().is_some_and(|o| o.len() == 1) => {
            Err(std::io::Error::other(e.to_string()))
        }
        _ => Ok(v),
    }
}

/// Reads the status of the daemon answering on `socket`.
pub fn read_status(socket: &Path) -> std::io::Result<serde_json::Value> {
    request(socket, &Request::Status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn socket_requests_are_checked() {
        let put = |bucket: &str, key: &str, value: &str| Request::Put {
            bucket: bucket.into(),
            key: key.into(),
            value: value.into(),
        };
        assert!(put("kairos", "n1-role", "\"d29ya2VyIg==\"").check().is_ok());
        assert!(put("kairos", "has space", "1").check().is_err());
        assert!(put("", "k", "1").check().is_err());
        assert!(
            put("kairos", &"k".repeat(MAX_NAME + 1), "1")
                .check()
                .is_err()
        );
        let e = put("kairos", "k", "not json").check().unwrap_err();
        assert!(e.contains("value of k: not JSON"), "{e}");
        let line = r#"{"op":"bucket","bucket":"kairos"}"#;
        assert_eq!(
            serde_json::from_str::<Request>(line).unwrap(),
            Request::Bucket {
                bucket: "kairos".into()
            }
        );
    }

    #[test]
    fn dhcp_rule() {
        let first = Ipv4Addr::new(10, 1, 0, 1);
        let none = BTreeMap::new();
        let one = vec!["a".to_string()];
        assert!(
            matches!(dhcp_step("a", &one, &none, None, first), DhcpStep::Wait(w) if w.contains("2 alive"))
        );
        let two = vec!["a".to_string(), "b".to_string()];
        // FNV-1a: of [a, b], b leads.
        assert_eq!(
            kairos_mesh::leader::leader(&two).map(|s| s.to_string()),
            Some("b".to_string())
        );
        assert_eq!(dhcp_step("b", &two, &none, None, first), DhcpStep::Claim);
        assert_eq!(
            dhcp_step("b", &two, &none, Some("b"), first),
            DhcpStep::Take(first)
        );
        assert!(
            matches!(dhcp_step("a", &two, &none, Some("b"), first), DhcpStep::Wait(w) if w.contains("b"))
        );
        // Once b has .1, a leads and takes .2.
        let mut m = BTreeMap::new();
        m.insert(first, "b".to_string());
        assert_eq!(dhcp_step("a", &two, &m, Some("b"), first), DhcpStep::Claim);
        assert_eq!(
            dhcp_step("a", &two, &m, Some("a"), first),
            DhcpStep::Take(Ipv4Addr::new(10, 1, 0, 2))
        );
    }

    #[test]
    fn machine_value_is_go_json_in_field_order() {
        let v = machine_json("12D3KooWx", "node<1>", Ipv4Addr::new(10, 1, 0, 3));
        assert!(
            v.starts_with(
                r#"{"PeerID":"12D3KooWx","Hostname":"node\u003c1\u003e","OS":"linux","Arch":""#
            ),
            "{v}"
        );
        assert!(
            v.contains(r#""Address":"10.1.0.3","Version":"kairos-rs "#),
            "{v}"
        );
    }

    #[test]
    fn resolv_conf_points_at_the_mesh() {
        let old = "nameserver 192.0.2.1\nsearch lan example.com\noptions edns0\n";
        let new = mesh_resolv_conf(old, "127.0.0.1".parse().unwrap());
        assert_eq!(
            new,
            "# kairos-agent p2p (p2p.dns): mesh names, the rest forwarded\nnameserver 127.0.0.1\nsearch lan example.com\noptions edns0\n"
        );
        let d = tempfile::tempdir().unwrap();
        let (rc, up) = (d.path().join("resolv.conf"), d.path().join("state/up"));
        std::fs::write(&rc, old).unwrap();
        use_mesh_dns(&rc, &up);
        use_mesh_dns(&rc, &up);
        assert_eq!(
            std::fs::read_to_string(&up).unwrap(),
            old,
            "the original is kept once"
        );
        assert_eq!(std::fs::read_to_string(&rc).unwrap(), new);
    }

    #[test]
    fn identity_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let a = identity_seed(d.path()).unwrap();
        assert_eq!(identity_seed(d.path()).unwrap(), a);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("identity"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(d.path().join("identity"), b"short").unwrap();
        assert!(
            identity_seed(d.path())
                .unwrap_err()
                .to_string()
                .contains("remove it")
        );
    }
}
