//! **k3s-standin — a stand-in for k3s, written for the tests.** It is not Kubernetes and not
//! a product binary: k3s cannot be fetched on the machines these tests run on, so this
//! program honours the part of k3s' observable contract the Kairos provider relies on, and
//! nothing more:
//!
//! - `k3s server [flags]` / `k3s agent [flags]`, flags as the provider writes them
//!   (`--flag=value` or `--flag value`), `/etc/rancher/k3s/config.yaml` (`token`, `server`,
//!   `node-ip`, flat `key: value` lines) and the `K3S_TOKEN` / `K3S_URL` env;
//! - a server writes the node token (`/var/lib/rancher/k3s/server/node-token`, k3s' format
//!   `K10<hash>::server:<secret>`) and a kubeconfig (`/etc/rancher/k3s/k3s.yaml`, server
//!   `https://127.0.0.1:6443`), and listens on port 6443 of every address;
//! - an agent, and a server started with `--server` (a joining master), "join" by connecting
//!   to the URL's port 6443 and presenting the token: refused with the wrong token, they exit
//!   1 (systemd restarts them, as it restarts k3s);
//! - a server tells systemd it is ready (`READY=1` on `$NOTIFY_SOCKET`: k3s' unit is
//!   `Type=notify`) once it listens;
//! - `k3s kubectl get --raw=/readyz` prints `ok` when the API answers, and
//!   `k3s kubectl get nodes` lists the nodes joined to the server the kubeconfig names.
//!
//! The protocol on port 6443 is this program's own (one text line each way), not the
//! Kubernetes API. Every path is under `K3S_STANDIN_ROOT` (default `/`), so tests can run
//! several nodes on one machine; the server keeps its joined nodes in
//! `/var/lib/rancher/k3s/server/standin-nodes` (one `name role address` line each).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PORT: u16 = 6443;

fn under(p: &str) -> PathBuf {
    let root = std::env::var("K3S_STANDIN_ROOT").unwrap_or_else(|_| "/".into());
    PathBuf::from(root).join(p.trim_start_matches('/'))
}

fn fail(msg: &str) -> ! {
    eprintln!("k3s-standin: {msg}");
    std::process::exit(1)
}

/// Flags of the command line and of config.yaml (the command line wins), by name.
fn options(args: &[String]) -> BTreeMap<String, String> {
    let mut o = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(under("/etc/rancher/k3s/config.yaml")) {
        for l in text.lines() {
            if let Some((k, v)) = l.split_once(':')
                && !k.starts_with([' ', '#', '-'])
            {
                o.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
            }
        }
    }
    let mut i = 0;
    while i < args.len() {
        if let Some(flag) = args[i].strip_prefix("--") {
            match flag.split_once('=') {
                Some((k, v)) => {
                    o.insert(k.into(), v.into());
                }
                None => {
                    let boolean =
                        matches!(flag, "cluster-init" | "with-node-id" | "embedded-registry");
                    if !boolean && i + 1 < args.len() && !args[i + 1].starts_with("--") {
                        o.insert(flag.into(), args[i + 1].clone());
                        i += 1;
                    } else {
                        o.insert(flag.into(), "true".into());
                    }
                }
            }
        }
        i += 1;
    }
    o
}

fn hostname() -> String {
    std::fs::read_to_string(under("/etc/hostname"))
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

/// host:6443 of `https://host:6443`.
fn address_of(url: &str) -> String {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    let host = rest.split('/').next().unwrap_or(rest);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:{PORT}")
    }
}

/// One request line to the server at `addr`, one answer line back.
fn ask(addr: &str, line: &str) -> std::io::Result<String> {
    let sock: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| std::io::Error::other(format!("{addr}: not an address")))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(answer.trim().to_string())
}

fn write(p: &str, text: &str) {
    let path = under(p);
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    if let Err(e) = std::fs::write(&path, text) {
        fail(&format!("writing {}: {e}", path.display()));
    }
}

/// Joins the server at `url` with `token` as `role`; exits 1 when refused.
fn join(url: &str, token: &str, name: &str, role: &str) {
    match ask(&address_of(url), &format!("JOIN {token} {name} {role}")) {
        Ok(a) if a == "OK" => {}
        Ok(a) => fail(&format!("{url} refused to join: {a}")),
        Err(e) => fail(&format!("{url}: {e}")),
    }
}

