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

/// umount2(2), detaching lazily when `lazy` (a busy loop device of an upgrade's probe mount).
pub fn unmount(target: &str, lazy: bool) -> io::Result<()> {
    let flags = if lazy {
        rustix::mount::UnmountFlags::DETACH
    } else {
        rustix::mount::UnmountFlags::empty()
    };
    rustix::mount::unmount(target, flags).map_err(io::Error::from)
}

/// Remounts a mounted filesystem read-write or read-only (the superblock, not only the mount).
pub fn remount(target: &str, read_only: bool) -> io::Result<()> {
    let flags = if read_only {
        MountFlags::RDONLY
    } else {
        MountFlags::empty()
    };
    rustix::mount::mount_remount(target, flags, "").map_err(io::Error::from)
}

/// The mount table: (source, mountpoint, fstype, options) from `/proc/self/mounts`.
pub fn mounts() -> Vec<(String, String, String, String)> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                unescape(f.next()?),
                unescape(f.next()?),
                f.next()?.to_string(),
                f.next()?.to_string(),
            ))
        })
        .collect()
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescapes_mount_fields() {
        assert_eq!(super::unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(super::unescape("/plain"), "/plain");
    }
}
