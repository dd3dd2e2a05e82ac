//! Command-line interface of `kairos-agent`: argument types and dispatch.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use kairos_config::validate::{self, Level, Problem};
use kairos_config::{Collected, Collector, Fetcher, HttpFetcher};
use kairos_stages::runner::StageRun;
use kairos_sys::Root;
use serde_json::json;

/// Exit codes (documented in `--help` and docs/agent.md).
pub mod exit {
    /// The config is invalid, or steps failed under `--strict`.
    pub const INVALID: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// Something could not be done: unreadable file, merge conflict, unreachable source.
    pub const FAILURE: i32 = 3;
}

#[derive(Debug, Parser)]
#[command(
    name = "kairos-agent",
    version,
    about = "The Kairos node agent",
    long_about = "The Kairos node agent: reads the node's cloud-config, validates it and runs its stages.\n\nExit codes: 0 success; 1 invalid config or failed steps under --strict; 2 bad command line; 3 could not do the work (unreadable file, merge conflict).",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Resolve every path under this directory instead of / (an install target, an image tree)
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Use this kernel command line instead of reading /proc/cmdline
    #[arg(long, global = true, value_name = "STRING")]
    pub cmdline: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a cloud-config file (path, http(s) URL, `-` for stdin, or literal YAML)
    Validate {
        /// The config to check
        source: String,
        /// Print the problems as JSON
        #[arg(long)]
        json: bool,
    },
    /// Show or query the node's merged config
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the JSON Schema of the cloud-config
    Schema,
    /// The P2P mesh: network tokens
    P2p {
        #[command(subcommand)]
        command: P2pCommand,
    },
    /// Kubernetes roles over the mesh (the ledger bucket `p2p.network_id`, through the
    /// running mesh daemon)
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
    /// Print the cluster's kubeconfig from the mesh ledger, its server rewritten to the
    /// first master's mesh address (or the kube-vip address); exit 3 when the cluster has
    /// not published one yet
    GetKubeconfig {
        /// The mesh daemon's socket (under --root)
        #[arg(long, value_name = "PATH", default_value = kairos_vpn::settings::STATUS_SOCKET)]
        socket: PathBuf,
    },
    /// Kubernetes on the node (k3s, k0s) from the config's `k3s:`, `k3s-agent:`, `k0s:`,
    /// `k0s-worker:` blocks
    Kubernetes {
        #[command(subcommand)]
        command: KubernetesCommand,
    },
    /// Run a stage (e.g. boot, initramfs, network) from the node's stage paths and cmdline
    RunStage {
        /// Stage name; its `.before` and `.after` run around it
        stage: String,
        /// Fail (exit 1) when a step fails or the config is invalid
        #[arg(long)]
        strict: bool,
        /// Print the order steps would run in, without running them
        #[arg(long)]
        analyze: bool,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Upgrade to an image: fetch only the layers the node lacks, stage the deployment and
    /// make it the next boot with tries (it falls back by itself if it does not come up healthy)
    Upgrade(crate::lifecycle::UpgradeArgs),
    /// Make the passive (previous) deployment boot next; the active one becomes the fallback
    Rollback {
        /// Reboot when done
        #[arg(long)]
        reboot: bool,
        #[command(flatten)]
        node: crate::lifecycle::NodeArgs,
    },
    /// List the boot entries in the order they boot, or pin one
    Bootentry {
        /// List the entries (the default)
        #[arg(long)]
        list: bool,
        /// Boot this entry (active, passive or recovery) until `--select active`
        #[arg(long, value_name = "ENTRY")]
        select: Option<String>,
        #[command(flatten)]
        node: crate::lifecycle::NodeArgs,
    },
    /// Show the node's state: boot mode, deployments, next boot, last failure, history
    State {
        #[command(subcommand)]
        command: Option<StateCommand>,
        /// Print JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: crate::lifecycle::NodeArgs,
    },
    /// Install from the live medium to the disk in the config's `install.device` (`auto`: the
    /// largest non-removable disk), with the live system's config as the node's OEM config
    Install {
        /// Only when booted live and the config says `install.auto: true` (the boot hook)
        #[arg(long)]
        auto: bool,
        /// Show a QR code and a token on the console, wait for `kairosctl register` to send
        /// the config (written to /oem/99_pairing.yaml; it wins over the others), then
        /// install with it
        #[arg(long, conflicts_with = "auto")]
        pair: bool,
        #[command(flatten)]
        opts: crate::lifecycle::InstallArgs,
    },
    /// Show a QR code and a token, receive a config from `kairosctl register` over an
    /// ephemeral mesh and write it to /oem/99_pairing.yaml (without installing)
    Pair(crate::pair::PairArgs),
    /// Install from the live medium to DEVICE with CONFIG as the node's cloud-config
    ManualInstall {
        /// The disk: /dev/…, a /dev/disk/by-* link, or `auto`
        #[arg(long)]
        device: String,
        /// The cloud-config for the node (written to COS_OEM)
        config: PathBuf,
        #[command(flatten)]
        opts: crate::lifecycle::InstallArgs,
    },
    /// Reset from recovery: re-create COS_STATE from the recovery deployment, wipe
    /// COS_PERSISTENT (unless kept), keep COS_OEM (unless wiped); active boots next
    Reset(crate::lifecycle::ResetArgs),
    /// Run the health checks after the boot stage: keep a new deployment that passes, reboot
    /// one that fails (it falls back after its tries), record a fallback (run by the init system)
    BootAssessment {
        /// Print the verdict as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: crate::lifecycle::NodeArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Print one value by dot path (`booted`, `next_boot`, `deployments.0.image`)
    Get { path: String },
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// List the nodes of the cluster: uuid, role, mesh address, last advert
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// The mesh daemon's socket (under --root)
        #[arg(long, value_name = "PATH", default_value = kairos_vpn::settings::STATUS_SOCKET)]
        socket: PathBuf,
    },
    /// Set a node's role by hand (master, master/clusterinit, master/ha, worker); works from
    /// any node of the network and wins over the election
    Set {
        /// The node's uuid (`kairos-agent role list`)
        uuid: String,
        /// master, master/clusterinit, master/ha or worker
        role: String,
        /// The mesh daemon's socket (under --root)
        #[arg(long, value_name = "PATH", default_value = kairos_vpn::settings::STATUS_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum P2pCommand {
    /// Print a new network token for `p2p.network_token` (EdgeVPN format)
    GenerateToken {
        /// Seconds between rotations of the derived keys and topics
        #[arg(long, default_value_t = kairos_mesh::token::DEFAULT_INTERVAL)]
        interval: u64,
    },
    /// Check the node's `p2p.network_token` and show what it derives now (never its keys)
    Token {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Run the mesh daemon: join the network of `p2p.network_token`, bring up the VPN device,
    /// serve `p2p status` (runs until SIGTERM; the node's p2p service runs this)
    Run {
        /// Directory of the mesh identity (under --root)
        #[arg(long, value_name = "DIR", default_value = kairos_vpn::settings::STATE_DIR)]
        state_dir: PathBuf,
        /// The status socket (under --root)
        #[arg(long, value_name = "PATH", default_value = kairos_vpn::settings::STATUS_SOCKET)]
        socket: PathBuf,
        /// Exit 0 at once when the config has no `p2p.network_token` (the node's p2p service
        /// runs with this, so it is on exactly when a token is set)
        #[arg(long)]
        if_enabled: bool,
    },
    /// Exit 0 when the config sets `p2p.network_token` (the mesh is on), 1 when not
    Enabled,
    /// Show what the running mesh daemon sees: peers, addresses, routes, ledger keys,
    /// rotation, DHCP (exit 3 when no daemon answers)
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// The status socket (under --root)
        #[arg(long, value_name = "PATH", default_value = kairos_vpn::settings::STATUS_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum KubernetesCommand {
    /// Write the enabled block's env file and service (systemd drop-in or OpenRC script),
    /// enable it (and start it on the running system); remove the files of blocks that are
    /// off and disable their services. Exit 1 for a config it refuses, 3 when it fails
    Apply {
        /// Print what was done as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the merged config with the list of its sources
    Show {
        /// Print JSON ({"sources": [...], "config": {...}, "warnings": [...]})
        #[arg(long)]
        json: bool,
        /// Fail when the merged config does not validate
        #[arg(long)]
        strict: bool,
    },
    /// Print one value of the merged config by dot path (`install.device`, `users.0.name`)
    Get { path: String },
}

/// The outcome of a command that ran: its exit code.
pub type Code = i32;

impl Global {
    fn root(&self) -> Root {
        Root::new(&self.root)
    }

    /// The cmdline: the flag, else the root's /proc/cmdline when it has one.
    fn cmdline(&self) -> Option<String> {
        if let Some(c) = &self.cmdline {
            return Some(c.clone());
        }
        std::fs::read_to_string(self.root().join("proc/cmdline")).ok()
    }

    /// What the running system booted (deployment and mode), from the cmdline.
    fn booted(&self) -> kairos_lifecycle::assess::Booted {
        kairos_lifecycle::assess::Booted::detect(
            &self.cmdline().unwrap_or_default(),
            &self.root().join("run/cos"),
        )
    }

    /// The config sections lifecycle commands read, each typed on its own so a problem
    /// elsewhere in the config does not stop an upgrade (it is reported as a warning).
    fn lifecycle_config(&self, fetcher: &dyn Fetcher) -> kairos_config::types::Config {
        let mut cfg = kairos_config::types::Config::default();
        // Never silently: whatever could not be read is named, with what applies instead.
        let node = match self.collect(fetcher) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                c.config
            }
            Err(e) => {
                eprintln!(
                    "warning: the node's config could not be read ({e:#}): upgrade, boot_assessment and reset use their defaults"
                );
                return cfg;
            }
        };
        cfg.upgrade = section(&node, "upgrade", "Upgrade");
        cfg.boot_assessment = section(&node, "boot_assessment", "BootAssessment");
        cfg.reset = section(&node, "reset", "Reset");
        // Health checks shipped with the image (/system/oem) count too: an image author knows
        // what "healthy" means for it; the node's own checks are added to them.
        let image_checks: Vec<String> =
            kairos_config::collect::walk_yaml(&self.root(), std::path::Path::new("/system/oem"))
                .iter()
                .filter_map(|p| {
                    let text = kairos_config::collect::read_config(&self.root(), p).ok()?;
                    let src: std::sync::Arc<str> = p.to_string_lossy().into();
                    let n = kairos_config::yaml::parse(&text, &src).ok()?;
                    section::<kairos_config::types::BootAssessment>(
                        &n,
                        "boot_assessment",
                        "BootAssessment",
                    )
                })
                .flat_map(|b| b.health_checks)
                .collect();
        if !image_checks.is_empty() {
            let ba = cfg.boot_assessment.get_or_insert_with(Default::default);
            let mut all = image_checks;
            all.append(&mut ba.health_checks);
            ba.health_checks = all;
        }
        cfg
    }

    fn collect(&self, fetcher: &dyn Fetcher) -> Result<Collected> {
        Collector::new(self.root(), self.cmdline(), fetcher)
            .collect()
            .with_context(|| format!("collecting the config under {}", self.root.display()))
    }
}

/// A typed section of the config, read as Kairos reads it: unknown keys are warned about and
/// the keys that are known apply; a section that cannot be read says so and its defaults apply.
fn section<T: serde::de::DeserializeOwned>(
    node: &kairos_config::Node,
    key: &str,
    def: &str,
) -> Option<T> {
    let n = node.get(key)?;
    let (v, warnings) = kairos_config::decode::section::<T>(n, def, key);
    for w in &warnings {
        eprintln!("warning: {w}; `{key}` applies without it");
    }
    v.map_err(|e| eprintln!("error: {e}; the defaults of `{key}` apply"))
        .ok()
}

/// The merged config's `p2p.network_token`, when set (not empty).
fn network_token(c: &Collected) -> Option<String> {
    c.config
        .at_path("p2p.network_token")
        .and_then(|n| n.scalar_text())
        .filter(|t| !t.trim().is_empty())
}

/// `p2p run`: the daemon's settings from the merged config, then the daemon.
fn p2p_run(
    g: &Global,
    c: &Collected,
    state_dir: &std::path::Path,
    socket: &std::path::Path,
) -> Result<Code> {
    let p2p: kairos_config::types::P2p = section(&c.config, "p2p", "P2p").unwrap_or_default();
    let (mut settings, warnings) = match kairos_vpn::settings::from_config(&p2p) {
        Ok(s) => s,
        Err(errors) => {
            for e in errors {
                eprintln!("kairos-agent: {e}");
            }
            return Ok(exit::INVALID);
        }
    };
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let under = |p: &std::path::Path| g.root.join(p.strip_prefix("/").unwrap_or(p));
    if let Some(kairos_vpn::settings::VpnSettings {
        addressing: kairos_vpn::settings::Addressing::Dhcp { lease_dir, .. },
        ..
    }) = settings.vpn.as_mut()
    {
        *lease_dir = under(lease_dir);
    }
    let hostname = std::fs::read_to_string(under(std::path::Path::new("/etc/hostname")))
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(kairos_sys::host::hostname);
    let paths = kairos_vpn::daemon::Paths {
        state_dir: under(state_dir),
        socket: under(socket),
        resolv_conf: under(std::path::Path::new("/etc/resolv.conf")),
    };
    let coordinator = mesh_cluster(g, c, &p2p, &hostname, &paths.state_dir)
        .map(|m| Box::new(m) as Box<dyn kairos_vpn::daemon::Coordinator>);
    kairos_vpn::daemon::run(settings, hostname, paths, coordinator)
        .map_err(|e| anyhow::anyhow!("p2p: {e}"))?;
    Ok(0)
}

/// The four Kubernetes blocks of the merged config.
fn k8s_blocks(c: &Collected) -> kairos_cluster::single::Blocks {
    let get = |key: &str| section::<kairos_config::types::K8sDistro>(&c.config, key, "K8sDistro");
    kairos_cluster::single::Blocks {
        k3s: get("k3s"),
        k3s_agent: get("k3s-agent"),
        k0s: get("k0s"),
        k0s_worker: get("k0s-worker"),
    }
}

/// `p2p.auto.enable` is false (the blocks then run as a single node, as in provider-kairos).
fn auto_off(p2p: &kairos_config::types::P2p) -> bool {
    p2p.auto
        .as_ref()
        .and_then(|a| a.enable.as_ref())
        .is_some_and(|e| !e.0)
}

/// The node's uuid in the coordination bucket: env `UUID`, else the one kept in the mesh
/// state directory (persistent), else `<machine-id>-<hostname>` (provider-kairos'
/// `machine.UUID()`), kept there — so a node keeps its role across reboots and upgrades even
/// when its machine id is made anew at each boot (an image with an empty /etc/machine-id).
/// A root without a machine id uses the hostname alone.
pub fn node_uuid(
    root: &kairos_sys::Root,
    hostname: &str,
    state_dir: &std::path::Path,
) -> Option<String> {
    if let Some(u) = std::env::var("UUID").ok().filter(|u| !u.is_empty()) {
        return kairos_cluster::roles::node_uuid(Some(&u), "", "");
    }
    let kept = state_dir.join("cluster-uuid");
    if let Some(u) = std::fs::read_to_string(&kept)
        .ok()
        .and_then(|t| kairos_cluster::roles::node_uuid(Some(t.trim()), "", ""))
    {
        return Some(u);
    }
    let u = first_uuid(root, hostname)?;
    if let Err(e) = std::fs::create_dir_all(state_dir)
        .and_then(|_| kairos_sys::fs::write_private(&kept, u.as_bytes()))
    {
        eprintln!(
            "warning: could not keep the cluster uuid in {}: {e} (a new machine id would make a new node)",
            kept.display()
        );
    }
    Some(u)
}

fn first_uuid(root: &kairos_sys::Root, hostname: &str) -> Option<String> {
    let machine_id = root.read_to_string("etc/machine-id").unwrap_or_default();
    if machine_id.trim().is_empty() {
        eprintln!(
            "warning: no /etc/machine-id under {}: the node's cluster uuid is its hostname {hostname:?} (keep hostnames unique)",
            root.path().display()
        );
        return kairos_cluster::roles::node_uuid(
            std::env::var("UUID").ok().as_deref(),
            "",
            hostname,
        )
        .map(|u| u.trim_start_matches('-').to_string());
    }
    kairos_cluster::roles::node_uuid(std::env::var("UUID").ok().as_deref(), &machine_id, hostname)
}

/// `p2p.network_id`: the coordination bucket (default `kairos`).
fn network_id(p2p: &kairos_config::types::P2p) -> String {
    p2p.network_id
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "kairos".to_string())
}

