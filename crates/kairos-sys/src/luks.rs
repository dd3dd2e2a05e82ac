//! LUKS2 volumes for `install.encrypted_partitions`: recognising a LUKS header and reading
//! its tokens (pure parsers, bounded), and formatting, enrolling and opening volumes with the
//! OS image's own `cryptsetup` and systemd tools, run chrooted into the mounted OS — the
//! initrd carries no libcryptsetup or libtss2; the (verified) image does.
//!
//! Kairos' conventions: the LUKS header's label is the partition's label (`COS_PERSISTENT`),
//! the filesystem inside carries the same label, the mapping is `/dev/mapper/<label>`. A
//! volume being set up carries the LUKS subsystem [`SUBSYSTEM_NEW`] until its filesystem is
//! made, then [`SUBSYSTEM`]: a power cut in between leaves a volume that says it holds no data.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::exec::{Cmd, ExecError};

/// The LUKS magic at the start of a volume.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// The subsystem of a finished Kairos volume.
pub const SUBSYSTEM: &str = "kairos";
/// The subsystem of a volume whose set-up has not finished (it holds no data yet).
pub const SUBSYSTEM_NEW: &str = "kairos-new";
/// The LUKS2 token systemd-cryptenroll writes for a TPM2-sealed key.
pub const TPM2_TOKEN: &str = "systemd-tpm2";
/// The largest LUKS2 header (binary + JSON) read; cryptsetup's maximum is 4 MiB.
pub const MAX_HEADER: u64 = 4 << 20;

// Inside the OS image.
const CRYPTSETUP: &str = "/usr/sbin/cryptsetup";
const CRYPTENROLL: &str = "/usr/bin/systemd-cryptenroll";
const SYSTEMD_CRYPTSETUP: &str = "/usr/lib/systemd/systemd-cryptsetup";
const MKFS_EXT4: &str = "/usr/sbin/mkfs.ext4";

/// What a LUKS header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub uuid: String,
    /// LUKS2 only.
    pub label: Option<String>,
    /// LUKS2 only.
    pub subsystem: Option<String>,
    /// LUKS2: the binary + JSON header size.
    pub hdr_size: u64,
}

