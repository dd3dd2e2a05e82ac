//! The secrets a token derives, and how they rotate (EdgeVPN `pkg/crypto/otp.go`,
//! `pkg/node/connection.go`, `pkg/hub/hub.go`, `pkg/discovery/dht.go`).
//!
//! A TOTP here is `base64(HMAC-SHA256(key, counter as 8 bytes big-endian))` cut to `length`
//! characters, with `counter = unix seconds / interval`; most derived values are the
//! lowercase hex MD5 of such a code.

use base64::Engine;
use hmac::{Hmac, Mac};
use md5::Digest as _;
use sha2::Sha256;

use crate::token::{Otp, Token};

/// The digest length EdgeVPN uses when a token says 0 (or less).
pub const DEFAULT_LENGTH: usize = 6;
/// The DHT rendezvous digest length when the token says 0.
pub const DEFAULT_DHT_LENGTH: usize = 12;
/// The longest code: base64 of a SHA-256 MAC is 44 characters.
pub const MAX_LENGTH: usize = 44;

/// The time step a moment falls in.
pub fn counter(unix: u64, interval: u64) -> u64 {
    unix / interval.max(1)
}

/// EdgeVPN's TOTP: the first `length` characters of the padded base64 of
/// HMAC-SHA256(key, counter).
pub fn totp(key: &str, length: usize, interval: u64, unix: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(&counter(unix, interval).to_be_bytes());
    let code = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let n = if length == 0 { DEFAULT_LENGTH } else { length };
    code[..n.min(MAX_LENGTH)].to_string()
}

/// Lowercase hex MD5 of a string.
pub fn md5_hex(s: &str) -> String {
    md5::Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn otp_of(o: &Otp, default_len: usize, unix: u64) -> String {
    let len = if o.length == 0 { default_len } else { o.length };
    totp(&o.key, len, o.interval, unix)
}

/// The derived values of a token at a moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Derived {
    /// The 32 ASCII hex characters that are, as bytes, the AES-256 key sealing messages.
    pub seal_key: String,
    /// The gossipsub topic of the ledger.
    pub topic: String,
    /// The "public" topic (EdgeVPN's generic hub).
    pub public_topic: String,
    /// The DHT rendezvous namespace.
    pub rendezvous: String,
    /// The DHT provider-record key (a sha2-256 multihash of the namespace), hex.
    pub dht_provider_key: String,
    /// The mDNS service type.
    pub mdns: String,
    /// The DHCP lease file name.
    pub dhcp_lease: String,
    /// Unix time when the seal key and topic next change (`None`: they never do).
    pub next_rotation: Option<u64>,
}

impl Token {
    /// The seal key at `unix` (see [`Derived::seal_key`]).
    pub fn seal_key(&self, unix: u64) -> [u8; 32] {
        let hex = md5_hex(&otp_of(&self.otp.crypto, DEFAULT_LENGTH, unix));
        let mut k = [0u8; 32];
        k.copy_from_slice(hex.as_bytes());
        k
    }

    /// The keys a message received at `unix` may be sealed with: the current one, then the
    /// previous interval's (a sender on the other side of a rotation).
    pub fn open_keys(&self, unix: u64) -> [[u8; 32]; 2] {
        let interval = self.otp.crypto.interval.max(1);
        [
            self.seal_key(unix),
            self.seal_key(unix.saturating_sub(interval)),
        ]
    }

    /// The ledger topic at `unix`.
    pub fn topic(&self, unix: u64) -> String {
        let room = Otp {
            key: self.room.clone(),
            ..self.otp.crypto.clone()
        };
        md5_hex(&otp_of(&room, DEFAULT_LENGTH, unix))
    }

    /// The DHT rendezvous at `unix`: from `otp.dht`, or the static `rendezvous`.
    pub fn rendezvous_at(&self, unix: u64) -> String {
        if self.otp.dht.key.is_empty() {
            self.rendezvous.clone()
        } else {
            md5_hex(&otp_of(&self.otp.dht, DEFAULT_DHT_LENGTH, unix))
        }
    }

    /// The DHCP lease file name (EdgeVPN: MD5hex(crypto key + "-ek")); it does not rotate.
    pub fn dhcp_lease(&self) -> String {
        md5_hex(&format!("{}-ek", self.otp.crypto.key))
    }

    /// The protocol of the network's own DHT (kairos-rs): only holders of the token know it,
    /// so a peer of another network can neither query it nor enter its routing tables. It
    /// does not rotate (a DHT's tables outlive a rotation).
    pub fn network_dht_protocol(&self) -> String {
        let h = md5_hex(&format!("{}-kad", self.otp.crypto.key));
        format!("/kairos/kad/{}/1.0.0", &h[..16])
    }