/// The cluster coordinator for `p2p run`, unless `p2p.auto.enable` is false.
fn mesh_cluster(
    g: &Global,
    c: &Collected,
    p2p: &kairos_config::types::P2p,
    hostname: &str,
    state_dir: &std::path::Path,
) -> Option<crate::cluster::MeshCluster> {
    if auto_off(p2p) {
        return None;
    }
    let root = g.root();
    let Some(me) = node_uuid(&root, hostname, state_dir) else {
        eprintln!(
            "kairos-agent: the node's uuid (env UUID or machine-id + hostname) is not usable as a ledger key: no Kubernetes roles over the mesh"
        );
        return None;
    };
    let kubevip: Option<kairos_config::types::KubeVip> = section(&c.config, "kubevip", "KubeVip");
    let settings = kairos_cluster::roles::Settings::new(p2p, kubevip.as_ref(), me);
    let bucket = network_id(p2p);
    Some(crate::cluster::MeshCluster::new(
        root,
        k8s_blocks(c),
        settings,
        bucket,
    ))
}

/// `install:` of a config, for the install commands: unknown keys are warned about; a value
/// that cannot be read stops the install (it would lay out the wrong disk).
fn install_section(
    node: &kairos_config::Node,
    name: &str,
) -> Result<kairos_config::types::Install> {
    let Some(n) = node.get("install") else {
        return Ok(Default::default());
    };
    let (v, warnings) = kairos_config::decode::section(n, "Install", "install");
    for w in &warnings {
        eprintln!("warning: {w}; the install goes on without it");
    }
    v.map_err(|e| {
        anyhow::anyhow!("{name}: {e}; fix it (see `kairos-agent validate`) and try again")
    })
}

