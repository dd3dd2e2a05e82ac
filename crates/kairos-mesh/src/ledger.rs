//! The shared ledger, in EdgeVPN's format (`pkg/blockchain`): one block holding every
//! bucket's keys, gossiped whole, adopted by its index.
//!
//! - [`Block`] and [`Entry`] with the exact JSON Go writes ([`go_json`]: map keys sorted,
//!   `<`, `>`, `&`, U+2028/9 escaped, no spaces), both entry forms (a bare JSON string for a
//!   legacy entry, an object with owner, version and signature otherwise), and the block hash
//!   (SHA-256 of Go's `fmt.Sprint(Index, Timestamp, Storage, PrevHash)`);
//! - the merge rules: legacy (the higher index wins, then the higher hash) and, for open
//!   buckets, per entry by version;
//! - the wire: `gzip(JSON(block))`, sealed ([`crate::seal`]), in the pubsub envelope
//!   `{"Message", "SenderID", "Annotations"}`, bounded by the token's `max_message_size`.
//!
//! Entries of owned buckets (`machines`, `services`, `files`, `users`, `egress`,
//! `healthcheck`, `dns`) are signed by their owner's Ed25519 PeerID and merged by
//! [`merge_owned`] under EdgeVPN's `enforce` rules.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use base64::Engine;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

/// One stored value. `value` is the JSON text of what was stored (`"\"10.1.0.2\""` for a
/// string), as Go keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    pub value: String,
    pub owner: String,
    pub version: u64,
    pub updated_at: i64,
    pub deleted: bool,
    pub sig: Vec<u8>,
}

impl Entry {
    /// An unsigned, unversioned entry (what `ownership: off` writes).
    pub fn legacy(value_json: impl Into<String>) -> Entry {
        Entry {
            value: value_json.into(),
            ..Default::default()
        }
    }

    fn is_legacy(&self) -> bool {
        self.owner.is_empty() && self.sig.is_empty() && !self.deleted && self.version == 0
    }
}

/// bucket → key → entry, in sorted order (as Go prints and encodes maps).
pub type Storage = BTreeMap<String, BTreeMap<String, Entry>>;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Block {
    pub index: u64,
    pub timestamp: String,
    pub storage: Storage,
    pub hash: String,
    pub prev_hash: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("ledger message: {0}")]
    Format(String),
    #[error("ledger message larger than {0} bytes once unpacked; dropped")]
    TooBig(u64),
    #[error("ledger message not sealed with this network's current key; dropped")]
    Seal,
}

/// Go's `encoding/json` encoding of a string (with its HTML-safe escapes).
pub fn go_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Go's `encoding/json` encoding of any JSON value: object keys sorted, no whitespace.
pub fn go_json(v: &Json) -> String {
    fn walk(v: &Json, out: &mut String) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(&n.to_string()),
            Json::String(s) => go_json_string(s, out),
            Json::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    walk(x, out);
                }
                out.push(']');
            }
            Json::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    go_json_string(k, out);
                    out.push(':');
                    walk(&m[*k], out);
                }
                out.push('}');
            }
        }
    }
    let mut out = String::new();
    walk(v, &mut out);
    out
}

impl Entry {
    fn to_json(&self, out: &mut String) {
        if self.is_legacy() {
            go_json_string(&self.value, out);
            return;
        }
        out.push_str("{\"Value\":");
        go_json_string(&self.value, out);
        out.push_str(",\"Owner\":");
        go_json_string(&self.owner, out);
        out.push_str(&format!(
            ",\"Version\":{},\"UpdatedAt\":{},\"Deleted\":{},\"Sig\":",
            self.version, self.updated_at, self.deleted
        ));
        if self.sig.is_empty() {
            out.push_str("null");
        } else {
            go_json_string(
                &base64::engine::general_purpose::STANDARD.encode(&self.sig),
                out,
            );
        }
        out.push('}');
    }

