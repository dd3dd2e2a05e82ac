//! The boot sequence, run as PID 1 of the initramfs: every step is timed into the boot
//! timeline, and the first failure stops the boot with a summary.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kairos_layers::Store;
use kairos_sys::mount::{MountFlags, bind, mount, move_mount};
use kairos_sys::{Root, blockdev, kmod, loopdev};

use crate::crypt;
use crate::plan::{self, LayerCheck, Mode, Plan};

pub const SYSROOT: &str = "/sysroot";
/// Where a netboot initrd carries the layer store.
const NETBOOT_STORE: &str = "/kairos-store";
/// The tmpfs holding a live system's writable root layer.
const LIVE_UPPER: &str = "/run/kairos/live";
const OVERLAY_BASE: &str = "/run/overlay";
/// Written by kairosify: module files to load, in dependency order, one per line.
pub const MODULE_LIST: &str = "/lib/modules/kairos-initrd.load";

/// A step of the timeline.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub ms: u128,
    pub ok: bool,
    pub detail: String,
}

pub struct Boot {
    pub plan: Option<Plan>,
    start: Instant,
    pub steps: Vec<Step>,
    /// Every mount made for the new root, for /etc/fstab: (spec, target, type, options).
    pub fstab: Vec<(String, String, String, String)>,
    /// The kernel cmdline, read once; the stages get it too.
    cmdline: String,
    debug: bool,
    /// The TPM took `enter-initrd` into PCR 11: `leave-initrd` follows at the switch.
    measured: bool,
}

/// Prints to the console and the kernel log.
pub fn say(msg: &str) {
    let line = format!("kairos-immucore: {msg}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Ok(mut k) = fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = k.write_all(line.as_bytes());
    }
}

fn mkdirs(p: &str) -> Result<()> {
    fs::create_dir_all(p).with_context(|| format!("creating {p}"))
}

fn do_mount(src: &str, target: &str, fstype: &str, flags: MountFlags, data: &str) -> Result<()> {
    mkdirs(target)?;
    mount(src, target, fstype, flags, data)
        .with_context(|| format!("mounting {src} ({fstype}) on {target} [{data}]"))
}

impl Boot {
    pub fn new() -> Boot {
        Boot {
            plan: None,
            start: Instant::now(),
            steps: Vec::new(),
            fstab: Vec::new(),
            cmdline: String::new(),
            debug: false,
            measured: false,
        }
    }

    /// True once COS_OEM is mounted in the new root (the failure summary goes there).
    pub fn oem_mounted(&self) -> bool {
        self.fstab.iter().any(|(_, target, _, _)| target == "/oem")
    }

    fn step<T>(&mut self, name: &str, f: impl FnOnce(&mut Boot) -> Result<T>) -> Result<T> {
        let t0 = Instant::now();
        if self.debug {
            say(&format!("step {name}"));
        }
        let r = f(self);
        let detail = match &r {
            Ok(_) => String::new(),
            Err(e) => format!("{e:#}"),
        };
        self.steps.push(Step {
            name: name.into(),
            ms: t0.elapsed().as_millis(),
            ok: r.is_ok(),
            detail,
        });
        r.with_context(|| format!("step {name}"))
    }

    /// Mounts the API filesystems the rest needs.
    pub fn early_mounts(&mut self) -> Result<()> {
        self.step("mount-api-filesystems", |_| {
            let nodev = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
            do_mount("proc", "/proc", "proc", nodev, "")?;
            do_mount("sysfs", "/sys", "sysfs", nodev, "")?;
            do_mount(
                "devtmpfs",
                "/dev",
                "devtmpfs",
                MountFlags::NOSUID,
                "mode=0755",
            )?;
            do_mount(
                "tmpfs",
                "/run",
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NODEV,
                "mode=0755",
            )?;
            mkdirs("/run/cos")?;
            mkdirs("/run/kairos")?;
            Ok(())
        })
    }

