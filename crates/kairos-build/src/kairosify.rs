//! The Kairos layer: what `kairosify` adds on top of a distribution image so that it boots
//! and configures itself — the agent, immucore, service hooks for the image's init system,
//! default configs under `/system/oem`, `/etc/kairos-release`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub use kairos_sys::InitSystem;

/// The init system an image uses, detected from its files ([`kairos_sys::Root::init_system`]).
pub fn detect_init(rootfs: &Path) -> Result<InitSystem> {
    kairos_sys::Root::new(rootfs).init_system().with_context(|| {
        format!(
            "no init system found in {}: install systemd (or OpenRC), or busybox with an /etc/inittab",
            rootfs.display()
        )
    })
}

/// The static binaries that go into the image.
pub struct Binaries {
    pub agent: PathBuf,
    pub immucore: PathBuf,
    /// The user's k3s and k0s binaries (`kairosctl kairosify --k3s PATH`, `--k0s PATH`):
    /// none can be fetched here, and Kairos images carry them in the image.
    pub k3s: Option<PathBuf>,
    pub k0s: Option<PathBuf>,
}

/// A hook the init system runs: service name, `kairos-agent` arguments, busybox inittab
/// action, OpenRC dependencies.
struct Hook {
    name: &'static str,
    args: &'static str,
    inittab: &'static str,
    openrc_depend: &'static str,
}

/// The stages, then boot assessment once the boot stage is done.
const HOOKS: &[Hook] = &[
    Hook {
        name: "cos-setup-fs",
        args: "run-stage fs",
        inittab: "sysinit",
        openrc_depend: "need localmount",
    },
    Hook {
        name: "cos-setup-boot",
        args: "run-stage boot",
        inittab: "sysinit",
        openrc_depend: "need localmount",
    },
    Hook {
        name: "cos-setup-network",
        args: "run-stage network",
        inittab: "once",
        openrc_depend: "need net",
    },
    Hook {
        name: "kairos-boot-assessment",
        args: "boot-assessment",
        inittab: "once",
        openrc_depend: "need localmount\n    after cos-setup-boot",
    },
    Hook {
        name: "kairos-auto-reset",
        args: "reset --auto",
        inittab: "once",
        openrc_depend: "need localmount\n    after cos-setup-boot",
    },
    Hook {
        name: "kairos-auto-install",
        args: "install --auto",
        inittab: "once",
        openrc_depend: "need localmount\n    after cos-setup-boot",
    },
];

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p)?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// systemd units that run the stages (Kairos' `cos-setup-*` names), enabled by symlink.
fn systemd_units(layer: &Path) -> Result<()> {
    let units = [
        (
            "cos-setup-fs.service",
            "[Unit]\nDescription=Kairos fs stage\nDefaultDependencies=no\nAfter=local-fs.target\nWants=local-fs.target\nBefore=sysinit.target\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/kairos-agent run-stage fs\n\n[Install]\nWantedBy=sysinit.target\n",
            "sysinit.target",
        ),
        (
            "cos-setup-boot.service",
            "[Unit]\nDescription=Kairos boot stage\nBefore=getty.target systemd-user-sessions.service\nAfter=cos-setup-fs.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/kairos-agent run-stage boot\n\n[Install]\nWantedBy=multi-user.target\n",
            "multi-user.target",
        ),
        (
            "cos-setup-network.service",
            "[Unit]\nDescription=Kairos network stage\nWants=network-online.target\nAfter=network-online.target cos-setup-boot.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/kairos-agent run-stage network\n\n[Install]\nWantedBy=multi-user.target\n",
            "multi-user.target",
        ),
        (
            "kairos-boot-assessment.service",
            "[Unit]\nDescription=Kairos boot assessment (bless or fall back)\nAfter=cos-setup-boot.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/kairos-agent boot-assessment\n\n[Install]\nWantedBy=multi-user.target\n",
            "multi-user.target",
        ),
        (
            "kairos-auto-reset.service",
            "[Unit]\nDescription=Kairos reset from recovery (kairos.reset on the cmdline)\nAfter=cos-setup-boot.service\n\n[Service]\nType=oneshot\nExecStart=/usr/bin/kairos-agent reset --auto\nStandardOutput=journal+console\nStandardError=journal+console\n\n[Install]\nWantedBy=multi-user.target\n",
            "multi-user.target",
        ),
        (
            "kairos-auto-install.service",
            "[Unit]\nDescription=Kairos unattended install (live media with install.auto)\nAfter=cos-setup-boot.service\n\n[Service]\nType=oneshot\nExecStart=/usr/bin/kairos-agent install --auto\nStandardOutput=journal+console\nStandardError=journal+console\n\n[Install]\nWantedBy=multi-user.target\n",
            "multi-user.target",
        ),
    ];
    let units = units.into_iter().chain([
        ("kairos-p2p.service", P2P_SYSTEMD_UNIT, "multi-user.target"),
        (
            "kairos-kubernetes.service",
            KUBERNETES_SYSTEMD_UNIT,
            "multi-user.target",
        ),
    ]);
    for (name, text, target) in units {
        write(
            &layer.join("usr/lib/systemd/system").join(name),
            text,
            0o644,
        )?;
        let wants = layer.join(format!("etc/systemd/system/{target}.wants"));
        fs::create_dir_all(&wants)?;
        let link = wants.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/usr/lib/systemd/system/{name}"), link)?;
    }
    Ok(())
}

