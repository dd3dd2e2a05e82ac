//! Loop devices: attaching an image file read-only, as the layer store needs at boot.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device. It detaches itself when its last user goes away, so keep this
/// value alive until the device is mounted (the mount then holds it).
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
    _fd: File,
}

impl LoopDevice {
    /// `major:minor` of the device (what a device-mapper table names it by).
    pub fn majmin(&self) -> io::Result<String> {
        let name = self.path.file_name().unwrap_or_default();
        std::fs::read_to_string(Path::new("/sys/block").join(name).join("dev"))
            .map(|s| s.trim().to_string())
    }
}

/// Attaches `image` to a free loop device, read-only, cleared when its last user closes it.
pub fn attach_read_only(image: &Path) -> io::Result<LoopDevice> {
    let file = File::open(image)?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    for _ in 0..8 {
        // The free index can be taken by someone else between the two calls: retry.
        #[allow(unsafe_code)]
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an index; the fd is
        // /dev/loop-control, open for the call.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let loopf = OpenOptions::new().read(true).open(&dev)?;
        let mut name = [0u8; 64];
        let s = image.as_os_str().as_encoded_bytes();
        let len = s.len().min(63);
        name[..len].copy_from_slice(&s[..len]);
        let cfg = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                lo_file_name: name,
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        #[allow(unsafe_code)]
        // SAFETY: LOOP_CONFIGURE reads a `loop_config` (`#[repr(C)]`, kernel layout) from a
        // local that outlives the call; the fd is the free loop device just opened.
        let r = unsafe {
            libc::ioctl(
                loopf.as_raw_fd(),
                LOOP_CONFIGURE as _,
                &cfg as *const LoopConfig,
            )
        };
        if r == 0 {
            return Ok(LoopDevice {
                path: dev,
                _fd: loopf,
            });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Err(io::Error::other("no free loop device after 8 tries"))
}