    pub fn run(&mut self) -> Result<()> {
        self.cmdline = fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
        let cmdline = self.cmdline.clone();
        // The cmdline alone must make sense before anything else happens.
        self.step("read-cmdline", |_| Ok(Plan::from_cmdline(&cmdline)?))?;
        self.step("load-modules", |_| load_modules())?;
        let efi = self.step("read-efi-variables", |_| Ok(read_efi()))?;
        let plan = self.step("plan", |_| {
            Ok(Plan::from_boot(&cmdline, efi.entry.as_deref())?)
        })?;
        self.debug = plan.debug;
        self.plan = Some(plan.clone());
        say(&format!(
            "booting deployment {} ({:?}) from {}{}",
            plan.deployment,
            plan.mode,
            plan.store_label,
            efi.entry
                .as_deref()
                .map(|e| format!(", boot entry {e}"))
                .unwrap_or_default()
        ));
        if !plan.pinned_layers.is_empty() {
            self.step("check-secure-boot", |_| check_secure_boot(&plan, &efi))?;
        }
        if efi.stub_pcr.is_some() {
            self.step("measure-enter-initrd", |b| {
                b.measured = measure_phase("enter-initrd")?;
                copy_stub_extras();
                Ok(())
            })?;
        }
        let store_mnt = plan.mode.store_mountpoint();
        if plan.store_label == "initrd" {
            // Netboot: the store came inside the initrd; it is shown where a live medium is.
            self.step("mount-store", |_| {
                mkdirs(store_mnt)?;
                bind(NETBOOT_STORE, store_mnt)
                    .with_context(|| format!("binding {NETBOOT_STORE}"))?;
                Ok(())
            })?;
        } else {
            let store_dev = self.step("find-store", |_| {
                wait_for_label(&plan.store_label, plan.timeout)
            })?;
            self.step("mount-store", |b| {
                // ext4 on a disk, ISO 9660 on install media: the superblock says which.
                let fstype = blockdev::probe(&store_dev)
                    .map(|p| p.fstype)
                    .unwrap_or("ext4");
                do_mount(
                    &store_dev.to_string_lossy(),
                    store_mnt,
                    fstype,
                    MountFlags::RDONLY,
                    "",
                )?;
                b.fstab.push((
                    format!("LABEL={}", plan.store_label),
                    store_mnt.into(),
                    fstype.into(),
                    "ro".into(),
                ));
                Ok(())
            })?;
        }
        let store = Store::new(store_mnt);
        let dep = self.step("read-deployment", |_| {
            Ok(store.read_deployment(&plan.deployment)?)
        })?;
        let lowers = self.step("mount-layers", |_| {
            let mut lowers = Vec::new();
            check_pinned(&dep, &plan.pinned_layers)?;
            let n = dep.layers.len();
            for (i, layer) in dep.layers.iter().enumerate() {
                let refused = || {
                    if plan.pinned_layers.is_empty() {
                        format!("layer {}", layer.digest)
                    } else {
                        format!(
                            "layer {} of {n} ({}, {}) is not the one the signed boot entry names: it was changed on disk, so this boot is refused",
                            i + 1,
                            layer.digest,
                            layer.image.file
                        )
                    }
                };
                let check = crate::plan::layer_check(&plan, i, layer).with_context(refused)?;
                let img = store.root.join(&layer.image.file);
                let mnt = format!("/run/kairos/layers/{i}");
                let source = match check {
                    LayerCheck::Verity { verity, read_all } => {
                        let dev = verity_layer(i, n, layer, &img, &verity, read_all)?;
                        dev.to_string_lossy().into_owned()
                    }
                    check => {
                        store
                            .verify(&layer.image, check == LayerCheck::Hash)
                            .with_context(refused)?;
                        let dev = loopdev::attach_read_only(&img)
                            .with_context(|| format!("attaching {}", img.display()))?;
                        // The mount holds the device once made; the handle goes after.
                        let path = dev.path.to_string_lossy().into_owned();
                        do_mount(&path, &mnt, "erofs", MountFlags::RDONLY, "")?;
                        lowers.push(mnt);
                        continue;
                    }
                };
                do_mount(&source, &mnt, "erofs", MountFlags::RDONLY, "").map_err(|e| {
                    // Lazy checking: the mount is the first read.
                    let name = kairos_layers::verity::dm_name(i);
                    if kairos_sys::dm::verity_status(&name)
                        .is_ok_and(|s| s == kairos_sys::dm::Verity::Corrupted)
                    {
                        e.context(format!(
                            "layer {} of {n} ({}, {}): a block does not match the signed root hash: the layer image was changed on disk, so this boot is refused{REPAIR}",
                            i + 1,
                            layer.digest,
                            layer.image.file
                        ))
                    } else {
                        e
                    }
                })?;
                lowers.push(mnt);
            }
            if lowers.is_empty() {
                bail!("deployment {} has no layers", dep.id);
            }
            lowers.reverse(); // overlayfs wants the top layer first
            Ok(lowers)
        })?;
        self.step("mount-root", |_| {
            let mut lowers = lowers.clone();
            if lowers.len() == 1 {
                // A read-only overlay needs two lower dirs: an empty one goes at the bottom.
                mkdirs("/run/kairos/empty")?;
                lowers.push("/run/kairos/empty".into());
            }
            if plan.mode == Mode::Live {
                // Live media: the root is writable, in memory.
                mkdirs(LIVE_UPPER)?;
                do_mount(
                    "tmpfs",
                    LIVE_UPPER,
                    "tmpfs",
                    MountFlags::NOSUID | MountFlags::NODEV,
                    "size=50%,mode=0755",
                )?;
                mkdirs(&format!("{LIVE_UPPER}/upper"))?;
                mkdirs(&format!("{LIVE_UPPER}/work"))?;
                return do_mount(
                    "overlay",
                    SYSROOT,
                    "overlay",
                    MountFlags::empty(),
                    &format!(
                        "lowerdir={},upperdir={LIVE_UPPER}/upper,workdir={LIVE_UPPER}/work",
                        lowers.join(":")
                    ),
                );
            }
            do_mount(
                "overlay",
                SYSROOT,
                "overlay",
                MountFlags::RDONLY,
                &format!("lowerdir={}", lowers.join(":")),
            )
        })?;
        self.step("create-sentinel", |_| {
            fs::write(Path::new("/run/cos").join(plan.mode.marker()), "1")
                .context("writing the mode marker")
        })?;
        // Encrypted partitions open before anything reads them; COS_PERSISTENT only where it
        // is mounted (active, passive).
        let may_write = matches!(plan.mode, Mode::Active | Mode::Passive);
        if plan.mode != Mode::Live {
            self.step("open-encrypted", |_| open_encrypted(may_write))?;
        }
        self.step("mount-oem", |b| {
            // A live system must not pick up the OEM of a disk it is about to install over.
            let oem = (plan.mode != Mode::Live)
                .then(|| blockdev::find_by_label("COS_OEM"))
                .flatten();
            match oem {
                Some(dev) => {
                    do_mount(
                        &dev.to_string_lossy(),
                        "/sysroot/oem",
                        "ext4",
                        MountFlags::empty(),
                        "",
                    )?;
                    b.fstab.push((
                        "LABEL=COS_OEM".into(),
                        "/oem".into(),
                        "ext4".into(),
                        "rw".into(),
                    ));
                }
                None => say("no COS_OEM partition: continuing without /oem"),
            }
            Ok(())
        })?;
        if may_write {
            self.step("encrypt-partitions", |_| encrypt_partitions(&cmdline))?;
        }
        // No key is unsealed past this point: PCR 11 leaves the phase the signed policy
        // covers before any config-driven command (the stages below) can run.
        self.leave_initrd()?;
        self.step("rootfs-stage", |_| {
            run_stage_in_initramfs("rootfs", &cmdline);
            Ok(())
        })?;
        self.step("mount-ephemeral", |b| {
            do_mount(
                "tmpfs",
                OVERLAY_BASE,
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NODEV,
                "size=25%,mode=0700",
            )?;
            b.fstab.push((
                "tmpfs".into(),
                OVERLAY_BASE.into(),
                "tmpfs".into(),
                "defaults,size=25%".into(),
            ));
            for p in plan::rw_paths(plan.mode) {
                let target = format!("{SYSROOT}{p}");
                if !Path::new(&target).is_dir() {
                    say(&format!(
                        "ephemeral path {p} does not exist in the image: skipped"
                    ));
                    continue;
                }
                let base = format!("{OVERLAY_BASE}/{}/.overlay", plan::overlay_name(p));
                mkdirs(&format!("{base}/upper"))?;
                mkdirs(&format!("{base}/work"))?;
                let data = format!("lowerdir={target},upperdir={base}/upper,workdir={base}/work");
                do_mount("overlay", &target, "overlay", MountFlags::empty(), &data)?;
                b.fstab.push((
                    "overlay".into(),
                    p.to_string(),
                    "overlay".into(),
                    format!("defaults,{data}"),
                ));
            }
            Ok(())
        })?;
        if matches!(plan.mode, Mode::Active | Mode::Passive) {
            self.step("mount-persistent", mount_persistent)?;
        }
        self.step("write-fstab", |b| {
            let mut text = String::from("# Written by kairos-immucore at boot.\n");
            for (spec, target, fstype, opts) in &b.fstab {
                text.push_str(&format!("{spec} {target} {fstype} {opts} 0 0\n"));
            }
            fs::write(format!("{SYSROOT}/etc/fstab"), text).context("writing /etc/fstab")
        })?;
        self.step("initramfs-stage", |_| {
            run_stage_chrooted("initramfs", &cmdline);
            Ok(())
        })?;
        self.write_timeline();
        Ok(())
    }

