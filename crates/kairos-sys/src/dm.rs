//! Device-mapper devices made with the kernel's ioctls on `/dev/mapper/control` (no
//! dmsetup or libdevmapper in the initrd): create a read-only device from one table line,
//! read a target's status, remove it. Used for dm-verity layer images at boot.
//!
//! The request layout (`struct dm_ioctl` + `struct dm_target_spec` + the parameter string)
//! is built by pure functions ([`request`]) and tested without a kernel.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `sizeof(struct dm_ioctl)`.
const IOCTL_SIZE: usize = 312;
/// `sizeof(struct dm_target_spec)`.
const SPEC_SIZE: usize = 40;
/// Bytes of a request and of the kernel's answer: room for one table line or status.
const BUF_SIZE: usize = 16 << 10;
const NAME_LEN: usize = 128;
const UUID_LEN: usize = 129;
/// Interface version asked for (4.0.0: every kernel since 2.6).
const VERSION: [u32; 3] = [4, 0, 0];

const READONLY_FLAG: u32 = 1 << 0;

/// The ioctl commands used.
#[derive(Debug, Clone, Copy)]
enum Op {
    Create = 3,
    Remove = 4,
    Suspend = 6,
    TableLoad = 9,
    TableStatus = 12,
}

impl Op {
    /// `_IOWR(0xfd, op, struct dm_ioctl)`.
    fn number(self) -> libc::c_ulong {
        (3 << 30) | ((IOCTL_SIZE as libc::c_ulong) << 16) | (0xfd << 8) | self as libc::c_ulong
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("device-mapper {what} for {name}: {source} (is the dm_mod module loaded?)")]
    Ioctl {
        what: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("device-mapper name or uuid {0:?}: 1 to 127 characters, no '/' or NUL")]
    Name(String),
    #[error("device-mapper table for {name}: {why}")]
    Table { name: String, why: String },
}

/// One target line: `start length type params…` (sectors), as `dmsetup table` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start: u64,
    pub length: u64,
    pub kind: String,
    pub params: String,
}

impl Target {
    /// Parses `start length type params`.
    pub fn parse(line: &str) -> Option<Target> {
        let mut it = line.trim().splitn(4, ' ');
        let start = it.next()?.parse().ok()?;
        let length = it.next()?.parse().ok()?;
        let kind = it.next()?.to_string();
        let params = it.next().unwrap_or("").to_string();
        (!kind.is_empty() && kind.len() < 16 && length > 0).then_some(Target {
            start,
            length,
            kind,
            params,
        })
    }
}

fn check_name(name: &str) -> Result<(), DmError> {
    if name.is_empty() || name.len() >= NAME_LEN || name.contains('/') || name.contains('\0') {
        return Err(DmError::Name(name.into()));
    }
    Ok(())
}

/// The bytes of one request: header (name, uuid, flags) and, when given, one target.
pub fn request(name: &str, uuid: &str, flags: u32, target: Option<&Target>) -> Vec<u8> {
    let mut b = vec![0u8; BUF_SIZE];
    for (i, v) in VERSION.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b[12..16].copy_from_slice(&(BUF_SIZE as u32).to_ne_bytes()); // data_size
    b[16..20].copy_from_slice(&(IOCTL_SIZE as u32).to_ne_bytes()); // data_start
    b[20..24].copy_from_slice(&u32::from(target.is_some()).to_ne_bytes()); // target_count
    b[28..32].copy_from_slice(&flags.to_ne_bytes());
    let n = name.len().min(NAME_LEN - 1);
    b[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    let u = uuid.len().min(UUID_LEN - 1);
    b[48 + NAME_LEN..48 + NAME_LEN + u].copy_from_slice(&uuid.as_bytes()[..u]);
    if let Some(t) = target {
        let s = IOCTL_SIZE;
        b[s..s + 8].copy_from_slice(&t.start.to_ne_bytes());
        b[s + 8..s + 16].copy_from_slice(&t.length.to_ne_bytes());
        let k = t.kind.len().min(15);
        b[s + 24..s + 24 + k].copy_from_slice(&t.kind.as_bytes()[..k]);
        let p = t.params.len().min(BUF_SIZE - s - SPEC_SIZE - 1);
        b[s + SPEC_SIZE..s + SPEC_SIZE + p].copy_from_slice(&t.params.as_bytes()[..p]);
    }
    b
}

/// The status text of the first target in an answer to a status request.
pub fn answer_status(b: &[u8]) -> Option<String> {
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_ne_bytes(s.try_into().unwrap()))
    };
    let count = u32_at(20)?;
    let start = u32_at(16)? as usize;
    if count == 0 {
        return None;
    }
    let text = b.get(start + SPEC_SIZE..)?;
    let end = text.iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&text[..end]).into_owned())
}

