//! The hash tree and root hash agree with `veritysetup format --no-superblock --salt=-`
//! (cryptsetup, what the kernel's format is defined by) for trees of one to three levels.

use std::fs;
use std::process::Command;

use kairos_layers::verity::{self, BLOCK};

#[test]
fn tree_and_root_equal_veritysetup() {
    let d = tempfile::tempdir().unwrap();
    for blocks in [1u64, 2, 74, 128, 129, 128 * 128 + 3] {
        let data: Vec<u8> = (0..blocks * BLOCK)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let ours = d.path().join(format!("ours-{blocks}"));
        fs::write(&ours, &data).unwrap();
        let v = verity::append_tree(&ours).unwrap();
        let theirs = d.path().join(format!("theirs-{blocks}"));
        fs::write(&theirs, &data).unwrap();
        let out = Command::new("veritysetup")
            .args(["format", "--no-superblock", "--salt=-"])
            .arg(format!("--hash-offset={}", blocks * BLOCK))
            .arg(&theirs)
            .arg(&theirs)
            .output()
            .expect("veritysetup (cryptsetup-bin, installed by scripts/setup)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let root = text
            .lines()
            .find_map(|l| l.strip_prefix("Root hash:"))
            .map(str::trim)
            .expect("veritysetup prints the root hash");
        assert_eq!(v.root, root, "{blocks} blocks");
        assert!(
            fs::read(&ours).unwrap() == fs::read(&theirs).unwrap(),
            "{blocks} blocks: the trees differ"
        );
        assert_eq!(verity::read_tree(&ours, v.data_size).unwrap(), v);
    }
}

/// A layer found in a store without a manifest (an upgrade cut short after writing it) gets
/// the same description back from the file alone: the tree found where the EROFS superblock
/// says the filesystem ends.
#[test]
fn a_layer_is_described_again_from_its_file() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/hostname"), b"node\n").unwrap();
    fs::write(tree.join("big"), vec![7u8; 600_000]).unwrap();
    let store = kairos_layers::Store::new(d.path().join("store"));
    let digest = kairos_layers::Digest::of(b"layer");
    let path = store.layer_path(&digest);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let made = kairos_layers::make_erofs(
        &kairos_layers::mkfs_erofs_argv(std::path::Path::new("/")),
        &tree,
        &path,
        digest.as_str(),
    )
    .expect("mkfs.erofs (erofs-utils, installed by scripts/setup)");
    let found = store.layer(&digest).unwrap();
    assert_eq!(found.verity, Some(made.clone()));
    assert_eq!(found.pin(), made.root);
    assert_eq!(fs::metadata(&path).unwrap().len(), made.file_size());
    // An image without a tree (older stores) is described by its hash alone.
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(made.data_size)
        .unwrap();
    let plain = store.layer(&digest).unwrap();
    assert_eq!(plain.verity, None);
    assert_eq!(plain.pin(), plain.image.sha256);
}
