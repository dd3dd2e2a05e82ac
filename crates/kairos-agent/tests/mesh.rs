//! Tier 2: the P2P mesh across a real network — network namespaces joined by a bridge (one
//! LAN), `kairos-agent p2p run` daemons in them, packets through their TUN devices.
//!
//! Ignored by default; `scripts/test` runs them as root with `-- --ignored`. The harness
//! reads each daemon's status socket (its own channel), never its log.
//!
//! The cluster tests run **k3s-standin**, a stand-in for k3s written for these tests (k3s
//! cannot be had here), and the harness plays systemd: it starts the service the agent
//! configured (the drop-in's `ExecStart=` and the `EnvironmentFile=`) in the node's
//! namespace, restarts it when its files change and when it exits (`Restart=always`).

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
    /// Services the harness runs as systemd would (the cluster tests).
    services: Vec<Service>,
}

/// A k3s service of a node run by the harness: its unit and env text, the process.
struct Service {
    name: &'static str,
    key: String,
    child: Child,
    started: Instant,
}

/// kairosctl, built beside kairos-agent (`scripts/test` builds it before this tier).
fn kairosctl() -> &'static str {
    static P: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let p = Path::new(agent()).with_file_name("kairosctl");
        assert!(
            p.exists(),
            "{} is missing: `cargo build -p kairos-ctl` first",
            p.display()
        );
        p.to_string_lossy().into_owned()
    })
}

fn standin() -> &'static str {
    env!("CARGO_BIN_EXE_k3s-standin")
}

/// The env file as systemd reads it (godotenv's quoting: `K="v"` with `\` escapes).
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(q) => {
                    let mut out = String::new();
                    let mut esc = false;
                    for c in q.chars() {
                        if esc || c != '\\' {
                            out.push(c);
                            esc = false;
                        } else {
                            esc = true;
                        }
                    }
                    out
                }
                None => v.to_string(),
            };
            Some((k.to_string(), v))
        })
        .collect()
}

