//! The lifecycle commands of `kairos-agent`: upgrade, rollback, bootentry, state and boot
//! assessment, on the running node (partitions found by label) or on directories given with
//! `--store`/`--esp` (an offline disk, tests).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use kairos_layers::Store;
use kairos_lifecycle::assess::{self, Booted, Verdict};
use kairos_lifecycle::entries::{self, Role};
use kairos_lifecycle::mounts::{self, Mounted};
use kairos_lifecycle::upgrade::{self, Event};
use kairos_lifecycle::{Node, gc, state};

/// Where the node's partitions are; by default found by label and mounted read-write.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// The layer store (a mounted COS_STATE, or COS_RECOVERY with --recovery)
    #[arg(long, value_name = "DIR", requires = "esp", global = true)]
    pub store: Option<PathBuf>,
    /// The mounted ESP (COS_GRUB)
    #[arg(long, value_name = "DIR", requires = "store", global = true)]
    pub esp: Option<PathBuf>,
    /// The mounted COS_OEM (default /oem when it exists)
    #[arg(long, value_name = "DIR", global = true)]
    pub oem: Option<PathBuf>,
    /// Scratch space for downloads and unpacked layers (default: tmpfs under /run/kairos).
    /// A fresh root-only subdirectory is made in DIR and only that is removed afterwards
    #[arg(long, value_name = "DIR", global = true)]
    pub scratch: Option<PathBuf>,
}

/// A node opened for an action; its mounts are restored when it is dropped.
pub struct Opened {
    pub node: Node,
    _mounts: Vec<Mounted>,
    /// Held while the node is open: one agent action at a time (boot-assessment at boot and
    /// a `state` typed right then both mount the ESP at the same place).
    _lock: Option<std::fs::File>,
}

/// Set for the health checks an action runs: a check that calls `kairos-agent state` runs
/// while its parent holds the node lock, and must not wait for it.
pub const LOCK_HELD_ENV: &str = "KAIROS_NODE_LOCK_HELD";

/// The lock file that serialises agent actions on a node.
pub const NODE_LOCK: &str = "run/kairos/agent.lock";

