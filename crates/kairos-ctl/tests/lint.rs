//! `kairosctl lint` through the real binary: an empty tree lists what to add and exits 1; a
//! minimal bootable tree (kernel + modules, busybox init, os-release) is clean and exits 0; a
//! kairosified tree with a dynamically linked kairos-agent is refused by name.

use std::fs;
use std::path::Path;
use std::process::Command;

fn lint(dir: &Path, json: bool) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kairosctl"));
    c.arg("lint");
    if json {
        c.arg("--json");
    }
    let o = c.arg(format!("dir:{}", dir.display())).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn lint_says_what_to_add() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let (code, out) = lint(r, true);
    assert_eq!(code, 1, "{out}");
    let findings: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(findings.len(), 3, "{out}");
    assert!(out.contains("linux-image") && out.contains("inittab") && out.contains("os-release"));

    fs::create_dir_all(r.join("boot")).unwrap();
    fs::create_dir_all(r.join("lib/modules/6.1.0-t")).unwrap();
    fs::write(r.join("boot/vmlinuz-6.1.0-t"), "k").unwrap();
    fs::create_dir_all(r.join("bin")).unwrap();
    fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    fs::create_dir_all(r.join("etc")).unwrap();
    fs::write(r.join("etc/inittab"), "::sysinit:/etc/init.d/rcS\n").unwrap();
    fs::write(r.join("etc/os-release"), "ID=t\n").unwrap();
    let (code, out) = lint(r, false);
    assert_eq!(code, 0, "{out}");

    // A dynamically linked kairos-agent (any dynamic executable of the host will do).
    fs::create_dir_all(r.join("usr/bin")).unwrap();
    let dynamic = ["/usr/bin/env", "/bin/ls"]
        .iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    fs::copy(dynamic, r.join("usr/bin/kairos-agent")).unwrap();
    let (code, out) = lint(r, false);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("/usr/bin/kairos-agent is dynamically linked"),
        "{out}"
    );
}
