//! Finding and mounting a node's partitions read-write for an action, and looking inside a
//! deployment's layer images (its kernel, initrd and version) through a read-only overlay.

use std::fs;
use std::path::{Path, PathBuf};

use kairos_layers::{Layer, Store};
use kairos_sys::mount::{self, MountFlags};

use crate::{Error, io_err};

fn sys_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Node(format!("{what}: {e}"))
}

/// A partition mounted for the duration of an action; restored when dropped.
#[derive(Debug)]
pub struct Mounted {
    pub path: PathBuf,
    restore: Restore,
}

#[derive(Debug)]
enum Restore {
    Nothing,
    ReadOnly,
    Unmount,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let p = self.path.to_string_lossy();
        let _ = match self.restore {
            Restore::Nothing => Ok(()),
            Restore::ReadOnly => mount::remount(&p, true),
            Restore::Unmount => mount::unmount(&p, false),
        };
    }
}

/// The device with filesystem label `label`, or an error that says what is missing.
pub fn device_for(label: &str) -> Result<PathBuf, Error> {
    kairos_sys::blockdev::find_by_label(label).ok_or_else(|| {
        Error::Node(format!(
            "no partition labelled {label}: is this an installed Kairos node?"
        ))
    })
}

/// Mounts the filesystem labelled `label` read-write: remounts it where it already is
/// (read-only again afterwards), or mounts it at `fallback`.
pub fn mount_rw(label: &str, fstype: &str, fallback: &Path) -> Result<Mounted, Error> {
    let dev = device_for(label)?;
    let canon = fs::canonicalize(&dev).unwrap_or(dev.clone());
    for (src, target, _, opts) in mount::mounts() {
        if fs::canonicalize(&src).ok().as_ref() != Some(&canon) {
            continue;
        }
        let ro = opts.split(',').any(|o| o == "ro");
        if ro {
            mount::remount(&target, false)
                .map_err(sys_err(format!("remounting {target} ({label}) read-write")))?;
        }
        return Ok(Mounted {
            path: target.into(),
            restore: if ro {
                Restore::ReadOnly
            } else {
                Restore::Nothing
            },
        });
    }
    // The node's kernel has FAT as modules; the mount would fail without them. Loaded by
    // kairos-sys itself: the image may have no modprobe.
    let missing = if fstype == "vfat" {
        kairos_sys::kmod::ensure(crate::FAT_MODULES)
    } else {
        Vec::new()
    };
    fs::create_dir_all(fallback).map_err(io_err(fallback))?;
    mount::mount(
        &dev.to_string_lossy(),
        &fallback.to_string_lossy(),
        fstype,
        MountFlags::empty(),
        "",
    )
    .map_err(sys_err(format!(
        "mounting {} ({label}) at {}{}",
        dev.display(),
        fallback.display(),
        crate::missing_modules_note(&missing)
    )))?;
    Ok(Mounted {
        path: fallback.to_path_buf(),
        restore: Restore::Unmount,
    })
}

/// Files taken out of a deployment's merged root.
#[derive(Debug)]
pub struct BootFiles {
    /// Holds the copies; the caller removes it.
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub version: String,
}

/// Mounts the layer images as the read-only overlay they boot as, at `dir/root`, runs `f` on
/// it and unmounts everything again (also when `f` fails).
pub fn with_deployment_root<T>(
    store: &Store,
    layers: &[Layer],
    dir: &Path,
    f: impl FnOnce(&Path) -> Result<T, Error>,
) -> Result<T, Error> {
    let root = dir.join("root");
    fs::create_dir_all(&root).map_err(io_err(&root))?;
    let mut mounted: Vec<PathBuf> = Vec::new();
    let result = (|| {
        let mut lowers = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let img = store.root.join(&l.image.file);
            let mnt = dir.join(format!("l{i}"));
            fs::create_dir_all(&mnt).map_err(io_err(&mnt))?;
            let dev = kairos_sys::loopdev::attach_read_only(&img)
                .map_err(sys_err(format!("attaching {}", img.display())))?;
            mount::mount(
                &dev.path.to_string_lossy(),
                &mnt.to_string_lossy(),
                "erofs",
                MountFlags::RDONLY,
                "",
            )
            .map_err(sys_err(format!("mounting layer image {}", img.display())))?;
            mounted.push(mnt.clone());
            lowers.push(mnt.to_string_lossy().into_owned());
        }
        lowers.reverse();
        let empty = dir.join("empty");
        fs::create_dir_all(&empty).map_err(io_err(&empty))?;
        if lowers.len() == 1 {
            lowers.push(empty.to_string_lossy().into_owned());
        }
        mount::mount(
            "overlay",
            &root.to_string_lossy(),
            "overlay",
            MountFlags::RDONLY,
            &format!("lowerdir={}", lowers.join(":")),
        )
        .map_err(sys_err("mounting the deployment's overlay".into()))?;
        mounted.push(root.clone());
        f(&root)
    })();
    for m in mounted.iter().rev() {
        let _ = mount::unmount(&m.to_string_lossy(), false)
            .or_else(|_| mount::unmount(&m.to_string_lossy(), true));
    }
    result
}

/// Copies `/boot/vmlinuz`, `/boot/initrd` and the version from `/etc/os-release` out of the
/// deployment's merged root.
pub fn probe_boot_files(
    store: &Store,
    layers: &[Layer],
    scratch: &Path,
) -> Result<BootFiles, Error> {
    let dir = scratch.join("probe");
    let _ = fs::remove_dir_all(&dir);
    let result = with_deployment_root(store, layers, &dir, |root| {
        // The deployment's files are read beneath its root: symlinks in the image resolve
        // inside it, never to the node's own files.
        let tree = kairos_sys::beneath::Dir::open(root).map_err(io_err(root))?;
        let out = |name: &str| -> Result<PathBuf, Error> {
            let rel = Path::new("boot").join(name);
            let dest = dir.join(name);
            tree.copy_out(&rel, &dest).map_err(|e| {
                Error::Node(format!(
                    "the image has no regular file /{} ({e}): upgrade to a kairosified image (`kairosctl kairosify`)",
                    rel.display()
                ))
            })?;
            Ok(dest)
        };
        let kernel = out("vmlinuz")?;
        let initrd = out("initrd")?;
        let version = tree
            .read_to_string(Path::new("etc/os-release"))
            .ok()
            .and_then(|t| {
                kairos_sys::sysinfo::parse_key_values(&t)
                    .get("VERSION_ID")
                    .cloned()
            })
            .unwrap_or_default();
        Ok(BootFiles {
            dir: dir.clone(),
            kernel,
            initrd,
            version,
        })
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&dir);
    }
    result
}
