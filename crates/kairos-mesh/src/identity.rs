//! A node's libp2p identity: an Ed25519 key pair, and its PeerID — base58btc of the identity
//! multihash of the protobuf-encoded public key (`0x00 0x24 | 08 01 12 20 | key`), the
//! `12D3KooW…` form. EdgeVPN recovers a signer's public key from the PeerID alone, which is
//! why only Ed25519 identities are accepted.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// The protobuf prefix of an Ed25519 `PublicKey { Type = 1, Data = 32 bytes }`.
const PB_ED25519: [u8; 4] = [0x08, 0x01, 0x12, 0x20];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("peer id {0:?} is not base58")]
    Base58(String),
    #[error("peer id {0:?} is not an Ed25519 identity (only those can sign the ledger)")]
    NotEd25519(String),
}

/// A node identity.
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Identity {
        let seed: [u8; 32] = rand::random();
        Identity::from_seed(&seed)
    }

    /// The identity of a 32-byte secret seed (kept on disk for a persistent PeerID).
    pub fn from_seed(seed: &[u8; 32]) -> Identity {
        Identity {
            key: SigningKey::from_bytes(seed),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn peer_id(&self) -> String {
        peer_id_of(&self.key.verifying_key())
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.key.sign(msg).to_bytes().to_vec()
    }
}

/// The PeerID of an Ed25519 public key.
pub fn peer_id_of(key: &VerifyingKey) -> String {
    let mut mh = vec![0x00, 36];
    mh.extend_from_slice(&PB_ED25519);
    mh.extend_from_slice(key.as_bytes());
    bs58::encode(mh).into_string()
}

/// The Ed25519 public key inside a PeerID.
pub fn key_of(peer_id: &str) -> Result<VerifyingKey, IdError> {
    let raw = bs58::decode(peer_id)
        .into_vec()
        .map_err(|_| IdError::Base58(peer_id.to_string()))?;
    let not = || IdError::NotEd25519(peer_id.to_string());
    let rest = raw.strip_prefix(&[0x00, 36][..]).ok_or_else(not)?;
    let key = rest.strip_prefix(&PB_ED25519[..]).ok_or_else(not)?;
    let bytes: [u8; 32] = key.try_into().map_err(|_| not())?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| not())
}

/// Whether `sig` is `peer_id`'s signature of `msg`.
pub fn verify(peer_id: &str, msg: &[u8], sig: &[u8]) -> bool {
    let Ok(key) = key_of(peer_id) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(sig) else {
        return false;
    };
    key.verify(msg, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_look_like_libp2p_ones_and_carry_the_key() {
        let id = Identity::from_seed(&[7u8; 32]);
        let p = id.peer_id();
        assert!(p.starts_with("12D3KooW"), "{p}");
        assert_eq!(p.len(), 52);
        let sig = id.sign(b"hello");
        assert!(verify(&p, b"hello", &sig));
        assert!(!verify(&p, b"hellO", &sig));
        let other = Identity::generate();
        assert!(!verify(&other.peer_id(), b"hello", &sig));
        assert_eq!(Identity::from_seed(&id.seed()).peer_id(), p);
        assert!(matches!(
            key_of("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"),
            Err(IdError::NotEd25519(_))
        ));
        assert!(matches!(key_of("0OIl"), Err(IdError::Base58(_))));
    }
}
