//! Tier 3: install from a trusted ISO and disk encryption, under trusted boot (OVMF Secure
//! Boot with the owner's keys, swtpm with a fresh state), on the `debian` image (systemd's
//! cryptsetup tools; busybox `tiny` has none). One disk, four boots:
//!
//! 0. the signed ISO (`build iso --trusted`) boots live under Secure Boot and installs itself
//!    (the medium's UKI checked against the firmware's db first);
//! 1. the installed disk's first boot, with `install.encrypted_partitions: [COS_PERSISTENT,
//!    COS_OEM]`: both become LUKS2 volumes sealed to the signed PCR-11 policy (no literal
//!    PCR), their content kept (the cloud-config on OEM, a file on PERSISTENT), recovery keys
//!    shown once; then an upgrade to v2 with its owner-signed UKI;
//! 2. v2 boots and opens both with the TPM, no prompt (the new UKI's own signed policy);
//! 3. a UKI the firmware accepts (owner's db key) but whose PCR policy another key signed
//!    boots, the TPM refuses, the console asks; the recovery keys open the disks.

use std::path::Path;
use std::time::Duration;

use kairos_e2e::{
    MountGuard, Vm, blank_disk, check, debian_rootfs, esp_tree, guest_pcr11, guest_ref,
    image_in_registry, image_with_files, kairosctl, put_on_esp, start_registry, user_net_stage,
};

/// The images here check their layers lazily (dm-verity on each read, no read-through at
/// boot): tests/trusted.rs covers the read-through, this covers the option — and saves the
/// debian image's read-through at each of four boots.
const LAZY_CMDLINE: &str = "console=tty1 console=ttyS0,115200 rd.kairos.verity=lazy";
const PROMPT: &str = "Enter the recovery key or a passphrase for";

fn config() -> String {
    format!(
        "#cloud-config
users:
- name: root
  passwd: sealed
install:
  auto: true
  device: auto
  reboot: true
  encrypted_partitions:
  - COS_PERSISTENT
  - COS_OEM
{}",
        user_net_stage()
    )
}

/// The first line of a `sh` result.
fn first_line(out: &str) -> String {
    out.lines().next().unwrap_or("").trim().to_string()
}

