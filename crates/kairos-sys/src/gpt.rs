//! Writing a fresh GPT on a disk (the installer), wiping one (an install that failed must
//! not look installed), and asking the kernel to re-read partitions.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// One partition to create, in bytes (1 MiB aligned by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPartition {
    pub name: String,
    pub type_guid: &'static str,
    pub start: u64,
    pub size: u64,
}

/// `C12A7328-F81F-11D2-…` → the on-disk byte order (first three fields little-endian).
pub fn guid_bytes(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Some(b)
}

pub(crate) fn random_guid() -> io::Result<[u8; 16]> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[7] = (b[7] & 0x0f) | 0x40; // version 4 (field 3 is little-endian on disk)
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b)
}

fn gpt_err(e: gptman::Error) -> io::Error {
    io::Error::other(format!("partition table: {e}"))
}

/// Replaces the partition table of `disk` with a new GPT holding `parts`.
pub fn write_gpt(disk: &Path, parts: &[NewPartition]) -> io::Result<()> {
    let mut f = OpenOptions::new().read(true).write(true).open(disk)?;
    let ss = 512u64;
    let mut gpt = gptman::GPT::new_from(&mut f, ss, random_guid()?).map_err(gpt_err)?;
    for (i, p) in parts.iter().enumerate() {
        let type_guid = guid_bytes(p.type_guid)
            .ok_or_else(|| io::Error::other(format!("bad type GUID {}", p.type_guid)))?;
        gpt[(i + 1) as u32] = gptman::GPTPartitionEntry {
            partition_type_guid: type_guid,
            unique_partition_guid: random_guid()?,
            starting_lba: p.start / ss,
            ending_lba: (p.start + p.size) / ss - 1,
            attribute_bits: 0,
            partition_name: p.name.as_str().into(),
        };
    }
    gpt.write_into(&mut f).map_err(gpt_err)?;
    gptman::GPT::write_protective_mbr_into(&mut f, ss).map_err(gpt_err)?;
    f.sync_all()
}

/// Zeroes both GPT copies and the MBR: the disk no longer has partitions.
pub fn wipe_gpt(disk: &Path) -> io::Result<()> {
    let mut f = OpenOptions::new().read(true).write(true).open(disk)?;
    let len = f.seek(SeekFrom::End(0))?;
    let zeros = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&zeros[..(len.min(1 << 20)) as usize])?;
    if len > 1 << 20 {
        f.seek(SeekFrom::Start(len - (1 << 20)))?;
        f.write_all(&zeros)?;
    }
    f.sync_all()
}

const BLKRRPART: libc::c_ulong = 0x125F;

/// Asks the kernel to re-read the partition table (devtmpfs then shows the new nodes).
pub fn reread_partitions(disk: &Path) -> io::Result<()> {
    let f = File::open(disk)?;
    #[allow(unsafe_code)]
    // SAFETY: BLKRRPART takes no argument; the fd is an open block device we own for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART as _) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `/dev/vda` + 2 → `/dev/vda2`; `/dev/nvme0n1` + 2 → `/dev/nvme0n1p2`.
pub fn partition_path(disk: &Path, n: u32) -> PathBuf {
    let s = disk.to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{n}"))
    } else {
        PathBuf::from(format!("{s}{n}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_and_names() {
        let b = guid_bytes(ESP_TYPE).unwrap();
        assert_eq!(&b[..4], &[0x28, 0x73, 0x2A, 0xC1]);
        assert_eq!(&b[8..], &[0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B]);
        assert_eq!(
            partition_path(Path::new("/dev/vda"), 3),
            PathBuf::from("/dev/vda3")
        );
        assert_eq!(
            partition_path(Path::new("/dev/nvme0n1"), 1),
            PathBuf::from("/dev/nvme0n1p1")
        );
    }

    #[test]
    fn writes_a_gpt_sfdisk_reads_and_wipes_it() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let parts = [
            NewPartition {
                name: "efi".into(),
                type_guid: ESP_TYPE,
                start: 1 << 20,
                size: 16 << 20,
            },
            NewPartition {
                name: "state".into(),
                type_guid: LINUX_TYPE,
                start: 17 << 20,
                size: 32 << 20,
            },
        ];
        write_gpt(&img, &parts).unwrap();
        let out = std::process::Command::new("sfdisk")
            .arg("--dump")
            .arg(&img)
            .output()
            .expect("sfdisk (Debian package fdisk)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("label: gpt"), "{text}");
        assert!(
            text.contains(
                "start=        2048, size=       32768, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
            ),
            "{text}"
        );
        assert!(text.contains("name=\"state\""), "{text}");
        wipe_gpt(&img).unwrap();
        let out = std::process::Command::new("sfdisk")
            .arg("--dump")
            .arg(&img)
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&out.stdout).contains("label: gpt"));
    }
}
