//! Growing the last partition of a disk (COS_PERSISTENT) and its ext4 filesystem to the end of
//! the disk, as Kairos does on first boot: GPT rewritten (backup header moved to the end), the
//! kernel told with BLKPG, the mounted filesystem grown with EXT4_IOC_RESIZE_FS. Also adding a
//! partition in the free space after the last one (yip's `layout`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Space at the end that is not worth growing into.
const MIN_GAIN: u64 = 16 << 20;

/// Where a partition is, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub size: u64,
}

fn gpt_err(e: gptman::Error) -> io::Error {
    io::Error::other(format!("partition table: {e}"))
}

/// One used GPT entry, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// The GPT partition name.
    pub name: String,
}

const MIB: u64 = 1 << 20;

fn open_gpt(disk: &Path) -> io::Result<(File, gptman::GPT)> {
    let mut f: File = OpenOptions::new().read(true).write(true).open(disk)?;
    let mut gpt = gptman::GPT::find_from(&mut f).map_err(gpt_err)?;
    // A disk image copied to a bigger disk: the backup header moves to the new end.
    let ss = gpt.sector_size;
    gpt.header.update_from(&mut f, ss).map_err(gpt_err)?;
    Ok((f, gpt))
}

/// The end of the usable space, aligned down to 1 MiB, in bytes (exclusive).
fn usable_end(gpt: &gptman::GPT) -> u64 {
    let ss = gpt.sector_size;
    (gpt.header.last_usable_lba + 1) * ss / MIB * MIB
}

/// The used partitions of `disk` in disk order, and where its usable space ends (bytes).
pub fn partitions(disk: &Path) -> io::Result<(Vec<PartInfo>, u64)> {
    let (_, gpt) = open_gpt(disk)?;
    let ss = gpt.sector_size;
    let mut parts: Vec<PartInfo> = gpt
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(i, p)| PartInfo {
            number: i,
            start: p.starting_lba * ss,
            size: (p.ending_lba - p.starting_lba + 1) * ss,
            name: p.partition_name.as_str().to_string(),
        })
        .collect();
    parts.sort_by_key(|p| p.start);
    Ok((parts, usable_end(&gpt)))
}

/// Adds a partition named `name` after the last one, `size` bytes (0: the rest of the disk),
/// 1 MiB aligned. At least 32 MiB must be free, as yip asks. Returns its number and extent.
pub fn add_partition(
    disk: &Path,
    name: &str,
    size: u64,
    type_guid: &str,
) -> io::Result<(u32, Extent)> {
    let (mut f, mut gpt) = open_gpt(disk)?;
    let ss = gpt.sector_size;
    let after = gpt
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(_, p)| (p.ending_lba + 1) * ss)
        .max()
        .unwrap_or(MIB)
        .max(MIB);
    let start = after.div_ceil(MIB) * MIB;
    let end = usable_end(&gpt);
    let free = end.saturating_sub(start);
    if free < 32 * MIB {
        return Err(io::Error::other(format!(
            "{}: only {} MiB free after the last partition; a new partition needs at least 32 MiB",
            disk.display(),
            free / MIB
        )));
    }
    let size = if size == 0 {
        free
    } else {
        size.div_ceil(MIB) * MIB
    };
    if size > free {
        return Err(io::Error::other(format!(
            "{}: {} MiB asked for, {} MiB free after the last partition",
            disk.display(),
            size / MIB,
            free / MIB
        )));
    }
    let number = (1..=gpt.header.number_of_partition_entries)
        .find(|i| !gpt[*i].is_used())
        .ok_or_else(|| io::Error::other(format!("{}: no free GPT entry", disk.display())))?;
    let type_guid = crate::gpt::guid_bytes(type_guid)
        .ok_or_else(|| io::Error::other(format!("bad type GUID {type_guid}")))?;
    gpt[number] = gptman::GPTPartitionEntry {
        partition_type_guid: type_guid,
        unique_partition_guid: crate::gpt::random_guid()?,
        starting_lba: start / ss,
        ending_lba: (start + size) / ss - 1,
        attribute_bits: 0,
        partition_name: name.into(),
    };
    gpt.write_into(&mut f).map_err(gpt_err)?;
    f.sync_all()?;
    Ok((number, Extent { start, size }))
}

