//! `kairosctl bridge`: a workstation joins a node network's mesh as a VPN peer (as
//! provider-kairos' `kairos bridge` does: a static address, 10.1.0.254/24 by default, on its
//! own interface), so the cluster's API at the master's mesh address is reachable from it.
//! With `--kubeconfig FILE` it writes the cluster's kubeconfig — published in the ledger by
//! the first master, its server rewritten to the master's mesh address (or the kube-vip
//! VIP) — and rewrites it when the ledger's changes. Its status socket serves `kairosctl
//! role list|set` and `kairosctl get-kubeconfig` on the workstation.
//!
//! The daemon is the node's (`kairos_vpn::daemon`); the bridge only watches the
//! coordination bucket, takes no role and runs no Kubernetes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kairos_cluster::roles::View;
use kairos_vpn::daemon::{Coordinator, Paths, TickInput, TickOutput};
use serde_json::json;

/// The bridge's status socket (its `role`/`get-kubeconfig` commands use it by default).
pub const BRIDGE_SOCKET: &str = "/run/kairos-bridge.sock";
/// Its state: the mesh identity (a stable PeerID across runs).
pub const BRIDGE_STATE_DIR: &str = "/var/lib/kairos-bridge";

/// `kairosctl bridge`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct BridgeArgs {
    /// The network token of the nodes (`p2p.network_token`); `-` reads it from stdin
    #[arg(long, env = "KAIROS_NETWORK_TOKEN", hide_env_values = true)]
    pub network_token: String,
    /// This workstation's mesh address (static; the nodes' DHCP leaves it alone)
    #[arg(long, default_value = "10.1.0.254/24")]
    pub address: String,
    /// The VPN interface created here
    #[arg(long, default_value = "kairos0")]
    pub interface: String,
    /// The VPN MTU (the nodes' default is 1200)
    #[arg(long)]
    pub mtu: Option<u32>,
    /// The coordination bucket (`p2p.network_id` of the nodes)
    #[arg(long, default_value = "kairos")]
    pub network_id: String,
    /// Write the cluster's kubeconfig here (mode 0600) once a master has published it
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// A node to dial (`/ip4/…/tcp/…/p2p/<peer id>`, from its `p2p status`), for networks
    /// mDNS does not reach; repeat for more
    #[arg(long = "bootstrap-peer", value_name = "MULTIADDR")]
    pub bootstrap_peers: Vec<String>,
    /// Where the mesh host listens
    #[arg(long = "listen", value_name = "MULTIADDR")]
    pub listen_addresses: Vec<String>,
    /// The status socket (`kairosctl role list --socket`, `get-kubeconfig --socket`)
    #[arg(long, value_name = "PATH", default_value = BRIDGE_SOCKET)]
    pub socket: PathBuf,
    /// Keeps the bridge's mesh identity across runs
    #[arg(long, value_name = "DIR", default_value = BRIDGE_STATE_DIR)]
    pub state_dir: PathBuf,
}

impl BridgeArgs {
    /// The `p2p:` section a node with these settings would have.
    pub fn p2p(&self, token: &str) -> serde_json::Value {
        let mut vpn = json!({
            "create": true,
            "address": self.address,
            "interface": self.interface,
        });
        if let Some(m) = self.mtu {
            vpn["mtu"] = json!(m);
        }
        json!({
            "network_token": token,
            "network_id": self.network_id,
            "disable_dht": true,
            "vpn": vpn,
            "bootstrap_peers": self.bootstrap_peers,
            "listen_addresses": self.listen_addresses,
        })
    }
}

/// Watches the coordination bucket: writes the kubeconfig when it appears or changes.
struct Watch {
    bucket: String,
    kubeconfig: Option<PathBuf>,
    written: Option<String>,
}

