//! Layers: unpacking an OCI layer tar into a tree in overlayfs format (whiteouts as 0:0
//! character devices, opaque directories as `trusted.overlay.opaque=y`), and packing a tree
//! into a gzip layer with its diff_id.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use kairos_sys::beneath::{self, Dir, Kind, NodeKind};
use sha2::Digest as _;

use crate::Error;

const WH_PREFIX: &str = ".wh.";
const WH_OPAQUE: &str = ".wh..wh..opq";

/// Opens a layer blob, decompressing by content (gzip, zstd or plain tar).
pub fn open_layer(path: &Path) -> Result<Box<dyn Read>, Error> {
    let mut f = fs::File::open(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let f = fs::File::open(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let r = BufReader::with_capacity(1 << 20, f);
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(r)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            ruzstd::decoding::StreamingDecoder::new(r)
                .map_err(|e| Error::Format(format!("{}: zstd: {e}", path.display())))?,
        ),
        _ => Box::new(r),
    })
}

/// A tar entry's path as components below the layer root; `None` for an absolute path or one
/// with `..` (a layer has no business naming either).
fn safe_rel(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Unpacks a layer into `dest` (which should be empty; missing parents are made 0700, so device
/// nodes from the layer cannot be opened by other local users while it exists), converting
/// OCI whiteouts to overlayfs form. Returns the sha256 of the uncompressed tar (the diff_id),
/// so the caller can verify it.
///
/// Every entry is written beneath `dest` by descriptor ([`kairos_sys::beneath`]): a symlink
/// in the layer (`esc -> /some/dir`) is followed only inside `dest`, never out of it, and
/// whiteouts that name no file (`.wh.`, `.wh..`, `.wh...`) are refused.
pub fn unpack(layer: &Path, dest: &Path) -> Result<String, Error> {
    unpack_limited(layer, dest, u64::MAX)
}

/// What an entry costs besides its data (inode, directory entry), for [`unpack_limited`].
const ENTRY_OVERHEAD: u64 = 512;

/// Like [`unpack`], but refuses ([`Error::TooBig`]) before writing past `max_bytes` of file
/// data (plus a small cost per entry): a 1 MB gzip bomb cannot fill the scratch space.
pub fn unpack_limited(layer: &Path, dest: &Path, max_bytes: u64) -> Result<String, Error> {
    let io_dest = |e: io::Error| Error::Io {
        path: dest.to_path_buf(),
        source: e,
    };
    {
        // Missing parents are made root-only (device nodes below); the tree's own root gets
        // the usual mode unless the layer says otherwise (its `./` entry).
        use std::os::unix::fs::DirBuilderExt;
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_dest)?;
        }
        match fs::DirBuilder::new().mode(0o755).create(dest) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).map_err(io_dest)?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_dest(e)),
        }
    }
    let root = Dir::open(dest).map_err(io_dest)?;
    unpack_into(layer, &root, max_bytes, Whiteouts::Overlay).map_err(|e| match e {
        Error::Io { source, .. } => io_dest(source),
        e => e,
    })
}

/// What OCI whiteouts become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// overlayfs whiteouts and opaque directories (a layer of the layer store).
    Overlay,
    /// Applied: the hidden files are removed (extracting layers one over another into one
    /// tree, as `unpack_images` does).
    Apply,
}

