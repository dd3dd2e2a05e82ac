//! Our Authenticode check against real signatures: systemd-boot signed by `sbsign`
//! (sbsigntool) with keys from `openssl`, a firmware `db` made by efitools'
//! `cert-to-efi-sig-list`. Accepted when the signer is in db or issued by a db certificate;
//! refused, with both names, when signed by someone else; refused when one byte changed or
//! unsigned.

use std::path::Path;
use std::process::Command;

use der::Decode;
use kairos_trust::signature::{
    SigError, SignatureLists, parse_all_signature_lists, parse_signature_lists, verify,
    verify_not_revoked,
};
use x509_cert::Certificate;

const SDBOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A self-signed certificate and key: `dir/name.{key,pem}`.
fn self_signed(dir: &Path, name: &str) {
    run(Command::new("openssl")
        .args([
            "req", "-new", "-x509", "-nodes", "-newkey", "rsa:2048", "-days", "1",
        ])
        .arg("-subj")
        .arg(format!("/CN={name}/"))
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.pem"))));
}

fn cert(dir: &Path, name: &str) -> Certificate {
    let pem = std::fs::read_to_string(dir.join(format!("{name}.pem"))).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Certificate::from_der(&der).unwrap()
}

fn sign(dir: &Path, name: &str, input: &Path, out: &Path) {
    run(Command::new("sbsign")
        .arg("--key")
        .arg(dir.join(format!("{name}.key")))
        .arg("--cert")
        .arg(dir.join(format!("{name}.pem")))
        .arg("--output")
        .arg(out)
        .arg(input));
}

fn tools() -> bool {
    let ok = ["openssl", "sbsign", "cert-to-efi-sig-list"]
        .iter()
        .all(|t| {
            Command::new("which")
                .arg(t)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        && Path::new(SDBOOT).exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl, sbsigntool, efitools and systemd-boot-efi are needed (scripts/setup)"
        );
        eprintln!("skipped: openssl, sbsigntool, efitools or systemd-boot-efi missing");
    }
    ok
}

#[test]
fn authenticode_against_db() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    self_signed(p, "owner-db");
    self_signed(p, "stranger");
    let signed = p.join("signed.efi");
    sign(p, "owner-db", Path::new(SDBOOT), &signed);

    // db as firmware holds it, made by efitools; our parser reads the certificate back.
    run(Command::new("cert-to-efi-sig-list")
        .arg(p.join("owner-db.pem"))
        .arg(p.join("db.esl")));
    let db = parse_signature_lists(&std::fs::read(p.join("db.esl")).unwrap()).unwrap();
    assert_eq!(db, vec![cert(p, "owner-db")]);

    let image = std::fs::read(&signed).unwrap();
    let ok = verify(&image, &db).unwrap();
    assert_eq!(ok.signer, "CN=owner-db");
    assert_eq!(ok.trusted_by, "CN=owner-db");

    // Signed by someone else: refused with both names.
    let foreign = p.join("foreign.efi");
    sign(p, "stranger", Path::new(SDBOOT), &foreign);
    let e = verify(&std::fs::read(&foreign).unwrap(), &db).unwrap_err();
    assert_eq!(
        e.to_string(),
        "it is signed by CN=stranger, but the firmware trusts CN=owner-db"
    );
    assert!(matches!(
        verify(&image, &[]).unwrap_err(),
        SigError::NotTrusted { .. }
    ));

    // One byte changed in a section: the digest no longer matches.
    let mut changed = image.clone();
    let pe = kairos_trust::pe::Pe::parse(&image).unwrap();
    let text = pe.section(".text").unwrap();
    changed[text.raw_offset as usize + 100] ^= 1;
    assert_eq!(verify(&changed, &db).unwrap_err(), SigError::Changed);

    // Unsigned, and not a PE at all.
    let raw = std::fs::read(SDBOOT).unwrap();
    assert_eq!(verify(&raw, &db).unwrap_err(), SigError::Unsigned);
    assert!(matches!(verify(b"MZ", &db).unwrap_err(), SigError::Pe(_)));

    // A db holding a CA: an image signed by a certificate the CA issued is accepted.
    self_signed(p, "ca");
    run(Command::new("openssl")
        .args([
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "rsa:2048",
            "-subj",
            "/CN=leaf/",
        ])
        .arg("-keyout")
        .arg(p.join("leaf.key"))
        .arg("-out")
        .arg(p.join("leaf.csr")));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-sha256", "-set_serial", "7"])
        .arg("-in")
        .arg(p.join("leaf.csr"))
        .arg("-CA")
        .arg(p.join("ca.pem"))
        .arg("-CAkey")
        .arg(p.join("ca.key"))
        .arg("-out")
        .arg(p.join("leaf.pem")));
    let leaf_signed = p.join("leaf.efi");
    sign(p, "leaf", Path::new(SDBOOT), &leaf_signed);
    let ok = verify(&std::fs::read(&leaf_signed).unwrap(), &[cert(p, "ca")]).unwrap();
    assert_eq!(
        (ok.signer.as_str(), ok.trusted_by.as_str()),
        ("CN=leaf", "CN=ca")
    );
    // …but not by a CA that did not issue it.
    assert!(
        verify(
            &std::fs::read(&leaf_signed).unwrap(),
            &[cert(p, "stranger")]
        )
        .is_err()
    );
}

