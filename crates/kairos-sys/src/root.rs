//! The target root: where absolute paths of a config land.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::beneath::{Dir, Kind, Meta};

/// The init system a root boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitSystem {
    Systemd,
    OpenRc,
    Busybox,
}

/// A filesystem tree that absolute paths are resolved under.
///
/// `Root::host()` is the running system; any other root is an offline tree (an install
/// target or a test directory) where effects are written as files instead of syscalls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    path: PathBuf,
}

impl Root {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let path = if path.as_os_str().is_empty() {
            PathBuf::from("/")
        } else {
            path
        };
        Root { path }
    }

    /// The init system found in this root (looked up beneath it: `lib -> /usr/lib` means
    /// the root's /usr/lib), or `None`.
    pub fn init_system(&self) -> Option<InitSystem> {
        let has = |p: &str| self.symlink_metadata(p).is_ok();
        if has("lib/systemd/systemd") || has("usr/lib/systemd/systemd") {
            Some(InitSystem::Systemd)
        } else if has("sbin/openrc") || has("usr/sbin/openrc") || has("sbin/openrc-run") {
            Some(InitSystem::OpenRc)
        } else if has("etc/inittab") && (has("bin/busybox") || has("sbin/init")) {
            Some(InitSystem::Busybox)
        } else {
            None
        }
    }

    /// The running system.
    pub fn host() -> Self {
        Root::new("/")
    }

    /// True when this root is the running system, so syscalls (hostname, sysctl, modprobe,
    /// systemctl) act on the live kernel and service manager.
    pub fn is_host(&self) -> bool {
        self.path == Path::new("/")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The host path `p` would have if nothing in it were a symlink: for messages and for
    /// arguments of external commands only. File operations go through the methods below,
    /// which resolve `p` beneath the root by descriptor ([`crate::beneath`]).
    ///
    /// `..` components are dropped rather than followed.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        let mut out = self.path.clone();
        for c in p.as_ref().components() {
            if let Component::Normal(n) = c {
                out.push(n);
            }
        }
        out
    }
}

/// File operations on paths as a config writes them (`/etc/hostname`), resolved beneath the
/// root: symlinks in the tree (`etc -> /elsewhere`, `rel -> ../../..`) cannot lead out of it.
impl Root {
    /// The root opened for beneath-root operations.
    pub fn dir(&self) -> io::Result<Dir> {
        Dir::open(&self.path)
    }

    /// The directory at `p` (absolute inside the root; `/` is the root itself), opened
    /// beneath the root: what a module works in by descriptor.
    pub fn open_dir(&self, p: impl AsRef<Path>) -> io::Result<Dir> {
        let rel = crate::beneath::normalize(p.as_ref());
        let d = self.dir()?;
        if rel.as_os_str().is_empty() {
            Ok(d)
        } else {
            d.open_dir(&rel)
        }
    }

    pub fn read_to_string(&self, p: impl AsRef<Path>) -> io::Result<String> {
        self.dir()?.read_to_string(p.as_ref())
    }

    pub fn read(&self, p: impl AsRef<Path>) -> io::Result<Vec<u8>> {
        self.dir()?.read(p.as_ref())
    }

    /// Atomic write with `mode`; `false` when nothing had to change. Parents must exist.
    pub fn write_file(&self, p: impl AsRef<Path>, data: &[u8], mode: u32) -> io::Result<bool> {
        self.dir()?.write_file(p.as_ref(), data, mode)
    }

    /// Creates missing directories with `mode`; returns those it created (root-relative).
    pub fn create_dir_all(&self, p: impl AsRef<Path>, mode: u32) -> io::Result<Vec<PathBuf>> {
        self.dir()?.create_dir_all(p.as_ref(), mode)
    }

    /// Creates the parent directories of `p` with `mode`; returns those it created.
    pub fn create_parents(&self, p: impl AsRef<Path>, mode: u32) -> io::Result<Vec<PathBuf>> {
        match crate::beneath::normalize(p.as_ref()).parent() {
            Some(parent) => self.create_dir_all(parent, mode),
            None => Ok(Vec::new()),
        }
    }

    pub fn set_mode(&self, p: impl AsRef<Path>, mode: u32) -> io::Result<()> {
        self.dir()?.set_mode(p.as_ref(), mode)
    }

    pub fn set_owner(
        &self,
        p: impl AsRef<Path>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> io::Result<()> {
        self.dir()?.set_owner(p.as_ref(), uid, gid)
    }

    /// What `p` resolves to inside the root.
    pub fn metadata(&self, p: impl AsRef<Path>) -> io::Result<Meta> {
        self.dir()?.metadata(p.as_ref())
    }

    /// `p` itself (a final symlink not followed).
    pub fn symlink_metadata(&self, p: impl AsRef<Path>) -> io::Result<Meta> {
        self.dir()?.symlink_metadata(p.as_ref())
    }

    pub fn exists(&self, p: impl AsRef<Path>) -> bool {
        self.metadata(p).is_ok()
    }

    pub fn is_dir(&self, p: impl AsRef<Path>) -> bool {
        self.metadata(p).is_ok_and(|m| m.kind == Kind::Dir)
    }

    pub fn symlink(&self, target: impl AsRef<Path>, p: impl AsRef<Path>) -> io::Result<()> {
        self.dir()?.symlink(target.as_ref(), p.as_ref())
    }

    pub fn read_link(&self, p: impl AsRef<Path>) -> io::Result<PathBuf> {
        self.dir()?.read_link(p.as_ref())
    }

    pub fn remove_file(&self, p: impl AsRef<Path>) -> io::Result<()> {
        self.dir()?.remove_file(p.as_ref())
    }

    pub fn read_dir(&self, p: impl AsRef<Path>) -> io::Result<Vec<(OsString, Kind)>> {
        self.dir()?.read_dir(p.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_stays_inside_root() {
        let r = Root::new("/tmp/x");
        assert_eq!(
            r.join("/etc/hostname"),
            PathBuf::from("/tmp/x/etc/hostname")
        );
        assert_eq!(
            r.join("../../etc/passwd"),
            PathBuf::from("/tmp/x/etc/passwd")
        );
        assert_eq!(r.join("a/b"), PathBuf::from("/tmp/x/a/b"));
        assert!(!r.is_host());
        assert!(Root::new("").is_host());
    }
}
