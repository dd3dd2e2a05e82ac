//! `layout`: add partitions to a disk and grow its last one, as yip's layout plugin does.
//!
//! The disk is named by `device.path` (a block device, or `script://CMD` whose output is
//! one), or by `device.label`: the filesystem label or GPT name of one of its partitions.
//! `init_disk` writes a fresh GPT first. Each of `add_partitions` is created after the last
//! partition (skipped when a partition with its label exists, so the step can run every boot),
//! registered with the kernel (BLKPG) and formatted with `mkfs.<filesystem> -L <fsLabel>`
//! (`none` or `-`: not formatted). `expand_partition` then grows the last partition — to the
//! end of the disk for `size: 0`, else to `size` MiB — and its filesystem.
//! Sizes are MiB; 0 means "the rest of the disk". Only GPT disks are handled.

use std::path::{Path, PathBuf};

use kairos_config::types::{Layout, LayoutPartition};
use kairos_sys::exec::Cmd;
use kairos_sys::grow::{self, Extent};

use crate::executor::Ctx;

const MIB: u64 = 1 << 20;

/// A partition's GPT name, from sysfs (`PARTNAME=` of its uevent).
fn part_name(dev: &Path) -> Option<String> {
    let name = dev.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/class/block/{name}/uevent"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PARTNAME=").map(str::to_string))
}

/// The partition carrying filesystem label or GPT name `label`.
fn partition_by_label(label: &str) -> Option<PathBuf> {
    kairos_sys::blockdev::devices().into_iter().find(|d| {
        Path::new(&format!(
            "/sys/class/block/{}/partition",
            d.file_name().unwrap_or_default().to_string_lossy()
        ))
        .exists()
            && (kairos_sys::blockdev::label_of(d).as_deref() == Some(label)
                || part_name(d).as_deref() == Some(label))
    })
}

fn disk_of(ctx: &Ctx, l: &Layout) -> Result<PathBuf, String> {
    let dev = l.device.clone().unwrap_or_default();
    if let Some(p) = dev.path.as_deref().filter(|p| !p.is_empty()) {
        let p = ctx.render(p);
        if let Some(script) = p.strip_prefix("script://") {
            let out = ctx
                .shell
                .run(script)
                .map_err(|e| format!("device script {script:?}: {e}"))?;
            let dev = out.output.trim().to_string();
            if dev.is_empty() {
                return Err(format!("device script {script:?} printed no device"));
            }
            return Ok(PathBuf::from(dev));
        }
        // A partition names its disk.
        let path = PathBuf::from(&p);
        return Ok(grow::parent_disk(&path).map(|(d, _)| d).unwrap_or(path));
    }
    if let Some(label) = dev.label.as_deref().filter(|l| !l.is_empty()) {
        let part =
            partition_by_label(label).ok_or_else(|| format!("no partition is labelled {label}"))?;
        return grow::parent_disk(&part)
            .map(|(d, _)| d)
            .ok_or_else(|| format!("the disk of {} is unknown", part.display()));
    }
    Err("name the disk with `device.path` or `device.label`".into())
}

