//! `kairos-agent p2p status`: the daemon's status document rendered for people; `role
//! list|set` and `get-kubeconfig`: the cluster's part of the ledger, through the daemon.

use std::path::Path;

use kairos_cluster::roles::{self, Role, View};
use kairos_vpn::daemon::{Request, request};

use crate::cli::exit;

use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The status document as text (the same facts as `--json`).
pub fn render_status(v: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, val: String| out.push_str(&format!("{k:<18} {val}\n"));
    line("peer id", s(&v["peer_id"]));
    line("hostname", s(&v["hostname"]));
    line("up", format!("{} s", s(&v["uptime_s"])));
    let list = |x: &Value| {
        x.as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "none".into())
    };
    line("listening on", list(&v["listen"]));
    let peers = v["peers"].as_array().map(Vec::len).unwrap_or(0);
    line("connected peers", format!("{peers}: {}", list(&v["peers"])));
    if let Some(vpn) = v["vpn"].as_object() {
        let addr = match vpn.get("address") {
            Some(Value::String(a)) => format!("{a} ({})", s(&vpn["addressing"])),
            _ => format!(
                "none yet — {}",
                vpn.get("waiting").map(s).unwrap_or_else(|| "-".into())
            ),
        };
        line(
            "vpn",
            format!("{} mtu {}: {addr}", s(&vpn["interface"]), s(&vpn["mtu"])),
        );
        if let Some(r) = vpn.get("route").filter(|r| !r.is_null()) {
            line("route", s(r));
        }
    } else {
        line("vpn", "off (p2p.vpn.create: false)".into());
    }
    if let Some(t) = v["traffic"].as_object() {
        line(
            "traffic",
            format!(
                "out {} packets / {} B, in {} / {} B, no route {}, refused streams {}, dropped {}",
                s(&t["packets_out"]),
                s(&t["bytes_out"]),
                s(&t["packets_in"]),
                s(&t["bytes_in"]),
                s(&t["no_route"]),
                s(&t["refused_streams"]),
                s(&t["dropped"])
            ),
        );
    }
    let machines = v["machines"].as_array().cloned().unwrap_or_default();
    line("machines", machines.len().to_string());
    for m in &machines {
        let mut tags = Vec::new();
        if m["me"] == Value::Bool(true) {
            tags.push("this node");
        }
        if m["live"] != Value::Bool(true) {
            tags.push("not live");
        }
        let tags = if tags.is_empty() {
            String::new()
        } else {
            format!(" ({})", tags.join(", "))
        };
        line("", format!("{} {}{tags}", s(&m["address"]), s(&m["peer"])));
    }
    line(
        "alive nodes",
        v["alive"].as_array().map(Vec::len).unwrap_or(0).to_string(),
    );
    line(
        "ledger",
        format!(
            "block {}, sent {}, unreadable blocks {}",
            s(&v["ledger"]["index"]),
            s(&v["published"]),
            s(&v["unsealable"])
        ),
    );
    line(
        "ledger sync",
        match v["sync"]["mode"].as_str() {
            Some("delta") => format!(
                "deltas between kairos peers (sent {} deltas, {} comparisons; {} blocks exchanged)",
                s(&v["sync"]["deltas"]),
                s(&v["sync"]["comparisons"]),
                s(&v["sync"]["exchanges"])
            ),
            _ => "whole blocks (EdgeVPN's way: a member is not a kairos peer, ownership is off, or no peer yet)".to_string(),
        },
    );
    if let Some(keys) = v["ledger"]["keys"].as_object() {
        for (bucket, ks) in keys {
            line("", format!("{bucket}: {}", list(ks)));
        }
    }
    line(
        "topic rotation",
        format!(
            "in {} s (unix {})",
            s(&v["rotation_in_s"]),
            s(&v["next_rotation"])
        ),
    );
    let d = &v["discovery"];
    line(
        "discovery",
        format!(
            "mdns {}, bootstrap peers {}, dht {}",
            if d["mdns"] == Value::Bool(true) {
                "on"
            } else {
                "off"
            },
            d["bootstrap_peers"].as_array().map(Vec::len).unwrap_or(0),
            s(&d["dht"])
        ),
    );
    line("nat", s(&v["nat"]));
    if let Some(dns) = v["dns"].as_object() {
        line(
            "dns",
            format!("{} for *.{}", s(&dns["listen"]), s(&dns["domain"])),
        );
    }
    render_cluster(&v["cluster"], &mut line);
    out
}

