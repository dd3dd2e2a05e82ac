//! A node's view of the ledger and the decisions EdgeVPN's services take on it, as pure
//! functions of that view and the clock: local writes and deletes (a new block to broadcast
//! when something changed), received blocks (adopted or merged by the ownership mode), the
//! "announce until it is there" test, who is alive, and the DHCP-over-ledger address rule.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::identity::Identity;
use crate::ledger::{self, Block, Entry, Refused, Storage};

/// How received blocks are taken (EdgeVPN `--ownership`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Legacy: the whole block with the higher index (then hash) wins.
    Off,
    /// Per entry: open buckets by version, owned buckets only signed by their owner.
    Enforce,
}

/// What a received block did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub changed: bool,
    pub refused: Vec<Refused>,
}

/// A `machines` value, as far as the VPN reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub peer: String,
    pub hostname: String,
}

pub struct Ledger {
    last: Block,
    mode: Ownership,
    ttl: i64,
}

fn now_string(now_nanos: u64) -> String {
    ledger::go_utc_string(now_nanos as i128)
}

impl Ledger {
    pub fn new(mode: Ownership, genesis_timestamp: &str) -> Ledger {
        Ledger {
            last: Block::genesis(genesis_timestamp),
            mode,
            ttl: ledger::OWNERSHIP_TTL,
        }
    }

    pub fn last(&self) -> &Block {
        &self.last
    }

    /// A live entry (deleted ones are hidden).
    pub fn get(&self, bucket: &str, key: &str) -> Option<&Entry> {
        self.last
            .storage
            .get(bucket)?
            .get(key)
            .filter(|e| !e.deleted)
    }