/// Grows partition `number` of `disk`, which must be the last one, to `size` bytes (`None`:
/// to the end of the disk). Refuses to shrink it. `None` when there is nothing to gain.
pub fn grow_partition(disk: &Path, number: u32, size: Option<u64>) -> io::Result<Option<Extent>> {
    let (mut f, mut gpt) = open_gpt(disk)?;
    let ss = gpt.sector_size;
    let last = gpt
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(i, p)| (i, p.ending_lba))
        .max_by_key(|(_, end)| *end);
    if last.map(|(i, _)| i) != Some(number) {
        return Err(io::Error::other(format!(
            "{}: partition {number} is not the last one, so it cannot grow",
            disk.display()
        )));
    }
    let start = gpt[number].starting_lba * ss;
    let current = (gpt[number].ending_lba + 1) * ss - start;
    let end = usable_end(&gpt);
    let new_end = match size {
        None => end,
        Some(s) if s < current => {
            return Err(io::Error::other(format!(
                "{}: partition {number} is {} MiB; shrinking it to {} MiB is refused",
                disk.display(),
                current / MIB,
                s / MIB
            )));
        }
        Some(s) if start + s > end => {
            return Err(io::Error::other(format!(
                "{}: partition {number} cannot grow to {} MiB: the disk ends {} MiB after its start",
                disk.display(),
                s / MIB,
                (end - start) / MIB
            )));
        }
        Some(s) => start + s.div_ceil(MIB) * MIB,
    };
    if new_end <= start + current {
        return Ok(None);
    }
    gpt[number].ending_lba = new_end / ss - 1;
    gpt.write_into(&mut f).map_err(gpt_err)?;
    f.sync_all()?;
    Ok(Some(Extent {
        start,
        size: new_end - start,
    }))
}

/// Rewrites the GPT of `disk` (a block device or an image file) so that partition `number`,
/// if it is the last one, ends at the end of the disk. Returns its new extent, or `None` when
/// there is nothing to gain (less than 16 MiB) or it is not the last partition.
pub fn grow_last_partition(disk: &Path, number: u32) -> io::Result<Option<Extent>> {
    let (parts, end) = partitions(disk)?;
    match parts.last() {
        Some(p) if p.number == number && end.saturating_sub(p.start + p.size) >= MIN_GAIN => {
            grow_partition(disk, number, None)
        }
        _ => Ok(None),
    }
}

const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;

