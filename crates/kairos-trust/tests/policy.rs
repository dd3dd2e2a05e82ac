//! The signed PCR policy (`.pcrsig`) against systemd's own: `systemd-measure sign` (systemd
//! 252) over the same sections, with the same key, on a software TPM (swtpm: it computes the
//! policy digest in a trial session), gives the same JSON — fingerprint, policy digest and
//! signature (RSASSA-PKCS1-v1_5 is deterministic) — for the phase Kairos signs.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kairos_trust::{pcr, policy};

const MEASURE: &str = "/usr/lib/systemd/systemd-measure";

/// A swtpm serving TPM commands on `port` (control on `port + 1`), killed when dropped
/// (its state directory goes with it).
struct Swtpm {
    child: std::process::Child,
    _state: tempfile::TempDir,
}

impl Swtpm {
    fn start(port: u16) -> Swtpm {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.path().display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm (scripts/setup installs it)");
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "swtpm did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Swtpm { child, _state: dir }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn pcrsig_equals_systemd_measure_sign() {
    if !std::path::Path::new(MEASURE).exists() || !have("swtpm") || !have("openssl") {
        assert!(
            std::env::var_os("CI").is_none(),
            "{MEASURE}, swtpm or openssl missing: scripts/setup installs them"
        );
        eprintln!("skipped: no systemd-measure, swtpm or openssl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("pcr.pem");
    let public = dir.path().join("pcr.pub.pem");
    let st = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap();
    assert!(st.success());
    let sections: Vec<(&str, Vec<u8>)> = vec![
        (
            ".linux",
            (0..9_001u32).map(|i| (i * 13 % 253) as u8).collect(),
        ),
        (".osrel", b"ID=kairos\n".to_vec()),
        (".cmdline", b"console=ttyS0 rd.kairos.layers=ab".to_vec()),
        (".initrd", vec![7u8; 1000]),
    ];
    let port = 20000 + (std::process::id() % 10000) as u16 * 2;
    let _tpm = Swtpm::start(port);
    let mut cmd = Command::new(MEASURE);
    cmd.args([
        "sign",
        "--bank=sha256",
        "--json=short",
        "--phase=enter-initrd",
    ])
    .arg(format!("--private-key={}", key.display()))
    .arg(format!("--public-key={}", public.display()))
    .arg(format!("--tpm2-device=swtpm:host=127.0.0.1,port={port}"));
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
        "systemd-measure sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let k = policy::PcrKey::from_pem(&std::fs::read_to_string(&key).unwrap()).unwrap();
    let after = pcr::after_sections(sections.iter().map(|(n, d)| (*n, d.as_slice())));
    let ours: serde_json::Value =
        serde_json::from_str(&policy::pcrsig(&k, after).unwrap()).unwrap();
    assert_eq!(ours, theirs, "our .pcrsig equals systemd-measure sign's");
}
