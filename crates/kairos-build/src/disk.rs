//! An already-installed raw disk: GPT with Kairos' labels, an ESP with systemd-boot and an
//! entry per deployment, STATE and RECOVERY each with a layer store, OEM with the user's
//! cloud-config, and a PERSISTENT partition.
//!
//! Filesystems are made as image files (`mkfs.ext4 -d`, `mkfs.vfat` + `mcopy`) and copied into
//! the disk at their offsets, so no loop device or root is needed. The disk appears at its
//! final path only when complete.

use kairos_sys::exec::Cmd;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kairos_layers::Deployment;
use kairos_lifecycle::entries::Role;

const MIB: u64 = 1 << 20;

/// The external tools `build raw` runs (their Debian packages: [`kairos_sys::exec::TOOLS`]).
pub const TOOLS: &[&str] = &["sfdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "mkfs.erofs"];

pub const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// Checked at a command's start: fails with the packages to install when a tool is missing.
pub fn check_tools(tools: &[&str]) -> Result<()> {
    kairos_sys::exec::require(tools)?;
    if !Path::new(SYSTEMD_BOOT).exists() {
        bail!("missing {SYSTEMD_BOOT}; install it with apt-get install systemd-boot-efi");
    }
    Ok(())
}

fn run(cmd: Cmd) -> Result<()> {
    cmd.run()?;
    Ok(())
}

pub use kairos_lifecycle::layout::{Part, plan};

/// The sfdisk script for a plan.
pub fn sfdisk_script(parts: &[Part]) -> String {
    let mut s = String::from("label: gpt\nunit: sectors\nsector-size: 512\n\n");
    for p in parts {
        s.push_str(&format!(
            "start={}, size={}, type={}, name=\"{}\"\n",
            p.start_mib * 2048,
            p.size_mib * 2048,
            p.type_guid,
            p.name
        ));
    }
    s
}

/// Inputs of a raw disk build.
pub struct RawSpec<'a> {
    pub os: crate::os::OsSpec<'a>,
    pub cloud_config: Option<&'a Path>,
    /// Total disk size in MiB; `None` = just large enough (persistent grows on first boot).
    pub size_mib: Option<u64>,
    pub output: &'a Path,
    /// Trusted boot: the ESP gets signed systemd-boot and a signed UKI per deployment.
    pub trust: Option<crate::os::Trust>,
}

/// What was built, for the report and the tests.
#[derive(Debug, Clone)]
pub struct RawReport {
    pub parts: Vec<Part>,
    pub disk_bytes: u64,
    pub layer_bytes: u64,
    /// The UKI's report (size, PCR 11 per phase) on a trusted build.
    pub uki: Option<crate::uki::UkiReport>,
    pub deployment: Deployment,
}

fn mkfs_ext4(img: &Path, label: &str, size_mib: u64, content: Option<&Path>) -> Result<()> {
    let f = fs::File::create(img).with_context(|| format!("creating {}", img.display()))?;
    f.set_len(size_mib * MIB)?;
    let mut cmd = Cmd::new("mkfs.ext4").args(["-q", "-F", "-L", label, "-E", "root_owner=0:0"]);
    if let Some(d) = content {
        cmd = cmd.arg("-d").arg(d);
    }
    run(cmd.arg(img))
}

/// Builds the layer image of a root tree (with its verity tree).
pub fn erofs(rootfs: &Path, out: &Path, seed: &str) -> Result<kairos_layers::verity::Verity> {
    Ok(kairos_layers::make_erofs(
        &kairos_layers::mkfs_erofs_argv(Path::new("/")),
        rootfs,
        out,
        seed,
    )?)
}

