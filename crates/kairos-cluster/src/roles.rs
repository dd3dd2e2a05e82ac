//! Roles over the mesh: provider-kairos' coordination loop (A.14) as pure functions over the
//! ledger bucket `p2p.network_id` (default `kairos`).
//!
//! The bucket holds, under keys `<uuid>-<thing>` (the service client's `Set(thing, uuid, v)`),
//! each node's advert (`<uuid>-uuid`: `{"Time": RFC3339Nano}`), role (`<uuid>-role`) and
//! address (`<uuid>-ip`), and the cluster's `leader-auto`, `ip-master`, `token-nodetoken` and
//! `master-kubeconfig`. Values are encoded as EdgeVPN's HTTP API encodes them: the ledger
//! value is a JSON string holding base64url (padded) of the JSON value ([`encode`],
//! [`decode`]) — so a Go Kairos node reading this bucket understands it.
//!
//! Every 10 s a node:
//! 1. advertises itself ([`advert`]);
//! 2. runs the `auto` role ([`schedule`]): the node the FNV-1a leader function picks among the
//!    nodes advertised in the last 15 min claims `leader-auto`, and the recorded leader assigns
//!    roles — one master (`master/clusterinit` with HA), then `master/ha` one per tick until
//!    `p2p.auto.ha.master_nodes`, the rest `worker`;
//! 3. finds its own role ([`my_role`]): `p2p.role` if forced, else the ledger's once
//!    `p2p.minimum_nodes` nodes are alive;
//! 4. turns the role into what the Kubernetes service needs ([`step`]): the env and args a
//!    role adds (the worker's `K3S_URL`/`K3S_TOKEN`, `--cluster-init`, `--server`, …), or what
//!    it waits for.
//!
//! Choices where provider-kairos is silent or random: the leader makes *itself* the master
//! when it is unassigned and not forced to a role, else the first unassigned node in sorted
//! order (Go picks at random) — so the same ledger gives the same cluster on every node and in
//! every test. Values read from peers are bounded ([`MAX_VALUE`]) and a role, address or token
//! that does not parse is ignored, never passed on to a unit file.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use base64::Engine;
use serde_json::Value as Json;

use crate::single::Extra;

/// How long an advert counts (provider-kairos: 15 min).
pub const ADVERT_TTL: i64 = 15 * 60;
/// How often a node advertises itself (provider-kairos: every 2nd tick of 10 s).
pub const ADVERT_INTERVAL: i64 = 20;
/// The coordination loop's period.
pub const TICK_SECS: u64 = 10;
/// The largest ledger value read from this bucket (a kubeconfig is a few KiB).
pub const MAX_VALUE: usize = 256 << 10;
/// The API port of k3s.
pub const API_PORT: u16 = 6443;

pub const KEY_LEADER: &str = "leader-auto";
pub const KEY_IP_MASTER: &str = "ip-master";
pub const KEY_NODETOKEN: &str = "token-nodetoken";
pub const KEY_KUBECONFIG: &str = "master-kubeconfig";