    /// Marks the end of the initrd in PCR 11 (after the last step, before the switch).
    pub fn leave_initrd(&mut self) -> Result<()> {
        if self.measured {
            self.step("measure-leave-initrd", |_| {
                measure_phase("leave-initrd").map(|_| ())
            })?;
        }
        Ok(())
    }

    /// JSON timeline at /run/kairos/boot-timeline.json (moved into the new root with /run).
    pub fn write_timeline(&self) {
        let steps: Vec<_> = self
            .steps
            .iter()
            .map(|s| serde_json::json!({"step": s.name, "ms": s.ms, "ok": s.ok, "error": s.detail}))
            .collect();
        let v = serde_json::json!({"total_ms": self.start.elapsed().as_millis(), "steps": steps});
        let _ = fs::write(
            "/run/kairos/boot-timeline.json",
            serde_json::to_vec_pretty(&v).unwrap_or_default(),
        );
    }

    /// The failure summary: what failed, the timeline, and what to look at.
    pub fn failure_summary(&self, err: &anyhow::Error) -> String {
        let mut s = String::from("\n========== KAIROS BOOT FAILED ==========\n");
        s.push_str(&format!("error: {err:#}\n\ntimeline:\n"));
        for st in &self.steps {
            s.push_str(&format!(
                "  {:<22} {:>6} ms  {}\n",
                st.name,
                st.ms,
                if st.ok { "ok" } else { "FAILED" }
            ));
        }
        if let Some(p) = &self.plan {
            s.push_str(&format!(
                "\ndeployment: {}  mode: {:?}  store: {}\n",
                p.deployment, p.mode, p.store_label
            ));
        }
        s.push_str("The previous boot entry or recovery can be chosen in the boot menu.\n");
        s.push_str("========================================\n");
        s
    }
}

