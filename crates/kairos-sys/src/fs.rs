//! File writes with the guarantees configs rely on: atomic replace, mode, ownership.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;

/// Writes `data` to `path` atomically (temp file, fsync, rename) with `mode`.
///
/// Returns `false` without touching the file when content and mode are already right, so
/// re-running a stage changes nothing.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> io::Result<bool> {
    if let Ok(meta) = fs::symlink_metadata(path)
        && meta.is_file()
        && meta.permissions().mode() & 0o7777 == mode
        && fs::read(path)? == data
    {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.kairos-tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
    }
    // Keep the owner of a file being replaced.
    if let Ok(meta) = fs::metadata(path) {
        use std::os::unix::fs::MetadataExt;
        let _ = chown(&tmp, Some(meta.uid()), Some(meta.gid()));
    }
    fs::rename(&tmp, path)?;
    Ok(true)
}

/// Sets mode when it differs.
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    let meta = fs::metadata(path)?;
    if meta.permissions().mode() & 0o7777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Sets owner and group when they differ (`None` keeps the current one).
pub fn set_owner(path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path)?;
    let uid = uid.filter(|u| *u != meta.uid());
    let gid = gid.filter(|g| *g != meta.gid());
    if uid.is_some() || gid.is_some() {
        chown(path, uid, gid)?;
    }
    Ok(())
}

/// Creates `path` and missing parents with `mode`.
pub fn create_dir_all(path: &Path, mode: u32) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        create_dir_all(parent, mode)?;
    }
    match fs::create_dir(path) {
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// An overlayfs whiteout: a 0:0 character device (hides `path` in lower layers). Needs root.
pub fn make_whiteout(path: &Path) -> io::Result<()> {
    make_node(path, NodeKind::Char, 0, 0, 0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Char,
    Block,
    Fifo,
}

/// mknod(2): a device node or fifo with `mode` permissions. Needs root for devices.
pub fn make_node(path: &Path, kind: NodeKind, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let ft = match kind {
        NodeKind::Char => rustix::fs::FileType::CharacterDevice,
        NodeKind::Block => rustix::fs::FileType::BlockDevice,
        NodeKind::Fifo => rustix::fs::FileType::Fifo,
    };
    let dev = rustix::fs::makedev(major, minor);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        ft,
        rustix::fs::Mode::from_bits_truncate(mode),
        dev,
    )
    .map_err(io::Error::from)
}

/// Marks a directory opaque for overlayfs (lower layers' entries are hidden). Needs root.
pub fn make_opaque(dir: &Path) -> io::Result<()> {
    rustix::fs::setxattr(
        dir,
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(io::Error::from)
}

/// Takes an exclusive lock on `path` (created if missing, parents too), waiting for another
/// holder to let go; released when the returned file is dropped or the process ends.
pub fn lock_exclusive(path: &Path) -> io::Result<fs::File> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(f)
}

/// Bytes an unprivileged writer can still use on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Flushes the whole filesystem holding `path` (`syncfs`): on FAT a directory fsync does not
/// reach the directory entries and the FAT, so a rename is only durable after this.
pub fn sync_filesystem(path: &Path) -> io::Result<()> {
    let f = fs::File::open(path)?;
    rustix::fs::syncfs(&f).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_exclusive_until_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run/kairos/agent.lock");
        let held = lock_exclusive(&p).unwrap();
        let other = fs::OpenOptions::new().write(true).open(&p).unwrap();
        let try_lock = |f: &fs::File| {
            rustix::fs::flock(f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        };
        assert!(try_lock(&other).is_err(), "a second holder must wait");
        drop(held);
        assert!(try_lock(&other).is_ok());
    }

    #[test]
    fn write_is_idempotent_and_sets_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        assert!(write_file(&p, b"x", 0o600).unwrap());
        assert!(!write_file(&p, b"x", 0o600).unwrap());
        assert!(write_file(&p, b"x", 0o644).unwrap());
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(!d.path().join(".f.kairos-tmp").exists());
    }
}
