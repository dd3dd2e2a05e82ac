//! The OS on disk: a store of read-only layer images named by digest, and small deployment
//! manifests that say which layers, kernel and initrd make one bootable OS version.
//!
//! A store directory holds `layers/sha256-<hex>.erofs` and `deployments/<id>.json`. Boot
//! code (immucore) only reads; build and upgrade code writes through [`Store`].

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

pub mod digest;
pub mod verity;
pub use digest::{Digest, DigestError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("deployment {path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{tool}: {msg}")]
    Tool { tool: String, msg: String },
    #[error("{what} {path}: expected {expected}, found {found}")]
    Mismatch {
        what: &'static str,
        path: PathBuf,
        expected: String,
        found: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file the deployment needs, with what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// Path relative to the store root.
    pub file: String,
    pub size: u64,
    /// sha256 (hex) of the file's bytes.
    pub sha256: String,
}

/// One layer: the OCI digest of its uncompressed tar, and the filesystem image made from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// `sha256:<hex>` of the uncompressed layer tar (the OCI diff_id).
    pub digest: Digest,
    #[serde(flatten)]
    pub image: Blob,
    /// The dm-verity tree at the end of the image (every image this code writes has one;
    /// absent in manifests from before trees were written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<verity::Verity>,
}

impl Layer {
    /// What a signed UKI pins for this layer: its verity root hash, or the sha256 of the
    /// whole image when it has no tree. The two cannot be confused: a manifest that drops
    /// the tree to be checked by hash instead would need an image whose sha256 is the root.
    pub fn pin(&self) -> &str {
        match &self.verity {
            Some(v) => &v.root,
            None => &self.image.sha256,
        }
    }
}

/// One bootable OS version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    /// The image reference it was made from.
    pub image: String,
    /// Digest of the OCI manifest it was made from.
    pub manifest_digest: String,
    pub version: String,
    /// RFC 3339.
    pub created: String,
    /// Layers in OCI order: base first.
    pub layers: Vec<Layer>,
    pub kernel: Option<Blob>,
    pub initrd: Option<Blob>,
    pub cmdline: String,
    /// Trusted boot: the ESP path of the deployment's signed UKI (its entries boot it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uki: Option<String>,
}

impl Deployment {
    /// Each layer's [`Layer::pin`], base first: what a trusted UKI pins.
    pub fn pins(&self) -> Vec<&str> {
        self.layers.iter().map(Layer::pin).collect()
    }
}

/// The kernel argument of a signed UKI that pins a deployment's layer images (trusted boot):
/// `rd.kairos.layers=<root>,<root>…` (see [`Layer::pin`]), base first. Written by build and read by immucore
/// and the agent through [`render_pins`] and [`parse_pins`] only.
pub const PINS_ARG: &str = "rd.kairos.layers";
/// At most this many layers can be pinned (the x86 kernel cmdline is 2 KiB).
pub const MAX_PINS: usize = 24;

/// `rd.kairos.layers=a,b` for these image hashes.
pub fn render_pins(hashes: &[&str]) -> String {
    format!("{PINS_ARG}={}", hashes.join(","))
}

/// The hashes of an `rd.kairos.layers=` value: each 64 hex digits (lowercased), at most
/// [`MAX_PINS`]; an error says which one is wrong.
pub fn parse_pins(value: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = value.split(',').map(str::to_ascii_lowercase).collect();
    if list.len() > MAX_PINS {
        return Err(format!(
            "{PINS_ARG}: {} layers, at most {MAX_PINS}",
            list.len()
        ));
    }
    for h in &list {
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{PINS_ARG}: {h:?} is not a sha256 (64 hex digits)"));
        }
    }
    Ok(list)
}

/// sha256 of bytes, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    sha256_reader(&mut f).map_err(io_err(path))
}