pub fn run(cli: Cli) -> Result<Code> {
    let fetcher = HttpFetcher::default();
    match cli.command {
        Command::Validate { source, json } => validate_cmd(&source, json, &fetcher),
        Command::P2p {
            command: P2pCommand::GenerateToken { interval },
        } => {
            println!("{}", kairos_mesh::Token::generate(interval).encode());
            Ok(0)
        }
        Command::P2p {
            command: P2pCommand::Token { json },
        } => {
            let c = cli.global.collect(&fetcher)?;
            let Some(t) = network_token(&c) else {
                eprintln!(
                    "kairos-agent: no p2p.network_token in the config (make one with `kairos-agent p2p generate-token`)"
                );
                return Ok(exit::INVALID);
            };
            match kairos_mesh::Token::parse(&t) {
                Ok(tok) => {
                    println!("{}", kairos_mesh::token::report(&tok, None, json));
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("kairos-agent: p2p.network_token: {e}");
                    Ok(exit::INVALID)
                }
            }
        }
        Command::P2p {
            command:
                P2pCommand::Run {
                    state_dir,
                    socket,
                    if_enabled,
                },
        } => {
            let c = cli.global.collect(&fetcher)?;
            if if_enabled && network_token(&c).is_none() {
                eprintln!("kairos-agent: no p2p.network_token in the config: the mesh is off");
                return Ok(0);
            }
            p2p_run(&cli.global, &c, &state_dir, &socket)
        }
        Command::Kubernetes {
            command: KubernetesCommand::Apply { json },
        } => {
            let c = cli.global.collect(&fetcher)?;
            let blocks = k8s_blocks(&c);
            let p2p: kairos_config::types::P2p =
                section(&c.config, "p2p", "P2p").unwrap_or_default();
            let mesh_roles = network_token(&c).is_some() && !auto_off(&p2p);
            Ok(crate::kubernetes::apply(
                &cli.global.root(),
                &blocks,
                mesh_roles,
                json,
            ))
        }
        Command::Role { command } => {
            let c = cli.global.collect(&fetcher)?;
            let p2p: kairos_config::types::P2p =
                section(&c.config, "p2p", "P2p").unwrap_or_default();
            let bucket = network_id(&p2p);
            let under =
                |p: &std::path::Path| cli.global.root.join(p.strip_prefix("/").unwrap_or(p));
            Ok(match command {
                RoleCommand::List { json, socket } => {
                    crate::p2p::role_list(&under(&socket), &bucket, json)
                }
                RoleCommand::Set { uuid, role, socket } => {
                    crate::p2p::role_set(&under(&socket), &bucket, &uuid, &role)
                }
            })
        }
        Command::GetKubeconfig { socket } => {
            let c = cli.global.collect(&fetcher)?;
            let p2p: kairos_config::types::P2p =
                section(&c.config, "p2p", "P2p").unwrap_or_default();
            let path = cli
                .global
                .root
                .join(socket.strip_prefix("/").unwrap_or(&socket));
            Ok(crate::p2p::get_kubeconfig(&path, &network_id(&p2p)))
        }
        Command::P2p {
            command: P2pCommand::Enabled,
        } => {
            let c = cli.global.collect(&fetcher)?;
            Ok(if network_token(&c).is_some() {
                0
            } else {
                exit::INVALID
            })
        }
        Command::P2p {
            command: P2pCommand::Status { json, socket },
        } => {
            let path = cli
                .global
                .root
                .join(socket.strip_prefix("/").unwrap_or(&socket));
            Ok(crate::p2p::status_cmd(&path, json))
        }
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&kairos_config::types::schema())?
            );
            Ok(0)
        }
        Command::Config {
            command: ConfigCommand::Show { json, strict },
        } => {
            let c = cli.global.collect(&fetcher)?;
            let problems = validate::validate_node(&c.config);
            let strict = strict || is_strict(&c);
            for s in &c.skipped {
                eprintln!("warning: {s}");
            }
            report_warnings(&c, &problems, strict);
            if json {
                let out = json!({
                    "sources": c.sources, "config": c.config.to_json(), "warnings": c.warnings,
                    "problems": problems.iter().map(|p| json!({"level": p.level, "problem": p.to_string()})).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", c.render());
            }
            Ok(if strict && !validate::passes(&problems) {
                exit::INVALID
            } else {
                0
            })
        }
        Command::Config {
            command: ConfigCommand::Get { path },
        } => {
            let c = cli.global.collect(&fetcher)?;
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            let Some(n) = c.config.at_path(&path) else {
                eprintln!(
                    "kairos-agent: `{path}` is not set in the config (sources: {})",
                    c.sources.join(", ")
                );
                return Ok(exit::INVALID);
            };
            match n.scalar_text() {
                Some(s) => println!("{s}"),
                None => print!("{}", kairos_config::yaml::to_string(n)),
            }
            Ok(0)
        }
        Command::RunStage {
            stage,
            strict,
            analyze,
            json,
        } => run_stage(&cli.global, &stage, strict, analyze, json, &fetcher),
        Command::Upgrade(a) => {
            let cfg = cli.global.lifecycle_config(&fetcher);
            crate::lifecycle::upgrade_cmd(&a, &cli.global.root, &cli.global.booted(), &cfg)
        }
        Command::Rollback { reboot, node } => {
            crate::lifecycle::rollback_cmd(&node, &cli.global.root, reboot)
        }
        Command::Bootentry { select, node, .. } => {
            crate::lifecycle::bootentry_cmd(&node, &cli.global.root, select.as_deref())
        }
        Command::State {
            command,
            json,
            node,
        } => {
            // The trusted-boot view reads and hashes the booted UKI: only when it is shown.
            let trust = match &command {
                Some(StateCommand::Get { path }) => path.starts_with("trusted_boot"),
                None => true,
            };
            let v = crate::lifecycle::state_value(
                &node,
                &cli.global.root,
                &cli.global.booted(),
                trust,
            )?;
            match command {
                Some(StateCommand::Get { path }) => match kairos_lifecycle::state::get(&v, &path) {
                    Some(serde_json::Value::String(s)) => println!("{s}"),
                    Some(x) => println!("{}", serde_json::to_string_pretty(x)?),
                    None => {
                        eprintln!("state has no value at {path}");
                        return Ok(exit::INVALID);
                    }
                },
                None if json => println!("{}", serde_json::to_string_pretty(&v)?),
                None => print_state(&v),
            }
            Ok(0)
        }
        Command::Pair(a) => {
            crate::pair::pair(&cli.global.root, &a)?;
            Ok(0)
        }
        Command::Install {
            auto,
            pair,
            mut opts,
        } => {
            let booted = cli.global.booted();
            let mut paired_device = None;
            if pair {
                let a = crate::pair::PairArgs {
                    token: None,
                    timeout: 3600,
                    bootstrap_peers: Vec::new(),
                };
                let p = crate::pair::pair(&cli.global.root, &a)?;
                // What `kairosctl register --device/--reboot/--poweroff` asked for.
                paired_device = p.get("device").filter(|d| !d.is_empty()).cloned();
                opts.reboot |= p.contains_key("reboot");
                opts.poweroff |= p.contains_key("poweroff");
            }
            let c = cli.global.collect(&fetcher)?;
            let install = install_section(&c.config, "config")?;
            if auto && !(booted.mode == "live" && install.auto.0) {
                return Ok(0);
            }
            let device = paired_device.unwrap_or_else(|| {
                install
                    .device
                    .as_ref()
                    .map(|d| d.0.clone())
                    .unwrap_or_else(|| "auto".into())
            });
            let text = format!(
                "#cloud-config\n{}",
                kairos_config::yaml::to_string(&c.config)
            );
            let g = &cli.global;
            crate::lifecycle::install_cmd(&opts, &device, &install, &text, &g.root, &mut |s, r| {
                run_install_stage(g, s, None, r, &fetcher)
            })
        }
        Command::ManualInstall {
            device,
            config,
            opts,
        } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            if !kairos_config::collect::has_header(&text) {
                anyhow::bail!(
                    "{}: a cloud-config must start with #cloud-config",
                    config.display()
                );
            }
            let src: std::sync::Arc<str> = config.to_string_lossy().into();
            let node = kairos_config::yaml::parse(&text, &src)
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            let install = install_section(&node, &config.display().to_string())?;
            let g = &cli.global;
            crate::lifecycle::install_cmd(&opts, &device, &install, &text, &g.root, &mut |s, r| {
                run_install_stage(g, s, Some(&config), r, &fetcher)
            })
        }
        Command::Reset(a) => {
            let cfg = cli.global.lifecycle_config(&fetcher);
            let g = &cli.global;
            crate::lifecycle::reset_cmd(
                &a,
                &g.root,
                &g.cmdline().unwrap_or_default(),
                &cfg,
                &mut |s, r| run_install_stage(g, s, None, r, &fetcher),
            )
        }
        Command::BootAssessment { json, node } => {
            let cfg = cli.global.lifecycle_config(&fetcher);
            crate::lifecycle::boot_assessment_cmd(
                &node,
                &cli.global.root,
                &cli.global.booted(),
                &cfg,
                json,
            )
        }
    }
}