impl NodeArgs {
    pub fn open(&self, root: &Path, recovery: bool) -> Result<Opened> {
        let lock_path = root.join(NODE_LOCK);
        let lock = if std::env::var_os(LOCK_HELD_ENV).is_some() {
            None
        } else {
            Some(
                kairos_sys::fs::lock_exclusive(&lock_path)
                    .with_context(|| format!("locking {}", lock_path.display()))?,
            )
        };
        // Scratch is always a fresh subdirectory of our own (in the user's --scratch DIR, else
        // the tmpfs under /run/kairos), made when needed and removed alone.
        let base = self
            .scratch
            .clone()
            .unwrap_or_else(|| root.join("run/kairos"));
        let scratch = base.join(format!(
            "kairos-scratch-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        let oem = self
            .oem
            .clone()
            .or_else(|| Some(root.join("oem")).filter(|p| p.is_dir()));
        let mut held = Vec::new();
        let (store, esp) = match (&self.store, &self.esp) {
            (Some(s), Some(e)) => (s.clone(), e.clone()),
            _ => {
                let label = if recovery {
                    "COS_RECOVERY"
                } else {
                    "COS_STATE"
                };
                let s = mounts::mount_rw(label, "ext4", &root.join("run/kairos/mnt/store"))?;
                let e = mounts::mount_rw("COS_GRUB", "vfat", &root.join("run/kairos/mnt/efi"))?;
                let paths = (s.path.clone(), e.path.clone());
                held.push(s);
                held.push(e);
                paths
            }
        };
        Ok(Opened {
            node: Node {
                store,
                esp,
                oem,
                scratch,
                tools_root: root.to_path_buf(),
            },
            _mounts: held,
            _lock: lock,
        })
    }
}

/// Creates the scratch directory, root-only (0700): device nodes from layers are made in it.
/// Its name is new for each run; an existing directory there is refused, not reused.
fn make_scratch(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating scratch directory {}", dir.display()))
}

/// Prints upgrade events: JSON lines, or progress for people (bars on a terminal).
pub struct Progress {
    json: bool,
    bar: Option<(String, indicatif::ProgressBar)>,
}

impl Progress {
    pub fn new(json: bool) -> Progress {
        Progress { json, bar: None }
    }

    pub fn event(&mut self, e: Event) {
        if self.json {
            if let Ok(s) = serde_json::to_string(&e) {
                println!("{s}");
            }
            return;
        }
        match e {
            Event::Download {
                digest,
                done,
                total,
            } => {
                if !std::io::stderr().is_terminal() {
                    if done == total {
                        eprintln!("fetched {} ({total} bytes)", short(&digest));
                    }
                    return;
                }
                if self.bar.as_ref().is_none_or(|(d, _)| d != &digest) {
                    let pb = indicatif::ProgressBar::new(total);
                    pb.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    pb.set_message(short(&digest));
                    self.bar = Some((digest.clone(), pb));
                }
                if let Some((_, pb)) = &self.bar {
                    pb.set_position(done);
                    if done >= total {
                        pb.finish();
                    }
                }
            }
            Event::Resolved {
                image,
                manifest_digest,
                layers,
                missing,
            } => eprintln!(
                "{image} ({}): {layers} layers, {missing} to fetch, {} already on the node",
                short(&manifest_digest),
                layers - missing
            ),
            Event::LayerReady {
                diff_id,
                reused,
                bytes,
            } => {
                if !reused {
                    eprintln!("layer {} written ({bytes} bytes)", short(&diff_id));
                }
            }
            Event::Staged { deployment } => eprintln!("staged deployment {deployment}"),
            Event::Activated {
                deployment,
                role,
                tries,
            } => eprintln!(
                "{deployment} boots next as {}{}",
                role.name(),
                tries
                    .map(|t| format!(" ({t} tries before falling back)"))
                    .unwrap_or_default()
            ),
        }
    }
}

fn short(d: &str) -> String {
    let h = d.trim_start_matches("sha256:");
    h[..h.len().min(12)].to_string()
}

/// Options of `upgrade`.
#[derive(Debug, Clone, Args)]
pub struct UpgradeArgs {
    /// The image: REGISTRY/NAME:TAG (or oci:…), oci-layout:DIR[:TAG], ocifile:TAR
    #[arg(long, value_name = "REF", required_unless_present = "apply")]
    pub source: Option<String>,
    /// Upgrade the recovery deployment instead of the active one
    #[arg(long)]
    pub recovery: bool,
    /// Fetch and stage the deployment without making it the next boot
    #[arg(long, conflicts_with = "apply")]
    pub download_only: bool,
    /// Make the deployment staged by --download-only the next boot
    #[arg(long)]
    pub apply: bool,
    /// Reboot when done (also `upgrade.reboot: true` in the config)
    #[arg(long)]
    pub reboot: bool,
    /// Boot attempts before falling back (default: boot_assessment.tries, else 3)
    #[arg(long)]
    pub tries: Option<u32>,
    /// Reach any registry over plain HTTP (also `upgrade.allow-insecure-registries`)
    #[arg(long)]
    pub insecure: bool,
    /// Print progress as JSON lines on stdout
    #[arg(long)]
    pub json: bool,
    /// Trusted boot: the image's signed UKI (`kairosctl build uki --image REF`). It must be
    /// signed by a certificate in the firmware's db and built for exactly this image; both
    /// are checked before anything is written. Required on a node that boots signed UKIs.
    #[arg(long, value_name = "FILE")]
    pub uki: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// The kernel arguments of the entries (console and the like), without Kairos' own keys.
fn base_cmdline(node: &Node) -> String {
    let list = entries::list(&node.esp).unwrap_or_default();
    let src = list
        .iter()
        .find(|e| e.role == Role::Active)
        .or(list.first())
        .map(|e| e.options.clone())
        .unwrap_or_default();
    src.split_whitespace()
        .filter(|w| {
            !w.starts_with("kairos.deployment=")
                && !w.starts_with("kairos.store=")
                && !w.starts_with("kairos.mode=")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn upgrade_cmd(
    a: &UpgradeArgs,
    root: &Path,
    booted: &Booted,
    cfg: &kairos_config::types::Config,
) -> Result<i32> {
    let up = cfg.upgrade.clone().unwrap_or_default();
    if a.insecure || up.allow_insecure_registries.0 {
        kairos_oci::registry::allow_insecure_registries();
    }
    let tries = a
        .tries
        .or(cfg.boot_assessment.as_ref().and_then(|b| b.tries))
        .unwrap_or(3);
    let opened = a.node.open(root, a.recovery)?;
    let node = &opened.node;
    // Trusted boot: the UKI is checked against the firmware before anything is written.
    let trusted_node = entries::list(&node.esp)
        .unwrap_or_default()
        .iter()
        .any(|e| !e.efi.is_empty());
    let uki = match &a.uki {
        Some(path) => {
            let efivars = root.join(kairos_sys::efi::EFIVARS.trim_start_matches('/'));
            let (bytes, pins, signed) = kairos_lifecycle::trust::check_uki(node, &efivars, path)?;
            eprintln!(
                "{}: signed by {}, trusted by the firmware's {}",
                path.display(),
                signed.signer,
                signed.trusted_by
            );
            Some((bytes, pins))
        }
        None if trusted_node && !a.apply => bail!(
            "this node boots signed UKIs: give the new image's UKI with --uki FILE (make it with `kairosctl build uki --image REF --keys DIR`); nothing was changed"
        ),
        None => None,
    };
    let mut p = Progress::new(a.json);
    let role = if a.recovery {
        Role::Recovery
    } else {
        Role::Active
    };
    let mut dep = if a.apply {
        let s = kairos_lifecycle::history::staged(&node.store).context(
            "nothing is staged: run `kairos-agent upgrade --download-only --source …` first",
        )?;
        Store::new(&node.store)
            .read_deployment(&s.deployment)
            .with_context(|| format!("reading staged deployment {}", s.deployment))?
    } else {
        let source = a.source.as_deref().unwrap_or_default();
        make_scratch(&node.scratch)?;
        let r = upgrade::stage(node, source, &base_cmdline(node), &mut |e| p.event(e));
        let _ = std::fs::remove_dir_all(&node.scratch);
        r.with_context(|| format!("upgrading to {source}"))?
    };
    if let Some((bytes, pins)) = &uki {
        // Built for this image? Checked before its entry exists; then it goes on the ESP.
        kairos_lifecycle::trust::check_pins(pins, &dep)?;
        kairos_lifecycle::trust::install_uki(node, &mut dep, bytes)?;
    } else if trusted_node && dep.uki.is_none() {
        bail!(
            "deployment {} has no signed UKI and this node boots only signed UKIs: stage it again with --uki FILE",
            dep.id
        );
    }
    if a.download_only {
        upgrade::mark_staged(node, &dep)?;
        eprintln!(
            "{} staged; `kairos-agent upgrade --apply` makes it the next boot",
            dep.id
        );
        return Ok(0);
    }
    let keep = (booted.mode == "active" || booted.mode == "passive")
        .then_some(booted.deployment.as_str())
        .filter(|d| !d.is_empty());
    let t = (role == Role::Active).then_some(tries);
    upgrade::activate(node, &dep, role, keep, t, &mut |e| p.event(e))?;
    if a.reboot || up.reboot.0 {
        drop(opened);
        kairos_sys::host::reboot().context("rebooting")?;
    }
    Ok(0)
}

pub fn rollback_cmd(node: &NodeArgs, root: &Path, reboot: bool) -> Result<i32> {
    let opened = node.open(root, false)?;
    let (from, to) = upgrade::rollback(&opened.node)?;
    eprintln!("rolled back: {to} boots next, {from} is the fallback");
    if reboot {
        drop(opened);
        kairos_sys::host::reboot().context("rebooting")?;
    }
    Ok(0)
}

pub fn bootentry_cmd(node: &NodeArgs, root: &Path, select: Option<&str>) -> Result<i32> {
    let opened = node.open(root, false)?;
    let esp = &opened.node.esp;
    if let Some(sel) = select {
        let role = Role::parse(sel)
            .with_context(|| format!("--select {sel}: expected active, passive or recovery"))?;
        let list = entries::list(esp)?;
        if !list.iter().any(|e| e.role == role) {
            bail!(
                "--select {sel}: there is no {sel} entry on {}",
                esp.display()
            );
        }
        // A `default` pins the choice (and disables automatic fallback) until `--select active`.
        let conf = esp.join("loader/loader.conf");
        let text = std::fs::read_to_string(&conf).unwrap_or_default();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with("default "))
            .map(str::to_string)
            .collect();
        if role != Role::Active {
            lines.insert(0, format!("default {}*", role.name()));
        }
        kairos_layers::write_atomic(&conf, (lines.join("\n") + "\n").as_bytes())?;
        eprintln!("{} boots next", role.name());
        return Ok(0);
    }
    let list = entries::list(esp)?;
    let order = entries::boot_order(&list);
    for (i, e) in order.iter().enumerate() {
        println!(
            "{}{:9} {:24} {}{}",
            if i == 0 { "* " } else { "  " },
            e.role.name(),
            e.deployment,
            e.file,
            if e.is_bad() {
                "  (spent its tries)"
            } else {
                ""
            }
        );
    }
    Ok(0)
}

fn partitions() -> BTreeMap<String, String> {
    [
        "COS_GRUB",
        "COS_OEM",
        "COS_RECOVERY",
        "COS_STATE",
        "COS_PERSISTENT",
        "COS_LIVE",
    ]
    .iter()
    .filter_map(|l| {
        kairos_sys::blockdev::find_by_label(l)
            .map(|d| (l.to_string(), d.to_string_lossy().into_owned()))
    })
    .collect()
}

/// The node's state; `trust`: with the trusted-boot view (reads and hashes the booted UKI).
pub fn state_value(
    node: &NodeArgs,
    root: &Path,
    booted: &Booted,
    trust: bool,
) -> Result<serde_json::Value> {
    let opened = node.open(root, booted.mode == "recovery" && node.store.is_none())?;
    let mut s = state::gather(&opened.node, booted, partitions())?;
    s.encrypted = state::encrypted(
        &["COS_OEM", "COS_PERSISTENT"],
        &root.join("run/kairos/recovery-keys"),
    );
    s.verified_layers = state::verified_layers();
    let efi = kairos_sys::efi::BootInfo::read(
        &root.join(kairos_sys::efi::EFIVARS.trim_start_matches('/')),
    );
    if trust && efi.secure_boot.is_some() {
        s.trusted_boot = Some(state::trusted_boot(
            &opened.node.esp,
            &efi,
            kairos_sys::tpm::read_sysfs(root, 7),
            kairos_sys::tpm::read_sysfs(root, 11),
        ));
    }
    Ok(serde_json::to_value(s)?)
}

/// Runs the health checks; the first failure says which command and how it failed.
pub fn run_health_checks(checks: &[String], timeout: Duration) -> Result<(), String> {
    for c in checks {
        let mut child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(c)
            .env(LOCK_HELD_ENV, "1")
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("`{c}`: {e}"))?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => break,
                Ok(Some(st)) => return Err(format!("`{c}` exited with {st}")),
                Ok(None) if start.elapsed() > timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("`{c}` did not finish in {}s", timeout.as_secs()));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("`{c}`: {e}")),
            }
        }
    }
    Ok(())
}

