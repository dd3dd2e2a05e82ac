//! Image archives: `docker save` tars and OCI archives (an OCI layout in a tar).

use std::fs;
use std::io::{self, Read};
use std::path::Path;

use std::path::PathBuf;

use kairos_sys::beneath::Dir;

use crate::Error;
use crate::image::{Descriptor, Digest, LocalImage, MT_OCI_LAYER_TAR, Manifest};
use crate::store::{self, put_bytes, put_verified};

/// Reads an archive into the blob store `blobs` (verifying every blob) and returns the image.
pub fn read_archive(tar_path: &Path, blobs: &Path, scratch: &Path) -> Result<LocalImage, Error> {
    // The archive is unpacked by the layer unpacker: beneath `scratch`, by descriptor.
    crate::layer::unpack(tar_path, scratch).map_err(|e| match e {
        Error::Format(m) => {
            Error::Format(format!("{}: not a readable tar: {m}", tar_path.display()))
        }
        other => other,
    })?;
    if scratch.join("index.json").exists() {
        let img = store::read_layout(scratch, None)?;
        return copy_into(&img, blobs);
    }
    let mf = scratch.join("manifest.json");
    let text = fs::read(&mf).map_err(|_| {
        Error::Format(format!(
            "{}: neither an OCI archive (index.json) nor a docker save tar (manifest.json)",
            tar_path.display()
        ))
    })?;
    let entries: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::Format(format!("manifest.json: {e}")))?;
    let entry = entries
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| Error::Format("manifest.json lists no image".into()))?;
    let config_file = entry["Config"]
        .as_str()
        .ok_or_else(|| Error::Format("manifest.json: no Config".into()))?;
    // Names in manifest.json are the archive's own files: resolved beneath the unpacked
    // archive, regular files only (`"Layers": ["/host/file"]` names the archive's /host/file).
    let inside = Dir::open(scratch).map_err(|e| Error::Io {
        path: scratch.to_path_buf(),
        source: e,
    })?;
    let member = |name: &str| -> Result<fs::File, Error> {
        inside.open_file(&PathBuf::from(name)).map_err(|e| {
            Error::Format(format!(
                "{}: manifest.json names {name:?}, which is not a file in the archive: {e}",
                tar_path.display()
            ))
        })
    };
    let mut config_bytes = Vec::new();
    member(config_file)?
        .take(crate::store::MAX_JSON_BLOB + 1)
        .read_to_end(&mut config_bytes)
        .map_err(|e| Error::Format(format!("{config_file}: {e}")))?;
    if config_bytes.len() as u64 > crate::store::MAX_JSON_BLOB {
        return Err(Error::Format(format!(
            "{config_file}: too big for an image config"
        )));
    }
    let config_digest = put_bytes(blobs, &config_bytes)?;
    let mut layers = Vec::new();
    for l in entry["Layers"].as_array().into_iter().flatten() {
        let l = l
            .as_str()
            .ok_or_else(|| Error::Format("manifest.json: a Layers entry is not a string".into()))?;
        let hex = kairos_layers::sha256_reader(&mut member(l)?)
            .map_err(|e| Error::Format(format!("{l}: {e}")))?;
        let digest = Digest::from_sha256_hex(&hex).map_err(|e| Error::Format(e.to_string()))?;
        let size = put_verified(blobs, &digest, &mut member(l)?, &mut |_| {})?;
        layers.push(Descriptor::new(MT_OCI_LAYER_TAR, digest, size));
    }
    let manifest = Manifest::oci(config_digest, config_bytes.len() as u64, layers);
    let bytes = serde_json::to_vec(&manifest).map_err(|e| Error::Format(e.to_string()))?;
    let digest = put_bytes(blobs, &bytes)?;
    store::local_image(blobs, manifest, digest)
}

fn copy_into(img: &LocalImage, blobs: &Path) -> Result<LocalImage, Error> {
    for d in img.manifest.layers.iter().chain([&img.manifest.config]) {
        let src = img.blob_path(&d.digest);
        let mut f = fs::File::open(&src).map_err(|e| Error::Io {
            path: src.clone(),
            source: e,
        })?;
        put_verified(blobs, &d.digest, &mut f, &mut |_| {})?;
    }
    let m = store::read_blob(&img.blobs, &img.manifest_digest)?;
    put_verified(blobs, &img.manifest_digest, &mut &m[..], &mut |_| {})?;
    store::local_image(blobs, img.manifest.clone(), img.manifest_digest.clone())
}

/// Writes an OCI archive (layout in a tar) with the image under `tag`.
pub fn write_archive(
    img: &LocalImage,
    tar_path: &Path,
    tag: &str,
    scratch: &Path,
) -> Result<(), Error> {
    let layout = scratch.join("layout");
    let _ = fs::remove_dir_all(&layout);
    store::write_layout(img, &layout, tag)?;
    let tmp = tar_path.with_extension("tar.partial");
    let f = fs::File::create(&tmp).map_err(|e| Error::Io {
        path: tmp.clone(),
        source: e,
    })?;
    let mut b = tar::Builder::new(io::BufWriter::new(f));
    b.append_dir_all(".", &layout).map_err(|e| Error::Io {
        path: tar_path.to_path_buf(),
        source: e,
    })?;
    b.into_inner()
        .and_then(|mut w| io::Write::flush(&mut w))
        .map_err(|e| Error::Io {
            path: tmp.clone(),
            source: e,
        })?;
    fs::rename(&tmp, tar_path).map_err(|e| Error::Io {
        path: tar_path.to_path_buf(),
        source: e,
    })
}