/// `(major, minor)` of the device an answer names (the kernel's `huge_encode_dev`).
fn answer_dev(b: &[u8]) -> (u32, u32) {
    let dev = u64::from_ne_bytes(b[40..48].try_into().unwrap());
    let major = ((dev >> 8) & 0xfff) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    (major, minor)
}

fn call(op: Op, what: &'static str, name: &str, buf: &mut [u8]) -> Result<(), DmError> {
    let err = |source| DmError::Ioctl {
        what,
        name: name.into(),
        source,
    };
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(err)?;
    #[allow(unsafe_code)]
    // SAFETY: `buf` is BUF_SIZE bytes, starts with a dm_ioctl whose data_size says so, and
    // outlives the call; the kernel writes at most data_size bytes back.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), op.number() as _, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Creates the read-only device `name` (with `uuid`) from one target and activates it;
/// returns its node, `/dev/dm-<minor>` (devtmpfs makes it; no udev needed). A failure
/// after creation removes the device again.
pub fn create_read_only(name: &str, uuid: &str, target: &Target) -> Result<PathBuf, DmError> {
    check_name(name)?;
    if uuid.len() >= UUID_LEN || uuid.contains('\0') {
        return Err(DmError::Name(uuid.into()));
    }
    if target.params.len() > BUF_SIZE - IOCTL_SIZE - SPEC_SIZE - 1 || target.params.contains('\0') {
        return Err(DmError::Table {
            name: name.into(),
            why: "the table line is too long or holds a NUL".into(),
        });
    }
    let mut b = request(name, uuid, 0, None);
    call(Op::Create, "create", name, &mut b)?;
    let (_, minor) = answer_dev(&b);
    let activated = (|| {
        let mut b = request(name, "", READONLY_FLAG, Some(target));
        call(Op::TableLoad, "table load", name, &mut b)?;
        // A suspend request without the suspend flag resumes: the loaded table goes live.
        let mut b = request(name, "", 0, None);
        call(Op::Suspend, "resume", name, &mut b)
    })();
    if let Err(e) = activated {
        let _ = remove(name);
        return Err(e);
    }
    Ok(PathBuf::from(format!("/dev/dm-{minor}")))
}

/// The status text of a device's (first) target, e.g. `V` or `C` for verity.
pub fn status(name: &str) -> Result<String, DmError> {
    check_name(name)?;
    let mut b = request(name, "", 0, None);
    call(Op::TableStatus, "status", name, &mut b)?;
    Ok(answer_status(&b).unwrap_or_default())
}

/// What a `verity` target's status says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verity {
    /// `V`: every block read so far hashed up to the root.
    Verified,
    /// `C`: a block did not; reads of it failed.
    Corrupted,
    /// Anything else (not a verity target, no answer).
    Other(String),
}

/// Reads a verity status text: its first word is `V` or `C` (FEC counters may follow).
pub fn parse_verity_status(text: &str) -> Verity {
    match text.split_whitespace().next() {
        Some("V") => Verity::Verified,
        Some("C") => Verity::Corrupted,
        _ => Verity::Other(text.trim().to_string()),
    }
}

/// The status of the verity device `name`.
pub fn verity_status(name: &str) -> Result<Verity, DmError> {
    status(name).map(|s| parse_verity_status(&s))
}

/// Removes a device (it must not be open).
pub fn remove(name: &str) -> Result<(), DmError> {
    check_name(name)?;
    let mut b = request(name, "", 0, None);
    call(Op::Remove, "remove", name, &mut b)
}

/// The device-mapper device named `name` (`/sys/block/dm-*/dm/name`), as `/dev/dm-N`: it
/// exists without udev (devtmpfs), unlike `/dev/mapper/<name>`.
pub fn mapped_device(name: &str) -> Option<PathBuf> {
    fs::read_dir("/sys/block")
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("dm-"))
        .find(|e| fs::read_to_string(e.path().join("dm/name")).is_ok_and(|n| n.trim_end() == name))
        .map(|e| Path::new("/dev").join(e.file_name()))
}