/// The `ExecStart=` of a drop-in (the last non-empty one), split as systemd splits it.
fn exec_start(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .rfind(|l| !l.is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
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
        // A systemd image with k3s in it, as `kairosify --k3s` makes it (the binary is a
        // placeholder: the harness runs the stand-in in its place).
        fs::write(
            root.join("etc/machine-id"),
            format!("{:032x}\n", 0xabc0 + i),
        )
        .unwrap();
        for d in ["usr/lib/systemd", "usr/bin", "etc/systemd/system"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("usr/lib/systemd/systemd"), "").unwrap();
        fs::write(root.join("usr/bin/k3s"), "").unwrap();
        for svc in ["k3s", "k3s-agent"] {
            fs::write(
                root.join(format!("etc/systemd/system/{svc}.service")),
                "[Service]\nExecStart=/usr/bin/k3s\nRestart=always\n\n[Install]\nWantedBy=multi-user.target\n",
            )
            .unwrap();
        }
        fs::write(
            root.join("oem/90_p2p.yaml"),
            format!("#cloud-config\np2p:\n{p2p_yaml}"),
        )
        .unwrap();
        self.nodes.push(Node {
            ns,
            root,
            child: None,
            services: Vec::new(),
        });
        let n = self.nodes.len() - 1;
        self.start(n);
        n
    }

    /// A workstation at 192.168.77.i running `kairosctl bridge` with `tok`, its kubeconfig
    /// at `<root>/kubeconfig` and its status socket where a node's is (so `status(n)` works).
    fn add_bridge(&mut self, i: usize, tok: &str) -> usize {
        let ns = format!("{}-n{i}", self.tag);
        self.plug(&ns, i);
        let root = self.dir.path().join(format!("n{i}"));
        fs::create_dir_all(root.join("run/kairos")).unwrap();
        let log = fs::File::create(root.join("daemon.log")).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                kairosctl(),
                "bridge",
                "--network-token",
                tok,
            ])
            .arg("--kubeconfig")
            .arg(root.join("kubeconfig"))
            .arg("--socket")
            .arg(root.join("run/kairos/p2p.sock"))
            .arg("--state-dir")
            .arg(root.join("state"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.nodes.push(Node {
            ns,
            root,
            child: Some(child),
            services: Vec::new(),
        });
        self.nodes.len() - 1
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

    /// Kills node `n` as a power cut would (SIGKILL): its daemon and its services.
    fn kill(&mut self, n: usize) {
        if let Some(mut c) = self.nodes[n].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for mut svc in self.nodes[n].services.drain(..) {
            let _ = svc.child.kill();
            let _ = svc.child.wait();
        }
    }

    /// The harness as systemd for every running node: a configured k3s/k3s-agent service
    /// is started, restarted when its unit or env file changes or when it exited (after
    /// 2 s), and stopped when its files are removed.
    fn supervise(&mut self) {
        for node in &mut self.nodes {
            if node.child.is_none() {
                continue;
            }
            for name in ["k3s", "k3s-agent"] {
                let unit = fs::read_to_string(
                    node.root
                        .join(format!("etc/systemd/system/{name}.service.d/override.conf")),
                )
                .ok();
                let env = fs::read_to_string(node.root.join(format!("etc/sysconfig/{name}")))
                    .unwrap_or_default();
                let key = unit.as_ref().map(|u| format!("{u}\n--\n{env}"));
                let at = node.services.iter().position(|s| s.name == name);
                let restart = match (&key, at) {
                    (None, None) => false,
                    (None, Some(_)) => false,
                    (Some(k), Some(i)) => {
                        let s = &mut node.services[i];
                        *k != s.key
                            || (s.child.try_wait().ok().flatten().is_some()
                                && s.started.elapsed() > Duration::from_secs(2))
                    }
                    (Some(_), None) => true,
                };
                if let Some(i) = at
                    && (restart || key.is_none())
                {
                    let mut s = node.services.remove(i);
                    let _ = s.child.kill();
                    let _ = s.child.wait();
                }
                if !restart {
                    continue;
                }
                let (Some(key), Some(unit)) = (key, unit) else {
                    continue;
                };
                let argv = exec_start(&unit);
                assert_eq!(
                    argv.first().map(String::as_str),
                    Some("/usr/bin/k3s"),
                    "{unit}"
                );
                let log = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(node.root.join(format!("{name}.log")))
                    .unwrap();
                let child = Command::new("ip")
                    .args(["netns", "exec", &node.ns, standin()])
                    .args(&argv[1..])
                    .env_clear()
                    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                    .env("K3S_STANDIN_ROOT", &node.root)
                    .envs(env_file(&env))
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .unwrap();
                node.services.push(Service {
                    name,
                    key,
                    child,
                    started: Instant::now(),
                });
            }
        }
    }

    /// Waits (playing systemd meanwhile) until `ok` holds for the statuses of all nodes.
    fn wait_cluster(&mut self, what: &str, secs: u64, ok: impl Fn(&Lan, &[Value]) -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            self.supervise();
            let all: Vec<Value> = (0..self.nodes.len())
                .map(|n| self.status(n).unwrap_or(Value::Null))
                .collect();
            if ok(self, &all) {
                return;
            }
            if Instant::now() > end {
                let services: String = self
                    .nodes
                    .iter()
                    .flat_map(|n| {
                        ["k3s", "k3s-agent"].map(|s| {
                            format!(
                                "--- {} {s}.log:\n{}",
                                n.ns,
                                fs::read_to_string(n.root.join(format!("{s}.log")))
                                    .unwrap_or_default()
                            )
                        })
                    })
                    .collect();
                panic!(
                    "{what} within {secs} s; cluster status: {:#}\n{}{services}",
                    Value::Array(
                        all.iter()
                            .map(|v| serde_json::json!({
                                "cluster": v["cluster"],
                                "vpn": v["vpn"],
                                "alive": v["alive"],
                                "machines": v["machines"],
                                "peers": v["peers"],
                            }))
                            .collect()
                    ),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `kairos-agent --root <node n> args…` (outside the namespace: the socket is a file).
    fn agent_cmd(&self, n: usize, args: &[&str]) -> (bool, String, String) {
        let o = Command::new(agent())
            .arg("--root")
            .arg(&self.nodes[n].root)
            .args(["--cmdline", ""])
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into(),
            String::from_utf8_lossy(&o.stderr).into(),
        )
    }

    /// Node `n`'s file `rel` (under its root), or "".
    fn file(&self, n: usize, rel: &str) -> String {
        fs::read_to_string(self.nodes[n].root.join(rel)).unwrap_or_default()
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

fn role_of(v: &Value) -> Option<&str> {
    v["cluster"]["role"].as_str()
}

/// The nodes joined to the stand-in server of node `n`: (hostname, role, address).
fn joined_to(lan: &Lan, n: usize) -> Vec<(String, String, String)> {
    lan.file(n, "var/lib/rancher/k3s/server/standin-nodes")
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 3).then(|| (w[0].to_string(), w[1].to_string(), w[2].to_string()))
        })
        .collect()
}

/// The mesh config of the cluster tests: a token, `role: auto`, and heartbeats quick
/// enough that a stopped node is noticed in seconds (EdgeVPN's env keys).
fn cluster_cfg(tok: &str, extra: &str) -> String {
    format!(
        "  network_token: {tok}\n  disable_dht: true\n  role: auto\n{extra}  vpn:\n    env:\n      HEALTHCHECKINTERVAL: \"2\"\n      HEALTHCHECKMAXINTERVAL: \"12\"\n"
    )
}

/// Three nodes with only a token and `role: auto` elect one master and two workers; the
/// workers' k3s agents (the stand-in) join the master over the VPN with the master's token;
/// `get-kubeconfig` points at the master's mesh address. A fourth node set to `master/ha` by
/// hand (`role set`, before it starts) joins the control plane; the master killed, `p2p
/// status` on a worker says so.
#[test]
#[ignore = "needs root: network namespaces and TUN devices"]
fn three_auto_nodes_form_a_cluster() {
    if !root_only() {
        return;
    }
    let tok = token(3600);
    let mut lan = Lan::new("kc");
    for i in 1..=3 {
        lan.add(i, &format!("node{i}"), &cluster_cfg(&tok, ""));
    }
    let started = Instant::now();
    lan.wait_cluster(
        "one master and two workers joined to it",
        240,
        |lan, all| {
            let Some(m) = all.iter().position(|v| role_of(v) == Some("master")) else {
                return false;
            };
            let workers = all.iter().filter(|v| role_of(v) == Some("worker")).count();
            let joined = joined_to(lan, m);
            workers == 2
                && joined.len() == 2
                && joined
                    .iter()
                    .all(|(_, r, a)| r == "agent" && a.starts_with("10.1.0."))
        },
    );
    eprintln!("cluster formed in {:?}", started.elapsed());
    let all: Vec<Value> = (0..3).map(|n| lan.status(n).unwrap()).collect();
    let m = all
        .iter()
        .position(|v| role_of(v) == Some("master"))
        .unwrap();
    let master_ip = address(&all[m]).unwrap();
    let node_token = lan.file(m, "var/lib/rancher/k3s/server/node-token");
    assert!(node_token.starts_with("K10"), "{node_token:?}");
    for w in (0..3).filter(|w| *w != m) {
        let env = lan.file(w, "etc/sysconfig/k3s-agent");
        assert!(
            env.contains(&format!("K3S_URL=\"https://{master_ip}:6443\"")),
            "{env}"
        );
        assert!(
            env.contains(&format!("K3S_TOKEN=\"{}\"", node_token.trim())),
            "{env}"
        );
        let unit = lan.file(w, "etc/systemd/system/k3s-agent.service.d/override.conf");
        assert!(
            unit.contains("--with-node-id") && unit.contains("--flannel-iface=edgevpn0"),
            "{unit}"
        );
        assert!(
            lan.file(
                w,
                "etc/systemd/system/multi-user.target.wants/k3s-agent.service"
            )
            .is_empty()
                && lan.nodes[w]
                    .root
                    .join("etc/systemd/system/multi-user.target.wants/k3s-agent.service")
                    .symlink_metadata()
                    .is_ok(),
            "k3s-agent enabled"
        );
        // The kubeconfig, from a worker: the master's mesh address.
        let (ok, out, err) = lan.agent_cmd(w, &["get-kubeconfig"]);
        assert!(ok, "{err}");
        assert!(
            out.contains(&format!("server: https://{master_ip}:6443")),
            "{out}"
        );
        // Who is what, for people.
        let (ok, out, err) = lan.agent_cmd(w, &["p2p", "status"]);
        assert!(ok, "{err}");
        assert!(
            out.contains("cluster role       worker, runs k3s-agent"),
            "{out}"
        );
        assert!(
            out.contains(&format!("cluster api        https://{master_ip}:6443")),
            "{out}"
        );
    }
    let (ok, out, _) = lan.agent_cmd(0, &["role", "list", "--json"]);
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["nodes"].as_array().unwrap().len(), 3, "{list:#}");

    // A workstation joins with `kairosctl bridge`: it gets the kubeconfig, and the API at
    // the master's mesh address answers it over the VPN.
    let ws = lan.add_bridge(9, &tok);
    // The file is written during a coordinator tick and the status shows that tick's result
    // once the daemon's loop comes round: wait for both, not the file alone.
    lan.wait_cluster("the bridge wrote the kubeconfig", 90, |lan, all| {
        lan.file(ws, "kubeconfig")
            .contains(&format!("server: https://{master_ip}:6443"))
            && all[ws]["cluster"]["ip_master"].as_str() == Some(master_ip.to_string().as_str())
    });
    let bridge_status = lan.status(ws).unwrap();
    assert_eq!(
        address(&bridge_status).as_deref(),
        Some("10.1.0.254"),
        "{bridge_status:#}"
    );
    fs::create_dir_all(lan.nodes[ws].root.join("etc/rancher/k3s")).unwrap();
    fs::copy(
        lan.nodes[ws].root.join("kubeconfig"),
        lan.nodes[ws].root.join("etc/rancher/k3s/k3s.yaml"),
    )
    .unwrap();
    let api = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lan.nodes[ws].ns,
            standin(),
            "kubectl",
            "get",
            "nodes",
        ])
        .env("K3S_STANDIN_ROOT", &lan.nodes[ws].root)
        .output()
        .unwrap();
    let nodes = String::from_utf8_lossy(&api.stdout);
    assert!(
        api.status.success() && nodes.trim().split(',').count() == 2,
        "the workstation's kubectl through the bridge: {nodes}{}",
        String::from_utf8_lossy(&api.stderr)
    );
    let sock = lan.nodes[ws].root.join("run/kairos/p2p.sock");
    let o = Command::new(kairosctl())
        .args(["status", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && text.contains("cluster role       bridge\n")
            && text.contains(&format!("cluster api        https://{master_ip}:6443"))
            && text.contains("vpn                kairos0"),
        "{text}"
    );
    let o = Command::new(kairosctl())
        .args(["role", "list", "--json", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["nodes"].as_array().unwrap().len(), 3, "{list:#}");
    let o = Command::new(kairosctl())
        .args(["get-kubeconfig", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        o.status.success()
            && String::from_utf8_lossy(&o.stdout)
                .contains(&format!("server: https://{master_ip}:6443")),
        "{o:?}"
    );

    // A fourth node, set to master/ha by hand from the workstation before it starts.
    let uuid4 = format!("{:032x}-node4", 0xabc0 + 4);
    let o = Command::new(kairosctl())
        .args(["role", "set", &uuid4, "master/ha", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let (ok, _, err) = lan.agent_cmd(0, &["role", "set", &uuid4, "admin"]);
    assert!(!ok && err.contains("use master"), "{err}");
    let n4 = lan.add(4, "node4", &cluster_cfg(&tok, ""));
    lan.wait_cluster("node4 joined the control plane", 180, |lan, all| {
        role_of(&all[n4]) == Some("master/ha")
            && joined_to(lan, m)
                .iter()
                .any(|(h, r, a)| h == "node4" && r == "server" && a.starts_with("10.1.0."))
    });

    // The master stops: the others say so.
    lan.kill(m);
    let w = (0..3).find(|w| *w != m).unwrap();
    lan.wait_cluster("a worker reports the master gone", 60, |_, all| {
        all[w]["cluster"]["errors"]
            .to_string()
            .contains(&format!("the master at {master_ip} does not answer"))
    });
    let (_, out, _) = lan.agent_cmd(w, &["p2p", "status"]);
    assert!(
        out.contains("not answering: its mesh heartbeat stopped"),
        "{out}"
    );
}

/// `p2p.auto.ha` with `master_nodes: 2`: three nodes make one `master/clusterinit`
/// (`--cluster-init`) and two `master/ha` joining it (`--server`, its token); a fourth node
/// joining later becomes a worker of the complete control plane; the first master killed,
/// another master's API still answers.
#[test]
#[ignore = "needs root: network namespaces and TUN devices"]
fn an_ha_control_plane_of_three() {
    if !root_only() {
        return;
    }
    let tok = token(3600);
    let mut lan = Lan::new("kh");
    let ha = "  auto:\n    ha:\n      enable: true\n      master_nodes: 2\n";
    for i in 1..=3 {
        lan.add(i, &format!("ha{i}"), &cluster_cfg(&tok, ha));
    }
    lan.wait_cluster(
        "one cluster-init master and two HA masters",
        240,
        |lan, all| {
            let Some(m) = all
                .iter()
                .position(|v| role_of(v) == Some("master/clusterinit"))
            else {
                return false;
            };
            let joined = joined_to(lan, m);
            all.iter()
                .filter(|v| role_of(v) == Some("master/ha"))
                .count()
                == 2
                && joined.len() == 2
                && joined.iter().all(|(_, r, _)| r == "server")
        },
    );
    let all: Vec<Value> = (0..3).map(|n| lan.status(n).unwrap()).collect();
    let m = all
        .iter()
        .position(|v| role_of(v) == Some("master/clusterinit"))
        .unwrap();
    let init_ip = address(&all[m]).unwrap();
    assert!(
        lan.file(m, "etc/systemd/system/k3s.service.d/override.conf")
            .contains("server --flannel-iface=edgevpn0 --cluster-init"),
        "{}",
        lan.file(m, "etc/systemd/system/k3s.service.d/override.conf")
    );
    let token = lan.file(m, "var/lib/rancher/k3s/server/node-token");
    for h in (0..3).filter(|h| *h != m) {
        let unit = lan.file(h, "etc/systemd/system/k3s.service.d/override.conf");
        assert!(
            unit.contains(&format!("--server=https://{init_ip}:6443")),
            "{unit}"
        );
        assert!(
            lan.file(h, "etc/sysconfig/k3s")
                .contains(&format!("K3S_TOKEN=\"{}\"", token.trim())),
            "joining masters use the first master's token"
        );
    }

    // A node joining later: the control plane is complete, so a worker.
    lan.add(4, "ha4", &cluster_cfg(&tok, ha));
    lan.wait_cluster("the late node joined as a worker", 180, |lan, all| {
        role_of(&all[3]) == Some("worker")
            && joined_to(lan, m)
                .iter()
                .any(|(h, r, _)| h == "ha4" && r == "agent")
    });

    // The first master killed: another master serves its API.
    lan.kill(m);
    let other = (0..3).find(|h| *h != m).unwrap();
    lan.wait_cluster("another master reports the first gone", 60, |_, all| {
        all[other]["cluster"]["errors"]
            .to_string()
            .contains("does not answer")
    });
    let out = lan.exec(
        other,
        &[
            "env",
            &format!("K3S_STANDIN_ROOT={}", lan.nodes[other].root.display()),
            standin(),
            "kubectl",
            "get",
            "--raw=/readyz",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The QR code `kairos-agent pair` printed (half blocks, light as `█`), as a grey picture a
/// camera would take of the console: 4 pixels a module, the console's dark background
/// around it.
fn console_qr(text: &str) -> (usize, usize, Vec<u8>) {
    let rows: Vec<Vec<char>> = text
        .lines()
        .filter(|l| !l.is_empty() && l.chars().all(|c| " █▀▄".contains(c)))
        .map(|l| l.chars().collect())
        .collect();
    assert!(!rows.is_empty(), "no QR code in {text}");
    let (scale, margin) = (4, 8);
    let cols = rows[0].len();
    let (w, h) = (
        (cols + 2 * margin) * scale,
        (rows.len() * 2 + 2 * margin) * scale,
    );
    let mut img = vec![0u8; w * h];
    for (r, line) in rows.iter().enumerate() {
        for (c, ch) in line.iter().enumerate() {
            let (top, bottom) = match ch {
                '█' => (true, true),
                '▀' => (true, false),
                '▄' => (false, true),
                _ => (false, false),
            };
            for (half, light) in [(0, top), (1, bottom)] {
                if !light {
                    continue;
                }
                let (mx, my) = (c + margin, r * 2 + half + margin);
                for y in my * scale..(my + 1) * scale {
                    for x in mx * scale..(mx + 1) * scale {
                        img[y * w + x] = 230;
                    }
                }
            }
        }
    }
    (w, h, img)
}

/// QR pairing (A.15) between two hosts of a LAN: a node runs `kairos-agent pair`, which
/// prints a QR code; the token read back from that code (as a scanner would) goes to
/// `kairosctl register --config`, and the node ends with the config in
/// /oem/99_pairing.yaml, where its config collection finds it. A config without its
/// header is refused before anything is sent.
#[test]
#[ignore = "needs root: network namespaces"]
fn qr_pairing_sends_a_config() {
    if !root_only() {
        return;
    }
    let lan = Lan::new("pq");
    let (node_ns, ws_ns) = (format!("{}-n1", lan.tag), format!("{}-n2", lan.tag));
    lan.plug(&node_ns, 1);
    lan.plug(&ws_ns, 2);
    // The namespaces go with the LAN (Drop).
    let mut lan = lan;
    for ns in [&node_ns, &ws_ns] {
        lan.nodes.push(Node {
            ns: ns.clone(),
            root: lan.dir.path().join(ns),
            child: None,
            services: Vec::new(),
        });
    }
    let root = lan.dir.path().join("node");
    fs::create_dir_all(root.join("oem")).unwrap();
    let out_path = lan.dir.path().join("pair.out");
    let node = Command::new("ip")
        .args(["netns", "exec", &node_ns, agent(), "--root"])
        .arg(&root)
        .args(["--cmdline", "", "pair", "--timeout", "120"])
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(lan.dir.path().join("pair.err")).unwrap())
        .spawn()
        .unwrap();
    lan.nodes[0].child = Some(node);
    let end = Instant::now() + Duration::from_secs(30);
    let shown = loop {
        let t = fs::read_to_string(&out_path).unwrap_or_default();
        if t.contains("waiting for the config") {
            break t;
        }
        assert!(Instant::now() < end, "no QR code in 30 s: {t}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let (w, h, grey) = console_qr(&shown);
    let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| grey[y * w + x]);
    let grids = img.detect_grids();
    assert_eq!(grids.len(), 1, "the console's QR code is found");
    let (_, token) = grids[0].decode().expect("the console's QR code reads");
    assert!(
        shown.contains(&format!("token: {token}")),
        "the QR code holds the printed token"
    );

    let cc = lan.dir.path().join("cc.yaml");
    fs::write(&cc, "hostname: paired\n").unwrap();
    let o = Command::new(kairosctl())
        .args(["register", "--config"])
        .arg(&cc)
        .arg(&token)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cc.yaml") && err.contains("#cloud-config"),
        "{err}"
    );

    let text = "#cloud-config\nhostname: paired\ninstall:\n  device: /dev/vdb\n";
    fs::write(&cc, text).unwrap();
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ws_ns,
            kairosctl(),
            "register",
            "--timeout",
            "90",
        ])
        .arg("--config")
        .arg(&cc)
        .arg(&token)
        .output()
        .unwrap();
    assert!(
        o.status.success()
            && String::from_utf8_lossy(&o.stdout).contains("the node took the config"),
        "register: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let st = lan.nodes[0].child.as_mut().unwrap().wait().unwrap();
    assert!(
        st.success(),
        "pair: {}",
        fs::read_to_string(lan.dir.path().join("pair.err")).unwrap_or_default()
    );
    let got = root.join("oem/99_pairing.yaml");
    assert_eq!(fs::read_to_string(&got).unwrap(), text);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&got).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let o = Command::new(agent())
        .arg("--root")
        .arg(&root)
        .args(["--cmdline", "", "config", "get", "install.device"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "/dev/vdb");
}
