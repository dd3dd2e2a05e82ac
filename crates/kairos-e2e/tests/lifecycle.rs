//! Tier 3: the node lifecycle in QEMU on the `tiny` flavour, against a local registry the
//! guest reaches at 10.0.2.2 (QEMU user networking): upgrade v1 → v2 fetching only the
//! changed layer, v2 blessed by boot assessment, passive holding v1, rollback to v1; and a v3
//! whose health check fails, which the node leaves by itself after its tries.

use std::time::Duration;

use kairos_e2e::{
    Vm, build_raw, check, guest_ref, image_with_files, incompressible, start_registry,
    tiny_cloud_config, tiny_in_registry,
};

/// Root login, and a network in the boot stage.
fn cloud_config() -> String {
    tiny_cloud_config("rootpw")
}

/// Bytes written to the virtio disk so far (sectors written, /sys/block/vda/stat field 7).
fn disk_written(vm: &mut Vm) -> u64 {
    let out = vm.sh("cat /sys/block/vda/stat").unwrap();
    out.split_whitespace()
        .nth(6)
        .and_then(|s| s.parse::<u64>().ok())
        .expect("vda stat")
        * 512
}

/// The booted deployment id, from `state` (console messages may interleave with the output).
fn booted_id(vm: &mut Vm) -> String {
    let out = vm.sh("kairos-agent state get booted").unwrap();
    out.lines()
        .map(str::trim)
        .find(|l| l.starts_with("d-"))
        .unwrap_or_else(|| panic!("no deployment id in: {out}"))
        .to_string()
}