/// The partition device node, once devtmpfs made it.
fn wait_node(disk: &Path, number: u32) -> Result<PathBuf, String> {
    let node = kairos_sys::gpt::partition_path(disk, number);
    for _ in 0..100 {
        if node.exists() {
            return Ok(node);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(format!("{} did not appear", node.display()))
}

fn mkfs(dev: &Path, fs: &str, label: Option<&str>) -> Result<(), String> {
    let (prog, mut args, label_flag): (String, Vec<&str>, &str) = match fs {
        "none" | "-" => return Ok(()),
        "ext2" | "ext3" | "ext4" => (format!("mkfs.{fs}"), vec!["-F", "-q"], "-L"),
        "xfs" => ("mkfs.xfs".into(), vec!["-f"], "-L"),
        "btrfs" => ("mkfs.btrfs".into(), vec!["-f"], "-L"),
        "fat" | "vfat" | "fat16" | "fat32" => ("mkfs.fat".into(), vec![], "-n"),
        "swap" => ("mkswap".into(), vec![], "-L"),
        other => {
            return Err(format!(
                "filesystem {other:?} is not one of ext2, ext3, ext4, xfs, btrfs, vfat, swap, none"
            ));
        }
    };
    if let Some(l) = label {
        if fs == "xfs" && l.len() > 12 {
            return Err(format!("xfs labels are at most 12 characters: {l:?}"));
        }
        args.extend([label_flag, l]);
    }
    Cmd::new(prog)
        .args(args)
        .arg(dev)
        .run()
        .map(|_| ())
        .map_err(|e| format!("{e}"))
}

fn add(disk: &Path, p: &LayoutPartition) -> Result<(), String> {
    let fs_label = p.fs_label.as_deref().filter(|l| !l.is_empty());
    let p_label = p.p_label.as_deref().filter(|l| !l.is_empty());
    // Idempotent: a partition with this label on this disk already exists.
    let (parts, _) = grow::partitions(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    for existing in &parts {
        let node = kairos_sys::gpt::partition_path(disk, existing.number);
        if p_label.is_some_and(|l| l == existing.name)
            || fs_label.is_some_and(|l| kairos_sys::blockdev::label_of(&node).as_deref() == Some(l))
        {
            return Ok(());
        }
    }
    let fs = p
        .filesystem
        .as_deref()
        .filter(|f| !f.is_empty())
        .unwrap_or("ext2");
    if fs == "xfs" && fs_label.is_some_and(|l| l.len() > 12) {
        return Err(format!(
            "xfs labels are at most 12 characters: {}",
            fs_label.unwrap_or_default()
        ));
    }
    let name = p_label.or(fs_label).unwrap_or("");
    let type_guid = if p.bootable.0 {
        kairos_sys::gpt::ESP_TYPE
    } else {
        kairos_sys::gpt::LINUX_TYPE
    };
    let (number, ext) = grow::add_partition(disk, name, p.size * MIB, type_guid).map_err(|e| {
        format!(
            "adding {}: {e}",
            fs_label.or(p_label).unwrap_or("a partition")
        )
    })?;
    grow::kernel_add_partition(disk, number, ext).map_err(|e| {
        format!(
            "telling the kernel about partition {number} of {}: {e}",
            disk.display()
        )
    })?;
    let node = wait_node(disk, number)?;
    mkfs(&node, fs, fs_label)
}

/// Grows the filesystem on `node` (partition now `ext`). An unmounted ext2/3/4 is grown
/// offline by `resize2fs` (after the `e2fsck -f` it insists on); otherwise the filesystem is
/// grown mounted — where it is, or on a temporary directory, as yip does — by the kernel
/// (EXT4_IOC_RESIZE_FS, which needs CAP_SYS_RESOURCE), `xfs_growfs` or `btrfs`.
fn grow_fs(node: &Path, ext: Extent) -> Result<(), String> {
    let probed = kairos_sys::blockdev::probe(node)
        .ok_or_else(|| format!("{}: no filesystem to grow", node.display()))?;
    let fstype = probed.fstype;
    if matches!(fstype, "vfat" | "swap") {
        return Err(format!(
            "{} is {fstype}, which cannot be expanded",
            node.display()
        ));
    }
    let shown = node.to_string_lossy().into_owned();
    let mounted = kairos_sys::mount::mounts()
        .into_iter()
        .find(|(src, ..)| *src == shown)
        .map(|(_, mnt, ..)| PathBuf::from(mnt));
    let ext_fs = matches!(fstype, "ext2" | "ext3" | "ext4");
    if ext_fs && mounted.is_none() && kairos_sys::exec::require(&["resize2fs", "e2fsck"]).is_ok() {
        // e2fsck exits 1 when it fixed something: that is fine before a resize.
        let fsck = Cmd::new("e2fsck")
            .args(["-f", "-p"])
            .arg(node)
            .run_status()
            .map_err(|e| format!("{e}"))?;
        if fsck.status > 1 {
            return Err(format!(
                "e2fsck -f -p {shown} exited {}: {}; repair the filesystem before it can grow",
                fsck.status,
                fsck.stderr.trim()
            ));
        }
        return Cmd::new("resize2fs")
            .arg(node)
            .run()
            .map(|_| ())
            .map_err(|e| format!("{e}"));
    }
    let temp = std::env::temp_dir().join(format!("kairos-layout-{}", std::process::id()));
    let mnt = match &mounted {
        Some(m) => m.clone(),
        None => {
            std::fs::create_dir_all(&temp).map_err(|e| format!("{}: {e}", temp.display()))?;
            kairos_sys::mount::mount(
                &shown,
                &temp.to_string_lossy(),
                fstype,
                kairos_sys::mount::MountFlags::empty(),
                "",
            )
            .map_err(|e| format!("mounting {shown} ({fstype}) to grow it: {e}"))?;
            temp.clone()
        }
    };
    let r = match fstype {
        _ if ext_fs => {
            grow::grow_ext4(&mnt, ext.size).map_err(|e| format!("growing {shown} online: {e}"))
        }
        "xfs" => Cmd::new("xfs_growfs")
            .arg(&mnt)
            .run()
            .map(|_| ())
            .map_err(|e| format!("{e}")),
        "btrfs" => Cmd::new("btrfs")
            .args(["filesystem", "resize", "max"])
            .arg(&mnt)
            .run()
            .map(|_| ())
            .map_err(|e| format!("{e}")),
        other => Err(format!(
            "{shown}: growing {other} is not supported (ext2/3/4, xfs, btrfs)"
        )),
    };
    if mounted.is_none() {
        let _ = kairos_sys::mount::unmount(&temp.to_string_lossy(), false);
        let _ = std::fs::remove_dir(&temp);
    }
    r
}

fn expand(disk: &Path, size_mib: u64) -> Result<(), String> {
    let (parts, _) = grow::partitions(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    let last = parts
        .last()
        .ok_or_else(|| format!("{} has no partition to expand", disk.display()))?;
    let node = kairos_sys::gpt::partition_path(disk, last.number);
    if let Some(p) = kairos_sys::blockdev::probe(&node)
        && matches!(p.fstype, "vfat" | "swap")
    {
        return Err(format!(
            "{} is {}, which cannot be expanded",
            node.display(),
            p.fstype
        ));
    }
    let want = (size_mib > 0).then_some(size_mib * MIB);
    let Some(ext) = grow::grow_partition(disk, last.number, want).map_err(|e| format!("{e}"))?
    else {
        return Ok(());
    };
    grow::kernel_resize_partition(disk, last.number, ext)
        .map_err(|e| format!("telling the kernel the new size of {}: {e}", node.display()))?;
    grow_fs(&node, ext)
}

pub fn layout(ctx: &Ctx, l: &Layout) -> Result<(), String> {
    let disk = disk_of(ctx, l)?;
    if l.device.as_ref().is_some_and(|d| d.init_disk.0) {
        kairos_sys::gpt::write_gpt(&disk, &[])
            .map_err(|e| format!("a new GPT on {}: {e}", disk.display()))?;
        let _ = kairos_sys::gpt::reread_partitions(&disk);
    }
    let mut errs = Vec::new();
    for p in &l.add_partitions {
        if let Err(e) = add(&disk, p) {
            errs.push(e);
        }
    }
    if let Some(e) = &l.expand_partition
        && let Err(e) = expand(&disk, e.size)
    {
        errs.push(e);
    }
    super::join(errs)
}
