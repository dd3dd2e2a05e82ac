//! PCR 11 as systemd-stub 252 and the boot phases leave it, predicted at build time, and the
//! TPM2 policy a disk key is sealed to (PolicyPCR on PCR 11 in a SHA-256 session) — the
//! values `.pcrsig` signs.
//!
//! systemd-stub 252 measures, for each of `.linux .osrel .cmdline .initrd .splash .dtb
//! .pcrpkey` present in the UKI (in that order; `.pcrsig` never), the section's name with its
//! NUL, then its contents (its virtual size). Each boot phase then extends its name
//! (`enter-initrd`, `leave-initrd`, `sysinit`, `ready`; no NUL). Every extend is
//! `pcr = H(pcr ‖ H(data))`.

use sha2::{Digest, Sha256};

/// The sections systemd-stub 252 measures, in its order.
pub const MEASURED: [&str; 7] = [
    ".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey",
];

/// The boot phases, in order.
pub const PHASES: [&str; 4] = ["enter-initrd", "leave-initrd", "sysinit", "ready"];

/// `TPM_CC_PolicyPCR`.
const TPM_CC_POLICY_PCR: u32 = 0x0000_017f;
/// `TPM_ALG_SHA256`.
pub const TPM_ALG_SHA256: u16 = 0x000b;

/// One PCR in the SHA-256 bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pcr(pub [u8; 32]);

impl Pcr {
    pub fn zero() -> Pcr {
        Pcr([0; 32])
    }

    /// `pcr = SHA256(pcr ‖ SHA256(data))`.
    pub fn extend(&mut self, data: &[u8]) {
        let d = Sha256::digest(data);
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(d);
        self.0 = h.finalize().into();
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// PCR 11 after the UKI's sections: `sections` is (name, contents) for what the UKI holds,
/// in any order; only the measured ones count, in the stub's order.
pub fn after_sections<'a>(sections: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Pcr {
    let all: Vec<(&str, &[u8])> = sections.into_iter().collect();
    let mut pcr = Pcr::zero();
    for name in MEASURED {
        if let Some((_, data)) = all.iter().find(|(n, _)| *n == name) {
            let mut with_nul = name.as_bytes().to_vec();
            with_nul.push(0);
            pcr.extend(&with_nul);
            pcr.extend(data);
        }
    }
    pcr
}

/// PCR 11 at each phase: `[(phase path, value)]`, the path being the phases so far joined
/// by `:` (`enter-initrd`, `enter-initrd:leave-initrd`, …).
pub fn phases(after_sections: Pcr) -> Vec<(String, Pcr)> {
    let mut pcr = after_sections;
    let mut path = Vec::new();
    PHASES
        .iter()
        .map(|p| {
            pcr.extend(p.as_bytes());
            path.push(*p);
            (path.join(":"), pcr)
        })
        .collect()
}

/// PCR 11 at each boot phase for a built UKI (its measured sections, read from the image):
/// what a node booted from it should read.
pub fn predict_uki(image: &[u8]) -> Result<Vec<(String, Pcr)>, crate::pe::PeError> {
    let pe = crate::pe::Pe::parse(image)?;
    let sections: Vec<(&str, &[u8])> = pe
        .sections
        .iter()
        .map(|s| (s.name.as_str(), s.data(image)))
        .collect();
    Ok(phases(after_sections(sections)))
}

/// The TPM2 policy digest of `PolicyPCR(PCR 11 = pcr)` in a SHA-256 session started from
/// zero (what `PolicyAuthorize` approves when the signature checks).
pub fn policy_pcr11(pcr: &Pcr) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(TPM_CC_POLICY_PCR.to_be_bytes());
    // TPML_PCR_SELECTION: count 1; TPMS_PCR_SELECTION { hash SHA256, sizeofSelect 3,
    // bitmap with PCR 11 set (byte 1, bit 3) }.
    h.update(1u32.to_be_bytes());
    h.update(TPM_ALG_SHA256.to_be_bytes());
    h.update([3u8, 0x00, 0x08, 0x00]);
    h.update(Sha256::digest(pcr.0));
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's toy vector (`kairos-p2p-trustedboot-k8s.md` B.5).
    #[test]
    fn the_reference_vector() {
        let pcr = after_sections([
            (".initrd", &b"INITRD"[..]),
            (".linux", b"KERNEL"),
            (".cmdline", b"console=tty1"),
            (".osrel", b"NAME=x\n"),
            (".pcrsig", b"never measured"),
        ]);
        assert_eq!(
            pcr.hex(),
            "5acd75a8196ab689c6970ff33bf68ad92774d7ee8aa410abaac05907a32f2f90"
        );
        let p = phases(pcr);
        assert_eq!(p[0].0, "enter-initrd");
        assert_eq!(
            p[0].1.hex(),
            "563498190090765240d087b3b29941cec76ccb83d01e7f1c8b12da127a73513a"
        );
        assert_eq!(p[3].0, "enter-initrd:leave-initrd:sysinit:ready");
        assert_eq!(
            hex(&policy_pcr11(&p[0].1)),
            "5b80243895b1a20ef70bdeceacf20c082e76d8b3e730dc3d4bcfb4979e90f6bf"
        );
    }

    #[test]
    fn a_changed_byte_changes_everything_after_it() {
        let a = after_sections([(".linux", &b"KERNEL"[..]), (".cmdline", b"x")]);
        let b = after_sections([(".linux", &b"KERNEL"[..]), (".cmdline", b"y")]);
        assert_ne!(a, b);
        assert_ne!(phases(a)[0].1, phases(b)[0].1);
    }
}