    /// The live entries of a bucket.
    pub fn bucket(&self, bucket: &str) -> BTreeMap<&str, &Entry> {
        self.last
            .storage
            .get(bucket)
            .map(|b| {
                b.iter()
                    .filter(|(_, e)| !e.deleted)
                    .map(|(k, e)| (k.as_str(), e))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn commit(&mut self, storage: Storage, now_nanos: u64) -> Option<Block> {
        if storage == self.last.storage {
            return None;
        }
        self.last = self.last.next(storage, &now_string(now_nanos));
        Some(self.last.clone())
    }

    /// Stores `value_json` at bucket/key (signed by `signer` under `Enforce`); the new block
    /// to broadcast, or `None` when it was already there.
    pub fn put(
        &mut self,
        bucket: &str,
        key: &str,
        value_json: &str,
        signer: Option<&Identity>,
        now_nanos: u64,
    ) -> Option<Block> {
        if self.get(bucket, key).is_some_and(|e| e.value == value_json) {
            return None;
        }
        let prev = self
            .last
            .storage
            .get(bucket)
            .and_then(|b| b.get(key))
            .cloned();
        let entry = match (self.mode, signer) {
            (Ownership::Enforce, Some(id)) => {
                Entry::signed(bucket, key, value_json, id, prev.as_ref(), now_nanos, false)
            }
            _ => Entry::legacy(value_json),
        };
        let mut storage = self.last.storage.clone();
        storage
            .entry(bucket.to_string())
            .or_default()
            .insert(key.to_string(), entry);
        self.commit(storage, now_nanos)
    }

    /// Deletes bucket/key: removed (legacy) or a signed tombstone (`Enforce`).
    pub fn delete(
        &mut self,
        bucket: &str,
        key: &str,
        signer: Option<&Identity>,
        now_nanos: u64,
    ) -> Option<Block> {
        let prev = self.get(bucket, key)?.clone();
        let mut storage = self.last.storage.clone();
        let b = storage.entry(bucket.to_string()).or_default();
        match (self.mode, signer) {
            (Ownership::Enforce, Some(id)) => {
                let t = Entry::signed(bucket, key, &prev.value, id, Some(&prev), now_nanos, true);
                b.insert(key.to_string(), t);
            }
            _ => {
                b.remove(key);
                if b.is_empty() {
                    storage.remove(bucket);
                }
            }
        }
        self.commit(storage, now_nanos)
    }

    /// Takes a block received from a peer.
    pub fn receive(&mut self, incoming: &Block, now_nanos: u64) -> Received {
        match self.mode {
            Ownership::Off => {
                if self.last.superseded_by(incoming) {
                    self.last = incoming.clone();
                    Received {
                        changed: true,
                        refused: Vec::new(),
                    }
                } else {
                    Received::default()
                }
            }
            Ownership::Enforce => {
                let mut storage = self.last.storage.clone();
                let open = |b: &str| !ledger::OWNED_BUCKETS.contains(&b);
                let a = ledger::merge_open(&mut storage, &incoming.storage, &open);
                let now = (now_nanos / 1_000_000_000) as i64;
                let (b, refused) =
                    ledger::merge_owned(&mut storage, &incoming.storage, now, self.ttl);
                let changed = (a || b) && self.commit(storage, now_nanos).is_some();
                Received { changed, refused }
            }
        }
    }

    /// EdgeVPN's `AnnounceUpdate` test: the value must be (re)written when the stored JSON
    /// is missing or differs.
    pub fn needs_announce(&self, bucket: &str, key: &str, value_json: &str) -> bool {
        self.get(bucket, key).is_none_or(|e| e.value != value_json)
    }

    /// The PeerIDs whose `healthcheck` heartbeat is younger than `maxtime` seconds.
    pub fn alive(&self, now: i64, maxtime: i64) -> Vec<String> {
        self.bucket("healthcheck")
            .into_iter()
            .filter(|(_, e)| {
                serde_json::from_str::<String>(&e.value)
                    .ok()
                    .and_then(|t| kairos_sys::time::parse_rfc3339(&t))
                    .is_some_and(|t| t + maxtime > now)
            })
            .map(|(k, _)| k.to_string())
            .collect()
    }

    /// `machines`: VPN address → PeerID.
    pub fn machines(&self) -> BTreeMap<Ipv4Addr, String> {
        self.machine_entries()
            .into_iter()
            .map(|(ip, m)| (ip, m.peer))
            .collect()
    }

    /// `machines` with what the values say (entries that name no peer or whose key is not
    /// an address are left out).
    pub fn machine_entries(&self) -> BTreeMap<Ipv4Addr, Machine> {
        self.bucket("machines")
            .into_iter()
            .filter_map(|(ip, e)| {
                let v: serde_json::Value = serde_json::from_str(&e.value).ok()?;
                let peer = v.get("PeerID")?.as_str()?.to_string();
                let hostname = v
                    .get("Hostname")
                    .and_then(|h| h.as_str())
                    .unwrap_or_default()
                    .to_string();
                Some((ip.parse().ok()?, Machine { peer, hostname }))
            })
            .collect()
    }
}

/// EdgeVPN's `NextIP`: one past the highest address in use, or `first` when none is. When
/// one past the highest would leave the /24 (a `kairosctl bridge` holds .254, the Go
/// bridge's default too: EdgeVPN would hand out .255), the lowest free address from
/// `first` instead. `None` when the /24 is full.
pub fn next_ip(first: Ipv4Addr, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let Some(max) = used.iter().max() else {
        return Some(first);
    };
    let o = max.octets();
    if o[3] < 254 {
        return Some(Ipv4Addr::new(o[0], o[1], o[2], o[3] + 1));
    }
    let f = first.octets();
    (f[3].max(1)..=254)
        .map(|last| Ipv4Addr::new(f[0], f[1], f[2], last))
        .find(|ip| !used.contains(ip))
}

/// Who hands out the next address (EdgeVPN's DHCP rule): among the alive nodes without an
/// address, the leader — only when at least two nodes are alive and one lacks an address.
pub fn dhcp_leader(alive: &[String], machines: &BTreeMap<Ipv4Addr, String>) -> Option<String> {
    if alive.len() < 2 {
        return None;
    }
    let without: Vec<&String> = alive
        .iter()
        .filter(|p| !machines.values().any(|m| m == *p))
        .collect();
    crate::leader::leader(&without).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_796_205_600_000_000_000;

    #[test]
    fn legacy_writes_make_blocks_only_when_something_changes() {
        let mut l = Ledger::new(Ownership::Off, "g");
        let b1 = l
            .put("kairos", "a-uuid", "1", None, T)
            .expect("a new block");
        assert_eq!(b1.index, 1);
        assert_eq!(b1.timestamp, "2026-12-02 10:00:00 +0000 UTC");
        assert!(l.put("kairos", "a-uuid", "1", None, T + 1).is_none());
        assert!(!l.needs_announce("kairos", "a-uuid", "1"));
        assert!(l.needs_announce("kairos", "a-uuid", "2"));
        let b2 = l.delete("kairos", "a-uuid", None, T + 2).unwrap();
        assert!(
            b2.storage.is_empty(),
            "legacy deletes remove the key and its empty bucket"
        );
        // A peer's older block is ignored, a newer one adopted whole.
        let mut other = Ledger::new(Ownership::Off, "g");
        other.put("x", "k", "1", None, T);
        assert!(!l.receive(other.last(), T).changed);
        other.put("x", "k2", "1", None, T);
        other.put("x", "k3", "1", None, T);
        assert!(l.receive(other.last(), T).changed);
        assert_eq!(l.get("x", "k3").unwrap().value, "1");
    }

    #[test]
    fn enforce_mode_signs_merges_and_hides_tombstones() {
        let a = Identity::from_seed(&[1; 32]);
        let b = Identity::from_seed(&[2; 32]);
        let mut la = Ledger::new(Ownership::Enforce, "g");
        let mut lb = Ledger::new(Ownership::Enforce, "g");
        let hc = |t: u64| {
            format!(
                "\"{}\"",
                kairos_sys::time::rfc3339((t / 1_000_000_000) as i64)
            )
        };
        la.put("healthcheck", &a.peer_id(), &hc(T), Some(&a), T);
        la.put(
            "machines",
            "10.1.0.2",
            &format!(r#"{{"PeerID":"{}","Hostname":"node-a"}}"#, a.peer_id()),
            Some(&a),
            T,
        );
        lb.put("healthcheck", &b.peer_id(), &hc(T), Some(&b), T);
        // Each takes the other's entries.
        assert!(lb.receive(la.last(), T).changed);
        assert!(la.receive(lb.last(), T).changed);
        assert_eq!(la.alive((T / 1_000_000_000) as i64, 900).len(), 2);
        assert_eq!(
            lb.machines().get(&"10.1.0.2".parse().unwrap()),
            Some(&a.peer_id())
        );
        assert_eq!(
            lb.machine_entries()[&"10.1.0.2".parse().unwrap()],
            Machine {
                peer: a.peer_id(),
                hostname: "node-a".into()
            }
        );
        // b forging a's address is refused by a.
        let mut forged = Ledger::new(Ownership::Enforce, "g");
        forged.put(
            "machines",
            "10.1.0.2",
            &format!(r#"{{"PeerID":"{}"}}"#, b.peer_id()),
            Some(&b),
            T + 10,
        );
        let r = la.receive(forged.last(), T + 10);
        assert!(!r.changed);
        assert_eq!(r.refused[0].why, "owned by a live peer");
        // a deletes its address: a tombstone, hidden from readers, taken by b.
        la.delete("machines", "10.1.0.2", Some(&a), T + 20).unwrap();
        assert!(la.get("machines", "10.1.0.2").is_none());
        assert!(la.last().storage["machines"]["10.1.0.2"].deleted);
        lb.receive(la.last(), T + 20);
        assert!(lb.machines().is_empty());
    }

    #[test]
    fn dhcp_rule() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let first = ip("10.1.0.1");
        assert_eq!(next_ip(first, &[]), Some(first));
        assert_eq!(
            next_ip(first, &[ip("10.1.0.1"), ip("10.1.0.7"), ip("10.1.0.3")]),
            Some(ip("10.1.0.8"))
        );
        // A bridge at .254: the lowest free address instead of .255.
        assert_eq!(next_ip(first, &[ip("10.1.0.254")]), Some(first));
        assert_eq!(
            next_ip(first, &[ip("10.1.0.1"), ip("10.1.0.2"), ip("10.1.0.254")]),
            Some(ip("10.1.0.3"))
        );
        let all: Vec<Ipv4Addr> = (1..=254).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect();
        assert_eq!(next_ip(first, &all), None);
        let mut m = BTreeMap::new();
        let alive: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            dhcp_leader(&alive[..1], &m),
            None,
            "a node alone never gets an address"
        );
        assert_eq!(dhcp_leader(&alive, &m).as_deref(), Some("b"));
        m.insert(ip("10.1.0.1"), "b".to_string());
        assert_ne!(
            dhcp_leader(&alive, &m).as_deref(),
            Some("b"),
            "b has its address"
        );
    }
}