fn serve(token: String) -> ! {
    let nodes_file = "/var/lib/rancher/k3s/server/standin-nodes";
    let nodes: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let listener = TcpListener::bind(("0.0.0.0", PORT))
        .unwrap_or_else(|e| fail(&format!("listening on port {PORT}: {e}")));
    eprintln!("k3s-standin: server listening on port {PORT}");
    notify_ready();
    for conn in listener.incoming().flatten() {
        let (token, nodes) = (token.clone(), nodes.clone());
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let peer = conn
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let mut line = String::new();
            let mut rd = BufReader::new(conn.try_clone().ok()?.take(4096));
            rd.read_line(&mut line).ok()?;
            let words: Vec<&str> = line.split_whitespace().collect();
            let answer = match words.as_slice() {
                ["JOIN", t, name, role] if *t == token => {
                    let mut n = nodes.lock().ok()?;
                    n.insert(name.to_string(), format!("{name} {role} {peer}"));
                    let text: String = n.values().map(|l| format!("{l}\n")).collect();
                    write(nodes_file, &text);
                    eprintln!("k3s-standin: {name} joined as {role} from {peer}");
                    "OK".to_string()
                }
                ["JOIN", ..] => {
                    eprintln!("k3s-standin: a join from {peer} with a wrong token refused");
                    "DENIED wrong token".to_string()
                }
                ["READYZ"] => "ok".to_string(),
                ["NODES"] => {
                    let n = nodes.lock().ok()?;
                    n.keys().cloned().collect::<Vec<_>>().join(",")
                }
                _ => "DENIED unknown request".to_string(),
            };
            let mut conn = conn;
            conn.write_all(format!("{answer}\n").as_bytes()).ok()
        });
    }
    fail("the listener stopped")
}

/// `sd_notify(READY=1)`, as k3s does when its unit is `Type=notify`.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &a));
    if let Err(e) = sent {
        eprintln!("k3s-standin: telling systemd it is ready ({path}): {e}");
    }
}

fn kubectl(args: &[String]) {
    let cfg = std::fs::read_to_string(under("/etc/rancher/k3s/k3s.yaml"))
        .unwrap_or_else(|e| fail(&format!("no kubeconfig: {e}")));
    let url = cfg
        .lines()
        .find_map(|l| l.trim().strip_prefix("server:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| fail("the kubeconfig names no server"));
    let req = match args {
        [get, raw] if get == "get" && raw == "--raw=/readyz" => "READYZ",
        [get, nodes] if get == "get" && nodes == "nodes" => "NODES",
        _ => fail("the stand-in's kubectl knows `get --raw=/readyz` and `get nodes` only"),
    };
    match ask(&address_of(&url), req) {
        Ok(a) => println!("{a}"),
        Err(e) => fail(&format!("{url}: {e}")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        fail("usage: k3s-standin server|agent [flags] | kubectl get --raw=/readyz|nodes")
    };
    let o = options(&args[1..]);
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let token = env("K3S_TOKEN").or_else(|| o.get("token").cloned());
    let name = hostname();
    match cmd.as_str() {
        "kubectl" => kubectl(&args[1..]),
        "agent" => {
            let url = env("K3S_URL")
                .or_else(|| o.get("server").cloned())
                .unwrap_or_else(|| fail("agent: no K3S_URL or --server"));
            let token = token.unwrap_or_else(|| fail("agent: no K3S_TOKEN or --token"));
            join(&url, &token, &name, "agent");
            write(
                "/var/lib/rancher/k3s/agent/standin-joined",
                &format!(
                    "server={url}\nnode={name}\nnode-ip={}\n",
                    o.get("node-ip").cloned().unwrap_or_default()
                ),
            );
            eprintln!("k3s-standin: agent {name} joined {url}");
            // Stays joined; a server that goes away is noticed, as a kubelet notices it.
            loop {
                std::thread::sleep(Duration::from_secs(5));
                if let Err(e) = ask(&address_of(&url), "READYZ") {
                    eprintln!("k3s-standin: {url} does not answer: {e}");
                }
            }
        }
        "server" => {
            let token = match (o.get("server"), token) {
                (Some(url), Some(t)) => {
                    join(url, &t, &name, "server");
                    t
                }
                (Some(_), None) => fail("server --server: no K3S_TOKEN or --token"),
                (None, Some(t)) => t,
                (None, None) => {
                    let mut b = [0u8; 16];
                    let f = std::fs::File::open("/dev/urandom");
                    let _ = f.and_then(|mut f| f.read_exact(&mut b));
                    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                    format!("K10{}::server:{}", &hex[..16], &hex[16..])
                }
            };
            write(
                "/var/lib/rancher/k3s/server/node-token",
                &format!("{token}\n"),
            );
            write(
                "/etc/rancher/k3s/k3s.yaml",
                &format!(
                    "# written by k3s-standin (a test stand-in for k3s)\napiVersion: v1\nclusters:\n- cluster:\n    server: https://127.0.0.1:{PORT}\n  name: default\ncontexts:\n- context:\n    cluster: default\n    user: default\n  name: default\ncurrent-context: default\nkind: Config\nusers:\n- name: default\n  user:\n    token: standin-{name}\n"
                ),
            );
            serve(token)
        }
        other => fail(&format!(
            "{other}: the stand-in knows server, agent and kubectl"
        )),
    }
}