fn copy_into(disk: &mut fs::File, img: &Path, offset: u64) -> Result<()> {
    let mut src = fs::File::open(img).with_context(|| format!("opening {}", img.display()))?;
    disk.seek(SeekFrom::Start(offset))?;
    // Zero blocks are skipped so the disk file stays sparse.
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut pos = offset;
    loop {
        let n = std::io::Read::read(&mut src, &mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            pos += n as u64;
            disk.seek(SeekFrom::Start(pos))?;
        } else {
            disk.write_all(&buf[..n])?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Builds the disk; on any error nothing is left at `spec.output`.
pub fn build_raw(spec: &RawSpec) -> Result<RawReport> {
    check_tools(TOOLS)?;
    let work = crate::WorkDir::beside(spec.output, "kairos-build")?;
    // The disk is assembled inside the work dir and renamed into place only when complete;
    // dropping `work` removes everything else, on success and on error.
    build_in(spec, work.path())
}

fn build_in(spec: &RawSpec, work: &Path) -> Result<RawReport> {
    let state_dir = work.join("state");
    // Before anything is written: the image's trees alone must fit (the store holds them,
    // about as large); the full need is checked once the store's real size is known.
    let trees: u64 = spec.os.layers.iter().map(|l| dir_size(l)).sum();
    ensure_free(work, trees + (16 << 20))?;
    let free_before = kairos_sys::fs::free_bytes(work).unwrap_or(0);
    let mut os = crate::os::build_store(&spec.os, &state_dir, work).map_err(|e| {
        let full = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
        });
        if full {
            anyhow::anyhow!(
                "the OS store alone did not fit in {}, which had {} MiB free: free some space or write the output elsewhere ({e:#})",
                work.parent().unwrap_or(work).display(),
                free_before / MIB
            )
        } else {
            e
        }
    })?;
    let boot_bytes = [&os.kernel, &os.initrd]
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum::<u64>();
    check_room(work, boot_bytes + MIB, dir_size(&state_dir))?;
    if spec.trust.is_some() {
        // Its entries boot the signed UKI (written with the ESP below).
        os.dep.uki = Some(crate::os::esp_uki_path(&os.dep.id));
        kairos_layers::Store::new(&state_dir).write_deployment(&os.dep)?;
    }
    // RECOVERY: the same content, its own store (independent of STATE).
    let rec_dir = work.join("recovery");
    copy_dir(&state_dir, &rec_dir)?;
    kairos_lifecycle::history::append(
        &state_dir,
        &kairos_lifecycle::history::Record::new(
            "installed",
            &os.dep.id,
            &spec.os.image_ref,
            "kairosctl build raw",
        ),
    )?;
    let esp_dir = work.join("esp");
    let uki = match &spec.trust {
        // One signed UKI for every entry: immucore and the agent read the role (and the
        // reset) from the entry's name.
        Some(t) => Some(crate::os::esp_tree_trusted(
            &esp_dir,
            &os,
            &[Role::Active, Role::Recovery, Role::Autoreset],
            t,
        )?),
        None => {
            crate::os::esp_tree(
                &esp_dir,
                &os,
                &[Role::Active, Role::Recovery, Role::Autoreset],
            )?;
            None
        }
    };
    let (dep, layer_bytes) = (os.dep, os.layer_bytes);

    // OEM: the user's cloud-config.
    let oem_dir = work.join("oem");
    fs::create_dir_all(&oem_dir)?;
    if let Some(cc) = spec.cloud_config {
        fs::copy(cc, oem_dir.join("90_custom.yaml"))
            .with_context(|| format!("reading {}", cc.display()))?;
    }

    // A trusted ESP holds a UKI per deployment (active, passive, recovery, and the one an
    // upgrade adds before the old passive is collected): twice the room of shared kernels.
    let esp_payload = dir_size(&esp_dir) * if spec.trust.is_some() { 2 } else { 1 };
    let os_payload = dir_size(&state_dir);
    let mut parts = plan(esp_payload, os_payload, 64, 64);
    let used_end = kairos_lifecycle::layout::min_disk_mib(&parts);
    if let Some(total) = spec.size_mib {
        if total < used_end {
            bail!("--size {total} MiB is too small: this image needs at least {used_end} MiB");
        }
        if let Some(last) = parts.last_mut() {
            last.size_mib += total - used_end;
        }
    }
    let total_mib = kairos_lifecycle::layout::min_disk_mib(&parts);

    // Filesystem images.
    let esp_img = work.join("esp.img");
    fat_image(&esp_dir, &esp_img, parts[0].size_mib, Some("COS_GRUB"))?;
    let imgs = [
        esp_img,
        fs_img(work, "oem", &parts[1], Some(&oem_dir))?,
        fs_img(work, "recovery", &parts[2], Some(&rec_dir))?,
        fs_img(work, "state", &parts[3], Some(&state_dir))?,
        fs_img(work, "persistent", &parts[4], None)?,
    ];

    // Assemble: GPT first, then each filesystem at its offset.
    let disk_tmp = work.join("disk.raw");
    {
        let f = fs::File::create(&disk_tmp)?;
        f.set_len(total_mib * MIB)?;
    }
    run(Cmd::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&disk_tmp)
        .stdin(sfdisk_script(&parts)))?;
    {
        let mut disk = fs::OpenOptions::new().write(true).open(&disk_tmp)?;
        for (p, img) in parts.iter().zip(&imgs) {
            copy_into(&mut disk, img, p.start_mib * MIB)?;
        }
        disk.sync_all()?;
    }
    fs::rename(&disk_tmp, spec.output)
        .with_context(|| format!("moving the disk to {}", spec.output.display()))?;
    Ok(RawReport {
        parts,
        disk_bytes: total_mib * MIB,
        layer_bytes,
        uki,
        deployment: dep,
    })
}

