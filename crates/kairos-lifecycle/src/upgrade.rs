//! Upgrades: fetch only the layers the store lacks (each verified), turn them into layer
//! images, write the deployment and put its kernel and initrd on the ESP — none of which
//! changes what boots — then, as the one step that does, make it the next boot with tries.
//!
//! Every step is idempotent and files appear by rename, so after a power cut at any point the
//! node boots its old deployment (or the new one, after the switch) and a rerun completes.

use std::fs;
use std::path::Path;

use kairos_layers::{Blob, Deployment, Digest, Layer, Store};
use kairos_oci::ImageRef;
use serde::Serialize;

use crate::entries::{self, Role, Target};
use crate::history::{self, Record, Staged};
use crate::{Error, Node, esp_boot_path, io_err};

/// Progress of an upgrade, for bars and `--json`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    Resolved {
        image: String,
        manifest_digest: String,
        layers: usize,
        missing: usize,
    },
    Download {
        digest: String,
        done: u64,
        total: u64,
    },
    LayerReady {
        diff_id: String,
        reused: bool,
        bytes: u64,
    },
    Staged {
        deployment: String,
    },
    Activated {
        deployment: String,
        role: Role,
        tries: Option<u32>,
    },
}

/// Writes the deployment of image `source` into the store (and its kernel and initrd on the
/// ESP) without changing what boots. Returns it; layers already in the store are neither
/// downloaded nor written again.
pub fn stage(
    node: &Node,
    source: &str,
    cmdline: &str,
    events: &mut dyn FnMut(Event),
) -> Result<Deployment, Error> {
    let r = ImageRef::parse(source).map_err(|e| Error::Node(format!("--source {source}: {e}")))?;
    if matches!(r, ImageRef::Dir { .. }) {
        return Err(Error::Node(format!(
            "--source {source}: upgrades take an image (oci:, oci-layout:, ocifile:); make one from the tree with `kairosctl image import` and `kairosctl kairosify`"
        )));
    }
    let store = Store::new(&node.store);
    let cache = node.scratch.join("oci");
    fs::create_dir_all(&cache).map_err(io_err(&cache))?;
    let have = |diff_id: &Digest| store.layer_path(diff_id).is_file();
    let wanted = |d: &str| Digest::parse(d).is_ok_and(|d| !have(&d));
    let room = |bytes: u64| check_room(node, bytes).map_err(kairos_oci::Error::NoSpace);
    let img = kairos_oci::fetch_wanted(&r, &cache, &wanted, &room, &mut |digest, done, total| {
        events(Event::Download {
            digest: digest.to_string(),
            done,
            total,
        })
    })?;
    let diff_ids = img.diff_ids()?;
    if diff_ids.len() != img.manifest.layers.len() {
        return Err(Error::Node(format!(
            "{source}: the image config lists {} diff_ids for {} layers",
            diff_ids.len(),
            img.manifest.layers.len()
        )));
    }
    let known = known_layers(&store);
    events(Event::Resolved {
        image: source.to_string(),
        manifest_digest: img.manifest_digest.to_string(),
        layers: diff_ids.len(),
        missing: diff_ids.iter().filter(|d| !have(d)).count(),
    });
    let argv = kairos_layers::mkfs_erofs_argv(&node.tools_root);
    let mut layers = Vec::new();
    for (desc, diff_id) in img.manifest.layers.iter().zip(&diff_ids) {
        let layer = if have(diff_id) {
            let l = match known.iter().find(|l| &l.digest == diff_id) {
                Some(l) => l.clone(),
                None => store.layer(diff_id)?,
            };
            events(Event::LayerReady {
                diff_id: diff_id.to_string(),
                reused: true,
                bytes: l.image.size,
            });
            l
        } else {
            let blob = img.blob_path(&desc.digest);
            crate::failpoint("downloaded");
            let l = import_layer(&store, &blob, diff_id, &node.scratch, &argv)?;
            // The compressed blob is not needed once its image exists; it is removed only
            // from our own download cache, never from the source (an OCI layout is the
            // user's directory).
            if img.blobs.starts_with(&cache) {
                let _ = fs::remove_file(&blob);
            }
            events(Event::LayerReady {
                diff_id: diff_id.to_string(),
                reused: false,
                bytes: l.image.size,
            });
            l
        };
        layers.push(layer);
    }
    let boot = crate::mounts::probe_boot_files(&store, &layers, &node.scratch)?;
    let kernel = put_boot_file(&store, node, "vmlinuz", &boot.kernel)?;
    let initrd = put_boot_file(&store, node, "initrd", &boot.initrd)?;
    let _ = fs::remove_dir_all(&boot.dir);
    let id = crate::deployment_id(&img.manifest_digest);
    let dep = Deployment {
        id: id.clone(),
        image: source.to_string(),
        manifest_digest: img.manifest_digest.to_string(),
        version: boot.version,
        created: kairos_sys::time::now_rfc3339(),
        layers,
        kernel: Some(kernel),
        initrd: Some(initrd),
        cmdline: cmdline.to_string(),
        uki: None,
    };
    crate::failpoint("before-manifest");
    // An existing manifest for the same image is kept as is (its creation time included).
    if store.read_deployment(&id).is_err() {
        store.write_deployment(&dep)?;
    }
    crate::failpoint("manifest-written");
    history::append(&node.store, &Record::new("staged", &id, source, ""))?;
    events(Event::Staged {
        deployment: id.clone(),
    });
    Ok(store.read_deployment(&id)?)
}

