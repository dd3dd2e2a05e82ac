//! Encrypted partitions (`install.encrypted_partitions`: COS_PERSISTENT, COS_OEM) in the
//! initrd, before any config-driven stage runs and while PCR 11 is still at `enter-initrd`:
//!
//! - first boot asking for it: a LUKS2 volume is made on the partition (its content kept),
//!   its key sealed into this node's TPM under the booted UKI's signed PCR-11 policy (any UKI
//!   the owner signs, the next version included, unseals it; nothing else does), a recovery
//!   key added and shown once on the console (and left in `/run/kairos/recovery-keys/`);
//! - every boot: opened with the TPM, no prompt; when the TPM refuses, the console asks for
//!   the recovery key or a passphrase (three tries).
//!
//! The work is done by the OS image's own `cryptsetup` and `systemd-cryptenroll` /
//! `systemd-cryptsetup`, chrooted into the mounted (verified) image: the initrd links no
//! libcryptsetup or TPM stack.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kairos_sys::blockdev;
use kairos_sys::luks::{self, Seal, Tools};
use kairos_sys::mount::{MountFlags, bind, mount, unmount};

use crate::boot::{SYSROOT, say};
use crate::plan::{CryptAction, Holds};

/// Where recovery keys are left for the first session (tmpfs, root only).
pub const RECOVERY_KEYS: &str = "/run/kairos/recovery-keys";
/// Where the signed policy and its key are (copied from the stub's `/.extra`).
const PCR_SIGNATURE: &str = "/run/systemd/tpm2-pcr-signature.json";
const PCR_PUBLIC_KEY: &str = "/run/systemd/tpm2-pcr-public-key.pem";

/// `/dev`, `/proc`, `/sys` and `/run` bound into the new root while its tools run; unbound
/// when dropped (before the switch moves the originals there).
pub struct ApiBinds {
    targets: Vec<String>,
}

impl ApiBinds {
    pub fn new() -> Result<ApiBinds> {
        let mut b = ApiBinds {
            targets: Vec::new(),
        };
        for m in ["/dev", "/proc", "/sys", "/run"] {
            let target = format!("{SYSROOT}{m}");
            if !Path::new(&target).is_dir() {
                bail!("the image has no {m} directory to run its encryption tools in");
            }
            bind(m, &target).with_context(|| format!("binding {m} into the new root"))?;
            b.targets.push(target);
        }
        Ok(b)
    }
}

impl Drop for ApiBinds {
    fn drop(&mut self) {
        for t in self.targets.iter().rev() {
            let _ = unmount(t, true);
        }
    }
}

/// What the partition labelled `label` holds, and its device (the LUKS container or the
/// plain filesystem); `None` when there is no such partition.
pub fn holds(label: &str) -> Result<Option<(PathBuf, Holds)>> {
    if let Some(dev) = blockdev::find_luks_by_label(label) {
        let vol = luks::read(&dev)?.with_context(|| {
            format!(
                "{} stopped being a LUKS volume while it was read",
                dev.display()
            )
        })?;
        let h = if vol.finished() {
            Holds::Luks
        } else {
            Holds::LuksUnfinished
        };
        return Ok(Some((dev, h)));
    }
    Ok(blockdev::find_by_label(label).map(|d| (d, Holds::Plain)))
}

/// The image's tools, or what is missing from it.
pub fn tools() -> Result<Tools> {
    let t = Tools {
        root: PathBuf::from(SYSROOT),
    };
    let missing = t.missing();
    if !missing.is_empty() {
        bail!(
            "the OS image lacks {} (Debian: cryptsetup-bin, systemd, e2fsprogs, and libtss2-esys-3.0.2-0 libtss2-rc0 libtss2-mu0 for the TPM): add them to the image to use install.encrypted_partitions",
            missing.join(", ")
        );
    }
    Ok(t)
}

/// What seals keys at this boot: the signed PCR-11 policy a UKI handed over, else the TPM
/// alone (a node booted without a signed UKI: the disk is tied to this TPM, not to what
/// booted).
pub fn seal_for_this_boot() -> Seal {
    if Path::new(PCR_SIGNATURE).is_file() && Path::new(PCR_PUBLIC_KEY).is_file() {
        Seal::SignedPcr11 {
            public_key: PCR_PUBLIC_KEY.into(),
            signature: PCR_SIGNATURE.into(),
        }
    } else {
        Seal::TpmOnly
    }
}

