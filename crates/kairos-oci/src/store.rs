//! Content-addressed blobs on disk and OCI layout directories.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::Error;
use crate::image::{
    Descriptor, Digest, Index, LocalImage, MT_OCI_INDEX, MT_OCI_MANIFEST, Manifest, REF_NAME,
    blob_path, pick_platform,
};

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Streams `reader` into the blob store, checking it hashes to `digest`; a wrong blob is
/// never left in the store. Returns the size.
pub fn put_verified(
    blobs: &Path,
    digest: &Digest,
    reader: &mut dyn Read,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, Error> {
    let dest = blob_path(blobs, digest);
    if dest.exists() {
        return Ok(fs::metadata(&dest).map_err(io_err(&dest))?.len());
    }
    let dir = dest.parent().unwrap_or(blobs);
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.partial-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    // Every failure below removes the partial file.
    let copied = (|| -> io::Result<()> {
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            f.write_all(&buf[..n])?;
            total += n as u64;
            progress(total);
        }
        f.sync_all()
    })();
    if let Err(e) = copied {
        drop(f);
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io {
            path: tmp,
            source: e,
        });
    }
    let found = format!(
        "sha256:{}",
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    if *digest != found {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Digest {
            digest: digest.to_string(),
            found,
        });
    }
    if let Err(e) = fs::rename(&tmp, &dest) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io {
            path: dest,
            source: e,
        });
    }
    Ok(total)
}

/// Stores bytes and returns their digest.
pub fn put_bytes(blobs: &Path, data: &[u8]) -> Result<Digest, Error> {
    let digest = Digest::of(data);
    put_verified(blobs, &digest, &mut &data[..], &mut |_| {})?;
    Ok(digest)
}

/// Manifests, indexes and configs are small: a bigger blob read into memory is refused.
pub const MAX_JSON_BLOB: u64 = 16 << 20;

/// Reads a regular file of at most `limit` bytes.
fn read_bounded(p: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let f = fs::File::open(p)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is not a regular file",
        ));
    }
    let mut out = Vec::new();
    f.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("is larger than {limit} bytes, too big for a manifest or config"),
        ));
    }
    Ok(out)
}

/// Reads a blob for upload: a regular file of exactly `size` bytes whose content matches
/// `digest` (an OCI layout is the user's directory: its "blob" may be anything).
pub fn read_verified(blobs: &Path, digest: &Digest, size: u64) -> Result<Vec<u8>, Error> {
    let p = blob_path(blobs, digest);
    let data = read_bounded(&p, size).map_err(io_err(&p))?;
    if data.len() as u64 != size {
        return Err(Error::Format(format!(
            "{}: {} bytes, but the manifest says {size}: refusing to upload it",
            p.display(),
            data.len()
        )));
    }
    if *digest != Digest::of(&data) {
        return Err(Error::Digest {
            digest: digest.to_string(),
            found: Digest::of(&data).to_string(),
        });
    }
    Ok(data)
}

pub fn read_blob(blobs: &Path, digest: &Digest) -> Result<Vec<u8>, Error> {
    let p = blob_path(blobs, digest);
    let data = read_bounded(&p, MAX_JSON_BLOB).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            Error::NotFound(format!("blob {digest} is not in {}", blobs.display()))
        }
        _ => Error::Io {
            path: p.clone(),
            source: e,
        },
    })?;
    let found = format!("sha256:{}", kairos_layers::sha256_hex(&data));
    if *digest != found {
        return Err(Error::Digest {
            digest: digest.to_string(),
            found,
        });
    }
    Ok(data)
}

/// Resolves a manifest or index blob to a linux/amd64 image manifest.
/// How many index levels lead to a manifest at most (an index of indexes is legal; a loop is
/// not).
pub const MAX_INDEX_DEPTH: usize = 4;

pub fn resolve_manifest(blobs: &Path, desc_digest: &Digest) -> Result<(Manifest, Digest), Error> {
    resolve_manifest_at(blobs, desc_digest, 0)
}

fn resolve_manifest_at(
    blobs: &Path,
    desc_digest: &Digest,
    depth: usize,
) -> Result<(Manifest, Digest), Error> {
    if depth > MAX_INDEX_DEPTH {
        return Err(Error::Format(format!(
            "index {desc_digest}: more than {MAX_INDEX_DEPTH} nested indexes (a loop?); refused"
        )));
    }
    let data = read_blob(blobs, desc_digest)?;
    let v: serde_json::Value = serde_json::from_slice(&data)
        .map_err(|e| Error::Format(format!("manifest {desc_digest}: {e}")))?;
    if v.get("manifests").is_some() {
        let idx: Index = serde_json::from_value(v)
            .map_err(|e| Error::Format(format!("index {desc_digest}: {e}")))?;
        let d = pick_platform(&idx).ok_or_else(|| {
            Error::NotFound(format!("index {desc_digest} has no linux/amd64 image"))
        })?;
        return resolve_manifest_at(blobs, &d.digest, depth + 1);
    }
    let m: Manifest = serde_json::from_value(v)
        .map_err(|e| Error::Format(format!("manifest {desc_digest}: {e}")))?;
    Ok((m, desc_digest.clone()))
}