/// Once the OS store is made, before anything else is written: the RECOVERY copy, the ESP,
/// the filesystem images and the assembled disk (STATE and RECOVERY each carry the OS, the
/// images and the disk each hold everything once), all in the work directory beside the
/// output.
fn check_room(work: &Path, esp_payload: u64, os_payload: u64) -> Result<()> {
    ensure_free(
        work,
        os_payload + esp_payload + 2 * (esp_payload + 2 * os_payload) + (16 << 20),
    )
}

/// At least `needed` bytes free in the work directory, or an error with the numbers.
fn ensure_free(work: &Path, needed: u64) -> Result<()> {
    let free = kairos_sys::fs::free_bytes(work)?;
    if free < needed {
        bail!(
            "the disk needs at least {} MiB of space in {} to be built, which has {} MiB free: free some space or write the output elsewhere",
            needed.div_ceil(MIB),
            work.parent().unwrap_or(work).display(),
            free / MIB
        );
    }
    Ok(())
}

fn fs_img(work: &Path, name: &str, p: &Part, content: Option<&Path>) -> Result<PathBuf> {
    let img = work.join(format!("{name}.img"));
    mkfs_ext4(&img, p.label, p.size_mib, content)?;
    Ok(img)
}

/// A FAT filesystem image of `size_mib` holding the tree `dir` (mkfs.vfat, then mcopy -s).
pub fn fat_image(dir: &Path, img: &Path, size_mib: u64, label: Option<&str>) -> Result<()> {
    let f = fs::File::create(img).with_context(|| format!("creating {}", img.display()))?;
    f.set_len(size_mib * MIB)?;
    drop(f);
    let mut mkfs = Cmd::new("mkfs.vfat");
    if size_mib >= 64 {
        mkfs = mkfs.args(["-F", "32"]);
    }
    if let Some(l) = label {
        mkfs = mkfs.args(["-n", l]);
    }
    run(mkfs.arg(img))?;
    let mut mcopy = Cmd::new("mcopy").arg("-s").arg("-i").arg(img);
    for e in fs::read_dir(dir)? {
        mcopy = mcopy.arg(e?.path());
    }
    run(mcopy.arg("::/"))
}

pub fn dir_size(d: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![d.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = fs::read_dir(&p) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    run(Cmd::new("cp").arg("-a").arg(from).arg(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sfdisk_script_of_a_plan() {
        let p = plan(30 * MIB, 100 * MIB, 64, 64);
        let s = sfdisk_script(&p);
        assert!(s.starts_with("label: gpt\n"));
        assert!(
            s.contains(
                "start=2048, size=155648, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"efi\""
            ),
            "{s}"
        );
    }

    #[test]
    fn missing_tool_names_the_package() {
        let e = check_tools(&["no-such-tool-xyz"]).unwrap_err().to_string();
        assert!(e.contains("missing tools: no-such-tool-xyz"), "{e}");
        assert_eq!(kairos_sys::exec::package_of("mcopy"), Some("mtools"));
    }
}
