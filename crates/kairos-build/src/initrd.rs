//! The Kairos initrd, generated from an image's own kernel modules: `/init` is
//! kairos-immucore, plus the modules it needs to reach the disk and mount layers.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kairos_sys::beneath::{Dir, Kind};

use crate::cpio;

/// Modules the initrd tries to include (those the kernel has as modules): disks, loop,
/// layer and partition filesystems.
pub const BOOT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "sr_mod",
    "nvme",
    "ahci",
    "ata_piix",
    "usb_storage",
    "xhci_pci",
    "loop",
    "erofs",
    "squashfs",
    "overlay",
    "ext4",
    "vfat",
    "isofs",
    "nls_cp437",
    "nls_iso8859_1",
    // Trusted boot: the firmware's variables (which entry booted, Secure Boot state).
    "efivarfs",
    // Encrypted partitions (no modprobe in the initrd for the kernel's requests): dm-crypt
    // with aes-xts (AES itself is built in), and the kernel crypto API for cryptsetup.
    "dm_mod",
    "dm_crypt",
    // Layer images behind dm-verity (trusted boot).
    "dm_verity",
    "xts",
    "ecb",
    "af_alg",
    "algif_skcipher",
    "algif_hash",
];

/// A kernel found in an image tree. Paths are inside the tree and read beneath it: an image
/// whose `boot/vmlinuz-x` is a symlink to `/host/key` yields the tree's `/host/key` (or
/// nothing), never the build host's file.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub version: String,
    /// The image tree.
    pub root: PathBuf,
    /// `boot/vmlinuz-<ver>` or `lib/modules/<ver>/vmlinuz`, inside `root`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<ver>`, inside `root`.
    pub modules: PathBuf,
}

impl Kernel {
    /// Copies the kernel image out of the tree to `dest`.
    pub fn copy_vmlinuz(&self, dest: &Path) -> Result<()> {
        Dir::open(&self.root)
            .and_then(|d| d.copy_out(&self.vmlinuz, dest))
            .with_context(|| {
                format!(
                    "copying /{} out of {}",
                    self.vmlinuz.display(),
                    self.root.display()
                )
            })?;
        Ok(())
    }
}

