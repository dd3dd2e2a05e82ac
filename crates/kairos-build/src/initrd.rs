//! The Kairos initrd, generated from an image's own kernel modules: `/init` is
//! kairos-immucore, plus the modules it needs to reach the disk and mount layers.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

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
];

/// A kernel found in an image tree.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// Finds `/boot/vmlinuz-<ver>` with its `/lib/modules/<ver>` (or `/usr/lib/modules`).
pub fn find_kernel(rootfs: &Path) -> Result<Kernel> {
    let mut found = Vec::new();
    for base in ["lib/modules", "usr/lib/modules"] {
        let Ok(rd) = fs::read_dir(rootfs.join(base)) else {
            continue;
        };
        for e in rd.flatten() {
            let ver = e.file_name().to_string_lossy().into_owned();
            let candidates = [
                rootfs.join(format!("boot/vmlinuz-{ver}")),
                e.path().join("vmlinuz"),
            ];
            if let Some(v) = candidates.iter().find(|p| p.is_file()) {
                found.push(Kernel {
                    version: ver,
                    vmlinuz: v.clone(),
                    modules: e.path(),
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

/// Module name → file, for every uncompressed `.ko` under the modules dir.
fn index(moddir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![moddir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                out.insert(norm(n), p);
            }
        }
    }
    out
}

/// The module files to load for `wanted`, dependencies first; built-in and absent modules are
/// skipped (a kernel may build them in or not need them).
pub fn closure(moddir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let idx = index(moddir);
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
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
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        for dep in kairos_sys::kmod::depends(&data) {
            visit(&dep, idx, seen, order, depth + 1)?;
        }
        order.push(path.clone());
        Ok(())
    }
    for w in wanted {
        visit(w, &idx, &mut seen, &mut order, 0)?;
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
    let files = closure(&kernel.modules, BOOT_MODULES)?;
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
        w.file(&inside.to_string_lossy(), 0o644, &fs::read(f)?)?;
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
        let order = closure(m, &["virtio_blk", "overlay", "not_there"]).unwrap();
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
    fn kernel_is_required() {
        let d = tempfile::tempdir().unwrap();
        let e = find_kernel(d.path()).unwrap_err().to_string();
        assert!(e.contains("linux-image"), "{e}");
    }
}
