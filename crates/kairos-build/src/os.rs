//! One OS version laid out for a medium: the layer store (EROFS images named by digest,
//! kernel and initrd by content, the deployment manifest) and the ESP tree that boots it —
//! shared by raw disks and ISOs.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kairos_layers::{Blob, Deployment, Layer, Store};
use kairos_lifecycle::entries::Role;
pub use kairos_lifecycle::{esp_uki_path, trusted_cmdline};

/// The image an artifact is built from.
pub struct OsSpec<'a> {
    /// The image's layers as trees in overlay format, base first. The base has the kernel.
    pub layers: Vec<PathBuf>,
    /// The merged view of the layers (or the base tree), where the kernel, its modules and a
    /// kairosified `/boot/initrd` are looked up.
    pub boot_tree: PathBuf,
    /// Digest of the OCI manifest the layers came from (`None` for `dir:` trees).
    pub manifest_digest: Option<String>,
    /// diff_ids of the layers, in order (`None` for `dir:` trees: layers are then named by
    /// the digest of their filesystem image).
    pub diff_ids: Option<Vec<kairos_layers::Digest>>,
    pub image_ref: String,
    pub immucore: &'a Path,
    /// Extra kernel cmdline for every entry (e.g. `console=ttyS0`).
    pub cmdline: String,
}

/// A store written for one deployment.
pub struct Os {
    pub dep: Deployment,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub layer_bytes: u64,
}

/// Writes the layer store for `spec` into `store_dir`; `work` holds temporary files.
pub fn build_store(spec: &OsSpec, store_dir: &Path, work: &Path) -> Result<Os> {
    let base = &spec.boot_tree;
    if spec.layers.is_empty() {
        anyhow::bail!("an image needs at least one layer");
    }
    let kernel = crate::initrd::find_kernel(base)?;
    // Not `vmlinuz`: the netboot builder puts its own output of that name in the same dir.
    let kernel_path = work.join("kernel-of-image");
    kernel.copy_vmlinuz(&kernel_path)?;
    let initrd_path = work.join("initrd");
    // Files of the image tree are read beneath it: a symlink in the image cannot pull a
    // build-host file onto the disk.
    let tree = kairos_sys::beneath::Dir::open(base)
        .with_context(|| format!("opening {}", base.display()))?;
    // A kairosified image carries its initrd; otherwise make one from its modules.
    match ["boot/initrd", "boot/kairos-initrd"]
        .iter()
        .map(Path::new)
        .find(|p| {
            tree.metadata(p)
                .is_ok_and(|m| m.kind == kairos_sys::beneath::Kind::File)
        }) {
        Some(p) => {
            tree.copy_out(p, &initrd_path)
                .with_context(|| format!("copying /{}", p.display()))?;
        }
        None => {
            crate::initrd::build(base, spec.immucore, &initrd_path)?;
        }
    }

    fs::create_dir_all(store_dir.join("layers"))?;
    let store = Store::new(store_dir);
    let mut layers = Vec::new();
    for (i, tree) in spec.layers.iter().enumerate() {
        let tmp = work.join(format!("layer{i}.erofs"));
        // Seeded by the diff_id, as a node importing the layer does (`dir:` trees have none).
        let seed = match &spec.diff_ids {
            Some(ids) => ids
                .get(i)
                .map(|d| d.to_string())
                .context("fewer diff_ids than layers")?,
            None => format!("dir-layer-{i}"),
        };
        let verity = crate::disk::erofs(tree, &tmp, &seed)?;
        // Hash the image once: it is both the blob checksum and, for `dir:` trees, the name.
        let hex = kairos_layers::sha256_file(&tmp)?;
        let digest = match &spec.diff_ids {
            Some(ids) => ids.get(i).cloned().context("fewer diff_ids than layers")?,
            None => kairos_layers::Digest::from_sha256_hex(&hex)?,
        };
        let file = kairos_layers::layer_file(&digest);
        fs::rename(&tmp, store_dir.join(&file))?;
        let size = fs::metadata(store_dir.join(&file))?.len();
        layers.push(Layer {
            digest,
            image: Blob {
                file,
                size,
                sha256: hex,
            },
            verity: Some(verity),
        });
    }
    let layer_bytes: u64 = layers.iter().map(|l| l.image.size).sum();
    // Without an OCI manifest, the image is identified by its ordered layer digests.
    let image_hex = kairos_layers::sha256_hex(
        layers
            .iter()
            .map(|l| l.digest.as_str())
            .collect::<Vec<_>>()
            .join("\n")
            .as_bytes(),
    );
    let digest = spec
        .manifest_digest
        .clone()
        .unwrap_or_else(|| format!("sha256:{image_hex}"));
    let id = kairos_lifecycle::deployment_id(&digest);
    // Kernel and initrd are stored by content, on the store and on the ESP, as upgrades do.
    let boot_blob = |src: &Path| -> Result<Blob> {
        let hex = kairos_layers::sha256_file(src)?;
        let rel = format!("boot/sha256-{hex}");
        fs::create_dir_all(store_dir.join("boot"))?;
        fs::copy(src, store_dir.join(&rel))
            .with_context(|| format!("copying {}", src.display()))?;
        Ok(store.blob(&rel)?)
    };
    let dep = Deployment {
        id,
        image: spec.image_ref.clone(),
        manifest_digest: digest,
        version: tree
            .read_to_string(Path::new("etc/os-release"))
            .ok()
            .and_then(|t| {
                kairos_sys::sysinfo::parse_key_values(&t)
                    .get("VERSION_ID")
                    .cloned()
            })
            .unwrap_or_default(),
        created: kairos_sys::time::now_rfc3339(),
        layers,
        kernel: Some(boot_blob(&kernel_path)?),
        initrd: Some(boot_blob(&initrd_path)?),
        cmdline: spec.cmdline.clone(),
        uki: None,
    };
    store.write_deployment(&dep)?;
    Ok(Os {
        dep,
        kernel: kernel_path,
        initrd: initrd_path,
        layer_bytes,
    })
}

