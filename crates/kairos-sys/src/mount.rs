//! Mounting, for the initramfs and install code.

use std::ffi::CString;
use std::io;

pub use rustix::mount::MountFlags;

/// mount(2) with string data (`lowerdir=…`, `size=25%`); empty data means none.
pub fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> io::Result<()> {
    let data = CString::new(data).map_err(|_| io::Error::other("mount options contain NUL"))?;
    let data = if data.as_bytes().is_empty() {
        None
    } else {
        Some(data.as_c_str())
    };
    rustix::mount::mount(src, target, fstype, flags, data).map_err(io::Error::from)
}

pub fn bind(src: &str, target: &str) -> io::Result<()> {
    mount(src, target, "", MountFlags::BIND, "")
}

pub fn move_mount(src: &str, target: &str) -> io::Result<()> {
    rustix::mount::mount_move(src, target).map_err(io::Error::from)
}