impl Default for Boot {
    fn default() -> Self {
        Boot::new()
    }
}

/// Opens (or remakes, when a power cut interrupted their set-up) the encrypted partitions.
fn open_encrypted(may_write: bool) -> Result<()> {
    let mut work = Vec::new();
    for label in plan::ENCRYPTABLE {
        if *label == "COS_PERSISTENT" && !may_write {
            continue;
        }
        if let Some((dev, holds)) = crypt::holds(label)? {
            let action = plan::crypt_action(holds, false, may_write);
            if !matches!(action, plan::CryptAction::Plain | plan::CryptAction::Skip) {
                work.push((*label, dev, action));
            }
        }
    }
    if work.is_empty() {
        return Ok(());
    }
    let tools = crypt::tools()?;
    let _binds = crypt::ApiBinds::new()?;
    for (label, dev, action) in work {
        crypt::apply(&tools, label, &dev, action, None)?;
    }
    Ok(())
}

/// The initrd has no network: a `config_url` is not fetched for this decision.
struct NoFetch;

impl kairos_config::collect::Fetcher for NoFetch {
    fn fetch(&self, _url: &str) -> std::result::Result<Vec<u8>, String> {
        Err("not fetched in the initrd (no network yet)".into())
    }
}

/// First boot: encrypts the plain partitions `install.encrypted_partitions` lists (in the
/// local config files and the cmdline).
fn encrypt_partitions(cmdline: &str) -> Result<()> {
    // Only a plain partition can still be encrypted: when none is, the config is not read.
    let plain = plan::ENCRYPTABLE
        .iter()
        .any(|l| matches!(crypt::holds(l), Ok(Some((_, plan::Holds::Plain)))));
    if !plain {
        return Ok(());
    }
    let collected = match kairos_config::collect::Collector::new(
        Root::new(SYSROOT),
        Some(cmdline.into()),
        &NoFetch,
    )
    .collect()
    {
        Ok(c) => c,
        Err(e) => {
            say(&format!(
                "reading the config for install.encrypted_partitions: {e}; nothing is encrypted at this boot"
            ));
            return Ok(());
        }
    };
    let (wanted, warnings) = plan::encrypted_partitions(&collected.config.to_json());
    for w in warnings {
        say(&w);
    }
    let mut work = Vec::new();
    for label in wanted {
        if let Some((dev, holds)) = crypt::holds(label)? {
            if plan::crypt_action(holds, true, true) == plan::CryptAction::Encrypt {
                work.push((label, dev));
            }
        } else {
            say(&format!(
                "install.encrypted_partitions lists {label} but there is no such partition"
            ));
        }
    }
    if work.is_empty() {
        return Ok(());
    }
    let tools = crypt::tools()?;
    let _binds = crypt::ApiBinds::new()?;
    for (label, dev) in work {
        let mounted_at = (label == "COS_OEM").then_some("/sysroot/oem");
        if label == "COS_PERSISTENT" {
            // The volume spans the whole partition: grow it to the disk's end first.
            grow_persistent(&dev);
        }
        crypt::apply(&tools, label, &dev, plan::CryptAction::Encrypt, mounted_at)?;
    }
    Ok(())
}

