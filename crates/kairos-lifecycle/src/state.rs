//! The node's state for `kairos-agent state`: boot mode, what is booted and what boots next,
//! the deployments with their images and digests, the last failure and why, partitions and
//! history — one JSON document, also addressable by path (`state get booted.deployment`).

use std::collections::BTreeMap;

use kairos_layers::Store;
use serde::Serialize;

use crate::assess::Booted;
use crate::entries::{self, Entry, Role};
use crate::history::{self, Record, Staged};
use crate::{Error, Node, upgrade};

/// What kairos-immucore writes on OEM when a boot fails before userspace.
pub const BOOT_FAILURE_LOG: &str = "boot-failure.log";

#[derive(Debug, Clone, Serialize)]
pub struct DeploymentInfo {
    pub id: String,
    pub image: String,
    pub manifest_digest: String,
    pub version: String,
    pub created: String,
    pub layers: Vec<String>,
    /// Entries that boot it.
    pub roles: Vec<Role>,
}

#[derive(Debug, Clone, Serialize)]
pub struct State {
    pub boot_mode: String,
    pub booted: String,
    /// The deployment systemd-boot picks next, and in which role.
    pub next_boot: Option<String>,
    pub next_role: Option<Role>,
    pub entries: Vec<Entry>,
    pub deployments: Vec<DeploymentInfo>,
    pub staged: Option<Staged>,
    pub last_failure: Option<Record>,
    pub partitions: BTreeMap<String, String>,
    pub history: Vec<Record>,
    /// Secure Boot and measured boot, on a UEFI machine.
    pub trusted_boot: Option<TrustedBoot>,
    /// Encrypted partitions by label (`install.encrypted_partitions`).
    pub encrypted: BTreeMap<String, Encrypted>,
    /// Layer images mounted through dm-verity (trusted boot), base first.
    pub verified_layers: Vec<VerifiedLayer>,
}

/// A layer image immucore mounted through dm-verity (`kairos-agent state get
/// verified_layers`).
#[derive(Debug, Clone, Serialize)]
pub struct VerifiedLayer {
    /// `kairos-layer-<index>`.
    pub name: String,
    pub device: String,
    /// The signed root hash.
    pub root: String,
    /// `true` once the kernel has refused a block of it (a changed image on disk).
    pub corrupted: bool,
}

/// The layers behind dm-verity now, base first, found by their uuid
/// ([`kairos_layers::verity::dm_uuid`]).
pub fn verified_layers() -> Vec<VerifiedLayer> {
    let mut out: Vec<(usize, VerifiedLayer)> = kairos_sys::dm::devices()
        .into_iter()
        .filter_map(|(dev, name, uuid)| {
            let (root, index) = kairos_layers::verity::parse_dm_uuid(&uuid)?;
            Some((
                index,
                VerifiedLayer {
                    corrupted: kairos_sys::dm::verity_status(&name)
                        .is_ok_and(|s| s == kairos_sys::dm::Verity::Corrupted),
                    name,
                    device: dev.to_string_lossy().into_owned(),
                    root: root.to_string(),
                },
            ))
        })
        .collect();
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, l)| l).collect()
}

/// An encrypted partition (`kairos-agent state get encrypted.COS_PERSISTENT`).
#[derive(Debug, Clone, Serialize)]
pub struct Encrypted {
    /// The LUKS container (the partition).
    pub container: String,
    /// The opened volume (`/dev/dm-N`); `None` when closed (COS_PERSISTENT in recovery).
    pub opened: Option<String>,
    /// LUKS2 token types (`systemd-tpm2`: the key is sealed into the TPM).
    pub tokens: Vec<String>,
    /// Whether the set-up finished (a power cut can leave it unfinished).
    pub finished: bool,
    /// The recovery key from the first boot is still in `/run/kairos/recovery-keys/`: save it.
    pub recovery_key_file: Option<String>,
}

/// What the running system shows of the encrypted partitions: containers found by their
/// LUKS2 label, the opened volumes by their mapping name (Kairos names them by label).
pub fn encrypted(labels: &[&str], recovery_keys: &std::path::Path) -> BTreeMap<String, Encrypted> {
    let mut out = BTreeMap::new();
    let containers = kairos_sys::blockdev::luks_containers();
    for label in labels {
        let Some((_, dev)) = containers.iter().find(|(l, _)| l == label) else {
            continue;
        };
        let vol = kairos_sys::luks::read(dev).ok().flatten();
        let key = recovery_keys.join(label);
        out.insert(
            label.to_string(),
            Encrypted {
                container: dev.to_string_lossy().into_owned(),
                opened: kairos_sys::dm::mapped_device(label)
                    .map(|d| d.to_string_lossy().into_owned()),
                tokens: vol.as_ref().map(|v| v.tokens.clone()).unwrap_or_default(),
                finished: vol.as_ref().is_some_and(|v| v.finished()),
                recovery_key_file: key.is_file().then(|| key.to_string_lossy().into_owned()),
            },
        );
    }
    out
}

/// What firmware, TPM and the booted UKI say (`kairos-agent state get trusted_boot`).
#[derive(Debug, Clone, Serialize)]
pub struct TrustedBoot {
    pub secure_boot: Option<bool>,
    pub setup_mode: Option<bool>,
    /// The systemd-boot entry that booted.
    pub boot_entry: Option<String>,
    /// The signed UKI it booted (ESP path), when it booted one.
    pub uki: Option<String>,
    pub pcr7: Option<String>,
    /// PCR 11 against the UKI's prediction and signed policy.
    pub measured: Option<kairos_trust::measured::Assessment>,
    /// Why the UKI could not be assessed.
    pub error: Option<String>,
}

