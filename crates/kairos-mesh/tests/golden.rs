//! Ledger blocks against golden files written from the spec's format by an independent
//! writer (`tests/golden/make.py`; no Go EdgeVPN can be had here): the same bytes out, the
//! same hash, and our own writer producing them from the same data.

use kairos_mesh::ledger::{Block, Entry, Storage, checksum};

const BLOCK_1: &str = include_str!("golden/block-1.json");
const HASH_1: &str = include_str!("golden/block-1.hash");

#[test]
fn golden_block_reads_and_writes_back_byte_for_byte() {
    let b = Block::from_json(BLOCK_1).unwrap();
    assert_eq!(b.to_json(), BLOCK_1);
    assert_eq!(b.hash, HASH_1.trim());
    assert_eq!(
        checksum(b.index, &b.timestamp, &b.storage, &b.prev_hash),
        b.hash
    );
    assert_eq!(
        b.storage["machines"]["10.1.0.2"].sig,
        (0u8..64).collect::<Vec<_>>()
    );
    assert!(b.storage["healthcheck"]["12D3KooWQ"].deleted);
}

#[test]
fn our_writer_makes_the_golden_block_from_the_same_data() {
    let mut s = Storage::new();
    let put = |s: &mut Storage, b: &str, k: &str, e: Entry| {
        s.entry(b.into()).or_default().insert(k.into(), e);
    };
    put(
        &mut s,
        "kairos",
        "a1b2-uuid",
        Entry::legacy(r#"{"Time":"2026-12-02T10:00:00Z"}"#),
    );
    put(&mut s, "kairos", "leader-auto", Entry::legacy("\"a1b2\""));
    put(
        &mut s,
        "dns",
        "node1.mesh.",
        Entry::legacy(r#"{"1":"10.1.0.5"}"#),
    );
    let machine = serde_json::json!({"PeerID": "12D3KooWQ", "Hostname": "n<1>", "OS": "linux",
        "Arch": "amd64", "Address": "10.1.0.2", "Version": "x"});
    put(
        &mut s,
        "machines",
        "10.1.0.2",
        Entry {
            value: kairos_mesh::ledger::go_json(&machine),
            owner: "12D3KooWQ".into(),
            version: 1_796_205_600_000_000_000,
            updated_at: 1_796_205_600,
            deleted: false,
            sig: (0u8..64).collect(),
        },
    );
    put(
        &mut s,
        "healthcheck",
        "12D3KooWQ",
        Entry {
            value: "\"2026-12-02T10:00:00Z\"".into(),
            owner: "12D3KooWQ".into(),
            version: 7,
            updated_at: 1_796_205_600,
            deleted: true,
            sig: Vec::new(),
        },
    );
    let ts = kairos_mesh::ledger::go_utc_string(1_796_205_600_500_000_000);
    assert_eq!(ts, "2026-12-02 10:00:00.5 +0000 UTC");
    let b = Block::genesis("local time").next(s, &ts);
    assert_eq!(b.to_json(), BLOCK_1);
}
