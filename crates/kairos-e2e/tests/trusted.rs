//! Tier 3: trusted boot in QEMU under OVMF Secure Boot with the owner's keys enrolled and a
//! software TPM (swtpm), one VM at a time, fresh TPM state per disk. A disk built with
//! `kairosctl build raw --trusted` boots its signed UKI to active mode and PCR 11 read in the
//! guest equals the value predicted from the UKI; an unsigned UKI, a UKI with one changed
//! byte and one signed by another owner are refused by the firmware ("Access Denied"); a layer
//! image with one changed byte is refused by immucore with a message naming the layer;
//! upgrades are refused without a UKI, with a stranger's or another image's, and accepted
//! with the owner's (v2's boot is tests/encrypted.rs's).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kairos_e2e::{
    MountGuard, Vm, check, esp_tree, guest_pcr11, guest_ref, image_with_files, kairosctl,
    put_on_esp, start_registry, tiny_cloud_config, tiny_in_registry, tiny_rootfs,
};

/// A copy of the disk (sparse): each scenario gets its own, with fresh UEFI variables and TPM.
fn copy_disk(disk: &Path, name: &str) -> Result<PathBuf> {
    let out = disk.with_file_name(name);
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(disk)
        .arg(&out)
        .status()?;
    if !st.success() {
        bail!("copying {}", disk.display());
    }
    Ok(out)
}

/// The one UKI on the ESP (`kairos/<deployment>.efi`) of an ESP tree.
fn uki_on(esp: &Path) -> Result<PathBuf> {
    std::fs::read_dir(esp.join("kairos"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "efi"))
        .context("no UKI in kairos/ on the ESP")
}

/// Changes the UKI on the ESP of `disk` with `f` (through mtools: this host's kernel may
/// have no vfat).
fn edit_uki(disk: &Path, work: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tree = tempfile::tempdir_in(work)?;
    esp_tree(disk, tree.path())?;
    let uki = uki_on(tree.path())?;
    f(&uki)?;
    put_on_esp(
        disk,
        &uki,
        &format!(
            "kairos/{}",
            uki.file_name().unwrap_or_default().to_string_lossy()
        ),
    )
}

/// Boots and waits for the firmware (or systemd-boot) to refuse the UKI.
fn expect_refused(disk: &Path, keys: &Path, log: &Path) -> Result<()> {
    let mut vm = Vm::boot_trusted(disk, keys, log)?;
    vm.wait_for("Access Denied", Duration::from_secs(240))?;
    let out = vm.output();
    if out.contains("kairos-immucore") || out.contains("Linux version") {
        bail!("a kernel ran although its UKI was refused:\n{out}");
    }
    Ok(())
}