/// Runs an install stage from the node's stage paths (and the install config file); a failing
/// step is reported, not fatal, as in Kairos. `root`: the new system, for
/// `after-install-chroot` (commands chrooted into it).
fn run_install_stage(
    g: &Global,
    stage: &str,
    config: Option<&std::path::Path>,
    root: Option<&std::path::Path>,
    fetcher: &dyn Fetcher,
) {
    let run = StageRun {
        root: root.map(Root::new).unwrap_or_else(|| g.root()),
        cmdline: g.cmdline(),
        extra_paths: config
            .map(|c| c.to_string_lossy().into_owned())
            .into_iter()
            .collect(),
        fetcher,
        booting: false,
    };
    // Steps print their own progress and errors; an install stage never stops the install.
    run.run(stage, &mut std::io::stderr());
}

/// `state` for people: the few lines an operator looks for first.
fn print_state(v: &serde_json::Value) {
    let s = |p: &str| {
        kairos_lifecycle::state::get(v, p)
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .unwrap_or_default()
    };
    println!("boot mode:  {}", s("boot_mode"));
    println!("booted:     {}", s("booted"));
    println!("next boot:  {} ({})", s("next_boot"), s("next_role"));
    if let Some(deps) = v["deployments"].as_array() {
        for d in deps {
            println!(
                "deployment: {} {} {} roles={}",
                d["id"].as_str().unwrap_or_default(),
                d["image"].as_str().unwrap_or_default(),
                d["manifest_digest"].as_str().unwrap_or_default(),
                d["roles"]
            );
        }
    }
    if v["staged"].is_object() {
        println!("staged:     {}", s("staged.deployment"));
    }
    if v["last_failure"].is_object() {
        println!(
            "last failure: {} {}: {}",
            s("last_failure.deployment"),
            s("last_failure.action"),
            s("last_failure.detail")
        );
    }
    if let Some(enc) = v["encrypted"].as_object() {
        for (label, e) in enc {
            let opened = e["opened"]
                .as_str()
                .map(|d| format!("open as {d}"))
                .unwrap_or_else(|| "closed".into());
            let sealed = if e["tokens"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "systemd-tpm2"))
            {
                "key sealed in the TPM"
            } else {
                "no TPM key: opens with a passphrase only"
            };
            println!(
                "encrypted:  {label} on {} ({opened}; {sealed}{})",
                e["container"].as_str().unwrap_or_default(),
                if e["finished"] == true {
                    ""
                } else {
                    "; set-up unfinished"
                }
            );
            if let Some(f) = e["recovery_key_file"].as_str() {
                println!("  recovery key not saved yet: {f} (shown once; gone at the next reboot)");
            }
        }
    }
    if let Some(layers) = v["verified_layers"].as_array().filter(|l| !l.is_empty()) {
        let bad: Vec<&str> = layers
            .iter()
            .filter(|l| l["corrupted"].as_bool() == Some(true))
            .filter_map(|l| l["name"].as_str())
            .collect();
        if bad.is_empty() {
            println!(
                "layers:     {} behind dm-verity (signed root hashes), no changed block seen",
                layers.len()
            );
        } else {
            println!(
                "layers:     {} behind dm-verity; CHANGED BLOCKS REFUSED in {}: the layer image on disk was changed (reads of them fail); reinstall or upgrade",
                layers.len(),
                bad.join(", ")
            );
        }
    }
    let t = &v["trusted_boot"];
    if t.is_object() {
        let onoff = |x: &serde_json::Value| match x.as_bool() {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown",
        };
        println!(
            "secure boot: {} (setup mode {})",
            onoff(&t["secure_boot"]),
            onoff(&t["setup_mode"])
        );
        if let Some(u) = t["uki"].as_str() {
            println!("signed UKI: {u} (entry {})", s("trusted_boot.boot_entry"));
        }
        if let Some(p) = t["pcr7"].as_str() {
            println!("PCR 7:      {p}");
        }
        let m = &t["measured"];
        if m.is_object() {
            println!("PCR 11:     {}", s("trusted_boot.measured.pcr11"));
            if let Some(pred) = m["predicted"].as_array() {
                for p in pred {
                    println!(
                        "  predicted at {}: {}",
                        p[0].as_str().unwrap_or_default(),
                        p[1].as_str().unwrap_or_default()
                    );
                }
            }
            println!("measured:   {}", s("trusted_boot.measured.summary"));
        }
        if let Some(e) = t["error"].as_str() {
            println!("measured:   cannot assess: {e}");
        }
    }
}