/// sha256 of everything `r` yields, hex.
pub fn sha256_reader(r: &mut dyn Read) -> io::Result<String> {
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `data` to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        // Nothing half-written stays behind (a full filesystem, say).
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// A layer store rooted at a directory (a mounted STATE or RECOVERY partition, an ISO tree).
#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    /// Where the image of a layer with this diff_id lives.
    pub fn layer_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(layer_file(digest))
    }

    pub fn deployment_path(&self, id: &str) -> PathBuf {
        self.root.join("deployments").join(format!("{id}.json"))
    }

    pub fn read_deployment(&self, id: &str) -> Result<Deployment, Error> {
        let p = self.deployment_path(id);
        let text = fs::read(&p).map_err(io_err(&p))?;
        serde_json::from_slice(&text).map_err(|source| Error::Manifest { path: p, source })
    }

    pub fn write_deployment(&self, d: &Deployment) -> Result<(), Error> {
        let p = self.deployment_path(&d.id);
        let text = serde_json::to_vec_pretty(d).map_err(|source| Error::Manifest {
            path: p.clone(),
            source,
        })?;
        write_atomic(&p, &text)
    }

    /// Describes a file already in the store.
    pub fn blob(&self, rel: &str) -> Result<Blob, Error> {
        let p = self.root.join(rel);
        let size = fs::metadata(&p).map_err(io_err(&p))?.len();
        Ok(Blob {
            file: rel.to_string(),
            size,
            sha256: sha256_file(&p)?,
        })
    }

    /// Describes a layer image already in the store, found without a manifest naming it
    /// (an upgrade cut short after writing it): its tree, if any, is where the EROFS
    /// superblock says the filesystem ends.
    pub fn layer(&self, digest: &Digest) -> Result<Layer, Error> {
        let file = layer_file(digest);
        let image = self.blob(&file)?;
        let p = self.root.join(&file);
        let mut head = vec![0u8; 1024 + 64];
        fs::File::open(&p)
            .and_then(|mut f| f.read_exact(&mut head))
            .map_err(io_err(&p))?;
        let verity = match erofs_size(&head) {
            Some(data) if data < image.size => {
                Some(verity::read_tree(&p, data).map_err(io_err(&p))?)
            }
            _ => None,
        };
        Ok(Layer {
            digest: digest.clone(),
            image,
            verity,
        })
    }

    /// Checks a blob: its size always, its hash when `full`.
    pub fn verify(&self, b: &Blob, full: bool) -> Result<(), Error> {
        let p = self.root.join(&b.file);
        let size = fs::metadata(&p).map_err(io_err(&p))?.len();
        if size != b.size {
            return Err(Error::Mismatch {
                what: "size of",
                path: p,
                expected: b.size.to_string(),
                found: size.to_string(),
            });
        }
        if full {
            let h = sha256_file(&p)?;
            if h != b.sha256 {
                return Err(Error::Mismatch {
                    what: "sha256 of",
                    path: p,
                    expected: b.sha256.clone(),
                    found: h,
                });
            }
        }
        Ok(())
    }
}

/// The argv that runs `mkfs.erofs`: the copy bundled under `root` when present, else PATH's.
pub fn mkfs_erofs_argv(root: &Path) -> Vec<String> {
    kairos_sys::tools::argv(root, "mkfs.erofs")
}

/// The filesystem UUID of a layer image, derived from `seed` (the layer's diff_id): the
/// image must come out byte for byte the same wherever it is made — a workstation building
/// a signed UKI that pins it, a node importing the layer during an upgrade.
pub fn erofs_uuid(seed: &str) -> String {
    let h = sha256_hex(format!("kairos-layer:{seed}").as_bytes());
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// The size of the EROFS filesystem whose first bytes are `head` (superblock at 1024:
/// block size bits at +12, block count at +36), if it is one.
pub fn erofs_size(head: &[u8]) -> Option<u64> {
    let sb = head.get(1024..1024 + 40)?;
    if sb[..4] != [0xe2, 0xe1, 0xf5, 0xe0] || !(9..=16).contains(&sb[12]) {
        return None;
    }
    let blocks = u32::from_le_bytes(sb[36..40].try_into().ok()?);
    Some(u64::from(blocks) << sb[12])
}

/// Makes the read-only image of a layer tree (EROFS, lz4) at `out` with its dm-verity tree
/// appended, synced to disk: reproducible (fixed timestamps, the UUID from `seed`, no salt).
/// The one writer of layer images (build, install media, upgrade).
pub fn make_erofs(
    argv: &[String],
    tree: &Path,
    out: &Path,
    seed: &str,
) -> Result<verity::Verity, Error> {
    kairos_sys::exec::Cmd::argv(argv)
        .args(["-zlz4", "-T0", "--quiet"])
        .arg(format!("-U{}", erofs_uuid(seed)))
        .arg(out)
        .arg(tree)
        .run()
        .map_err(|e| Error::Tool {
            tool: "mkfs.erofs".into(),
            msg: format!("making {} from {}: {e}", out.display(), tree.display()),
        })?;
    verity::append_tree(out).map_err(io_err(out))
}

/// `sha256:<hex>` → `layers/sha256-<hex>.erofs` (a validated digest: no `/`, no `..`).
pub fn layer_file(digest: &Digest) -> String {
    format!("layers/sha256-{}.erofs", digest.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_round_trip_and_verify() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        let digest = &Digest::of(b"abc");
        fs::create_dir_all(d.path().join("layers")).unwrap();
        fs::write(store.layer_path(digest), b"image").unwrap();
        let blob = store.blob(&layer_file(digest)).unwrap();
        assert_eq!(blob.file, format!("layers/sha256-{}.erofs", digest.hex()));
        let dep = Deployment {
            id: "v1".into(),
            image: "oci:x".into(),
            manifest_digest: "sha256:m".into(),
            version: "1".into(),
            created: "2026-11-25T00:00:00Z".into(),
            layers: vec![Layer {
                digest: digest.clone(),
                image: blob.clone(),
                verity: None,
            }],
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            uki: None,
        };
        store.write_deployment(&dep).unwrap();
        assert_eq!(store.read_deployment("v1").unwrap(), dep);
        store.verify(&blob, true).unwrap();
        fs::write(store.layer_path(digest), b"imagX").unwrap();
        assert!(store.verify(&blob, false).is_ok());
        let e = store.verify(&blob, true).unwrap_err().to_string();
        assert!(e.contains("sha256 of"), "{e}");
        assert!(store.read_deployment("missing").is_err());
    }
}
