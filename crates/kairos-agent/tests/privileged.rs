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

/// A loop device over an image file (with partition scanning), detached when dropped.
struct LoopDisk(String);

impl LoopDisk {
    fn attach(image: &Path, extra: &[&str]) -> LoopDisk {
        let o = Command::new("losetup")
            .args(extra)
            .args(["--show", "-f"])
            .arg(image)
            .output()
            .expect("losetup (util-linux)");
        assert!(o.status.success(), "losetup: {}", text(&o));
        LoopDisk(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(o.status.success(), "{cmd}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
#[ignore = "needs root: run by scripts/test tier 2"]
fn layout_adds_partitions_by_label_and_grows_the_last_with_its_filesystem() {
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("disk.img");
    fs::File::create(&img).unwrap().set_len(300 << 20).unwrap();
    sh(&format!(
        "echo 'label: gpt\nstart=2048, size=64MiB, name=\"lt-oem\"' | sfdisk --quiet {}",
        img.display()
    ));
    let disk = LoopDisk::attach(&img, &["-P"]);
    let d = &disk.0;
    // This host's kernel has no GPT parser: partitions reach it by BLKPG, as layout does.
    sh(&format!("partx -a {d} 2>/dev/null || true; test -b {d}p1"));
    sh(&format!("mkfs.ext4 -q -F -L LAYOUT_T1 {d}p1"));
    let root = shell_root();
    let stage = |body: &str| {
        write(
            root.path(),
            "/oem/00_layout.yaml",
            &format!("stages:\n  boot:\n  - layout:\n      device: {{label: LAYOUT_T1}}\n{body}"),
        )
    };
    stage(
        "      add_partitions:\n      - {fsLabel: LAYOUT_RAW, size: 40, pLabel: raw, filesystem: none}\n      - {fsLabel: LAYOUT_D1, size: 64, pLabel: data, filesystem: ext4}\n      expand_partition: {size: 0}\n",
    );
    for run in 0..2 {
        let o = run_boot(root.path(), &["--strict"]);
        assert_eq!(o.status.code(), Some(0), "run {run}: {}", text(&o));
        let dump = sh(&format!("sfdisk --dump {d}"));
        assert_eq!(
            dump.matches("name=").count(),
            3,
            "run {run} (idempotent): {dump}"
        );
        assert!(
            dump.contains("name=\"raw\"") && dump.contains("name=\"data\""),
            "{dump}"
        );
        assert_eq!(
            sh(&format!("blkid -o value -s LABEL {d}p3")).trim(),
            "LAYOUT_D1"
        );
        assert_eq!(
            sh(&format!("blkid -o value -s LABEL {d}p2")).trim(),
            "",
            "none: not formatted"
        );
        // The last partition reaches the end of the disk, and ext4 fills it.
        let part = sh(&format!("blockdev --getsize64 {d}p3"))
            .trim()
            .parse::<u64>()
            .unwrap();
        assert!(part > 180 << 20, "grown to the end: {part}");
        let fs_bytes = sh(&format!(
            "dumpe2fs -h {d}p3 2>/dev/null | awk -F: '/^Block count/ {{c=$2}} /^Block size/ {{s=$2}} END {{print c*s}}'"
        ))
        .trim()
        .parse::<u64>()
        .unwrap();
        assert_eq!(
            fs_bytes, part,
            "the filesystem was grown with its partition"
        );
    }
    // Too big for the free space, and a shrink: refused, each named.
    stage(
        "      add_partitions:\n      - {fsLabel: LAYOUT_BIG, size: 1025}\n      expand_partition: {size: 10}\n",
    );
    let o = run_boot(root.path(), &[]);
    let t = text(&o);
    assert!(
        t.contains("only 0 MiB free") || t.contains("MiB asked for"),
        "{t}"
    );
    assert!(t.contains("shrinking it to 10 MiB is refused"), "{t}");
    assert_eq!(
        sh(&format!("sfdisk --dump {d}")).matches("name=").count(),
        3
    );

    // A blank disk by path: init_disk writes a GPT, then a partition takes the rest.
    let blank = work.path().join("blank.img");
    fs::File::create(&blank)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let disk = LoopDisk::attach(&blank, &["-P"]);
    let b = &disk.0;
    write(
        root.path(),
        "/oem/00_layout.yaml",
        &format!(
            "stages:\n  boot:\n  - layout:\n      device: {{path: {b}, init_disk: true}}\n      add_partitions:\n      - {{fsLabel: LAYOUT_N1, size: 0, filesystem: ext4}}\n"
        ),
    );
    let o = run_boot(root.path(), &["--strict"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let dump = sh(&format!("sfdisk --dump {b}"));
    assert!(
        dump.contains("label: gpt") && dump.matches("name=").count() == 1,
        "{dump}"
    );
    assert_eq!(
        sh(&format!("blkid -o value -s LABEL {b}p1")).trim(),
        "LAYOUT_N1"
    );
}

#[test]
#[ignore = "needs root: run by scripts/test tier 2"]
fn datasource_reads_cidata_and_config_drive_media() {
    let work = tempfile::tempdir().unwrap();
    let make = |label: &str, files: &[(&str, &str)]| {
        let src = work.path().join(label);
        for (p, c) in files {
            write(&src, p, c);
        }
        let iso = work.path().join(format!("{label}.iso"));
        sh(&format!(
            "xorriso -as mkisofs -quiet -V {label} -J -r -o {} {} 2>/dev/null",
            iso.display(),
            src.display()
        ));
        iso
    };
    let cidata = make(
        "cidata",
        &[
            ("user-data", "#cloud-config\nhostname: from-cidata\n"),
            (
                "meta-data",
                "instance-id: i-1\nlocal-hostname: meta-cidata\n",
            ),
        ],
    );
    let drive = make(
        "config-2",
        &[
            (
                "openstack/latest/user_data",
                "#cloud-config\nhostname: from-config-drive\n",
            ),
            (
                "openstack/latest/meta_data.json",
                "{\"hostname\": \"meta-cd\", \"public_keys\": {\"k\": \"ssh-ed25519 AAAAcd k\"}}",
            ),
        ],
    );
    let _a = LoopDisk::attach(&cidata, &["-r"]);
    let _b = LoopDisk::attach(&drive, &["-r"]);
    for (provider, ud, host) in [
        ("cdrom", "from-cidata", "meta-cidata"),
        ("config-drive", "from-config-drive", "meta-cd"),
    ] {
        let root = shell_root();
        write(
            root.path(),
            "/oem/00_datasource.yaml",
            &format!(
                "stages:\n  boot:\n  - datasource:\n      providers: [{provider}, aws]\n      path: /oem/95_userdata\n"
            ),
        );
        let o = run_boot(root.path(), &["--strict"]);
        assert_eq!(o.status.code(), Some(0), "{provider}: {}", text(&o));
        let got = fs::read_to_string(root.path().join("oem/95_userdata/userdata.yaml")).unwrap();
        assert_eq!(got, format!("#cloud-config\nhostname: {ud}\n"));
        assert_eq!(
            fs::read_to_string(root.path().join("etc/hostname")).unwrap(),
            format!("{host}\n")
        );
    }
}

#[test]
#[ignore = "needs root: run by scripts/test tier 2"]
fn unpack_images_stops_a_compression_bomb_at_the_target_space() {
    let work = tempfile::tempdir().unwrap();
    // A layer of 96 MiB of zeros: a few hundred KiB compressed.
    let tree = work.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("zeros"), vec![0u8; 96 << 20]).unwrap();
    let blobs = work.path().join("blobs");
    let img = kairos_oci::import_dir(&tree, &blobs, &[]).unwrap();
    let layout = work.path().join("layout");
    kairos_oci::store::write_layout(&img, &layout, "bomb").unwrap();
    let root = shell_root();
    let small = root.path().join("opt/small");
    fs::create_dir_all(&small).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=48m tmpfs {}",
        small.display()
    ));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    write(
        root.path(),
        "/oem/00_unpack.yaml",
        &format!(
            "stages:\n  boot:\n  - unpack_images:\n    - source: oci-layout:{}:bomb\n      target: /opt/small/pkg\n",
            layout.display()
        ),
    );
    let o = run_boot(root.path(), &[]);
    let t = text(&o);
    assert!(t.contains("unpacks to more than"), "{t}");
    assert!(
        !small.join("pkg").exists(),
        "the target it made is removed: {t}"
    );
    let used = sh(&format!(
        "df --output=used -B1M {} | tail -1",
        small.display()
    ));
    assert!(
        used.trim().parse::<u64>().unwrap() < 2,
        "tmpfs left empty: {used}"
    );
}

/// The LUKS2 steps immucore takes on a first boot, against this host's real cryptsetup on a
/// loop device (the TPM enrollment is the VM test's): format with a random key, add a
/// recovery key, remove the first key, mark finished — label and subsystem as the initrd
/// reads them at each step — and `erase`. Opening and the filesystem inside need
/// device-mapper, which this host's kernel may lack (then the VM test covers them).
#[test]
#[ignore = "needs root: run by scripts/test tier 2"]
fn luks_volume_set_up_as_the_initrd_does() {
    use kairos_sys::luks;
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("vol.img");
    fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let disk = LoopDisk::attach(&img, &[]);
    let dev = Path::new(&disk.0);
    let tools = luks::Tools { root: "/".into() };
    assert!(tools.missing().is_empty(), "{:?}", tools.missing());
    let name = format!("KAIROS_T{}", std::process::id());
    let key = luks::random_key().unwrap();
    tools.format(dev, &name, &key).unwrap();
    let v = luks::read(dev).unwrap().expect("a LUKS volume");
    assert_eq!(v.header.label.as_deref(), Some(name.as_str()));
    assert!(!v.finished(), "unfinished until its filesystem is made");
    assert_eq!(
        kairos_sys::blockdev::probe(dev).map(|p| p.fstype),
        Some(kairos_sys::blockdev::LUKS)
    );
    let recovery = luks::random_key().unwrap();
    tools.add_key(dev, &key, &recovery).unwrap();
    tools.remove_key(dev, &key).unwrap();
    assert!(
        !tools.key_opens(dev, &key).unwrap(),
        "the first key is gone"
    );
    assert!(
        tools.key_opens(dev, &recovery).unwrap(),
        "the recovery key opens it"
    );
    if Path::new("/sys/module/dm_mod").exists() {
        tools.open_passphrase(dev, &name, &recovery).unwrap();
        struct Close(String);
        impl Drop for Close {
            fn drop(&mut self) {
                let _ = Command::new("cryptsetup").args(["close", &self.0]).status();
            }
        }
        let _close = Close(name.clone());
        let mapped = kairos_sys::dm::mapped_device(&name).expect("the opened volume in /sys/block");
        tools.mkfs_ext4(&mapped, &name).unwrap();
        assert_eq!(
            kairos_sys::blockdev::label_of(&mapped).as_deref(),
            Some(name.as_str()),
            "the filesystem inside carries the label"
        );
    } else {
        eprintln!("no device-mapper in this kernel: opening is covered by tests/encrypted.rs");
    }
    tools.finish(dev, &name).unwrap();
    let v = luks::read(dev).unwrap().unwrap();
    assert!(v.finished());
    assert_eq!(
        v.header.label.as_deref(),
        Some(name.as_str()),
        "the label survives `cryptsetup config`"
    );
    luks::erase(dev).unwrap();
    assert!(luks::read(dev).unwrap().is_none(), "erased");
}

/// immucore's first-boot encryption on a node without a TPM: refused before anything is
/// changed — the partition stays plain ext4 with its content (fail closed, lose nothing).
#[test]
#[ignore = "needs root: run by scripts/test tier 2"]
fn encryption_without_a_tpm_changes_nothing() {
    use kairos_immucore::{crypt, plan::CryptAction};
    if Path::new("/dev/tpmrm0").exists() || Path::new("/dev/tpm0").exists() {
        eprintln!("skipped: this host has a TPM");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("part.img");
    fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
    let disk = LoopDisk::attach(&img, &[]);
    let label = format!("KAIROS_N{}", std::process::id());
    sh(&format!("mkfs.ext4 -q -F -L {label} {}", disk.0));
    let mnt = work.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "mount {} {} && echo kept > {}/file && umount {}",
        disk.0,
        mnt.display(),
        mnt.display(),
        mnt.display()
    ));
    let tools = kairos_sys::luks::Tools { root: "/".into() };
    let err = crypt::apply(
        &tools,
        &label,
        Path::new(&disk.0),
        CryptAction::Encrypt,
        None,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("has no TPM: nothing was changed"),
        "the refusal says why: {msg}"
    );
    let p = kairos_sys::blockdev::probe(Path::new(&disk.0)).unwrap();
    assert_eq!(
        (p.fstype, p.label.as_deref()),
        ("ext4", Some(label.as_str()))
    );
    sh(&format!("mount -o ro {} {}", disk.0, mnt.display()));
    let content = fs::read_to_string(mnt.join("file"));
    sh(&format!("umount {}", mnt.display()));
    assert_eq!(content.unwrap(), "kept\n", "the content is untouched");
}
