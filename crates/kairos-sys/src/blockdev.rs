//! Finding block devices by filesystem label without udev or blkid: read the superblock.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// What a superblock says: the filesystem type (as mount(2) names it) and its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probed {
    pub fstype: &'static str,
    pub label: Option<String>,
}

/// Bytes to read from the start of a device for [`probe_head`] (ISO 9660 starts at 32 KiB).
pub const HEAD_LEN: usize = 0x8800;

/// The `fstype` of a LUKS container (blkid's name); its label is the LUKS2 header's.
pub const LUKS: &str = "crypto_LUKS";

/// Identifies LUKS, ext2/3/4, ISO 9660 and FAT from the first bytes of a device.
pub fn probe_head(head: &[u8]) -> Option<Probed> {
    if let Some(h) = crate::luks::parse_header(head) {
        return Some(Probed {
            fstype: LUKS,
            label: h.label,
        });
    }
    let clean = |b: &[u8]| {
        let s = String::from_utf8_lossy(b)
            .trim_end_matches(['\0', ' '])
            .to_string();
        (!s.is_empty()).then_some(s)
    };
    // ext: superblock at 1024, magic 0xEF53 at +0x38, volume name at +0x78.
    if head.len() >= 1024 + 0x88 && head[1024 + 0x38..1024 + 0x3A] == [0x53, 0xEF] {
        return Some(Probed {
            fstype: "ext4",
            label: clean(&head[1024 + 0x78..1024 + 0x88]),
        });
    }
    // ISO 9660: primary volume descriptor in sector 16, "CD001" at +1, volume id at +40.
    if head.len() >= 0x8000 + 72 && &head[0x8001..0x8006] == b"CD001" {
        return Some(Probed {
            fstype: "iso9660",
            label: clean(&head[0x8028..0x8048]),
        });
    }
    // FAT32: "FAT32   " at 0x52, label at 0x47; FAT12/16: "FAT" at 0x36, label at 0x2B.
    if head.len() >= 512 && head[510..512] == [0x55, 0xAA] {
        let label = if &head[0x52..0x57] == b"FAT32" {
            &head[0x47..0x52]
        } else if &head[0x36..0x39] == b"FAT" {
            &head[0x2B..0x36]
        } else {
            return None;
        };
        return Some(Probed {
            fstype: "vfat",
            label: clean(label).filter(|l| l != "NO NAME"),
        });
    }
    None
}

/// The label of the filesystem whose first bytes are `head`.
pub fn label_from_head(head: &[u8]) -> Option<String> {
    probe_head(head)?.label
}

/// Probes a device (or image file).
pub fn probe(dev: &Path) -> Option<Probed> {
    let mut f = fs::File::open(dev).ok()?;
    let mut head = vec![0u8; HEAD_LEN];
    f.seek(SeekFrom::Start(0)).ok()?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    probe_head(&head[..n])
}

pub fn label_of(dev: &Path) -> Option<String> {
    probe(dev)?.label
}

/// Every block device the kernel knows (`/sys/class/block`), as `/dev/<name>`.
pub fn devices() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir("/sys/class/block")
        .map(|rd| {
            rd.flatten()
                .map(|e| Path::new("/dev").join(e.file_name()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The device carrying the filesystem labelled `label`, if present now — the opened
/// mapping of an encrypted partition, never its LUKS container.
pub fn find_by_label(label: &str) -> Option<PathBuf> {
    find_probed(label, |p| p.fstype != LUKS)
}

/// The LUKS container labelled `label` (an encrypted partition, opened or not).
pub fn find_luks_by_label(label: &str) -> Option<PathBuf> {
    find_probed(label, |p| p.fstype == LUKS)
}

/// Every labelled LUKS container, in one pass over the block devices: `(label, device)`.
pub fn luks_containers() -> Vec<(String, PathBuf)> {
    devices()
        .into_iter()
        .filter(|d| !d.to_string_lossy().contains("/loop"))
        .filter_map(|d| {
            let p = probe(&d)?;
            (p.fstype == LUKS).then_some((p.label?, d))
        })
        .collect()
}

fn find_probed(label: &str, want: impl Fn(&Probed) -> bool) -> Option<PathBuf> {
    devices()
        .into_iter()
        .filter(|d| !d.to_string_lossy().contains("/loop"))
        .find(|d| probe(d).is_some_and(|p| p.label.as_deref() == Some(label) && want(&p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_and_fat_labels() {
        let mut h = vec![0u8; 4096];
        h[1024 + 0x38] = 0x53;
        h[1024 + 0x39] = 0xEF;
        h[1024 + 0x78..1024 + 0x78 + 9].copy_from_slice(b"COS_STATE");
        assert_eq!(label_from_head(&h).as_deref(), Some("COS_STATE"));
        let mut f = vec![0u8; 512];
        f[510] = 0x55;
        f[511] = 0xAA;
        f[0x52..0x5A].copy_from_slice(b"FAT32   ");
        f[0x47..0x52].copy_from_slice(b"COS_GRUB   ");
        assert_eq!(label_from_head(&f).as_deref(), Some("COS_GRUB"));
        assert_eq!(label_from_head(&[0u8; 4096]), None);
        let mut iso = vec![0u8; HEAD_LEN];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        iso[0x8028..0x8030].copy_from_slice(b"COS_LIVE");
        iso[0x8030..0x8048].fill(b' ');
        let p = probe_head(&iso).unwrap();
        assert_eq!(
            (p.fstype, p.label.as_deref()),
            ("iso9660", Some("COS_LIVE"))
        );
    }

    #[test]
    fn real_ext4_label() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("fs.img");
        fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "COS_OEM"])
            .arg(&img)
            .status()
            .expect("mkfs.ext4 (Debian package e2fsprogs)");
        assert!(ok.success());
        assert_eq!(label_of(&img).as_deref(), Some("COS_OEM"));
    }
}