impl Watch {
    fn write(&mut self, path: &Path, text: &str) -> Result<()> {
        if self.written.as_deref() == Some(text) {
            return Ok(());
        }
        kairos_sys::fs::write_private(path, text.as_bytes())
            .with_context(|| format!("writing the kubeconfig to {}", path.display()))?;
        self.written = Some(text.to_string());
        Ok(())
    }
}

impl Coordinator for Watch {
    fn bucket(&self) -> String {
        self.bucket.clone()
    }

    fn tick(&mut self, input: TickInput) -> TickOutput {
        let view = View::from_bucket(input.entries.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut errors = Vec::new();
        let mut waiting = None;
        let kubeconfig = view.user_kubeconfig();
        match (&self.kubeconfig.clone(), &kubeconfig) {
            (Some(p), Some(k)) => {
                let first = self.written.is_none();
                match self.write(p, k) {
                    Ok(()) if first => eprintln!(
                        "bridge: the cluster's kubeconfig (server https://{}:6443) is in {}",
                        view.ip_master.map(|i| i.to_string()).unwrap_or_default(),
                        p.display()
                    ),
                    Ok(()) => {}
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            (Some(_), None) => {
                waiting = Some("waiting for a master to publish the kubeconfig".to_string())
            }
            _ => {}
        }
        let status = json!({
            "network_id": self.bucket,
            "role": "bridge",
            "service": null,
            "leader": view.leader,
            "election": "a bridge takes no role",
            "waiting": waiting,
            "errors": errors,
            "ip_master": view.ip_master.map(|i| i.to_string()),
            "kubeconfig": self.kubeconfig.as_ref().map(|p| p.display().to_string()),
            "active_nodes": input.active_nodes,
            "nodes": view.adverts.keys().map(|u| json!({
                "uuid": u,
                "role": view.roles.get(u).map(|r| r.as_str()),
                "ip": view.ips.get(u).map(|i| i.to_string()),
                "live": view.ips.get(u).map(|ip| input.live_addresses.contains(ip)),
            })).collect::<Vec<_>>(),
        });
        TickOutput {
            writes: Vec::new(),
            status,
        }
    }
}

/// Runs the bridge until it is stopped. Exit codes as `p2p run`'s: 1 for settings it
/// refuses, 3 when the daemon cannot run.
pub fn run(args: &BridgeArgs) -> Result<i32> {
    let token = crate::pair::token_arg(&args.network_token)?;
    let p2p: kairos_config::types::P2p = serde_json::from_value(args.p2p(&token))
        .context("the bridge's settings as a p2p section")?;
    let (settings, warnings) = match kairos_vpn::settings::from_config(&p2p) {
        Ok(s) => s,
        Err(errors) => {
            for e in errors {
                // The keys are the node config's; name the bridge's flags instead.
                let e = e
                    .replace("p2p.network_token", "--network-token")
                    .replace("p2p.vpn.address", "--address")
                    .replace("p2p.vpn.interface", "--interface")
                    .replace("p2p.vpn.mtu", "--mtu")
                    .replace("p2p.bootstrap_peers", "--bootstrap-peer")
                    .replace("p2p.listen_addresses", "--listen");
                eprintln!("kairosctl bridge: {e}");
            }
            return Ok(crate::cli::exit::INVALID);
        }
    };
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let hostname = format!("bridge-{}", kairos_sys::host::hostname());
    let paths = Paths {
        state_dir: args.state_dir.clone(),
        socket: args.socket.clone(),
        resolv_conf: PathBuf::from("/dev/null"),
    };
    let watch = Watch {
        bucket: args.network_id.clone(),
        kubeconfig: args.kubeconfig.clone(),
        written: None,
    };
    eprintln!(
        "bridge: joining the mesh as {} on {} (status: kairosctl role list --socket {})",
        args.address,
        args.interface,
        args.socket.display()
    );
    kairos_vpn::daemon::run(settings, hostname, paths, Some(Box::new(watch)))
        .map_err(|e| anyhow::anyhow!("bridge: {e}"))?;
    Ok(0)
}