    fn from_json(v: &Json) -> Result<Entry, LedgerError> {
        let bad = |what: &str| LedgerError::Format(format!("an entry's {what}"));
        match v {
            Json::String(s) => Ok(Entry::legacy(s.clone())),
            Json::Object(m) => {
                let s = |k: &str| match m.get(k) {
                    None | Some(Json::Null) => Ok(String::new()),
                    Some(Json::String(s)) => Ok(s.clone()),
                    Some(_) => Err(bad(k)),
                };
                Ok(Entry {
                    value: s("Value")?,
                    owner: s("Owner")?,
                    version: match m.get("Version") {
                        None | Some(Json::Null) => 0,
                        Some(n) => n.as_u64().ok_or_else(|| bad("Version"))?,
                    },
                    updated_at: match m.get("UpdatedAt") {
                        None | Some(Json::Null) => 0,
                        Some(n) => n.as_i64().ok_or_else(|| bad("UpdatedAt"))?,
                    },
                    deleted: match m.get("Deleted") {
                        None | Some(Json::Null) => false,
                        Some(Json::Bool(b)) => *b,
                        Some(_) => return Err(bad("Deleted")),
                    },
                    sig: match s("Sig")? {
                        s if s.is_empty() => Vec::new(),
                        s => base64::engine::general_purpose::STANDARD
                            .decode(s)
                            .map_err(|_| bad("Sig"))?,
                    },
                })
            }
            _ => Err(bad("form")),
        }
    }

    /// Go's `%v` of a SignedData: `{Value Owner Version UpdatedAt Deleted [sig bytes]}`.
    fn go_sprint(&self, out: &mut String) {
        let sig: Vec<String> = self.sig.iter().map(|b| b.to_string()).collect();
        out.push_str(&format!(
            "{{{} {} {} {} {} [{}]}}",
            self.value,
            self.owner,
            self.version,
            self.updated_at,
            self.deleted,
            sig.join(" ")
        ));
    }
}

/// Go's JSON of a block's storage (buckets and keys sorted).
fn storage_json(storage: &Storage, out: &mut String) {
    if storage.is_empty() {
        out.push_str("{}");
        return;
    }
    out.push('{');
    for (i, (bucket, keys)) in storage.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        go_json_string(bucket, out);
        out.push_str(":{");
        for (j, (k, e)) in keys.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            go_json_string(k, out);
            out.push(':');
            e.to_json(out);
        }
        out.push('}');
    }
    out.push('}');
}

impl Block {
    /// The genesis block (its timestamp is local and never hashed).
    pub fn genesis(timestamp: &str) -> Block {
        Block {
            index: 0,
            timestamp: timestamp.to_string(),
            storage: Storage::new(),
            hash: checksum(0, "", &Storage::new(), ""),
            prev_hash: String::new(),
        }
    }

    /// The JSON Go writes for the block: `{"Index","Timestamp","Storage","Hash","PrevHash"}`.
    pub fn to_json(&self) -> String {
        let mut out = format!("{{\"Index\":{},\"Timestamp\":", self.index);
        go_json_string(&self.timestamp, &mut out);
        out.push_str(",\"Storage\":");
        storage_json(&self.storage, &mut out);
        out.push_str(",\"Hash\":");
        go_json_string(&self.hash, &mut out);
        out.push_str(",\"PrevHash\":");
        go_json_string(&self.prev_hash, &mut out);
        out.push('}');
        out
    }

    /// Reads a block as Go or we wrote it (unknown fields are ignored, as Go does).
    pub fn from_json(text: &str) -> Result<Block, LedgerError> {
        let v: Json = serde_json::from_str(text)
            .map_err(|e| LedgerError::Format(format!("not JSON: {e}")))?;
        let m = v
            .as_object()
            .ok_or_else(|| LedgerError::Format("not an object".into()))?;
        let s = |k: &str| match m.get(k) {
            None | Some(Json::Null) => Ok(String::new()),
            Some(Json::String(s)) => Ok(s.clone()),
            Some(_) => Err(LedgerError::Format(format!("`{k}` is not text"))),
        };
        let mut storage = Storage::new();
        match m.get("Storage") {
            None | Some(Json::Null) => {}
            Some(Json::Object(buckets)) => {
                for (b, keys) in buckets {
                    let keys = match keys {
                        Json::Object(k) => k,
                        Json::Null => continue,
                        _ => return Err(LedgerError::Format(format!("bucket {b} is not a map"))),
                    };
                    let mut out = BTreeMap::new();
                    for (k, e) in keys {
                        out.insert(k.clone(), Entry::from_json(e)?);
                    }
                    storage.insert(b.clone(), out);
                }
            }
            Some(_) => return Err(LedgerError::Format("`Storage` is not a map".into())),
        }
        Ok(Block {
            index: m
                .get("Index")
                .and_then(Json::as_u64)
                .ok_or_else(|| LedgerError::Format("`Index` is not a whole number".into()))?,
            timestamp: s("Timestamp")?,
            storage,
            hash: s("Hash")?,
            prev_hash: s("PrevHash")?,
        })
    }

