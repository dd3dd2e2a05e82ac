//! The network token: standard base64 (padded) of EdgeVPN's YAML connection document
//! (`edgevpn:pkg/node/options.go`), with Go's key names and order:
//!
//! ```yaml
//! otp:
//!   dht: {interval: 9000, key: …, length: 43}
//!   crypto: {interval: 9000, key: …, length: 43}
//! room: …
//! rendezvous: …
//! mdns: …
//! max_message_size: 20971520
//! ```
//!
//! Parsing is strict where EdgeVPN would crash or silently build another network: a bad
//! base64, a document that is not that map, a missing key, a length over 44 or an interval of
//! 0 are refused with what to do. A token is a secret: it never appears in an error.

use std::sync::Arc;

use base64::Engine;
use kairos_config::node::{Node, Value};

/// The keys Kairos and EdgeVPN generate: 43 characters of `[a-zA-Z0-9]`.
pub const KEY_LENGTH: usize = 43;
/// EdgeVPN's default `max_message_size` (20 MiB).
pub const MAX_MESSAGE_SIZE: u64 = 20 << 20;
/// The rotation interval `generate` uses by default (Kairos' installer uses it too).
pub const DEFAULT_INTERVAL: u64 = 9000;
/// The largest token accepted (a real one is about 400 bytes).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// One rotating secret: its key, how often it turns (seconds) and the code length.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Otp {
    pub interval: u64,
    pub key: String,
    pub length: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Otps {
    pub dht: Otp,
    pub crypto: Otp,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Token {
    pub otp: Otps,
    pub room: String,
    pub rendezvous: String,
    pub mdns: String,
    pub max_message_size: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "the network token is not base64 ({0}); copy it whole, as `kairosctl generate-token` prints it"
    )]
    Base64(String),
    #[error("the network token is too long ({0} bytes, at most {MAX_TOKEN_BYTES})")]
    TooLong(usize),
    #[error("the network token does not hold an EdgeVPN connection document: {0}")]
    Document(String),
    #[error("the network token has no `{0}`; generate a new one with `kairosctl generate-token`")]
    Missing(&'static str),
    #[error("the network token's `{key}` is {value}: {why}")]
    Bad {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

fn random_key() -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(KEY_LENGTH)
        .map(char::from)
        .collect()
}

fn get<'a>(n: &'a Node, key: &str) -> Option<&'a Node> {
    n.get(key).filter(|v| v.value != Value::Null)
}

fn text(n: &Node, key: &'static str) -> Result<String, TokenError> {
    match get(n, key) {
        None => Ok(String::new()),
        Some(v) if v.value.is_scalar() => Ok(v.scalar_text().unwrap_or_default()),
        Some(v) => Err(TokenError::Document(format!(
            "`{key}` is a {}, not text",
            v.value.kind()
        ))),
    }
}

fn number(n: &Node, key: &'static str, path: &'static str) -> Result<u64, TokenError> {
    match get(n, key).map(|v| &v.value) {
        None => Ok(0),
        Some(Value::Int(i)) if *i >= 0 => Ok(*i as u64),
        Some(other) => Err(TokenError::Bad {
            key: path,
            value: match other {
                Value::Int(i) => i.to_string(),
                v => v.kind().to_string(),
            },
            why: "it must be a whole number, 0 or more",
        }),
    }
}

fn otp(n: Option<&Node>, name: &'static str) -> Result<Otp, TokenError> {
    let Some(n) = n else {
        return Ok(Otp {
            interval: 0,
            key: String::new(),
            length: 0,
        });
    };
    let (ip, lp) = match name {
        "dht" => ("otp.dht.interval", "otp.dht.length"),
        _ => ("otp.crypto.interval", "otp.crypto.length"),
    };
    let o = Otp {
        interval: number(n, "interval", ip)?,
        key: text(n, "key")?,
        length: number(n, "length", lp)? as usize,
    };
    if o.length > crate::otp::MAX_LENGTH {
        return Err(TokenError::Bad {
            key: lp,
            value: o.length.to_string(),
            why: "a code has at most 44 characters",
        });
    }
    if !o.key.is_empty() && o.interval == 0 {
        return Err(TokenError::Bad {
            key: ip,
            value: "0".into(),
            why: "the secret would never be computed (EdgeVPN divides by it); use 1 or more",
        });
    }
    Ok(o)
}

