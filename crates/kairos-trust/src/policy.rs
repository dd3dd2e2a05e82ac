//! The signed PCR policy (`.pcrsig`) and the key that signs it (`.pcrpkey`): for each boot
//! phase, the policy digest of PCR 11's predicted value, signed (RSASSA-PKCS1-v1_5 with
//! SHA-256, what TPM2 PolicyAuthorize verifies) with the owner's PCR key. A disk sealed to
//! "a policy signed by this key" unlocks under any UKI the owner signs — the next version
//! included — and under nothing else; no literal PCR value is ever bound.
//!
//! The JSON is systemd's (`systemd-measure sign`): `{"sha256": [{"pcrs": [11], "pkfp":
//! <hex SHA-256 of the PKCS#1 DER public key>, "pol": <hex policy digest>, "sig": <base64
//! signature>}, …]}`, one entry per phase path.

use base64::Engine;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use sha2::{Digest, Sha256};

use crate::pcr::{self, Pcr};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "not an RSA private key in PEM (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`); make one with `kairosctl keys generate`"
    )]
    NotRsaPem,
    #[error("the key: {0}")]
    Encode(String),
}

/// The PCR-policy signing key (`tpm2-pcr-private.pem`).
pub struct PcrKey {
    key: rsa::RsaPrivateKey,
}

impl PcrKey {
    pub fn from_pem(text: &str) -> Result<PcrKey, KeyError> {
        let key = rsa::RsaPrivateKey::from_pkcs8_pem(text)
            .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(text))
            .map_err(|_| KeyError::NotRsaPem)?;
        Ok(PcrKey { key })
    }

    fn public(&self) -> rsa::RsaPublicKey {
        self.key.to_public_key()
    }

    /// The `.pcrpkey` section: the public key as PEM `PUBLIC KEY` (SPKI).
    pub fn public_pem(&self) -> Result<String, KeyError> {
        self.public()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Encode(e.to_string()))
    }

    /// `pkfp`: SHA-256 of the PKCS#1 DER public key, hex.
    pub fn fingerprint(&self) -> Result<String, KeyError> {
        let der = self
            .public()
            .to_pkcs1_der()
            .map_err(|e| KeyError::Encode(e.to_string()))?;
        Ok(pcr::hex(&Sha256::digest(der.as_bytes())))
    }

    /// RSASSA-PKCS1-v1_5 / SHA-256 over the policy digest.
    pub fn sign(&self, policy: &[u8; 32]) -> Vec<u8> {
        let s = rsa::pkcs1v15::SigningKey::<Sha256>::new(self.key.clone());
        s.sign(policy).to_vec()
    }

    /// Whether `sig` is this key's signature of `policy`.
    pub fn verify(&self, policy: &[u8; 32], sig: &[u8]) -> bool {
        let v = rsa::pkcs1v15::VerifyingKey::<Sha256>::new(self.public());
        rsa::pkcs1v15::Signature::try_from(sig).is_ok_and(|s| v.verify(policy, &s).is_ok())
    }
}

/// The phases whose PCR 11 values `.pcrsig` signs: `enter-initrd` only, so a sealed disk
/// key unseals in the initrd (where immucore opens the disks before any config-driven
/// command runs) and never later in the booted system.
pub const SIGNED_PHASES: usize = 1;

/// The `.pcrsig` JSON for a UKI whose measured sections leave PCR 11 at `after_sections`.
pub fn pcrsig(key: &PcrKey, after_sections: Pcr) -> Result<String, KeyError> {
    let pkfp = key.fingerprint()?;
    let entries: Vec<serde_json::Value> = pcr::phases(after_sections)
        .into_iter()
        .take(SIGNED_PHASES)
        .map(|(_, value)| {
            let pol = pcr::policy_pcr11(&value);
            serde_json::json!({
                "pcrs": [11],
                "pkfp": pkfp,
                "pol": pcr::hex(&pol),
                "sig": base64::engine::general_purpose::STANDARD.encode(key.sign(&pol)),
            })
        })
        .collect();
    Ok(serde_json::json!({ "sha256": entries }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1024-bit key made for this test only (fast; real keys are 2048+).
    fn key() -> PcrKey {
        let mut rng = rand_core_os();
        let k = rsa::RsaPrivateKey::new(&mut rng, 1024).unwrap();
        PcrKey { key: k }
    }

    fn rand_core_os() -> rsa::rand_core::OsRng {
        rsa::rand_core::OsRng
    }

    #[test]
    fn pcrsig_signs_the_initrd_phase_only() {
        let k = key();
        let pcr = pcr::after_sections([(".linux", &b"KERNEL"[..])]);
        let j: serde_json::Value = serde_json::from_str(&pcrsig(&k, pcr).unwrap()).unwrap();
        let e = j["sha256"].as_array().unwrap();
        assert_eq!(e.len(), 1, "enter-initrd only");
        for (entry, (_, value)) in e.iter().zip(pcr::phases(pcr)) {
            assert_eq!(entry["pcrs"], serde_json::json!([11]));
            assert_eq!(entry["pkfp"], k.fingerprint().unwrap());
            let pol = pcr::policy_pcr11(&value);
            assert_eq!(entry["pol"], pcr::hex(&pol));
            let sig = base64::engine::general_purpose::STANDARD
                .decode(entry["sig"].as_str().unwrap())
                .unwrap();
            assert!(k.verify(&pol, &sig));
            let mut other = pol;
            other[0] ^= 1;
            assert!(!k.verify(&other, &sig));
        }
        assert!(
            k.public_pem()
                .unwrap()
                .starts_with("-----BEGIN PUBLIC KEY-----\n")
        );
    }

    #[test]
    fn keys_in_both_pem_forms() {
        let k = key();
        let p8 = rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&k.key, LineEnding::LF).unwrap();
        let p1 = rsa::pkcs1::EncodeRsaPrivateKey::to_pkcs1_pem(&k.key, LineEnding::LF).unwrap();
        for pem in [p8.as_str(), p1.as_str()] {
            let back = PcrKey::from_pem(pem).unwrap();
            assert_eq!(back.fingerprint().unwrap(), k.fingerprint().unwrap());
        }
        assert!(matches!(
            PcrKey::from_pem("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"),
            Err(KeyError::NotRsaPem)
        ));
    }
}