fn is_strict(c: &Collected) -> bool {
    c.config
        .get("strict")
        .is_some_and(|n| n.to_json() == json!(true))
}

fn report_warnings(c: &Collected, problems: &[Problem], strict: bool) {
    for w in &c.warnings {
        eprintln!("warning: {w}");
    }
    for p in problems {
        let level = match p.level {
            Level::Warning if strict => "error",
            l => l.as_str(),
        };
        eprintln!("{level}: {p}");
    }
}

fn read_source(source: &str, fetcher: &dyn Fetcher) -> Result<(String, String)> {
    if source == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the config from stdin")?;
        return Ok((s, "<stdin>".into()));
    }
    if source.starts_with("http://") || source.starts_with("https://") {
        let body = fetcher
            .fetch(source)
            .map_err(|e| anyhow::anyhow!("fetching {source}: {e}"))?;
        return Ok((
            String::from_utf8_lossy(&body).into_owned(),
            source.to_string(),
        ));
    }
    match std::fs::read_to_string(source) {
        Ok(s) => Ok((s, source.to_string())),
        // Kairos treats an argument that is not a file as the YAML text itself.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && (source.contains('\n') || source.starts_with('#')) =>
        {
            Ok((source.to_string(), "<argument>".into()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {source}")),
    }
}

fn validate_cmd(source: &str, json_out: bool, fetcher: &dyn Fetcher) -> Result<Code> {
    let (text, name) = read_source(source, fetcher)?;
    let mut problems = validate::validate_text(&text, &name);
    if let Ok(node) = kairos_config::yaml::parse(&text, &std::sync::Arc::from(name.as_str())) {
        problems.extend(kairos_mesh::token::check_config(&node));
    }
    if json_out {
        let list: Vec<_> = problems
            .iter()
            .map(|p| json!({"file": p.origin.source.as_ref(), "line": p.origin.line, "column": p.origin.col, "path": p.path, "level": p.level, "message": p.message}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"valid": validate::passes(&problems), "problems": list})
            )?
        );
    } else {
        for p in &problems {
            match p.level {
                Level::Info => println!("{p} (info)"),
                _ => println!("{p}"),
            }
        }
        let counted = problems.iter().filter(|p| p.level != Level::Info).count();
        if counted == 0 {
            println!("{name}: valid");
        } else {
            eprintln!("{name}: {counted} problem(s)");
        }
    }
    Ok(if validate::passes(&problems) {
        0
    } else {
        exit::INVALID
    })
}

