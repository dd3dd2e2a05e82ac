//! Hostile target trees and configs: `run-stage --root DIR` never writes, deletes or chowns
//! outside DIR, refuses names that would inject lines into identity files, and is not hung or
//! blown up by what sits in a config directory. Each test keeps a canary directory beside the
//! root and checks it is byte-for-byte unchanged.
//!
//! Ownership checks need root (CI runs as root); without it they only check what they can.

mod common;
use common::text;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Scene {
    _t: tempfile::TempDir,
    root: PathBuf,
    canary: PathBuf,
    before: Vec<String>,
}

/// Every entry of a tree with its kind, mode, owner and content, sorted.
fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let what = if m.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if m.is_symlink() {
                format!("-> {}", fs::read_link(&p).unwrap().display())
            } else {
                format!("{:?}", fs::read(&p).unwrap())
            };
            out.push(format!(
                "{} {:o} {}:{} {what}",
                p.strip_prefix(dir).unwrap().display(),
                m.mode(),
                m.uid(),
                m.gid()
            ));
        }
    }
    let m = fs::metadata(dir).unwrap();
    out.push(format!(". {:o} {}:{}", m.mode(), m.uid(), m.gid()));
    out.sort();
    out
}

impl Scene {
    fn new() -> Scene {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("a/b/root");
        let canary = t.path().join("canary");
        for d in [&root, &canary.join("etc"), &canary.join("home")] {
            fs::create_dir_all(d).unwrap();
        }
        for f in [
            "etc/passwd",
            "etc/shadow",
            "etc/group",
            "etc/hostname",
            "etc/hosts",
            "x",
        ] {
            fs::write(canary.join(f), format!("canary {f}\n")).unwrap();
        }
        let before = snapshot(&canary);
        Scene {
            _t: t,
            root,
            canary,
            before,
        }
    }

