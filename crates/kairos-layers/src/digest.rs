//! Content digests: `sha256:` and 64 lowercase hex digits, checked where they are parsed.
//!
//! A digest from a manifest, an image config (`diff_ids`), a registry answer or a
//! `docker save` archive becomes a file name (`blobs/sha256/<hex>`, `layers/sha256-<hex>.erofs`)
//! and a URL (`/v2/<repo>/blobs/<digest>`). Parsing it into [`Digest`] before any of that is
//! what keeps `sha256:/../../x` from naming a directory outside the store.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A validated `sha256:<64 lowercase hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

/// Why a text is not a digest we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a valid digest: {why}")]
pub struct DigestError {
    pub text: String,
    pub why: &'static str,
}

const PREFIX: &str = "sha256:";

impl Digest {
    pub fn parse(text: &str) -> Result<Digest, DigestError> {
        let err = |why| DigestError {
            text: text.chars().take(100).collect(),
            why,
        };
        let Some(hex) = text.strip_prefix(PREFIX) else {
            return Err(err(match text.split_once(':') {
                Some((_, _)) => "only sha256 digests are supported (sha256:<64 hex digits>)",
                None => "expected sha256:<64 hex digits>",
            }));
        };
        if hex.len() != 64 {
            return Err(err("a sha256 digest has exactly 64 hex digits"));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err("a sha256 digest is lowercase hex digits only"));
        }
        Ok(Digest(text.to_string()))
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(format!("{PREFIX}{}", crate::sha256_hex(data)))
    }

    /// From the 64 hex digits a hasher printed (trusted: our own hash output).
    pub fn from_sha256_hex(hex: &str) -> Result<Digest, DigestError> {
        Digest::parse(&format!("{PREFIX}{hex}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits: safe as a file name.
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    /// The algorithm part (`sha256`): safe as a directory name.
    pub fn algorithm(&self) -> &str {
        "sha256"
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Digest, DigestError> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for Digest {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Digest {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sha256_hex_is_accepted() {
        let good = format!("sha256:{}", "a".repeat(64));
        let d = Digest::parse(&good).unwrap();
        assert_eq!(d.hex(), "a".repeat(64));
        for bad in [
            "sha256:/../../x".to_string(),
            format!("sha256:{}/", "a".repeat(63)),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{}", "a".repeat(128)),
            "sha256:".to_string(),
            "/host/file".to_string(),
            format!("sha256:{}", "a".repeat(65)),
            format!("sha256:../{}", "a".repeat(61)),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
        let e = Digest::parse("sha512:abc").unwrap_err().to_string();
        assert!(e.contains("only sha256"), "{e}");
        let j: Result<Digest, _> = serde_json::from_str("\"sha256:/../../x\"");
        assert!(j.is_err());
        assert_eq!(
            Digest::of(b""),
            *"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