#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [u8; 64],
    volname: [u8; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

/// Tells the kernel the new size of partition `number` of the block device `disk`.
pub fn kernel_resize_partition(disk: &Path, number: u32, ext: Extent) -> io::Result<()> {
    blkpg(disk, BLKPG_RESIZE_PARTITION, number, ext)
}

const BLKPG_ADD_PARTITION: libc::c_int = 1;

/// Tells the kernel about a new partition `number` of `disk` (devtmpfs then makes its node),
/// without re-reading the table, which fails while another partition is mounted.
pub fn kernel_add_partition(disk: &Path, number: u32, ext: Extent) -> io::Result<()> {
    blkpg(disk, BLKPG_ADD_PARTITION, number, ext)
}

fn blkpg(disk: &Path, op: libc::c_int, number: u32, ext: Extent) -> io::Result<()> {
    let f = File::open(disk)?;
    let mut part = BlkpgPartition {
        start: ext.start as i64,
        length: ext.size as i64,
        pno: number as i32,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    #[allow(unsafe_code)]
    // SAFETY: BLKPG reads a `blkpg_ioctl_arg` whose `data` points at a `blkpg_partition`; both
    // are `#[repr(C)]` locals that outlive the call, and the fd is open on the disk.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKPG as _, &mut arg as *mut BlkpgIoctlArg) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Grows the ext4 filesystem mounted at `mountpoint` to `bytes`.
pub fn grow_ext4(mountpoint: &Path, bytes: u64) -> io::Result<()> {
    let f = File::open(mountpoint)?;
    let st = rustix::fs::fstatvfs(&f)?;
    let blocks: u64 = bytes / st.f_bsize;
    #[allow(unsafe_code)]
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count) from a local that
    // outlives the call; the fd is the mounted filesystem's root directory.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            EXT4_IOC_RESIZE_FS as _,
            &blocks as *const u64,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// For a partition device (`/dev/vda5`): its disk (`/dev/vda`) and partition number.
pub fn parent_disk(part: &Path) -> Option<(std::path::PathBuf, u32)> {
    let name = part.file_name()?.to_str()?;
    let sys = std::fs::canonicalize(format!("/sys/class/block/{name}")).ok()?;
    let number = std::fs::read_to_string(sys.join("partition"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let disk = sys.parent()?.file_name()?.to_str()?.to_string();
    Some((Path::new("/dev").join(disk), number))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    #[test]
    fn adds_after_the_last_and_refuses_to_shrink() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        File::create(&img).unwrap().set_len(200 << 20).unwrap();
        crate::gpt::write_gpt(
            &img,
            &[crate::gpt::NewPartition {
                name: "a".into(),
                type_guid: crate::gpt::LINUX_TYPE,
                start: MIB,
                size: 50 * MIB,
            }],
        )
        .unwrap();
        let (n, ext) = add_partition(&img, "data", 64 * MIB, crate::gpt::LINUX_TYPE).unwrap();
        assert_eq!((n, ext.start, ext.size), (2, 51 * MIB, 64 * MIB));
        let e = add_partition(&img, "big", 100 * MIB, crate::gpt::LINUX_TYPE).unwrap_err();
        assert!(e.to_string().contains("100 MiB asked for"), "{e}");
        assert!(
            grow_partition(&img, 1, None)
                .unwrap_err()
                .to_string()
                .contains("not the last")
        );
        let e = grow_partition(&img, 2, Some(10 * MIB)).unwrap_err();
        assert!(e.to_string().contains("shrinking"), "{e}");
        let ext = grow_partition(&img, 2, Some(80 * MIB)).unwrap().unwrap();
        assert_eq!(ext.size, 80 * MIB);
        let ext = grow_partition(&img, 2, None).unwrap().unwrap();
        let (parts, end) = partitions(&img).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].name, "data");
        assert_eq!(ext.start + ext.size, end);
        assert_eq!(
            grow_partition(&img, 2, None).unwrap(),
            None,
            "nothing left to gain"
        );
        let e = add_partition(&img, "rest", 0, crate::gpt::LINUX_TYPE).unwrap_err();
        assert!(e.to_string().contains("at least 32 MiB"), "{e}");
    }

    #[test]
    fn grows_only_the_last_partition_of_a_bigger_disk() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        File::create(&img).unwrap().set_len(30 << 20).unwrap();
        let Ok(mut child) = Command::new("sfdisk")
            .args(["--quiet"])
            .arg(&img)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
        else {
            panic!("sfdisk (Debian package fdisk) is needed");
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"label: gpt\nstart=2048, size=20480, name=\"a\"\nstart=22528, size=20480, name=\"persistent\"\n")
            .unwrap();
        assert!(child.wait().unwrap().success());
        // Nothing to gain yet (< 16 MiB free at the end).
        assert_eq!(grow_last_partition(&img, 2).unwrap(), None);
        // The disk is made bigger, as when an image is written to a larger disk.
        OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        assert_eq!(
            grow_last_partition(&img, 1).unwrap(),
            None,
            "not the last partition"
        );
        let ext = grow_last_partition(&img, 2).unwrap().expect("grown");
        assert_eq!(ext.start, 22528 * 512);
        assert_eq!((ext.start + ext.size) % (1 << 20), 0);
        assert!(ext.start + ext.size > 250 << 20);
        let dump = Command::new("sfdisk")
            .arg("--dump")
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&dump.stdout);
        assert!(text.contains(&format!(" {},", ext.size / 512)), "{text}");
        let verify = Command::new("sfdisk")
            .arg("--verify")
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
        assert_eq!(grow_last_partition(&img, 2).unwrap(), None, "idempotent");
    }
}
