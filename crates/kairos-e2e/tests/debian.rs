//! Tier 3: the `debian` flavour (bookworm, systemd, cloud kernel) from the local registry:
//! import → kairosify → build raw → boot under OVMF, with the OEM config applied by the
//! systemd units kairosify installed. Run by `scripts/test` with `--ignored`.

use kairos_e2e::{Vm, build_raw, debian_rootfs, image_in_registry, start_registry};

const CLOUD_CONFIG: &str = "#cloud-config
users:
- name: root
  passwd: debianpw
hostname: debian-kairos
write_files:
- path: /etc/kairos-e2e
  content: \"written at boot\\n\"
  permissions: \"0600\"
runcmd:
- touch /run/boot-stage-ran
";

fn check(out: &str, want: &str, what: &str) {
    assert!(out.contains(want), "{what}: expected {want:?} in:\n{out}");
}

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn debian_boots_with_systemd_and_applies_oem_config() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let reg = start_registry().unwrap();
    let image = image_in_registry(&reg, &debian_rootfs(), "debian").unwrap();
    build_raw(&image, CLOUD_CONFIG, &disk).unwrap();
    drop(reg);

    let mut vm = Vm::boot(&disk, &work.path().join("boot.log")).unwrap();
    vm.login("root", "debianpw").unwrap();
    check(
        &vm.sh("cat /run/cos/active_mode").unwrap(),
        "1[exit 0]",
        "active mode marker",
    );
    check(
        &vm.sh("grep ' / ' /proc/mounts").unwrap(),
        "overlay / overlay ro",
        "overlay root",
    );
    check(
        &vm.sh("touch /usr/x").unwrap(),
        "Read-only file system",
        "/usr is read-only",
    );
    check(
        &vm.sh("hostname").unwrap(),
        "debian-kairos\n[exit 0]",
        "hostname from OEM",
    );
    check(
        &vm.sh("stat -c %a /etc/kairos-e2e; cat /etc/kairos-e2e")
            .unwrap(),
        "600\nwritten at boot\n[exit 0]",
        "write_files",
    );
    check(
        &vm.sh("ls /run/boot-stage-ran").unwrap(),
        "[exit 0]",
        "boot stage ran",
    );
    check(
        &vm.sh("systemctl is-active cos-setup-boot.service").unwrap(),
        "active",
        "the boot stage unit",
    );
    check(
        &vm.sh("cat /proc/1/comm").unwrap(),
        "systemd",
        "systemd is init",
    );
    vm.sh("echo eph > /etc/foo; mkdir -p /etc/ssh; echo keep > /etc/ssh/kept; echo local > /usr/local/kept; sync").unwrap();
    vm.send("systemctl reboot").unwrap();
    vm.wait_exit(std::time::Duration::from_secs(180)).unwrap();
    drop(vm);

    // After a reboot: /etc/foo is gone, the persistent paths kept their files.
    let mut vm = Vm::boot(&disk, &work.path().join("boot2.log")).unwrap();
    vm.login("root", "debianpw").unwrap();
    check(
        &vm.sh("cat /etc/foo").unwrap(),
        "No such file",
        "/etc/foo is ephemeral",
    );
    check(
        &vm.sh("cat /etc/ssh/kept").unwrap(),
        "keep\n[exit 0]",
        "/etc/ssh persists",
    );
    check(
        &vm.sh("cat /usr/local/kept").unwrap(),
        "local\n[exit 0]",
        "/usr/local persists",
    );
}