pub fn boot_assessment_cmd(
    node: &NodeArgs,
    root: &Path,
    booted: &Booted,
    cfg: &kairos_config::types::Config,
    json: bool,
) -> Result<i32> {
    if !matches!(booted.mode.as_str(), "active" | "passive") {
        eprintln!("boot assessment: nothing to assess in {} mode", booted.mode);
        return Ok(0);
    }
    let ba = cfg.boot_assessment.clone().unwrap_or_default();
    let timeout = Duration::from_secs(ba.timeout.unwrap_or(60));
    let opened = node.open(root, false)?;
    let verdict = assess::assess(&opened.node, booted, &mut || {
        run_health_checks(&ba.health_checks, timeout)
    })?;
    if json {
        println!("{}", serde_json::to_string(&verdict)?);
    }
    match &verdict {
        Verdict::Blessed { deployment } => {
            eprintln!("boot assessment: {deployment} passed; it is kept");
            match gc::collect(&opened.node) {
                Ok(r) if !r.files.is_empty() => {
                    eprintln!("removed {} unused files ({} bytes)", r.files.len(), r.bytes)
                }
                Ok(_) => {}
                Err(e) => eprintln!("warning: garbage collection: {e}"),
            }
        }
        Verdict::Healthy { deployment } => eprintln!("boot assessment: {deployment} healthy"),
        Verdict::Unhealthy {
            deployment,
            reason,
            reboot,
        } => {
            eprintln!("boot assessment: {deployment} failed: {reason}");
            if *reboot {
                eprintln!("rebooting: the next try (or the fallback) boots");
                drop(opened);
                kairos_sys::host::reboot().context("rebooting")?;
            }
            return Ok(1);
        }
        Verdict::FellBack {
            failed,
            reason,
            running,
        } => eprintln!("boot assessment: {failed} failed ({reason}); running {running}"),
        Verdict::NotAssessed { .. } => {}
    }
    Ok(0)
}

