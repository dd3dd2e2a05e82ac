//! Garbage collection after a blessed boot: deployments no entry (or staged upgrade) uses go,
//! then the layer images, kernels and initrds no remaining deployment references, then the
//! ESP's kernels and initrds no entry points at.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use kairos_layers::Store;
use serde::Serialize;

use crate::entries::{self, Role};
use crate::{Error, Node, history, io_err, upgrade};

#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub deployments: Vec<String>,
    pub files: Vec<String>,
    pub bytes: u64,
}

/// Collects the STATE store of `node` and its ESP.
pub fn collect(node: &Node) -> Result<Report, Error> {
    let store = Store::new(&node.store);
    let list = entries::list(&node.esp)?;
    let mut keep: BTreeSet<String> = list
        .iter()
        .filter(|e| e.role != Role::Recovery)
        .map(|e| e.deployment.clone())
        .collect();
    if let Some(s) = history::staged(&node.store) {
        keep.insert(s.deployment);
    }
    if keep.is_empty() {
        // No entries found (wrong ESP?): deleting everything would be the wrong answer.
        return Err(Error::Node(format!(
            "{}: no boot entries; refusing to collect",
            node.esp.display()
        )));
    }
    let mut report = Report::default();
    let mut used: BTreeSet<String> = BTreeSet::new();
    for d in upgrade::deployments(&store) {
        if keep.contains(&d.id) {
            used.extend(d.layers.iter().map(|l| l.image.file.clone()));
            used.extend(d.kernel.iter().chain(&d.initrd).map(|b| b.file.clone()));
        } else {
            remove(&store.deployment_path(&d.id), &mut report)?;
            report.deployments.push(d.id);
        }
    }
    for sub in ["layers", "boot"] {
        for e in fs::read_dir(node.store.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            let rel = format!("{sub}/{}", e.file_name().to_string_lossy());
            if !used.contains(&rel) {
                remove(&e.path(), &mut report)?;
            }
        }
    }
    let on_esp: BTreeSet<String> = list
        .iter()
        .flat_map(|e| [e.linux.clone(), e.initrd.clone(), e.efi.clone()])
        .filter(|p| !p.is_empty())
        .map(|p| p.trim_start_matches('/').to_string())
        .collect();
    for e in fs::read_dir(node.esp.join("kairos"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let rel = format!("kairos/{}", e.file_name().to_string_lossy());
        if !on_esp.contains(&rel) && e.path().is_file() {
            remove(&e.path(), &mut report)?;
        }
    }
    Ok(report)
}

fn remove(p: &Path, report: &mut Report) -> Result<(), Error> {
    report.bytes += fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    fs::remove_file(p).map_err(io_err(p))?;
    report.files.push(p.to_string_lossy().into_owned());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_layers::{Blob, Deployment, Layer};

    fn blob(store: &Path, file: &str) -> Blob {
        let p = store.join(file);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, file).unwrap();
        Blob {
            file: file.into(),
            size: file.len() as u64,
            sha256: "00".repeat(32),
        }
    }

    #[test]
    fn keeps_what_entries_use_and_removes_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let node = Node {
            store: d.path().join("state"),
            esp: d.path().join("esp"),
            oem: None,
            scratch: d.path().join("scratch"),
            tools_root: "/".into(),
        };
        let store = Store::new(&node.store);
        let dep = |id: &str, layers: &[&str]| Deployment {
            id: id.into(),
            image: format!("img:{id}"),
            manifest_digest: format!("sha256:{id}"),
            version: String::new(),
            created: String::new(),
            layers: layers
                .iter()
                .map(|l| Layer {
                    digest: kairos_layers::Digest::of(l.as_bytes()),
                    image: blob(&node.store, &format!("layers/sha256-{l}.erofs")),
                    verity: None,
                })
                .collect(),
            kernel: Some(blob(&node.store, "boot/sha256-k")),
            initrd: Some(blob(&node.store, "boot/sha256-i")),
            cmdline: String::new(),
            uki: None,
        };
        let old = dep("d-old", &["a", "b"]);
        let new = dep("d-new", &["a", "c"]);
        store.write_deployment(&old).unwrap();
        store.write_deployment(&new).unwrap();
        entries::set(
            &node.esp,
            Role::Active,
            &crate::upgrade::entry_for(Role::Active, &new).unwrap(),
            None,
        )
        .unwrap();
        fs::create_dir_all(node.esp.join("kairos")).unwrap();
        fs::write(node.esp.join("kairos/vmlinuz-stale"), "x").unwrap();
        let linux = crate::esp_boot_path("vmlinuz", &"00".repeat(32));
        fs::write(node.esp.join(linux.trim_start_matches('/')), "k").unwrap();

        let r = collect(&node).unwrap();
        assert_eq!(r.deployments, ["d-old"]);
        assert!(!node.store.join("layers/sha256-b.erofs").exists());
        assert!(node.store.join("layers/sha256-a.erofs").exists());
        assert!(node.store.join("layers/sha256-c.erofs").exists());
        assert!(node.store.join("boot/sha256-k").exists());
        assert!(!node.esp.join("kairos/vmlinuz-stale").exists());
        assert!(node.esp.join(linux.trim_start_matches('/')).exists());
        // Without entries nothing is collected at all.
        entries::clear(&node.esp, Role::Active).unwrap();
        assert!(collect(&node).is_err());
        assert!(node.store.join("layers/sha256-a.erofs").exists());
    }
}