/// Waits for the boot assessment's verdict line on the console. The login prompt came out
/// before it, so an empty line asks getty for a fresh one.
fn verdict(vm: &mut Vm) -> String {
    vm.wait_for("boot assessment: ", Duration::from_secs(300))
        .unwrap();
    let line = vm.wait_for("\n", Duration::from_secs(10)).unwrap();
    vm.send("").unwrap();
    line
}

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn upgrade_fetches_one_layer_blesses_and_rolls_back() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let reg = start_registry().unwrap();
    let v1 = tiny_in_registry(&reg).unwrap();
    build_raw(&v1, &cloud_config(), &disk).unwrap();
    // v2 changes one thing: a new top layer with a version file and 512 KiB of new bytes.
    let blob = incompressible(512 << 10, 7);
    let v2 = image_with_files(
        &v1,
        &[
            ("etc/kairos-e2e-version", b"v2\n"),
            ("usr/share/v2/blob", &blob),
        ],
        &format!("{}/kairos/tiny:v2", reg.addr),
    )
    .unwrap();

    let mut vm = Vm::boot(&disk, &work.path().join("boot1.log")).unwrap();
    check(&verdict(&mut vm), "healthy", "v1 as built is healthy");
    vm.login("root", "rootpw").unwrap();
    let v1_id = booted_id(&mut vm);
    assert!(v1_id.starts_with("d-"), "{v1_id}");

    let state_kib = |vm: &mut Vm| -> u64 {
        let out = vm
            .sh("du -sk /run/initramfs/cos-state/layers /run/initramfs/cos-state/boot | awk '{s+=$1} END {print \"KIB\" s}'")
            .unwrap();
        out.split("KIB")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("du of the store")
    };
    let space_before = state_kib(&mut vm);
    let served = reg.bytes_served();
    let written = disk_written(&mut vm);
    let out = vm
        .sh(&format!(
            "kairos-agent upgrade --insecure --source {} 2>&1",
            guest_ref(&v2)
        ))
        .unwrap();
    check(&out, "1 to fetch", "only the new layer is fetched");
    check(&out, "[exit 0]", "upgrade succeeds");
    let pulled = reg.bytes_served() - served;
    let wrote = disk_written(&mut vm) - written;
    // The whole image, for the fraction (what the Go Kairos pulls and writes per upgrade).
    let cache = tempfile::tempdir().unwrap();
    let full = kairos_oci::fetch(
        &kairos_oci::ImageRef::parse(&v2).unwrap(),
        cache.path(),
        &mut |_, _, _| {},
    )
    .unwrap();
    let full_bytes: u64 = full.manifest.layers.iter().map(|l| l.size).sum();
    let changed = full.manifest.layers.last().unwrap().size;
    // "layer <digest> written (N bytes)": the one layer image the upgrade made.
    let layer_image: u64 = out
        .split("written (")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the upgrade reports the layer image it wrote");
    assert!(
        layer_image < (512 << 10) * 11 / 10,
        "layer image of {layer_image} bytes for 512 KiB"
    );
    let space_after = state_kib(&mut vm);
    eprintln!(
        "BENCH os-space: state_before_kib={space_before} state_after_upgrade_kib={space_after} full_image_compressed={full_bytes}"
    );
    eprintln!(
        "BENCH upgrade one-layer: pulled={pulled} written={wrote} layer_image={layer_image} changed_layer_compressed={changed} changed_layer_uncompressed={} full_image_compressed={full_bytes}",
        512 << 10
    );
    // The changed layer is 512 KiB of incompressible bytes (+ a few for the tar and gzip);
    // manifests and config add a few KiB; the written side adds ext4 journal and metadata.
    assert!(
        pulled < (512 << 10) * 11 / 10 + (16 << 10),
        "pulled {pulled} bytes for a 512 KiB layer"
    );
    assert!(
        wrote < (512 << 10) * 11 / 10 + (512 << 10),
        "wrote {wrote} bytes for a 512 KiB layer"
    );
    check(
        &vm.sh("kairos-agent bootentry --list").unwrap(),
        "* active",
        "entries listed",
    );
    vm.send("reboot").unwrap();
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    drop(vm);

    // v2 boots with tries, passes its (empty) health checks and is blessed.
    let mut vm = Vm::boot(&disk, &work.path().join("boot2.log")).unwrap();
    check(&verdict(&mut vm), "passed; it is kept", "v2 blessed");
    vm.login("root", "rootpw").unwrap();
    check(
        &vm.sh("cat /etc/kairos-e2e-version").unwrap(),
        "v2\n[exit 0]",
        "v2 content",
    );
    check(&vm.sh("cat /run/cos/active_mode").unwrap(), "1", "active");
    let list = vm.sh("kairos-agent bootentry --list").unwrap();
    check(&list, "active.conf", "the v2 entry is blessed");
    check(&list, &format!("passive   {v1_id}"), "passive holds v1");

    vm.send("kairos-agent rollback --reboot").unwrap();
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    drop(vm);

    // Rolled back: v1 again, v2 is the fallback.
    let mut vm = Vm::boot(&disk, &work.path().join("boot3.log")).unwrap();
    vm.login("root", "rootpw").unwrap();
    check(
        &vm.sh("cat /etc/kairos-e2e-version").unwrap(),
        "No such file",
        "v1 content",
    );
    check(
        &vm.sh("kairos-agent state get booted").unwrap(),
        &v1_id,
        "v1 booted",
    );
    check(
        &vm.sh("kairos-agent state get history").unwrap(),
        "rollback",
        "history records the rollback",
    );
}

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn failing_health_check_falls_back_by_itself() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let reg = start_registry().unwrap();
    let v1 = tiny_in_registry(&reg).unwrap();
    build_raw(&v1, &cloud_config(), &disk).unwrap();
    // v3 ships a health check that always fails.
    let bad = image_with_files(
        &v1,
        &[(
            "system/oem/50_health.yaml",
            b"boot_assessment:\n  health_checks:\n  - test -e /run/never-there\n",
        )],
        &format!("{}/kairos/tiny:v3", reg.addr),
    )
    .unwrap();

    let mut vm = Vm::boot(&disk, &work.path().join("boot1.log")).unwrap();
    verdict(&mut vm);
    vm.login("root", "rootpw").unwrap();
    let v1_id = booted_id(&mut vm);
    let out = vm
        .sh(&format!(
            "kairos-agent upgrade --insecure --reboot --source {} 2>&1",
            guest_ref(&bad)
        ))
        .unwrap_or_default();
    check(&out, "3 tries", "v3 boots with 3 tries");
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    drop(vm);

    // Each boot of v3 fails its check and reboots; after 3 the passive entry (v1) boots.
    let mut fell_back = false;
    for i in 0..5 {
        let mut vm = Vm::boot(&disk, &work.path().join(format!("try{i}.log"))).unwrap();
        let v = verdict(&mut vm);
        if !v.contains("; running") {
            check(
                &v,
                "failed: `test -e /run/never-there`",
                "v3 fails its check",
            );
            vm.wait_exit(Duration::from_secs(120)).unwrap();
            continue;
        }
        assert_eq!(i, 3, "fell back after exactly 3 failed tries: {v}");
        vm.login("root", "rootpw").unwrap();
        check(
            &vm.sh("cat /run/cos/passive_mode").unwrap(),
            "1",
            "passive mode",
        );
        check(
            &vm.sh("kairos-agent state get booted").unwrap(),
            &v1_id,
            "back on v1",
        );
        check(
            &vm.sh("kairos-agent state get last_failure.detail").unwrap(),
            "health check failed: `test -e /run/never-there` exited",
            "state says why",
        );
        fell_back = true;
        break;
    }
    assert!(fell_back, "the node never fell back to v1");
}