/// A role in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The single control plane.
    Master,
    /// The first master of an HA control plane (embedded etcd, `--cluster-init`).
    MasterInit,
    /// A master joining the first.
    MasterHa,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::MasterInit => "master/clusterinit",
            Role::MasterHa => "master/ha",
            Role::Worker => "worker",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        // provider-kairos allows a comma-separated list and applies each; one node runs one
        // role here, so the first known one counts.
        s.split(',').find_map(|r| match r.trim() {
            "master" => Some(Role::Master),
            "master/clusterinit" => Some(Role::MasterInit),
            "master/ha" => Some(Role::MasterHa),
            "worker" => Some(Role::Worker),
            _ => None,
        })
    }

    pub fn is_master(self) -> bool {
        self != Role::Worker
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A ledger value as EdgeVPN's API client writes it: a JSON string of base64url (padded) of
/// the JSON of `v`.
pub fn encode(v: &Json) -> String {
    let b = base64::engine::general_purpose::URL_SAFE.encode(v.to_string());
    Json::String(b).to_string()
}

/// base64url, padded or not (Go's client pads; a hand-written value may not).
const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The inverse of [`encode`]; `None` for anything else or anything over [`MAX_VALUE`].
pub fn decode(value_json: &str) -> Option<Json> {
    if value_json.len() > MAX_VALUE {
        return None;
    }
    let Json::String(b) = serde_json::from_str::<Json>(value_json).ok()? else {
        return None;
    };
    let bytes = LENIENT.decode(b).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// `2026-12-02T10:00:00.123456789Z` (Go's RFC3339Nano in UTC) → seconds since the epoch.
pub fn parse_time(s: &str) -> Option<i64> {
    let whole = match (s.find('.'), s.strip_suffix('Z')) {
        (Some(dot), Some(_)) => {
            let frac = &s[dot + 1..s.len() - 1];
            if frac.is_empty() || !frac.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            format!("{}Z", &s[..dot])
        }
        _ => s.to_string(),
    };
    kairos_sys::time::parse_rfc3339(&whole)
}

/// A node's advert: the key and the encoded value.
pub fn advert(uuid: &str, now: i64) -> (String, String) {
    let t = kairos_sys::time::rfc3339(now);
    (
        format!("{uuid}-uuid"),
        encode(&serde_json::json!({ "Time": t })),
    )
}

/// A node's identity in the bucket: provider-kairos' `machine.UUID()`, the env `UUID` or
/// `<machine-id>-<hostname>`. Refused when it could not be a key (empty, whitespace, over
/// 256 bytes).
pub fn node_uuid(env_uuid: Option<&str>, machine_id: &str, hostname: &str) -> Option<String> {
    let id = match env_uuid.filter(|u| !u.is_empty()) {
        Some(u) => u.to_string(),
        None => format!("{}-{}", machine_id.trim(), hostname.trim()),
    };
    valid_uuid(&id).then_some(id)
}

fn valid_uuid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && !id.starts_with('-')
        && id.chars().all(|c| c.is_ascii_graphic())
}

/// What the bucket says, decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// uuid → time of its last advert.
    pub adverts: BTreeMap<String, i64>,
    pub roles: BTreeMap<String, Role>,
    pub ips: BTreeMap<String, Ipv4Addr>,
    pub leader: Option<String>,
    pub ip_master: Option<Ipv4Addr>,
    pub nodetoken: Option<String>,
    /// The first master's k3s.yaml, as written (server `https://127.0.0.1:6443`).
    pub kubeconfig: Option<String>,
}