/// The opened mapping of `label` (`/dev/dm-N`).
pub fn mapped(label: &str) -> Result<PathBuf> {
    let dev = kairos_sys::dm::mapped_device(label)
        .with_context(|| format!("{label} was opened but no /dev/dm-* is named {label}"))?;
    kairos_sys::dm::udev_handover(&dev)
        .with_context(|| format!("recording {} for udev", dev.display()))?;
    Ok(dev)
}

/// Does what `action` says for the partition `label` on `dev`. `mounted_at` is where its
/// plain filesystem is mounted now (COS_OEM): its content is kept across the encryption.
pub fn apply(
    tools: &Tools,
    label: &str,
    dev: &Path,
    action: CryptAction,
    mounted_at: Option<&str>,
) -> Result<()> {
    match action {
        CryptAction::Plain | CryptAction::Skip => Ok(()),
        CryptAction::Open => open(tools, label, dev),
        CryptAction::Redo => {
            say(&format!(
                "{label}: an earlier encryption of {} was interrupted (it holds no data): making it again",
                dev.display()
            ));
            encrypt(tools, label, dev, None)
        }
        CryptAction::Encrypt => encrypt(tools, label, dev, mounted_at),
    }
}

/// The most content kept in memory while a partition is encrypted: 512 MiB, and at most a
/// quarter of the memory available.
fn stash_limit() -> u64 {
    let avail = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024 / 4)
        .unwrap_or(u64::MAX);
    avail.min(512 << 20)
}

/// Bytes of regular files under `dir` (not following links), stopping past `limit`.
fn tree_size(dir: &Path, limit: u64) -> std::io::Result<u64> {
    let mut total = 0u64;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = fs::symlink_metadata(e.path())?;
        if m.is_dir() {
            total += tree_size(&e.path(), limit.saturating_sub(total))?;
        } else if m.is_file() {
            total += m.len();
        }
        if total > limit {
            break;
        }
    }
    Ok(total)
}

/// Makes the LUKS2 volume, seals and tests its key, adds the recovery key, makes the
/// filesystem, marks the volume finished, and puts back the content that was there (from
/// `mounted_at`, or from the plain filesystem on `dev`). Content too big to keep in memory
/// leaves the partition as it is, with a warning.
fn encrypt(tools: &Tools, label: &str, dev: &Path, mounted_at: Option<&str>) -> Result<()> {
    // Refusals first, before anything is mounted or changed.
    if !Path::new("/dev/tpmrm0").exists() && !Path::new("/dev/tpm0").exists() {
        bail!(
            "install.encrypted_partitions asks for {label} to be encrypted but this node has no TPM: nothing was changed; give the node a TPM 2.0 or remove {label} from the list"
        );
    }
    let seal = seal_for_this_boot();
    if matches!(seal, Seal::TpmOnly) {
        say(&format!(
            "{label}: this boot has no signed PCR policy (not a trusted-boot UKI): the key is sealed to this TPM only, whatever boots"
        ));
    }
    // Where the plain filesystem is while its content is read (mounted here when it is not).
    let temp = format!("/run/kairos/plain-{label}");
    let was_mounted = mounted_at.is_some();
    let plain_at = match mounted_at {
        Some(m) => Some(m.to_string()),
        None if blockdev::probe(dev).is_some_and(|p| p.fstype == "ext4") => {
            fs::create_dir_all(&temp)?;
            mount(
                &dev.to_string_lossy(),
                &temp,
                "ext4",
                MountFlags::RDONLY,
                "",
            )
            .with_context(|| format!("mounting {label} to keep its content"))?;
            Some(temp.clone())
        }
        None => None,
    };
    if let Some(at) = &plain_at {
        let limit = stash_limit();
        let size = tree_size(Path::new(at), limit)?;
        if size > limit {
            if !was_mounted {
                let _ = unmount(at, false);
            }
            say(&format!(
                "{label} holds more than {} MiB: too much to keep in memory while it is encrypted, so it stays unencrypted. Encrypt at install (an empty partition), or back it up, reset it, and boot again",
                limit >> 20
            ));
            return Ok(());
        }
    }
    encrypt_keeping(tools, label, dev, &seal, plain_at.as_deref(), was_mounted)
}

