//! OCI images for Kairos: [`reference`] syntax, [`image`] types, a verified blob [`store`]
//! with OCI layout directories, [`archive`]s, a [`registry`] client, and [`layer`]
//! unpacking/packing in overlayfs format.

pub mod archive;
pub mod image;
pub mod layer;
pub mod reference;
pub mod registry;
pub mod store;
pub mod testing;

use std::path::PathBuf;

pub use image::{Digest, LocalImage};
pub use reference::ImageRef;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {digest} does not match its digest (got {found}): refusing it")]
    Digest { digest: String, found: String },
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    NotFound(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error("{0}")]
    NoSpace(String),
    #[error(
        "{layer}: unpacks to more than {limit} bytes, all the space there is for it; refused (a compression bomb, or give it room with --scratch DIR)"
    )]
    TooBig { layer: PathBuf, limit: u64 },
}

use std::path::Path;

use image::{Descriptor, MT_OCI_LAYER_GZIP, Manifest};

/// Progress of a transfer: (blob digest, bytes done, bytes total).
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

/// Reads an image from any source into a local blob store (`cache/blobs` for registries and
/// archives; an OCI layout is read in place). `dir:` sources are not images: the caller
/// handles them.
pub fn fetch(r: &ImageRef, cache: &Path, progress: Progress) -> Result<LocalImage, Error> {
    let blobs = cache.join("blobs");
    match r {
        ImageRef::Registry {
            registry,
            repository,
            reference,
        } => registry::Registry::new(registry, repository).pull(reference, &blobs, progress),
        ImageRef::Layout { dir, tag } => store::read_layout(dir, tag.as_deref()),
        ImageRef::Archive { path } => {
            let scratch = cache.join(format!("tmp-archive-{}", std::process::id()));
            let r = archive::read_archive(path, &blobs, &scratch);
            let _ = std::fs::remove_dir_all(&scratch);
            r
        }
        ImageRef::Dir { path } => Err(Error::Format(format!(
            "dir:{} is a root tree, not an image",
            path.display()
        ))),
    }
}

/// Like [`fetch`], but from a registry only the layers with `wanted(diff_id)` are downloaded
/// (local sources are read in place whole): what an upgrade uses to pull only what changed.
/// `room(bytes)` is asked first whether the wanted layers' compressed bytes fit.
pub fn fetch_wanted(
    r: &ImageRef,
    cache: &Path,
    wanted: &dyn Fn(&str) -> bool,
    room: &dyn Fn(u64) -> Result<(), Error>,
    progress: Progress,
) -> Result<LocalImage, Error> {
    match r {
        ImageRef::Registry {
            registry,
            repository,
            reference,
        } => registry::Registry::new(registry, repository).pull_some(
            reference,
            &cache.join("blobs"),
            wanted,
            room,
            progress,
        ),
        other => fetch(other, cache, progress),
    }
}

/// Writes an image to a destination (registry, OCI layout, OCI archive).
pub fn store_to(
    img: &LocalImage,
    r: &ImageRef,
    cache: &Path,
    progress: Progress,
) -> Result<(), Error> {
    match r {
        ImageRef::Registry {
            registry,
            repository,
            reference,
        } => registry::Registry::new(registry, repository).push(img, reference, progress),
        ImageRef::Layout { dir, tag } => {
            store::write_layout(img, dir, tag.as_deref().unwrap_or("latest"))
        }
        ImageRef::Archive { path } => {
            let scratch = cache.join(format!("tmp-archive-out-{}", std::process::id()));
            let r = archive::write_archive(img, path, "latest", &scratch);
            let _ = std::fs::remove_dir_all(&scratch);
            r
        }
        ImageRef::Dir { path } => Err(Error::Format(format!(
            "cannot write an image to dir:{}",
            path.display()
        ))),
    }
}

fn now_rfc3339() -> String {
    // Reproducible builds set SOURCE_DATE_EPOCH; otherwise the epoch keeps digests stable.
    let secs: i64 = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    kairos_sys::time::rfc3339(secs)
}