/// Unpacks a layer into an open directory (see [`unpack_limited`]).
pub fn unpack_into(
    layer: &Path,
    root: &Dir,
    max_bytes: u64,
    whiteouts: Whiteouts,
) -> Result<String, Error> {
    let reader = open_layer(layer)?;
    let mut hashing = HashingReader {
        inner: reader,
        hash: sha2::Sha256::new(),
    };
    let io_dest = |e: io::Error| Error::Io {
        path: layer.to_path_buf(),
        source: e,
    };
    let mut dir_times = Vec::new();
    let mut used = 0u64;
    {
        let mut ar = tar::Archive::new(&mut hashing);
        let entries = ar
            .entries()
            .map_err(|e| Error::Format(format!("{}: {e}", layer.display())))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| Error::Format(format!("{}: {e}", layer.display())))?;
            let path = entry
                .path()
                .map_err(|e| Error::Format(format!("{}: {e}", layer.display())))?
                .into_owned();
            let Some(rel) = safe_rel(&path) else {
                return Err(Error::Format(format!(
                    "{}: entry {} escapes the layer",
                    layer.display(),
                    path.display()
                )));
            };
            // The logical size (a sparse entry's holes count: they are written out).
            used = used
                .saturating_add(entry.size())
                .saturating_add(ENTRY_OVERHEAD);
            if used > max_bytes {
                return Err(Error::TooBig {
                    layer: layer.to_path_buf(),
                    limit: max_bytes,
                });
            }
            unpack_entry(root, &mut entry, &rel, &mut dir_times, whiteouts).map_err(|e| {
                Error::Format(format!(
                    "{}: entry {}: {e}",
                    layer.display(),
                    path.display()
                ))
            })?;
        }
        // Drain the tar's trailing blocks so the digest covers the whole stream.
        io::copy(ar.into_inner(), &mut io::sink()).map_err(|e| Error::Format(e.to_string()))?;
    }
    // Directory times last: entries written into a directory change its mtime.
    for (rel, mtime) in dir_times.iter().rev() {
        root.set_mtime(rel, *mtime).map_err(io_dest)?;
    }
    Ok(format!(
        "sha256:{}",
        hashing
            .hash
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// `SCHILY.xattr.*` PAX records of an entry, minus overlayfs' own attributes (whiteouts and
/// opaque directories are made from the OCI markers, never taken from a layer as given).
fn xattrs<R: Read>(entry: &mut tar::Entry<R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if let Ok(key) = ext.key()
                && let Some(name) = key.strip_prefix("SCHILY.xattr.")
                && !name.starts_with("trusted.overlay.")
            {
                out.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

fn unpack_entry<R: Read>(
    root: &Dir,
    entry: &mut tar::Entry<R>,
    rel: &Path,
    dir_times: &mut Vec<(PathBuf, i64)>,
    whiteouts: Whiteouts,
) -> io::Result<()> {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = rel.parent().unwrap_or(Path::new(""));
    let gone = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    if name == WH_OPAQUE {
        root.create_dir_all(parent, 0o755)?;
        return match whiteouts {
            Whiteouts::Overlay => root.make_opaque(parent),
            // An opaque directory hides what lower layers put in it: empty it.
            Whiteouts::Apply => {
                for (name, _) in root.read_dir(parent)? {
                    gone(root.remove_all(&parent.join(name)))?;
                }
                Ok(())
            }
        };
    }
    if let Some(hidden) = name.strip_prefix(WH_PREFIX) {
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(invalid(format!("whiteout `{name}` names no file")));
        }
        root.create_dir_all(parent, 0o755)?;
        return match whiteouts {
            Whiteouts::Overlay => root.make_whiteout(&parent.join(hidden)),
            Whiteouts::Apply => gone(root.remove_all(&parent.join(hidden))),
        };
    }
    let xattrs = xattrs(entry)?;
    let h = entry.header();
    let mode = h.mode()? & 0o7777;
    // A blank numeric field (some tar writers leave them empty) means 0, as tar reads it.
    let uid = u32::try_from(h.uid().unwrap_or(0)).map_err(|_| invalid("uid out of range"))?;
    let gid = u32::try_from(h.gid().unwrap_or(0)).map_err(|_| invalid("gid out of range"))?;
    let mtime = i64::try_from(h.mtime().unwrap_or(0)).unwrap_or(0);
    let num = |v: io::Result<Option<u32>>| v.ok().flatten().unwrap_or(0);
    let node = |t| match t {
        tar::EntryType::Char => Some(NodeKind::Char),
        tar::EntryType::Block => Some(NodeKind::Block),
        tar::EntryType::Fifo => Some(NodeKind::Fifo),
        _ => None,
    };
    let kind = h.entry_type();
    match kind {
        tar::EntryType::Directory => {
            if root
                .symlink_metadata(rel)
                .is_ok_and(|m| m.kind != Kind::Dir)
            {
                root.remove_all(rel)?;
            }
            root.create_dir_all(rel, 0o755)?;
            root.lchown(rel, uid, gid)?;
            root.set_mode(rel, mode)?;
            for (k, v) in &xattrs {
                root.set_xattr(rel, k, v).or_else(|e| match e.kind() {
                    io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied => Ok(()),
                    _ => Err(e),
                })?;
            }
            dir_times.push((rel.to_path_buf(), mtime));
        }
        // A GNU sparse entry reads back as its whole content (holes as zeros).
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            root.create_dir_all(parent, 0o755)?;
            let mut f = root.create_file(rel, 0o600)?;
            io::copy(entry, &mut f)?;
            beneath::finish_file(&f, uid, gid, mode)?;
            for (k, v) in &xattrs {
                beneath::set_file_xattr(&f, k, v)?;
            }
            drop(f);
            root.set_mtime(rel, mtime)?;
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name()?
                .ok_or_else(|| invalid("a symlink without a target"))?
                .into_owned();
            root.create_dir_all(parent, 0o755)?;
            // The target is stored as written: it is only ever resolved beneath a root.
            root.symlink(&target, rel)?;
            root.lchown(rel, uid, gid)?;
            root.set_mtime(rel, mtime)?;
        }
        tar::EntryType::Link => {
            let target = entry
                .link_name()?
                .ok_or_else(|| invalid("a hard link without a target"))?
                .into_owned();
            let target = safe_rel(&target).ok_or_else(|| {
                invalid(format!(
                    "hard link to {} points outside the layer",
                    target.display()
                ))
            })?;
            root.create_dir_all(parent, 0o755)?;
            root.hard_link(&target, rel)?;
        }
        t if node(t).is_some() => {
            root.create_dir_all(parent, 0o755)?;
            let kind = node(t).unwrap_or(NodeKind::Fifo);
            root.make_node(
                rel,
                kind,
                mode,
                num(h.device_major()),
                num(h.device_minor()),
            )?;
            root.lchown(rel, uid, gid)?;
            root.set_mtime(rel, mtime)?;
        }
        tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
        other => {
            return Err(invalid(format!(
                "unsupported tar entry type {other:?} (only files, directories, links, devices and FIFOs are unpacked)"
            )));
        }
    }
    Ok(())
}

struct HashingReader<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

struct HashingWriter<W> {
    inner: W,
    hash: sha2::Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A packed layer: gzip blob digest and size, and the uncompressed diff_id.
#[derive(Debug, Clone)]
pub struct Packed {
    pub digest: crate::Digest,
    pub size: u64,
    pub diff_id: crate::Digest,
}

fn hex(h: sha2::Sha256) -> String {
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Packs the trees `paths` (relative to `root`, all of it when empty) into a gzip layer
/// stored in `blobs`.
pub fn pack(root: &Path, paths: &[PathBuf], blobs: &Path) -> Result<Packed, Error> {
    let tmp_dir = blobs.join("sha256");
    fs::create_dir_all(&tmp_dir).map_err(|e| Error::Io {
        path: tmp_dir.clone(),
        source: e,
    })?;
    let tmp = tmp_dir.join(format!(".pack-{}-{}", std::process::id(), paths.len()));
    let file = fs::File::create(&tmp).map_err(|e| Error::Io {
        path: tmp.clone(),
        source: e,
    })?;
    let outer = HashingWriter {
        inner: io::BufWriter::new(file),
        hash: sha2::Sha256::new(),
        bytes: 0,
    };
    let gz = flate2::write::GzEncoder::new(outer, flate2::Compression::new(3));
    let inner = HashingWriter {
        inner: gz,
        hash: sha2::Sha256::new(),
        bytes: 0,
    };
    let mut b = tar::Builder::new(inner);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    let io_e = |e: io::Error| Error::Io {
        path: root.to_path_buf(),
        source: e,
    };
    let mut links = HashMap::new();
    if paths.is_empty() {
        let mut names: Vec<_> = fs::read_dir(root)
            .map_err(io_e)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            append(&mut b, root, Path::new(&n), &mut links).map_err(io_e)?;
        }
    } else {
        for p in paths {
            append(&mut b, root, p, &mut links).map_err(io_e)?;
        }
    }
    let inner = b.into_inner().map_err(io_e)?;
    let diff_id = crate::Digest::from_sha256_hex(&hex(inner.hash))
        .map_err(|e| Error::Format(e.to_string()))?;
    let outer = inner.inner.finish().map_err(io_e)?;
    let size = outer.bytes;
    let digest = crate::Digest::from_sha256_hex(&hex(outer.hash))
        .map_err(|e| Error::Format(e.to_string()))?;
    let mut w = outer.inner;
    w.flush().map_err(io_e)?;
    drop(w);
    let dest = crate::image::blob_path(blobs, &digest);
    fs::rename(&tmp, &dest).map_err(|e| Error::Io {
        path: dest,
        source: e,
    })?;
    Ok(Packed {
        digest,
        size,
        diff_id,
    })
}

/// Appends `rel` (recursively); files with several links become tar hard links to the first
/// path seen, so hard links survive the round trip.
fn append<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let full = root.join(rel);
    let meta = fs::symlink_metadata(&full)?;
    if meta.is_dir() {
        b.append_path_with_name(&full, rel)?;
        let mut names: Vec<_> = fs::read_dir(&full)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            append(b, root, &rel.join(n), links)?;
        }
        return Ok(());
    }
    if meta.is_file() && meta.nlink() > 1 {
        let key = (meta.dev(), meta.ino());
        if let Some(first) = links.get(&key) {
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            h.set_entry_type(tar::EntryType::Link);
            h.set_size(0);
            return b.append_link(&mut h, rel, first).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{} (hard link to {}): {e}", rel.display(), first.display()),
                )
            });
        }
        links.insert(key, rel.to_path_buf());
    }
    let ft = meta.file_type();
    use std::os::unix::fs::FileTypeExt;
    if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        // Device nodes and fifos (a debootstrap tree has /dev/console, /dev/null…).
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        h.set_size(0);
        let kind = if ft.is_char_device() {
            tar::EntryType::Char
        } else if ft.is_block_device() {
            tar::EntryType::Block
        } else {
            tar::EntryType::Fifo
        };
        h.set_entry_type(kind);
        let rdev = meta.rdev();
        let (major, minor) = (
            ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff),
            ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff),
        );
        h.set_device_major(major as u32)?;
        h.set_device_minor(minor as u32)?;
        return b
            .append_data(&mut h, rel, io::empty())
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", rel.display())));
    }
    b.append_path_with_name(&full, rel)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", rel.display())))
}
