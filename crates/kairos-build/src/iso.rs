//! A hybrid UEFI install ISO (volume `COS_LIVE`): an El Torito EFI image with systemd-boot, the
//! kernel, the initrd and a `live` entry; and, as plain files, the layer store and deployment
//! the live system boots from and the installer copies — no network needed to install.

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
    let os = crate::os::build_store(&spec.os, &tree, work)?;
    let esp = work.join("esp");
    crate::os::esp_tree(&esp, &os, &[Role::Live])?;
    // Also on the ISO as plain files: the installer puts systemd-boot on the new ESP.
    fs::create_dir_all(tree.join("EFI/BOOT"))?;
    fs::copy(
        esp.join("EFI/BOOT/BOOTX64.EFI"),
        tree.join("EFI/BOOT/BOOTX64.EFI"),
    )?;
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
