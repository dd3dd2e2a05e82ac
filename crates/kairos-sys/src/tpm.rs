//! Raw TPM 2.0 commands, for the few things boot needs: extend a PCR (immucore marks the boot
//! phases in PCR 11) and read one. A command is marshalled by hand (TPM 2.0 Part 3) and sent
//! to `/dev/tpmrm0` (or `/dev/tpm0`) with one write and one read — no TSS library, so the
//! static initramfs binary stays small.

use std::io::{Read, Write};

/// The kernel's TPM devices, resource-managed one first.
pub const DEVICES: &[&str] = &["/dev/tpmrm0", "/dev/tpm0"];
/// Where the kernel shows PCR values (hex), e.g. `…/pcr-sha256/11`.
pub const SYSFS_PCRS: &str = "/sys/class/tpm/tpm0";

const TPM_ST_NO_SESSIONS: u16 = 0x8001;
const TPM_ST_SESSIONS: u16 = 0x8002;
const TPM_CC_PCR_EXTEND: u32 = 0x0000_0182;
const TPM_CC_PCR_READ: u32 = 0x0000_017E;
const TPM_CC_STARTUP: u32 = 0x0000_0144;
const TPM_RS_PW: u32 = 0x4000_0009;
const TPM_ALG_SHA256: u16 = 0x000B;
/// Responses we parse are small; anything larger is refused.
const MAX_RESPONSE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("no TPM device ({}): the machine has no TPM 2.0, or its driver is not loaded", DEVICES.join(", "))]
    NoDevice,
    #[error("{device}: {source}")]
    Io {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the TPM answered {what} with response code {code:#x}")]
    Code { what: &'static str, code: u32 },
    #[error("the TPM's answer to {what} is malformed ({len} bytes)")]
    Malformed { what: &'static str, len: usize },
}

fn header(tag: u16, cc: u32, body: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(10 + body.len());
    c.extend_from_slice(&tag.to_be_bytes());
    c.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    c.extend_from_slice(&cc.to_be_bytes());
    c.extend_from_slice(body);
    c
}

/// TPM2_PCR_Extend of the SHA-256 bank of `pcr` with `digest` (empty password session).
pub fn pcr_extend_command(pcr: u32, digest: &[u8; 32]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&pcr.to_be_bytes());
    // Authorization area: one TPMS_AUTH_COMMAND for the empty password.
    b.extend_from_slice(&9u32.to_be_bytes());
    b.extend_from_slice(&TPM_RS_PW.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes()); // nonceCaller
    b.push(0); // sessionAttributes
    b.extend_from_slice(&0u16.to_be_bytes()); // hmac
    // TPML_DIGEST_VALUES with one TPMT_HA.
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    b.extend_from_slice(digest);
    header(TPM_ST_SESSIONS, TPM_CC_PCR_EXTEND, &b)
}

/// TPM2_PCR_Read of the SHA-256 bank of one PCR (0–23).
pub fn pcr_read_command(pcr: u32) -> Vec<u8> {
    let mut select = [0u8; 3];
    select[(pcr / 8) as usize % 3] = 1 << (pcr % 8);
    let mut b = Vec::new();
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    b.push(3);
    b.extend_from_slice(&select);
    header(TPM_ST_NO_SESSIONS, TPM_CC_PCR_READ, &b)
}

/// TPM2_Startup(CLEAR): what firmware sends at power-on (tests drive a bare swtpm with it).
pub fn startup_command() -> Vec<u8> {
    header(TPM_ST_NO_SESSIONS, TPM_CC_STARTUP, &0u16.to_be_bytes())
}

/// The response code of an answer; an error unless it is success.
pub fn check_response(what: &'static str, resp: &[u8]) -> Result<(), TpmError> {
    if resp.len() < 10 {
        return Err(TpmError::Malformed {
            what,
            len: resp.len(),
        });
    }
    let size = u32::from_be_bytes([resp[2], resp[3], resp[4], resp[5]]) as usize;
    if size != resp.len() {
        return Err(TpmError::Malformed {
            what,
            len: resp.len(),
        });
    }
    match u32::from_be_bytes([resp[6], resp[7], resp[8], resp[9]]) {
        0 => Ok(()),
        code => Err(TpmError::Code { what, code }),
    }
}

/// The digest in a TPM2_PCR_Read answer for one SHA-256 PCR.
pub fn parse_pcr_read(resp: &[u8]) -> Result<[u8; 32], TpmError> {
    check_response("PCR_Read", resp)?;
    // header 10, pcrUpdateCounter 4, TPML_PCR_SELECTION 10, TPML_DIGEST count 4, size 2.
    let bad = TpmError::Malformed {
        what: "PCR_Read",
        len: resp.len(),
    };
    if resp.len() < 62 || resp[24..28] != 1u32.to_be_bytes() || resp[28..30] != [0, 32] {
        return Err(bad);
    }
    let mut d = [0u8; 32];
    d.copy_from_slice(&resp[30..62]);
    Ok(d)
}

/// Sends one command and reads its answer over a TPM connection (the device, or a socket
/// to a software TPM in tests).
pub fn transact(
    tpm: &mut (impl Read + Write),
    device: &str,
    command: &[u8],
) -> Result<Vec<u8>, TpmError> {
    let io = |source| TpmError::Io {
        device: device.to_string(),
        source,
    };
    tpm.write_all(command).map_err(io)?;
    tpm.flush().map_err(io)?;
    // The header says how long the answer is; the kernel device returns it in one read.
    let mut resp = vec![0u8; MAX_RESPONSE];
    let mut have = 0;
    loop {
        let n = tpm.read(&mut resp[have..]).map_err(io)?;
        if n == 0 {
            break;
        }
        have += n;
        if have >= 6 {
            let size = u32::from_be_bytes([resp[2], resp[3], resp[4], resp[5]]) as usize;
            if have >= size || size > MAX_RESPONSE {
                break;
            }
        }
    }
    resp.truncate(have);
    Ok(resp)
}

/// The machine's TPM, opened for commands.
pub fn open() -> Result<(std::fs::File, &'static str), TpmError> {
    for d in DEVICES {
        match std::fs::OpenOptions::new().read(true).write(true).open(d) {
            Ok(f) => return Ok((f, d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(TpmError::Io {
                    device: d.to_string(),
                    source,
                });
            }
        }
    }
    Err(TpmError::NoDevice)
}

/// Extends SHA-256 PCR `pcr` with the SHA-256 of `data` (how systemd measures a boot phase:
/// the digest of the phase's name).
pub fn extend_with(
    tpm: &mut (impl Read + Write),
    device: &str,
    pcr: u32,
    data: &[u8],
) -> Result<(), TpmError> {
    use sha2::Digest;
    let d: [u8; 32] = sha2::Sha256::digest(data).into();
    let resp = transact(tpm, device, &pcr_extend_command(pcr, &d))?;
    check_response("PCR_Extend", &resp)
}

/// Reads SHA-256 PCR `pcr` over a TPM connection.
pub fn read_with(
    tpm: &mut (impl Read + Write),
    device: &str,
    pcr: u32,
) -> Result<[u8; 32], TpmError> {
    let resp = transact(tpm, device, &pcr_read_command(pcr))?;
    parse_pcr_read(&resp)
}

/// A SHA-256 PCR as the kernel shows it in sysfs under `root`, lowercase hex; `None` without a
/// TPM (or a kernel older than 6.1).
pub fn read_sysfs(root: &std::path::Path, pcr: u32) -> Option<String> {
    let path = root
        .join(SYSFS_PCRS.trim_start_matches('/'))
        .join(format!("pcr-sha256/{pcr}"));
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim().to_ascii_lowercase();
    (t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_marshalled_as_part_3_says() {
        let c = pcr_extend_command(11, &[0xab; 32]);
        assert_eq!(c.len(), 65);
        assert_eq!(
            &c[..27],
            &[
                0x80, 0x02, 0, 0, 0, 65, 0, 0, 1, 0x82, 0, 0, 0, 11, 0, 0, 0, 9, 0x40, 0, 0, 9, 0,
                0, 0, 0, 0
            ]
        );
        assert_eq!(&c[27..33], &[0, 0, 0, 1, 0, 0x0b]);
        let r = pcr_read_command(11);
        assert_eq!(
            r,
            vec![
                0x80, 0x01, 0, 0, 0, 20, 0, 0, 1, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 0, 0x08, 0
            ]
        );
        assert_eq!(pcr_read_command(7)[17..20], [0x80, 0, 0]);
        assert_eq!(
            startup_command(),
            vec![0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0]
        );
    }

    #[test]
    fn responses() {
        assert!(check_response("x", &[0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0]).is_ok());
        let e = check_response("PCR_Extend", &[0x80, 1, 0, 0, 0, 10, 0, 0, 0x09, 0x22]);
        assert!(e.unwrap_err().to_string().contains("0x922"));
        assert!(check_response("x", &[0x80, 1, 0, 0, 0, 11, 0, 0, 0, 0]).is_err());
        assert!(parse_pcr_read(&[0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0]).is_err());
    }
}