/// Mounts efivarfs (on a UEFI boot) and reads what firmware and boot loader say.
fn read_efi() -> kairos_sys::efi::BootInfo {
    let dir = kairos_sys::efi::EFIVARS;
    if Path::new("/sys/firmware/efi").is_dir() {
        let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        // Not a UEFI boot, or already mounted: the variables then read as absent or as they are.
        let _ = mount("efivarfs", dir, "efivarfs", flags, "");
    }
    kairos_sys::efi::BootInfo::read(Path::new(dir))
}

/// A signed image boots only under Secure Boot (unless its own signed cmdline says
/// `rd.kairos.securebootdisabled`): without it, anyone could boot it with another initrd.
fn check_secure_boot(plan: &Plan, efi: &kairos_sys::efi::BootInfo) -> Result<()> {
    match efi.secure_boot {
        Some(true) => Ok(()),
        _ if plan.allow_insecure => {
            say("Secure Boot is off; booting anyway (rd.kairos.securebootdisabled)");
            Ok(())
        }
        state => bail!(
            "this is a trusted-boot image and Secure Boot is {}: enroll the owner's keys and turn Secure Boot on in the firmware (or build the image with rd.kairos.securebootdisabled in its cmdline)",
            match state {
                Some(_) => "off",
                None => "not reported by the firmware",
            }
        ),
    }
}

/// What to do about a changed layer image, appended to each refusal.
const REPAIR: &str = " (the boot falls back to the passive entry, then recovery; `kairos-agent upgrade` or a reset from recovery writes the layer again)";