fn sh(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("{cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn signed_uki_boots_under_secure_boot_and_tampering_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let keys = w.join("keys");
    let other = w.join("other-keys");
    kairosctl(&[
        "keys",
        "generate",
        &keys.to_string_lossy(),
        "--name",
        "owner",
    ])
    .unwrap();
    kairosctl(&[
        "keys",
        "generate",
        &other.to_string_lossy(),
        "--name",
        "stranger",
    ])
    .unwrap();
    let disk = w.join("disk.raw");
    std::fs::write(w.join("cc.yaml"), tiny_cloud_config("trusted")).unwrap();
    kairosctl(&[
        "build",
        "raw",
        "--image",
        &format!("dir:{}", tiny_rootfs().display()),
        "--output",
        &disk.to_string_lossy(),
        "--cloud-config",
        &w.join("cc.yaml").to_string_lossy(),
        "--trusted",
        "--keys",
        &keys.to_string_lossy(),
        // Room on COS_PERSISTENT (/usr/local) for the UKIs of the upgrade below.
        "--size",
        "1200",
    ])
    .unwrap();

    // The upgrade's material, made on the "workstation" before anything boots: v2 of an
    // image in a registry, its UKI signed by the owner, the same signed by a stranger, and an
    // owner-signed UKI of another image (v1). They reach the node on COS_PERSISTENT.
    let reg = start_registry().unwrap();
    let v1 = tiny_in_registry(&reg).unwrap();
    let v2 = image_with_files(
        &v1,
        &[("etc/kairos-e2e-version", b"v2\n")],
        &format!("{}/kairos/tiny:v2", reg.addr),
    )
    .unwrap();
    let ukis = w.join("ukis");
    std::fs::create_dir_all(&ukis).unwrap();
    let build_uki = |image: &str, keys: &Path, out: &str| {
        kairosctl(&[
            "build",
            "uki",
            "--image",
            image,
            "--keys",
            &keys.to_string_lossy(),
            "--output",
            &ukis.join(out).to_string_lossy(),
        ])
        .unwrap()
    };
    build_uki(&v2, &keys, "v2.efi");
    build_uki(&v2, &other, "v2-stranger.efi");
    build_uki(&v1, &keys, "v1.efi");
    {
        let p = MountGuard::partition(&disk, 5, &w.join("persistent-mnt"), "ext4").unwrap();
        sh(Command::new("cp").arg("-r").arg(&ukis).arg(&p.path)).unwrap();
    }

    // What PCR 11 must read once the initrd is left, from the UKI's own bytes.
    let (leave, pins) = {
        let tree = w.join("esp");
        esp_tree(&disk, &tree).unwrap();
        let bytes = std::fs::read(uki_on(&tree).unwrap()).unwrap();
        let phases = kairos_trust::pcr::predict_uki(&bytes).unwrap();
        assert!(tree.join("EFI/BOOT/BOOTX64.EFI").is_file(), "systemd-boot");
        assert!(
            tree.join("loader/keys/auto/db.auth").is_file(),
            "auto-enrollment files"
        );
        // The layers it pins (its signed cmdline): dm-verity root hashes.
        let text = String::from_utf8_lossy(&bytes);
        let pins: Vec<String> = text
            .split("rd.kairos.layers=")
            .nth(1)
            .expect("the UKI's cmdline pins the layers")
            .split(|c: char| c.is_whitespace() || c == '\0')
            .next()
            .unwrap()
            .split(',')
            .map(str::to_string)
            .collect();
        (
            phases
                .iter()
                .find(|(p, _)| p == "enter-initrd:leave-initrd")
                .unwrap()
                .1
                .hex(),
            pins,
        )
    };

    // Tampered and foreign variants are prepared from copies while nothing runs.
    let tampered = copy_disk(&disk, "tampered.raw").unwrap();
    edit_uki(&tampered, w, |uki| {
        // One byte of the signed cmdline: "rd.kairos.layers" → "rd.kairos.layert".
        let mut b = std::fs::read(uki)?;
        let at = b
            .windows(16)
            .position(|x| x == b"rd.kairos.layers")
            .context("cmdline in the UKI")?;
        b[at + 15] = b't';
        Ok(std::fs::write(uki, b)?)
    })
    .unwrap();
    let unsigned = copy_disk(&disk, "unsigned.raw").unwrap();
    edit_uki(&unsigned, w, |uki| {
        sh(Command::new("sbattach").arg("--remove").arg(uki))
    })
    .unwrap();
    let foreign = copy_disk(&disk, "foreign.raw").unwrap();
    edit_uki(&foreign, w, |uki| {
        sh(Command::new("sbattach").arg("--remove").arg(uki))?;
        sh(Command::new("sbsign")
            .arg("--key")
            .arg(other.join("db.key"))
            .arg("--cert")
            .arg(other.join("db.pem"))
            .arg("--output")
            .arg(uki)
            .arg(uki))
    })
    .unwrap();
    let bad_layer = copy_disk(&disk, "bad-layer.raw").unwrap();
    let changed = {
        let state = MountGuard::partition(&bad_layer, 4, &w.join("state-mnt"), "ext4").unwrap();
        let layer = std::fs::read_dir(state.path.join("layers"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .unwrap();
        let mut b = std::fs::read(&layer).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x01;
        std::fs::write(&layer, b).unwrap();
        layer.file_name().unwrap().to_string_lossy().into_owned()
    };

    // The signed UKI boots under Secure Boot, to active mode, measured.
    let mut vm = Vm::boot_trusted(&disk, &keys, &w.join("boot.log")).unwrap();
    vm.login("root", "trusted").unwrap();
    check(
        &vm.sh("cat /run/cos/active_mode").unwrap(),
        "1",
        "active mode",
    );
    check(
        &vm.sh(
            "od -An -tu1 /sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c",
        )
        .unwrap(),
        " 1\n[exit 0]",
        "Secure Boot on",
    );
    assert_eq!(
        guest_pcr11(&mut vm).unwrap(),
        leave,
        "PCR 11 read in the guest equals the prediction after leave-initrd"
    );
    check(
        &vm.sh("ls /run/systemd/").unwrap(),
        "tpm2-pcr-signature.json",
        "the stub's signed policy handed on",
    );
    // The agent's view: mode from the boot entry (the signed cmdline has none), Secure Boot,
    // and PCR 11 against the booted UKI's own prediction and signed policy.
    check(
        &vm.sh("kairos-agent state get boot_mode").unwrap(),
        "active\n[exit 0]",
        "boot mode from the entry",
    );
    let state = vm.sh("kairos-agent state").unwrap();
    check(&state, "secure boot: on", "state: Secure Boot");
    check(
        &state,
        "matches the prediction at enter-initrd:leave-initrd; the signed policy covers enter-initrd only",
        "state: PCR 11 and the policy",
    );
    check(&state, &leave, "state: the value");
    // Every pinned layer is mounted through dm-verity with its signed root hash.
    check(
        &state,
        "behind dm-verity (signed root hashes), no changed block seen",
        "state: the layers",
    );
    let roots = vm.sh("kairos-agent state get verified_layers").unwrap();
    for pin in &pins {
        check(&roots, pin, "a verity device per pinned root");
    }

    // Upgrades: refused without a UKI, with a stranger's, and with one of another image —
    // each before anything is written (the store keeps one deployment, v1 boots next).
    let src = guest_ref(&v2);
    let up = |vm: &mut Vm, extra: &str| {
        vm.sh(&format!(
            "kairos-agent upgrade --insecure --source {src} {extra} 2>&1"
        ))
        .unwrap()
    };
    let v1_id = vm.sh("kairos-agent state get booted").unwrap();
    let v1_id = v1_id.lines().next().unwrap().to_string();
    let deployments = "ls /run/initramfs/cos-state/deployments | wc -l";
    let out = up(&mut vm, "");
    check(&out, "boots signed UKIs", "no UKI: refused");
    let out = up(&mut vm, "--uki /usr/local/ukis/v2-stranger.efi");
    check(
        &out,
        "stranger db, but the firmware trusts",
        "a stranger's UKI: refused, named",
    );
    check(&out, "nothing was changed", "…before writing");
    check(
        &vm.sh(deployments).unwrap(),
        "1\n[exit 0]",
        "nothing staged",
    );
    let out = up(&mut vm, "--uki /usr/local/ukis/v1.efi");
    check(
        &out,
        "the UKI was built for deployment",
        "another image's UKI: refused",
    );
    check(
        &vm.sh("kairos-agent state get next_boot").unwrap(),
        &v1_id,
        "v1 still boots next",
    );
    let out = up(&mut vm, "--uki /usr/local/ukis/v2.efi");
    check(&out, "signed by", "the owner's UKI of v2");
    check(&out, "[exit 0]", "the upgrade");
    let v2_id = vm.sh("kairos-agent state get next_boot").unwrap();
    assert_ne!(v2_id, v1_id, "v2 boots next");

    // A layer image changed under the running node: dm-verity refuses the changed block when
    // it is read from disk again (O_DIRECT: no cached copy), and `state` says so.
    let tamper = format!(
        r#"f=/run/initramfs/cos-state/$(sed -n 's/.*"file": "\(layers\/[^"]*\)".*/\1/p' /run/initramfs/cos-state/deployments/{v1_id}.json | head -n1)
d=$(for x in /sys/block/dm-*; do [ "$(cat $x/dm/name)" = kairos-layer-0 ] && basename $x; done)
dd if=/dev/$d of=/dev/null bs=4096 skip=1 count=1 iflag=direct 2>/dev/null && echo BEFORE-READ-OK
mount -o remount,rw /run/initramfs/cos-state
printf X | dd of=$f bs=1 seek=4196 conv=notrunc 2>/dev/null
sync
dd if=/dev/$d of=/dev/null bs=4096 skip=1 count=1 iflag=direct 2>/dev/null || echo AFTER-READ-REFUSED"#
    );
    let out = vm.sh(&tamper).unwrap();
    check(&out, "BEFORE-READ-OK", "the layer's block reads before");
    check(
        &out,
        "AFTER-READ-REFUSED",
        "and is refused once changed on disk",
    );
    check(
        &vm.sh("kairos-agent state").unwrap(),
        "CHANGED BLOCKS REFUSED in kairos-layer-0",
        "state names the layer",
    );
    // v2's own boot (its UKI under Secure Boot, PCR 11 at its prediction, the node's layer
    // images equal to the pinned ones) is tests/encrypted.rs's, on the debian image.

    // The reset entry boots the same signed UKI; its name asks for the reset, which makes
    // COS_STATE again from recovery (the changed layer and v2 go with it) and reboots.
    vm.reboot_into("autoreset").unwrap();
    drop(reg);
    let mut vm = Vm::boot_trusted(&disk, &keys, &w.join("autoreset.log")).unwrap();
    vm.wait_exit(Duration::from_secs(400))
        .expect("the reset entry resets and reboots by itself");
    drop(vm);
    {
        let state = MountGuard::partition(&disk, 4, &w.join("state-after"), "ext4").unwrap();
        let deps: Vec<String> = std::fs::read_dir(state.path.join("deployments"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            deps,
            vec![format!("{v1_id}.json")],
            "STATE made from recovery"
        );
        let history =
            std::fs::read_to_string(state.path.join(".kairos-state/history.jsonl")).unwrap();
        check(&history, "reset", "the reset is in the history");
    }
    let esp_after = w.join("esp-after");
    esp_tree(&disk, &esp_after).unwrap();
    let entries: Vec<String> = std::fs::read_dir(esp_after.join("loader/entries"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        entries.iter().all(|e| !e.starts_with("passive")),
        "no passive after a reset: {entries:?}"
    );
    let active = entries.iter().find(|e| e.starts_with("active")).unwrap();
    check(
        &std::fs::read_to_string(esp_after.join("loader/entries").join(active)).unwrap(),
        &format!("efi /kairos/{v1_id}.efi"),
        "active boots v1's signed UKI again",
    );
    let conf = std::fs::read_to_string(esp_after.join("loader/loader.conf")).unwrap_or_default();
    assert!(
        !conf.contains("default "),
        "the reset unpins its entry (else every boot would reset): {conf}"
    );

    // Refusals: the firmware's LoadImage (via systemd-boot) checks the db signature.
    expect_refused(&tampered, &keys, &w.join("tampered.log")).unwrap();
    expect_refused(&unsigned, &keys, &w.join("unsigned.log")).unwrap();
    expect_refused(&foreign, &keys, &w.join("foreign.log")).unwrap();

    // A changed layer image: the kernel boots (its UKI is intact), immucore refuses.
    // The refusal is read from the summary immucore leaves on COS_OEM (a channel of its
    // own: kernel messages can land inside console lines).
    let mut vm = Vm::boot_trusted(&bad_layer, &keys, &w.join("bad-layer.log")).unwrap();
    vm.wait_exit(Duration::from_secs(300))
        .expect("a refused boot reboots (QEMU runs with -no-reboot)");
    drop(vm);
    let oem = MountGuard::partition(&bad_layer, 2, &w.join("oem-mnt"), "ext4").unwrap();
    let summary = std::fs::read_to_string(oem.path.join("boot-failure.log")).unwrap();
    check(&summary, "KAIROS BOOT FAILED", "the failure summary");
    check(&summary, "changed on disk", "the refusal says why");
    check(&summary, &changed, "and names the layer");
    check(
        &summary,
        "does not match the signed root hash",
        "found by dm-verity, naming the block",
    );
}