/// The `cluster` section: this node's role, the leader, and what it waits for.
fn render_cluster(c: &Value, line: &mut impl FnMut(&str, String)) {
    if !c.is_object() {
        line(
            "kubernetes",
            "no roles over the mesh (p2p.auto.enable: false)".into(),
        );
        return;
    }
    let role = match (c["role"].as_str(), c["forced"].as_str()) {
        (Some(r), Some(_)) => format!("{r} (p2p.role)"),
        (Some(r), None) => r.to_string(),
        (None, _) => "none yet".to_string(),
    };
    let service = c["service"]
        .as_str()
        .map(|x| format!(", runs {x}"))
        .unwrap_or_default();
    let uuid = c["uuid"]
        .as_str()
        .map(|u| format!(" (uuid {u})"))
        .unwrap_or_default();
    line("cluster role", format!("{role}{service}{uuid}"));
    line(
        "cluster leader",
        format!("{} — {}", s(&c["leader"]), s(&c["election"])),
    );
    if let Some(w) = c["waiting"].as_str() {
        line("cluster waiting", w.to_string());
    }
    for e in c["errors"].as_array().into_iter().flatten() {
        line("cluster error", s(e));
    }
    line(
        "cluster api",
        match c["ip_master"].as_str() {
            Some(ip) => format!("https://{ip}:{}", roles::API_PORT),
            None => "none published yet".into(),
        },
    );
    if let Some(k) = c["kubeconfig"].as_str() {
        line(
            "kubeconfig",
            match c["ip_master"].as_str() {
                Some(_) => k.to_string(),
                None => format!("{k} (written once a master publishes it)"),
            },
        );
    }
    let needed = c["minimum_nodes"]
        .as_u64()
        .map(|n| format!(", needed {n}"))
        .unwrap_or_default();
    line(
        "cluster nodes",
        format!(
            "{} (active {}{needed})",
            c["nodes"].as_array().map(Vec::len).unwrap_or(0),
            s(&c["active_nodes"]),
        ),
    );
    for n in c["nodes"].as_array().into_iter().flatten() {
        let mut tags = Vec::new();
        if n["me"] == Value::Bool(true) {
            tags.push("this node".to_string());
        }
        if n["live"] == Value::Bool(false) {
            tags.push("not answering: its mesh heartbeat stopped".to_string());
        }
        if n["advertising"] == Value::Bool(false) {
            tags.push("gone: no advert for 15 min".to_string());
        }
        let tags = if tags.is_empty() {
            String::new()
        } else {
            format!(" ({})", tags.join(", "))
        };
        line(
            "",
            format!("{} {} {}{tags}", s(&n["uuid"]), s(&n["role"]), s(&n["ip"])),
        );
    }
}

/// The program's name for messages: these commands are `kairos-agent`'s on a node and
/// `kairosctl`'s on a workstation (through `kairosctl bridge`).
fn prog() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .filter(|n| n == "kairosctl")
        .unwrap_or_else(|| "kairos-agent".into())
}

fn no_daemon(socket: &Path, e: &std::io::Error) -> i32 {
    let hint = if prog() == "kairosctl" {
        "is `kairosctl bridge` running? it serves this socket"
    } else {
        "is the p2p service running? `kairos-agent p2p run` starts it by hand"
    };
    eprintln!(
        "{}: no mesh daemon answers on {}: {e} ({hint})",
        prog(),
        socket.display()
    );
    exit::FAILURE
}

/// `kairos-agent p2p status` and `kairosctl status`: the daemon's status document,
/// rendered for people or as JSON.
pub fn status_cmd(socket: &Path, json: bool) -> i32 {
    match kairos_vpn::daemon::read_status(socket) {
        Ok(v) if json => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            0
        }
        Ok(v) => {
            print!("{}", render_status(&v));
            0
        }
        Err(e) => no_daemon(socket, &e),
    }
}