impl Token {
    /// A new token with fresh random keys, rotating every `interval` seconds.
    pub fn generate(interval: u64) -> Token {
        let otp = |key| Otp {
            interval: interval.max(1),
            key,
            length: KEY_LENGTH,
        };
        Token {
            otp: Otps {
                dht: otp(random_key()),
                crypto: otp(random_key()),
            },
            room: random_key(),
            rendezvous: random_key(),
            mdns: random_key(),
            max_message_size: MAX_MESSAGE_SIZE,
        }
    }

    /// Reads a token (base64 of the YAML document; surrounding whitespace is ignored).
    pub fn parse(token: &str) -> Result<Token, TokenError> {
        let t = token.trim();
        if t.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong(t.len()));
        }
        let cleaned: String = t.chars().filter(|c| !c.is_whitespace()).collect();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&cleaned)
            .or_else(|_| {
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(cleaned.trim_end_matches('='))
            })
            .map_err(|e| TokenError::Base64(e.to_string()))?;
        let yaml =
            String::from_utf8(raw).map_err(|_| TokenError::Document("it is not text".into()))?;
        Token::from_yaml(&yaml)
    }

    /// Reads the YAML document itself (EdgeVPN's `EDGEVPNCONFIG` file).
    pub fn from_yaml(yaml: &str) -> Result<Token, TokenError> {
        let src: Arc<str> = Arc::from("token");
        let n = kairos_config::yaml::parse(yaml, &src).map_err(|e| {
            // Never the text itself: it is a secret.
            TokenError::Document(format!("it is not YAML (line {})", e.origin.line))
        })?;
        if !matches!(n.value, Value::Map(_)) {
            return Err(TokenError::Document(format!(
                "it is a {}, not a map",
                n.value.kind()
            )));
        }
        let otps = get(&n, "otp");
        if let Some(o) = otps
            && !matches!(o.value, Value::Map(_))
        {
            return Err(TokenError::Document("`otp` is not a map".into()));
        }
        let t = Token {
            otp: Otps {
                dht: otp(otps.and_then(|o| get(o, "dht")), "dht")?,
                crypto: otp(otps.and_then(|o| get(o, "crypto")), "crypto")?,
            },
            room: text(&n, "room")?,
            rendezvous: text(&n, "rendezvous")?,
            mdns: text(&n, "mdns")?,
            max_message_size: number(&n, "max_message_size", "max_message_size")?,
        };
        if t.otp.crypto.key.is_empty() {
            return Err(TokenError::Missing("otp.crypto.key"));
        }
        if t.room.is_empty() {
            return Err(TokenError::Missing("room"));
        }
        if t.mdns.is_empty() {
            return Err(TokenError::Missing("mdns"));
        }
        if t.otp.dht.key.is_empty() && t.rendezvous.is_empty() {
            return Err(TokenError::Missing("otp.dht.key (or rendezvous)"));
        }
        if t.max_message_size == 0 {
            return Err(TokenError::Missing("max_message_size"));
        }
        Ok(t)
    }

    /// The YAML document, as Go's yaml.v2 writes it (key order and layout).
    pub fn to_yaml(&self) -> String {
        let otp = |name: &str, o: &Otp| {
            format!(
                "  {name}:\n    interval: {}\n    key: {}\n    length: {}\n",
                o.interval,
                yaml_str(&o.key),
                o.length
            )
        };
        format!(
            "otp:\n{}{}room: {}\nrendezvous: {}\nmdns: {}\nmax_message_size: {}\n",
            otp("dht", &self.otp.dht),
            otp("crypto", &self.otp.crypto),
            yaml_str(&self.room),
            yaml_str(&self.rendezvous),
            yaml_str(&self.mdns),
            self.max_message_size
        )
    }

    /// The token: padded standard base64 of [`Token::to_yaml`].
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.to_yaml())
    }
}

