//! `unpack_images`: an OCI image (registry, `oci-layout:` or `docker-archive:` reference) is
//! fetched through kairos-oci and its layers extracted one over another into a directory
//! of the target root, whiteouts applied — yip's "pull and extract into target".

use kairos_config::types::UnpackImage;
use kairos_oci::ImageRef;
use kairos_oci::image::Platform;
use kairos_oci::layer::{Whiteouts, unpack_into};

use crate::executor::Ctx;

/// Space left free on the filesystems an image is downloaded to and unpacked into.
const MARGIN: u64 = 16 << 20;

/// Work space for the download, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn unpack(ctx: &Ctx, u: &UnpackImage) -> Result<(), String> {
    let source = ctx.render(&u.source);
    let target = ctx.render(&u.target);
    if source.is_empty() {
        return Err("`source` is empty: name an image (registry/repo:tag)".into());
    }
    if !target.starts_with('/') {
        return Err(format!(
            "{source}: target {target:?} must be an absolute path in the system"
        ));
    }
    let r = ImageRef::parse(&source).map_err(|e| format!("{source}: {e}"))?;
    if matches!(r, ImageRef::Dir { .. }) {
        return Err(format!(
            "{source}: a dir: source is a tree, not an image; copy it with a `commands` step"
        ));
    }
    let platform = match u.platform.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => Platform::parse(p).map_err(|e| format!("{source}: {e}"))?,
        None => Platform::native(),
    };
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "kairos-unpack-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )));
    std::fs::create_dir_all(&scratch.0).map_err(|e| format!("{}: {e}", scratch.0.display()))?;
    let img = match &r {
        ImageRef::Registry {
            registry,
            repository,
            reference,
        } => {
            let mut reg = kairos_oci::registry::Registry::new(registry, repository);
            reg.set_platform(platform);
            // The image's layers (as the manifest states their sizes) must fit where they
            // are downloaded, before any is fetched.
            let room = |bytes: u64| {
                let free = kairos_sys::fs::free_bytes(&scratch.0).unwrap_or(u64::MAX);
                if bytes.saturating_add(MARGIN) > free {
                    return Err(kairos_oci::Error::NoSpace(format!(
                        "the image's layers need {} MiB in {}, which has {} MiB free; set TMPDIR to a bigger filesystem",
                        bytes.saturating_add(MARGIN) >> 20,
                        scratch.0.display(),
                        free >> 20
                    )));
                }
                Ok(())
            };
            let blobs = scratch.0.join("blobs");
            reg.pull_some(reference, &blobs, &|_| true, &room, &mut |_, _, _| {})
        }
        other => kairos_oci::fetch(other, &scratch.0, &mut |_, _, _| {}),
    }
    .map_err(|e| format!("{source}: {e}"))?;
    let created = ctx
        .root
        .create_dir_all(&target, 0o755)
        .map_err(|e| format!("creating {target}: {e}"))?;
    let r = extract(ctx, &img, &source, &target);
    if r.is_err()
        && let Some(top) = created.first()
    {
        // A target this step made is not left half-filled.
        let _ = ctx.root.dir().and_then(|d| d.remove_all(top));
    }
    r
}

fn extract(
    ctx: &Ctx,
    img: &kairos_oci::LocalImage,
    source: &str,
    target: &str,
) -> Result<(), String> {
    let dir = ctx
        .root
        .open_dir(target)
        .map_err(|e| format!("opening {target}: {e}"))?;
    let diff_ids = img.diff_ids().map_err(|e| format!("{source}: {e}"))?;
    for (layer, want) in img.manifest.layers.iter().zip(&diff_ids) {
        let blob = img.blob_path(&layer.digest);
        // What a layer may write: the target filesystem's free space (a compression bomb
        // stops there instead of filling the node).
        let room = dir
            .free_bytes()
            .map_err(|e| format!("{target}: {e}"))?
            .saturating_sub(MARGIN);
        let got = unpack_into(&blob, &dir, room, Whiteouts::Apply)
            .map_err(|e| format!("{source} into {target}: {e}"))?;
        if got != want.as_str() {
            return Err(format!(
                "{source}: layer {} unpacks to {got}, but the image says {want}; the target may hold part of it",
                layer.digest
            ));
        }
    }
    Ok(())
}