/// The coordination bucket, decoded.
fn view(socket: &Path, bucket: &str) -> std::io::Result<View> {
    let v = request(
        socket,
        &Request::Bucket {
            bucket: bucket.to_string(),
        },
    )?;
    let entries: Vec<(String, String)> = v["entries"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(View::from_bucket(
        entries.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    ))
}

/// `role list`.
pub fn role_list(socket: &Path, bucket: &str, json: bool) -> i32 {
    let v = match view(socket, bucket) {
        Ok(v) => v,
        Err(e) => return no_daemon(socket, &e),
    };
    let now = kairos_sys::time::now_unix();
    let rows: Vec<_> = v
        .adverts
        .iter()
        .map(|(u, t)| {
            serde_json::json!({
                "uuid": u,
                "role": v.roles.get(u).map(|r| r.as_str()),
                "ip": v.ips.get(u).map(|i| i.to_string()),
                "advertised_s_ago": now - t,
                "advertising": t + roles::ADVERT_TTL > now,
            })
        })
        .collect();
    if json {
        let doc = serde_json::json!({
            "network_id": bucket,
            "leader": v.leader,
            "ip_master": v.ip_master.map(|i| i.to_string()),
            "nodes": rows,
        });
        println!("{doc:#}");
        return 0;
    }
    println!(
        "{:<40} {:<20} {:<16} last advert",
        "uuid", "role", "address"
    );
    for r in &rows {
        println!(
            "{:<40} {:<20} {:<16} {} s ago{}",
            s(&r["uuid"]),
            s(&r["role"]),
            s(&r["ip"]),
            s(&r["advertised_s_ago"]),
            if r["advertising"] == Value::Bool(true) {
                ""
            } else {
                " (gone: no advert for 15 min)"
            }
        );
    }
    if let Some(l) = &v.leader {
        println!("leader: {l}");
    }
    0
}

/// `role set`.
pub fn role_set(socket: &Path, bucket: &str, uuid: &str, role: &str) -> i32 {
    let Some(r) = Role::parse(role).filter(|r| r.as_str() == role) else {
        eprintln!(
            "{}: role {role:?}: use master, master/clusterinit, master/ha or worker",
            prog()
        );
        return exit::INVALID;
    };
    if roles::node_uuid(Some(uuid), "", "").is_none() {
        eprintln!(
            "{p}: uuid {uuid:?} is not a node's uuid (see `{p} role list`)",
            p = prog()
        );
        return exit::INVALID;
    }
    let req = Request::Put {
        bucket: bucket.to_string(),
        key: format!("{uuid}-role"),
        value: roles::encode(&Value::String(r.as_str().to_string())),
    };
    match request(socket, &req) {
        Ok(_) => {
            println!("{uuid}: {r}");
            0
        }
        Err(e) => no_daemon(socket, &e),
    }
}

/// `get-kubeconfig`.
pub fn get_kubeconfig(socket: &Path, bucket: &str) -> i32 {
    match view(socket, bucket) {
        Ok(v) => match v.user_kubeconfig() {
            Some(k) => {
                print!("{k}");
                0
            }
            None => {
                eprintln!(
                    "{}: no kubeconfig in the ledger bucket {bucket:?} yet: the first master publishes it once k3s runs (`kairos-agent p2p status` on a node shows who is waiting for what)",
                    prog()
                );
                exit::FAILURE
            }
        },
        Err(e) => no_daemon(socket, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section() {
        let v = serde_json::json!({
            "peer_id": "12D3KooWme", "hostname": "n1", "uptime_s": 5,
            "listen": ["/ip4/10.0.0.1/tcp/4001"], "peers": ["12D3KooWa"],
            "vpn": {"interface": "edgevpn0", "mtu": 1200, "address": null, "waiting": "waiting for another node: DHCP needs 2 alive nodes, 1 seen"},
            "machines": [{"address": "10.1.0.2", "peer": "12D3KooWa", "live": false, "me": false}],
            "ledger": {"index": 3, "keys": {"healthcheck": ["12D3KooWme"]}},
            "discovery": {"mdns": true, "bootstrap_peers": [], "dht": "not available"},
            "nat": "not probed", "alive": ["12D3KooWme"], "rotation_in_s": 10, "next_rotation": 99,
            "cluster": {"uuid": "m1-n1", "role": null, "forced": null, "service": null,
                "leader": "m2-n2", "election": "m2-n2 leads and assigns the roles",
                "waiting": "waiting for nodes: needed 2, available 1", "errors": ["the master at 10.1.0.2 does not answer"],
                "ip_master": "10.1.0.2", "minimum_nodes": 2, "active_nodes": 1,
                "nodes": [{"uuid": "m2-n2", "role": "master", "ip": "10.1.0.2", "live": false, "advertising": true, "me": false}]}
        });
        let t = render_status(&v);
        for want in [
            "connected peers    1: 12D3KooWa",
            "none yet — waiting for another node: DHCP needs 2 alive nodes, 1 seen",
            "10.1.0.2 12D3KooWa (not live)",
            "healthcheck: 12D3KooWme",
            "mdns on, bootstrap peers 0",
            "cluster role       none yet (uuid m1-n1)",
            "cluster leader     m2-n2 — m2-n2 leads and assigns the roles",
            "cluster waiting    waiting for nodes: needed 2, available 1",
            "cluster error      the master at 10.1.0.2 does not answer",
            "cluster api        https://10.1.0.2:6443",
            "m2-n2 master 10.1.0.2 (not answering: its mesh heartbeat stopped)",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
    }
}