/// A token that can go into an env file and a URL: printable ASCII, no spaces or quotes.
fn valid_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 4096
        && t.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\' | '$' | '`'))
}

impl View {
    /// From the bucket's `(key, value_json)` pairs; what does not decode is left out.
    pub fn from_bucket<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> View {
        let mut v = View::default();
        for (key, value) in entries {
            let Some(val) = decode(value) else { continue };
            let text = val.as_str();
            match key {
                KEY_LEADER => v.leader = text.filter(|u| valid_uuid(u)).map(str::to_string),
                KEY_IP_MASTER => v.ip_master = text.and_then(|t| t.parse().ok()),
                KEY_NODETOKEN => {
                    v.nodetoken = text
                        .map(str::trim)
                        .filter(|t| valid_token(t))
                        .map(str::to_string)
                }
                KEY_KUBECONFIG => {
                    v.kubeconfig = text.and_then(|t| {
                        let b = LENIENT.decode(t).ok()?;
                        String::from_utf8(b).ok()
                    })
                }
                _ => {
                    let Some((uuid, thing)) = key.rsplit_once('-') else {
                        continue;
                    };
                    if !valid_uuid(uuid) {
                        continue;
                    }
                    match thing {
                        "uuid" => {
                            if let Some(t) =
                                val.get("Time").and_then(Json::as_str).and_then(parse_time)
                            {
                                v.adverts.insert(uuid.to_string(), t);
                            }
                        }
                        "role" => {
                            if let Some(r) = text.and_then(Role::parse) {
                                v.roles.insert(uuid.to_string(), r);
                            }
                        }
                        "ip" => {
                            if let Some(ip) = text.and_then(|t| t.parse().ok()) {
                                v.ips.insert(uuid.to_string(), ip);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        v
    }

    /// The nodes advertised in the last [`ADVERT_TTL`], sorted.
    pub fn advertising(&self, now: i64) -> Vec<String> {
        self.adverts
            .iter()
            .filter(|(_, t)| **t + ADVERT_TTL > now)
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// The kubeconfig for users: the first master's, its `127.0.0.1` replaced by `ip-master`
    /// (as `kairos get-kubeconfig` does).
    pub fn user_kubeconfig(&self) -> Option<String> {
        let k = self.kubeconfig.as_ref()?;
        Some(match self.ip_master {
            Some(ip) => k.replace("127.0.0.1", &ip.to_string()),
            None => k.clone(),
        })
    }
}

/// What a node's config says about roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// This node's uuid.
    pub me: String,
    /// `p2p.role` (master or worker) if set by hand.
    pub forced: Option<Role>,
    /// `p2p.minimum_nodes` (default 2).
    pub minimum_nodes: usize,
    /// `p2p.auto.enable` (default true): this node takes part in the election and, as
    /// leader, assigns roles (false: provider-kairos runs the blocks as a single node).
    pub auto: bool,
    /// `p2p.auto.ha`: `Some(master_nodes)` when enabled (the number of `master/ha` nodes
    /// besides the cluster-init one).
    pub ha_masters: Option<usize>,
    /// `p2p.auto.ha.external_db`.
    pub external_db: Option<String>,
    /// `kubevip.eip` when kube-vip is enabled.
    pub vip: Option<Ipv4Addr>,
    /// The `kubevip:` block when enabled (a master writes its manifests).
    pub kube_vip: Option<crate::kubevip::Spec>,
    /// Why the `kubevip:` block could not be used (shown in `p2p status`; no VIP then).
    pub kube_vip_error: Option<String>,
    /// The VPN interface (`edgevpn0`) when Kubernetes uses the VPN.
    pub iface: Option<String>,
}

impl Settings {
    /// From the config's `p2p:` and `kubevip:` sections.
    pub fn new(
        p2p: &kairos_config::types::P2p,
        kubevip: Option<&kairos_config::types::KubeVip>,
        me: String,
    ) -> Settings {
        use kairos_config::types::P2pRole;
        let forced = match p2p.forced_role() {
            Some(P2pRole::Master) => Some(Role::Master),
            Some(P2pRole::Worker) => Some(Role::Worker),
            _ => None,
        };
        let auto = p2p
            .auto
            .as_ref()
            .and_then(|a| a.enable.as_ref())
            .is_none_or(|e| e.0);
        let ha = p2p.auto.as_ref().and_then(|a| a.ha.as_ref());
        let ha_masters = ha
            .filter(|h| h.enable.0 || h.master_nodes.is_some())
            .map(|h| h.master_nodes.unwrap_or(0) as usize);
        let external_db = ha
            .and_then(|h| h.external_db.clone())
            .filter(|d| !d.is_empty());
        let (kube_vip, kube_vip_error) = match kubevip.map(crate::kubevip::Spec::from_config) {
            None | Some(Ok(None)) => (None, None),
            Some(Ok(Some(k))) => (Some(k), None),
            Some(Err(e)) => (None, Some(e.to_string())),
        };
        let vip = kube_vip.as_ref().map(|k| k.vip);
        let vpn = p2p.vpn.as_ref();
        let uses_vpn = vpn.and_then(|v| v.create.as_ref()).is_none_or(|c| c.0)
            && vpn.and_then(|v| v.use_.as_ref()).is_none_or(|u| u.0);
        let iface = uses_vpn.then(|| {
            vpn.and_then(|v| v.interface.clone())
                .unwrap_or_else(|| "edgevpn0".to_string())
        });
        Settings {
            me,
            forced,
            minimum_nodes: p2p.minimum_nodes.unwrap_or(2).max(1) as usize,
            auto,
            ha_masters,
            external_db,
            vip,
            kube_vip,
            kube_vip_error,
            iface,
        }
    }

    fn master_role(&self) -> Role {
        if self.ha_masters.is_some() {
            Role::MasterInit
        } else {
            Role::Master
        }
    }
}

/// One tick of the `auto` role: the ledger writes (`(key, encoded value)`) and what the
/// election is doing, for `p2p status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    pub writes: Vec<(String, String)>,
    pub note: String,
}