/// OpenRC services for the stages, the mesh and Kubernetes.
fn openrc_services(layer: &Path) -> Result<()> {
    let hooks = HOOKS.iter().map(|h| {
        let (name, args, depend) = (h.name, h.args, h.openrc_depend);
        (
            name,
            format!(
                "#!/sbin/openrc-run\ndescription=\"Kairos: {args}\"\ndepend() {{\n    {depend}\n}}\nstart() {{\n    /usr/bin/kairos-agent {args}\n}}\n"
            ),
        )
    });
    let services = hooks.chain([
        (P2P_SERVICE, P2P_OPENRC.to_string()),
        ("kairos-kubernetes", KUBERNETES_OPENRC.to_string()),
    ]);
    // Each service in /etc/init.d, started from the default runlevel.
    for (name, text) in services {
        write(&layer.join(format!("etc/init.d/{name}")), &text, 0o755)?;
        let lvl = layer.join("etc/runlevels/default");
        fs::create_dir_all(&lvl)?;
        let link = lvl.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/etc/init.d/{name}"), link)?;
    }
    Ok(())
}

/// `kairos-agent kubernetes apply` at every boot, after the network stage and before the
/// Kubernetes services: the config's `k3s:`… block decides which one runs (it enables and
/// starts it; a block turned off is disabled). Busybox images get none: k3s and k0s need
/// systemd or OpenRC.
const KUBERNETES_SYSTEMD_UNIT: &str = "[Unit]\nDescription=Kairos Kubernetes services from the config (k3s, k3s-agent, k0s, k0s-worker)\nWants=network-online.target\nAfter=network-online.target cos-setup-network.service\nBefore=k3s.service k3s-agent.service k0scontroller.service k0sworker.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/kairos-agent kubernetes apply\n\n[Install]\nWantedBy=multi-user.target\n";

const KUBERNETES_OPENRC: &str = "#!/sbin/openrc-run\ndescription=\"Kairos Kubernetes services from the config\"\ndepend() {\n    need net\n    after cos-setup-network\n    before k3s k3s-agent k0scontroller k0sworker\n}\nstart() {\n    /usr/bin/kairos-agent kubernetes apply\n}\n";

/// The k3s units as k3s' installer writes them (not enabled: `kubernetes apply` enables the
/// one the config asks for, with its drop-in).
fn k3s_unit(agent: bool) -> String {
    let (desc, kind) = if agent {
        ("Lightweight Kubernetes (agent)", "exec")
    } else {
        ("Lightweight Kubernetes", "notify")
    };
    format!(
        "[Unit]\nDescription={desc}\nDocumentation=https://k3s.io\nWants=network-online.target\nAfter=network-online.target\n\n[Install]\nWantedBy=multi-user.target\n\n[Service]\nType={kind}\nEnvironmentFile=-/etc/default/%N\nEnvironmentFile=-/etc/sysconfig/%N\nKillMode=process\nDelegate=yes\nLimitNOFILE=1048576\nLimitNPROC=infinity\nLimitCORE=infinity\nTasksMax=infinity\nTimeoutStartSec=0\nRestart=always\nRestartSec=5s\nExecStartPre=-/sbin/modprobe br_netfilter\nExecStartPre=-/sbin/modprobe overlay\nExecStart=/usr/bin/k3s {}\n",
        if agent { "agent" } else { "server" }
    )
}

