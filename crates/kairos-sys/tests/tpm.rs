//! Our hand-marshalled TPM2 commands against a real software TPM (swtpm, Debian's package):
//! PCR 11 extended with a boot phase reads back as SHA-256(old ‖ SHA-256(phase)).

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kairos_sys::tpm;
use sha2::Digest;

struct Swtpm(Child);

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn pcr_extend_and_read_on_swtpm() {
    if Command::new("swtpm").arg("--version").output().is_err() {
        eprintln!("skipped: swtpm missing (scripts/setup installs it)");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let (port, ctrl) = (free_port(), free_port());
    let _tpm = Swtpm(
        Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init"])
            .arg("--tpmstate")
            .arg(format!("dir={}", state.path().display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("swtpm did not listen: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = tpm::transact(&mut s, "swtpm", &tpm::startup_command()).unwrap();
    tpm::check_response("Startup", &r).unwrap();

    assert_eq!(tpm::read_with(&mut s, "swtpm", 11).unwrap(), [0u8; 32]);
    tpm::extend_with(&mut s, "swtpm", 11, b"enter-initrd").unwrap();
    let mut want = sha2::Sha256::new();
    want.update([0u8; 32]);
    want.update(sha2::Sha256::digest(b"enter-initrd"));
    let want: [u8; 32] = want.finalize().into();
    assert_eq!(tpm::read_with(&mut s, "swtpm", 11).unwrap(), want);
    // Other PCRs are untouched.
    assert_eq!(tpm::read_with(&mut s, "swtpm", 12).unwrap(), [0u8; 32]);
    // A PCR the platform owns (0–7 need locality/platform auth for some; 24 does not exist)
    // is refused with a response code, not taken as success.
    let e = tpm::extend_with(&mut s, "swtpm", 24, b"x").unwrap_err();
    assert!(e.to_string().contains("response code"), "{e}");
}