/// The `auto` role at `now` on `view` (A.14.3).
pub fn schedule(view: &View, s: &Settings, now: i64) -> Schedule {
    let mut out = Schedule::default();
    let advertising = view.advertising(now);
    if advertising.len() < s.minimum_nodes {
        out.note = format!(
            "waiting for nodes: needed {}, available {} ({})",
            s.minimum_nodes,
            advertising.len(),
            if advertising.is_empty() {
                "none advertised in the last 15 min".to_string()
            } else {
                advertising.join(", ")
            }
        );
        return out;
    }
    let should = kairos_mesh::leader::leader(&advertising).unwrap_or_default();
    let lead = view.leader.as_deref();
    let me = s.me.as_str();
    if should == me && lead.is_none_or(|l| !advertising.iter().any(|a| a == l)) {
        out.writes.push((
            KEY_LEADER.to_string(),
            encode(&Json::String(me.to_string())),
        ));
        out.note = "claiming the leadership (the leader function picks this node)".into();
        return out;
    }
    if lead != Some(me) {
        out.note = match lead {
            Some(l) => format!("{l} leads and assigns the roles"),
            None => format!("waiting for {should} to claim the leadership"),
        };
        return out;
    }
    // I lead: assign.
    let mut roles: BTreeMap<&str, Role> = advertising
        .iter()
        .filter_map(|u| Some((u.as_str(), *view.roles.get(u)?)))
        .collect();
    let mut unassigned: Vec<&str> = advertising
        .iter()
        .map(String::as_str)
        .filter(|u| !roles.contains_key(u))
        .collect();
    let set = |out: &mut Schedule, u: &str, r: Role| {
        out.writes.push((
            format!("{u}-role"),
            encode(&Json::String(r.as_str().into())),
        ));
    };
    let master = s.master_role();
    let has_master = roles.values().any(|r| *r == master);
    if !has_master && !unassigned.is_empty() {
        let pick = if s.forced.is_none() && unassigned.contains(&me) {
            me
        } else {
            match unassigned.iter().find(|u| **u != me || s.forced.is_none()) {
                Some(u) => *u,
                None => unassigned[0],
            }
        };
        set(&mut out, pick, master);
        roles.insert(pick, master);
        unassigned.retain(|u| *u != pick);
        out.note = format!("leading: {pick} is the {master}");
    } else if !has_master {
        out.note = format!("leading: no node is free to be the {master}");
    } else {
        out.note = "leading: roles assigned".into();
    }
    if let Some(want) = s.ha_masters {
        let have = roles.values().filter(|r| **r == Role::MasterHa).count();
        if have < want {
            match unassigned.first() {
                Some(u) => {
                    set(&mut out, u, Role::MasterHa);
                    out.note = format!(
                        "leading: {u} joins the control plane ({}/{want} HA masters)",
                        have + 1
                    );
                }
                None => {
                    out.note = format!(
                        "not enough nodes to create HA control plane: {have} of {want} master/ha nodes and no unassigned node"
                    );
                }
            }
            // One HA master per tick; workers wait until the control plane is complete.
            return out;
        }
    }
    for u in unassigned {
        set(&mut out, u, Role::Worker);
    }
    out
}

/// This node's role, or why it has none yet.
pub fn my_role(view: &View, s: &Settings, active_nodes: usize) -> Result<Role, String> {
    if let Some(r) = s.forced {
        return Ok(r);
    }
    if active_nodes < s.minimum_nodes {
        return Err(format!(
            "waiting for nodes: needed {}, available {active_nodes}",
            s.minimum_nodes
        ));
    }
    match view.roles.get(&s.me) {
        Some(r) => Ok(*r),
        None if !s.auto => Err(
            "no role: p2p.auto.enable is false and no role is set (kairos-agent role set)".into(),
        ),
        None => Err(match &view.leader {
            Some(l) => format!("waiting for the leader {l} to assign a role"),
            None => "waiting for a leader to be elected".into(),
        }),
    }
}

/// What a role needs from the Kubernetes service now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Configure and run the server (`master` roles) or the agent (`worker`) with `extra`;
    /// `publish_ip` is the address this node announces as `<uuid>-ip` (and, for the first
    /// master, as `ip-master`).
    Run {
        role: Role,
        extra: Extra,
        publish_ip: Ipv4Addr,
    },
    /// Not yet, and why.
    Wait(String),
}

