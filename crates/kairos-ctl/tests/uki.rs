//! `kairosctl keys generate` and `kairosctl build uki` with the real tools (openssl, sbsign,
//! systemd-stub 252, systemd-measure): the keys, a UKI whose signature `sbverify` accepts
//! with our db certificate and refuses with another's or after one changed byte, sections
//! holding what went in, PCR 11 as systemd predicts it, and a `.pcrsig` the PCR key signed.
//! The kernel and initrd are random bytes: nothing boots here (the VM tests boot).

use std::path::Path;
use std::process::Command;

use kairos_trust::{pcr, pe, policy};

fn kairosctl(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kairosctl"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var_os("CI").is_none(),
        "{tool} is missing: scripts/setup installs it"
    );
    ok
}

fn sbverify(cert: &Path, efi: &Path) -> bool {
    Command::new("sbverify")
        .arg("--cert")
        .arg(cert)
        .arg(efi)
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn keys_and_a_signed_uki() {
    if !(have("openssl")
        && have("sbsign")
        && have("sbverify")
        && have("sign-efi-sig-list")
        && Path::new(kairos_build_stub()).exists())
    {
        eprintln!("skipped: openssl, sbsigntool, efitools or systemd-boot-efi missing");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let keys = d.path().join("keys");
    let k = keys.to_str().unwrap();
    let (ok, out, err) = kairosctl(&["keys", "generate", k, "--name", "Test Owner"]);
    assert!(ok, "{err}");
    for f in [
        "PK.key",
        "PK.pem",
        "PK.der",
        "KEK.pem",
        "db.key",
        "db.pem",
        "tpm2-pcr-private.pem",
    ] {
        assert!(out.contains(f), "{out}");
        assert!(keys.join(f).is_file(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |f: &str| {
        std::fs::metadata(keys.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("db.key"), 0o600);
    assert_eq!(mode("tpm2-pcr-private.pem"), 0o600);
    assert_eq!(mode("db.pem"), 0o644);
    // Enrollment files: db.esl holds db's certificate; each .auth is an authenticated
    // variable (EFI_TIME, a PKCS#7 WIN_CERTIFICATE_UEFI_GUID) followed by its signature list.
    use der::{Decode, Encode};
    let esl = std::fs::read(keys.join("db.esl")).unwrap();
    let certs = kairos_trust::signature::parse_signature_lists(&esl).unwrap();
    let der = std::fs::read(keys.join("db.der")).unwrap();
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].to_der().unwrap(), der);
    x509_cert::Certificate::from_der(&der).unwrap();
    for kind in ["PK", "KEK", "db"] {
        let auth = std::fs::read(keys.join(format!("{kind}.auth"))).unwrap();
        let esl = std::fs::read(keys.join(format!("{kind}.esl"))).unwrap();
        let cert_len = u32::from_le_bytes(auth[16..20].try_into().unwrap()) as usize;
        assert_eq!(
            &auth[24..40],
            &[
                0x9d, 0xd2, 0xaf, 0x4a, 0xdf, 0x68, 0xee, 0x49, 0x8a, 0xa9, 0x34, 0x7d, 0x37, 0x56,
                0x65, 0xa7
            ],
            "{kind}.auth: EFI_CERT_TYPE_PKCS7_GUID"
        );
        assert_eq!(
            &auth[16 + cert_len..],
            &esl[..],
            "{kind}.auth ends with {kind}.esl"
        );
    }
    let (ok, _, err) = kairosctl(&["keys", "generate", k]);
    assert!(!ok && err.contains("never overwritten"), "{err}");

    let kernel: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 256) as u8).collect();
    let initrd = b"070701 an initrd".to_vec();
    std::fs::write(d.path().join("vmlinuz"), &kernel).unwrap();
    std::fs::write(d.path().join("initrd"), &initrd).unwrap();
    let uki = d.path().join("kairos.efi");
    let p = |n: &str| d.path().join(n).to_string_lossy().into_owned();
    let (ok, out, err) = kairosctl(&[
        "build",
        "uki",
        "--kernel",
        &p("vmlinuz"),
        "--initrd",
        &p("initrd"),
        "--cmdline",
        "console=ttyS0 rd.kairos.verify=1",
        "--keys",
        k,
        "--output",
        &p("kairos.efi"),
        "--json",
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();

    // Signed by our db key, and only that.
    assert!(sbverify(&keys.join("db.pem"), &uki));
    let other = d.path().join("other");
    let (ok, _, err) = kairosctl(&["keys", "generate", other.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(!sbverify(&other.join("db.pem"), &uki));
    let mut bytes = std::fs::read(&uki).unwrap();

    // What went in is there.
    let img = pe::Pe::parse(&bytes).unwrap();
    let data = |n: &str| {
        img.section(n)
            .unwrap_or_else(|| panic!("{n}"))
            .data(&bytes)
            .to_vec()
    };
    assert_eq!(data(".linux"), kernel);
    assert_eq!(data(".initrd"), initrd);
    assert_eq!(data(".cmdline"), b"console=ttyS0 rd.kairos.verify=1");
    assert!(
        String::from_utf8(data(".osrel"))
            .unwrap()
            .contains("ID=kairos")
    );

    // PCR 11 as systemd-measure computes it from the same sections.
    let measure = "/usr/lib/systemd/systemd-measure";
    if Path::new(measure).exists() {
        let mut cmd = Command::new(measure);
        cmd.args(["calculate", "--bank=sha256", "--json=short"]);
        for n in ["linux", "osrel", "cmdline", "initrd", "pcrpkey"] {
            let f = d.path().join(format!("sec-{n}"));
            std::fs::write(&f, data(&format!(".{n}"))).unwrap();
            cmd.arg(format!("--{n}={}", f.display()));
        }
        let o = cmd.output().unwrap();
        let theirs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for (i, t) in theirs["sha256"].as_array().unwrap().iter().enumerate() {
            assert_eq!(report["pcr11"][i][0], t["phase"]);
            assert_eq!(report["pcr11"][i][1], t["hash"]);
        }
    }

    // .pcrsig: the policy of PCR 11 at enter-initrd (the only phase a sealed key may
    // unseal in), signed with the PCR key.
    let key = policy::PcrKey::from_pem(
        &std::fs::read_to_string(keys.join("tpm2-pcr-private.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(data(".pcrpkey")).unwrap(),
        key.public_pem().unwrap()
    );
    let sig: serde_json::Value = serde_json::from_slice(&data(".pcrsig")).unwrap();
    let entries = sig["sha256"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "enter-initrd only");
    assert_eq!(report["pcr11"][0][0], "enter-initrd");
    for (i, e) in entries.iter().enumerate() {
        let hex = report["pcr11"][i][1].as_str().unwrap();
        let mut v = [0u8; 32];
        for (j, b) in v.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[j * 2..j * 2 + 2], 16).unwrap();
        }
        let pol = pcr::policy_pcr11(&pcr::Pcr(v));
        assert_eq!(e["pol"], pcr::hex(&pol));
        use base64::Engine;
        let s = base64::engine::general_purpose::STANDARD
            .decode(e["sig"].as_str().unwrap())
            .unwrap();
        assert!(key.verify(&pol, &s));
    }

    // One changed byte in the kernel: the signature no longer holds.
    let l = img.section(".linux").unwrap().raw_offset as usize;
    bytes[l + 100] ^= 1;
    let tampered = d.path().join("tampered.efi");
    std::fs::write(&tampered, &bytes).unwrap();
    assert!(!sbverify(&keys.join("db.pem"), &tampered));

    // Refusals: a key dir without the PCR key, a missing kernel; no output left behind.
    // Each fails with the file named, and leaves no output behind.
    let refused = |kernel: &str, keys: &str, want: &[&str]| {
        let (ok, _, err) = kairosctl(&[
            "build",
            "uki",
            "--kernel",
            kernel,
            "--initrd",
            &p("initrd"),
            "--keys",
            keys,
            "--output",
            &p("bad.efi"),
        ]);
        assert!(!ok && want.iter().all(|w| err.contains(w)), "{err}");
        assert!(!d.path().join("bad.efi").exists());
    };
    refused(&p("nope"), k, &["kernel", "nope"]);
    refused(
        &p("vmlinuz"),
        d.path().to_str().unwrap(),
        &["tpm2-pcr-private.pem", "keys generate"],
    );
}

fn kairos_build_stub() -> &'static str {
    "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
}
