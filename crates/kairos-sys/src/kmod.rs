//! Kernel modules: reading a module's dependencies from its `.modinfo`, and loading it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::Path;

/// The `depends=` list of a module file (names, `-` and `_` as written).
pub fn depends(ko: &[u8]) -> Vec<String> {
    let needle = b"depends=";
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = ko[i..].windows(needle.len()).position(|w| w == needle) {
        let start = i + pos;
        // `.modinfo` entries are NUL-separated: the key must start right after a NUL.
        if start > 0 && ko[start - 1] == 0 {
            let v = &ko[start + needle.len()..];
            let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
            out.extend(
                String::from_utf8_lossy(&v[..end])
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            );
            return out;
        }
        i = start + needle.len();
    }
    out
}

/// Loads a module file into the running kernel; "already loaded" is success.
pub fn load(path: &Path, params: &str) -> io::Result<()> {
    let f = File::open(path)?;
    let params =
        CString::new(params).map_err(|_| io::Error::other("module parameters contain NUL"))?;
    match rustix::system::finit_module(&f, &params, 0) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends() {
        let blob = b"\x7fELF....\0license=GPL\0depends=virtio,virtio_ring\0name=virtio_blk\0";
        assert_eq!(depends(blob), vec!["virtio", "virtio_ring"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert!(depends(b"nothing here").is_empty());
    }
}