/// The role `role` on this node (A.14.4, A.14.5), given its VPN address.
pub fn step(view: &View, s: &Settings, role: Role, vpn_ip: Option<Ipv4Addr>) -> Step {
    let Some(my_ip) = vpn_ip else {
        return Step::Wait("waiting for a VPN address".into());
    };
    let mut extra = Extra::default();
    let flannel = |extra: &mut Extra| {
        if let Some(i) = &s.iface {
            extra.args.push(format!("--flannel-iface={i}"));
        }
    };
    let joined = || match (view.ip_master, &view.nodetoken) {
        (Some(ip), Some(t)) => Ok((ip, t.clone())),
        (None, None) => Err("waiting for the master's address and token in the ledger"),
        (None, Some(_)) => Err("waiting for the master's address (ip-master) in the ledger"),
        (Some(_), None) => Err("waiting for the master's token (token-nodetoken) in the ledger"),
    };
    match role {
        Role::Worker => {
            let (ip, token) = match joined() {
                Ok(j) => j,
                Err(why) => return Step::Wait(why.into()),
            };
            extra
                .env
                .insert("K3S_URL".into(), format!("https://{ip}:{API_PORT}"));
            extra.env.insert("K3S_TOKEN".into(), token);
            extra.args.push("--with-node-id".into());
            extra.args.push(format!("--node-ip={my_ip}"));
            flannel(&mut extra);
            Step::Run {
                role,
                extra,
                publish_ip: my_ip,
            }
        }
        Role::Master | Role::MasterInit | Role::MasterHa => {
            let ip = s.vip.unwrap_or(my_ip);
            flannel(&mut extra);
            if s.vip.is_some() {
                extra.args.push(format!("--tls-san={ip}"));
                extra.args.push(format!("--node-ip={my_ip}"));
            }
            if let Some(db) = &s.external_db {
                extra.args = vec![format!("--datastore-endpoint={db}")];
            }
            if role == Role::MasterHa {
                let (ipm, token) = match joined() {
                    Ok(j) => j,
                    Err(why) => return Step::Wait(why.into()),
                };
                extra.env.insert("K3S_TOKEN".into(), token);
                extra
                    .args
                    .push(format!("--server=https://{ipm}:{API_PORT}"));
            } else if role == Role::MasterInit && s.external_db.is_none() {
                extra.args.push("--cluster-init".into());
            }
            Step::Run {
                role,
                extra,
                publish_ip: ip,
            }
        }
    }
}

/// What a running master publishes (A.14.4 step 9): its role and, unless it joins another
/// master, the node token, the kubeconfig and its address as the cluster's.
pub fn publish_master(
    s: &Settings,
    role: Role,
    ip: Ipv4Addr,
    nodetoken: &str,
    kubeconfig: &str,
) -> Vec<(String, String)> {
    let mut w = vec![
        (
            format!("{}-role", s.me),
            encode(&Json::String(role.as_str().into())),
        ),
        (
            format!("{}-ip", s.me),
            encode(&Json::String(ip.to_string())),
        ),
    ];
    if role != Role::MasterHa {
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kubeconfig);
        w.push((
            KEY_NODETOKEN.into(),
            encode(&Json::String(nodetoken.trim().into())),
        ));
        w.push((KEY_KUBECONFIG.into(), encode(&Json::String(k))));
        w.push((KEY_IP_MASTER.into(), encode(&Json::String(ip.to_string()))));
    }
    w
}