/// Writes config + manifest for `layers` (with their diff_ids) and returns the image.
fn assemble(
    blobs: &Path,
    layers: Vec<(layer::Packed, String)>,
    base_config: Option<&serde_json::Value>,
) -> Result<LocalImage, Error> {
    let mut config = base_config.cloned().unwrap_or_else(|| {
        serde_json::json!({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": []}, "history": []})
    });
    config["created"] = serde_json::Value::String(now_rfc3339());
    let mut descs = Vec::new();
    for (p, comment) in &layers {
        if let Some(ids) = config["rootfs"]["diff_ids"].as_array_mut() {
            ids.push(serde_json::Value::String(p.diff_id.to_string()));
        }
        if let Some(h) = config["history"].as_array_mut() {
            h.push(serde_json::json!({"created": now_rfc3339(), "created_by": comment}));
        }
        descs.push(Descriptor::new(MT_OCI_LAYER_GZIP, p.digest.clone(), p.size));
    }
    let config_bytes = serde_json::to_vec(&config).map_err(|e| Error::Format(e.to_string()))?;
    let config_digest = store::put_bytes(blobs, &config_bytes)?;
    let manifest = Manifest::oci(config_digest, config_bytes.len() as u64, descs);
    let mbytes = serde_json::to_vec(&manifest).map_err(|e| Error::Format(e.to_string()))?;
    let digest = store::put_bytes(blobs, &mbytes)?;
    store::local_image(blobs, manifest, digest)
}

/// Makes an image from a root tree. `split` lists top-level paths that get their own layers
/// (in order, before the rest), e.g. `["usr", "lib"]`; empty = one layer.
pub fn import_dir(rootfs: &Path, blobs: &Path, split: &[String]) -> Result<LocalImage, Error> {
    let mut layers = Vec::new();
    let mut taken = Vec::new();
    for s in split {
        let rel = std::path::PathBuf::from(s.trim_matches('/'));
        if !rootfs.join(&rel).exists() {
            return Err(Error::NotFound(format!(
                "--split {s}: {} has no {s}",
                rootfs.display()
            )));
        }
        layers.push((
            layer::pack(rootfs, std::slice::from_ref(&rel), blobs)?,
            format!("kairosctl image import: /{}", rel.display()),
        ));
        taken.push(rel);
    }
    let rest: Vec<std::path::PathBuf> = std::fs::read_dir(rootfs)
        .map_err(|e| Error::Io {
            path: rootfs.to_path_buf(),
            source: e,
        })?
        .flatten()
        .map(|e| std::path::PathBuf::from(e.file_name()))
        .filter(|p| !taken.contains(p))
        .collect();
    let mut rest = rest;
    rest.sort();
    layers.push((
        layer::pack(rootfs, &rest, blobs)?,
        "kairosctl image import".into(),
    ));
    assemble(blobs, layers, None)
}

/// A new image: `base` plus one layer made from `layer_dir`.
pub fn append_layer(
    base: &LocalImage,
    layer_dir: &Path,
    blobs: &Path,
    comment: &str,
) -> Result<LocalImage, Error> {
    for d in base.manifest.layers.iter().chain([&base.manifest.config]) {
        if !image::blob_path(blobs, &d.digest).exists() {
            let src = base.blob_path(&d.digest);
            let mut f = std::fs::File::open(&src).map_err(|e| Error::Io {
                path: src.clone(),
                source: e,
            })?;
            store::put_verified(blobs, &d.digest, &mut f, &mut |_| {})?;
        }
    }
    let packed = layer::pack(layer_dir, &[], blobs)?;
    let mut img = assemble(
        blobs,
        vec![(packed, comment.to_string())],
        Some(&base.config),
    )?;
    // Keep the base layers in front of the new one.
    let mut layers = base.manifest.layers.clone();
    layers.append(&mut img.manifest.layers);
    let manifest = Manifest {
        layers,
        ..img.manifest
    };
    let mbytes = serde_json::to_vec(&manifest).map_err(|e| Error::Format(e.to_string()))?;
    let digest = store::put_bytes(blobs, &mbytes)?;
    store::local_image(blobs, manifest, digest)
}
