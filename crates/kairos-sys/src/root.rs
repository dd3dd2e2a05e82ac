//! The target root: where absolute paths of a config land.

use std::path::{Component, Path, PathBuf};

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

    /// Resolves `p` (absolute as written in a config, or relative) under the root.
    ///
    /// `..` components are dropped rather than followed: a config must not reach out of
    /// its target tree.
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
