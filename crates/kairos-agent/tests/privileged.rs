//! Tier 2: behaviours that need root — chrooted `commands` and `if:` in a target root that has a
//! real shell, and stages applied to a real ext4 filesystem on a loop device.
//!
//! Ignored by default; `scripts/test` runs them as root with `-- --ignored`.

mod common;
use common::text;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kairos-agent"))
        .args(args)
        .output()
        .expect("run kairos-agent")
}

/// `run-stage boot` on `root` with an empty cmdline, plus `extra` flags.
fn run_boot(root: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run-stage",
        "boot",
        "--root",
        root.to_str().unwrap(),
        "--cmdline",
        "",
    ];
    args.extend_from_slice(extra);
    agent(&args)
}

/// A target root with busybox as its shell, like the `tiny` image flavour.
fn shell_root() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static (scripts/setup installs it)");
    fs::copy(busybox, bin.join("sh")).unwrap();
    fs::create_dir_all(d.path().join("etc")).unwrap();
    fs::write(
        d.path().join("etc/os-release"),
        "ID=debian\nPRETTY_NAME=\"Debian GNU/Linux 12\"\n",
    )
    .unwrap();
    fs::write(
        d.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
    )
    .unwrap();
    fs::write(d.path().join("etc/group"), "root:x:0:\n").unwrap();
    d
}

fn write(root: &Path, p: &str, s: &str) {
    let p = root.join(p.trim_start_matches('/'));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, s).unwrap();
}

#[test]
#[ignore = "needs root: run by scripts/test tier 2"]
fn commands_and_if_run_chrooted_in_the_target() {
    let d = shell_root();
    let root = d.path();
    write(
        root,
        "/oem/10.yaml",
        "#cloud-config\nruncmd:\n- touch /from-runcmd\nstages:\n  boot:\n  - name: templated\n    commands:\n    - echo {{ .Values.os.vendor }} > /vendor\n    - echo $(id -u) > /uid\n  - name: guarded-yes\n    if: '[ -e /from-runcmd ]'\n    commands: [touch /guard-yes]\n  - name: guarded-no\n    if: '[ -e /nothing ]'\n    commands: [touch /guard-no]\n  - name: failing\n    commands: ['echo boom; exit 7', 'touch /after-failure']\n",
    );
    let o = run_boot(root, &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(root.join("from-runcmd").exists(), "{t}");
    assert!(
        !Path::new("/from-runcmd").exists(),
        "runcmd escaped the root"
    );
    assert_eq!(fs::read_to_string(root.join("vendor")).unwrap(), "debian\n");
    assert_eq!(fs::read_to_string(root.join("uid")).unwrap(), "0\n");
    assert!(root.join("guard-yes").exists(), "{t}");
    assert!(!root.join("guard-no").exists(), "{t}");
    assert!(
        t.contains("skip  /oem/10.yaml.guarded-no (if: `[ -e /nothing ]` exited 1)"),
        "{t}"
    );
    assert!(
        t.contains("failed to run echo boom; exit 7: exit status 7: boom"),
        "{t}"
    );
    assert!(
        root.join("after-failure").exists(),
        "a failing command must not stop the next: {t}"
    );

    let strict = run_boot(root, &["--strict"]);
    assert_eq!(strict.status.code(), Some(1), "{}", text(&strict));
}

#[test]
#[ignore = "needs root: run by scripts/test tier 2"]
fn cmdline_stage_commands_run_after_files() {
    let d = shell_root();
    let root = d.path();
    write(
        root,
        "/oem/10.yaml",
        "stages:\n  boot:\n  - commands: ['echo file >> /order']\n",
    );
    let o = agent(&[
        "run-stage",
        "boot",
        "--root",
        root.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 'stages.boot[0].commands[0]=echo cmdline >> /order'",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        fs::read_to_string(root.join("order")).unwrap(),
        "file\ncmdline\n"
    );
}

struct Loop {
    image: PathBuf,
    mnt: PathBuf,
}

impl Loop {
    fn mount(&self, opts: &str) {
        let st = Command::new("mount")
            .args([
                "-o",
                opts,
                self.image.to_str().unwrap(),
                self.mnt.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(st.success(), "mount {opts}");
    }
    fn umount(&self) {
        let st = Command::new("umount").arg(&self.mnt).status().unwrap();
        assert!(st.success(), "umount");
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .args(["-a", &format!("{}/.", from.display()), to.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
#[ignore = "needs root: run by scripts/test tier 2"]
fn boot_stage_on_a_real_ext4_filesystem() {
    let work = tempfile::tempdir().unwrap();
    let lp = Loop {
        image: work.path().join("disk.img"),
        mnt: work.path().join("mnt"),
    };
    fs::create_dir_all(&lp.mnt).unwrap();
    fs::File::create(&lp.image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mk = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "COS_PERSISTENT",
            lp.image.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(mk.success());
    lp.mount("loop");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/node");
    copy_tree(&example, &lp.mnt);
    let o = run_boot(&lp.mnt, &["--strict"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    lp.umount();

    // The filesystem is consistent after the writes, and the effects survived the unmount.
    let fsck = Command::new("e2fsck")
        .args(["-fn", lp.image.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(fsck.status.success(), "e2fsck: {}", text(&fsck));
    lp.mount("loop,ro");
    let m = &lp.mnt;
    assert_eq!(
        fs::read_to_string(m.join("etc/hostname")).unwrap(),
        "edge-debian\n"
    );
    let motd = fs::metadata(m.join("etc/kairos/motd")).unwrap();
    assert_eq!(motd.permissions().mode() & 0o7777, 0o640);
    assert_eq!((motd.uid(), motd.gid()), (1000, 1002));
    assert!(
        fs::read_to_string(m.join("etc/passwd"))
            .unwrap()
            .contains("kairos:x:1000:1000:")
    );
    assert_eq!(
        fs::read_link(m.join("etc/systemd/system/multi-user.target.wants/node-exporter.service"))
            .unwrap(),
        Path::new("/usr/lib/systemd/system/node-exporter.service")
    );
    lp.umount();
    // Re-running on the remounted filesystem changes nothing (compared by e2fsck-clean image bytes
    // would be too strict: atime); compare the passwd/shadow lines instead.
    lp.mount("loop");
    let before = fs::read_to_string(m.join("etc/shadow")).unwrap();
    let o = run_boot(&lp.mnt, &["--strict"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        fs::read_to_string(m.join("etc/shadow")).unwrap(),
        before,
        "second run rehashed a password"
    );
}