    /// The block after this one with `storage`, stamped `timestamp` (Go's UTC `String()`).
    pub fn next(&self, storage: Storage, timestamp: &str) -> Block {
        let index = self.index + 1;
        Block {
            index,
            timestamp: timestamp.to_string(),
            hash: checksum(index, timestamp, &storage, &self.hash),
            storage,
            prev_hash: self.hash.clone(),
        }
    }

    /// Whether `incoming` replaces this block under EdgeVPN's legacy rule.
    pub fn superseded_by(&self, incoming: &Block) -> bool {
        incoming.index > self.index || (incoming.index == self.index && incoming.hash > self.hash)
    }
}

/// SHA-256 hex of Go's `fmt.Sprint(Index, Timestamp, Storage, PrevHash)`: no separators
/// (Go puts a space only between two operands that are not strings), the storage as
/// `map[bucket:map[key:{…}]]`.
pub fn checksum(index: u64, timestamp: &str, storage: &Storage, prev_hash: &str) -> String {
    let mut s = format!("{index}{timestamp}map[");
    for (i, (bucket, keys)) in storage.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(bucket);
        s.push_str(":map[");
        for (j, (k, e)) in keys.iter().enumerate() {
            if j > 0 {
                s.push(' ');
            }
            s.push_str(k);
            s.push(':');
            e.go_sprint(&mut s);
        }
        s.push(']');
    }
    s.push(']');
    s.push_str(prev_hash);
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Go's `time.Time.String()` of a UTC instant: `2006-01-02 15:04:05.999999999 +0000 UTC`
/// (fraction without trailing zeros, none when whole).
pub fn go_utc_string(unix_nanos: i128) -> String {
    let secs = unix_nanos.div_euclid(1_000_000_000) as i64;
    let nanos = unix_nanos.rem_euclid(1_000_000_000) as u32;
    let (y, m, d, hh, mm, ss) = kairos_sys::time::civil(secs);
    let base = format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}");
    let frac = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}").trim_end_matches('0').to_string()
    };
    format!("{base}{frac} +0000 UTC")
}

/// Merges an incoming block's open-bucket entries into `storage` (ownership `enforce` for
/// buckets no policy owns): an entry is taken when the key is new or its version is higher.
/// Returns whether anything changed.
pub fn merge_open(storage: &mut Storage, incoming: &Storage, open: &dyn Fn(&str) -> bool) -> bool {
    let mut changed = false;
    for (bucket, keys) in incoming.iter().filter(|(b, _)| open(b)) {
        let mine = storage.entry(bucket.clone()).or_default();
        for (k, e) in keys {
            let take = match mine.get(k) {
                None => true,
                Some(ex) if ex == e => false,
                Some(ex) => e.version > ex.version,
            };
            if take {
                mine.insert(k.clone(), e.clone());
                changed = true;
            }
        }
    }
    changed
}

/// The buckets whose entries EdgeVPN's policy registry owns (`policy.go`): their entries
/// must be signed by their owner.
pub const OWNED_BUCKETS: &[&str] = &[
    "machines",
    "services",
    "files",
    "users",
    "egress",
    "healthcheck",
    "dns",
];

