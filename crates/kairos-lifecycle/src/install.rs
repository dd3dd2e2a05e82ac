//! Installing from a live medium to a disk: choose and check the disk, print the plan, write
//! the GPT, make the filesystems, copy the layer store (no network: the layers are on the
//! medium), write the ESP entries, OEM config and history. A failure after the partition
//! table was written wipes it again, so a half-written disk never looks installed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kairos_layers::{Deployment, Store};
use kairos_sys::gpt::{self, NewPartition};
use kairos_sys::mount::{self, MountFlags};

use crate::entries::{self, Role};
use crate::history::{self, Record};
use crate::layout::{self, Part};
use crate::{Error, esp_boot_path, io_err, upgrade};

const MIB: u64 = 1 << 20;

/// A whole disk the kernel knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub size: u64,
    pub removable: bool,
}

/// Whole disks from `/sys/class/block` (no partitions, loop, ram, optical or device-mapper).
pub fn disks() -> Vec<Disk> {
    let mut v = Vec::new();
    for e in fs::read_dir("/sys/class/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let sys = e.path();
        if sys.join("partition").exists()
            || ["loop", "ram", "sr", "zram", "dm-", "md"]
                .iter()
                .any(|p| name.starts_with(p))
        {
            continue;
        }
        let read = |f: &str| {
            fs::read_to_string(sys.join(f))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let size = read("size") * 512;
        if size == 0 {
            continue;
        }
        v.push(Disk {
            path: Path::new("/dev").join(&name),
            size,
            removable: read("removable") == 1,
        });
    }
    v.sort_by(|a, b| a.path.cmp(&b.path));
    v
}

/// `auto` = the largest non-removable disk; otherwise a device path or a `/dev/disk/by-*` link.
pub fn resolve_device(spec: &str, all: &[Disk]) -> Result<Disk, Error> {
    if spec == "auto" || spec.is_empty() {
        return all
            .iter()
            .filter(|d| !d.removable)
            .max_by_key(|d| d.size)
            .cloned()
            .ok_or_else(|| Error::Node("install.device: auto found no non-removable disk".into()));
    }
    let real =
        fs::canonicalize(spec).map_err(|e| Error::Node(format!("install.device {spec}: {e}")))?;
    all.iter().find(|d| d.path == real).cloned().ok_or_else(|| {
        Error::Node(format!(
            "install.device {spec} ({}) is not a whole disk; disks here: {}",
            real.display(),
            all.iter()
                .map(|d| format!("{} ({} MiB)", d.path.display(), d.size / MIB))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// Refuses a disk with mounted partitions, or one with a Kairos install unless `force`.
pub fn check_disk(disk: &Disk, force: bool) -> Result<(), Error> {
    let name = disk.path.to_string_lossy().into_owned();
    let mounted: Vec<String> = mount::mounts()
        .into_iter()
        .filter(|(src, ..)| src == &name || src.starts_with(&name))
        .map(|(src, target, ..)| format!("{src} on {target}"))
        .collect();
    if !mounted.is_empty() {
        return Err(Error::Node(format!(
            "{name} is in use ({}): refusing to install over mounted partitions",
            mounted.join(", ")
        )));
    }
    let existing: Vec<String> = (1..=8)
        .map(|n| gpt::partition_path(&disk.path, n))
        .filter_map(|p| kairos_sys::blockdev::label_of(&p))
        .filter(|l| l.starts_with("COS_"))
        .collect();
    if !existing.is_empty() && !force {
        return Err(Error::Node(format!(
            "{name} already has a Kairos install ({}): set install.force: true (or --force) to overwrite it",
            existing.join(", ")
        )));
    }
    Ok(())
}

/// What the medium offers: its layer store and the one deployment on it.
#[derive(Debug, Clone)]
pub struct Medium {
    pub root: PathBuf,
    pub dep: Deployment,
}

pub fn medium(root: &Path) -> Result<Medium, Error> {
    let deps = upgrade::deployments(&Store::new(root));
    let dep = deps.into_iter().next().ok_or_else(|| {
        Error::Node(format!(
            "{}: no deployment on the install medium (boot the Kairos ISO to install)",
            root.display()
        ))
    })?;
    Ok(Medium {
        root: root.to_path_buf(),
        dep,
    })
}

fn store_bytes(m: &Medium) -> u64 {
    m.dep.layers.iter().map(|l| l.image.size).sum::<u64>()
        + m.dep
            .kernel
            .iter()
            .chain(&m.dep.initrd)
            .map(|b| b.size)
            .sum::<u64>()
}

/// The partition plan for `disk`: PERSISTENT takes the rest. Errors when it does not fit.
pub fn plan(m: &Medium, disk: &Disk) -> Result<Vec<Part>, Error> {
    let boot = match medium_uki(m) {
        // A UKI per deployment: the installed one, the next an upgrade adds, and room for a
        // third while the old passive is collected.
        Some(uki) => 3 * fs::metadata(&uki).map_err(io_err(&uki))?.len(),
        None => m
            .dep
            .kernel
            .iter()
            .chain(&m.dep.initrd)
            .map(|b| b.size)
            .sum(),
    };
    let mut parts = layout::plan(boot, store_bytes(m), 64, 64);
    let need = layout::min_disk_mib(&parts);
    let have = disk.size / MIB;
    if have < need {
        return Err(Error::Node(format!(
            "{} is too small: {have} MiB, this image needs at least {need} MiB",
            disk.path.display()
        )));
    }
    if let Some(last) = parts.last_mut() {
        last.size_mib += have - need;
    }
    Ok(parts)
}

/// A mount made for the install, undone on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = mount::unmount(&self.0.to_string_lossy(), false)
            .or_else(|_| mount::unmount(&self.0.to_string_lossy(), true));
    }
}

fn run_tool(argv: Vec<String>, args: &[&str], what: &str) -> Result<(), Error> {
    kairos_sys::exec::Cmd::argv(&argv)
        .args(args)
        .run()
        .map_err(|e| Error::Node(format!("{what}: {e}")))?;
    Ok(())
}

fn wait_for(dev: &Path) -> Result<(), Error> {
    let start = Instant::now();
    while !dev.exists() {
        if start.elapsed() > Duration::from_secs(15) {
            return Err(Error::Node(format!(
                "{} did not appear after the partition table was written",
                dev.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn copy_file(src: &Path, dest: &Path) -> Result<(), Error> {
    upgrade::copy_if_missing(src, dest)
}

/// Copies the deployment's files (layers, kernel, initrd, manifest) into a store.
fn copy_store(m: &Medium, to: &Path) -> Result<(), Error> {
    for b in m
        .dep
        .layers
        .iter()
        .map(|l| &l.image)
        .chain(m.dep.kernel.iter())
        .chain(m.dep.initrd.iter())
    {
        copy_file(&m.root.join(&b.file), &to.join(&b.file))?;
        Store::new(to).verify(b, false)?;
    }
    Store::new(to).write_deployment(&m.dep)?;
    Ok(())
}

/// The signed UKI a trusted medium boots (and the installed disk will): the deployment
/// names it, the medium carries it as a plain file.
pub fn medium_uki(m: &Medium) -> Option<PathBuf> {
    let rel = m.dep.uki.as_deref()?;
    // Only Kairos' own path for this deployment: the medium's JSON is not trusted to name
    // another file, nor an id that leaves the medium (or, copied, the new ESP).
    (crate::is_plain_id(&m.dep.id) && rel == crate::esp_uki_path(&m.dep.id))
        .then(|| m.root.join(rel.trim_start_matches('/')))
}

/// Where the installer mounts the new partitions.
pub const TARGET: &str = "/run/kairos/install";

/// Installs `m` on `disk` with `parts`; `oem_config` becomes OEM's `90_custom.yaml`.
/// `tools_root` is where the bundled mkfs tools are (`/` on a node).
pub fn install(
    m: &Medium,
    disk: &Disk,
    parts: &[Part],
    oem_config: &str,
    tools_root: &Path,
    log: &mut dyn FnMut(&str),
    in_new_root: &mut dyn FnMut(&Path),
) -> Result<(), Error> {
    let new: Vec<NewPartition> = parts
        .iter()
        .map(|p| NewPartition {
            name: p.name.to_string(),
            type_guid: p.type_guid,
            start: p.start_mib * MIB,
            size: p.size_mib * MIB,
        })
        .collect();
    gpt::write_gpt(&disk.path, &new).map_err(io_err(&disk.path))?;
    let result = (|| {
        gpt::reread_partitions(&disk.path).map_err(|e| {
            Error::Node(format!(
                "{}: the kernel did not re-read the partition table: {e}",
                disk.path.display()
            ))
        })?;
        let mut mounted = Vec::new();
        let mut paths = std::collections::BTreeMap::new();
        for (i, p) in parts.iter().enumerate() {
            let dev = gpt::partition_path(&disk.path, (i + 1) as u32);
            wait_for(&dev)?;
            let d = dev.to_string_lossy().into_owned();
            log(&format!("formatting {d} ({}, {} MiB)", p.label, p.size_mib));
            let fstype = if p.label == "COS_GRUB" {
                run_tool(
                    kairos_sys::tools::argv(tools_root, "mkfs.fat"),
                    &["-F", "32", "-n", p.label, &d],
                    "mkfs.fat",
                )?;
                "vfat"
            } else {
                run_tool(
                    kairos_sys::tools::argv(tools_root, "mke2fs"),
                    &["-t", "ext4", "-q", "-F", "-L", p.label, &d],
                    "mke2fs",
                )?;
                "ext4"
            };
            if p.label == "COS_PERSISTENT" {
                continue;
            }
            // Loaded by kairos-sys itself: the image may have no modprobe.
            let missing = if fstype == "vfat" {
                kairos_sys::kmod::ensure(crate::FAT_MODULES)
            } else {
                Vec::new()
            };
            let target = Path::new(TARGET).join(p.name);
            fs::create_dir_all(&target).map_err(io_err(&target))?;
            mount::mount(
                &d,
                &target.to_string_lossy(),
                fstype,
                MountFlags::empty(),
                "",
            )
            .map_err(|e| {
                Error::Node(format!(
                    "mounting {d} at {}: {e}{}",
                    target.display(),
                    crate::missing_modules_note(&missing)
                ))
            })?;
            mounted.push(Mounted(target.clone()));
            paths.insert(p.label, target);
        }
        let at = |label: &str| {
            paths
                .get(label)
                .cloned()
                .ok_or_else(|| Error::Node(format!("{label} missing from the plan")))
        };
        let (state, recovery, esp, oem) = (
            at("COS_STATE")?,
            at("COS_RECOVERY")?,
            at("COS_GRUB")?,
            at("COS_OEM")?,
        );
        log("copying the layer store to COS_STATE and COS_RECOVERY");
        copy_store(m, &state)?;
        copy_store(m, &recovery)?;
        log("writing the boot entries");
        copy_file(
            &m.root.join("EFI/BOOT/BOOTX64.EFI"),
            &esp.join("EFI/BOOT/BOOTX64.EFI"),
        )?;
        kairos_layers::write_atomic(
            &esp.join("loader/loader.conf"),
            b"timeout 3\nconsole-mode keep\neditor no\n",
        )?;
        let roles: &[Role] = if let Some(uki) = medium_uki(m) {
            // Trusted: the medium's signed UKI boots every role (immucore and the agent read
            // the role, and the reset, from the entry's name).
            let rel = crate::esp_uki_path(&m.dep.id);
            copy_file(&uki, &esp.join(rel.trim_start_matches('/')))?;
            for kind in ["PK", "KEK", "db"] {
                let auth = format!("loader/keys/auto/{kind}.auth");
                if m.root.join(&auth).is_file() {
                    copy_file(&m.root.join(&auth), &esp.join(&auth))?;
                }
            }
            &[Role::Recovery, Role::Autoreset, Role::Active]
        } else {
            for (kind, blob) in [("vmlinuz", &m.dep.kernel), ("initrd", &m.dep.initrd)] {
                let b = blob
                    .as_ref()
                    .ok_or_else(|| Error::Node("the medium's deployment has no kernel".into()))?;
                copy_file(
                    &m.root.join(&b.file),
                    &esp.join(esp_boot_path(kind, &b.sha256).trim_start_matches('/')),
                )?;
            }
            &[Role::Recovery, Role::Autoreset, Role::Active]
        };
        for role in roles {
            entries::set(&esp, *role, &upgrade::entry_for(*role, &m.dep)?, None)?;
        }
        kairos_sys::beneath::Dir::open(&oem)
            .and_then(|d| d.write_file(Path::new("90_custom.yaml"), oem_config.as_bytes(), 0o600))
            .map_err(io_err(&oem))?;
        history::append(
            &state,
            &Record::new(
                "installed",
                &m.dep.id,
                &m.dep.image,
                &disk.path.to_string_lossy(),
            ),
        )?;
        // `after-install-chroot`: the new system as it will boot (read-only layers), with its
        // OEM partition at /oem — the place for changes that must reach the installed node.
        crate::mounts::with_deployment_root(
            &Store::new(&state),
            &m.dep.layers,
            &Path::new(TARGET).join("chroot"),
            |root| {
                let oem_in = root.join("oem");
                let bound = oem_in.is_dir()
                    && mount::bind(&oem.to_string_lossy(), &oem_in.to_string_lossy()).is_ok();
                in_new_root(root);
                if bound {
                    let _ = mount::unmount(&oem_in.to_string_lossy(), false);
                }
                Ok(())
            },
        )?;
        for mnt in &mounted {
            let _ = kairos_sys::fs::sync_filesystem(&mnt.0);
        }
        drop(mounted);
        Ok(())
    })();
    if result.is_err() {
        // Nothing half-written may look installed.
        let _ = gpt::wipe_gpt(&disk.path);
        let _ = gpt::reread_partitions(&disk.path);
    }
    result
}
