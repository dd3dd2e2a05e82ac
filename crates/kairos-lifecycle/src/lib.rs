//! The node lifecycle after the first boot: the ESP [`entries`] that decide what boots,
//! [`upgrade`]s that fetch only missing layers into the store, boot [`assess`]ment with
//! automatic fallback, rollback, [`gc`] of unreferenced layers, and the node [`state`].
//!
//! Everything takes a [`Node`] (where STATE, the ESP and OEM are mounted), so the logic runs
//! against plain directories in tests; [`mounts`] finds and mounts them on a real node.

pub mod assess;
pub mod entries;
pub mod gc;
pub mod history;
pub mod install;
pub mod layout;
pub mod mounts;
pub mod reset;
pub mod state;
pub mod trust;
pub mod upgrade;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Oci(#[from] kairos_oci::Error),
    #[error(transparent)]
    Store(#[from] kairos_layers::Error),
    #[error("{0}")]
    Node(String),
}

/// What mounting the ESP (FAT) needs from a kernel that has FAT as modules.
pub const FAT_MODULES: &[&str] = &[
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_ascii",
    "nls_utf8",
];

/// " (kernel modules not available: …)" for a mount error, or "" when all loaded.
pub(crate) fn missing_modules_note(missing: &[(String, String)]) -> String {
    if missing.is_empty() {
        return String::new();
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(m, why)| format!("{m}: {why}"))
        .collect();
    format!(
        " (kernel modules not available: {}; the image's kernel needs them as modules or built in)",
        list.join("; ")
    )
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a node's partitions are (mounted read-write for the duration of an action).
#[derive(Debug, Clone)]
pub struct Node {
    /// The layer store being changed: COS_STATE (or COS_RECOVERY for `--recovery`).
    pub store: PathBuf,
    /// The ESP (COS_GRUB) with `loader/entries` and `kairos/` kernels.
    pub esp: PathBuf,
    /// COS_OEM, where boot failure records live (`None` when not mounted).
    pub oem: Option<PathBuf>,
    /// Scratch space for downloads and unpacked layers (tmpfs when it fits).
    pub scratch: PathBuf,
    /// The root whose bundled tools are used (`/` on a node).
    pub tools_root: PathBuf,
}

/// Fault injection for power-cut tests: when `KAIROS_FAILPOINT` names this point, the action
/// announces it on stderr and stops there (the test then cuts the VM's power).
pub fn failpoint(name: &str) {
    if std::env::var("KAIROS_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("kairos-failpoint: paused at {name}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// The ESP path of a kernel or initrd with this sha256: the same file for every deployment
/// that shares it, so an upgrade that keeps the kernel writes nothing to the ESP.
pub fn esp_boot_path(kind: &str, sha256: &str) -> String {
    format!("/kairos/{kind}-{}", &sha256[..sha256.len().min(16)])
}

/// A deployment id that can name a file (`d-…`): not empty, not hidden, no path separator.
/// Ids read from disk (a medium's or an ESP's files) are checked with this before a path is
/// made of them.
pub fn is_plain_id(id: &str) -> bool {
    !id.is_empty() && !id.starts_with('.') && !id.contains(['/', '\\', '\0'])
}

/// The ESP path of a deployment's signed UKI (trusted boot): one per deployment, whatever
/// role its entries give it.
pub fn esp_uki_path(deployment: &str) -> String {
    format!("/kairos/{deployment}.efi")
}

/// The command line signed into a deployment's UKI: the image's own, the deployment, and
/// the pin of every layer image (its dm-verity root; immucore boots only those). No mode or store: the
/// entry's name gives the role, so one UKI serves as active, passive and recovery.
pub fn trusted_cmdline(dep: &kairos_layers::Deployment) -> String {
    format!(
        "{} kairos.deployment={} {}",
        dep.cmdline,
        dep.id,
        kairos_layers::render_pins(&dep.pins())
    )
    .trim()
    .to_string()
}

/// The id of a deployment made from an image with this manifest digest.
pub fn deployment_id(manifest_digest: &str) -> String {
    let hex = manifest_digest.trim_start_matches("sha256:");
    format!("d-{}", &hex[..hex.len().min(12)])
}

#[cfg(test)]
mod id_tests {
    #[test]
    fn only_plain_ids_name_files() {
        assert!(super::is_plain_id("d-3f9b7ce9dbe0"));
        for bad in [
            "",
            ".",
            "..",
            "../../etc/x",
            "a/b",
            "a\\b",
            ".hidden",
            "a\0b",
        ] {
            assert!(!super::is_plain_id(bad), "{bad:?}");
        }
    }
}