/// The bytes an owned entry's signature covers: `len|bucket ‖ len|key ‖ len|owner ‖
/// version ‖ updatedAt ‖ deleted ‖ len|value`, lengths and numbers 8-byte big-endian.
pub fn signing_bytes(bucket: &str, key: &str, e: &Entry) -> Vec<u8> {
    let mut out = Vec::new();
    for s in [bucket, key, &e.owner] {
        out.extend_from_slice(&(s.len() as u64).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(&e.version.to_be_bytes());
    out.extend_from_slice(&(e.updated_at as u64).to_be_bytes());
    out.push(e.deleted as u8);
    out.extend_from_slice(&(e.value.len() as u64).to_be_bytes());
    out.extend_from_slice(e.value.as_bytes());
    out
}

impl Entry {
    /// An entry written and signed by `id` (version = max(previous + 1, now in nanoseconds),
    /// as EdgeVPN writes them).
    pub fn signed(
        bucket: &str,
        key: &str,
        value_json: &str,
        id: &crate::identity::Identity,
        previous: Option<&Entry>,
        now_nanos: u64,
        deleted: bool,
    ) -> Entry {
        let mut e = Entry {
            value: value_json.to_string(),
            owner: id.peer_id(),
            version: previous
                .map(|p| p.version.saturating_add(1))
                .unwrap_or(0)
                .max(now_nanos),
            updated_at: (now_nanos / 1_000_000_000) as i64,
            deleted,
            sig: Vec::new(),
        };
        e.sig = id.sign(&signing_bytes(bucket, key, &e));
        e
    }

    /// Whether its owner signed it.
    pub fn verifies(&self, bucket: &str, key: &str) -> bool {
        !self.owner.is_empty()
            && crate::identity::verify(&self.owner, &signing_bytes(bucket, key, self), &self.sig)
    }
}

/// Who a value says owns it (EdgeVPN's policy registry): the value's `PeerID` for
/// `machines`, `services`, `files`; the key for `users`, `egress`, `healthcheck`; nobody for
/// `dns` (the first claimer owns it).
pub fn declared_owner(bucket: &str, key: &str, value_json: &str) -> Option<String> {
    match bucket {
        "machines" | "services" | "files" => serde_json::from_str::<Json>(value_json)
            .ok()?
            .get("PeerID")?
            .as_str()
            .map(str::to_string),
        "users" | "egress" | "healthcheck" => Some(key.to_string()),
        _ => None,
    }
}

/// EdgeVPN's default ownership TTL: 4 × the 120 s health-check interval.
pub const OWNERSHIP_TTL: i64 = 480;

fn expired(storage: &Storage, bucket: &str, key: &str, e: &Entry, now: i64, ttl: i64) -> bool {
    if bucket == "healthcheck" {
        return e.updated_at + ttl <= now;
    }
    let owner = if e.owner.is_empty() {
        declared_owner(bucket, key, &e.value).unwrap_or_default()
    } else {
        e.owner.clone()
    };
    // Liveness: the owner's last heartbeat is older than the TTL.
    let beat = storage
        .get("healthcheck")
        .and_then(|h| h.get(&owner))
        .filter(|h| !h.deleted)
        .and_then(|h| serde_json::from_str::<String>(&h.value).ok())
        .and_then(|t| kairos_sys::time::parse_rfc3339(&t));
    beat.is_none_or(|t| t + ttl <= now)
}

/// Why an incoming owned entry was refused (for logs and `p2p status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub bucket: String,
    pub key: String,
    pub why: &'static str,
}

/// Merges the owned buckets of `incoming` into `storage` under EdgeVPN's `enforce` rules;
/// returns whether anything changed and what was refused.
pub fn merge_owned(
    storage: &mut Storage,
    incoming: &Storage,
    now: i64,
    ttl: i64,
) -> (bool, Vec<Refused>) {
    let mut changed = false;
    let mut refused = Vec::new();
    for (bucket, keys) in incoming
        .iter()
        .filter(|(b, _)| OWNED_BUCKETS.contains(&b.as_str()))
    {
        for (key, inc) in keys {
            let ex = storage.get(bucket).and_then(|b| b.get(key)).cloned();
            if ex.as_ref() == Some(inc) {
                continue;
            }
            let verdict = judge(storage, bucket, key, inc, ex.as_ref(), now, ttl);
            match verdict {
                Ok(()) => {
                    storage
                        .entry(bucket.clone())
                        .or_default()
                        .insert(key.clone(), inc.clone());
                    changed = true;
                }
                Err(why) => refused.push(Refused {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    why,
                }),
            }
        }
    }
    (changed, refused)
}

fn judge(
    storage: &Storage,
    bucket: &str,
    key: &str,
    inc: &Entry,
    ex: Option<&Entry>,
    now: i64,
    ttl: i64,
) -> Result<(), &'static str> {
    if !inc.verifies(bucket, key) {
        return Err("not signed by its owner");
    }
    let ex_owner = ex.map(|e| {
        if e.owner.is_empty() {
            declared_owner(bucket, key, &e.value).unwrap_or_default()
        } else {
            e.owner.clone()
        }
    });
    let ex_expired = ex.is_some_and(|e| expired(storage, bucket, key, e, now, ttl));
    if inc.deleted {
        let Some(e) = ex else {
            return Err("a deletion of a key that does not exist");
        };
        if ex_owner.as_deref() != Some(inc.owner.as_str()) && !ex_expired {
            return Err("deleted by someone who does not own it");
        }
        return if inc.version > e.version {
            Ok(())
        } else {
            Err("an old deletion")
        };
    }
    if let Some(d) = declared_owner(bucket, key, &inc.value)
        && d != inc.owner
    {
        return Err("the value names another owner than its signer");
    }
    let Some(e) = ex else {
        return Ok(());
    };
    if e.deleted {
        return if inc.version > e.version {
            Ok(())
        } else {
            Err("older than its deletion")
        };
    }
    if ex_owner.as_deref() != Some(inc.owner.as_str()) {
        return if ex_expired {
            Ok(())
        } else {
            Err("owned by a live peer")
        };
    }
    match inc.version.cmp(&e.version) {
        std::cmp::Ordering::Greater => Ok(()),
        std::cmp::Ordering::Less => Err("an older version"),
        std::cmp::Ordering::Equal if (&inc.owner, &inc.sig) > (&e.owner, &e.sig) => Ok(()),
        std::cmp::Ordering::Equal => Err("the same version, losing the tie-break"),
    }
}

