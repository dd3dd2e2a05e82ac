//! UEFI variables as Linux shows them under efivarfs: the firmware's Secure Boot state and
//! what systemd-boot and systemd-stub tell the OS (which entry booted, whether the UKI was
//! measured). Values are read only; parsers are pure and bounded.

use std::path::{Path, PathBuf};

/// Where efivarfs is mounted.
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// EFI_GLOBAL_VARIABLE: SecureBoot, SetupMode, PK, KEK…
pub const GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// The systemd Boot Loader Interface vendor GUID (systemd-boot, systemd-stub).
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// The owner GUID Kairos enrolls the owner's keys under (any fixed GUID does).
pub const OWNER_GUID: &str = "9b1c5f4e-6a2d-4c1e-8f3a-4b6172696f73";
/// No variable we read is larger (an entry id is a short file name).
const MAX_VAR: u64 = 4096;

/// A variable's file under an efivarfs mount (`dir`, normally [`EFIVARS`]).
pub fn var_path(dir: &Path, name: &str, guid: &str) -> PathBuf {
    dir.join(format!("{name}-{guid}"))
}

/// The signature database: `db` (and `dbx`) live under this GUID.
pub const IMAGE_SECURITY_GUID: &str = "d719b2cb-3d3a-4596-a3bc-dad00e67656f";
/// The signature databases are read up to this size.
pub const MAX_DB: u64 = 1 << 20;

/// A variable's value without the 4 attribute bytes efivarfs puts first; `None` when it is
/// not set (or efivarfs is not mounted), or larger than any variable we read.
pub fn read_var(dir: &Path, name: &str, guid: &str) -> Option<Vec<u8>> {
    read_var_max(dir, name, guid, MAX_VAR)
}

/// [`read_var`] for a variable up to `max` bytes (the signature databases).
pub fn read_var_max(dir: &Path, name: &str, guid: &str, max: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(var_path(dir, name, guid)).ok()?;
    let mut data = Vec::new();
    f.take(max + 1).read_to_end(&mut data).ok()?;
    if data.len() < 4 || data.len() as u64 > max {
        return None;
    }
    Some(data.split_off(4))
}

/// A NUL-terminated UTF-16LE string (systemd's variables); `None` if it is not one.
pub fn utf16_string(data: &[u8]) -> Option<String> {
    let units: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok()
}

/// A one-byte boolean variable (SecureBoot, SetupMode).
pub fn flag(data: &[u8]) -> Option<bool> {
    match data {
        [b] => Some(*b != 0),
        _ => None,
    }
}

/// A PCR number as systemd-stub writes it: a UTF-16 decimal string, or (some stubs) a
/// 32-bit little-endian number.
fn pcr_number(data: &[u8]) -> Option<u32> {
    if let Some(n) = utf16_string(data).and_then(|s| s.trim().parse().ok()) {
        return Some(n);
    }
    let bytes: [u8; 4] = data.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// What the firmware and the boot loader say about this boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// `None`: not a UEFI boot, or efivarfs not mounted.
    pub secure_boot: Option<bool>,
    pub setup_mode: Option<bool>,
    /// The systemd-boot entry that booted (`active.conf`), when systemd-boot booted us.
    pub entry: Option<String>,
    /// systemd-stub measured the UKI into this PCR (systemd's `StubPcrKernelImage`).
    pub stub_pcr: Option<u32>,
}

impl BootInfo {
    pub fn read(dir: &Path) -> BootInfo {
        BootInfo {
            secure_boot: read_var(dir, "SecureBoot", GLOBAL_GUID).and_then(|d| flag(&d)),
            setup_mode: read_var(dir, "SetupMode", GLOBAL_GUID).and_then(|d| flag(&d)),
            entry: read_var(dir, "LoaderEntrySelected", LOADER_GUID)
                .and_then(|d| utf16_string(&d))
                .filter(|s| !s.is_empty()),
            stub_pcr: read_var(dir, "StubPcrKernelImage", LOADER_GUID).and_then(|d| pcr_number(&d)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16(s: &str) -> Vec<u8> {
        s.encode_utf16()
            .chain([0])
            .flat_map(|u| u.to_le_bytes())
            .collect()
    }

    #[test]
    fn reads_variables_as_efivarfs_shows_them() {
        let d = tempfile::tempdir().unwrap();
        let put = |name: &str, guid: &str, value: &[u8]| {
            let mut data = vec![7, 0, 0, 0];
            data.extend_from_slice(value);
            std::fs::write(var_path(d.path(), name, guid), data).unwrap();
        };
        assert_eq!(BootInfo::read(d.path()), BootInfo::default());
        put("SecureBoot", GLOBAL_GUID, &[1]);
        put("SetupMode", GLOBAL_GUID, &[0]);
        put(
            "LoaderEntrySelected",
            LOADER_GUID,
            &utf16("active+2-1.conf"),
        );
        put("StubPcrKernelImage", LOADER_GUID, &utf16("11"));
        let b = BootInfo::read(d.path());
        assert_eq!(b.secure_boot, Some(true));
        assert_eq!(b.setup_mode, Some(false));
        assert_eq!(b.entry.as_deref(), Some("active+2-1.conf"));
        assert_eq!(b.stub_pcr, Some(11));
        put("StubPcrKernelImage", LOADER_GUID, &11u32.to_le_bytes());
        assert_eq!(BootInfo::read(d.path()).stub_pcr, Some(11));
        // Hostile or broken values read as absent, never as something else.
        put("SecureBoot", GLOBAL_GUID, &[1, 1]);
        put("LoaderEntrySelected", LOADER_GUID, &vec![b'a'; 5000]);
        let b = BootInfo::read(d.path());
        assert_eq!((b.secure_boot, b.entry), (None, None));
        assert_eq!(utf16_string(&[0x00, 0xd8, 0, 0]), None, "a lone surrogate");
    }
}
