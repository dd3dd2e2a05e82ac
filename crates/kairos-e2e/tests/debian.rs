//! Tier 3: the `debian` flavour (bookworm, systemd, cloud kernel) from the local registry:
//! import → kairosify → build raw → boot under OVMF, with the OEM config applied by the
//! systemd units kairosify installed. Run by `scripts/test` with `--ignored`.

use kairos_e2e::{
    Vm, build_raw, check, check_active_immutable, check_persistence_probes, check_persistent_grown,
    check_recovery_boot, debian_rootfs, enlarge_disk, image_in_registry, start_registry,
    write_persistence_probes,
};

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

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn debian_boots_with_systemd_applies_oem_config_grows_persistent_and_boots_recovery() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let reg = start_registry().unwrap();
    let image = image_in_registry(&reg, &debian_rootfs(), "debian").unwrap();
    build_raw(&image, CLOUD_CONFIG, &disk).unwrap();
    drop(reg);
    // As if written to a bigger drive: COS_PERSISTENT grows on first boot.
    enlarge_disk(&disk, 512).unwrap();

    let mut vm = Vm::boot(&disk, &work.path().join("boot.log")).unwrap();
    vm.login("root", "debianpw").unwrap();
    check_active_immutable(&mut vm).unwrap();
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
    check_persistent_grown(&mut vm, 500).unwrap();
    write_persistence_probes(&mut vm).unwrap();
    vm.send("systemctl reboot").unwrap();
    vm.wait_exit(std::time::Duration::from_secs(180)).unwrap();
    drop(vm);

    // After a reboot: /etc/foo is gone, the persistent paths kept their files.
    let mut vm = Vm::boot(&disk, &work.path().join("boot2.log")).unwrap();
    vm.login("root", "debianpw").unwrap();
    check_persistence_probes(&mut vm).unwrap();
    vm.send("systemctl poweroff").unwrap();
    vm.wait_exit(std::time::Duration::from_secs(180)).unwrap();
    drop(vm);

    // The recovery entry boots the RECOVERY deployment in recovery mode.
    check_recovery_boot(&disk, &work.path().join("boot3.log"), "debianpw").unwrap();
}