/// Every device-mapper device: `(/dev/dm-N, name, uuid)` from `/sys/block/dm-*/dm`.
pub fn devices() -> Vec<(PathBuf, String, String)> {
    let mut out: Vec<_> = fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("dm-"))
        .map(|e| {
            let read = |f: &str| {
                fs::read_to_string(e.path().join("dm").join(f))
                    .map(|s| s.trim_end().to_string())
                    .unwrap_or_default()
            };
            (
                Path::new("/dev").join(e.file_name()),
                read("name"),
                read("uuid"),
            )
        })
        .collect();
    out.sort();
    out
}

/// The udev database entry a udev-run initrd would leave for a device-mapper device it
/// set up: without it, the real root's udev treats the coldplugged device as unfinished
/// (dmsetup's 55-dm.rules) and systemd never sees it ready (its mounts would wait for it).
pub fn udev_db_entry() -> &'static str {
    "E:DM_UDEV_PRIMARY_SOURCE_FLAG=1\nE:DM_UDEV_RULES_VSN=2\nE:DM_ACTIVATION=1\n"
}

/// Writes [`udev_db_entry`] for `/dev/dm-N` into `/run/udev/data/b<major>:<minor>` (/run
/// moves into the new root with the switch).
pub fn udev_handover(dev: &Path) -> io::Result<()> {
    let name = dev
        .file_name()
        .ok_or_else(|| io::Error::other("no device name"))?;
    let majmin = fs::read_to_string(Path::new("/sys/block").join(name).join("dev"))?;
    let dir = Path::new("/run/udev/data");
    fs::create_dir_all(dir)?;
    fs::write(dir.join(format!("b{}", majmin.trim())), udev_db_entry())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // DM_DEV_CREATE and DM_TABLE_LOAD as the kernel headers define them.
        assert_eq!(Op::Create.number(), 0xc138fd03);
        assert_eq!(Op::TableLoad.number(), 0xc138fd09);
        assert_eq!(Op::TableStatus.number(), 0xc138fd0c);
    }

    #[test]
    fn a_request_is_laid_out_as_struct_dm_ioctl() {
        let t = Target::parse("0 1032 verity 1 7:0 7:0 4096 4096 129 129 sha256 ab -").unwrap();
        assert_eq!(t.kind, "verity");
        assert_eq!(t.params, "1 7:0 7:0 4096 4096 129 129 sha256 ab -");
        let b = request(
            "kairos-layer-0",
            "KAIROS-VERITY-ab",
            READONLY_FLAG,
            Some(&t),
        );
        assert_eq!(&b[0..4], &4u32.to_ne_bytes());
        assert_eq!(&b[16..20], &312u32.to_ne_bytes());
        assert_eq!(&b[20..24], &1u32.to_ne_bytes());
        assert_eq!(&b[28..32], &1u32.to_ne_bytes());
        assert_eq!(&b[48..62], b"kairos-layer-0");
        assert_eq!(b[62], 0);
        assert_eq!(&b[176..192], b"KAIROS-VERITY-ab");
        assert_eq!(&b[312 + 8..312 + 16], &1032u64.to_ne_bytes());
        assert_eq!(&b[312 + 24..312 + 30], b"verity");
        assert_eq!(&b[352..352 + t.params.len()], t.params.as_bytes());
        assert_eq!(b[352 + t.params.len()], 0);
        // The same layout read back as an answer.
        assert_eq!(answer_status(&b).as_deref(), Some(t.params.as_str()));
        assert_eq!(answer_status(&request("x", "", 0, None)), None);
    }

    #[test]
    fn verity_status_words() {
        assert_eq!(parse_verity_status("V"), Verity::Verified);
        assert_eq!(parse_verity_status("C 3"), Verity::Corrupted);
        assert_eq!(parse_verity_status(""), Verity::Other(String::new()));
    }

    #[test]
    fn bad_names_and_lines_are_refused() {
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"x".repeat(128)).is_err());
        assert!(check_name("kairos-layer-0").is_ok());
        assert_eq!(Target::parse("0 0 verity x"), None);
        assert_eq!(Target::parse("zero 8 verity"), None);
        let dev = answer_dev(&{
            let mut b = vec![0u8; 64];
            // 253:1 encoded the kernel's way.
            b[40..48].copy_from_slice(&((253u64 << 8) | 1).to_ne_bytes());
            b
        });
        assert_eq!(dev, (253, 1));
    }
}
