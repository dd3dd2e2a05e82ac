//! The node's Kubernetes role over the mesh, run inside `kairos-agent p2p run`: the daemon
//! calls [`MeshCluster::tick`] every 10 s and when the coordination bucket changes; the
//! decisions are `kairos_cluster::roles` (pure), this module carries them out beneath the
//! root — the role's plan written with `kubernetes apply`'s writer, the service (re)started
//! when its plan changed, and what a running master publishes read from the files k3s
//! writes (`/var/lib/rancher/k3s/server/node-token`, `/etc/rancher/k3s/k3s.yaml`).

use std::net::Ipv4Addr;

use kairos_cluster::roles::{self, Role, Step, View};
use kairos_cluster::single::{self, Blocks, Kind, Plan};
use kairos_sys::Root;
use kairos_vpn::daemon::{Coordinator, TickInput, TickOutput};
use serde_json::json;

/// Where k3s writes what a master publishes.
pub const K3S_NODE_TOKEN: &str = "var/lib/rancher/k3s/server/node-token";
pub const K3S_KUBECONFIG: &str = "etc/rancher/k3s/k3s.yaml";
/// The most read of either (a kubeconfig is a few KiB).
const MAX_FILE: u64 = 256 << 10;

/// The service a role runs: the k3s server or agent (k0s' when a k0s block is enabled).
pub fn kind_for(role: Role, blocks: &Blocks) -> Kind {
    let k0s = blocks.enabled().is_some_and(|k| k.distro() == "k0s");
    match (role.is_master(), k0s) {
        (true, false) => Kind::K3sServer,
        (false, false) => Kind::K3sAgent,
        (true, true) => Kind::K0sController,
        (false, true) => Kind::K0sWorker,
    }
}

/// The coordinator of `p2p run`.
pub struct MeshCluster {
    pub root: Root,
    pub blocks: Blocks,
    pub settings: roles::Settings,
    pub bucket: String,
    last_advert: i64,
    applied: Option<Plan>,
    /// The interface kube-vip announces on, once chosen (`kubevip.interface`, else guessed
    /// once: a guess made again at every tick could change and restart k3s).
    kube_vip_iface: Option<String>,
}

impl MeshCluster {
    pub fn new(root: Root, blocks: Blocks, settings: roles::Settings, bucket: String) -> Self {
        MeshCluster {
            root,
            blocks,
            settings,
            bucket,
            last_advert: i64::MIN / 2,
            applied: None,
            kube_vip_iface: None,
        }
    }

    fn kube_vip_iface(&mut self) -> String {
        let configured = self
            .settings
            .kube_vip
            .as_ref()
            .and_then(|k| k.interface.clone());
        self.kube_vip_iface
            .get_or_insert_with(|| configured.unwrap_or_else(default_interface))
            .clone()
    }

    fn read_small(&self, p: &str) -> Option<String> {
        let m = self.root.metadata(p).ok()?;
        if m.size > MAX_FILE {
            return None;
        }
        String::from_utf8(self.root.read(p).ok()?).ok()
    }

    /// The role's plan with kube-vip's files (a master's) or their removal, applied.
    fn apply_role(&mut self, mut plan: Plan, role: Role) -> Result<bool, Vec<String>> {
        let iface = self.kube_vip_iface();
        with_kube_vip(&mut plan, &self.settings, role, &iface);
        self.apply(plan)
    }

    /// Writes the plan and (re)starts its service when it differs from the last applied.
    fn apply(&mut self, plan: Plan) -> Result<bool, Vec<String>> {
        if self.applied.as_ref() == Some(&plan) {
            return Ok(false);
        }
        let sm = crate::kubernetes::service_manager(&self.root).ok_or_else(|| {
            vec![format!(
                "no systemd or OpenRC in {}: Kubernetes services need one of them",
                self.root.path().display()
            )]
        })?;
        let mut errors = crate::kubernetes::write(&self.root, &plan);
        if errors.is_empty() {
            errors = crate::kubernetes::services(&self.root, &plan, sm, true);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        self.applied = Some(plan);
        Ok(true)
    }
}

impl Coordinator for MeshCluster {
    fn bucket(&self) -> String {
        self.bucket.clone()
    }