    /// Everything derived at `unix`.
    pub fn derive(&self, unix: u64) -> Derived {
        let room = Otp {
            key: self.room.clone(),
            ..self.otp.crypto.clone()
        };
        let room_code = otp_of(&room, DEFAULT_LENGTH, unix);
        let rendezvous = self.rendezvous_at(unix);
        let interval = self.otp.crypto.interval;
        let next = counter(unix, interval)
            .checked_add(1)
            .and_then(|c| c.checked_mul(interval))
            .filter(|t| *t <= i64::MAX as u64 && interval < i64::MAX as u64);
        Derived {
            seal_key: String::from_utf8_lossy(&self.seal_key(unix)).into_owned(),
            topic: md5_hex(&room_code),
            public_topic: md5_hex(&format!("{room_code}public")),
            dht_provider_key: provider_key(&rendezvous)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            rendezvous,
            mdns: self.mdns.clone(),
            dhcp_lease: self.dhcp_lease(),
            next_rotation: next,
        }
    }
}

/// The DHT provider-record key of a namespace: the multihash `0x12 0x20 ‖ sha256(ns)`.
pub fn provider_key(namespace: &str) -> Vec<u8> {
    let mut k = vec![0x12, 0x20];
    k.extend_from_slice(&Sha256::digest(namespace.as_bytes()));
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000;

    /// The spec's vectors (`kairos-p2p-trustedboot-k8s.md` A.3).
    #[test]
    fn spec_vectors() {
        let cases = [
            (
                "exampleCryptoKey",
                9000,
                "uxsVPMR9MNzYr2amto4O1WhYZRyl6OsTH1o6OeEvEYk",
                "c4fd0cd86a0e537c04b4ff747eeaeace",
            ),
            (
                "exampleRoom",
                9000,
                "Rj/bGc0sYTjtaF1Rkpsi2/QVakf4BCk55VzTgjbRkIs",
                "dbe12872f832443ff33afe7e21f9236e",
            ),
            (
                "exampleDhtKey",
                9000,
                "KCsMUnhIOp0FmLK5ewxXLx+AG0wCRJ2U9k0flW8kgvY",
                "07f6395458c8154bf6dfb8580c705fbf",
            ),
            (
                "exampleCryptoKey",
                i64::MAX as u64,
                "zPrhn113r6b1AQEiA2TUx/hpXKoUNg/4Pup1A34u//U",
                "454c86984aeb269d39c178031a34bcbe",
            ),
        ];
        for (key, interval, code, md5) in cases {
            assert_eq!(totp(key, 43, interval, T), code, "{key}");
            assert_eq!(md5_hex(code), md5, "{key}");
        }
        assert_eq!(counter(T, 9000), 188_888);
        assert_eq!(
            md5_hex("Rj/bGc0sYTjtaF1Rkpsi2/QVakf4BCk55VzTgjbRkIspublic"),
            "a3cad994979c047cd99732d5bf14befd"
        );
    }

    #[test]
    fn provider_key_is_a_sha256_multihash() {
        let k = provider_key("07f6395458c8154bf6dfb8580c705fbf");
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        assert!(hex.starts_with("12201aa1f097"), "{hex}");
        assert!(hex.ends_with("e7e920"), "{hex}");
        assert_eq!(k.len(), 34);
    }

    #[test]
    fn the_network_dht_protocol_is_the_tokens_own() {
        let a = crate::Token::generate(9000);
        let b = crate::Token::generate(9000);
        let p = a.network_dht_protocol();
        assert!(
            p.starts_with("/kairos/kad/") && p.ends_with("/1.0.0"),
            "{p}"
        );
        assert_eq!(p.len(), "/kairos/kad//1.0.0".len() + 16);
        assert_eq!(p, a.network_dht_protocol(), "stable");
        assert_ne!(
            p,
            b.network_dht_protocol(),
            "another network, another protocol"
        );
        assert!(!p.contains(&a.otp.crypto.key), "the key itself never shows");
        assert_eq!(a.dhcp_lease(), a.derive(T).dhcp_lease);
    }

    #[test]
    fn lengths() {
        assert_eq!(totp("k", 0, 10, T).len(), DEFAULT_LENGTH);
        assert_eq!(totp("k", 44, 10, T).len(), 44);
        assert_eq!(totp("k", 99, 10, T).len(), 44);
    }
}
