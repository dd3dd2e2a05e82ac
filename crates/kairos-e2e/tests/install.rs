//! Tier 3: install media in QEMU (`tiny` flavour). The ISO built from the registry image boots
//! live, installs itself unattended (`install.auto`) to a blank virtio disk without network,
//! reboots, and the disk boots active with the ISO's config; a disk too small is refused with
//! the disk left blank.

use std::time::Duration;

use kairos_e2e::{Vm, blank_disk, build_iso, check, start_registry, tiny_in_registry};

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn iso_boots_live_and_installs_itself_to_a_blank_disk() {
    let work = tempfile::tempdir().unwrap();
    let iso = work.path().join("kairos.iso");
    let disk = work.path().join("disk.raw");
    let reg = start_registry().unwrap();
    let image = tiny_in_registry(&reg).unwrap();
    build_iso(
        &image,
        "#cloud-config\nusers:\n- name: root\n  passwd: installed\ninstall:\n  auto: true\n  device: auto\n  reboot: true\n",
        &iso,
    )
    .unwrap();
    drop(reg); // no network needed from here on
    blank_disk(&disk, 2048).unwrap();

    let mut vm = Vm::boot_with(&disk, Some(&iso), &work.path().join("live.log")).unwrap();
    vm.wait_for("Live", Duration::from_secs(300)).unwrap();
    let out = vm.wait_for("installed: ", Duration::from_secs(600)).unwrap();
    check(&out, "COS_PERSISTENT", "the plan is printed before writing");
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    drop(vm);

    // The installed disk boots by itself (ISO removed), active, with the ISO's config on OEM.
    let mut vm = Vm::boot(&disk, &work.path().join("installed.log")).unwrap();
    vm.login("root", "installed").unwrap();
    check(&vm.sh("cat /run/cos/active_mode").unwrap(), "1", "active");
    check(
        &vm.sh("grep -c passwd /oem/90_custom.yaml").unwrap(),
        "1",
        "OEM config written by the installer",
    );
    check(
        &vm.sh("kairos-agent state get history.0.action").unwrap(),
        "installed",
        "history",
    );
    check(
        &vm.sh("kairos-agent bootentry --list").unwrap(),
        "recovery",
        "recovery entry installed",
    );
}

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn install_refuses_a_disk_too_small_and_leaves_it_blank() {
    let work = tempfile::tempdir().unwrap();
    let iso = work.path().join("kairos.iso");
    let disk = work.path().join("small.raw");
    let reg = start_registry().unwrap();
    let image = tiny_in_registry(&reg).unwrap();
    build_iso(
        &image,
        "#cloud-config\nusers:\n- name: root\n  passwd: live\n",
        &iso,
    )
    .unwrap();
    drop(reg);
    blank_disk(&disk, 256).unwrap();
    let mut vm = Vm::boot_with(&disk, Some(&iso), &work.path().join("live.log")).unwrap();
    vm.login("root", "live").unwrap();
    check(&vm.sh("cat /run/cos/live_mode").unwrap(), "1", "live mode");
    vm.sh("printf '#cloud-config\\nusers:\\n- name: root\\n  passwd: x\\n' > /tmp/c.yaml")
        .unwrap();
    let out = vm
        .sh("kairos-agent manual-install --device auto /tmp/c.yaml")
        .unwrap();
    check(&out, "too small", "a clear error");
    check(&out, "[exit 3]", "failure exit code");
    check(
        &vm.sh("ls /dev/vda*").unwrap(),
        "/dev/vda\n[exit 0]",
        "no partitions written",
    );
}