/// The pubsub payload for a block: the envelope with `gzip(JSON(block))` sealed in it.
pub fn to_wire(block: &Block, seal_key: &[u8; 32]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(block.to_json().as_bytes())
        .expect("writing to memory");
    let packed = gz.finish().expect("writing to memory");
    // Go casts the gzip bytes to a string before sealing: the bytes are sealed as they are.
    let sealed = crate::seal::seal(seal_key, &packed);
    let mut out = String::from("{\"Message\":");
    go_json_string(&sealed, &mut out);
    out.push_str(",\"SenderID\":\"\",\"Annotations\":null}");
    out.into_bytes()
}

/// Reads a pubsub payload: envelope, unseal, gunzip (at most `max_size` bytes), block.
pub fn from_wire(payload: &[u8], seal_key: &[u8; 32], max_size: u64) -> Result<Block, LedgerError> {
    if payload.len() as u64 > max_size.saturating_mul(2).saturating_add(1024) {
        return Err(LedgerError::TooBig(max_size));
    }
    let env: Json = serde_json::from_slice(payload)
        .map_err(|e| LedgerError::Format(format!("envelope: {e}")))?;
    let msg = env
        .get("Message")
        .and_then(Json::as_str)
        .ok_or_else(|| LedgerError::Format("envelope without `Message`".into()))?;
    let packed = crate::seal::unseal(seal_key, msg).map_err(|_| LedgerError::Seal)?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&packed[..])
        .take(max_size + 1)
        .read_to_string(&mut text)
        .map_err(|e| LedgerError::Format(format!("gzip: {e}")))?;
    if text.len() as u64 > max_size {
        return Err(LedgerError::TooBig(max_size));
    }
    Block::from_json(&text)
}

/// What our own peers (kairos-rs) say to each other, never EdgeVPN peers: a [`SyncMessage::Delta`]
/// carries only the entries that changed (gossiped on their own sync topic; merged per entry,
/// so only under `ownership: enforce`) or, in a comparison, a whole block; a
/// [`SyncMessage::Digest`] the [`digest`] of a node's storage, which two nodes compare over a
/// stream every sync interval instead of gossiping whole blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncMessage {
    Delta(Block),
    Digest([u8; 32]),
}

