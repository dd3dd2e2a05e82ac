//! `kairos-agent p2p status`: the daemon's status document rendered for people.

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
    out
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
            "nat": "not probed", "alive": ["12D3KooWme"], "rotation_in_s": 10, "next_rotation": 99
        });
        let t = render_status(&v);
        for want in [
            "connected peers    1: 12D3KooWa",
            "none yet — waiting for another node: DHCP needs 2 alive nodes, 1 seen",
            "10.1.0.2 12D3KooWa (not live)",
            "healthcheck: 12D3KooWme",
            "mdns on, bootstrap peers 0",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
    }
}
