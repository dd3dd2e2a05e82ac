//! Sealing ledger messages as EdgeVPN does (`pkg/crypto/aes.go`): AES-256-GCM with a random
//! 12-byte nonce and no associated data; on the wire the lowercase hex of
//! `nonce ‖ ciphertext ‖ tag`.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("a sealed message is lowercase hex of at least 28 bytes")]
    Format,
    #[error("the message does not open with this key (another network, or another rotation)")]
    Open,
}

/// Seals `plain` with `key` (see [`crate::Token::seal_key`]), as EdgeVPN's hex text.
pub fn seal(key: &[u8; 32], plain: &[u8]) -> String {
    seal_bytes(key, plain)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Seals `plain` with `key`: `nonce ‖ ciphertext ‖ tag` as bytes (our own peers' messages,
/// half the size of the hex form).
pub fn seal_bytes(key: &[u8; 32], plain: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let nonce: [u8; 12] = rand::random();
    let mut out = nonce.to_vec();
    out.extend(
        cipher
            .encrypt(Nonce::from_slice(&nonce), plain)
            .expect("AES-GCM seals any length we send"),
    );
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Opens a sealed message; anything not sealed with `key` is an error.
pub fn unseal(key: &[u8; 32], sealed: &str) -> Result<Vec<u8>, SealError> {
    unseal_bytes(key, &unhex(sealed.trim()).ok_or(SealError::Format)?)
}

/// Opens what [`seal_bytes`] sealed.
pub fn unseal_bytes(key: &[u8; 32], raw: &[u8]) -> Result<Vec<u8>, SealError> {
    if raw.len() < 12 + 16 {
        return Err(SealError::Format);
    }
    let (nonce, body) = raw.split_at(12);
    Aes256Gcm::new(key.into())
        .decrypt(Nonce::from_slice(nonce), body)
        .map_err(|_| SealError::Open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let k = *b"c4fd0cd86a0e537c04b4ff747eeaeace";
        let s = seal(&k, b"hello ledger");
        assert_eq!(s.len(), 2 * (12 + 12 + 16));
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(unseal(&k, &s).unwrap(), b"hello ledger");
        let other = *b"454c86984aeb269d39c178031a34bcbe";
        assert_eq!(unseal(&other, &s), Err(SealError::Open));
        assert_eq!(unseal(&k, "zz"), Err(SealError::Format));
        assert_eq!(unseal(&k, "00"), Err(SealError::Format));
        let b = seal_bytes(&k, b"hello ledger");
        assert_eq!(b.len(), 12 + 12 + 16);
        assert_eq!(unseal_bytes(&k, &b).unwrap(), b"hello ledger");
        assert_eq!(unseal_bytes(&other, &b), Err(SealError::Open));
        assert_eq!(unseal_bytes(&k, &b[..20]), Err(SealError::Format));
    }

    /// The wire layout: the nonce first, then ciphertext and tag, opened with plain AES-GCM.
    #[test]
    fn layout_is_nonce_then_ciphertext_and_tag() {
        let k = *b"c4fd0cd86a0e537c04b4ff747eeaeace";
        let s = seal(&k, b"");
        let raw = unhex(&s).unwrap();
        assert_eq!(raw.len(), 12 + 16, "empty plaintext: nonce + tag");
        let cipher = Aes256Gcm::new((&k).into());
        assert!(
            cipher
                .decrypt(Nonce::from_slice(&raw[..12]), &raw[12..])
                .is_ok()
        );
    }
}