    fn config(&self, name: &str, text: &str) {
        let p = self.root.join("oem").join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    /// `run-stage boot --root` with a deadline: a FIFO or /dev/zero must not hang it.
    fn run(&self, extra: &[&str]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kairos-agent"))
            .args(["run-stage", "boot", "--root"])
            .arg(&self.root)
            .args(["--cmdline", ""])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("run-stage did not finish in 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    fn assert_canary(&self) {
        assert_eq!(snapshot(&self.canary), self.before, "the canary changed");
    }
}

const IDENTITY: &str = "#cloud-config
users:
- name: kairos
  passwd: kairos
  ssh_authorized_keys: [ssh-ed25519 AAAA k@x]
stages:
  boot:
  - hostname: node1
    files:
    - path: /etc/pwn
      content: pwn
    - path: /var/rel/canary/x
      content: pwn
    - path: /var/rel/canary/etc/new
      content: pwn
    directories:
    - path: /var/rel/canary/home/d
    environment:
      A: b
    dns:
      nameservers: [1.1.1.1]
    sysctl:
      vm.swappiness: '10'
";

#[test]
fn absolute_etc_symlink_does_not_lead_out_of_the_root() {
    let s = Scene::new();
    symlink(s.canary.join("etc"), s.root.join("etc")).unwrap();
    fs::create_dir_all(s.root.join("var")).unwrap();
    symlink("../../../..", s.root.join("var/rel")).unwrap();
    s.config("a.yaml", IDENTITY);
    let o = s.run(&[]);
    s.assert_canary();
    // `etc` leads nowhere inside the root: the writes under it fail with a clear error.
    let t = text(&o);
    assert!(t.contains("etc exists and is not a directory"), "{t}");
    // `/var/rel` resolves to the root itself: the files land inside it.
    assert_eq!(fs::read(s.root.join("canary/x")).unwrap(), b"pwn", "{t}");
    assert!(s.root.join("canary/home/d").is_dir(), "{t}");
}

#[test]
fn relative_symlinks_climbing_out_stay_inside() {
    let s = Scene::new();
    fs::create_dir_all(s.root.join("var")).unwrap();
    // From ROOT/var, ../../.. is the temp dir holding the canary on a plain path walk.
    symlink("../../..", s.root.join("var/rel")).unwrap();
    s.config("a.yaml", IDENTITY);
    let o = s.run(&[]);
    s.assert_canary();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for f in [
        "etc/hostname",
        "etc/passwd",
        "etc/shadow",
        "etc/group",
        "etc/pwn",
        "canary/x",
    ] {
        assert!(s.root.join(f).is_file(), "{f} missing\n{t}");
    }
    assert_eq!(
        fs::read_to_string(s.root.join("etc/hostname")).unwrap(),
        "node1\n"
    );
}

#[test]
fn final_symlinks_are_replaced_not_written_through() {
    let s = Scene::new();
    fs::create_dir_all(s.root.join("etc")).unwrap();
    for f in [
        "hostname",
        "hosts",
        "passwd",
        "shadow",
        "group",
        "environment",
        "resolv.conf",
    ] {
        symlink(s.canary.join("etc").join(f), s.root.join("etc").join(f)).unwrap();
    }
    s.config("a.yaml", IDENTITY);
    let o = s.run(&[]);
    s.assert_canary();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let passwd = fs::read_to_string(s.root.join("etc/passwd")).unwrap();
    assert!(passwd.contains("kairos:x:"), "{passwd}");
    assert!(
        !fs::symlink_metadata(s.root.join("etc/hostname"))
            .unwrap()
            .is_symlink()
    );
}

#[test]
fn identity_injection_is_refused_with_the_key_named() {
    let s = Scene::new();
    fs::create_dir_all(s.root.join("etc")).unwrap();
    fs::write(s.root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    s.config(
        "a.yaml",
        "#cloud-config
users:
- name: \"evil\\nroot2::0:0::/:/bin/sh\"
  passwd: x
- name: ok
  gecos: \"a:0:0\"
- name: good
  passwd: good
stages:
  boot:
  - hostname: \"n1\\n127.0.0.1 evil\"
  - sysctl:
      /etc/x: '1'
",
    );
    let o = s.run(&[]);
    let t = text(&o);
    let passwd = fs::read_to_string(s.root.join("etc/passwd")).unwrap();
    assert!(!passwd.contains("root2"), "{passwd}");
    assert!(!passwd.contains("a:0:0"), "{passwd}");
    assert!(
        passwd.contains("good:x:"),
        "the valid user is still created\n{passwd}\n{t}"
    );
    assert!(t.contains("user name"), "{t}");
    assert!(t.contains("gecos"), "{t}");
    assert!(t.contains("hostname"), "{t}");
    assert!(t.contains("sysctl key"), "{t}");
    assert!(!s.root.join("etc/hostname").exists());
    assert!(!s.root.join("etc/x").exists());
    s.assert_canary();
}

#[test]
fn an_existing_home_is_not_given_to_a_new_user() {
    let s = Scene::new();
    fs::create_dir_all(s.root.join("etc")).unwrap();
    fs::create_dir_all(s.root.join("srv/shared")).unwrap();
    s.config(
        "a.yaml",
        "#cloud-config
users:
- name: slash
  homedir: /
- name: shared
  homedir: /srv/shared
- name: fresh
",
    );
    let before_root = fs::metadata(&s.root).unwrap();
    let o = s.run(&[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let after_root = fs::metadata(&s.root).unwrap();
    assert_eq!(
        (after_root.uid(), after_root.gid()),
        (before_root.uid(), before_root.gid()),
        "homedir: / chowned the root\n{t}"
    );
    let shared = fs::metadata(s.root.join("srv/shared")).unwrap();
    assert_eq!(shared.uid(), before_root.uid(), "{t}");
    if rustix::process::geteuid().is_root() {
        let fresh = fs::metadata(s.root.join("home/fresh")).unwrap();
        assert_ne!(fresh.uid(), 0, "a home made for the user is theirs\n{t}");
    }
    s.assert_canary();
}

#[test]
fn config_dirs_skip_fifos_devices_loops_and_bad_files() {
    let s = Scene::new();
    let oem = s.root.join("oem");
    fs::create_dir_all(&oem).unwrap();
    symlink("/dev/zero", oem.join("z.yaml")).unwrap();
    symlink(".", oem.join("l1")).unwrap();
    symlink("..", oem.join("l2")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        oem.join("fifo.yaml"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_bits_truncate(0o644),
        0,
    )
    .unwrap();
    fs::write(oem.join("bad.yaml"), b"#cloud-config\nhostname: \xff\xfe\n").unwrap();
    fs::write(oem.join("broken.yaml"), "#cloud-config\nstages: [\n").unwrap();
    s.config(
        "zz.yaml",
        "#cloud-config\nstages:\n  boot:\n  - files:\n    - path: /etc/ok\n      content: ok\n",
    );
    let o = s.run(&[]);
    let t = text(&o);
    assert_eq!(fs::read(s.root.join("etc/ok")).unwrap(), b"ok", "{t}");
    assert!(t.contains("z.yaml"), "the /dev/zero link is reported\n{t}");
    assert!(t.contains("fifo.yaml"), "the FIFO is reported\n{t}");
    assert!(t.contains("bad.yaml") && t.contains("UTF-8"), "{t}");
    s.assert_canary();
}

#[test]
fn billion_laughs_does_not_blow_up() {
    let s = Scene::new();
    let mut doc = String::from(
        "#cloud-config\na: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for w in names.windows(2) {
        doc.push_str(&format!(
            "{}: &{} [{}]\n",
            w[1],
            w[1],
            vec![format!("*{}", w[0]); 9].join(",")
        ));
    }
    s.config("bomb.yaml", &doc);
    let o = s.run(&[]);
    let t = text(&o);
    assert!(t.contains("billion laughs"), "{t}");
    let v = Command::new(env!("CARGO_BIN_EXE_kairos-agent"))
        .arg("validate")
        .arg(s.root.join("oem/bomb.yaml"))
        .output()
        .unwrap();
    let vt = text(&v);
    assert_eq!(v.status.code(), Some(1), "{vt}");
    assert!(vt.contains("billion laughs"), "{vt}");
}

/// `kairos-agent schema | head`, `validate --json | head`: the reader is gone before the agent
/// writes (deterministic: the pipe's read end is closed first). The agent must end quietly
/// — no panic message, no exit 101.
#[test]
fn a_closed_pipe_ends_output_quietly() {
    let s = Scene::new();
    s.config(
        "a.yaml",
        "#cloud-config\nhostnme: x\nusers: [{name: a}, {name: b}]\n",
    );
    let cfg = s.root.join("oem/a.yaml");
    for args in [
        vec!["schema".to_string()],
        vec![
            "validate".into(),
            "--json".into(),
            cfg.display().to_string(),
        ],
        vec!["--help".into()],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = Command::new(env!("CARGO_BIN_EXE_kairos-agent"))
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_ne!(o.status.code(), Some(101), "{args:?}: {err}");
    }
}