/// Options shared by `install` and `manual-install`.
#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// Overwrite a disk that already has a Kairos install (also `install.force: true`)
    #[arg(long)]
    pub force: bool,
    /// Reboot when done (also `install.reboot: true`)
    #[arg(long)]
    pub reboot: bool,
    /// Power off when done (also `install.poweroff: true`)
    #[arg(long)]
    pub poweroff: bool,
    /// Where the install medium is mounted
    #[arg(long, value_name = "DIR", default_value = "/run/initramfs/live")]
    pub medium: PathBuf,
}

/// Installs to a disk. `config_text` becomes OEM's 90_custom.yaml; `stages` runs the
/// install stages (name) against the running system.
pub fn install_cmd(
    a: &InstallArgs,
    device: &str,
    install: &kairos_config::types::Install,
    config_text: &str,
    root: &Path,
    stages: &mut dyn FnMut(&str, Option<&Path>),
) -> Result<i32> {
    use kairos_lifecycle::install;
    let medium = install::medium(&root.join(a.medium.strip_prefix("/").unwrap_or(&a.medium)))?;
    if let Some(uki) = install::medium_uki(&medium) {
        // Trusted medium: its UKI must be one this firmware boots, for this deployment —
        // checked before any disk is touched.
        let efivars = root.join(kairos_sys::efi::EFIVARS.trim_start_matches('/'));
        let fw = kairos_lifecycle::trust::firmware(&efivars)?;
        let (bytes, signed) = kairos_lifecycle::trust::read_and_verify(&uki, &fw)?;
        let pins = kairos_lifecycle::trust::uki_pins(&uki, &bytes)?;
        kairos_lifecycle::trust::check_pins(&pins, &medium.dep)?;
        eprintln!(
            "{}: signed by {}, trusted by the firmware's {}",
            uki.display(),
            signed.signer,
            signed.trusted_by
        );
    }
    let all = install::disks();
    let disk = install::resolve_device(device, &all)?;
    install::check_disk(&disk, a.force || install.force.0)?;
    let parts = install::plan(&medium, &disk)?;
    eprintln!(
        "installing {} ({}) on {} ({} MiB):",
        medium.dep.id,
        medium.dep.image,
        disk.path.display(),
        disk.size >> 20
    );
    for p in &parts {
        eprintln!(
            "  {:<11} {:<15} {:>7} MiB at {:>6} MiB",
            p.name, p.label, p.size_mib, p.start_mib
        );
    }
    stages("kairos-install.pre", None);
    stages("before-install", None);
    install::install(
        &medium,
        &disk,
        &parts,
        config_text,
        root,
        &mut |m| eprintln!("  {m}"),
        &mut |new_root| stages("after-install-chroot", Some(new_root)),
    )
    .with_context(|| format!("installing on {}", disk.path.display()))?;
    stages("after-install", None);
    stages("kairos-install.after", None);
    eprintln!(
        "installed: {} boots from {}",
        medium.dep.id,
        disk.path.display()
    );
    if a.poweroff || install.poweroff.0 {
        kairos_sys::host::poweroff().context("powering off")?;
    } else if a.reboot || install.reboot.0 {
        kairos_sys::host::reboot().context("rebooting")?;
    }
    Ok(0)
}

