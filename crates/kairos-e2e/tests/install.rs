//! Tier 3: install media in QEMU (`tiny` flavour). The ISO built from the registry image boots
//! live, installs itself unattended (`install.auto`) to a blank virtio disk without network,
//! reboots, and the disk boots active with the ISO's config; a disk too small is refused with
//! the disk left blank. The image of the first test hides `/sbin/modprobe` (whiteouts in a
//! layer of its own, as a busybox image with every applet in /bin has none): the installer
//! loads the FAT modules the ESP needs by itself.

use std::time::Duration;

use kairos_e2e::{
    Vm, blank_disk, build_iso, build_netboot, check, image_with_files, start_registry,
    tiny_in_registry, tiny_iso,
};

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn iso_boots_live_and_installs_itself_to_a_blank_disk() {
    let work = tempfile::tempdir().unwrap();
    let iso = work.path().join("kairos.iso");
    let disk = work.path().join("disk.raw");
    let reg = start_registry().unwrap();
    let tiny = tiny_in_registry(&reg).unwrap();
    let no_modprobe = image_with_files(
        &tiny,
        &[
            ("sbin/.wh.modprobe", b""),
            ("sbin/.wh.insmod", b""),
            ("sbin/.wh.rmmod", b""),
        ],
        &format!("{}/kairos/tiny-no-modprobe:v1", reg.addr),
    )
    .unwrap();
    build_iso(
        &no_modprobe,
        "#cloud-config\nusers:\n- name: root\n  passwd: installed\ninstall:\n  auto: true\n  device: auto\n  reboot: true\n",
        &iso,
    )
    .unwrap();
    drop(reg);
    blank_disk(&disk, 2048).unwrap();

    let mut vm = Vm::boot_with(&disk, Some(&iso), &work.path().join("live.log")).unwrap();
    vm.wait_for("Live", Duration::from_secs(300)).unwrap();
    let out = vm
        .wait_for("installed: ", Duration::from_secs(600))
        .unwrap();
    check(&out, "COS_PERSISTENT", "the plan is printed before writing");
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    drop(vm);

    // The installed disk boots by itself (ISO removed), active, with the ISO's config on OEM.
    let mut vm = Vm::boot(&disk, &work.path().join("installed.log")).unwrap();
    vm.login("root", "installed").unwrap();
    check(&vm.sh("cat /run/cos/active_mode").unwrap(), "1", "active");
    check(
        &vm.sh("[ -e /sbin/modprobe ] || echo no-modprobe").unwrap(),
        "no-modprobe",
        "the image has no modprobe (the installer did without)",
    );
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
    tiny_iso(
        "#cloud-config\nusers:\n- name: root\n  passwd: live\n",
        &iso,
    )
    .unwrap();
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

/// Install time against the floor of writing the same bytes with `dd`, in the same live VM
/// (printed as BENCH lines for bench/install.sh; asserts only that both ran).
#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn manual_install_and_the_dd_floor() {
    let work = tempfile::tempdir().unwrap();
    let iso = work.path().join("kairos.iso");
    let disk = work.path().join("disk.raw");
    tiny_iso(
        "#cloud-config\nusers:\n- name: root\n  passwd: live\n",
        &iso,
    )
    .unwrap();
    blank_disk(&disk, 2048).unwrap();
    let mut vm = Vm::boot_with(&disk, Some(&iso), &work.path().join("live.log")).unwrap();
    vm.login("root", "live").unwrap();
    vm.sh("printf '#cloud-config\\nusers:\\n- name: root\\n  passwd: x\\n' > /tmp/c.yaml")
        .unwrap();
    let written = |vm: &mut Vm| -> u64 {
        let out = vm.sh("cat /sys/block/vda/stat").unwrap();
        out.split_whitespace()
            .nth(6)
            .and_then(|s| s.parse::<u64>().ok())
            .expect("vda stat")
            * 512
    };
    let ms = |vm: &mut Vm, cmd: &str| -> (u64, String) {
        let out = vm
            .sh(&format!(
                // /proc/uptime has centiseconds; busybox date has no %N.
                "a=$(cut -d' ' -f1 /proc/uptime | tr -d .); {cmd} >/tmp/o 2>&1; r=$?; b=$(cut -d' ' -f1 /proc/uptime | tr -d .); cat /tmp/o; echo MS$(( (b-a)*10 )) rc=$r"
            ))
            .unwrap();
        let ms = out
            .split("MS")
            .last()
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("timing");
        (ms, out)
    };
    let w0 = written(&mut vm);
    let (install_ms, out) = ms(
        &mut vm,
        "kairos-agent manual-install --device /dev/vda /tmp/c.yaml",
    );
    check(&out, "rc=0", "manual-install succeeds");
    let bytes = written(&mut vm) - w0;
    // A second install onto the installed disk is refused without --force.
    let again = vm
        .sh("kairos-agent manual-install --device /dev/vda /tmp/c.yaml")
        .unwrap();
    check(
        &again,
        "already has a Kairos install",
        "an installed disk is refused",
    );
    check(&again, "[exit 3]", "refusal exit code");
    let mib = bytes.div_ceil(1 << 20);
    let (dd_ms, out) = ms(
        &mut vm,
        &format!("dd if=/dev/zero of=/dev/vda bs=1M count={mib} conv=fsync"),
    );
    check(&out, "rc=0", "dd ran");
    let space = vm
        .sh("du -sk /run/initramfs/live/layers /run/initramfs/live/boot | awk '{s+=$1} END {print \"KIB\" s}'")
        .unwrap();
    eprintln!(
        "BENCH install: install_ms={install_ms} written={bytes} dd_ms={dd_ms} dd_mib={mib} medium_store={}",
        space
            .split("KIB")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?")
    );
}

/// Netboot: kernel + an initrd carrying the layers, booted as the iPXE script says → live,
/// from RAM, with the embedded config applied.
#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn netboot_boots_live_from_ram() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("netboot");
    let disk = work.path().join("disk.raw");
    let reg = start_registry().unwrap();
    let image = tiny_in_registry(&reg).unwrap();
    build_netboot(
        &image,
        "#cloud-config\nusers:\n- name: root\n  passwd: netboot\n",
        &dir,
    )
    .unwrap();
    drop(reg);
    let script = std::fs::read_to_string(dir.join("netboot.ipxe")).unwrap();
    check(&script, "#!ipxe", "an iPXE script");
    check(&script, "kairos.store=initrd", "the store is in the initrd");
    blank_disk(&disk, 64).unwrap();
    let mut vm = Vm::boot_netboot(&disk, &dir, &work.path().join("netboot.log")).unwrap();
    vm.login("root", "netboot").unwrap();
    check(&vm.sh("cat /run/cos/live_mode").unwrap(), "1", "live mode");
    check(
        &vm.sh("touch /usr/netboot-writable && echo ok").unwrap(),
        "ok\n[exit 0]",
        "the live root is writable (tmpfs upper)",
    );
    check(
        &vm.sh("ls /run/initramfs/live/layers | wc -l").unwrap(),
        "2",
        "layers from the initrd",
    );
}