/// Finds `/boot/vmlinuz-<ver>` with its `/lib/modules/<ver>` (or `/usr/lib/modules`).
pub fn find_kernel(rootfs: &Path) -> Result<Kernel> {
    let dir = Dir::open(rootfs).with_context(|| format!("opening {}", rootfs.display()))?;
    let mut found = Vec::new();
    for base in ["lib/modules", "usr/lib/modules"] {
        let Ok(rd) = dir.read_dir(Path::new(base)) else {
            continue;
        };
        for (name, _) in rd {
            let ver = name.to_string_lossy().into_owned();
            let modules = Path::new(base).join(&name);
            let candidates = [
                PathBuf::from(format!("boot/vmlinuz-{ver}")),
                modules.join("vmlinuz"),
            ];
            if let Some(v) = candidates
                .iter()
                .find(|p| dir.metadata(p).is_ok_and(|m| m.kind == Kind::File))
            {
                found.push(Kernel {
                    version: ver,
                    root: rootfs.to_path_buf(),
                    vmlinuz: v.clone(),
                    modules,
                });
            }
        }
    }
    found.sort_by(|a, b| a.version.cmp(&b.version));
    found.pop().with_context(|| {
        format!(
            "no kernel in {}: the image needs /boot/vmlinuz-<version> and /lib/modules/<version> (on Debian: install linux-image-amd64 or linux-image-cloud-amd64)",
            rootfs.display()
        )
    })
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name → file (inside the tree), for every uncompressed `.ko` under the modules dir.
/// Directories reached through symlinks are not entered, nor levels past 16.
fn index(dir: &Dir, moddir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(moddir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(rd) = dir.read_dir(&d) else { continue };
        for (name, kind) in rd {
            let p = d.join(&name);
            match kind {
                Kind::Dir if depth < 16 => stack.push((p, depth + 1)),
                Kind::File => {
                    if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".ko")) {
                        out.insert(norm(n), p);
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// The largest module file read into an initrd.
const MAX_MODULE: u64 = 64 << 20;

/// The module files to load for `wanted`, dependencies first; built-in and absent modules are
/// skipped (a kernel may build them in or not need them). Paths are inside `rootfs`.
pub fn closure(rootfs: &Path, moddir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let dir = Dir::open(rootfs).with_context(|| format!("opening {}", rootfs.display()))?;
    let idx = index(&dir, moddir);
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        dir: &Dir,
        name: &str,
        idx: &BTreeMap<String, PathBuf>,
        seen: &mut HashSet<String>,
        order: &mut Vec<PathBuf>,
        depth: usize,
    ) -> Result<()> {
        let name = norm(name);
        if !seen.insert(name.clone()) {
            return Ok(());
        }
        let Some(path) = idx.get(&name) else {
            return Ok(());
        };
        if depth > 32 {
            bail!("module dependency chain too deep at {name}");
        }
        let data = dir
            .read_limited(path, MAX_MODULE)
            .with_context(|| format!("reading /{}", path.display()))?;
        for dep in kairos_sys::kmod::depends(&data) {
            visit(dir, &dep, idx, seen, order, depth + 1)?;
        }
        order.push(path.clone());
        Ok(())
    }
    for w in wanted {
        visit(&dir, w, &idx, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

/// What went into an initrd.
#[derive(Debug, Clone)]
pub struct Initrd {
    pub kernel: Kernel,
    pub modules: Vec<String>,
    pub size: u64,
}

/// Writes the initrd for the kernel of `rootfs` to `out`.
pub fn build(rootfs: &Path, immucore: &Path, out: &Path) -> Result<Initrd> {
    let kernel = find_kernel(rootfs)?;
    let files = closure(rootfs, &kernel.modules, BOOT_MODULES)?;
    let tree = Dir::open(rootfs).with_context(|| format!("opening {}", rootfs.display()))?;
    let init = fs::read(immucore).with_context(|| format!("reading {}", immucore.display()))?;
    let f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = cpio::Writer::new(std::io::BufWriter::new(f));
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "sysroot",
        "tmp",
        "etc",
        "lib",
        "lib/modules",
    ] {
        w.dir(d)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/kmsg", 0o644, 1, 11)?;
    w.file("init", 0o755, &init)?;
    w.file(
        "etc/initrd-release",
        0o644,
        b"NAME=\"Kairos initrd\"\nID=kairos-initrd\n",
    )?;
    let mut made_dirs = HashSet::new();
    let mut list = String::new();
    let mut names = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&kernel.modules).unwrap_or(f);
        let inside = Path::new("lib/modules").join(&kernel.version).join(rel);
        let mut dirs: Vec<PathBuf> = inside
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .collect();
        dirs.reverse();
        for d in dirs {
            if made_dirs.insert(d.clone()) && d != Path::new("lib") && d != Path::new("lib/modules")
            {
                w.dir(&d.to_string_lossy())?;
            }
        }
        let data = tree
            .read_limited(f, MAX_MODULE)
            .with_context(|| format!("reading /{}", f.display()))?;
        w.file(&inside.to_string_lossy(), 0o644, &data)?;
        list.push_str(&format!("/{}\n", inside.display()));
        names.push(
            f.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    w.file("lib/modules/kairos-initrd.load", 0o644, list.as_bytes())?;
    let mut inner = w.finish()?;
    inner.flush()?;
    drop(inner);
    let size = fs::metadata(out)?.len();
    Ok(Initrd {
        kernel,
        modules: names,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_module(dir: &Path, rel: &str, depends: &str) {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(
            p,
            format!("\x7fELF\0license=GPL\0depends={depends}\0name=x\0"),
        )
        .unwrap();
    }

    #[test]
    fn closure_orders_dependencies_first() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path();
        fake_module(
            m,
            "kernel/drivers/block/virtio_blk.ko",
            "virtio,virtio_ring",
        );
        fake_module(m, "kernel/drivers/virtio/virtio.ko", "");
        fake_module(m, "kernel/drivers/virtio/virtio_ring.ko", "virtio");
        fake_module(m, "kernel/fs/overlayfs/overlay.ko", "");
        let order = closure(m, Path::new(""), &["virtio_blk", "overlay", "not_there"]).unwrap();
        let names: Vec<_> = order
            .iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["virtio", "virtio_ring", "virtio_blk", "overlay"]
        );
    }

    #[test]
    fn a_kernel_symlinked_to_a_host_file_is_not_copied() {
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("host-key");
        fs::write(&secret, "host secret").unwrap();
        let r = t.path().join("root");
        fs::create_dir_all(r.join("boot")).unwrap();
        fs::create_dir_all(r.join("lib/modules/6.1.0-x")).unwrap();
        std::os::unix::fs::symlink(&secret, r.join("boot/vmlinuz-6.1.0-x")).unwrap();
        // The link leads nowhere inside the tree: no kernel is found.
        assert!(find_kernel(&r).is_err());
        // A module symlinked out of the tree is not read either.
        fake_module(&r.join("lib/modules/6.1.0-x"), "kernel/fs/a.ko", "");
        fs::write(r.join("boot/vmlinuz-6.1.0-x.real"), "kernel").unwrap();
        fs::remove_file(r.join("boot/vmlinuz-6.1.0-x")).unwrap();
        std::os::unix::fs::symlink("/boot/vmlinuz-6.1.0-x.real", r.join("boot/vmlinuz-6.1.0-x"))
            .unwrap();
        std::os::unix::fs::symlink(&secret, r.join("lib/modules/6.1.0-x/kernel/fs/overlay.ko"))
            .unwrap();
        let k = find_kernel(&r).unwrap();
        let out = t.path().join("vmlinuz");
        k.copy_vmlinuz(&out).unwrap();
        assert_eq!(
            fs::read_to_string(&out).unwrap(),
            "kernel",
            "absolute link resolved in the tree"
        );
        let mods = closure(&r, &k.modules, &["a", "overlay"]).unwrap();
        assert_eq!(mods.len(), 1, "{mods:?}");
    }

    #[test]
    fn kernel_is_required() {
        let d = tempfile::tempdir().unwrap();
        let e = find_kernel(d.path()).unwrap_err().to_string();
        assert!(e.contains("linux-image"), "{e}");
    }
}