/// Lays out an ESP tree in `dir`: systemd-boot as the removable-media loader, the kernel and
/// initrd by content, and an entry per role (their order comes from their sort-keys).
pub fn esp_tree(dir: &Path, os: &Os, roles: &[Role]) -> Result<()> {
    fs::create_dir_all(dir.join("EFI/BOOT"))?;
    fs::copy(crate::disk::SYSTEMD_BOOT, dir.join("EFI/BOOT/BOOTX64.EFI"))
        .with_context(|| format!("copying {}", crate::disk::SYSTEMD_BOOT))?;
    let blobs = [
        ("vmlinuz", &os.kernel, &os.dep.kernel),
        ("initrd", &os.initrd, &os.dep.initrd),
    ];
    for (kind, src, blob) in blobs {
        let blob = blob
            .as_ref()
            .context("deployment without kernel or initrd")?;
        let rel = kairos_lifecycle::esp_boot_path(kind, &blob.sha256);
        let dest = dir.join(rel.trim_start_matches('/'));
        fs::create_dir_all(dest.parent().unwrap_or(dir))?;
        fs::copy(src, &dest).with_context(|| format!("copying {}", src.display()))?;
    }
    fs::create_dir_all(dir.join("loader/entries"))?;
    fs::write(
        dir.join("loader/loader.conf"),
        "timeout 3\nconsole-mode keep\neditor no\n",
    )?;
    for role in roles {
        kairos_lifecycle::entries::set(
            dir,
            *role,
            &kairos_lifecycle::upgrade::entry_for(*role, &os.dep)?,
            None,
        )?;
    }
    Ok(())
}

/// What trusted boot signs with.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The key directory (`kairosctl keys generate`).
    pub keys: PathBuf,
    /// systemd-stub.
    pub stub: PathBuf,
}

/// `.osrel` of a deployment's UKI: what the boot menu and `bootctl` show.
pub fn uki_osrel(dep: &Deployment) -> String {
    let version = if dep.version.is_empty() {
        dep.id.as_str()
    } else {
        dep.version.as_str()
    };
    format!(
        "NAME=\"Kairos\"\nID=kairos\nVERSION_ID=\"{version}\"\nPRETTY_NAME=\"Kairos {version} ({})\"\n",
        dep.id
    )
}

/// The ESP tree of a trusted-boot medium: systemd-boot signed with the db key, the
/// deployment's signed UKI (kernel, initrd and the cmdline that pins its layers) and an entry
/// per role that boots it. Returns the UKI's report (PCR 11 per phase).
pub fn esp_tree_trusted(
    dir: &Path,
    os: &Os,
    roles: &[Role],
    trust: &Trust,
) -> Result<crate::uki::UkiReport> {
    fs::create_dir_all(dir.join("EFI/BOOT"))?;
    let sdboot = fs::read(crate::disk::SYSTEMD_BOOT)
        .with_context(|| format!("reading {}", crate::disk::SYSTEMD_BOOT))?;
    crate::uki::sign(
        &trust.keys,
        &sdboot,
        &dir.join("EFI/BOOT/BOOTX64.EFI"),
        "systemd-boot",
    )?;
    let uki_rel = kairos_lifecycle::esp_uki_path(&os.dep.id);
    let uki_path = dir.join(uki_rel.trim_start_matches('/'));
    fs::create_dir_all(uki_path.parent().unwrap_or(dir))?;
    let report = crate::uki::build_uki(
        &crate::uki::UkiInput {
            kernel: os.kernel.clone(),
            initrd: os.initrd.clone(),
            cmdline: kairos_lifecycle::trusted_cmdline(&os.dep),
            osrel: uki_osrel(&os.dep),
            keys: trust.keys.clone(),
            stub: trust.stub.clone(),
        },
        &uki_path,
    )?;
    fs::create_dir_all(dir.join("loader/entries"))?;
    fs::write(
        dir.join("loader/loader.conf"),
        "timeout 3\nconsole-mode keep\neditor no\n",
    )?;
    // Auto-enrollment: firmware in setup mode, or systemd-boot 253+, enrolls these.
    let auto = dir.join("loader/keys/auto");
    for kind in crate::uki::KINDS {
        let from = trust.keys.join(format!("{kind}.auth"));
        if from.is_file() {
            fs::create_dir_all(&auto)?;
            fs::copy(&from, auto.join(format!("{kind}.auth")))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    for role in roles {
        kairos_lifecycle::entries::set(
            dir,
            *role,
            &kairos_lifecycle::entries::render_uki(*role, &os.dep.id, &os.dep.version),
            None,
        )?;
    }
    Ok(report)
}