/// The problems of a config's `p2p.network_token` (none when unset or templated).
pub fn check_config(config: &Node) -> Vec<kairos_config::validate::Problem> {
    let Some(t) = config.at_path("p2p.network_token") else {
        return Vec::new();
    };
    match &t.value {
        Value::Null => Vec::new(),
        Value::Str(s) if s.is_empty() || s.contains("{{") => Vec::new(),
        Value::Str(s) => match Token::parse(s) {
            Ok(_) => Vec::new(),
            Err(e) => vec![kairos_config::validate::Problem::error(
                t.origin.clone(),
                "p2p.network_token",
                e.to_string(),
            )],
        },
        other => vec![kairos_config::validate::Problem::error(
            t.origin.clone(),
            "p2p.network_token",
            format!("expected a token (text), found a {}", other.kind()),
        )],
    }
}

/// What `token show` prints: the token's settings and what it derives at `unix` — never its
/// keys.
pub fn describe(t: &Token, unix: u64) -> Vec<(String, String)> {
    let d = t.derive(unix);
    let rot = |o: &Otp| {
        if o.key.is_empty() {
            "unset".to_string()
        } else if o.interval >= i64::MAX as u64 {
            format!("never rotates, length {}", o.length)
        } else {
            format!("every {} s, length {}", o.interval, o.length)
        }
    };
    vec![
        ("crypto otp".into(), rot(&t.otp.crypto)),
        ("dht otp".into(), rot(&t.otp.dht)),
        ("mdns service".into(), format!("{}.local", d.mdns)),
        (
            "max message size".into(),
            format!("{} bytes", t.max_message_size),
        ),
        ("ledger topic now".into(), d.topic.clone()),
        ("dht rendezvous now".into(), d.rendezvous.clone()),
        ("dht provider key".into(), d.dht_provider_key.clone()),
        (
            "next rotation".into(),
            d.next_rotation
                .map(|n| format!("unix {n} (in {} s)", n.saturating_sub(unix)))
                .unwrap_or_else(|| "never".into()),
        ),
    ]
}

