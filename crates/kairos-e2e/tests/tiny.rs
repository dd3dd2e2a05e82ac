//! Tier 3: the `tiny` flavour (busybox init, Debian kernel) built into a raw disk by kairosctl
//! and booted in QEMU under OVMF + systemd-boot. Run by `scripts/test` with `--ignored`.

use std::process::Command;
use std::time::Duration;

use kairos_e2e::{
    Vm, build_raw, check, check_active_immutable, check_missing_layer_failure,
    check_persistence_probes, check_persistent_grown, check_recovery_boot, enlarge_disk,
    start_registry, tiny_in_registry, write_persistence_probes,
};

// Forms real Kairos configs use: a list key left empty (null), a cloud-init key Kairos does
// not act on (`sudo`), a bundle's block. None may cost the users or the hostname.
const CLOUD_CONFIG: &str = "#cloud-config
users:
- name: kairos
  passwd: kairos
  sudo: ALL=(ALL) NOPASSWD:ALL
  ssh_authorized_keys:
  # - github:me
- name: root
  passwd: rootpw
hostname: tiny-node
write_files:
- path: /etc/motd
  content: \"hello from oem\\n\"
  permissions: \"0640\"
runcmd:
- touch /run/boot-stage-ran
- hostname > /run/hostname-at-boot
metallb:
  version: 0.13.7
";

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn tiny_boots_applies_oem_config_keeps_persistent_and_boots_recovery() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    // From the registry, as a user would: import → push → kairosify → build raw → boot.
    let reg = start_registry().unwrap();
    let image = tiny_in_registry(&reg).unwrap();
    build_raw(&image, CLOUD_CONFIG, &disk).unwrap();
    drop(reg);
    // Written to a bigger disk: COS_PERSISTENT must grow to fill it on first boot.
    enlarge_disk(&disk, 512).unwrap();

    // First boot: active, overlay root, OEM config applied.
    let mut vm = Vm::boot(&disk, &work.path().join("boot1.log")).unwrap();
    // The OEM user logs in. Its session cannot write the harness channel (ttyS1 is
    // root's), and the console carries boot messages (the boot-assessment verdict came in
    // the middle of a command's output once): it only leaves a file, read back as root.
    vm.login("kairos", "kairos").unwrap();
    vm.send("id -un > ~/who; exit").unwrap();
    vm.login("root", "rootpw").unwrap();
    check(
        &vm.sh("cat /home/kairos/who").unwrap(),
        "kairos\n[exit 0]",
        "the OEM user logs in",
    );
    check_active_immutable(&mut vm).unwrap();
    check(
        &vm.sh("hostname").unwrap(),
        "tiny-node\n[exit 0]",
        "hostname from OEM",
    );
    check(
        &vm.sh("stat -c '%a %s' /etc/motd").unwrap(),
        "640 15\n[exit 0]",
        "write_files mode and size",
    );
    // busybox init never reads /etc/hostname: the kernel's name was set in the initramfs.
    check(
        &vm.sh("cat /run/hostname-at-boot").unwrap(),
        "tiny-node\n[exit 0]",
        "kernel hostname seen by a boot-stage command",
    );
    check(
        &vm.sh("ls /run/boot-stage-ran").unwrap(),
        "[exit 0]",
        "runcmd ran in the boot stage",
    );
    check(
        &vm.sh("cat /run/kairos/boot-timeline.json").unwrap(),
        "\"total_ms\"",
        "boot timeline",
    );
    check_persistent_grown(&mut vm, 500).unwrap();
    write_persistence_probes(&mut vm).unwrap();
    vm.send("reboot").unwrap();
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    drop(vm);

    // Second boot: ephemeral /etc/foo is gone, persistent paths kept their files.
    let mut vm = Vm::boot(&disk, &work.path().join("boot2.log")).unwrap();
    vm.login("root", "rootpw").unwrap();
    check_persistence_probes(&mut vm).unwrap();
    vm.send("poweroff").unwrap();
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    drop(vm);

    // Recovery entry: make it the default on the ESP and boot it.
    check_recovery_boot(&disk, &work.path().join("boot3.log"), "rootpw").unwrap();
}

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn missing_layer_image_gives_a_failure_summary_not_a_hang() {
    let work = tempfile::tempdir().unwrap();
    check_missing_layer_failure(&kairos_e2e::tiny_rootfs(), CLOUD_CONFIG, work.path()).unwrap();
}

#[test]
#[ignore = "needs the static binaries and the tiny image: run by scripts/test tier 3"]
fn qcow2_output_and_clear_errors() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("disk.qcow2");
    let image = format!("dir:{}", kairos_e2e::tiny_rootfs().display());
    build_raw(&image, CLOUD_CONFIG, &out).unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&out)
        .output()
        .unwrap();
    check(
        &String::from_utf8_lossy(&info.stdout),
        "\"format\": \"qcow2\"",
        "qcow2 output",
    );
    assert!(!work.path().join("disk.raw.tmp").exists(), "no leftovers");

    // Too small a disk: refused, nothing left at the output path.
    let small = work.path().join("small.raw");
    let o = Command::new(kairos_e2e::bin("kairosctl"))
        .args([
            "build", "raw", "--image", &image, "--size", "100", "--output",
        ])
        .arg(&small)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    check(
        &String::from_utf8_lossy(&o.stderr),
        "--size 100 MiB is too small",
        "size error",
    );
    assert!(!small.exists(), "no partial disk presented as built");

    // Too little space where the disk is written: refused before the images are made, with
    // the numbers, and nothing left behind.
    let cramped = work.path().join("cramped");
    std::fs::create_dir_all(&cramped).unwrap();
    assert!(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=96m", "tmpfs"])
            .arg(&cramped)
            .status()
            .unwrap()
            .success()
    );
    let o = Command::new(kairos_e2e::bin("kairosctl"))
        .args(["build", "raw", "--image", &image, "--output"])
        .arg(cramped.join("disk.raw"))
        .output()
        .unwrap();
    let left: Vec<_> = std::fs::read_dir(&cramped).unwrap().collect();
    let _ = Command::new("umount").arg(&cramped).status();
    assert_eq!(o.status.code(), Some(3));
    check(
        &String::from_utf8_lossy(&o.stderr),
        "MiB free",
        "space error with the numbers",
    );
    assert!(left.is_empty(), "nothing left behind: {left:?}");

    // An image without a kernel is refused with what to add.
    let nokernel = work.path().join("nokernel");
    std::fs::create_dir_all(nokernel.join("etc")).unwrap();
    std::fs::write(nokernel.join("etc/inittab"), "::sysinit:/bin/true\n").unwrap();
    std::fs::create_dir_all(nokernel.join("bin")).unwrap();
    std::fs::write(nokernel.join("bin/busybox"), "").unwrap();
    let o = Command::new(kairos_e2e::bin("kairosctl"))
        .args([
            "build",
            "raw",
            "--image",
            &format!("dir:{}", nokernel.display()),
            "--output",
        ])
        .arg(work.path().join("x.raw"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    check(
        &String::from_utf8_lossy(&o.stderr),
        "linux-image",
        "no-kernel error names the package",
    );
}