/// SHA-256 of the storage's JSON: equal on two nodes exactly when their entries are.
pub fn digest(storage: &Storage) -> [u8; 32] {
    let mut text = String::new();
    storage_json(storage, &mut text);
    Sha256::digest(text.as_bytes()).into()
}

/// `seal(tag ‖ body)`: `D` and `gzip(JSON(block))`, or `H` and the 32-byte digest.
pub fn sync_to_wire(m: &SyncMessage, seal_key: &[u8; 32]) -> Vec<u8> {
    let mut plain = Vec::new();
    match m {
        SyncMessage::Delta(b) => {
            plain.push(b'D');
            let mut gz = flate2::write::GzEncoder::new(plain, flate2::Compression::default());
            gz.write_all(b.to_json().as_bytes())
                .expect("writing to memory");
            plain = gz.finish().expect("writing to memory");
        }
        SyncMessage::Digest(d) => {
            plain.push(b'H');
            plain.extend_from_slice(d);
        }
    }
    crate::seal::seal_bytes(seal_key, &plain)
}

/// Reads a [`sync_to_wire`] message: at most `max_size` bytes sealed and unpacked.
pub fn sync_from_wire(
    data: &[u8],
    seal_key: &[u8; 32],
    max_size: u64,
) -> Result<SyncMessage, LedgerError> {
    if data.len() as u64 > max_size.saturating_add(64) {
        return Err(LedgerError::TooBig(max_size));
    }
    let plain = crate::seal::unseal_bytes(seal_key, data).map_err(|_| LedgerError::Seal)?;
    match plain.split_first() {
        Some((b'H', d)) => {
            Ok(SyncMessage::Digest(d.try_into().map_err(|_| {
                LedgerError::Format("a digest is 32 bytes".into())
            })?))
        }
        Some((b'D', packed)) => {
            let mut text = String::new();
            flate2::read::GzDecoder::new(packed)
                .take(max_size + 1)
                .read_to_string(&mut text)
                .map_err(|e| LedgerError::Format(format!("gzip: {e}")))?;
            if text.len() as u64 > max_size {
                return Err(LedgerError::TooBig(max_size));
            }
            Ok(SyncMessage::Delta(Block::from_json(&text)?))
        }
        _ => Err(LedgerError::Format("an unknown sync message".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_messages_round_trip_sealed_and_bounded() {
        let key = [7u8; 32];
        let mut storage = Storage::new();
        storage
            .entry("machines".into())
            .or_default()
            .insert("10.1.0.2".into(), Entry::legacy("\"x\""));
        let block = Block {
            storage: storage.clone(),
            ..Default::default()
        };
        let d = digest(&storage);
        assert_ne!(d, digest(&Storage::new()), "the digest covers the entries");
        for m in [SyncMessage::Delta(block), SyncMessage::Digest(d)] {
            let wire = sync_to_wire(&m, &key);
            assert_eq!(sync_from_wire(&wire, &key, 1 << 20).unwrap(), m);
            assert_eq!(
                sync_from_wire(&wire, &[8u8; 32], 1 << 20),
                Err(LedgerError::Seal),
                "another network's key opens nothing"
            );
        }
        let big = SyncMessage::Delta(Block {
            storage,
            timestamp: "t".repeat(4000),
            ..Default::default()
        });
        let wire = sync_to_wire(&big, &key);
        assert_eq!(
            sync_from_wire(&wire, &key, 1000),
            Err(LedgerError::TooBig(1000)),
            "a message that unpacks past the limit is dropped"
        );
        let odd = crate::seal::seal_bytes(&key, b"X123");
        assert!(matches!(
            sync_from_wire(&odd, &key, 1000),
            Err(LedgerError::Format(_))
        ));
        let short = crate::seal::seal_bytes(&key, b"H123");
        assert!(matches!(
            sync_from_wire(&short, &key, 1000),
            Err(LedgerError::Format(_))
        ));
    }

    #[test]
    fn genesis_hash_is_the_spec_value() {
        assert_eq!(
            Block::genesis("2026-12-01 10:00:00 +0100 CET m=+0.01").hash,
            "993c923422cd134b6aad0235ebfd4290a7b27b83d1bcd6b1fb2addc4b45b2fa6"
        );
    }

    #[test]
    fn go_escapes() {
        let mut s = String::new();
        go_json_string("a<b>&c\u{2028}\"\\\n\u{1}é", &mut s);
        assert_eq!(s, "\"a\\u003cb\\u003e\\u0026c\\u2028\\\"\\\\\\n\\u0001é\"");
        let v: Json = serde_json::from_str(r#"{"b":1,"a":{"z":[1,"<"],"y":null}}"#).unwrap();
        assert_eq!(go_json(&v), r#"{"a":{"y":null,"z":[1,"\u003c"]},"b":1}"#);
    }

    #[test]
    fn go_time_strings() {
        assert_eq!(
            go_utc_string(1_700_000_000_000_000_000),
            "2023-11-14 22:13:20 +0000 UTC"
        );
        assert_eq!(
            go_utc_string(1_700_000_000_120_000_000),
            "2023-11-14 22:13:20.12 +0000 UTC"
        );
        assert_eq!(go_utc_string(0), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(
            go_utc_string(951_782_400_000_000_001),
            "2000-02-29 00:00:00.000000001 +0000 UTC"
        );
    }

    #[test]
    fn legacy_merge_rule() {
        let g = Block::genesis("t");
        let mut s = Storage::new();
        s.entry("kairos".into())
            .or_default()
            .insert("a-uuid".into(), Entry::legacy("1"));
        let b1 = g.next(s.clone(), "t1");
        assert!(g.superseded_by(&b1));
        assert!(!b1.superseded_by(&g));
        let b1b = g.next(Storage::new(), "t1b");
        assert_eq!(b1.superseded_by(&b1b), b1b.hash > b1.hash);
    }

    #[test]
    fn open_buckets_merge_by_version() {
        let e = |v: &str, version| Entry {
            value: v.into(),
            owner: "12D3KooW".into(),
            version,
            ..Default::default()
        };
        let mut mine = Storage::new();
        mine.entry("kairos".into())
            .or_default()
            .insert("k".into(), e("\"old\"", 5));
        let mut inc = Storage::new();
        inc.entry("kairos".into())
            .or_default()
            .insert("k".into(), e("\"older\"", 4));
        inc.entry("kairos".into())
            .or_default()
            .insert("n".into(), e("\"new\"", 1));
        inc.entry("machines".into())
            .or_default()
            .insert("10.1.0.2".into(), e("{}", 9));
        let open = |b: &str| !OWNED_BUCKETS.contains(&b);
        assert!(merge_open(&mut mine, &inc, &open));
        assert_eq!(
            mine["kairos"]["k"].value, "\"old\"",
            "lower version ignored"
        );
        assert_eq!(mine["kairos"]["n"].value, "\"new\"");
        assert!(
            !mine.contains_key("machines"),
            "owned buckets are not merged unsigned"
        );
        assert!(
            !merge_open(&mut mine, &inc, &open),
            "a second merge changes nothing"
        );
    }

    #[test]
    fn owned_entries_follow_the_enforce_rules() {
        use crate::identity::Identity;
        let a = Identity::from_seed(&[1; 32]);
        let b = Identity::from_seed(&[2; 32]);
        let now = 1_796_205_600i64;
        let nanos = now as u64 * 1_000_000_000;
        let beat = |id: &Identity, t: i64| {
            let v = format!("\"{}\"", kairos_sys::time::rfc3339(t));
            Entry::signed(
                "healthcheck",
                &id.peer_id(),
                &v,
                id,
                None,
                t as u64 * 1_000_000_000,
                false,
            )
        };
        // `machines[ip]` naming `owner`, signed by `signer`.
        let claim = |ip: &str, owner: &Identity, signer: &Identity, version: u64, deleted: bool| {
            let v = format!(r#"{{"PeerID":"{}"}}"#, owner.peer_id());
            Entry::signed("machines", ip, &v, signer, None, version, deleted)
        };
        // Merges one entry; the reason it was refused, if it was.
        let offer = |mine: &mut Storage, bucket: &str, key: &str, e: Entry| {
            let mut one = Storage::new();
            one.entry(bucket.into()).or_default().insert(key.into(), e);
            merge_owned(mine, &one, now, OWNERSHIP_TTL)
                .1
                .first()
                .map(|r| r.why)
        };
        let ip = "10.1.0.2";
        // a is alive and claims the address.
        let mut mine = Storage::new();
        assert_eq!(
            offer(&mut mine, "healthcheck", &a.peer_id(), beat(&a, now)),
            None
        );
        assert_eq!(
            offer(&mut mine, "machines", ip, claim(ip, &a, &a, nanos, false)),
            None
        );
        // b cannot take a's address while a is alive, nor claim it in a's name.
        assert_eq!(
            offer(
                &mut mine,
                "machines",
                ip,
                claim(ip, &b, &b, nanos + 5, false)
            ),
            Some("owned by a live peer")
        );
        assert_eq!(
            offer(
                &mut mine,
                "machines",
                ip,
                claim(ip, &a, &b, nanos + 5, false)
            ),
            Some("the value names another owner than its signer")
        );
        // A tampered value does not verify; an older version of a's own is refused.
        let mut t = claim(ip, &a, &a, nanos + 9, false);
        t.value = format!(r#"{{"PeerID":"{}"}}"#, b.peer_id());
        assert_eq!(
            offer(&mut mine, "machines", ip, t),
            Some("not signed by its owner")
        );
        assert_eq!(
            offer(
                &mut mine,
                "machines",
                ip,
                claim(ip, &a, &a, nanos - 1, false)
            ),
            Some("an older version")
        );
        // b cannot delete it; a can.
        assert_eq!(
            offer(
                &mut mine,
                "machines",
                ip,
                claim(ip, &a, &b, nanos + 7, true)
            ),
            Some("deleted by someone who does not own it")
        );
        assert_eq!(
            offer(
                &mut mine,
                "machines",
                ip,
                claim(ip, &a, &a, nanos + 7, true)
            ),
            None
        );
        assert!(mine["machines"][ip].deleted);
        // After a's heartbeat is older than the TTL, b may take a dead peer's key.
        let ip3 = "10.1.0.3";
        assert_eq!(
            offer(&mut mine, "machines", ip3, claim(ip3, &a, &a, nanos, false)),
            None
        );
        mine.get_mut("healthcheck")
            .unwrap()
            .insert(a.peer_id(), beat(&a, now - 600));
        assert_eq!(
            offer(
                &mut mine,
                "machines",
                ip3,
                claim(ip3, &b, &b, nanos + 5, false)
            ),
            None
        );
        assert_eq!(mine["machines"][ip3].owner, b.peer_id());
        // Unsigned entries never enter an owned bucket.
        assert_eq!(
            offer(&mut mine, "dns", "x.", Entry::legacy("{}")),
            Some("not signed by its owner")
        );
    }

    #[test]
    fn wire_round_trip_and_other_networks() {
        let mut s = Storage::new();
        s.entry("dns".into())
            .or_default()
            .insert("node1.mesh.".into(), Entry::legacy(r#"{"1":"10.1.0.5"}"#));
        let b = Block::genesis("g").next(s, "2026-12-02 10:00:00 +0000 UTC");
        let key = *b"c4fd0cd86a0e537c04b4ff747eeaeace";
        let wire = to_wire(&b, &key);
        assert!(String::from_utf8_lossy(&wire).ends_with(r#","SenderID":"","Annotations":null}"#));
        assert_eq!(from_wire(&wire, &key, 20 << 20).unwrap(), b);
        let other = *b"454c86984aeb269d39c178031a34bcbe";
        assert_eq!(from_wire(&wire, &other, 20 << 20), Err(LedgerError::Seal));
        assert_eq!(from_wire(&wire, &key, 64), Err(LedgerError::TooBig(64)));
        assert!(from_wire(b"not json", &key, 1 << 20).is_err());
    }
}
