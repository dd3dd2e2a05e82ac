//! File operations beneath a root directory, by file descriptor.
//!
//! Every path that comes from untrusted input — a tar entry of an image layer, a `path:` of a
//! cloud-config, a file inside an image tree being built — is resolved with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` against an open directory. The kernel
//! then treats that directory as `/` for the whole walk: `..` stops at it, an absolute symlink
//! (`etc -> /elsewhere`) means `ROOT/elsewhere`, a relative one (`rel -> ../../..`) cannot climb
//! above it, and `/proc/self/...` magic links are refused. The last component is never
//! followed by an operation that creates, replaces or removes it (`*at` calls on the parent's
//! descriptor with no-follow semantics), so a symlink planted there is replaced, not written
//! through.
//!
//! This is the one mechanism for such paths in the code base: the layer unpacker, the stage
//! modules under `--root` and the image builders all go through [`Dir`] (or [`crate::Root`],
//! which opens one).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};

/// An open directory that relative and absolute paths are resolved beneath.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// What kind of node [`Dir::make_node`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Char,
    Block,
    Fifo,
}

/// The kind of an entry as seen without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Kind {
    fn of(st: &Stat) -> Kind {
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        }
    }
}

/// A path's metadata as the few fields callers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
}

impl Meta {
    fn of(st: &Stat) -> Meta {
        Meta {
            kind: Kind::of(st),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// Normalizes `p` to components below the root: `/`, `.` dropped, `..` removes the previous
/// component and stops at the root. Symlinks are left to the kernel.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Splits a normalized path into its parent and last component; the root itself has none.
fn split(rel: &Path) -> io::Result<(PathBuf, OsString)> {
    let rel = normalize(rel);
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent.to_path_buf(), name.to_os_string())),
        _ => Err(invalid(
            "the path names the root directory itself, not an entry inside it".into(),
        )),
    }
}