fn encrypt_keeping(
    tools: &Tools,
    label: &str,
    dev: &Path,
    seal: &Seal,
    plain_at: Option<&str>,
    remount: bool,
) -> Result<()> {
    // The content is kept in memory (/run) while the partition is remade.
    let stash = format!("/run/kairos/stash-{label}");
    if let Some(m) = plain_at {
        fs::create_dir_all(&stash)?;
        crate::boot::copy_tree(Path::new(m), Path::new(&stash))
            .with_context(|| format!("keeping {label}'s content aside"))?;
        unmount(m, false).with_context(|| format!("unmounting {m} to encrypt {label}"))?;
    }
    say(&format!("{label}: encrypting {} (LUKS2)", dev.display()));
    let made = (|| -> Result<(PathBuf, String)> {
        let key = luks::random_key()?;
        tools.format(dev, label, &key)?;
        tools.enroll_tpm2(dev, &key, seal)?;
        let recovery = luks::random_key()?;
        tools.add_key(dev, &key, &recovery)?;
        tools.remove_key(dev, &key)?;
        // The sealed key must open it now, or the next boot would ask for the recovery key.
        tools.open_tpm2(dev, label).with_context(|| {
            format!("{label}: the key just sealed into the TPM does not open it")
        })?;
        let mapped = mapped(label)?;
        tools.mkfs_ext4(&mapped, label)?;
        tools.finish(dev, label)?;
        Ok((mapped, recovery))
    })();
    let (target, recovery) = match made {
        Ok((mapped, recovery)) => (mapped, Ok(recovery)),
        Err(e) => {
            // Put the partition back as it was: plain, with its content.
            let _ = tools.close(label);
            let back = luks::erase(dev)
                .map_err(anyhow::Error::from)
                .and_then(|_| Ok(tools.mkfs_ext4(dev, label)?));
            if let Err(b) = back {
                return Err(e.context(format!(
                    "encrypting {label} failed, and making it plain again failed too ({b:#}); its content is lost"
                )));
            }
            if plain_at.is_none() {
                return Err(e.context(format!(
                    "encrypting {label} failed; it was made plain again"
                )));
            }
            (dev.to_path_buf(), Err(e))
        }
    };
    if let Some(m) = plain_at {
        mount(
            &target.to_string_lossy(),
            m,
            "ext4",
            MountFlags::empty(),
            "",
        )
        .with_context(|| format!("mounting {label} on {m}"))?;
        crate::boot::copy_tree(Path::new(&stash), Path::new(m))
            .with_context(|| format!("putting {label}'s content back"))?;
        let _ = fs::remove_dir_all(&stash);
        if !remount {
            unmount(m, false).with_context(|| format!("unmounting {m}"))?;
        }
    }
    let recovery = recovery.map_err(|e| {
        e.context(format!(
            "encrypting {label} failed; it was made plain again with its content, and nothing is encrypted"
        ))
    })?;
    show_recovery_key(label, &recovery);
    say(&format!("{label}: encrypted; the TPM opens it at boot"));
    Ok(())
}

/// The recovery key goes to the console only (never the kernel log, which is kept on disk)
/// and to a root-only file in /run for the first session.
fn show_recovery_key(label: &str, key: &str) {
    let file = Path::new(RECOVERY_KEYS).join(label);
    let saved = luks::write_secret(&file, &format!("{key}\n")).is_ok();
    eprintln!(
        "\n*** Recovery key for {label} (shown once; keep it somewhere safe — it opens the disk when the TPM will not):\n\n    {key}\n\n{}",
        if saved {
            format!(
                "    (until the next reboot also in {}, readable by root only)\n",
                file.display()
            )
        } else {
            String::new()
        }
    );
}

/// Opens the volume with the TPM; when the TPM refuses, asks at the console.
fn open(tools: &Tools, label: &str, dev: &Path) -> Result<()> {
    let why = match tools.open_tpm2(dev, label) {
        Ok(()) => {
            mapped(label)?;
            say(&format!("{label}: opened with the TPM"));
            return Ok(());
        }
        Err(e) => e,
    };
    say(&format!(
        "{label}: the TPM did not release the key ({why}). The booted image is not one signed with the key this disk was sealed to, or PCR 11 is not at enter-initrd."
    ));
    for attempt in 1..=3 {
        let pass = kairos_sys::console::ask_secret(&format!(
            "Enter the recovery key or a passphrase for {label} ({attempt}/3): "
        ))
        .with_context(|| format!("{label}: no console to ask for the recovery key"))?;
        match tools.open_passphrase(dev, label, pass.trim()) {
            Ok(()) => {
                mapped(label)?;
                say(&format!("{label}: opened with a passphrase"));
                return Ok(());
            }
            Err(_) => say(&format!("{label}: that key does not open it")),
        }
    }
    bail!(
        "{label} stays locked: the TPM refused and no passphrase opened it. Boot the previous entry (or recovery), and run `kairos-agent state` there: it shows whether PCR 11 matches the booted UKI's signed policy"
    )
}
