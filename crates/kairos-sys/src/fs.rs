//! Whole-filesystem operations: an exclusive lock file, free space, `syncfs`. Writes inside
//! a root go through [`crate::beneath`].

use std::fs;
use std::io;
use std::path::Path;

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

/// Writes a private file (mode 0600, parents 0700) whole or not at all: a temporary file
/// beside it, synced, then renamed over it.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic(path, data, 0o600)
}

/// Writes a file whole or not at all with `mode` (a temporary file beside it, synced, renamed
/// over it); missing parents are made 0700.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = parent.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    // The umask may have taken bits away.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
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
}
