//! Tier 2: the P2P mesh across a real network — network namespaces joined by a bridge (one
//! LAN), `kairos-agent p2p run` daemons in them, packets through their TUN devices.
//!
//! Ignored by default; `scripts/test` runs them as root with `-- --ignored`. The harness
//! reads each daemon's status socket (its own channel), never its log.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn agent() -> &'static str {
    env!("CARGO_BIN_EXE_kairos-agent")
}

fn sh(argv: &[&str]) -> bool {
    Command::new(argv[0])
        .args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn must(argv: &[&str]) {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One LAN: a bridge in its own namespace, and nodes, each in a namespace with a veth on it.
struct Lan {
    tag: String,
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    routers: std::sync::Mutex<Vec<String>>,
}

struct Node {
    ns: String,
    root: PathBuf,
    child: Option<Child>,
}

impl Lan {
    /// `name`: two letters, unique per test (tests run in parallel).
    fn new(name: &str) -> Lan {
        let tag = format!("{name}{}", std::process::id() % 100_000);
        let lan = Lan {
            tag,
            dir: tempfile::tempdir().unwrap(),
            nodes: Vec::new(),
            routers: Default::default(),
        };
        let br = lan.bridge_ns();
        must(&["ip", "netns", "add", &br]);
        must(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"]);
        must(&["ip", "-n", &br, "link", "set", "br0", "up"]);
        lan
    }

    fn bridge_ns(&self) -> String {
        format!("{}-lan", self.tag)
    }

    /// Namespace `ns` with a veth to the bridge, at 192.168.77.i.
    fn plug(&self, ns: &str, i: usize) {
        let br = self.bridge_ns();
        let (inner, outer) = (format!("{}v{i}", self.tag), format!("{}p{i}", self.tag));
        must(&["ip", "netns", "add", ns]);
        must(&[
            "ip", "link", "add", &inner, "netns", ns, "type", "veth", "peer", "name", &outer,
            "netns", &br,
        ]);
        must(&[
            "ip", "-n", &br, "link", "set", &outer, "master", "br0", "up",
        ]);
        let addr = format!("192.168.77.{i}/24");
        must(&["ip", "-n", ns, "addr", "add", &addr, "dev", &inner]);
        must(&["ip", "-n", ns, "link", "set", &inner, "up"]);
        must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    /// A NAT router on the LAN at 192.168.77.i, masquerading 10.99.0.0/24, and node `ns`
    /// behind it at 10.99.0.2 (the LAN cannot reach it; it can reach the LAN).
    fn plug_behind_nat(&self, ns: &str, i: usize) {
        let r = format!("{}-r{i}", self.tag);
        self.routers.lock().unwrap().push(r.clone());
        self.plug(&r, i);
        must(&["ip", "netns", "add", ns]);
        let (inner, outer) = (format!("{}n{i}", self.tag), format!("{}g{i}", self.tag));
        must(&[
            "ip", "link", "add", &inner, "netns", ns, "type", "veth", "peer", "name", &outer,
            "netns", &r,
        ]);
        must(&["ip", "-n", &r, "addr", "add", "10.99.0.1/24", "dev", &outer]);
        must(&["ip", "-n", &r, "link", "set", &outer, "up"]);
        must(&[
            "ip",
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let rules = format!(
            "table ip nat {{\n chain post {{\n  type nat hook postrouting priority 100;\n  ip saddr 10.99.0.0/24 oifname \"{}v{i}\" masquerade\n }}\n}}\n",
            self.tag
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &r, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(rules.as_bytes())?;
                c.wait()
            })
            .unwrap();
        assert!(out.success(), "nft rules in {r}");
        must(&["ip", "-n", ns, "addr", "add", "10.99.0.2/24", "dev", &inner]);
        must(&["ip", "-n", ns, "link", "set", &inner, "up"]);
        must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        must(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            "10.99.0.1",
        ]);
    }

    /// Adds node `i` (192.168.77.i on the LAN) with `p2p:` set to `p2p_yaml`.
    fn add(&mut self, i: usize, hostname: &str, p2p_yaml: &str) -> usize {
        self.add_node(i, hostname, p2p_yaml, false)
    }

    fn add_node(&mut self, i: usize, hostname: &str, p2p_yaml: &str, nat: bool) -> usize {
        let ns = format!("{}-n{i}", self.tag);
        if nat {
            self.plug_behind_nat(&ns, i);
        } else {
            self.plug(&ns, i);
        }
        // `ip netns exec` mounts these over /etc: names resolve through the mesh DNS.
        let etc = PathBuf::from("/etc/netns").join(&ns);
        fs::create_dir_all(&etc).unwrap();
        fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        let root = self.dir.path().join(format!("n{i}"));
        fs::create_dir_all(root.join("oem")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hostname"), format!("{hostname}\n")).unwrap();
        fs::write(
            root.join("oem/90_p2p.yaml"),
            format!("#cloud-config\np2p:\n{p2p_yaml}"),
        )
        .unwrap();
        self.nodes.push(Node {
            ns,
            root,
            child: None,
        });
        let n = self.nodes.len() - 1;
        self.start(n);
        n
    }

    fn start(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let log = fs::File::create(node.root.join("daemon.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns, agent(), "--root"])
            .arg(&node.root)
            .args(["--cmdline", "", "p2p", "run"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    /// Kills node `n` as a power cut would (SIGKILL).
    fn kill(&mut self, n: usize) {
        if let Some(mut c) = self.nodes[n].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn status(&self, n: usize) -> Option<Value> {
        kairos_vpn::daemon::read_status(&self.nodes[n].root.join("run/kairos/p2p.sock")).ok()
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- {}:\n{}",
                    n.ns,
                    fs::read_to_string(n.root.join("daemon.log")).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Waits until `ok` holds for node `n`'s status.
    fn wait(&self, n: usize, what: &str, secs: u64, ok: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = self.status(n)
                && ok(&v)
            {
                return v;
            }
            if Instant::now() > end {
                panic!(
                    "node {n}: {what} within {secs} s; last status: {:#?}\n{}",
                    self.status(n),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until node `n` has a VPN address and sees `machines` live machines.
    fn joined(&self, n: usize, machines: usize) -> Value {
        let what = format!("an address and {machines} live machines");
        self.wait(n, &what, 120, |v| {
            address(v).is_some() && live_machines(v) == machines
        })
    }

    fn exec(&self, n: usize, argv: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.nodes[n].ns])
            .args(argv)
            .output()
            .unwrap()
    }

    /// Pings `to` from node `n` (busybox ping: success when a reply came back).
    fn ping(&self, n: usize, to: &str) -> bool {
        self.exec(n, &["busybox", "ping", "-c", "3", "-W", "3", to])
            .status
            .success()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in 0..self.nodes.len() {
            self.kill(n);
        }
        for n in &self.nodes {
            let _ = sh(&["ip", "netns", "del", &n.ns]);
            let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(&n.ns));
        }
        for r in self.routers.lock().unwrap().iter() {
            let _ = sh(&["ip", "netns", "del", r]);
        }
        let _ = sh(&["ip", "netns", "del", &self.bridge_ns()]);
    }
}

fn address(v: &Value) -> Option<String> {
    v["vpn"]["address"]
        .as_str()
        .map(|a| a.split('/').next().unwrap_or(a).to_string())
}

fn live_machines(v: &Value) -> usize {
    v["machines"]
        .as_array()
        .map(|m| m.iter().filter(|x| x["live"] == Value::Bool(true)).count())
        .unwrap_or(0)
}

fn token(interval: u64) -> String {
    kairos_mesh::Token::generate(interval).encode()
}

fn root_only() -> bool {
    if rustix::process::geteuid().is_root() && Path::new("/dev/net/tun").exists() {
        true
    } else {
        eprintln!("skipped: needs root and /dev/net/tun");
        false
    }
}

/// Three nodes with one token and nothing else in common find each other by mDNS (no DHT),
/// take addresses by DHCP over the ledger, and reach each other by mesh IP and mesh name —
/// across topic rotations (a 20 s interval). An outsider with another token connected to
/// them reads nothing and is seen by nobody. A node killed and restarted comes back with the
/// same PeerID and address.
#[test]
#[ignore = "needs root: network namespaces and TUN devices"]
fn three_nodes_on_a_lan() {
    if !root_only() {
        return;
    }
    let tok = token(20);
    let mut lan = Lan::new("km");
    let cfg = format!("  network_token: {tok}\n  disable_dht: true\n  dns: true\n");
    for i in 1..=3 {
        lan.add(i, &format!("node{i}"), &cfg);
    }
    let started = Instant::now();
    let addrs: Vec<String> = (0..3)
        .map(|n| address(&lan.joined(n, 3)).unwrap())
        .collect();
    eprintln!("joined: {addrs:?} in {:?}", started.elapsed());
    let mut sorted = addrs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 3, "three distinct addresses: {addrs:?}");
    let first_topic = lan.status(0).unwrap()["topic"].clone();
    // Three of our own: the ledger travels as deltas, not whole blocks.
    for n in 0..3 {
        lan.wait(n, "delta sync", 30, |v| v["sync"]["mode"] == "delta");
    }

    for from in 0..3 {
        for (to, a) in addrs.iter().enumerate() {
            if to != from {
                assert!(lan.ping(from, a), "node{} → {a}\n{}", from + 1, lan.logs());
            }
        }
    }
    // Mesh DNS: the name of a machine is its VPN address.
    let out = lan.exec(0, &["busybox", "nslookup", "node3.mesh", "127.0.0.1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&addrs[2]),
        "node3.mesh → {}: {text}",
        addrs[2]
    );
    assert!(lan.ping(0, "node2.mesh"), "ping node2.mesh\n{}", lan.logs());

    // An outsider with another token, told where node1 listens.
    let listen = lan.status(0).unwrap()["listen"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|a| a.starts_with("/ip4/192.168.77."))
        .unwrap()
        .to_string();
    let me1 = lan.status(0).unwrap()["peer_id"]
        .as_str()
        .unwrap()
        .to_string();
    let outsider = lan.add(
        9,
        "outsider",
        &format!(
            "  network_token: {}\n  disable_dht: true\n  bootstrap_peers: [{listen}/p2p/{me1}]\n  vpn:\n    address: 10.1.0.200/24\n",
            token(20)
        ),
    );
    let v = lan.wait(outsider, "connected to node1", 60, |v| {
        v["peers"].as_array().is_some_and(|p| !p.is_empty()) && v["published"].as_u64() >= Some(3)
    });
    let outsider_id = v["peer_id"].as_str().unwrap().to_string();
    // Not on our topic: node1 drops the connection after its grace time (30 s).
    lan.wait(0, "the outsider disconnected", 90, |v| {
        !v["peers"].to_string().contains(&outsider_id)
    });
    let v = lan.status(outsider).unwrap();
    let others = v["machines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["me"] != Value::Bool(true))
        .count();
    assert_eq!(
        others, 0,
        "the outsider reads no machine but its own: {v:#}"
    );
    let keys = &v["ledger"]["keys"]["machines"];
    assert_eq!(
        keys,
        &serde_json::json!(["10.1.0.200"]),
        "outsider ledger {v:#}"
    );
    assert!(
        !lan.ping(outsider, &addrs[0]),
        "the outsider reached the mesh"
    );
    lan.wait(outsider, "its packets counted as without route", 10, |v| {
        v["traffic"]["no_route"].as_u64() > Some(0)
    });
    for n in 0..3 {
        let s = lan.status(n).unwrap();
        let seen = format!("{}{}{}", s["machines"], s["ledger"], s["peers"]);
        assert!(
            !seen.contains(&outsider_id),
            "node{} sees the outsider: {s:#}",
            n + 1
        );
    }

    // Rotation: the topic has changed at least once by now, or wait for it.
    lan.wait(0, "a topic rotation", 60, |v| v["topic"] != first_topic);

    // Power cut of node2, and back.
    let before = lan.status(1).unwrap();
    lan.kill(1);
    lan.start(1);
    let after = lan.joined(1, 3);
    assert_eq!(after["peer_id"], before["peer_id"], "same identity");
    assert_eq!(address(&after), address(&before), "same VPN address");
    assert!(
        lan.ping(0, &addrs[1]),
        "node1 → restarted node2\n{}",
        lan.logs()
    );
    assert!(
        lan.ping(1, &addrs[2]),
        "restarted node2 → node3\n{}",
        lan.logs()
    );

    // `p2p status` for people.
    let out = Command::new(agent())
        .arg("--root")
        .arg(&lan.nodes[0].root)
        .args(["p2p", "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("connected peers")
            && text.contains(&addrs[0])
            && text.contains("ledger sync"),
        "{text}"
    );
}

fn lan_address_of(v: &Value) -> String {
    let listen = v["listen"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|a| a.starts_with("/ip4/192.168.77."))
        .unwrap()
        .to_string();
    format!("{listen}/p2p/{}", v["peer_id"].as_str().unwrap())
}

/// A node behind NAT (nftables masquerade; nobody on the LAN can open a connection to it)
/// told one LAN node's address joins: it takes an address by DHCP, learns where the other
/// LAN node listens from the network's DHT, connects out to it, and both LAN nodes and it
/// ping each other over the VPN.
#[test]
#[ignore = "needs root: network namespaces, nftables and TUN devices"]
fn a_node_behind_nat_joins() {
    if !root_only() {
        return;
    }
    let tok = token(9000);
    let mut lan = Lan::new("kn");
    let cfg = format!("  network_token: {tok}\n  disable_dht: true\n");
    lan.add(1, "lan1", &cfg);
    lan.add(2, "lan2", &cfg);
    let v = lan.joined(0, 2);
    let boot = lan_address_of(&v);
    let natted = lan.add_node(
        3,
        "natted",
        &format!("{cfg}  bootstrap_peers: [{boot}]\n"),
        true,
    );
    let addrs: Vec<String> = (0..3)
        .map(|n| address(&lan.joined(n, 3)).unwrap())
        .collect();
    // The LAN cannot open a connection to the NAT'ed node: check the premise.
    assert!(
        !lan.exec(0, &["busybox", "ping", "-c", "1", "-W", "1", "10.99.0.2"])
            .status
            .success(),
        "the NAT'ed node is reachable from the LAN: the test proves nothing"
    );
    for (from, to) in [(natted, 0), (natted, 1), (0, natted), (1, natted)] {
        assert!(
            lan.ping(from, &addrs[to]),
            "node {from} → {}\n{}",
            addrs[to],
            lan.logs()
        );
    }
}