/// The k0s units as `k0s install` writes them.
fn k0s_unit(worker: bool) -> String {
    let (desc, sub) = if worker {
        ("k0s - Zero Friction Kubernetes (worker)", "worker")
    } else {
        ("k0s - Zero Friction Kubernetes", "controller")
    };
    format!(
        "[Unit]\nDescription={desc}\nDocumentation=https://docs.k0sproject.io\nConditionFileIsExecutable=/usr/bin/k0s\nAfter=network-online.target\nWants=network-online.target\n\n[Service]\nStartLimitInterval=5\nStartLimitBurst=10\nExecStart=/usr/bin/k0s {sub}\nRestartSec=10\nDelegate=yes\nKillMode=process\nLimitCORE=infinity\nTasksMax=infinity\nTimeoutStartSec=0\nLimitNOFILE=999999\nRestart=always\n\n[Install]\nWantedBy=multi-user.target\n"
    )
}

/// Copies the user's k3s / k0s into the layer, with their systemd units.
fn kubernetes_binaries(bins: &Binaries, init: InitSystem, layer: &Path) -> Result<()> {
    for (src, name) in [(&bins.k3s, "k3s"), (&bins.k0s, "k0s")] {
        let Some(src) = src else { continue };
        if init == InitSystem::Busybox {
            bail!(
                "--{name}: this image boots with busybox init, and {name} needs systemd or OpenRC; kairosify an image with one of them"
            );
        }
        let dest = layer.join("usr/bin").join(name);
        fs::copy(src, &dest).with_context(|| format!("copying --{name} {}", src.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
        if init == InitSystem::Systemd {
            let units = if name == "k3s" {
                [("k3s", k3s_unit(false)), ("k3s-agent", k3s_unit(true))]
            } else {
                [
                    ("k0scontroller", k0s_unit(false)),
                    ("k0sworker", k0s_unit(true)),
                ]
            };
            for (unit, text) in units {
                write(
                    &layer.join(format!("usr/lib/systemd/system/{unit}.service")),
                    &text,
                    0o644,
                )?;
            }
        }
    }
    Ok(())
}

/// The mesh daemon's service name on every init system (Go Kairos: `edgevpn@kairos`).
pub const P2P_SERVICE: &str = "kairos-p2p";

/// systemd: started after the network stage, skipped (not failed) without a token, restarted
/// on failure, memory capped by the cgroup (docs/mesh.md).
const P2P_SYSTEMD_UNIT: &str = "[Unit]\nDescription=Kairos P2P mesh (p2p.network_token)\nWants=network-online.target\nAfter=network-online.target cos-setup-network.service\n\n[Service]\nExecCondition=/usr/bin/kairos-agent p2p enabled\nExecStart=/usr/bin/kairos-agent p2p run\nRestart=on-failure\nRestartSec=5\nLimitNOFILE=49152\nMemoryHigh=96M\nMemoryMax=128M\n\n[Install]\nWantedBy=multi-user.target\n";

/// OpenRC: supervised; without a token `start_pre` says so and the service does not start.
const P2P_OPENRC: &str = "#!/sbin/openrc-run\ndescription=\"Kairos P2P mesh (p2p.network_token)\"\nsupervisor=supervise-daemon\ncommand=/usr/bin/kairos-agent\ncommand_args=\"p2p run\"\nrespawn_delay=5\ndepend() {\n    need net\n    after cos-setup-network\n}\nstart_pre() {\n    /usr/bin/kairos-agent p2p enabled || { eerror \"no p2p.network_token in the config: the mesh is off\"; return 1; }\n}\n";

/// busybox init: once, after the sysinit stages; exits at once without a token.
const P2P_INITTAB: &str = "::once:/usr/bin/kairos-agent p2p run --if-enabled\n";

/// busybox init: the stages as inittab entries after the image's own.
fn busybox_inittab(rootfs: &Path, layer: &Path) -> Result<()> {
    let orig = kairos_sys::beneath::Dir::open(rootfs)
        .and_then(|d| d.read_to_string(Path::new("etc/inittab")))
        .context("reading the image's /etc/inittab (a regular file inside the image)")?;
    let mut sysinit = String::new();
    let mut rest = String::new();
    for l in orig.lines() {
        if l.contains(":sysinit:") {
            sysinit.push_str(l);
            sysinit.push('\n');
        } else {
            rest.push_str(l);
            rest.push('\n');
        }
    }
    let mut text = sysinit;
    for h in HOOKS {
        text.push_str(&format!(
            "::{}:/usr/bin/kairos-agent {}\n",
            h.inittab, h.args
        ));
    }
    text.push_str(P2P_INITTAB);
    text.push_str(&rest);
    write(&layer.join("etc/inittab"), &text, 0o644)
}

/// Kairos' default configs: the writable-path layout and the accounts every node has.
const DEFAULT_CONFIGS: &[(&str, &str)] = &[(
    "00_kairos.yaml",
    "name: Kairos defaults\nstages:\n  initramfs:\n  - name: writable dirs\n    directories:\n    - {path: /usr/local/cloud-config, permissions: 0755}\n    - {path: /var/log, permissions: 0755}\n",
)];

/// Writes the Kairos layer for `rootfs` into `layer` (an empty directory).
pub fn kairos_layer(
    rootfs: &Path,
    bins: &Binaries,
    version: &str,
    layer: &Path,
) -> Result<InitSystem> {
    crate::lint::check_companion(&bins.agent, "kairos-agent")?;
    crate::lint::check_companion(&bins.immucore, "kairos-immucore")?;
    crate::lint::require_clean(rootfs)?;
    let init = detect_init(rootfs)?;
    fs::create_dir_all(layer.join("usr/bin"))?;
    for (src, name) in [
        (&bins.agent, "kairos-agent"),
        (&bins.immucore, "kairos-immucore"),
    ] {
        fs::copy(src, layer.join("usr/bin").join(name))
            .with_context(|| format!("copying {}", src.display()))?;
        fs::set_permissions(
            layer.join("usr/bin").join(name),
            fs::Permissions::from_mode(0o755),
        )?;
    }
    bundle_tools(&layer.join(kairos_sys::tools::BUNDLE))?;
    for d in ["oem", "usr/local/cloud-config", "system/oem", "run/cos"] {
        fs::create_dir_all(layer.join(d))?;
    }
    for (name, text) in DEFAULT_CONFIGS {
        write(&layer.join("system/oem").join(name), text, 0o644)?;
    }
    let osr = kairos_sys::beneath::Dir::open(rootfs)
        .and_then(|d| d.read_to_string(Path::new("etc/os-release")))
        .unwrap_or_default();
    let kv = kairos_sys::sysinfo::parse_key_values(&osr);
    let flavor = kv.get("ID").cloned().unwrap_or_else(|| "unknown".into());
    let init_name = match init {
        InitSystem::Systemd => "systemd",
        InitSystem::OpenRc => "openrc",
        InitSystem::Busybox => "busybox",
    };
    write(
        &layer.join("etc/kairos-release"),
        &format!(
            "KAIROS_NAME=\"kairos-{flavor}\"\nKAIROS_VERSION=\"{version}\"\nKAIROS_FLAVOR=\"{flavor}\"\nKAIROS_INIT=\"{init_name}\"\n"
        ),
        0o644,
    )?;
    match init {
        InitSystem::Systemd => systemd_units(layer)?,
        InitSystem::OpenRc => openrc_services(layer)?,
        InitSystem::Busybox => busybox_inittab(rootfs, layer)?,
    }
    kubernetes_binaries(bins, init, layer)?;
    Ok(init)
}

/// Copies the build host's filesystem tools (mkfs.erofs for upgrades, mke2fs and mkfs.fat for
/// the installer) with every library they link and the dynamic loader into `dir`: the node
/// runs them whatever its distribution ships (busybox images have none of them).
fn bundle_tools(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let copy = |src: &Path, name: &str| -> Result<()> {
        let dest = dir.join(name);
        if dest.exists() {
            return Ok(());
        }
        fs::copy(src, &dest).with_context(|| format!("copying {}", src.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
        Ok(())
    };
    for (name, package) in [
        ("mkfs.erofs", "erofs-utils"),
        ("mke2fs", "e2fsprogs"),
        ("mkfs.fat", "dosfstools"),
    ] {
        let tool = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain(["/sbin".into(), "/usr/sbin".into()])
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .with_context(|| format!("{name} not found: install the Debian package {package}"))?;
        let out = kairos_sys::exec::Cmd::new("ldd").arg(&tool).run()?;
        copy(&tool, name)?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
            let path = match line.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            let Some(path) = path.filter(|p| p.starts_with('/')) else {
                continue;
            };
            let lib = Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            copy(Path::new(path), &lib)?;
        }
    }
    if !dir.join("ld-linux-x86-64.so.2").is_file() {
        bail!("ldd named no ld-linux-x86-64.so.2");
    }
    Ok(())
}

/// True when the tree already carries the Kairos layer.
pub fn is_kairosified(rootfs: &Path) -> bool {
    rootfs.join("etc/kairos-release").exists() && rootfs.join("usr/bin/kairos-agent").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(init: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("boot")).unwrap();
        fs::create_dir_all(r.join("lib/modules/6.1.0-test")).unwrap();
        fs::write(r.join("boot/vmlinuz-6.1.0-test"), "k").unwrap();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/os-release"), "ID=test\n").unwrap();
        match init {
            "busybox" => {
                fs::create_dir_all(r.join("etc")).unwrap();
                fs::create_dir_all(r.join("bin")).unwrap();
                fs::write(r.join("bin/busybox"), "").unwrap();
                fs::write(
                    r.join("etc/inittab"),
                    "::sysinit:/etc/init.d/rcS\nttyS0::respawn:/sbin/getty -L 115200 ttyS0\n",
                )
                .unwrap();
            }
            "systemd" => {
                fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
                fs::write(r.join("usr/lib/systemd/systemd"), "").unwrap();
            }
            _ => {}
        }
        d
    }

    /// Stand-ins for the companion binaries: busybox-static is a real static x86-64
    /// executable, which is all kairosify checks.
    fn bins(d: &Path) -> Binaries {
        fs::copy("/bin/busybox", d.join("agent")).unwrap();
        fs::copy("/bin/busybox", d.join("immucore")).unwrap();
        Binaries {
            agent: d.join("agent"),
            immucore: d.join("immucore"),
            k3s: None,
            k0s: None,
        }
    }

    /// The Kairos layer for the image tree `r`, in a new directory.
    fn layer(r: &Path) -> (tempfile::TempDir, Result<InitSystem>) {
        let l = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let made = kairos_layer(r, &bins(b.path()), "1", l.path());
        (l, made)
    }

    #[test]
    fn an_inittab_symlinked_to_a_host_file_is_not_copied() {
        let r = base("busybox");
        let host = tempfile::tempdir().unwrap();
        let secret = host.path().join("secret");
        fs::write(&secret, "::sysinit:host secret\n").unwrap();
        fs::remove_file(r.path().join("etc/inittab")).unwrap();
        std::os::unix::fs::symlink(&secret, r.path().join("etc/inittab")).unwrap();
        // The link names a file the image does not have: refused, nothing of the host copied.
        let (l, made) = layer(r.path());
        let e = made.unwrap_err();
        assert!(format!("{e:#}").contains("/etc/inittab"), "{e:#}");
        let tab = fs::read_to_string(l.path().join("etc/inittab")).unwrap_or_default();
        assert!(!tab.contains("host secret"), "{tab}");
    }

    #[test]
    fn busybox_stages_run_after_sysinit_before_getty() {
        let r = base("busybox");
        let (l, made) = layer(r.path());
        assert_eq!(made.unwrap(), InitSystem::Busybox);
        let tab = fs::read_to_string(l.path().join("etc/inittab")).unwrap();
        assert_eq!(
            tab,
            "::sysinit:/etc/init.d/rcS\n::sysinit:/usr/bin/kairos-agent run-stage fs\n::sysinit:/usr/bin/kairos-agent run-stage boot\n::once:/usr/bin/kairos-agent run-stage network\n::once:/usr/bin/kairos-agent boot-assessment\n::once:/usr/bin/kairos-agent reset --auto\n::once:/usr/bin/kairos-agent install --auto\n::once:/usr/bin/kairos-agent p2p run --if-enabled\nttyS0::respawn:/sbin/getty -L 115200 ttyS0\n"
        );
        assert!(
            fs::read_to_string(l.path().join("etc/kairos-release"))
                .unwrap()
                .contains("KAIROS_INIT=\"busybox\"")
        );
        assert!(l.path().join("usr/bin/kairos-agent").exists());
    }

    #[test]
    fn systemd_units_enabled() {
        let r = base("systemd");
        let (l, made) = layer(r.path());
        made.unwrap();
        let link = fs::read_link(
            l.path()
                .join("etc/systemd/system/multi-user.target.wants/cos-setup-boot.service"),
        )
        .unwrap();
        assert_eq!(
            link,
            Path::new("/usr/lib/systemd/system/cos-setup-boot.service")
        );
        // The mesh unit is installed and wanted; its ExecCondition keeps it off without a
        // token.
        let p2p =
            fs::read_to_string(l.path().join("usr/lib/systemd/system/kairos-p2p.service")).unwrap();
        assert!(
            p2p.contains("ExecCondition=/usr/bin/kairos-agent p2p enabled"),
            "{p2p}"
        );
        assert!(p2p.contains("MemoryMax=128M"), "{p2p}");
        assert!(
            l.path()
                .join("etc/systemd/system/multi-user.target.wants/kairos-p2p.service")
                .is_symlink()
        );
    }

    /// `--k3s PATH`: the binary and both units in the image, not enabled — the
    /// kairos-kubernetes unit (wanted at boot) enables the one the config asks for. The
    /// "k3s" here is a stand-in (busybox): kairosify only copies it.
    #[test]
    fn k3s_goes_into_a_systemd_image_and_kubernetes_apply_runs_at_boot() {
        let r = base("systemd");
        let l = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let mut bins = bins(b.path());
        bins.k3s = Some(PathBuf::from("/bin/busybox"));
        kairos_layer(r.path(), &bins, "1", l.path()).unwrap();
        let k3s = l.path().join("usr/bin/k3s");
        assert_eq!(
            fs::metadata(&k3s).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let unit = fs::read_to_string(l.path().join("usr/lib/systemd/system/k3s.service")).unwrap();
        assert!(
            unit.contains("EnvironmentFile=-/etc/sysconfig/%N"),
            "{unit}"
        );
        assert!(unit.contains("ExecStart=/usr/bin/k3s server"), "{unit}");
        let agent =
            fs::read_to_string(l.path().join("usr/lib/systemd/system/k3s-agent.service")).unwrap();
        assert!(agent.contains("ExecStart=/usr/bin/k3s agent"), "{agent}");
        assert!(
            !l.path()
                .join("etc/systemd/system/multi-user.target.wants/k3s.service")
                .exists(),
            "k3s is enabled by the config, not by kairosify"
        );
        let hook = fs::read_to_string(
            l.path()
                .join("usr/lib/systemd/system/kairos-kubernetes.service"),
        )
        .unwrap();
        assert!(
            hook.contains("ExecStart=/usr/bin/kairos-agent kubernetes apply"),
            "{hook}"
        );
        assert!(
            hook.contains("Before=k3s.service k3s-agent.service"),
            "{hook}"
        );
        assert!(
            l.path()
                .join("etc/systemd/system/multi-user.target.wants/kairos-kubernetes.service")
                .is_symlink()
        );
        // Busybox init cannot run k3s: said at build time.
        let r = base("busybox");
        let l = tempfile::tempdir().unwrap();
        let e = kairos_layer(r.path(), &bins, "1", l.path()).unwrap_err();
        assert!(
            format!("{e:#}").contains("needs systemd or OpenRC"),
            "{e:#}"
        );
    }

    #[test]
    fn openrc_services_include_the_mesh() {
        let r = base("none");
        fs::create_dir_all(r.path().join("sbin")).unwrap();
        fs::write(r.path().join("sbin/openrc"), "").unwrap();
        let (l, made) = layer(r.path());
        assert_eq!(made.unwrap(), InitSystem::OpenRc);
        let svc = fs::read_to_string(l.path().join("etc/init.d/kairos-p2p")).unwrap();
        assert!(svc.contains("supervisor=supervise-daemon"), "{svc}");
        assert!(svc.contains("kairos-agent p2p enabled"), "{svc}");
        assert!(
            l.path()
                .join("etc/runlevels/default/kairos-p2p")
                .is_symlink()
        );
        let k8s = fs::read_to_string(l.path().join("etc/init.d/kairos-kubernetes")).unwrap();
        assert!(
            k8s.contains("/usr/bin/kairos-agent kubernetes apply"),
            "{k8s}"
        );
        assert!(
            l.path()
                .join("etc/runlevels/default/kairos-kubernetes")
                .is_symlink()
        );
    }

    #[test]
    fn refuses_images_without_kernel_or_init() {
        let r = base("none");
        let l = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let e = kairos_layer(r.path(), &bins(b.path()), "1", l.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no init system"), "{e}");
        let r = tempfile::tempdir().unwrap();
        fs::create_dir_all(r.path().join("usr/lib/systemd")).unwrap();
        fs::write(r.path().join("usr/lib/systemd/systemd"), "").unwrap();
        let e = kairos_layer(r.path(), &bins(b.path()), "1", l.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no kernel"), "{e}");
    }
}