impl Dir {
    /// A path naming this very directory, for a child process's working directory
    /// (`/proc/self/fd/N`: the child inherits the descriptor until it execs, and changes
    /// into it before). Whatever replaced the path since it was opened does not matter.
    pub fn cwd_for_child(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Bytes an unprivileged writer may still use on this directory's filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        let st = rustix::fs::fstatvfs(&self.fd)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Opens `path` (which the caller chose; it is not resolved beneath anything).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The root's own path, for messages and for external commands.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The host path a relative path would have if nothing in it were a symlink (messages).
    pub fn display_path(&self, rel: &Path) -> PathBuf {
        self.path.join(normalize(rel))
    }

    /// openat2 beneath the root, retrying the kernel's EAGAIN (a concurrent rename).
    fn resolve(&self, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let rel = normalize(rel);
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &rel
        };
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(
                &self.fd,
                rel,
                flags | OFlags::CLOEXEC,
                mode,
                resolve_flags(),
            ) {
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) if tries < 16 => {
                    tries += 1;
                }
                r => return r.map_err(io::Error::from),
            }
        }
    }

    /// The parent directory of `rel` (opened for `*at` calls) and the last component.
    fn parent(&self, rel: &Path) -> io::Result<(OwnedFd, OsString)> {
        let (parent, name) = split(rel)?;
        let fd = self.resolve(&parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        Ok((fd, name))
    }

    /// Opens a directory beneath the root as a new root-relative [`Dir`] handle on it.
    pub fn open_dir(&self, rel: &Path) -> io::Result<Dir> {
        let fd = self.resolve(rel, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        Ok(Dir {
            fd,
            path: self.display_path(rel),
        })
    }

    /// Metadata of what `rel` resolves to (symlinks followed, inside the root).
    pub fn metadata(&self, rel: &Path) -> io::Result<Meta> {
        let fd = self.resolve(rel, OFlags::PATH, Mode::empty())?;
        Ok(Meta::of(&rustix::fs::fstat(&fd)?))
    }

    /// Metadata of `rel` itself (a final symlink is not followed).
    pub fn symlink_metadata(&self, rel: &Path) -> io::Result<Meta> {
        if normalize(rel).as_os_str().is_empty() {
            return self.metadata(rel);
        }
        let (parent, name) = self.parent(rel)?;
        Ok(Meta::of(&rustix::fs::statat(
            &parent,
            &name,
            AtFlags::SYMLINK_NOFOLLOW,
        )?))
    }

    pub fn exists(&self, rel: &Path) -> bool {
        self.metadata(rel).is_ok()
    }

    pub fn is_dir(&self, rel: &Path) -> bool {
        self.metadata(rel).is_ok_and(|m| m.kind == Kind::Dir)
    }

    /// Opens a regular file for reading. FIFOs, devices and sockets are refused (reading
    /// them could block forever or never end).
    pub fn open_file(&self, rel: &Path) -> io::Result<File> {
        let fd = self.resolve(
            rel,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        match Kind::of(&st) {
            Kind::File => {}
            Kind::Dir => {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    "is a directory, not a file",
                ));
            }
            _ => {
                return Err(invalid(
                    "is not a regular file (a device, FIFO or socket is never read)".into(),
                ));
            }
        }
        // Back to blocking reads for a regular file.
        rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
        Ok(File::from(fd))
    }

    /// Reads a regular file, refusing one larger than `limit` bytes.
    pub fn read_limited(&self, rel: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let f = self.open_file(rel)?;
        let mut out = Vec::new();
        f.take(limit + 1).read_to_end(&mut out)?;
        if out.len() as u64 > limit {
            return Err(invalid(format!(
                "is larger than the {limit}-byte limit for this file"
            )));
        }
        Ok(out)
    }

    /// Reads a regular file (up to 64 MiB).
    pub fn read(&self, rel: &Path) -> io::Result<Vec<u8>> {
        self.read_limited(rel, 64 << 20)
    }

    /// Copies the regular file `rel` (beneath the root) to `dest` (a path the caller chose),
    /// creating or truncating it. Returns the bytes copied.
    pub fn copy_out(&self, rel: &Path, dest: &Path) -> io::Result<u64> {
        let mut src = self.open_file(rel)?;
        let mut out = File::create(dest)?;
        io::copy(&mut src, &mut out)
    }

    pub fn read_to_string(&self, rel: &Path) -> io::Result<String> {
        String::from_utf8(self.read(rel)?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "is not UTF-8 text"))
    }

    /// Names in a directory (no `.`/`..`), with the kind of each entry (not followed), sorted.
    pub fn read_dir(&self, rel: &Path) -> io::Result<Vec<(OsString, Kind)>> {
        let fd = self.resolve(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
        let mut out = Vec::new();
        let mut dir = rustix::fs::Dir::read_from(&fd)?;
        while let Some(e) = dir.read() {
            let e = e?;
            let name = OsStr::from_bytes(e.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let kind = match e.file_type() {
                FileType::RegularFile => Kind::File,
                FileType::Directory => Kind::Dir,
                FileType::Symlink => Kind::Symlink,
                FileType::Unknown => rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| Kind::of(&st))
                    .unwrap_or(Kind::Other),
                _ => Kind::Other,
            };
            out.push((name.to_os_string(), kind));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Creates `rel` and missing parents with `mode`; returns the directories it created
    /// (outermost first), so a caller can own exactly those. An existing entry on the way
    /// that is not a directory (or a symlink to one inside the root) is an error.
    pub fn create_dir_all(&self, rel: &Path, mode: u32) -> io::Result<Vec<PathBuf>> {
        let rel = normalize(rel);
        let mut created = Vec::new();
        let mut prefix = PathBuf::new();
        for c in rel.components() {
            let parent = prefix.clone();
            prefix.push(c);
            match self.resolve(&prefix, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()) {
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
            let pfd = self.resolve(&parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
            match rustix::fs::mkdirat(&pfd, c.as_os_str(), Mode::from_bits_truncate(mode)) {
                Ok(()) => {
                    // mkdir applies the umask; set the mode asked for.
                    let d = rustix::fs::openat(
                        &pfd,
                        c.as_os_str(),
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    rustix::fs::fchmod(&d, Mode::from_bits_truncate(mode))?;
                    created.push(prefix.clone());
                }
                Err(rustix::io::Errno::EXIST) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "{} exists and is not a directory (or is a symlink leading nowhere inside {})",
                            prefix.display(),
                            self.path.display()
                        ),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(created)
    }

    /// Creates a new regular file at `rel` (replacing a non-directory entry there, never
    /// writing through a symlink), with `mode`. Parents must exist.
    pub fn create_file(&self, rel: &Path, mode: u32) -> io::Result<File> {
        let (parent, name) = self.parent(rel)?;
        remove_non_dir(&parent, &name)?;
        let fd = rustix::fs::openat(
            &parent,
            &name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_bits_truncate(mode),
        )?;
        rustix::fs::fchmod(&fd, Mode::from_bits_truncate(mode))?;
        Ok(File::from(fd))
    }

    /// Writes `data` to `rel` atomically (temp file beside it, fsync, rename) with `mode`,
    /// keeping the owner of a file it replaces. Returns `false` without touching anything when
    /// the file already has this content and mode. A symlink at `rel` is replaced by the
    /// file, never written through. Parents must exist.
    pub fn write_file(&self, rel: &Path, data: &[u8], mode: u32) -> io::Result<bool> {
        let (parent, name) = self.parent(rel)?;
        let old = rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW).ok();
        if let Some(st) = &old
            && Kind::of(st) == Kind::File
            && st.st_mode & 0o7777 == mode
            && st.st_size as usize == data.len()
        {
            let fd = rustix::fs::openat(
                &parent,
                &name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let mut cur = Vec::with_capacity(data.len());
            File::from(fd).read_to_end(&mut cur)?;
            if cur == data {
                return Ok(false);
            }
        }
        if old.as_ref().is_some_and(|st| Kind::of(st) == Kind::Dir) {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "is a directory, not a file",
            ));
        }
        let mut tmp = OsString::from(".");
        tmp.push(&name);
        tmp.push(".kairos-tmp");
        remove_non_dir(&parent, &tmp)?;
        let fd = rustix::fs::openat(
            &parent,
            &tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        let result = (|| {
            let mut f = File::from(fd);
            f.write_all(data)?;
            if let Some(st) = &old
                && Kind::of(st) == Kind::File
            {
                rustix::fs::fchown(
                    &f,
                    Some(rustix::process::Uid::from_raw(st.st_uid)),
                    Some(rustix::process::Gid::from_raw(st.st_gid)),
                )
                .or_else(ignore_eperm)?;
            }
            rustix::fs::fchmod(&f, Mode::from_bits_truncate(mode))?;
            f.sync_all()?;
            rustix::fs::renameat(&parent, &tmp, &parent, &name)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&parent, &tmp, AtFlags::empty());
        }
        result.map(|()| true)
    }

    /// Opens what `rel` resolves to for a metadata change, checking it is a file or directory.
    fn open_for_change(&self, rel: &Path) -> io::Result<OwnedFd> {
        let probe = self.resolve(rel, OFlags::PATH, Mode::empty())?;
        let st = rustix::fs::fstat(&probe)?;
        let flags = match Kind::of(&st) {
            Kind::Dir => OFlags::RDONLY | OFlags::DIRECTORY,
            Kind::File => OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
            _ => {
                return Err(invalid(
                    "is not a regular file or directory; its mode and owner are left alone".into(),
                ));
            }
        };
        let fd = self.resolve(rel, flags, Mode::empty())?;
        let again = rustix::fs::fstat(&fd)?;
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
            return Err(io::Error::other(
                "changed while it was being opened; try again",
            ));
        }
        Ok(fd)
    }

    /// Sets the permission bits of what `rel` resolves to (inside the root), when they differ.
    pub fn set_mode(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let fd = self.open_for_change(rel)?;
        if rustix::fs::fstat(&fd)?.st_mode & 0o7777 != mode {
            rustix::fs::fchmod(&fd, Mode::from_bits_truncate(mode))?;
        }
        Ok(())
    }

    /// Sets owner and group of what `rel` resolves to, when they differ (`None` keeps one).
    pub fn set_owner(&self, rel: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        let fd = self.open_for_change(rel)?;
        let st = rustix::fs::fstat(&fd)?;
        let uid = uid.filter(|u| *u != st.st_uid);
        let gid = gid.filter(|g| *g != st.st_gid);
        if uid.is_some() || gid.is_some() {
            rustix::fs::fchown(
                &fd,
                uid.map(rustix::process::Uid::from_raw),
                gid.map(rustix::process::Gid::from_raw),
            )?;
        }
        Ok(())
    }

    /// Sets owner and group of `rel` itself (a symlink's own owner), without following it.
    /// Without the privilege to give files away the owner stays the caller's.
    pub fn lchown(&self, rel: &Path, uid: u32, gid: u32) -> io::Result<()> {
        if normalize(rel).as_os_str().is_empty() {
            let fd = self.resolve(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
            rustix::fs::fchown(
                &fd,
                Some(rustix::process::Uid::from_raw(uid)),
                Some(rustix::process::Gid::from_raw(gid)),
            )
            .or_else(ignore_eperm)?;
            return Ok(());
        }
        let (parent, name) = self.parent(rel)?;
        rustix::fs::chownat(
            &parent,
            &name,
            Some(rustix::process::Uid::from_raw(uid)),
            Some(rustix::process::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .or_else(ignore_eperm)?;
        Ok(())
    }

    /// Sets the modification (and access) time of `rel` itself, not following a symlink.
    pub fn set_mtime(&self, rel: &Path, secs: i64) -> io::Result<()> {
        let t = rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        };
        let ts = rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        };
        if normalize(rel).as_os_str().is_empty() {
            let fd = self.resolve(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
            rustix::fs::futimens(&fd, &ts)?;
            return Ok(());
        }
        let (parent, name) = self.parent(rel)?;
        rustix::fs::utimensat(&parent, &name, &ts, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }

    /// Creates a symlink at `rel` pointing to `target` (stored as given: it is only ever
    /// resolved beneath a root), replacing a non-directory entry there.
    pub fn symlink(&self, target: &Path, rel: &Path) -> io::Result<()> {
        let (parent, name) = self.parent(rel)?;
        remove_non_dir(&parent, &name)?;
        rustix::fs::symlinkat(target, &parent, &name)?;
        Ok(())
    }

    pub fn read_link(&self, rel: &Path) -> io::Result<PathBuf> {
        let (parent, name) = self.parent(rel)?;
        let t = rustix::fs::readlinkat(&parent, &name, Vec::new())?;
        Ok(PathBuf::from(OsStr::from_bytes(t.as_bytes())))
    }

    /// A hard link at `rel` to the entry `existing` (both beneath the root; a symlink is
    /// linked itself, not its target), replacing a non-directory entry at `rel`.
    pub fn hard_link(&self, existing: &Path, rel: &Path) -> io::Result<()> {
        let (sp, sn) = self.parent(existing)?;
        let (dp, dn) = self.parent(rel)?;
        remove_non_dir(&dp, &dn)?;
        rustix::fs::linkat(&sp, &sn, &dp, &dn, AtFlags::empty())?;
        Ok(())
    }

    /// mknod beneath the root (needs root for devices), replacing a non-directory entry.
    pub fn make_node(
        &self,
        rel: &Path,
        kind: NodeKind,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let (parent, name) = self.parent(rel)?;
        remove_non_dir(&parent, &name)?;
        let ft = match kind {
            NodeKind::Char => FileType::CharacterDevice,
            NodeKind::Block => FileType::BlockDevice,
            NodeKind::Fifo => FileType::Fifo,
        };
        rustix::fs::mknodat(
            &parent,
            &name,
            ft,
            Mode::from_bits_truncate(mode),
            rustix::fs::makedev(major, minor),
        )?;
        // mknod applies the umask. The node was just made by us in a parent we resolved; a
        // final-component swap in between would need write access to a directory of ours.
        let st = rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == ft && st.st_mode & 0o7777 != mode {
            rustix::fs::chmodat(
                &parent,
                &name,
                Mode::from_bits_truncate(mode),
                AtFlags::empty(),
            )?;
        }
        Ok(())
    }

    /// An overlayfs whiteout (0:0 character device) at `rel`, replacing whatever is there
    /// (a directory is removed with its contents).
    pub fn make_whiteout(&self, rel: &Path) -> io::Result<()> {
        self.remove_all(rel)?;
        self.make_node(rel, NodeKind::Char, 0, 0, 0)
    }

    /// Sets an extended attribute on the file or directory `rel` resolves to.
    pub fn set_xattr(&self, rel: &Path, name: &str, value: &[u8]) -> io::Result<()> {
        let fd = self.open_for_change(rel)?;
        rustix::fs::fsetxattr(&fd, name, value, rustix::fs::XattrFlags::empty())?;
        Ok(())
    }

    /// Marks the directory `rel` opaque for overlayfs (lower layers' entries are hidden).
    pub fn make_opaque(&self, rel: &Path) -> io::Result<()> {
        self.set_xattr(rel, "trusted.overlay.opaque", b"y")
    }

    /// Removes the entry `rel` (not following it); a directory goes with all it contains.
    /// A missing entry is not an error.
    pub fn remove_all(&self, rel: &Path) -> io::Result<()> {
        let (parent, name) = self.parent(rel)?;
        remove_tree_at(&parent, &name)
    }

    /// Removes a non-directory entry; a missing entry is not an error.
    pub fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let (parent, name) = self.parent(rel)?;
        match rustix::fs::unlinkat(&parent, &name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` to `to`, both beneath the root (neither last component followed).
    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (fp, fname) = self.parent(from)?;
        let (tp, tname) = self.parent(to)?;
        rustix::fs::renameat(&fp, &fname, &tp, &tname)?;
        Ok(())
    }
}

/// Gives a file made by [`Dir::create_file`] its owner (when permitted: an unprivileged
/// build keeps its own uid) and then its mode, in that order (chown clears set-id bits).
pub fn finish_file(f: &File, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    rustix::fs::fchown(
        f,
        Some(rustix::process::Uid::from_raw(uid)),
        Some(rustix::process::Gid::from_raw(gid)),
    )
    .or_else(ignore_eperm)?;
    rustix::fs::fchmod(f, Mode::from_bits_truncate(mode))?;
    Ok(())
}

/// Sets an extended attribute on an open file; a filesystem without xattrs, or a namespace
/// this process may not write (`security.*` unprivileged), is not an error.
pub fn set_file_xattr(f: &File, name: &str, value: &[u8]) -> io::Result<()> {
    match rustix::fs::fsetxattr(f, name, value, rustix::fs::XattrFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::PERM) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn ignore_eperm(e: rustix::io::Errno) -> rustix::io::Result<()> {
    if e == rustix::io::Errno::PERM {
        Ok(())
    } else {
        Err(e)
    }
}

/// Removes `name` in `parent` unless it is a directory (a directory is kept, so callers that
/// then create a file get a clear EEXIST/EISDIR).
fn remove_non_dir(parent: &impl AsFd, name: &OsStr) -> io::Result<()> {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if Kind::of(&st) == Kind::Dir => Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            format!(
                "{} is a directory; it is not replaced by a non-directory",
                Path::new(name).display()
            ),
        )),
        Ok(_) => Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?),
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Recursive removal by descriptor: each level is opened with O_NOFOLLOW from its parent's
/// descriptor, so a symlink inside the tree is unlinked, never descended into.
fn remove_tree_at(parent: &impl AsFd, name: &OsStr) -> io::Result<()> {
    let st = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if Kind::of(&st) != Kind::Dir {
        return Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?);
    }
    let fd = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    {
        let mut dir = rustix::fs::Dir::read_from(&fd)?;
        while let Some(e) = dir.read() {
            let e = e?;
            let n = OsStr::from_bytes(e.file_name().to_bytes());
            if n != "." && n != ".." {
                names.push(n.to_os_string());
            }
        }
    }
    for n in names {
        remove_tree_at(&fd, &n)?;
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A root with a canary directory beside it, and symlinks that point at the canary.
    fn hostile() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let canary = t.path().join("canary");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&canary).unwrap();
        fs::write(canary.join("victim"), "keep").unwrap();
        symlink(&canary, root.join("abs")).unwrap();
        symlink("../canary", root.join("rel")).unwrap();
        symlink("../../../../../../..", root.join("up")).unwrap();
        (t, root, canary)
    }

    fn canary_intact(canary: &Path) {
        let names: Vec<_> = fs::read_dir(canary)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("victim")], "canary changed");
        assert_eq!(fs::read_to_string(canary.join("victim")).unwrap(), "keep");
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let (_t, root, canary) = hostile();
        let d = Dir::open(&root).unwrap();
        // Reads through escaping links see the root, not the canary.
        assert!(d.read(Path::new("abs/victim")).is_err());
        assert!(d.read(Path::new("rel/victim")).is_err());
        assert!(d.read(Path::new("../canary/victim")).is_err());
        // Writes below an escaping link either land inside the root or fail.
        for p in ["abs/x", "rel/x", "up/tmp/x", "../x", "up/../canary/victim"] {
            let _ = d.create_dir_all(Path::new(p).parent().unwrap(), 0o755);
            let _ = d.write_file(Path::new(p), b"pwn", 0o644);
        }
        let _ = d.remove_all(Path::new("abs/victim"));
        let _ = d.remove_all(Path::new("up/canary"));
        let _ = d.make_node(Path::new("rel/fifo"), NodeKind::Fifo, 0o644, 0, 0);
        let _ = d.hard_link(Path::new("abs/victim"), Path::new("hl"));
        let _ = d.set_mode(Path::new("abs/victim"), 0o777);
        canary_intact(&canary);
        // `up` resolves to the root itself: its tmp/x landed inside.
        assert_eq!(fs::read(root.join("tmp/x")).unwrap(), b"pwn");
    }

    #[test]
    fn final_symlinks_are_replaced_not_followed() {
        let (_t, root, canary) = hostile();
        let d = Dir::open(&root).unwrap();
        symlink(canary.join("victim"), root.join("hostname")).unwrap();
        assert!(
            d.write_file(Path::new("/hostname"), b"node", 0o644)
                .unwrap()
        );
        assert_eq!(fs::read(root.join("hostname")).unwrap(), b"node");
        assert!(
            !fs::symlink_metadata(root.join("hostname"))
                .unwrap()
                .is_symlink()
        );
        d.remove_all(Path::new("abs")).unwrap();
        assert!(!root.join("abs").exists());
        canary_intact(&canary);
    }

    #[test]
    fn create_dir_all_reports_what_it_made() {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open(t.path()).unwrap();
        fs::create_dir(t.path().join("a")).unwrap();
        let made = d.create_dir_all(Path::new("/a/b/c"), 0o750).unwrap();
        assert_eq!(made, vec![PathBuf::from("a/b"), PathBuf::from("a/b/c")]);
        assert!(
            d.create_dir_all(Path::new("a/b/c"), 0o750)
                .unwrap()
                .is_empty()
        );
        use std::os::unix::fs::PermissionsExt;
        let m = fs::metadata(t.path().join("a/b/c")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o750);
        fs::write(t.path().join("f"), "").unwrap();
        assert!(d.create_dir_all(Path::new("f/x"), 0o755).is_err());
    }

    #[test]
    fn write_is_idempotent_and_atomic() {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open(t.path()).unwrap();
        assert!(d.write_file(Path::new("f"), b"x", 0o600).unwrap());
        assert!(!d.write_file(Path::new("f"), b"x", 0o600).unwrap());
        assert!(d.write_file(Path::new("f"), b"x", 0o644).unwrap());
        assert_eq!(d.metadata(Path::new("f")).unwrap().mode, 0o644);
        assert!(!t.path().join(".f.kairos-tmp").exists());
        assert!(d.write_file(Path::new(""), b"x", 0o644).is_err());
    }

    #[test]
    fn fifos_and_big_files_are_not_read() {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open(t.path()).unwrap();
        d.make_node(Path::new("fifo"), NodeKind::Fifo, 0o644, 0, 0)
            .unwrap();
        let e = d.read(Path::new("fifo")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        fs::write(t.path().join("big"), vec![0u8; 100]).unwrap();
        assert!(d.read_limited(Path::new("big"), 99).is_err());
        assert_eq!(d.read_limited(Path::new("big"), 100).unwrap().len(), 100);
    }

    #[test]
    fn remove_all_does_not_descend_symlinks() {
        let (_t, root, canary) = hostile();
        fs::create_dir_all(root.join("tree/sub")).unwrap();
        symlink(&canary, root.join("tree/sub/link")).unwrap();
        let d = Dir::open(&root).unwrap();
        d.remove_all(Path::new("tree")).unwrap();
        assert!(!root.join("tree").exists());
        canary_intact(&canary);
    }

    #[test]
    fn normalize_clamps_at_root() {
        assert_eq!(normalize(Path::new("/a/../../b/./c")), PathBuf::from("b/c"));
        assert_eq!(normalize(Path::new("..")), PathBuf::new());
    }
}