/// Layers described by the store's deployments (saves hashing a reused layer image again).
fn known_layers(store: &Store) -> Vec<Layer> {
    deployments(store)
        .into_iter()
        .flat_map(|d| d.layers)
        .collect()
}

/// Every deployment manifest in a store.
pub fn deployments(store: &Store) -> Vec<Deployment> {
    let mut ids: Vec<String> = fs::read_dir(store.root.join("deployments"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .collect();
    ids.sort();
    ids.iter()
        .filter_map(|id| store.read_deployment(id).ok())
        .collect()
}

/// Space kept free on scratch and store beyond what an upgrade is known to need.
pub const SPACE_RESERVE: u64 = 16 << 20;

fn mib(b: u64) -> u64 {
    b.div_ceil(1 << 20)
}

/// Before any layer is downloaded: `bytes` (the missing layers, compressed) must fit on the
/// scratch space (downloads) and on the store (each layer image is about that big at least).
pub fn check_room(node: &Node, bytes: u64) -> Result<(), String> {
    let need = bytes + SPACE_RESERVE;
    for (what, path) in [
        ("the scratch space", &node.scratch),
        ("the layer store", &node.store),
    ] {
        let free =
            kairos_sys::fs::free_bytes(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if free < need {
            return Err(format!(
                "the upgrade needs {} MiB on {what} ({}), which has {} MiB free: free some space{}",
                mib(need),
                path.display(),
                mib(free),
                if what == "the scratch space" {
                    " or pass --scratch DIR on a bigger disk"
                } else {
                    " (`kairos-agent upgrade` removes old layers once a deployment is blessed)"
                }
            ));
        }
    }
    Ok(())
}

/// Unpacks a layer blob (checking it against `diff_id`), makes its image and moves it into
/// the store under its final name only when complete. Unpacking stops at the free space of
/// the scratch filesystem (less a reserve): a compression bomb fails, it does not fill it.
pub fn import_layer(
    store: &Store,
    blob: &Path,
    diff_id: &Digest,
    scratch: &Path,
    mkfs: &[String],
) -> Result<Layer, Error> {
    // A validated digest: `tree-<64 hex>` names nothing but a child of the scratch dir.
    let hex = diff_id.hex();
    let tree = scratch.join(format!("tree-{hex}"));
    let _ = fs::remove_dir_all(&tree);
    let limit = kairos_sys::fs::free_bytes(scratch)
        .map_err(io_err(scratch))?
        .saturating_sub(SPACE_RESERVE);
    let got = match kairos_oci::layer::unpack_limited(blob, &tree, limit) {
        Ok(got) => got,
        Err(e) => {
            let _ = fs::remove_dir_all(&tree);
            return Err(e.into());
        }
    };
    if *diff_id != got {
        let _ = fs::remove_dir_all(&tree);
        return Err(kairos_oci::Error::Digest {
            digest: diff_id.to_string(),
            found: got,
        }
        .into());
    }
    let file = kairos_layers::layer_file(diff_id);
    let dest = store.root.join(&file);
    let dir = dest.parent().unwrap_or(&store.root).to_path_buf();
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let tmp = dir.join(format!(".{hex}.tmp"));
    let made = kairos_layers::make_erofs(mkfs, &tree, &tmp, diff_id.as_str());
    let _ = fs::remove_dir_all(&tree);
    let verity = match made {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    crate::failpoint("layer-image-written");
    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    entries::sync_dir(&dir);
    Ok(Layer {
        digest: diff_id.clone(),
        image: store.blob(&file)?,
        verity: Some(verity),
    })
}

/// Copies a kernel or initrd into the store (`boot/sha256-<hex>`) and onto the ESP, each
/// only if that content is not there yet.
fn put_boot_file(store: &Store, node: &Node, kind: &str, src: &Path) -> Result<Blob, Error> {
    let hex = kairos_layers::sha256_file(src)?;
    let rel = format!("boot/sha256-{hex}");
    copy_if_missing(src, &store.root.join(&rel))?;
    let on_esp = node
        .esp
        .join(esp_boot_path(kind, &hex).trim_start_matches('/'));
    copy_if_missing(src, &on_esp)?;
    Ok(store.blob(&rel)?)
}

/// Copies by temp file and rename, so a cut never leaves a short file under the final name.
pub fn copy_if_missing(src: &Path, dest: &Path) -> Result<(), Error> {
    let size = fs::metadata(src).map_err(io_err(src))?.len();
    if fs::metadata(dest).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let dir = dest.parent().unwrap_or(Path::new("/")).to_path_buf();
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    fs::copy(src, &tmp).map_err(io_err(&tmp))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, dest).map_err(io_err(dest))?;
    entries::sync_dir(&dir);
    Ok(())
}

/// The entry text that boots `dep` in `role`.
pub fn entry_for(role: Role, dep: &Deployment) -> Result<String, Error> {
    if dep.uki.is_some() {
        // Trusted boot: the entry names the signed UKI; its cmdline is inside it.
        return Ok(entries::render_uki(role, &dep.id, &dep.version));
    }
    let (Some(k), Some(i)) = (&dep.kernel, &dep.initrd) else {
        return Err(Error::Node(format!(
            "deployment {} has no kernel or initrd",
            dep.id
        )));
    };
    let linux = esp_boot_path("vmlinuz", &k.sha256);
    let initrd = esp_boot_path("initrd", &i.sha256);
    Ok(entries::render(
        role,
        &Target {
            deployment: &dep.id,
            version: &dep.version,
            linux: &linux,
            initrd: &initrd,
            cmdline: &dep.cmdline,
        },
    ))
}

/// Makes `dep` the next boot: for `Active`, the deployment now active (or `keep`, the one
/// running) becomes passive and `dep` gets `tries` boot attempts; for `Recovery` the
/// recovery entry is replaced.
pub fn activate(
    node: &Node,
    dep: &Deployment,
    role: Role,
    keep: Option<&str>,
    tries: Option<u32>,
    events: &mut dyn FnMut(Event),
) -> Result<(), Error> {
    let store = Store::new(&node.store);
    let current = entries::list(&node.esp)?;
    if role == Role::Active {
        // An entry without a deployment (a file damaged by a cut) is ignored, then replaced.
        let active = current
            .iter()
            .find(|e| e.role == Role::Active && !e.deployment.is_empty());
        if active.is_some_and(|e| e.deployment == dep.id && !e.is_bad()) {
            history::clear_staged(&node.store)?;
            return Ok(());
        }
        // What to fall back to: the running deployment, else the active one if it is good,
        // else the passive one as it is.
        let fallback = keep
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .or_else(|| active.filter(|e| !e.is_bad()).map(|e| e.deployment.clone()));
        if let Some(f) = fallback.filter(|f| f != &dep.id) {
            let fdep = store.read_deployment(&f)?;
            entries::set(
                &node.esp,
                Role::Passive,
                &entry_for(Role::Passive, &fdep)?,
                None,
            )?;
        }
        crate::failpoint("passive-entry-written");
    }
    entries::set(&node.esp, role, &entry_for(role, dep)?, tries)?;
    if role == Role::Recovery && current.iter().any(|e| e.role == Role::Autoreset) {
        // The reset entry boots the recovery deployment too.
        entries::set(
            &node.esp,
            Role::Autoreset,
            &entry_for(Role::Autoreset, dep)?,
            None,
        )?;
    }
    crate::failpoint("active-entry-written");
    history::clear_staged(&node.store)?;
    history::append(
        &node.store,
        &Record::new(
            if role == Role::Recovery {
                "recovery-upgraded"
            } else {
                "activated"
            },
            &dep.id,
            &dep.image,
            &tries.map(|t| format!("{t} tries")).unwrap_or_default(),
        ),
    )?;
    events(Event::Activated {
        deployment: dep.id.clone(),
        role,
        tries,
    });
    Ok(())
}

/// Remembers a deployment for `upgrade --apply`.
pub fn mark_staged(node: &Node, dep: &Deployment) -> Result<(), Error> {
    history::set_staged(
        &node.store,
        &Staged {
            deployment: dep.id.clone(),
            image: dep.image.clone(),
            time: kairos_sys::time::now_rfc3339(),
        },
    )
}

/// Swaps active and passive: the passive deployment boots next (blessed: it booted before),
/// the active one becomes the fallback.
pub fn rollback(node: &Node) -> Result<(String, String), Error> {
    let store = Store::new(&node.store);
    let e = entries::list(&node.esp)?;
    let passive = e
        .iter()
        .find(|e| e.role == Role::Passive)
        .ok_or_else(|| Error::Node("no passive deployment to roll back to".into()))?;
    let pdep = store.read_deployment(&passive.deployment)?;
    let active = e.iter().find(|e| e.role == Role::Active);
    let adep = match active {
        Some(a) => Some(store.read_deployment(&a.deployment)?),
        None => None,
    };
    entries::set(
        &node.esp,
        Role::Active,
        &entry_for(Role::Active, &pdep)?,
        None,
    )?;
    match &adep {
        Some(a) if a.id != pdep.id => entries::set(
            &node.esp,
            Role::Passive,
            &entry_for(Role::Passive, a)?,
            None,
        )?,
        _ => entries::clear(&node.esp, Role::Passive)?,
    }
    let from = adep.map(|a| a.id).unwrap_or_default();
    history::append(
        &node.store,
        &Record::new("rollback", &pdep.id, &pdep.image, &format!("from {from}")),
    )?;
    Ok((from, pdep.id))
}