/// `dbx` as efitools makes it: one list with the image's Authenticode digest
/// (`hash-to-efi-sig-list`), one with a certificate. Either revokes the image even though db
/// trusts its signer; a dbx naming other things does not.
#[test]
fn dbx_revokes_by_digest_and_by_certificate() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    self_signed(p, "owner-db");
    self_signed(p, "stranger");
    let signed = p.join("signed.efi");
    sign(p, "owner-db", Path::new(SDBOOT), &signed);
    let image = std::fs::read(&signed).unwrap();
    let db = vec![cert(p, "owner-db")];
    let esl = |args: &[&Path], tool: &str, out: &str| {
        let mut c = Command::new(tool);
        c.args(args).arg(p.join(out));
        run(&mut c);
        parse_all_signature_lists(&std::fs::read(p.join(out)).unwrap()).unwrap()
    };
    let empty = SignatureLists::default();
    assert!(verify_not_revoked(&image, &db, &empty).is_ok());

    // By digest: efitools computes the same Authenticode digest we do.
    let by_hash = esl(&[&signed], "hash-to-efi-sig-list", "dbx-hash.esl");
    assert_eq!(by_hash.sha256.len(), 1);
    let e = verify_not_revoked(&image, &db, &by_hash).unwrap_err();
    assert!(
        matches!(&e, SigError::Revoked(w) if w.starts_with("its digest ")),
        "{e}"
    );
    // (Signing leaves the digest as it was: the unsigned binary's hash revokes it too.)
    let unsigned = esl(
        &[Path::new(SDBOOT)],
        "hash-to-efi-sig-list",
        "dbx-unsigned.esl",
    );
    assert_eq!(unsigned.sha256, by_hash.sha256);
    // Another image's digest revokes nothing here.
    let other = esl(
        &[Path::new("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")],
        "hash-to-efi-sig-list",
        "dbx-other.esl",
    );
    assert!(verify_not_revoked(&image, &db, &other).is_ok());

    // By certificate: the signer's.
    let by_cert = esl(
        &[&p.join("owner-db.pem")],
        "cert-to-efi-sig-list",
        "dbx-cert.esl",
    );
    assert_eq!(
        verify_not_revoked(&image, &db, &by_cert)
            .unwrap_err()
            .to_string(),
        "the firmware's dbx revokes it (certificate CN=owner-db)"
    );
    let stranger = esl(
        &[&p.join("stranger.pem")],
        "cert-to-efi-sig-list",
        "dbx-stranger.esl",
    );
    assert!(verify_not_revoked(&image, &db, &stranger).is_ok());
    // Both kinds in one variable, as a real dbx holds them.
    let mut both = std::fs::read(p.join("dbx-stranger.esl")).unwrap();
    both.extend(std::fs::read(p.join("dbx-hash.esl")).unwrap());
    let both = parse_all_signature_lists(&both).unwrap();
    assert_eq!((both.certs.len(), both.sha256.len()), (1, 1));
    assert!(verify_not_revoked(&image, &db, &both).is_err());
}