/// Power cuts during an upgrade: at each point the agent pauses (KAIROS_FAILPOINT) and the VM
/// is killed as a power loss would; the node must boot (v1 or v2) and a rerun completes.
#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn power_cut_at_any_step_of_an_upgrade_leaves_a_bootable_node() {
    const POINTS: &[&str] = &[
        "downloaded",
        "layer-image-written",
        "before-manifest",
        "manifest-written",
        "passive-entry-written",
        "active-entry-added",
        "active-entry-written",
    ];
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let reg = start_registry().unwrap();
    let v1 = tiny_in_registry(&reg).unwrap();
    build_raw(&v1, &cloud_config(), &disk).unwrap();
    let v2 = image_with_files(
        &v1,
        &[
            ("etc/kairos-e2e-version", b"v2\n"),
            ("usr/share/v2/blob", &incompressible(256 << 10, 5)),
        ],
        &format!("{}/kairos/tiny:v2", reg.addr),
    )
    .unwrap();
    let upgrade = format!(
        "kairos-agent upgrade --insecure --source {}",
        guest_ref(&v2)
    );
    let mut v1_id = String::new();
    for (i, point) in POINTS.iter().enumerate() {
        let mut vm = Vm::boot(&disk, &work.path().join(format!("cut{i}.log"))).unwrap();
        verdict(&mut vm);
        vm.login("root", "rootpw").unwrap();
        let modes = vm.sh("ls /run/cos").unwrap();
        assert!(
            modes.contains("active_mode") || modes.contains("passive_mode"),
            "after a cut at {}: booted {modes} (expected v1 or v2, not recovery)",
            POINTS[i.saturating_sub(1)]
        );
        // A cut after the switch may boot v2 (either is correct); make v1 active again so
        // that the next upgrade goes through every step.
        if i == 0 {
            v1_id = booted_id(&mut vm);
        } else if booted_id(&mut vm) != v1_id {
            check(
                &vm.sh("kairos-agent rollback").unwrap(),
                "[exit 0]",
                "rollback to v1",
            );
        }
        vm.send(&format!("KAIROS_FAILPOINT={point} {upgrade}"))
            .unwrap();
        vm.wait_for(&format!("paused at {point}"), Duration::from_secs(300))
            .unwrap();
        // The power cut: QEMU killed, nothing flushed that the guest had not flushed.
        drop(vm);
    }
    // After the last cut: boots, and the rerun completes the upgrade.
    let mut vm = Vm::boot(&disk, &work.path().join("final.log")).unwrap();
    verdict(&mut vm);
    vm.login("root", "rootpw").unwrap();
    check(&vm.sh(&upgrade).unwrap(), "[exit 0]", "the rerun completes");
    vm.send("reboot").unwrap();
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    drop(vm);
    let mut vm = Vm::boot(&disk, &work.path().join("v2.log")).unwrap();
    // Blessed now, or already at the boot after the last cut (which may boot v2).
    let v = verdict(&mut vm);
    assert!(
        v.contains("passed") || v.contains("healthy"),
        "v2 is kept: {v}"
    );
    vm.login("root", "rootpw").unwrap();
    check(
        &vm.sh("cat /etc/kairos-e2e-version").unwrap(),
        "v2\n[exit 0]",
        "v2 after the cuts",
    );
    check(
        &vm.sh("ls /run/initramfs/cos-state/layers /run/initramfs/cos-state/deployments")
            .unwrap(),
        "[exit 0]",
        "store readable",
    );
    let tmp = vm
        .sh("find /run/initramfs/cos-state -name '.*.tmp' | wc -l")
        .unwrap();
    check(&tmp, "0\n", "no temp files left after the rerun and gc");
}

/// Reset: the autoreset entry boots recovery, which re-makes STATE from the recovery
/// deployment, wipes PERSISTENT, keeps OEM and reboots by itself — the node comes back active
/// with its OEM config applied again.
#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn reset_from_recovery_comes_back_active_with_the_oem_config() {
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let reg = start_registry().unwrap();
    let v1 = tiny_in_registry(&reg).unwrap();
    build_raw(&v1, &cloud_config(), &disk).unwrap();
    drop(reg);
    let mut vm = Vm::boot(&disk, &work.path().join("active.log")).unwrap();
    verdict(&mut vm);
    vm.login("root", "rootpw").unwrap();
    vm.sh("echo data > /usr/local/kept; sync").unwrap();
    // Outside recovery, reset refuses and says what to do.
    check(
        &vm.sh("kairos-agent reset").unwrap(),
        "reset runs from recovery",
        "reset refused in active mode",
    );
    vm.reboot_into("autoreset").unwrap();

    // Recovery with kairos.reset: resets and reboots without anyone logged in.
    let mut vm = Vm::boot(&disk, &work.path().join("autoreset.log")).unwrap();
    let out = vm
        .wait_for("reset: COS_STATE re-created", Duration::from_secs(300))
        .unwrap();
    check(&out, "recovery", "booted the recovery deployment");
    let line = vm.wait_for("\n", Duration::from_secs(10)).unwrap();
    check(&line, "COS_PERSISTENT wiped", "reset report");
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    drop(vm);

    let mut vm = Vm::boot(&disk, &work.path().join("after.log")).unwrap();
    vm.login("root", "rootpw").unwrap();
    check(
        &vm.sh("cat /run/cos/active_mode").unwrap(),
        "1",
        "active again",
    );
    check(
        &vm.sh("cat /usr/local/kept").unwrap(),
        "No such file",
        "PERSISTENT was wiped",
    );
    check(
        &vm.sh("kairos-agent state get history").unwrap(),
        "reset",
        "history starts with the reset",
    );
}
