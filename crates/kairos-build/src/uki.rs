//! Trusted-boot artifacts: the owner's keys (`kairosctl keys generate`) and signed UKIs
//! (`kairosctl build uki`). The UKI's bytes come from `kairos_trust` (our PE writer, the
//! PCR 11 prediction, the signed policy); this module reads the inputs, runs `openssl` and
//! `sbsign` through the one command runner, and writes the outputs whole (a temp file
//! renamed into place), so a failed build leaves nothing half-written.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kairos_sys::exec::Cmd;
use kairos_trust::{pcr, pe, policy};

/// systemd-stub 252 (`systemd-boot-efi`).
pub const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
/// A UKI larger than this gets a warning (some firmware cannot load large EFI files).
pub const SIZE_WARN: u64 = 250 << 20;

/// The key files of a key directory, as `auroraboot genkey` names them.
pub const PCR_KEY: &str = "tpm2-pcr-private.pem";
pub const KINDS: [&str; 3] = ["PK", "KEK", "db"];

/// `kairosctl keys generate DIR`: PK, KEK and db (RSA 2048, self-signed X.509, `<T>.key`,
/// `<T>.pem`, `<T>.der`) and the PCR-policy key `tpm2-pcr-private.pem`. Refuses a
/// directory that already holds keys (overwriting an owner's keys locks them out of their
/// nodes).
pub fn generate_keys(dir: &Path, name: &str, days: u32) -> Result<Vec<PathBuf>> {
    kairos_sys::exec::require(&["openssl", "cert-to-efi-sig-list", "sign-efi-sig-list"])?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c))
    {
        bail!(
            "--name {name:?}: letters, digits, space, '-', '_' and '.' only (it goes in the certificates' CN)"
        );
    }
    for f in KINDS
        .iter()
        .flat_map(|k| [format!("{k}.key"), format!("{k}.pem")])
        .chain([PCR_KEY.to_string()])
    {
        if dir.join(&f).exists() {
            bail!(
                "{} already exists: keys are never overwritten (move them away to make new ones)",
                dir.join(&f).display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Built in a temp dir beside it, then moved in: all or nothing.
    let tmp = dir.join(format!(".keys-{}", std::process::id()));
    {
        use std::os::unix::fs::DirBuilderExt;
        // Private keys are made in it: only root may look.
        std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
    }
    let r = (|| -> Result<Vec<PathBuf>> {
        let mut made = Vec::new();
        for kind in KINDS {
            let (key, pem, der) = (
                tmp.join(format!("{kind}.key")),
                tmp.join(format!("{kind}.pem")),
                tmp.join(format!("{kind}.der")),
            );
            Cmd::new("openssl")
                .args([
                    "req", "-new", "-x509", "-newkey", "rsa:2048", "-sha256", "-nodes",
                ])
                .args(["-subj", &format!("/CN={name} {kind}/")])
                .args(["-days", &days.to_string()])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&pem)
                .run()?;
            Cmd::new("openssl")
                .args(["x509", "-outform", "DER", "-in"])
                .arg(&pem)
                .arg("-out")
                .arg(&der)
                .run()?;
            made.extend([key, pem, der]);
        }
        // Enrollment files (efitools): each certificate as an EFI signature list under one
        // owner GUID, and as a time-based authenticated variable update — PK and KEK signed
        // by PK, db by KEK — that firmware in setup mode (or systemd-boot 253+'s
        // `secure-boot-enroll`) takes from `loader/keys/auto/`.
        let guid = kairos_sys::efi::OWNER_GUID;
        for (kind, signer) in [("PK", "PK"), ("KEK", "PK"), ("db", "KEK")] {
            let esl = tmp.join(format!("{kind}.esl"));
            let auth = tmp.join(format!("{kind}.auth"));
            Cmd::new("cert-to-efi-sig-list")
                .args(["-g", guid])
                .arg(tmp.join(format!("{kind}.pem")))
                .arg(&esl)
                .run()?;
            Cmd::new("sign-efi-sig-list")
                .args(["-g", guid, "-k"])
                .arg(tmp.join(format!("{signer}.key")))
                .arg("-c")
                .arg(tmp.join(format!("{signer}.pem")))
                .arg(kind)
                .arg(&esl)
                .arg(&auth)
                .run()?;
            made.extend([esl, auth]);
        }
        let pcr = tmp.join(PCR_KEY);
        Cmd::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pcr)
            .run()?;
        made.push(pcr);
        let mut out = Vec::new();
        for f in made {
            let to = dir.join(f.file_name().unwrap_or_default());
            let private = to.extension().is_some_and(|e| e == "key") || to.ends_with(PCR_KEY);
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                &f,
                std::fs::Permissions::from_mode(if private { 0o600 } else { 0o644 }),
            )?;
            std::fs::rename(&f, &to)?;
            out.push(to);
        }
        Ok(out)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

/// Signs an EFI binary with the db key of `keys` (sbsign) and writes it to `output` whole:
/// signed into a temp file beside it, then renamed.
pub fn sign(keys: &Path, unsigned_bytes: &[u8], output: &Path, what: &str) -> Result<()> {
    kairos_sys::exec::require(&["sbsign"])?;
    for f in ["db.key", "db.pem"] {
        if !keys.join(f).is_file() {
            bail!(
                "{} is missing: {what} is signed with the db key (make a key directory with `kairosctl keys generate`)",
                keys.join(f).display()
            );
        }
    }
    let unsigned = output.with_extension("unsigned.tmp");
    let signed = output.with_extension("signed.tmp");
    kairos_sys::fs::write_atomic(&unsigned, unsigned_bytes, 0o644)
        .with_context(|| format!("writing {}", unsigned.display()))?;
    let r = Cmd::new("sbsign")
        .arg("--key")
        .arg(keys.join("db.key"))
        .arg("--cert")
        .arg(keys.join("db.pem"))
        .arg("--output")
        .arg(&signed)
        .arg(&unsigned)
        .run();
    let _ = std::fs::remove_file(&unsigned);
    if let Err(e) = r {
        let _ = std::fs::remove_file(&signed);
        return Err(e).with_context(|| format!("signing {what} with the db key"));
    }
    std::fs::rename(&signed, output).with_context(|| format!("renaming into {}", output.display()))
}

/// What a UKI is made of.
#[derive(Debug, Clone)]
pub struct UkiInput {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line, inside the signed image (loader-entry options are ignored
    /// under Secure Boot).
    pub cmdline: String,
    /// os-release text for `.osrel`.
    pub osrel: String,
    /// The key directory (`kairosctl keys generate`): `db.key`, `db.pem`,
    /// `tpm2-pcr-private.pem`.
    pub keys: PathBuf,
    pub stub: PathBuf,
}

/// What was built.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UkiReport {
    pub output: PathBuf,
    pub size: u64,
    /// PCR 11 predicted at each boot phase (hex), in order.
    pub pcr11: Vec<(String, String)>,
    /// Lint findings in the stub itself (ours add none, or the build fails).
    pub stub_findings: Vec<String>,
    pub warnings: Vec<String>,
}

/// Builds the UKI, signs it with the db key (sbsign), and writes it to `output`.
pub fn build_uki(i: &UkiInput, output: &Path) -> Result<UkiReport> {
    kairos_sys::exec::require(&["sbsign"])?;
    let read = |p: &Path, what: &str| {
        std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
    };
    let stub = read(&i.stub, "stub (Debian package systemd-boot-efi)")?;
    let kernel = read(&i.kernel, "kernel")?;
    let initrd = read(&i.initrd, "initrd")?;
    let key_text = std::fs::read_to_string(i.keys.join(PCR_KEY)).with_context(|| {
        format!(
            "reading {} (make a key directory with `kairosctl keys generate`)",
            i.keys.join(PCR_KEY).display()
        )
    })?;
    let key = policy::PcrKey::from_pem(&key_text)
        .with_context(|| i.keys.join(PCR_KEY).display().to_string())?;
    for f in ["db.key", "db.pem"] {
        if !i.keys.join(f).is_file() {
            bail!(
                "{} is missing: the UKI is signed with the db key",
                i.keys.join(f).display()
            );
        }
    }
    if i.cmdline.contains('\n') || i.cmdline.contains('\0') {
        bail!("the command line has a newline or NUL");
    }
    let pcrpkey = key.public_pem()?;
    let sections: Vec<(&str, &[u8])> = vec![
        (".osrel", i.osrel.as_bytes()),
        (".cmdline", i.cmdline.as_bytes()),
        (".pcrpkey", pcrpkey.as_bytes()),
        (".linux", &kernel),
        (".initrd", &initrd),
    ];
    let after = pcr::after_sections(sections.iter().copied());
    let pcrsig = policy::pcrsig(&key, after)?;
    let mut all = sections.clone();
    all.push((".pcrsig", pcrsig.as_bytes()));
    let uki = pe::append_sections(&stub, &all)?;
    let stub_findings = pe::lint(&stub);
    let new: Vec<String> = pe::lint(&uki)
        .into_iter()
        .filter(|f| !stub_findings.contains(f))
        .collect();
    if !new.is_empty() {
        bail!("the UKI fails the PE lint: {}", new.join("; "));
    }
    let mut warnings = Vec::new();
    if uki.len() as u64 > SIZE_WARN {
        warnings.push(format!(
            "the UKI is {} MiB (over {} MiB): some firmware cannot load EFI files this large",
            uki.len() >> 20,
            SIZE_WARN >> 20
        ));
    }
    sign(&i.keys, &uki, output, "the UKI")?;
    let size = std::fs::metadata(output)?.len();
    Ok(UkiReport {
        output: output.to_path_buf(),
        size,
        pcr11: pcr::phases(after)
            .into_iter()
            .map(|(p, v)| (p, v.hex()))
            .collect(),
        stub_findings,
        warnings,
    })
}
