//! `kairosctl generate-token` and `kairosctl token` through the real binary.

use std::process::Command;

/// The spec's example connection document (kairos-p2p-trustedboot-k8s.md A.2/A.3) as a token.
const SPEC_TOKEN: &str = "b3RwOgogIGRodDoKICAgIGludGVydmFsOiA5MDAwCiAgICBrZXk6IGV4YW1wbGVEaHRLZXkKICAgIGxlbmd0aDogNDMKICBjcnlwdG86CiAgICBpbnRlcnZhbDogOTAwMAogICAga2V5OiBleGFtcGxlQ3J5cHRvS2V5CiAgICBsZW5ndGg6IDQzCnJvb206IGV4YW1wbGVSb29tCnJlbmRlenZvdXM6IGV4YW1wbGVSZW5kZXp2b3VzCm1kbnM6IGV4YW1wbGVNZG5zCm1heF9tZXNzYWdlX3NpemU6IDIwOTcxNTIwCg==";

fn ctl(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kairosctl"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn the_spec_token_derives_the_spec_values() {
    let (code, out, err) = ctl(&["token", SPEC_TOKEN, "--at", "1700000000", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ledger_topic_now"], "dbe12872f832443ff33afe7e21f9236e");
    assert_eq!(v["dht_rendezvous_now"], "07f6395458c8154bf6dfb8580c705fbf");
    assert_eq!(v["mdns_service"], "exampleMdns.local");
    assert!(
        !out.contains("exampleCryptoKey"),
        "keys are never shown: {out}"
    );
}

#[test]
fn generated_tokens_check_and_garbage_is_refused() {
    let (code, tok, _) = ctl(&["generate-token", "--interval", "600"]);
    assert_eq!(code, 0);
    let (code, out, err) = ctl(&["token", tok.trim()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("every 600 s, length 43"), "{out}");
    for bad in ["garbage!", "", "b3RwOiA1Cg=="] {
        let (code, _, err) = ctl(&["token", bad]);
        assert_eq!(code, 1, "{bad:?}");
        assert!(err.contains("network token"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