    fn tick(&mut self, input: TickInput) -> TickOutput {
        let s = &self.settings.clone();
        let mut view =
            View::from_bucket(input.entries.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut writes = Vec::new();
        if input.now - self.last_advert >= roles::ADVERT_INTERVAL {
            writes.push(roles::advert(&s.me, input.now));
            self.last_advert = input.now;
        }
        // This node counts as advertised from its first tick (its write is on its way).
        view.adverts.insert(s.me.clone(), self.last_advert);
        let sched = if s.auto {
            roles::schedule(&view, s, input.now)
        } else {
            roles::Schedule::default()
        };
        writes.extend(sched.writes.iter().cloned());
        // The leader's own assignments count at once for itself.
        for (k, v) in &sched.writes {
            if let (Some(u), Some(r)) = (
                k.strip_suffix("-role"),
                roles::decode(v).and_then(|r| r.as_str().and_then(Role::parse)),
            ) {
                view.roles.insert(u.to_string(), r);
            }
        }
        let mut waiting = None;
        let mut errors: Vec<String> = Vec::new();
        let mut service = None;
        let role = roles::my_role(&view, s, input.active_nodes.max(1));
        if let Err(w) = &role {
            waiting = Some(w.clone());
        }
        if let Ok(role) = role {
            match roles::step(&view, s, role, input.vpn_ip) {
                Step::Wait(w) => waiting = Some(w),
                Step::Run {
                    role,
                    extra,
                    publish_ip,
                } => {
                    let kind = kind_for(role, &self.blocks);
                    service = Some(kind.service());
                    if kind.distro() == "k0s" {
                        errors.push(format!(
                            "the `{}:` block is enabled: k0s roles over the mesh (k0s tokens) are not built yet; use k3s, or set p2p.auto.enable: false to run k0s as a single node",
                            kind.key()
                        ));
                    } else if !self.root.exists(kind.binary().trim_start_matches('/')) {
                        errors.push(format!(
                            "the role {role} runs {} but {} is not in the image; build it with `kairosctl kairosify --{} PATH`",
                            kind.service(),
                            kind.binary(),
                            kind.distro()
                        ));
                    } else {
                        let sm = crate::kubernetes::service_manager(&self.root)
                            .unwrap_or(single::ServiceManager::Systemd);
                        match single::plan_role(&self.blocks, kind, sm, &extra) {
                            Err(e) => errors.push(e.to_string()),
                            Ok(plan) => match self.apply_role(plan, role) {
                                Ok(true) => eprintln!(
                                    "p2p: {} configured as {role} ({})",
                                    kind.service(),
                                    extra.args.join(" ")
                                ),
                                Ok(false) => {}
                                Err(e) => errors.extend(e),
                            },
                        }
                        writes.extend(roles::publish_self(s, role, publish_ip));
                        if role.is_master() {
                            let token = self.read_small(K3S_NODE_TOKEN);
                            let kubeconfig = self.read_small(K3S_KUBECONFIG);
                            match (token, kubeconfig) {
                                (Some(t), Some(k)) if !t.trim().is_empty() => writes
                                    .extend(roles::publish_master(s, role, publish_ip, &t, &k)),
                                _ => {
                                    waiting = Some(format!(
                                        "waiting for {} to start (no /{K3S_NODE_TOKEN} or /{K3S_KUBECONFIG} yet)",
                                        kind.service()
                                    ))
                                }
                            }
                        }
                    }
                }
            }
        }
        if let Some(e) = &s.kube_vip_error {
            errors.push(format!("{e} — kube-vip is off"));
        }
        if let Some(k) = &s.kube_vip
            && k.manifest_url.is_some()
        {
            errors.push(
                "kubevip.manifest_url is not fetched: kube-vip's RBAC is the one built in".into(),
            );
        }
        if let Some(ip) = view.ip_master
            && view.ips.values().any(|i| *i == ip) // not a kube-vip address
            && !input.live_addresses.contains(&ip)
            && input.vpn_ip != Some(ip)
        {
            errors.push(format!(
                "the master at {ip} does not answer: its mesh heartbeat stopped (with an HA control plane the other masters serve)"
            ));
        }
        let now = input.now;
        let nodes: Vec<_> = view
            .adverts
            .iter()
            .map(|(u, t)| {
                json!({
                    "uuid": u,
                    "role": view.roles.get(u).map(|r| r.as_str()),
                    "ip": view.ips.get(u).map(Ipv4Addr::to_string),
                    "advertised_s_ago": now - t,
                    "advertising": t + roles::ADVERT_TTL > now,
                    "live": view.ips.get(u).map(|ip| input.live_addresses.contains(ip)),
                    "me": *u == s.me,
                })
            })
            .collect();
        let status = json!({
            "network_id": self.bucket,
            "uuid": s.me,
            "role": role_name(&view, s, input.active_nodes),
            "forced": s.forced.map(|r| r.as_str()),
            "service": service,
            "leader": view.leader,
            "election": sched.note,
            "waiting": waiting,
            "errors": errors,
            "ip_master": view.ip_master.map(|i| i.to_string()),
            "minimum_nodes": s.minimum_nodes,
            "active_nodes": input.active_nodes,
            "nodes": nodes,
        });
        TickOutput { writes, status }
    }
}

/// A master with kube-vip writes its manifests (announcing on `iface`); any other node
/// removes them.
fn with_kube_vip(plan: &mut Plan, s: &roles::Settings, role: Role, iface: &str) {
    match &s.kube_vip {
        Some(k) if role.is_master() => {
            plan.write.extend(kairos_cluster::kubevip::files(k, iface));
            let keep: Vec<_> = plan.write.iter().map(|f| f.path.clone()).collect();
            plan.remove.extend(
                kairos_cluster::kubevip::ALL_FILES
                    .iter()
                    .filter(|p| !keep.iter().any(|k| k == *p))
                    .map(|p| p.to_string()),
            );
        }
        _ => plan.remove.extend(
            kairos_cluster::kubevip::ALL_FILES
                .iter()
                .map(|p| p.to_string()),
        ),
    }
}

/// The interface kube-vip announces on when `kubevip.interface` is unset: the first up,
/// non-loopback interface that is not the mesh's (provider-kairos guesses the same way).
fn default_interface() -> String {
    kairos_sys::net::ipv4_interfaces()
        .unwrap_or_default()
        .into_iter()
        .find(|i| i.up && !i.loopback && !i.name.starts_with("edgevpn"))
        .map(|i| i.name)
        .unwrap_or_else(|| "eth0".into())
}

fn role_name(view: &View, s: &roles::Settings, active: usize) -> Option<&'static str> {
    roles::my_role(view, s, active.max(1))
        .ok()
        .map(Role::as_str)
}