/// Options of `reset`.
#[derive(Debug, Clone, Args)]
pub struct ResetArgs {
    /// Only when booted in recovery with `kairos.reset` on the kernel cmdline (the boot hook)
    #[arg(long)]
    pub auto: bool,
    /// Keep COS_PERSISTENT (also `reset.reset-persistent: false`)
    #[arg(long)]
    pub keep_persistent: bool,
    /// Wipe COS_OEM too (also `reset.reset-oem: true`)
    #[arg(long)]
    pub reset_oem: bool,
    /// Reboot when done (also `reset.reboot: true`)
    #[arg(long)]
    pub reboot: bool,
    /// Power off when done (also `reset.poweroff: true`)
    #[arg(long)]
    pub poweroff: bool,
}

/// Removes a `default` pin from loader.conf (a pinned recovery entry after a reset would
/// boot recovery again).
fn unpin(esp: &Path) -> Result<()> {
    let conf = esp.join("loader/loader.conf");
    let text = std::fs::read_to_string(&conf).unwrap_or_default();
    if text.lines().any(|l| l.starts_with("default ")) {
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("default "))
            .collect();
        kairos_layers::write_atomic(&conf, (kept.join("\n") + "\n").as_bytes())?;
    }
    Ok(())
}

pub fn reset_cmd(
    a: &ResetArgs,
    root: &Path,
    cmdline: &str,
    cfg: &kairos_config::types::Config,
    stages: &mut dyn FnMut(&str, Option<&Path>),
) -> Result<i32> {
    let booted = Booted::detect(cmdline, &root.join("run/cos"));
    let efi = kairos_sys::efi::BootInfo::read(
        &root.join(kairos_sys::efi::EFIVARS.trim_start_matches('/')),
    );
    let autoreset = kairos_lifecycle::reset::requested(cmdline, efi.entry.as_deref());
    if a.auto && !(booted.mode == "recovery" && autoreset) {
        return Ok(0);
    }
    if booted.mode != "recovery" {
        bail!(
            "reset runs from recovery (booted: {} mode): `kairos-agent bootentry --select recovery` and reboot first",
            if booted.mode.is_empty() {
                "unknown"
            } else {
                &booted.mode
            }
        );
    }
    let r = cfg.reset.clone().unwrap_or_default();
    let opts = kairos_lifecycle::reset::ResetOptions {
        reset_persistent: !a.keep_persistent && r.reset_persistent.is_none_or(|b| b.0),
        reset_oem: a.reset_oem || r.reset_oem.0,
    };
    let esp = mounts::mount_rw("COS_GRUB", "vfat", &root.join("run/kairos/mnt/efi"))?;
    stages("kairos-reset.pre", None);
    stages("before-reset", None);
    kairos_lifecycle::reset::reset(
        &root.join("run/initramfs/cos-state"),
        &booted.deployment,
        &esp.path,
        opts,
        root,
        &mut |m| eprintln!("  {m}"),
    )
    .context("resetting")?;
    unpin(&esp.path)?;
    stages("after-reset", None);
    stages("kairos-reset.after", None);
    eprintln!(
        "reset: COS_STATE re-created from {}{}{}",
        booted.deployment,
        if opts.reset_persistent {
            ", COS_PERSISTENT wiped"
        } else {
            ""
        },
        if opts.reset_oem {
            ", COS_OEM wiped"
        } else {
            ""
        }
    );
    drop(esp);
    if a.poweroff || r.poweroff.0 {
        kairos_sys::host::poweroff().context("powering off")?;
    } else if a.reboot || r.reboot.0 || a.auto {
        kairos_sys::host::reboot().context("rebooting")?;
    }
    Ok(0)
}
