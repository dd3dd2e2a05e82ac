//! Growing the last partition of a disk (COS_PERSISTENT) and its ext4 filesystem to the end of
//! the disk, as Kairos does on first boot: GPT rewritten (backup header moved to the end), the
//! kernel told with BLKPG, the mounted filesystem grown with EXT4_IOC_RESIZE_FS.

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

/// Rewrites the GPT of `disk` (a block device or an image file) so that partition `number`,
/// if it is the last one, ends at the end of the disk. Returns its new extent, or `None` when
/// there is nothing to gain.
pub fn grow_last_partition(disk: &Path, number: u32) -> io::Result<Option<Extent>> {
    let mut f: File = OpenOptions::new().read(true).write(true).open(disk)?;
    let mut gpt = gptman::GPT::find_from(&mut f).map_err(gpt_err)?;
    let ss = gpt.sector_size;
    let last = gpt
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(i, p)| (i, p.ending_lba))
        .max_by_key(|(_, end)| *end);
    if last.map(|(i, _)| i) != Some(number) {
        return Ok(None);
    }
    gpt.header.update_from(&mut f, ss).map_err(gpt_err)?;
    let start = gpt[number].starting_lba;
    // Keep the end aligned to 1 MiB, like the partitions the builder makes.
    let align = (1 << 20) / ss;
    let new_end = ((gpt.header.last_usable_lba + 1) / align * align).saturating_sub(1);
    if new_end <= gpt[number].ending_lba || (new_end - gpt[number].ending_lba) * ss < MIN_GAIN {
        return Ok(None);
    }
    gpt[number].ending_lba = new_end;
    gpt.write_into(&mut f).map_err(gpt_err)?;
    f.sync_all()?;
    Ok(Some(Extent {
        start: start * ss,
        size: (new_end - start + 1) * ss,
    }))
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
    let f = File::open(disk)?;
    let mut part = BlkpgPartition {
        start: ext.start as i64,
        length: ext.size as i64,
        pno: number as i32,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
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