/// The trusted-boot view: `efi` from the firmware's variables, `pcr7`/`pcr11` from the TPM,
/// the booted UKI read from the ESP.
pub fn trusted_boot(
    esp: &std::path::Path,
    efi: &kairos_sys::efi::BootInfo,
    pcr7: Option<String>,
    pcr11: Option<String>,
) -> TrustedBoot {
    let mut t = TrustedBoot {
        secure_boot: efi.secure_boot,
        setup_mode: efi.setup_mode,
        boot_entry: efi.entry.clone(),
        uki: None,
        pcr7,
        measured: None,
        error: None,
    };
    let role = efi
        .entry
        .as_deref()
        .and_then(entries::parse_name)
        .map(|(r, _)| r);
    // Only a UKI where Kairos puts them is read: an entry file on the (unsigned) ESP naming
    // another path is not followed.
    let entry = role.and_then(|r| {
        entries::list(esp).ok()?.into_iter().find(|e| {
            e.role == r
                && crate::is_plain_id(&e.deployment)
                && e.efi == crate::esp_uki_path(&e.deployment)
        })
    });
    if let Some(e) = entry {
        let path = esp.join(e.efi.trim_start_matches('/'));
        t.uki = Some(e.efi.clone());
        match std::fs::read(&path) {
            Ok(bytes) => match kairos_trust::measured::assess(&bytes, pcr11.as_deref()) {
                Ok(a) => t.measured = Some(a),
                Err(err) => t.error = Some(format!("{}: {err}", path.display())),
            },
            Err(err) => t.error = Some(format!("{}: {err}", path.display())),
        }
    }
    t
}

pub fn gather(
    node: &Node,
    booted: &Booted,
    partitions: BTreeMap<String, String>,
) -> Result<State, Error> {
    let list = entries::list(&node.esp)?;
    let next = entries::boot_order(&list).first().map(|e| (*e).clone());
    let deployments = upgrade::deployments(&Store::new(&node.store))
        .into_iter()
        .map(|d| DeploymentInfo {
            roles: list
                .iter()
                .filter(|e| e.deployment == d.id)
                .map(|e| e.role)
                .collect(),
            id: d.id,
            image: d.image,
            manifest_digest: d.manifest_digest,
            version: d.version,
            created: d.created,
            layers: d.layers.into_iter().map(|l| l.digest.to_string()).collect(),
        })
        .collect();
    let hist = history::read(&node.store);
    let last_failure = hist
        .iter()
        .rev()
        .find(|r| r.action == "fell-back")
        .cloned()
        .or_else(|| history::failures(&node.store).pop());
    Ok(State {
        boot_mode: booted.mode.clone(),
        booted: booted.deployment.clone(),
        next_boot: next.as_ref().map(|e| e.deployment.clone()),
        next_role: next.map(|e| e.role),
        entries: list,
        deployments,
        staged: history::staged(&node.store),
        last_failure,
        partitions,
        history: hist,
        trusted_boot: None,
        encrypted: BTreeMap::new(),
        verified_layers: Vec::new(),
    })
}

/// The value at a dotted path (`entries.0.role`), as JSON.
pub fn get<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.')
        .filter(|p| !p.is_empty())
        .try_fold(v, |cur, key| match cur {
            serde_json::Value::Array(a) => a.get(key.parse::<usize>().ok()?),
            serde_json::Value::Object(o) => o.get(key),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dotted_paths() {
        let v = serde_json::json!({"a": {"b": [1, {"c": "x"}]}});
        assert_eq!(super::get(&v, "a.b.1.c"), Some(&serde_json::json!("x")));
        assert_eq!(super::get(&v, "a.b.7"), None);
        assert_eq!(super::get(&v, ""), Some(&v));
    }

    #[test]
    fn trusted_boot_reads_only_kairos_ukis() {
        let d = tempfile::tempdir().unwrap();
        let esp = d.path();
        std::fs::create_dir_all(esp.join("loader/entries")).unwrap();
        std::fs::create_dir_all(esp.join("kairos")).unwrap();
        let efi = kairos_sys::efi::BootInfo {
            secure_boot: Some(true),
            setup_mode: Some(false),
            entry: Some("active+2-1.conf".into()),
            stub_pcr: Some(11),
        };
        // An entry naming a path outside kairos/ is not followed.
        std::fs::write(
            esp.join("loader/entries/active.conf"),
            "title x\nefi /kairos/../../secret.efi\n",
        )
        .unwrap();
        let t = super::trusted_boot(esp, &efi, None, None);
        assert_eq!((t.uki, t.measured.is_none()), (None, true));
        assert_eq!(t.secure_boot, Some(true));
        // Kairos' own entry: read (here not a PE, which is said).
        std::fs::write(
            esp.join("loader/entries/active.conf"),
            crate::entries::render_uki(crate::entries::Role::Active, "d-1", "1"),
        )
        .unwrap();
        std::fs::write(esp.join("kairos/d-1.efi"), b"not a PE").unwrap();
        let t = super::trusted_boot(esp, &efi, None, None);
        assert_eq!(t.uki.as_deref(), Some("/kairos/d-1.efi"));
        assert!(t.error.unwrap().contains("d-1.efi"));
    }
}
