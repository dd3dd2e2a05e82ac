//! Tier 3: the `debian` flavour (bookworm, systemd, cloud kernel) from the local registry:
//! import → kairosify → build raw → boot under OVMF, with the OEM config applied by the
//! systemd units kairosify installed. Run by `scripts/test` with `--ignored`.

use std::time::Duration;

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
    vm.wait_exit(Duration::from_secs(180)).unwrap();
    drop(vm);

    // After a reboot: /etc/foo is gone, the persistent paths kept their files.
    let mut vm = Vm::boot(&disk, &work.path().join("boot2.log")).unwrap();
    vm.login("root", "debianpw").unwrap();
    check_persistence_probes(&mut vm).unwrap();
    vm.send("systemctl poweroff").unwrap();
    vm.wait_exit(Duration::from_secs(180)).unwrap();
    drop(vm);

    // The recovery entry boots the RECOVERY deployment in recovery mode.
    check_recovery_boot(&disk, &work.path().join("boot3.log"), "debianpw").unwrap();
}

/// The debian flavour through the whole lifecycle: ISO → unattended install to a blank disk →
/// active → upgrade from the registry (one new layer) → v2 blessed by boot assessment.
#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn debian_installs_from_iso_and_upgrades() {
    use kairos_e2e::{blank_disk, build_iso, image_with_files, user_net_stage};
    let work = tempfile::tempdir().unwrap();
    let iso = work.path().join("debian.iso");
    let disk = work.path().join("disk.raw");
    let reg = start_registry().unwrap();
    let v1 = image_in_registry(&reg, &debian_rootfs(), "debian").unwrap();
    let v2 = image_with_files(
        &v1,
        &[("etc/kairos-e2e-version", b"v2\n")],
        &format!("{}/kairos/debian:v2", reg.addr),
    )
    .unwrap();
    build_iso(
        &v1,
        &format!(
            "#cloud-config
users:
- name: root
  passwd: debianpw
install:
  auto: true
  device: auto
  reboot: true
{}",
            user_net_stage()
        ),
        &iso,
    )
    .unwrap();
    blank_disk(&disk, 4096).unwrap();

    let mut vm = Vm::boot_with(&disk, Some(&iso), &work.path().join("live.log")).unwrap();
    vm.wait_for("installed: ", Duration::from_secs(900))
        .unwrap();
    vm.wait_exit(Duration::from_secs(300)).unwrap();
    drop(vm);

    let mut vm = Vm::boot(&disk, &work.path().join("installed.log")).unwrap();
    vm.login("root", "debianpw").unwrap();
    check_active_immutable(&mut vm).unwrap();
    let out = vm
        .sh(&format!(
            "kairos-agent upgrade --insecure --source {} 2>&1",
            v2.replace("127.0.0.1", "10.0.2.2")
        ))
        .unwrap();
    check(&out, "1 to fetch", "only the new layer is fetched");
    check(&out, "[exit 0]", "upgrade succeeds");
    vm.send("systemctl reboot").unwrap();
    vm.wait_exit(Duration::from_secs(300)).unwrap();
    drop(vm);

    let mut vm = Vm::boot(&disk, &work.path().join("v2.log")).unwrap();
    vm.login("root", "debianpw").unwrap();
    check(
        &vm.sh("cat /etc/kairos-e2e-version").unwrap(),
        "v2\n[exit 0]",
        "v2 booted",
    );
    // Boot assessment runs as a unit after the boot stage; wait for it to bless v2.
    let list = vm
        .sh("for i in $(seq 60); do systemctl is-active -q kairos-boot-assessment && break; sleep 2; done; kairos-agent bootentry --list")
        .unwrap();
    check(&list, "active.conf", "v2 blessed");
    check(&list, "passive", "v1 kept as the fallback");
}

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn debian_missing_layer_gives_a_failure_summary_not_a_hang() {
    let work = tempfile::tempdir().unwrap();
    kairos_e2e::check_missing_layer_failure(&debian_rootfs(), CLOUD_CONFIG, work.path()).unwrap();
}
