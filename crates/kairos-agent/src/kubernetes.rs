//! `kairos-agent kubernetes apply`: the node's `k3s:` / `k3s-agent:` / `k0s:` / `k0s-worker:`
//! block made real beneath the root — the plan of `kairos_cluster::single` written (env file,
//! systemd drop-in or OpenRC service), the service enabled, the others' files removed and
//! their services disabled. On the running system it also reloads systemd and starts the
//! service, as provider-kairos does.

use std::path::Path;

use kairos_cluster::single::{self, Blocks, Extra, Plan, ServiceManager};
use kairos_sys::Root;

/// What a node's root runs: systemd or OpenRC (the two Kairos writes Kubernetes units for).
pub fn service_manager(root: &Root) -> Option<ServiceManager> {
    match root.init_system()? {
        kairos_sys::InitSystem::Systemd => Some(ServiceManager::Systemd),
        kairos_sys::InitSystem::OpenRc => Some(ServiceManager::OpenRc),
        kairos_sys::InitSystem::Busybox => None,
    }
}

fn rel(p: &str) -> &Path {
    Path::new(p.trim_start_matches('/'))
}

/// Writes and removes the plan's files beneath `root`; every failure is named.
pub(crate) fn write(root: &Root, plan: &Plan) -> Vec<String> {
    let mut errors = Vec::new();
    for f in &plan.write {
        let r = root
            .create_parents(rel(&f.path), 0o755)
            .and_then(|_| root.write_file(rel(&f.path), f.content.as_bytes(), f.mode));
        if let Err(e) = r {
            errors.push(format!("writing {}: {e}", f.path));
        }
    }
    for p in &plan.remove {
        match root.remove_file(rel(p)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                errors.push(format!("removing {p}: {e}"))
            }
            _ => {}
        }
    }
    errors
}

/// Enables and disables the plan's services (systemd through the stage engine's
/// `systemctl` module: `systemctl` when live, unit links offline; OpenRC by runlevel links).
/// `restart`: on a live systemd, restart the enabled services (their config changed)
/// without waiting for them (a k3s server takes its time to be ready; `p2p status` says
/// what it waits for) — else they are started and waited for.
pub(crate) fn services(root: &Root, plan: &Plan, sm: ServiceManager, restart: bool) -> Vec<String> {
    let mut errors = Vec::new();
    match sm {
        ServiceManager::Systemd => {
            let live = root.is_host() && kairos_sys::host::systemd_running();
            if live && let Err(e) = kairos_sys::host::systemctl(&["daemon-reload".to_string()]) {
                errors.push(format!("systemctl daemon-reload: {e}"));
            }
            let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            let step = kairos_config::types::Step {
                systemctl: Some(kairos_config::types::Systemctl {
                    enable: names(&plan.enable),
                    // Disabling a service the image does not have is not an error.
                    disable: plan
                        .disable
                        .iter()
                        .filter(|s| kairos_stages::modules::unit_exists(root, s))
                        .map(|s| s.to_string())
                        .collect(),
                    start: if restart {
                        Vec::new()
                    } else {
                        names(&plan.enable)
                    },
                    ..Default::default()
                }),
                ..Default::default()
            };
            // The systemctl module fetches nothing.
            let fetcher = kairos_config::collect::HttpFetcher::default();
            let mut ex =
                kairos_stages::Executor::new(root.clone(), &fetcher, Box::new(std::io::sink()));
            errors.extend(ex.apply(&step));
            if live && restart {
                for svc in &plan.enable {
                    let argv = ["restart", "--no-block", svc].map(str::to_string);
                    if let Err(e) = kairos_sys::host::systemctl(&argv) {
                        errors.push(format!("systemctl restart {svc}: {e}"));
                    }
                }
            }
        }
        ServiceManager::OpenRc => {
            for s in &plan.enable {
                let link = format!("etc/runlevels/default/{s}");
                if root.symlink_metadata(&link).is_err() {
                    let r = root
                        .create_parents(&link, 0o755)
                        .and_then(|_| root.symlink(format!("/etc/init.d/{s}"), &link));
                    if let Err(e) = r {
                        errors.push(format!("enabling {s} (/{link}): {e}"));
                    }
                }
            }
            for s in &plan.disable {
                let link = format!("etc/runlevels/default/{s}");
                if let Err(e) = root.remove_file(&link)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    errors.push(format!("disabling {s} (/{link}): {e}"));
                }
            }
        }
    }
    errors
}

/// The command: exit 0 when applied, 1 for a config it refuses, 3 when something could not
/// be done.
pub fn apply(root: &Root, blocks: &Blocks, mesh_roles: bool, json: bool) -> i32 {
    use crate::cli::exit;
    if mesh_roles {
        // The role, and so the service, is decided over the mesh by `p2p run`; what it
        // wrote last stays (a reboot keeps the node's role until the mesh says otherwise).
        let msg = "p2p.network_token is set with p2p.auto on: the node's Kubernetes role comes from the mesh (`kairos-agent p2p run` configures it; `kairos-agent p2p status` shows it); nothing to do here";
        if json {
            println!("{}", serde_json::json!({"mesh_roles": true, "note": msg}));
        } else {
            println!("{msg}");
        }
        return 0;
    }
    let Some(sm) = service_manager(root) else {
        eprintln!(
            "kairos-agent: no systemd or OpenRC in {}: Kubernetes services need one of them",
            root.path().display()
        );
        return exit::FAILURE;
    };
    let plan = match single::plan(blocks, sm, &Extra::default()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kairos-agent: {e}");
            return exit::INVALID;
        }
    };
    if let Some(kind) = blocks.enabled()
        && !root.exists(rel(&kind.binary()))
    {
        eprintln!(
            "kairos-agent: `{}.enabled` is true but {} is not in the image; build it with `kairosctl kairosify --{} PATH`",
            kind.key(),
            kind.binary(),
            kind.distro()
        );
        return exit::FAILURE;
    }
    let mut errors = write(root, &plan);
    if errors.is_empty() {
        errors = services(root, &plan, sm, false);
    }
    if json {
        let doc = serde_json::json!({
            "service_manager": format!("{sm:?}").to_lowercase(),
            "wrote": plan.write.iter().map(|f| &f.path).collect::<Vec<_>>(),
            "removed": plan.remove,
            "enabled": plan.enable,
            "disabled": plan.disable,
            "errors": errors,
        });
        println!("{doc:#}");
    } else {
        for f in &plan.write {
            println!("wrote    {}", f.path);
        }
        for s in &plan.enable {
            println!("enabled  {s}");
        }
        if plan.enable.is_empty() {
            println!("no Kubernetes block is enabled: k3s, k3s-agent, k0s and k0s-worker are off");
        }
        for e in &errors {
            eprintln!("kairos-agent: {e}");
        }
    }
    if errors.is_empty() { 0 } else { exit::FAILURE }
}