/// Sets up layer `i`'s image behind dm-verity with the signed root hash and returns the
/// verified device: the loop device carries data and tree, the device-mapper device
/// (`kairos-layer-<i>`, uuid `KAIROS-VERITY-<root>-<i>`) refuses any block that does not hash
/// up to the root. With `read_all`, every block is read once now, so a changed byte
/// anywhere stops the boot here, naming the layer and the block.
fn verity_layer(
    i: usize,
    n: usize,
    layer: &kairos_layers::Layer,
    img: &Path,
    verity: &kairos_layers::verity::Verity,
    read_all: bool,
) -> Result<PathBuf> {
    let what = || {
        format!(
            "layer {} of {n} ({}, {})",
            i + 1,
            layer.digest,
            layer.image.file
        )
    };
    let len = fs::metadata(img)
        .with_context(|| format!("{}: reading {}", what(), img.display()))?
        .len();
    verity.check(len).map_err(|e| {
        anyhow!(
            "{}: {e}: the image or its manifest was changed on disk, so this boot is refused{REPAIR}",
            what()
        )
    })?;
    let lo =
        loopdev::attach_read_only(img).with_context(|| format!("attaching {}", img.display()))?;
    let majmin = lo
        .majmin()
        .with_context(|| format!("reading the device number of {}", lo.path.display()))?;
    let name = kairos_layers::verity::dm_name(i);
    let target =
        kairos_sys::dm::Target::parse(&verity.table(&majmin)).context("the verity table line")?;
    let dev = kairos_sys::dm::create_read_only(
        &name,
        &kairos_layers::verity::dm_uuid(&verity.root, i),
        &target,
    )
    .with_context(|| format!("{}: setting up dm-verity", what()))?;
    drop(lo); // the device-mapper device holds the loop device now
    let read = if read_all { read_through(&dev) } else { Ok(()) };
    // `C`: a block did not hash up to the root; an error without it is the disk's own.
    use kairos_sys::dm::Verity;
    let status = kairos_sys::dm::verity_status(&name).unwrap_or(Verity::Other(String::new()));
    let refused = match (read, status) {
        (Ok(()), Verity::Verified) => None,
        (Err((block, e)), Verity::Corrupted) => Some(anyhow!(
            "{}: block {block} (bytes {}..{}) does not match the signed root hash {} ({e}): the layer image was changed on disk, so this boot is refused{REPAIR}",
            what(),
            block * kairos_layers::verity::BLOCK,
            (block + 1) * kairos_layers::verity::BLOCK,
            &verity.root[..12]
        )),
        (Err((block, e)), _) => Some(anyhow!(
            "{}: reading block {block} failed ({e}) and dm-verity reports no changed block: check the disk holding {}",
            what(),
            img.display()
        )),
        (Ok(()), other) => Some(anyhow!(
            "{}: dm-verity reports {other:?} for it (expected verified): the layer image was changed on disk, so this boot is refused{REPAIR}",
            what()
        )),
    };
    if let Some(e) = refused {
        let _ = kairos_sys::dm::remove(&name);
        return Err(e);
    }
    kairos_sys::dm::udev_handover(&dev)
        .with_context(|| format!("recording {} for udev", dev.display()))?;
    Ok(dev)
}

/// Reads a whole device; on a read error, the first block that cannot be read and why.
fn read_through(dev: &Path) -> std::result::Result<(), (u64, std::io::Error)> {
    use std::io::{Read, Seek, SeekFrom};
    const BLOCK: u64 = kairos_layers::verity::BLOCK;
    let mut f = fs::File::open(dev).map_err(|e| (0, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(k) => at += k as u64,
            Err(e) => {
                // Find the block within this chunk: read it block by block.
                let mut block = vec![0u8; BLOCK as usize];
                let mut b = at / BLOCK;
                loop {
                    let read = f
                        .seek(SeekFrom::Start(b * BLOCK))
                        .and_then(|_| f.read_exact(&mut block));
                    match read {
                        Ok(()) => b += 1,
                        Err(e2) if e2.kind() == std::io::ErrorKind::UnexpectedEof => {
                            return Err((b, e));
                        }
                        Err(e2) => return Err((b, e2)),
                    }
                }
            }
        }
    }
}