fn cstr(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Parses the binary LUKS header at the start of `head` (LUKS2: magic, version 2 (BE) at 6,
/// hdr_size at 8, label at 24, uuid at 168, subsystem at 208; LUKS1: uuid at 168).
pub fn parse_header(head: &[u8]) -> Option<Header> {
    if head.len() < 512 || &head[..6] != MAGIC {
        return None;
    }
    let version = u16::from_be_bytes([head[6], head[7]]);
    let uuid = cstr(&head[168..208]).unwrap_or_default();
    match version {
        1 => Some(Header {
            version,
            uuid,
            label: None,
            subsystem: None,
            hdr_size: 0,
        }),
        2 => Some(Header {
            version,
            uuid,
            label: cstr(&head[24..72]),
            subsystem: cstr(&head[208..256]),
            hdr_size: u64::from_be_bytes(head[8..16].try_into().ok()?),
        }),
        _ => None,
    }
}

/// The token types in a LUKS2 JSON metadata area (`{"tokens": {"0": {"type": …}}}`).
pub fn token_types(json: &[u8]) -> Result<Vec<String>, LuksError> {
    let end = json.iter().position(|&c| c == 0).unwrap_or(json.len());
    let v: serde_json::Value = serde_json::from_slice(&json[..end])
        .map_err(|e| LuksError::Header(format!("the LUKS2 JSON metadata does not parse: {e}")))?;
    let mut types: Vec<String> = v["tokens"]
        .as_object()
        .map(|t| {
            t.values()
                .filter_map(|t| t["type"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    types.sort();
    Ok(types)
}

#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    #[error("{0}")]
    Header(String),
    #[error("{dev}: {source}")]
    Io {
        dev: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// A LUKS volume on disk: its header and its token types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub header: Header,
    pub tokens: Vec<String>,
}

impl Volume {
    /// Whether Kairos finished setting it up (its filesystem was made).
    pub fn finished(&self) -> bool {
        self.header.subsystem.as_deref() != Some(SUBSYSTEM_NEW)
    }
}

/// Reads the LUKS header of `dev`, if it has one (bounded by [`MAX_HEADER`]).
pub fn read(dev: &Path) -> Result<Option<Volume>, LuksError> {
    let io = |source| LuksError::Io {
        dev: dev.display().to_string(),
        source,
    };
    let mut f = fs::File::open(dev).map_err(io)?;
    let mut bin = vec![0u8; 4096];
    f.read_exact(&mut bin).map_err(io)?;
    let Some(header) = parse_header(&bin) else {
        return Ok(None);
    };
    if header.version != 2 {
        return Ok(Some(Volume {
            header,
            tokens: Vec::new(),
        }));
    }
    if header.hdr_size <= 4096 || header.hdr_size > MAX_HEADER {
        return Err(LuksError::Header(format!(
            "{}: LUKS2 header size {} is out of range",
            dev.display(),
            header.hdr_size
        )));
    }
    let mut json = vec![0u8; (header.hdr_size - 4096) as usize];
    f.seek(SeekFrom::Start(4096)).map_err(io)?;
    f.read_exact(&mut json).map_err(io)?;
    let tokens =
        token_types(&json).map_err(|e| LuksError::Header(format!("{}: {e}", dev.display())))?;
    Ok(Some(Volume { header, tokens }))
}

/// A fresh random key for a volume's first keyslot or its recovery key: 256 bits, written
/// as eight dash-separated groups of eight characters from systemd's "modhex" alphabet (what
/// `systemd-cryptenroll --recovery-key` prints, easy to type on any keyboard layout).
pub fn random_key() -> std::io::Result<String> {
    const MODHEX: &[u8; 16] = b"cbdefghijklnrtuv";
    let mut raw = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let mut s = String::with_capacity(71);
    for (i, b) in raw.iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            s.push('-');
        }
        s.push(MODHEX[(b >> 4) as usize] as char);
        s.push(MODHEX[(b & 15) as usize] as char);
    }
    Ok(s)
}

/// What seals a volume's key into the TPM.
#[derive(Debug, Clone)]
pub enum Seal {
    /// The signed PCR-11 policy of the booted UKI: the public key and the signature JSON
    /// (paths inside the OS root, e.g. `/run/systemd/tpm2-pcr-public-key.pem`).
    SignedPcr11 {
        public_key: String,
        signature: String,
    },
    /// No PCR bound: the key unseals on this TPM only (a disk moved elsewhere stays locked),
    /// whatever booted. For nodes without a signed UKI.
    TpmOnly,
}

/// The OS image's encryption tools, run chrooted into `root` (which must have `/dev`,
/// `/proc`, `/sys` and `/run` mounted).
pub struct Tools {
    pub root: PathBuf,
}

impl Tools {
    fn cmd(&self, program: &str) -> Cmd {
        Cmd::new(program).chroot(&self.root)
    }

    /// The tools this needs, missing from the image.
    pub fn missing(&self) -> Vec<&'static str> {
        [CRYPTSETUP, CRYPTENROLL, SYSTEMD_CRYPTSETUP, MKFS_EXT4]
            .into_iter()
            .filter(|p| !self.root.join(&p[1..]).is_file())
            .collect()
    }

    /// `luksFormat` with `key` as the only keyslot. The key is random (256 bits), so the
    /// cheapest PBKDF is as strong as any: PBKDF2 at cryptsetup's minimum.
    pub fn format(&self, dev: &Path, label: &str, key: &str) -> Result<(), LuksError> {
        self.cmd(CRYPTSETUP)
            .args([
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks2",
                "--label",
                label,
            ])
            .args(["--subsystem", SUBSYSTEM_NEW])
            .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
            .args(["--key-file", "-"])
            .arg(dev)
            .stdin(key)
            .run()?;
        Ok(())
    }

    /// Adds a TPM2 keyslot (unlocked with `key`).
    pub fn enroll_tpm2(&self, dev: &Path, key: &str, seal: &Seal) -> Result<(), LuksError> {
        let mut c = self
            .cmd(CRYPTENROLL)
            .env("PASSWORD", key)
            .arg("--tpm2-device=auto")
            // Never a literal PCR (7 breaks on firmware updates, 12 on menu edits).
            .arg("--tpm2-pcrs=");
        if let Seal::SignedPcr11 {
            public_key,
            signature,
        } = seal
        {
            c = c
                .arg(format!("--tpm2-public-key={public_key}"))
                .arg("--tpm2-public-key-pcrs=11")
                .arg(format!("--tpm2-signature={signature}"));
        }
        c.arg(dev).run()?;
        Ok(())
    }

    /// Adds `new` as a passphrase keyslot (unlocked with `key`), PBKDF2 at the minimum (it
    /// is a 256-bit random recovery key).
    pub fn add_key(&self, dev: &Path, key: &str, new: &str) -> Result<(), LuksError> {
        let file = self.root.join("run/kairos/.newkey");
        write_secret(&file, new)?;
        let r = self
            .cmd(CRYPTSETUP)
            .args(["luksAddKey", "--batch-mode"])
            .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
            .args(["--key-file", "-"])
            .arg(dev)
            .arg("/run/kairos/.newkey")
            .stdin(key)
            .run();
        let _ = fs::remove_file(&file);
        r?;
        Ok(())
    }

    /// Removes the keyslot that `key` opens.
    pub fn remove_key(&self, dev: &Path, key: &str) -> Result<(), LuksError> {
        self.cmd(CRYPTSETUP)
            .args(["luksRemoveKey", "--batch-mode", "--key-file", "-"])
            .arg(dev)
            .stdin(key)
            .run()?;
        Ok(())
    }

    /// Marks the volume finished (its filesystem is made). `config` sets label and
    /// subsystem together (one left out is cleared), so the label is given again.
    pub fn finish(&self, dev: &Path, label: &str) -> Result<(), LuksError> {
        self.cmd(CRYPTSETUP)
            .args(["config", "--label", label, "--subsystem", SUBSYSTEM])
            .arg(dev)
            .run()?;
        Ok(())
    }

    /// Opens the volume as `/dev/mapper/<name>` with its TPM2 token, never prompting.
    pub fn open_tpm2(&self, dev: &Path, name: &str) -> Result<(), LuksError> {
        self.cmd(SYSTEMD_CRYPTSETUP)
            .args(["attach", name])
            .arg(dev)
            .args(["-", "tpm2-device=auto,headless=true"])
            .run()?;
        Ok(())
    }

    /// Whether `key` opens a keyslot (checked without opening the volume).
    pub fn key_opens(&self, dev: &Path, key: &str) -> Result<bool, LuksError> {
        let out = self
            .cmd(CRYPTSETUP)
            .args(["open", "--test-passphrase", "--key-file", "-"])
            .arg(dev)
            .stdin(key)
            .run_status()?;
        Ok(out.status == 0)
    }

    /// Opens the volume with a passphrase (or the recovery key).
    pub fn open_passphrase(&self, dev: &Path, name: &str, pass: &str) -> Result<(), LuksError> {
        self.cmd(CRYPTSETUP)
            .args(["open", "--type", "luks2", "--key-file", "-"])
            .arg(dev)
            .arg(name)
            .stdin(pass)
            .run()?;
        Ok(())
    }

    /// Closes the mapping `name` (if open).
    pub fn close(&self, name: &str) -> Result<(), LuksError> {
        self.cmd(CRYPTSETUP).args(["close", name]).run()?;
        Ok(())
    }

    /// Makes the ext4 filesystem inside an opened volume.
    pub fn mkfs_ext4(&self, mapped: &Path, label: &str) -> Result<(), LuksError> {
        self.cmd(MKFS_EXT4)
            .args(["-q", "-F", "-L", label])
            .arg(mapped)
            .run()?;
        Ok(())
    }
}

/// Bytes zeroed by [`erase`]: the LUKS2 headers, their keyslot area and cryptsetup's
/// default data offset (16 MiB).
pub const ERASE_LEN: u64 = 16 << 20;

/// Forgets a LUKS volume: zeroes its headers and keyslots (the first [`ERASE_LEN`] bytes,
/// or the whole device when smaller). Its data can no longer be decrypted by anyone.
pub fn erase(dev: &Path) -> Result<(), LuksError> {
    use std::io::Write;
    let io = |source| LuksError::Io {
        dev: dev.display().to_string(),
        source,
    };
    let mut f = fs::OpenOptions::new().write(true).open(dev).map_err(io)?;
    let size = f.seek(SeekFrom::End(0)).map_err(io)?;
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = size.min(ERASE_LEN);
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n]).map_err(io)?;
        left -= n as u64;
    }
    f.sync_all().map_err(io)
}

