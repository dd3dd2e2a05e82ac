//! From OCI images to trees: unpacking layers (diff_ids verified), a merged view for
//! inspection, and kairosify on images.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kairos_oci::LocalImage;

use crate::kairosify::{Binaries, kairos_layer};

/// The image's layers unpacked to `work/layers/<n>` (overlay format), plus their merged view
/// at `work/merged`.
pub struct Unpacked {
    pub layers: Vec<PathBuf>,
    pub merged: PathBuf,
}

pub fn unpack(img: &LocalImage, work: &Path) -> Result<Unpacked> {
    let diff_ids = img.diff_ids()?;
    if diff_ids.len() != img.manifest.layers.len() {
        bail!(
            "image {}: config lists {} diff_ids for {} layers",
            img.manifest_digest,
            diff_ids.len(),
            img.manifest.layers.len()
        );
    }
    let mut layers = Vec::new();
    for (i, (d, want)) in img.manifest.layers.iter().zip(&diff_ids).enumerate() {
        let dir = work.join(format!("layers/{i}"));
        let _ = fs::remove_dir_all(&dir);
        let got = kairos_oci::layer::unpack(&img.blob_path(&d.digest), &dir)
            .with_context(|| format!("unpacking layer {}", d.digest))?;
        if *want != got {
            bail!(
                "layer {} unpacks to {got}, but the image config says {want}: refusing a corrupt image",
                d.digest
            );
        }
        layers.push(dir);
    }
    let merged = work.join("merged");
    let _ = fs::remove_dir_all(&merged);
    fs::create_dir_all(&merged)?;
    for l in &layers {
        // Hard-link copies: cheap, and later layers replace earlier files.
        kairos_sys::exec::Cmd::new("cp")
            .args(["-a", "--link", "--remove-destination"])
            .arg(format!("{}/.", l.display()))
            .arg(&merged)
            .run()
            .with_context(|| format!("merging layer {}", l.display()))?;
    }
    Ok(Unpacked { layers, merged })
}

/// `kairosify`: the image plus the Kairos layer, which also carries `/boot/initrd` made from
/// the image's own modules and a stable `/boot/vmlinuz`.
pub fn kairosify(
    img: &LocalImage,
    blobs: &Path,
    bins: &Binaries,
    version: &str,
    work: &Path,
) -> Result<LocalImage> {
    let un = unpack(img, work)?;
    if crate::kairosify::is_kairosified(&un.merged) {
        bail!("the image is already kairosified (it has /etc/kairos-release and kairos-agent)");
    }
    let layer = work.join("kairos-layer");
    let _ = fs::remove_dir_all(&layer);
    fs::create_dir_all(layer.join("boot"))?;
    kairos_layer(&un.merged, bins, version, &layer)?;
    let kernel = crate::initrd::find_kernel(&un.merged)?;
    crate::initrd::build(&un.merged, &bins.immucore, &layer.join("boot/initrd"))?;
    let tree = kairos_sys::beneath::Dir::open(&un.merged)?;
    if !tree.exists(Path::new("boot/vmlinuz")) {
        kernel.copy_vmlinuz(&layer.join("boot/vmlinuz"))?;
    }
    let out = kairos_oci::append_layer(img, &layer, blobs, &format!("kairosify {version}"))?;
    Ok(out)
}