/// [`describe`] as text (aligned lines) or a JSON object, at `unix` (`None`: now).
pub fn report(t: &Token, unix: Option<u64>, json: bool) -> String {
    let now = unix.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let lines = describe(t, now);
    if json {
        let m: serde_json::Map<String, serde_json::Value> = lines
            .into_iter()
            .map(|(k, v)| (k.replace(' ', "_"), serde_json::Value::String(v)))
            .collect();
        serde_json::to_string_pretty(&m).expect("strings serialise")
    } else {
        lines
            .iter()
            .map(|(k, v)| format!("{k:<20} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A string as a YAML scalar: plain when it reads back as the same string, else quoted.
///
/// "Reads back" is decided by the YAML reader itself, not by a list of look-alikes: `0e0`,
/// `.inf`, `0x1F` or `1_000` are numbers to a YAML reader and must be quoted to stay text.
fn yaml_str(s: &str) -> String {
    let reads_back = || {
        let src: Arc<str> = Arc::from("yaml_str");
        kairos_config::yaml::parse(&format!("k: {s}\n"), &src)
            .ok()
            .and_then(|n| n.get("k").map(|v| v.value == Value::Str(s.to_string())))
            .unwrap_or(false)
    };
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n" | "~"
        )
        && reads_back();
    if plain {
        s.to_string()
    } else {
        format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_YAML: &str = "otp:\n  dht:\n    interval: 9000\n    key: exampleDhtKey\n    length: 43\n  crypto:\n    interval: 9000\n    key: exampleCryptoKey\n    length: 43\nroom: exampleRoom\nrendezvous: exampleRendezvous\nmdns: exampleMdns\nmax_message_size: 20971520\n";

    #[test]
    fn text_that_looks_like_a_number_stays_text() {
        // Found by the round-trip property: a room `0e0` came back as `0`.
        for room in [
            "0e0",
            "1e5",
            "-1",
            "1.5",
            ".5",
            ".inf",
            "-.inf",
            ".nan",
            "0x1F",
            "0o7",
            "1_000",
            "True",
            "NULL",
            "~",
            "2001-12-14",
            "exampleRoom",
        ] {
            let mut t = Token::generate(100);
            t.room = room.to_string();
            assert_eq!(Token::parse(&t.encode()).unwrap().room, room, "{room}");
        }
        assert_eq!(
            yaml_str("exampleRoom"),
            "exampleRoom",
            "plain when it can be"
        );
        assert_eq!(yaml_str("0e0"), "\"0e0\"");
    }

    #[test]
    fn the_spec_document_round_trips_byte_for_byte() {
        let t = Token::from_yaml(SPEC_YAML).unwrap();
        assert_eq!(t.to_yaml(), SPEC_YAML);
        let tok = t.encode();
        assert_eq!(Token::parse(&tok).unwrap(), t);
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&tok)
                .unwrap(),
            SPEC_YAML.as_bytes()
        );
        let d = t.derive(1_700_000_000);
        assert_eq!(d.seal_key, "c4fd0cd86a0e537c04b4ff747eeaeace");
        assert_eq!(d.topic, "dbe12872f832443ff33afe7e21f9236e");
        assert_eq!(d.public_topic, "a3cad994979c047cd99732d5bf14befd");
        assert_eq!(d.rendezvous, "07f6395458c8154bf6dfb8580c705fbf");
        assert!(d.dht_provider_key.starts_with("12201aa1f097"));
        assert_eq!(d.next_rotation, Some(188_889 * 9000));
        assert_eq!(d.mdns, "exampleMdns");
    }

    #[test]
    fn a_token_that_never_rotates() {
        let y = SPEC_YAML.replace("interval: 9000", &format!("interval: {}", i64::MAX));
        let t = Token::from_yaml(&y).unwrap();
        let d = t.derive(1_700_000_000);
        assert_eq!(d.seal_key, "454c86984aeb269d39c178031a34bcbe");
        assert_eq!(d.next_rotation, None);
    }

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let a = Token::generate(DEFAULT_INTERVAL);
        let b = Token::generate(DEFAULT_INTERVAL);
        assert_ne!(a, b);
        assert_eq!(a.otp.crypto.key.len(), 43);
        assert!(a.room.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(Token::parse(&a.encode()).unwrap(), a);
        assert_eq!(a.max_message_size, 20 << 20);
    }

    #[test]
    fn malformed_tokens_are_refused_by_name() {
        let enc = |y: &str| base64::engine::general_purpose::STANDARD.encode(y);
        let err = |t: &str| Token::parse(t).unwrap_err().to_string();
        assert!(err("not base64 !!").contains("not base64"));
        assert!(err(&enc("- a\n- b\n")).contains("a list, not a map"));
        assert!(err(&enc("room: [unclosed\n")).contains("not YAML"));
        assert!(
            !err(&enc("room: [s3cret\n")).contains("s3cret"),
            "never the text"
        );
        assert!(err(&enc(&SPEC_YAML.replace("length: 43", "length: 45"))).contains("at most 44"));
        assert!(
            err(&enc(&SPEC_YAML.replace("interval: 9000", "interval: 0")))
                .contains("interval` is 0")
        );
        assert!(
            err(&enc(&SPEC_YAML.replace("interval: 9000", "interval: -1")))
                .contains("whole number")
        );
        assert!(err(&enc(&SPEC_YAML.replace("room: exampleRoom\n", ""))).contains("no `room`"));
        assert!(err(&enc(&SPEC_YAML.replace("mdns: exampleMdns\n", ""))).contains("no `mdns`"));
        assert!(
            err(&enc(&SPEC_YAML.replace("key: exampleCryptoKey", "key: ''")))
                .contains("otp.crypto.key")
        );
        assert!(err(&"A".repeat(20_000)).contains("too long"));
        // Padding may be lost when a token is pasted; whitespace and line breaks too.
        let t = Token::generate(60).encode();
        let mangled = format!("  {}\n", t.trim_end_matches('='));
        assert!(Token::parse(&mangled).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn any_input_is_a_token_or_an_error(s in ".{0,600}") {
            let _ = Token::parse(&s);
            let b = base64::engine::general_purpose::STANDARD.encode(&s);
            let _ = Token::parse(&b);
        }

        #[test]
        fn keys_round_trip(k in "[ -~]{1,60}", room in "[a-zA-Z0-9:#' .+_-]{1,40}") {
            let mut t = Token::generate(100);
            t.otp.crypto.key = k;
            t.room = room;
            proptest::prop_assert_eq!(Token::parse(&t.encode()).unwrap(), t);
        }
    }
}
