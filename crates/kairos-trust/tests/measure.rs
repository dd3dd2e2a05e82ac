//! PCR 11 prediction against systemd's own: `systemd-measure calculate` (systemd 252, the
//! version the node's stub is) over the same sections gives the same value at every phase.

use std::process::Command;

use kairos_trust::pcr;

const MEASURE: &str = "/usr/lib/systemd/systemd-measure";

#[test]
fn prediction_equals_systemd_measure() {
    if !std::path::Path::new(MEASURE).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{MEASURE} is missing: scripts/setup installs systemd"
        );
        eprintln!("skipped: no {MEASURE}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Contents with NULs, newlines and a size that is not a multiple of anything.
    let sections: Vec<(&str, Vec<u8>)> = vec![
        (
            ".linux",
            (0..70_001u32).map(|i| (i * 7 % 251) as u8).collect(),
        ),
        (
            ".osrel",
            b"NAME=\"Kairos\"\nID=kairos\nVERSION_ID=1\n".to_vec(),
        ),
        (".cmdline", b"console=ttyS0 rd.kairos.verify=1".to_vec()),
        (".initrd", vec![0u8, 1, 2, 0, 255, 10, 13]),
        (".splash", b"BM not really".to_vec()),
        (
            ".pcrpkey",
            b"-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n".to_vec(),
        ),
    ];
    let mut cmd = Command::new(MEASURE);
    cmd.args(["calculate", "--bank=sha256", "--json=short"]);
    for (name, data) in &sections {
        let f = dir.path().join(name.trim_start_matches('.'));
        std::fs::write(&f, data).unwrap();
        cmd.arg(format!(
            "--{}={}",
            name.trim_start_matches('.'),
            f.display()
        ));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = pcr::phases(pcr::after_sections(
        sections.iter().map(|(n, d)| (*n, d.as_slice())),
    ));
    let theirs = theirs["sha256"].as_array().unwrap();
    assert_eq!(theirs.len(), ours.len(), "{theirs:?}");
    for (t, (phase, value)) in theirs.iter().zip(&ours) {
        assert_eq!(t["phase"], phase.as_str());
        assert_eq!(t["hash"], value.hex(), "phase {phase}");
    }
}