/// What a node publishes for itself while it runs `role` (its address; its role when forced
/// by hand, so the others see it).
pub fn publish_self(s: &Settings, role: Role, ip: Ipv4Addr) -> Vec<(String, String)> {
    let mut w = vec![(
        format!("{}-ip", s.me),
        encode(&Json::String(ip.to_string())),
    )];
    if s.forced == Some(role) {
        w.push((
            format!("{}-role", s.me),
            encode(&Json::String(role.as_str().into())),
        ));
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn settings(me: &str) -> Settings {
        Settings {
            me: me.into(),
            forced: None,
            minimum_nodes: 2,
            auto: true,
            ha_masters: None,
            external_db: None,
            vip: None,
            kube_vip: None,
            kube_vip_error: None,
            iface: Some("edgevpn0".into()),
        }
    }

    /// A bucket with these nodes advertised `age` seconds ago.
    fn bucket(nodes: &[(&str, i64)]) -> BTreeMap<String, String> {
        nodes.iter().map(|(u, age)| advert(u, NOW - age)).collect()
    }

    fn view(b: &BTreeMap<String, String>) -> View {
        View::from_bucket(b.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// Runs every node's `auto` role, tick after tick, applying their writes, until nothing
    /// changes; returns the roles.
    fn converge(b: &mut BTreeMap<String, String>, nodes: &[Settings]) -> BTreeMap<String, Role> {
        for _ in 0..20 {
            let before = b.clone();
            for s in nodes {
                for (k, v) in schedule(&view(b), s, NOW).writes {
                    b.insert(k, v);
                }
            }
            if *b == before {
                break;
            }
        }
        view(b).roles
    }

    #[test]
    fn values_are_edgevpn_api_encoded() {
        let v = encode(&Json::String("worker".into()));
        // base64url("\"worker\"") = ondvcmtlciI= , in a JSON string.
        assert_eq!(v, "\"IndvcmtlciI=\"");
        assert_eq!(decode(&v), Some(Json::String("worker".into())));
        // Unpadded is accepted too; garbage and oversize are not.
        assert_eq!(
            decode("\"IndvcmtlciI\""),
            Some(Json::String("worker".into()))
        );
        assert_eq!(decode("\"!!\""), None);
        assert_eq!(decode("42"), None);
        let big = format!("\"{}\"", "A".repeat(MAX_VALUE));
        assert_eq!(decode(&big), None);
        let (k, a) = advert("n1", 0);
        assert_eq!(k, "n1-uuid");
        assert_eq!(decode(&a).unwrap()["Time"], "1970-01-01T00:00:00Z");
        assert_eq!(
            parse_time("2026-12-02T10:00:00.123456789Z"),
            parse_time("2026-12-02T10:00:00Z")
        );
        assert_eq!(parse_time("2026-12-02T10:00:00.Z"), None);
    }

    #[test]
    fn uuid_is_machine_id_and_hostname() {
        assert_eq!(node_uuid(None, "abc\n", "node1"), Some("abc-node1".into()));
        assert_eq!(node_uuid(Some("u1"), "abc", "node1"), Some("u1".into()));
        assert_eq!(node_uuid(Some("has space"), "abc", "n"), None);
        assert_eq!(node_uuid(None, "", ""), None);
    }

    #[test]
    fn hostile_values_are_ignored() {
        let mut b = bucket(&[("a", 0)]);
        b.insert("a-role".into(), encode(&Json::String("admin".into())));
        b.insert(
            "b-ip".into(),
            encode(&Json::String("10.1.0.2; rm -rf /".into())),
        );
        b.insert(
            KEY_NODETOKEN.into(),
            encode(&Json::String("tok\"\nExecStart=/bin/sh".into())),
        );
        b.insert(KEY_IP_MASTER.into(), encode(&Json::String("::1".into())));
        b.insert(
            "c-uuid".into(),
            encode(&serde_json::json!({"Time": "yesterday"})),
        );
        let v = view(&b);
        assert!(v.roles.is_empty() && v.ips.is_empty());
        assert_eq!(v.nodetoken, None);
        assert_eq!(v.ip_master, None);
        assert_eq!(v.adverts.len(), 1);
    }

    #[test]
    fn three_auto_nodes_elect_one_master_and_two_workers() {
        let names = ["n1", "n2", "n3"];
        let mut b = bucket(&[("n1", 0), ("n2", 5), ("n3", 10)]);
        let nodes: Vec<Settings> = names.iter().map(|n| settings(n)).collect();
        let roles = converge(&mut b, &nodes);
        let leader = kairos_mesh::leader::leader(&names).unwrap();
        assert_eq!(view(&b).leader.as_deref(), Some(leader));
        assert_eq!(roles.len(), 3);
        // The leader is the master (deterministic choice), the others workers.
        assert_eq!(roles[leader], Role::Master);
        assert_eq!(roles.values().filter(|r| **r == Role::Worker).count(), 2);
        for n in &nodes {
            assert_eq!(my_role(&view(&b), n, 3), Ok(roles[&n.me]));
        }
    }

    #[test]
    fn too_few_nodes_wait_and_say_so() {
        let b = bucket(&[("n1", 0), ("n2", ADVERT_TTL + 1)]);
        let s = schedule(&view(&b), &settings("n1"), NOW);
        assert!(s.writes.is_empty());
        assert_eq!(s.note, "waiting for nodes: needed 2, available 1 (n1)");
        assert_eq!(
            my_role(&view(&b), &settings("n1"), 1),
            Err("waiting for nodes: needed 2, available 1".into())
        );
    }

    #[test]
    fn ties_and_order_do_not_matter() {
        // Every node computes the same leader whatever order it sees the adverts in.
        let names = ["x", "y", "z", "w"];
        let mut b = bucket(&[("x", 0), ("y", 0), ("z", 0), ("w", 0)]);
        let mut nodes: Vec<Settings> = names.iter().map(|n| settings(n)).collect();
        nodes.reverse();
        let roles = converge(&mut b, &nodes);
        let masters: Vec<_> = roles.iter().filter(|(_, r)| r.is_master()).collect();
        assert_eq!(masters.len(), 1);
        assert_eq!(masters[0].0, kairos_mesh::leader::leader(&names).unwrap());
    }

    #[test]
    fn a_master_that_disappears_is_replaced_by_an_unassigned_node() {
        let mut b = bucket(&[("a", 0), ("b", 0)]);
        let nodes = [settings("a"), settings("b")];
        let roles = converge(&mut b, &nodes);
        let master = roles.iter().find(|(_, r)| r.is_master()).unwrap().0.clone();
        let other = if master == "a" { "b" } else { "a" };
        // The master's adverts stop; a new node arrives.
        b.insert(
            advert(&master, NOW - ADVERT_TTL - 1).0,
            advert(&master, NOW - ADVERT_TTL - 1).1,
        );
        let (k, v) = advert("c", NOW);
        b.insert(k, v);
        let nodes = [settings(other), settings("c")];
        let roles = converge(&mut b, &nodes);
        let live_masters: Vec<_> = roles
            .iter()
            .filter(|(u, r)| r.is_master() && **u != master)
            .collect();
        assert_eq!(live_masters.len(), 1, "{roles:?}");
        assert_eq!(
            live_masters[0].0, "c",
            "the worker keeps its role; the free node masters"
        );
    }

    #[test]
    fn two_masters_by_hand_are_both_masters() {
        let mut b = bucket(&[("a", 0), ("b", 0), ("c", 0)]);
        let mut a = settings("a");
        a.forced = Some(Role::Master);
        let mut c = settings("c");
        c.forced = Some(Role::Master);
        // The forced nodes publish their role as they run it.
        for s in [&a, &c] {
            for (k, v) in publish_self(s, Role::Master, Ipv4Addr::new(10, 1, 0, 9)) {
                b.insert(k, v);
            }
        }
        let roles = converge(&mut b, &[a.clone(), settings("b"), c.clone()]);
        assert_eq!(roles["a"], Role::Master);
        assert_eq!(roles["c"], Role::Master);
        assert_eq!(roles["b"], Role::Worker);
        assert_eq!(
            my_role(&view(&b), &a, 0),
            Ok(Role::Master),
            "forced: no node count"
        );
    }

    #[test]
    fn forced_leader_does_not_master_itself() {
        let names = ["n1", "n2", "n3"];
        let leader = kairos_mesh::leader::leader(&names).unwrap().to_string();
        let mut b = bucket(&[("n1", 0), ("n2", 0), ("n3", 0)]);
        let nodes: Vec<Settings> = names
            .iter()
            .map(|n| {
                let mut s = settings(n);
                if *n == leader {
                    s.forced = Some(Role::Worker);
                }
                s
            })
            .collect();
        let roles = converge(&mut b, &nodes);
        let master = roles.iter().find(|(_, r)| r.is_master()).unwrap().0;
        assert_ne!(*master, leader);
    }

    #[test]
    fn ha_assigns_one_init_master_and_the_count_of_ha_masters() {
        let names = ["h1", "h2", "h3", "h4"];
        let mut b = bucket(&[("h1", 0), ("h2", 0), ("h3", 0), ("h4", 0)]);
        let nodes: Vec<Settings> = names
            .iter()
            .map(|n| Settings {
                ha_masters: Some(2),
                ..settings(n)
            })
            .collect();
        let roles = converge(&mut b, &nodes);
        let count = |r: Role| roles.values().filter(|x| **x == r).count();
        assert_eq!(count(Role::MasterInit), 1);
        assert_eq!(count(Role::MasterHa), 2);
        assert_eq!(count(Role::Worker), 1);

        // Two nodes cannot give two HA masters: said so, no workers assigned.
        let mut b = bucket(&[("h1", 0), ("h2", 0)]);
        let nodes: Vec<Settings> = ["h1", "h2"]
            .iter()
            .map(|n| Settings {
                ha_masters: Some(2),
                ..settings(n)
            })
            .collect();
        converge(&mut b, &nodes);
        let leader = view(&b).leader.unwrap();
        let s = schedule(
            &view(&b),
            nodes.iter().find(|n| n.me == leader).unwrap(),
            NOW,
        );
        assert!(
            s.note
                .starts_with("not enough nodes to create HA control plane"),
            "{}",
            s.note
        );
    }

    #[test]
    fn worker_joins_the_published_master() {
        let s = settings("w");
        let mut b = bucket(&[("w", 0)]);
        let ip = Ipv4Addr::new(10, 1, 0, 5);
        assert_eq!(
            step(&view(&b), &s, Role::Worker, Some(ip)),
            Step::Wait("waiting for the master's address and token in the ledger".into())
        );
        assert_eq!(
            step(&view(&b), &s, Role::Worker, None),
            Step::Wait("waiting for a VPN address".into())
        );
        let m = settings("m");
        for (k, v) in publish_master(
            &m,
            Role::Master,
            Ipv4Addr::new(10, 1, 0, 1),
            "K10abc::server:xyz\n",
            "server: https://127.0.0.1:6443\n",
        ) {
            b.insert(k, v);
        }
        let v = view(&b);
        assert_eq!(v.roles["m"], Role::Master);
        assert_eq!(
            v.user_kubeconfig().unwrap(),
            "server: https://10.1.0.1:6443\n"
        );
        let Step::Run {
            extra, publish_ip, ..
        } = step(&v, &s, Role::Worker, Some(ip))
        else {
            panic!()
        };
        assert_eq!(publish_ip, ip);
        assert_eq!(extra.env["K3S_URL"], "https://10.1.0.1:6443");
        assert_eq!(extra.env["K3S_TOKEN"], "K10abc::server:xyz");
        assert_eq!(
            extra.args,
            [
                "--with-node-id",
                "--node-ip=10.1.0.5",
                "--flannel-iface=edgevpn0"
            ]
        );
    }

    #[test]
    fn master_args_per_role() {
        let ip = Some(Ipv4Addr::new(10, 1, 0, 1));
        let v = View::default();
        let args = |s: &Settings, r: Role, v: &View| match step(v, s, r, ip) {
            Step::Run { extra, .. } => extra.args,
            Step::Wait(w) => vec![w],
        };
        let s = settings("m");
        assert_eq!(args(&s, Role::Master, &v), ["--flannel-iface=edgevpn0"]);
        assert_eq!(
            args(&s, Role::MasterInit, &v),
            ["--flannel-iface=edgevpn0", "--cluster-init"]
        );
        assert_eq!(
            args(&s, Role::MasterHa, &v),
            ["waiting for the master's address and token in the ledger"]
        );
        let mut b = BTreeMap::new();
        for (k, val) in publish_master(
            &settings("m0"),
            Role::MasterInit,
            Ipv4Addr::new(10, 1, 0, 7),
            "tok",
            "k",
        ) {
            b.insert(k, val);
        }
        let v2 = view(&b);
        assert_eq!(
            args(&s, Role::MasterHa, &v2),
            ["--flannel-iface=edgevpn0", "--server=https://10.1.0.7:6443"]
        );
        let kv = Settings {
            vip: Some(Ipv4Addr::new(192, 168, 1, 200)),
            ..settings("m")
        };
        assert_eq!(
            args(&kv, Role::Master, &v),
            [
                "--flannel-iface=edgevpn0",
                "--tls-san=192.168.1.200",
                "--node-ip=10.1.0.1"
            ]
        );
        let Step::Run { publish_ip, .. } = step(&v, &kv, Role::Master, ip) else {
            panic!()
        };
        assert_eq!(
            publish_ip,
            Ipv4Addr::new(192, 168, 1, 200),
            "the VIP is the API address"
        );
        let db = Settings {
            external_db: Some("postgres://db".into()),
            ha_masters: Some(1),
            ..settings("m")
        };
        assert_eq!(
            args(&db, Role::MasterInit, &v),
            ["--datastore-endpoint=postgres://db"]
        );
    }

    #[test]
    fn settings_from_a_cloud_config() {
        let yaml = "p2p:\n  network_token: x\n  role: worker\n  minimum_nodes: 3\n  auto:\n    ha:\n      master_nodes: 2\nkubevip:\n  eip: 10.0.0.9\n";
        let v = kairos_config::yaml::parse(yaml, &std::sync::Arc::from("t.yaml"))
            .unwrap()
            .to_json();
        let cfg: kairos_config::types::Config = serde_json::from_value(v).unwrap();
        let s = Settings::new(&cfg.p2p.unwrap(), cfg.kubevip.as_ref(), "me".into());
        assert_eq!(s.forced, Some(Role::Worker));
        assert_eq!(s.minimum_nodes, 3);
        assert_eq!(s.ha_masters, Some(2));
        assert_eq!(s.vip, Some(Ipv4Addr::new(10, 0, 0, 9)));
        assert_eq!(s.iface.as_deref(), Some("edgevpn0"));
        assert!(s.auto);
    }
}
