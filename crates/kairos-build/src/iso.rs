//! A hybrid UEFI install ISO (volume `COS_LIVE`): an El Torito EFI image with systemd-boot, the
//! kernel, the initrd and a `live` entry; and, as plain files, the layer store and deployment
//! the live system boots from and the installer copies — no network needed to install.
//!
//! Trusted (`--trusted --keys DIR`): systemd-boot signed with the db key and the deployment's
//! signed UKI (`kairos/<id>.efi`, its cmdline pinning every layer) boot the live system under
//! Secure Boot; both are also on the ISO as plain files, with `loader/keys/auto/*.auth`, for
//! the installer to put on the new disk (the same UKI boots it in every role).

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use kairos_lifecycle::entries::Role;

use crate::os::{Os, OsSpec};

/// The external tools `build iso` runs.
pub const TOOLS: &[&str] = &["mkfs.vfat", "mcopy", "mkfs.erofs", "xorriso"];

pub struct IsoSpec<'a> {
    pub os: OsSpec<'a>,
    /// Embedded as `/cloud-config.yaml`: the live system and the installer read it.
    pub cloud_config: Option<&'a Path>,
    pub output: &'a Path,
    /// Trusted boot: sign with these keys.
    pub trust: Option<crate::os::Trust>,
}

/// Builds the ISO; on any error nothing is left at `spec.output`.
pub fn build_iso(spec: &IsoSpec) -> Result<Os> {
    crate::disk::check_tools(TOOLS)?;
    if let Some(cc) = spec.cloud_config {
        let text = fs::read_to_string(cc).with_context(|| format!("reading {}", cc.display()))?;
        if !kairos_config::collect::has_header(&text) {
            bail!(
                "{}: a cloud-config must start with #cloud-config (the live system would ignore it)",
                cc.display()
            );
        }
    }
    let work = crate::WorkDir::beside(spec.output, "kairos-iso")?;
    let work = work.path();
    let tree = work.join("iso");
    let mut os = crate::os::build_store(&spec.os, &tree, work)?;
    let esp = work.join("esp");
    match &spec.trust {
        Some(t) => {
            // The installer reads from the deployment that it boots a UKI.
            os.dep.uki = Some(crate::os::esp_uki_path(&os.dep.id));
            kairos_layers::Store::new(&tree).write_deployment(&os.dep)?;
            crate::os::esp_tree_trusted(&esp, &os, &[Role::Live], t)?;
        }
        None => crate::os::esp_tree(&esp, &os, &[Role::Live])?,
    }
    // Also on the ISO as plain files: the installer puts systemd-boot (and on a trusted ISO
    // the UKI and the enrollment files) on the new ESP.
    let mut plain = vec![std::path::PathBuf::from("EFI/BOOT/BOOTX64.EFI")];
    if let Some(uki) = &os.dep.uki {
        plain.push(uki.trim_start_matches('/').into());
        for kind in crate::uki::KINDS {
            let auth = std::path::PathBuf::from(format!("loader/keys/auto/{kind}.auth"));
            if esp.join(&auth).is_file() {
                plain.push(auth);
            }
        }
    }
    for rel in plain {
        let dest = tree.join(&rel);
        fs::create_dir_all(dest.parent().unwrap_or(&tree))?;
        fs::copy(esp.join(&rel), &dest)
            .with_context(|| format!("copying {} onto the ISO", rel.display()))?;
    }
    let efi_mib = crate::disk::dir_size(&esp).div_ceil(1 << 20) + 4;
    fs::create_dir_all(tree.join("boot"))?;
    crate::disk::fat_image(&esp, &tree.join("boot/efi.img"), efi_mib, None)?;
    if let Some(cc) = spec.cloud_config {
        fs::copy(cc, tree.join("cloud-config.yaml"))?;
    }
    let tmp = work.join("out.iso");
    kairos_sys::exec::Cmd::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-r", "-J", "-joliet-long"])
        .args(["-iso-level", "3", "-V", "COS_LIVE"])
        .args([
            "-e",
            "boot/efi.img",
            "-no-emul-boot",
            "-isohybrid-gpt-basdat",
        ])
        .arg("-o")
        .arg(&tmp)
        .arg(&tree)
        .run()?;
    fs::rename(&tmp, spec.output)
        .with_context(|| format!("moving the ISO to {}", spec.output.display()))?;
    Ok(os)
}
