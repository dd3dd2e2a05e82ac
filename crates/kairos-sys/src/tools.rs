//! Filesystem tools the node needs whatever its distribution ships (a busybox image has none
//! of them): `kairosify` bundles them from the build host with their libraries and loader.

use std::path::Path;

/// Where the bundle lives in an image.
pub const BUNDLE: &str = "usr/lib/kairos/tools";

/// What is bundled: layer images for upgrades, filesystems for the installer.
pub const BUNDLED: &[&str] = &["mkfs.erofs", "mke2fs", "mkfs.fat"];

/// The argv that runs `name`: the bundled copy under `root` (through its own loader) when
/// present, else the one on PATH.
pub fn argv(root: &Path, name: &str) -> Vec<String> {
    let dir = root.join(BUNDLE);
    let tool = dir.join(name);
    let loader = dir.join("ld-linux-x86-64.so.2");
    if tool.is_file() && loader.is_file() {
        vec![
            loader.to_string_lossy().into_owned(),
            "--library-path".into(),
            dir.to_string_lossy().into_owned(),
            tool.to_string_lossy().into_owned(),
        ]
    } else {
        vec![name.to_string()]
    }
}