/// Checks the volume on `dev` in the guest: LUKS2, one systemd-tpm2 token bound to the
/// signed policy of PCR 11 and to no literal PCR.
fn check_sealed(vm: &mut Vm, dev: &str, label: &str) {
    let out = vm
        .sh(&format!("cryptsetup luksDump --dump-json-metadata {dev}"))
        .unwrap();
    let json = out
        .rsplit_once("[exit 0]")
        .map(|(j, _)| j)
        .unwrap_or_else(|| {
            panic!("{label}: luksDump of {dev} failed:\n{out}");
        });
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let tpm: Vec<&serde_json::Value> = v["tokens"]
        .as_object()
        .unwrap()
        .values()
        .filter(|t| t["type"] == "systemd-tpm2")
        .collect();
    assert_eq!(tpm.len(), 1, "{label}: one TPM2 token: {v}");
    // systemd 252 spells these two fields with underscores.
    assert_eq!(
        tpm[0]["tpm2_pubkey_pcrs"],
        serde_json::json!([11]),
        "{label}: sealed to the signed PCR-11 policy: {}",
        tpm[0]
    );
    assert!(
        tpm[0]["tpm2_pubkey"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "{label}: the policy key is recorded: {}",
        tpm[0]
    );
    let literal = tpm[0]["tpm2-pcrs"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(literal, 0, "{label}: no literal PCR bound: {}", tpm[0]);
    // Two keyslots: the TPM's and the recovery key (the first, random one was removed).
    assert_eq!(
        v["keyslots"].as_object().unwrap().len(),
        2,
        "{label}: TPM + recovery keyslots"
    );
}

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn encrypted_node_unlocks_by_itself_across_an_upgrade_and_not_under_a_foreign_policy() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let keys = w.join("keys");
    let other = w.join("other-keys");
    for (dir, name) in [(&keys, "owner"), (&other, "stranger")] {
        kairosctl(&["keys", "generate", &dir.to_string_lossy(), "--name", name]).unwrap();
    }
    // The owner's db key (the firmware accepts it) with another PCR-policy key.
    let mixed = w.join("mixed-keys");
    std::fs::create_dir_all(&mixed).unwrap();
    for e in std::fs::read_dir(&keys).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, mixed.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        other.join("tpm2-pcr-private.pem"),
        mixed.join("tpm2-pcr-private.pem"),
    )
    .unwrap();

    let reg = start_registry().unwrap();
    let v1 = image_in_registry(&reg, &debian_rootfs(), "debian").unwrap();
    let v2 = image_with_files(
        &v1,
        &[("etc/kairos-e2e-version", b"v2\n")],
        &format!("{}/kairos/debian:v2", reg.addr),
    )
    .unwrap();
    let disk = w.join("disk.raw");
    let iso = w.join("install.iso");
    std::fs::write(w.join("cc.yaml"), config()).unwrap();
    kairosctl(&[
        "build",
        "iso",
        "--image",
        &v1,
        "--output",
        &iso.to_string_lossy(),
        "--cloud-config",
        &w.join("cc.yaml").to_string_lossy(),
        "--trusted",
        "--keys",
        &keys.to_string_lossy(),
        "--cmdline",
        LAZY_CMDLINE,
    ])
    .unwrap();
    blank_disk(&disk, 4096).unwrap();
    let uki = |keys: &Path, out: &Path| {
        kairosctl(&[
            "build",
            "uki",
            "--image",
            &v2,
            "--keys",
            &keys.to_string_lossy(),
            "--output",
            &out.to_string_lossy(),
            "--cmdline",
            LAZY_CMDLINE,
        ])
        .unwrap()
    };
    let foreign = w.join("v2-foreign-policy.efi");
    uki(&mixed, &foreign);
    // 0. The signed ISO boots live under Secure Boot and installs itself.
    let mut vm = Vm::boot_trusted_with(&disk, Some(&iso), &keys, &w.join("live.log")).unwrap();
    vm.wait_for("installed: ", Duration::from_secs(900))
        .unwrap();
    vm.wait_exit(Duration::from_secs(300)).unwrap();
    let live = vm.output();
    drop(vm);
    check(
        &live,
        "trusted by the firmware's",
        "the medium's UKI checked",
    );
    {
        let esp = w.join("esp");
        esp_tree(&disk, &esp).unwrap();
        let entries = std::fs::read_to_string(esp.join("loader/entries/active.conf")).unwrap();
        check(
            &entries,
            "efi /kairos/",
            "the installed entry boots the signed UKI",
        );
        assert!(esp.join("loader/keys/auto/db.auth").is_file());
    }
    {
        // v2's UKI reaches the node on COS_PERSISTENT, which the first boot encrypts.
        let p = MountGuard::partition(&disk, 5, &w.join("persistent-mnt"), "ext4").unwrap();
        std::fs::create_dir_all(p.path.join("ukis")).unwrap();
        uki(&keys, &p.path.join("ukis/v2.efi"));
    }
    // What PCR 11 may read in v2 once the initrd is left, from its UKI's bytes: after
    // leave-initrd, and on this systemd OS also after systemd-pcrphase's sysinit and ready.
    let v2_after_initrd: Vec<(String, String)> = {
        let p = MountGuard::partition(&disk, 5, &w.join("persistent-mnt"), "ext4").unwrap();
        let bytes = std::fs::read(p.path.join("ukis/v2.efi")).unwrap();
        kairos_trust::pcr::predict_uki(&bytes)
            .unwrap()
            .into_iter()
            .skip(1)
            .map(|(phase, v)| (phase, v.hex()))
            .collect()
    };

    // 1. First boot: both partitions encrypted, content kept, recovery keys shown once.
    let mut vm = Vm::boot_trusted(&disk, &keys, &w.join("first.log")).unwrap();
    vm.login("root", "sealed").unwrap();
    check(
        &vm.sh("cat /sys/block/dm-*/dm/name").unwrap(),
        "COS_",
        "opened volumes",
    );
    let names = vm.sh("cat /sys/block/dm-*/dm/name | sort").unwrap();
    check(&names, "COS_OEM\nCOS_PERSISTENT", "both volumes opened");
    let mounts = vm.sh("grep -E ' /(oem|usr/local) ' /proc/mounts").unwrap();
    assert_eq!(
        mounts.matches("/dev/dm-").count(),
        2,
        "/oem and /usr/local are the opened volumes:\n{mounts}"
    );
    check_sealed(&mut vm, "/dev/vda2", "COS_OEM");
    check_sealed(&mut vm, "/dev/vda5", "COS_PERSISTENT");
    check(
        &vm.sh("ls -l /usr/local/ukis/v2.efi").unwrap(),
        "[exit 0]",
        "PERSISTENT's content kept through the encryption",
    );
    let rk_persistent = first_line(
        &vm.sh("cat /run/kairos/recovery-keys/COS_PERSISTENT")
            .unwrap(),
    );
    let rk_oem = first_line(&vm.sh("cat /run/kairos/recovery-keys/COS_OEM").unwrap());
    assert_eq!(rk_persistent.len(), 71, "recovery key: {rk_persistent}");
    assert_ne!(rk_persistent, rk_oem);
    assert!(
        vm.output().contains(&rk_persistent),
        "the recovery key is shown on the console"
    );
    check(
        &vm.sh(&format!(
            "dmesg | grep -c {rk_oem}; journalctl -b | grep -c {rk_oem}"
        ))
        .unwrap(),
        "0\n0\n",
        "the recovery key is not in the kernel log or the journal",
    );
    let state = vm.sh("kairos-agent state").unwrap();
    check(
        &state,
        "encrypted:  COS_PERSISTENT on /dev/vda5 (open as /dev/dm-",
        "state: the volume",
    );
    check(&state, "key sealed in the TPM", "state: the seal");
    check(
        &state,
        "recovery key not saved yet: /run/kairos/recovery-keys/COS_PERSISTENT",
        "state: the recovery key to save",
    );
    vm.sh("echo kept > /usr/local/marker; sync").unwrap();
    let out = vm
        .sh(&format!(
            "kairos-agent upgrade --insecure --source {} --uki /usr/local/ukis/v2.efi 2>&1",
            guest_ref(&v2)
        ))
        .unwrap();
    check(&out, "[exit 0]", "the upgrade to v2");
    let v2_id = first_line(&vm.sh("kairos-agent state get next_boot").unwrap());
    vm.send("reboot").unwrap();
    vm.wait_exit(Duration::from_secs(180)).unwrap();
    drop(vm);
    drop(reg);

    // 2. v2 opens both volumes with the TPM on its first boot, no prompt.
    let mut vm = Vm::boot_trusted(&disk, &keys, &w.join("v2.log")).unwrap();
    vm.login("root", "sealed").unwrap();
    check(
        &vm.sh("cat /etc/kairos-e2e-version").unwrap(),
        "v2",
        "v2 booted",
    );
    check(
        &vm.sh("kairos-agent state get booted").unwrap(),
        &v2_id,
        "v2's deployment: the layers the node made are the ones the workstation pinned",
    );
    check(
        &vm.sh("kairos-agent state").unwrap(),
        "behind dm-verity (signed root hashes), no changed block seen",
        "v2's layers (made by the node) verified against the workstation's roots",
    );
    let pcr11 = guest_pcr11(&mut vm).unwrap();
    assert!(
        v2_after_initrd.iter().any(|(_, v)| *v == pcr11),
        "PCR 11 after the upgrade is v2's prediction at a phase after the initrd: {pcr11} not in {v2_after_initrd:?}"
    );
    check(
        &vm.sh("cat /usr/local/marker").unwrap(),
        "kept\n[exit 0]",
        "PERSISTENT opened under v2",
    );
    assert!(!vm.output().contains(PROMPT), "no prompt after the upgrade");
    check(
        &vm.sh("systemctl is-system-running --wait; findmnt -no SOURCE /usr/local")
            .unwrap(),
        "/dev/",
        "systemd took the opened volumes as they are",
    );
    // For docs/trusted-boot.md's numbers (shown with --nocapture): what opening cost.
    eprintln!(
        "v2 boot timeline: {}",
        vm.sh("cat /run/kairos/boot-timeline.json").unwrap()
    );
    vm.send("poweroff").unwrap();
    vm.wait_exit(Duration::from_secs(180)).unwrap();
    drop(vm);

    // 3. A UKI the firmware boots but whose PCR policy is not the owner's: the TPM refuses,
    //    the console asks, the recovery keys open the disks.
    put_on_esp(&disk, &foreign, &format!("kairos/{v2_id}.efi")).unwrap();
    let mut vm = Vm::boot_trusted(&disk, &keys, &w.join("foreign.log")).unwrap();
    vm.wait_for(&format!("{PROMPT} COS_OEM"), Duration::from_secs(400))
        .unwrap();
    vm.send("not-the-key").unwrap();
    vm.wait_for(&format!("{PROMPT} COS_OEM (2/3)"), Duration::from_secs(60))
        .unwrap();
    vm.send(&rk_oem).unwrap();
    vm.wait_for(
        &format!("{PROMPT} COS_PERSISTENT"),
        Duration::from_secs(120),
    )
    .unwrap();
    vm.send(&rk_persistent).unwrap();
    vm.login("root", "sealed").unwrap();
    check(
        &vm.sh("cat /usr/local/marker").unwrap(),
        "kept\n[exit 0]",
        "the recovery key opened PERSISTENT",
    );
    check(
        &vm.output(),
        "the TPM did not release the key",
        "the refusal is explained",
    );
}
