//! Kernel modules: reading a module's dependencies from its `.modinfo`, and loading it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::Path;

/// The `depends=` list of a module file (names, `-` and `_` as written).
pub fn depends(ko: &[u8]) -> Vec<String> {
    let needle = b"depends=";
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = ko[i..].windows(needle.len()).position(|w| w == needle) {
        let start = i + pos;
        // `.modinfo` entries are NUL-separated: the key must start right after a NUL.
        if start > 0 && ko[start - 1] == 0 {
            let v = &ko[start + needle.len()..];
            let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
            out.extend(
                String::from_utf8_lossy(&v[..end])
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            );
            return out;
        }
        i = start + needle.len();
    }
    out
}

/// Loads a module file into the running kernel; "already loaded" is success.
pub fn load(path: &Path, params: &str) -> io::Result<()> {
    let f = File::open(path)?;
    let params =
        CString::new(params).map_err(|_| io::Error::other("module parameters contain NUL"))?;
    match rustix::system::finit_module(&f, &params, 0) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// `name` → file for the uncompressed `.ko` modules of a module tree, from its `modules.dep`
/// (one small read: this runs on every boot, from boot-assessment mounting the ESP).
fn index(dir: &Path) -> std::collections::BTreeMap<String, std::path::PathBuf> {
    let Ok(dep) = std::fs::read_to_string(dir.join("modules.dep")) else {
        return Default::default();
    };
    dep.lines()
        .filter_map(|l| l.split_once(':').map(|(file, _)| file.trim()))
        .filter_map(|file| {
            let name = Path::new(file).file_name()?.to_str()?.strip_suffix(".ko")?;
            Some((norm(name), dir.join(file)))
        })
        .collect()
}

/// Modules built into the kernel (`modules.builtin`), by normalised name.
fn builtin(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            Path::new(l.trim())
                .file_name()?
                .to_str()?
                .strip_suffix(".ko")
                .map(norm)
        })
        .collect()
}

/// True when the running kernel has `name` already (loaded or built in).
fn present(name: &str) -> bool {
    Path::new("/sys/module").join(norm(name)).exists()
}

/// Loads modules by name from the running kernel's module tree, dependencies first — what
/// `modprobe` does, without needing it (a busybox image may have no `/sbin/modprobe`). Modules
/// the kernel already has are skipped. Returns, for each name that could not be made
/// available, why (the caller decides whether that matters, and names it in its error).
pub fn ensure(names: &[&str]) -> Vec<(String, String)> {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let dirs = [
        Path::new("/lib/modules").join(&release),
        Path::new("/usr/lib/modules").join(&release),
    ];
    let mut missing = Vec::new();
    let mut idx = None;
    let built_in: std::collections::BTreeSet<String> =
        dirs.iter().flat_map(|d| builtin(d)).collect();
    for name in names {
        if present(name) || built_in.contains(&norm(name)) {
            continue;
        }
        let idx = idx.get_or_insert_with(|| {
            dirs.iter()
                .flat_map(|d| index(d))
                .collect::<std::collections::BTreeMap<_, _>>()
        });
        if let Err(why) = load_with_deps(name, idx, 0) {
            missing.push((name.to_string(), why));
        }
    }
    missing
}

fn load_with_deps(
    name: &str,
    idx: &std::collections::BTreeMap<String, std::path::PathBuf>,
    depth: usize,
) -> Result<(), String> {
    if present(name) {
        return Ok(());
    }
    let path = idx.get(&norm(name)).ok_or_else(|| {
        format!(
            "no {name}.ko in /lib/modules/{}/modules.dep (compressed modules are not loaded)",
            rustix::system::uname().release().to_string_lossy()
        )
    })?;
    if depth > 32 {
        return Err(format!("dependency chain too deep at {name}"));
    }
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for dep in depends(&data) {
        load_with_deps(&dep, idx, depth + 1)?;
    }
    load(path, "").map_err(|e| format!("loading {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_dep_and_builtin_are_read() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("modules.dep"),
            "kernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\nkernel/fs/nls/nls-ascii.ko:\nkernel/x/zst.ko.zst:\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("modules.builtin"),
            "kernel/fs/nls/nls_utf8.ko\n",
        )
        .unwrap();
        let idx = index(d.path());
        assert_eq!(idx["vfat"], d.path().join("kernel/fs/fat/vfat.ko"));
        assert!(idx.contains_key("nls_ascii"), "{idx:?}");
        assert!(
            !idx.contains_key("zst"),
            "compressed modules are not listed"
        );
        assert!(builtin(d.path()).contains("nls_utf8"));
    }

    #[test]
    fn modinfo_depends() {
        let blob = b"\x7fELF....\0license=GPL\0depends=virtio,virtio_ring\0name=virtio_blk\0";
        assert_eq!(depends(blob), vec!["virtio", "virtio_ring"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert!(depends(b"nothing here").is_empty());
    }
}
