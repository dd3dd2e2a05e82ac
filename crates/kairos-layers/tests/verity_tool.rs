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