/// The deployment uses exactly the layer images the signed cmdline names, in order.
fn check_pinned(dep: &kairos_layers::Deployment, pinned: &[String]) -> Result<()> {
    if pinned.is_empty() {
        return Ok(());
    }
    let have = dep.pins();
    if have != pinned {
        bail!(
            "deployment {} lists layer images {} but the signed boot entry names {}: the deployment manifest was changed or belongs to another image, so this boot is refused",
            dep.id,
            have.iter()
                .map(|h| &h[..h.len().min(12)])
                .collect::<Vec<_>>()
                .join(","),
            pinned
                .iter()
                .map(|h| &h[..12])
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    Ok(())
}

/// Extends PCR 11 with a boot phase, as systemd-pcrphase does; `false` when there is no TPM.
fn measure_phase(phase: &str) -> Result<bool> {
    let (mut tpm, dev) = match kairos_sys::tpm::open() {
        Ok(t) => t,
        Err(kairos_sys::tpm::TpmError::NoDevice) => {
            say("the UKI was measured but there is no TPM device: boot phases not measured");
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    kairos_sys::tpm::extend_with(&mut tpm, dev, 11, phase.as_bytes())
        .with_context(|| format!("extending PCR 11 with {phase}"))?;
    say(&format!("PCR 11 extended with {phase}"));
    Ok(true)
}

/// systemd-stub hands the signed PCR policy and its public key to the initrd in `/.extra`;
/// they go where systemd's tools look for them (`/run/systemd/`).
fn copy_stub_extras() {
    for name in ["tpm2-pcr-signature.json", "tpm2-pcr-public-key.pem"] {
        let from = Path::new("/.extra").join(name);
        if from.is_file() {
            let _ = fs::create_dir_all("/run/systemd");
            if let Err(e) = fs::copy(&from, Path::new("/run/systemd").join(name)) {
                say(&format!("copying {}: {e}", from.display()));
            }
        }
    }
}

fn load_modules() -> Result<()> {
    let list = match fs::read_to_string(MODULE_LIST) {
        Ok(l) => l,
        Err(_) => return Ok(()), // a kernel with everything built in
    };
    for line in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        kmod::load(Path::new(line), "").with_context(|| format!("loading {line}"))?;
    }
    Ok(())
}

fn wait_for_label(label: &str, timeout: u64) -> Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        if let Some(d) = blockdev::find_by_label(label) {
            return Ok(d);
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = blockdev::devices()
                .iter()
                .map(|d| {
                    format!(
                        "{} ({})",
                        d.display(),
                        blockdev::label_of(d).unwrap_or_else(|| "no label".into())
                    )
                })
                .collect();
            return Err(anyhow!(
                "no filesystem labelled {label} after {timeout}s; block devices: {}",
                if seen.is_empty() {
                    "none".into()
                } else {
                    seen.join(", ")
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mount_persistent(b: &mut Boot) -> Result<()> {
    let Some(dev) = blockdev::find_by_label("COS_PERSISTENT") else {
        say("no COS_PERSISTENT partition: persistent paths stay ephemeral");
        return Ok(());
    };
    let local = format!("{SYSROOT}/usr/local");
    let grown = grow_persistent(&dev);
    do_mount(
        &dev.to_string_lossy(),
        &local,
        "ext4",
        MountFlags::empty(),
        "",
    )?;
    if let Some(ext) = grown {
        match kairos_sys::grow::grow_ext4(Path::new(&local), ext.size) {
            Ok(()) => say(&format!("COS_PERSISTENT grown to {} MiB", ext.size >> 20)),
            Err(e) => say(&format!(
                "growing the COS_PERSISTENT filesystem failed (continuing): {e}"
            )),
        }
    }
    b.fstab.push((
        "LABEL=COS_PERSISTENT".into(),
        "/usr/local".into(),
        "ext4".into(),
        "rw".into(),
    ));
    let state = format!("{local}/.state");
    mkdirs(&state)?;
    for p in plan::sorted_persistent(plan::PERSISTENT_PATHS) {
        let target = format!("{SYSROOT}{p}");
        if !Path::new(&target).is_dir() && fs::create_dir_all(&target).is_err() {
            continue; // not in the image and the image is read-only there
        }
        let src = format!("{state}/{}", plan::bind_name(&p));
        if !Path::new(&src).exists() {
            // First boot: seed the persistent copy with the image's content.
            mkdirs(&src)?;
            copy_tree(Path::new(&target), Path::new(&src))
                .with_context(|| format!("seeding {src} from {p}"))?;
        }
        bind(&src, &target).with_context(|| format!("binding {src} on {p}"))?;
        b.fstab.push((
            format!("/usr/local/.state/{}", plan::bind_name(&p)),
            p.clone(),
            "none".into(),
            "defaults,bind".into(),
        ));
    }
    Ok(())
}

/// Grows COS_PERSISTENT's partition to the end of its disk when it is the last one (first
/// boot of an image written to a bigger disk). Failures are reported, never fatal.
fn grow_persistent(dev: &Path) -> Option<kairos_sys::grow::Extent> {
    let (disk, number) = kairos_sys::grow::parent_disk(dev)?;
    match kairos_sys::grow::grow_last_partition(&disk, number) {
        Ok(Some(ext)) => match kairos_sys::grow::kernel_resize_partition(&disk, number, ext) {
            Ok(()) => Some(ext),
            Err(e) => {
                say(&format!(
                    "resizing {} in the kernel failed (the new size applies at next boot): {e}",
                    dev.display()
                ));
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            say(&format!(
                "growing {} failed (continuing): {e}",
                dev.display()
            ));
            None
        }
    }
}

/// Copies a tree keeping modes, owners, symlinks (like `cp -a`).
pub(crate) fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    for e in fs::read_dir(from)? {
        let e = e?;
        let meta = fs::symlink_metadata(e.path())?;
        let dest = to.join(e.file_name());
        if meta.is_symlink() {
            symlink(fs::read_link(e.path())?, &dest)?;
        } else if meta.is_dir() {
            fs::create_dir_all(&dest)?;
            copy_tree(&e.path(), &dest)?;
            fs::set_permissions(&dest, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        } else if meta.is_file() {
            fs::copy(e.path(), &dest)?;
        } else {
            continue;
        }
        let _ = std::os::unix::fs::lchown(&dest, Some(meta.uid()), Some(meta.gid()));
    }
    Ok(())
}

fn run_stage_with(root: Root, stage: &str, cmdline: &str) {
    let fetcher = kairos_config::HttpFetcher::default();
    let run = kairos_stages::runner::StageRun {
        root,
        cmdline: Some(cmdline.to_string()),
        extra_paths: Vec::new(),
        fetcher: &fetcher,
        booting: true,
    };
    let mut out = std::io::stderr();
    let report = run.run(stage, &mut out);
    if !report.ok() {
        say(&format!(
            "stage {stage}: {} step(s) failed, {} problem(s) (not fatal)",
            report.failed.len(),
            report.problems.len()
        ));
    }
}

/// `rootfs` runs in the initramfs itself, with /oem and /system pointing into the new root.
fn run_stage_in_initramfs(stage: &str, cmdline: &str) {
    for p in ["oem", "system"] {
        let link = Path::new("/").join(p);
        if !link.exists() {
            let _ = std::os::unix::fs::symlink(format!("{SYSROOT}/{p}"), &link);
        }
    }
    run_stage_with(Root::host(), stage, cmdline);
}

/// `initramfs` runs against the new root (commands chrooted into it).
fn run_stage_chrooted(stage: &str, cmdline: &str) {
    run_stage_with(Root::new(SYSROOT), stage, cmdline);
}

/// Moves the API filesystems into the new root, makes it `/`, and execs its init.
pub fn switch_root(init: &str) -> Result<std::convert::Infallible> {
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("{SYSROOT}{m}");
        let _ = fs::create_dir_all(&target);
        move_mount(m, &target).with_context(|| format!("moving {m} into the new root"))?;
    }
    std::env::set_current_dir(SYSROOT).context("entering the new root")?;
    move_mount(".", "/").context("moving the new root onto /")?;
    rustix::process::chroot(".").context("chroot into the new root")?;
    std::env::set_current_dir("/").context("chdir /")?;
    let err = exec(init);
    Err(anyhow!("executing {init}: {err}"))
}

fn exec(init: &str) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(init).arg0(init).exec()
}