/// Writes a secret file readable by root only (created with mode 0600).
pub fn write_secret(path: &Path, text: &str) -> Result<(), LuksError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| LuksError::Io {
        dev: path.display().to_string(),
        source,
    };
    if let Some(d) = path.parent() {
        fs::create_dir_all(d).map_err(io)?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn luks2_head(label: &str, subsystem: &str) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[..6].copy_from_slice(MAGIC);
        h[6..8].copy_from_slice(&2u16.to_be_bytes());
        h[8..16].copy_from_slice(&16384u64.to_be_bytes());
        h[24..24 + label.len()].copy_from_slice(label.as_bytes());
        let uuid = b"0b0a6f49-3c52-4e0a-9f47-9d8f2a9e1c11";
        h[168..168 + uuid.len()].copy_from_slice(uuid);
        h[208..208 + subsystem.len()].copy_from_slice(subsystem.as_bytes());
        h
    }

    #[test]
    fn luks2_header_fields() {
        let h = parse_header(&luks2_head("COS_PERSISTENT", SUBSYSTEM_NEW)).unwrap();
        assert_eq!(h.version, 2);
        assert_eq!(h.label.as_deref(), Some("COS_PERSISTENT"));
        assert_eq!(h.subsystem.as_deref(), Some("kairos-new"));
        assert_eq!(h.uuid, "0b0a6f49-3c52-4e0a-9f47-9d8f2a9e1c11");
        assert_eq!(h.hdr_size, 16384);
        let v = Volume {
            header: h,
            tokens: vec![],
        };
        assert!(!v.finished());
        let h = parse_header(&luks2_head("COS_OEM", SUBSYSTEM)).unwrap();
        assert!(
            Volume {
                header: h,
                tokens: vec![]
            }
            .finished()
        );
        // Not LUKS: no magic, a short buffer, an unknown version.
        assert_eq!(parse_header(&[0u8; 4096]), None);
        assert_eq!(parse_header(&MAGIC[..]), None);
        let mut odd = luks2_head("X", "");
        odd[7] = 9;
        assert_eq!(parse_header(&odd), None);
    }

    #[test]
    fn token_types_from_json_metadata() {
        let mut json = br#"{"keyslots":{},"tokens":{"0":{"type":"systemd-tpm2","keyslots":["1"]},"1":{"type":"systemd-recovery"}}}"#.to_vec();
        json.extend_from_slice(&[0u8; 64]);
        assert_eq!(
            token_types(&json).unwrap(),
            vec!["systemd-recovery", "systemd-tpm2"]
        );
        assert_eq!(
            token_types(br#"{"tokens":{}}"#).unwrap(),
            Vec::<String>::new()
        );
        assert!(token_types(b"{not json").is_err());
    }

    #[test]
    fn erase_zeroes_the_headers() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vol");
        let mut data = luks2_head("COS_PERSISTENT", SUBSYSTEM);
        data.resize(3 << 20, 0xAA);
        fs::write(&f, &data).unwrap();
        assert!(parse_header(&fs::read(&f).unwrap()[..4096]).is_some());
        erase(&f).unwrap();
        let after = fs::read(&f).unwrap();
        assert_eq!(after.len(), 3 << 20, "the size is kept");
        assert!(after.iter().all(|&b| b == 0));
        assert!(read(&f).unwrap().is_none());
    }

    #[test]
    fn random_keys_are_modhex_groups() {
        let k = random_key().unwrap();
        assert_eq!(k.len(), 71);
        assert_eq!(k.split('-').count(), 8);
        assert!(
            k.split('-')
                .all(|g| g.len() == 8 && g.chars().all(|c| "cbdefghijklnrtuv".contains(c)))
        );
        assert_ne!(k, random_key().unwrap());
    }
}