/// Loads the config of a manifest whose blobs are present.
pub fn local_image(
    blobs: &Path,
    manifest: Manifest,
    manifest_digest: Digest,
) -> Result<LocalImage, Error> {
    let config: serde_json::Value =
        serde_json::from_slice(&read_blob(blobs, &manifest.config.digest)?)
            .map_err(|e| Error::Format(format!("config {}: {e}", manifest.config.digest)))?;
    Ok(LocalImage {
        blobs: blobs.to_path_buf(),
        manifest,
        manifest_digest,
        config,
    })
}

/// Reads an OCI layout directory; `tag` selects an index entry by its ref name.
pub fn read_layout(dir: &Path, tag: Option<&str>) -> Result<LocalImage, Error> {
    let index_path = dir.join("index.json");
    let text = fs::read(&index_path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::NotFound(format!(
            "{} is not an OCI layout (no index.json)",
            dir.display()
        )),
        _ => Error::Io {
            path: index_path.clone(),
            source: e,
        },
    })?;
    let idx: Index = serde_json::from_slice(&text)
        .map_err(|e| Error::Format(format!("{}: {e}", index_path.display())))?;
    let desc = match tag {
        Some(t) => idx
            .manifests
            .iter()
            .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t))
            .ok_or_else(|| {
                let tags: Vec<_> = idx
                    .manifests
                    .iter()
                    .filter_map(|d| d.annotations.get(REF_NAME))
                    .cloned()
                    .collect();
                Error::NotFound(format!(
                    "no tag {t:?} in {} (tags: {})",
                    dir.display(),
                    tags.join(", ")
                ))
            })?,
        None => match idx.manifests.as_slice() {
            [one] => one,
            [] => return Err(Error::NotFound(format!("{} holds no image", dir.display()))),
            _ => pick_platform(&idx)
                .or(idx.manifests.first())
                .ok_or_else(|| Error::NotFound("no image".into()))?,
        },
    };
    let blobs = dir.join("blobs");
    let (m, d) = resolve_manifest(&blobs, &desc.digest)?;
    local_image(&blobs, m, d)
}

fn copy_blob(from: &Path, to: &Path, digest: &Digest) -> Result<(), Error> {
    let dst = blob_path(to, digest);
    if dst.exists() {
        return Ok(());
    }
    let src = blob_path(from, digest);
    let mut f = fs::File::open(&src).map_err(io_err(&src))?;
    put_verified(to, digest, &mut f, &mut |_| {}).map(|_| ())
}

/// Writes `img` into the OCI layout `dir` under `tag` (replacing an entry with that tag).
pub fn write_layout(img: &LocalImage, dir: &Path, tag: &str) -> Result<(), Error> {
    let blobs = dir.join("blobs");
    fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
    for d in img.manifest.layers.iter().chain([&img.manifest.config]) {
        copy_blob(&img.blobs, &blobs, &d.digest)?;
    }
    copy_blob(&img.blobs, &blobs, &img.manifest_digest)?;
    fs::write(dir.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}").map_err(io_err(dir))?;
    let index_path = dir.join("index.json");
    let mut idx = fs::read(&index_path)
        .ok()
        .and_then(|t| serde_json::from_slice::<Index>(&t).ok())
        .unwrap_or(Index {
            schema_version: 2,
            media_type: Some(MT_OCI_INDEX.into()),
            manifests: Vec::new(),
        });
    idx.manifests
        .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
    let size = fs::metadata(blob_path(&blobs, &img.manifest_digest))
        .map_err(io_err(&blobs))?
        .len();
    idx.manifests.push(Descriptor {
        media_type: img
            .manifest
            .media_type
            .clone()
            .unwrap_or_else(|| MT_OCI_MANIFEST.into()),
        digest: img.manifest_digest.clone(),
        size,
        platform: None,
        annotations: [(REF_NAME.to_string(), tag.to_string())].into(),
    });
    let text = serde_json::to_vec_pretty(&idx).map_err(|e| Error::Format(e.to_string()))?;
    kairos_layers::write_atomic(&index_path, &text).map_err(|e| Error::Format(e.to_string()))
}

/// Where the blob store of a layout lives.
pub fn layout_blobs(dir: &Path) -> PathBuf {
    dir.join("blobs")
}