fn run_stage(
    g: &Global,
    stage: &str,
    strict: bool,
    analyze: bool,
    json_out: bool,
    fetcher: &dyn Fetcher,
) -> Result<Code> {
    // The merged config gives `cloud-init-paths` and `strict`; a broken config must not stop
    // the stage from running (it may be what repairs the node), unless strict.
    let collected = match g.collect(fetcher) {
        Ok(c) => Some(c),
        Err(e) if !strict => {
            eprintln!("warning: {e:#}");
            None
        }
        Err(e) => return Err(e),
    };
    let strict = strict || collected.as_ref().is_some_and(is_strict);
    let mut extra_paths = Vec::new();
    let mut config_ok = true;
    if let Some(c) = &collected {
        // The stage loader reports problems of stages and of the cloud-init keys it turns
        // into steps, when the stage they affect runs; the rest is reported here.
        let problems: Vec<Problem> = validate::validate_node(&c.config)
            .into_iter()
            .chain(kairos_mesh::token::check_config(&c.config))
            .filter(|p| {
                let top = p.path.split('.').next().unwrap_or("");
                top != "stages" && !kairos_stages::loader::TRANSPILED_KEYS.contains(&top)
            })
            .collect();
        config_ok = validate::passes(&problems);
        if !analyze {
            report_warnings(c, &problems, strict);
        }
        if let Some(p) = c.config.get("cloud-init-paths") {
            extra_paths = p
                .to_json()
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
        }
    }
    let run = StageRun {
        root: g.root(),
        cmdline: g.cmdline(),
        extra_paths,
        fetcher,
        booting: false,
    };
    if analyze {
        let plans = run.analyze(stage);
        if json_out {
            let v: Vec<_> = plans
                .iter()
                .map(|p| json!({
                    "stage": p.stage, "source": p.source, "layers": p.layers,
                    "skipped": p.skipped.iter().map(|(o, r)| json!({"step": o, "reason": r})).collect::<Vec<_>>(),
                    "conditional": p.conditional.iter().map(|(o, c)| json!({"step": o, "if": c})).collect::<Vec<_>>(),
                    "problems": p.problems,
                }))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            for p in plans {
                println!("{} from {}:", p.stage, p.source);
                for (i, layer) in p.layers.iter().enumerate() {
                    println!("  {i}: {}", layer.join(", "));
                }
                for (op, why) in &p.skipped {
                    println!("  will skip {op}: {why}");
                }
                for (op, cond) in &p.conditional {
                    println!("  runs only if `{cond}` succeeds: {op}");
                }
                for problem in &p.problems {
                    println!("  problem {problem}");
                }
            }
        }
        return Ok(0);
    }
    let mut err = std::io::stderr();
    let report = run.run(stage, &mut err);
    let summary = format!(
        "{stage}: {} step(s) ran, {} skipped, {} failed, {} problem(s), {} warning(s)",
        report.ran.len(),
        report.skipped.len(),
        report.failed.len(),
        report.problems.len(),
        report.warnings.len()
    );
    if json_out {
        let v = json!({
            "stage": stage, "ok": report.ok(), "ran": report.ran,
            "skipped": report.skipped.iter().map(|(n, r)| json!({"step": n, "reason": r})).collect::<Vec<_>>(),
            "failed": report.failed.iter().map(|(n, e)| json!({"step": n, "errors": e})).collect::<Vec<_>>(),
            "problems": report.problems, "warnings": report.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    let clean = report.clean() && config_ok;
    let _ = writeln!(
        err,
        "{summary}{}",
        if !clean && !strict {
            " (not fatal: pass --strict to fail)"
        } else {
            ""
        }
    );
    Ok(if strict && !clean { exit::INVALID } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        let c = Cli::try_parse_from([
            "kairos-agent",
            "run-stage",
            "boot",
            "--root",
            "/tmp/x",
            "--strict",
        ])
        .unwrap();
        assert_eq!(c.global.root, PathBuf::from("/tmp/x"));
        assert!(matches!(c.command, Command::RunStage { strict: true, .. }));
        let c = Cli::try_parse_from([
            "kairos-agent",
            "--cmdline",
            "a=b",
            "config",
            "get",
            "install.device",
        ])
        .unwrap();
        assert_eq!(c.global.cmdline.as_deref(), Some("a=b"));
        assert!(Cli::try_parse_from(["kairos-agent", "frobnicate"]).is_err());
    }
}
