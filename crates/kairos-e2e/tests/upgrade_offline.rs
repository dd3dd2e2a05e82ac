//! Tier 3 without a VM: `kairos-agent upgrade`, `rollback` and `state` against a disk built by
//! `kairosctl build raw`, attached to a loop device with STATE and the ESP mounted — the same
//! code a node runs, checked file by file. Needs root (loop devices); run with `--ignored`.

use std::path::Path;

use kairos_e2e::{
    MountGuard, agent, build_raw, esp_tree, image_with_files, incompressible, start_registry,
    tiny_in_registry,
};

fn entries(esp: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(esp.join("loader/entries"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let text = std::fs::read_to_string(e.path()).unwrap();
            let dep = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("kairos.deployment="))
                .unwrap_or_default()
                .to_string();
            (e.file_name().to_string_lossy().into_owned(), dep)
        })
        .collect();
    v.sort();
    v
}

fn events(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A disk built from `v1` with STATE mounted and the ESP copied out (the host has no FAT
/// driver: the same file operations on a tree), and `kairos-agent` run against them as the
/// running v1 would.
struct Offline {
    state: MountGuard,
    recovery: MountGuard,
    esp: std::path::PathBuf,
    scratch: std::path::PathBuf,
    v1_id: String,
    _work: tempfile::TempDir,
}

impl Offline {
    fn new(v1: &str) -> Offline {
        let work = tempfile::tempdir().unwrap();
        let disk = work.path().join("disk.raw");
        build_raw(v1, "#cloud-config\n", &disk).unwrap();
        let state = MountGuard::partition(&disk, 4, &work.path().join("state"), "ext4").unwrap();
        let recovery =
            MountGuard::partition(&disk, 3, &work.path().join("recovery"), "ext4").unwrap();
        let esp = work.path().join("esp");
        esp_tree(&disk, &esp).unwrap();
        let v1_id = entries(&esp)[0].1.clone();
        Offline {
            state,
            recovery,
            scratch: work.path().join("scratch"),
            esp,
            v1_id,
            _work: work,
        }
    }

    fn agent(&self, args: &[&str]) -> (i32, String, String) {
        self.agent_on(&self.state.path, args)
    }

    /// With another store given as `--store` (COS_RECOVERY for `upgrade --recovery`).
    fn agent_on(&self, store: &Path, args: &[&str]) -> (i32, String, String) {
        let booted = format!("kairos.deployment={} kairos.mode=active", self.v1_id);
        let (store, esp, scratch) = (
            store.to_string_lossy(),
            self.esp.to_string_lossy(),
            self.scratch.to_string_lossy(),
        );
        let mut a: Vec<&str> = vec!["--cmdline", &booted];
        a.extend_from_slice(args);
        a.extend(["--store", &store, "--esp", &esp, "--scratch", &scratch]);
        agent(&a).unwrap()
    }
}

#[test]
#[ignore = "needs root and the tiny image: run by scripts/test tier 3"]
fn upgrade_fetches_only_the_changed_layer_and_rollback_swaps_entries() {
    let reg = start_registry().unwrap();
    let v1 = tiny_in_registry(&reg).unwrap();
    let v2 = image_with_files(
        &v1,
        &[
            ("etc/kairos-e2e-version", b"v2\n"),
            ("usr/share/v2/blob", &incompressible(300 << 10, 2)),
        ],
        &format!("{}/kairos/tiny:v2", reg.addr),
    )
    .unwrap();
    let node = Offline::new(&v1);
    let (state, esp) = (&node.state, &node.esp);
    let before = entries(esp);
    assert_eq!(before.len(), 3, "{before:?}");
    let v1_id = node.v1_id.clone();
    let run = |args: &[&str]| node.agent(args);

    // A tag that does not exist: a clear error, nothing changed.
    let (code, _, err) = run(&[
        "upgrade",
        "--source",
        &format!("{}/kairos/tiny:nope", reg.addr),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("no such image or tag"), "{err}");
    assert_eq!(entries(esp), before);

    // v1 → v2: one layer fetched and written, the rest reused; v2 boots next with 3 tries.
    // The user's --scratch directory keeps its files: the agent works in a subdirectory.
    std::fs::create_dir_all(&node.scratch).unwrap();
    std::fs::write(node.scratch.join("keep.txt"), "mine").unwrap();
    let (code, out, err) = run(&["upgrade", "--source", &v2, "--json"]);
    assert_eq!(code, 0, "{err}");
    let left: Vec<_> = std::fs::read_dir(&node.scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("keep.txt")],
        "scratch left as it was"
    );
    let ev = events(&out);
    let resolved = ev.iter().find(|e| e["event"] == "resolved").unwrap();
    assert_eq!(resolved["missing"], 1, "{out}");
    let written: Vec<_> = ev
        .iter()
        .filter(|e| e["event"] == "layer-ready" && e["reused"] == false)
        .collect();
    assert_eq!(written.len(), 1, "{out}");
    let fetched: std::collections::BTreeSet<_> = ev
        .iter()
        .filter(|e| e["event"] == "download")
        .map(|e| e["digest"].as_str().unwrap().to_string())
        .collect();
    // The config blob and the one new layer; no base layer.
    assert_eq!(fetched.len(), 2, "{fetched:?}");
    let v2_id = ev.iter().find(|e| e["event"] == "activated").unwrap()["deployment"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(v2_id, v1_id);
    assert_eq!(
        entries(esp),
        vec![
            ("active+3.conf".to_string(), v2_id.clone()),
            ("autoreset.conf".to_string(), v1_id.clone()),
            ("passive.conf".to_string(), v1_id.clone()),
            ("recovery.conf".to_string(), v1_id.clone()),
        ]
    );
    // Same kernel and initrd: nothing new on the ESP.
    assert_eq!(std::fs::read_dir(esp.join("kairos")).unwrap().count(), 2);
    assert!(
        state
            .path
            .join(format!("deployments/{v2_id}.json"))
            .is_file()
    );

    // Again: nothing to fetch, entries unchanged.
    let (code, out, _) = run(&["upgrade", "--source", &v2, "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"missing\":0"), "{out}");

    // state says what boots next.
    let (code, out, err) = run(&["state", "get", "next_boot"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), v2_id);

    // Rollback: v1 boots next (blessed), v2 is the fallback.
    let (code, _, err) = run(&["rollback"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        entries(esp),
        vec![
            ("active.conf".to_string(), v1_id.clone()),
            ("autoreset.conf".to_string(), v1_id.clone()),
            ("passive.conf".to_string(), v2_id.clone()),
            ("recovery.conf".to_string(), v1_id.clone()),
        ]
    );
    let (_, out, _) = run(&["state", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["next_boot"], v1_id.as_str());
    let actions: Vec<&str> = st["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions.first(), Some(&"installed"), "{actions:?}");
    assert!(actions.ends_with(&["rollback"]), "{actions:?}");

    // --download-only stages without switching; --apply switches.
    let (code, _, err) = run(&["upgrade", "--source", &v2, "--download-only"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(entries(esp)[0], ("active.conf".to_string(), v1_id.clone()));
    let (_, out, _) = run(&["state", "get", "staged.deployment"]);
    assert_eq!(out.trim(), v2_id);
    let (code, _, err) = run(&["upgrade", "--apply"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        entries(esp)[0],
        ("active+3.conf".to_string(), v2_id.clone())
    );

    // --recovery: v2 into COS_RECOVERY's own store, the recovery entry replaced (no tries:
    // recovery is the last resort and is not assessed).
    let (code, _, err) = node.agent_on(
        &node.recovery.path,
        &["upgrade", "--recovery", "--source", &v2],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        node.recovery
            .path
            .join(format!("deployments/{v2_id}.json"))
            .is_file()
    );
    for role in ["recovery.conf", "autoreset.conf"] {
        assert!(
            entries(esp).contains(&(role.to_string(), v2_id.clone())),
            "{role}: {:?}",
            entries(esp)
        );
    }

    // An oci-layout source is read, never modified (its blobs were deleted once).
    let layout = node._work.path().join("layout");
    let v3 = image_with_files(
        &v2,
        &[("etc/kairos-e2e-version", b"v3\n")],
        &format!("oci-layout:{}:v3", layout.display()),
    )
    .unwrap();
    let before = snapshot(&layout);
    let (code, _, err) = run(&["upgrade", "--source", &v3]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(snapshot(&layout), before, "the layout changed");
}

/// STATE's files with sizes, and the ESP's entries with their deployments.
type NodeFiles = (Vec<(String, u64)>, Vec<(String, String)>);

/// Every file under `dir` with its size (what "the node unchanged" means for STATE).
fn snapshot(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" || rel == "filler" {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else {
                out.push((rel, md.len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
#[ignore = "needs root and the tiny image: run by scripts/test tier 3"]
fn bad_blob_full_store_and_dead_registry_leave_the_node_unchanged() {
    let reg = start_registry().unwrap();
    let v1 = tiny_in_registry(&reg).unwrap();
    let v2 = image_with_files(
        &v1,
        &[("usr/share/v2/blob", &incompressible(8 << 20, 3))],
        &format!("{}/kairos/tiny:v2", reg.addr),
    )
    .unwrap();
    let node = Offline::new(&v1);
    let (state, esp_dir) = (&node.state, &node.esp);
    let upgrade = |source: &str| node.agent(&["upgrade", "--source", source]);
    let unchanged = |what: &str, before: &NodeFiles| {
        assert_eq!(
            &(snapshot(&state.path), entries(esp_dir)),
            before,
            "{what}: the node changed"
        );
    };
    let before = (snapshot(&state.path), entries(esp_dir));

    // A full STATE: the layer image cannot be written; nothing half-written stays.
    // Free blocks including the ones reserved for root (the agent runs as root).
    let free = {
        let o = std::process::Command::new("stat")
            .args(["-f", "-c", "%f %S"])
            .arg(&state.path)
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&o.stdout).into_owned();
        let mut it = t.split_whitespace().map(|v| v.parse::<u64>().unwrap());
        it.next().unwrap() * it.next().unwrap()
    };
    let filler = state.path.join("filler");
    // ext4 keeps some clusters back even from root: take as much as it gives, leaving less
    // than the 8 MiB layer image needs.
    let filled = (5..40u64).any(|slack_mib| {
        std::process::Command::new("fallocate")
            .args(["-l", &(free - (slack_mib << 20)).to_string()])
            .arg(&filler)
            .status()
            .unwrap()
            .success()
    });
    assert!(filled, "could not fill STATE");
    let (code, _, err) = upgrade(&v2);
    assert_ne!(code, 0);
    // Either the space check before downloading says so, or writing the image fails.
    assert!(
        (err.contains("needs") && err.contains("MiB on the layer store"))
            || err.contains("No space left")
            || err.contains("mkfs.erofs"),
        "{err}"
    );
    unchanged("full STATE", &before);
    std::fs::remove_file(&filler).unwrap();

    // The new layer's bytes in the registry do not match its digest: refused. It is the one
    // blob of just over 8 MiB (incompressible content).
    let new_layer = std::fs::read_dir(reg.storage.join("docker/registry/v2/blobs/sha256"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|d| d.path().join("data"))
        .find(|p| {
            let n = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            n > (8 << 20) && n < (8 << 20) + (64 << 10)
        })
        .expect("the v2 layer blob in the registry");
    std::fs::write(&new_layer, incompressible(8 << 20, 9)).unwrap();
    let (code, _, err) = upgrade(&v2);
    assert_ne!(code, 0);
    assert!(err.contains("does not match its digest"), "{err}");
    unchanged("tampered blob", &before);

    // The registry is down.
    drop(reg);
    let (code, _, err) = upgrade(&v2);
    assert_ne!(code, 0);
    assert!(err.contains("is the registry running"), "{err}");
    unchanged("registry down", &before);
}

#[test]
#[ignore = "needs root and the tiny image: run by scripts/test tier 3"]
fn a_compression_bomb_stops_at_the_scratch_space() {
    let reg = start_registry().unwrap();
    let v1 = tiny_in_registry(&reg).unwrap();
    // 256 MiB of zeros: a layer of a few hundred KiB once gzipped.
    let zeros = vec![0u8; 256 << 20];
    let v2 = image_with_files(
        &v1,
        &[("usr/share/bomb", &zeros)],
        &format!("{}/kairos/tiny:bomb", reg.addr),
    )
    .unwrap();
    drop(zeros);
    let node = Offline::new(&v1);
    // The scratch space is a 64 MiB tmpfs (as /run is on a small node).
    std::fs::create_dir_all(&node.scratch).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&node.scratch)
        .status()
        .unwrap();
    assert!(st.success());
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&node.scratch);
    let before = (snapshot(&node.state.path), entries(&node.esp));
    let (code, _, err) = node.agent(&["upgrade", "--source", &v2]);
    assert_ne!(code, 0);
    assert!(err.contains("unpacks to more than"), "{err}");
    assert_eq!(
        (snapshot(&node.state.path), entries(&node.esp)),
        before,
        "the node changed"
    );
    let left: Vec<_> = std::fs::read_dir(&node.scratch).unwrap().collect();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
}
