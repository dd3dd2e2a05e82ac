//! The stage modules that reach outside the root — `datasource`, `git`, `unpack_images` —
//! run through the real `kairos-agent run-stage` against real services on loopback:
//! `git daemon` and a dumb-HTTP git server, an OCI layout and Debian's `docker-registry`,
//! and a **metadata stand-in** (this file's HTTP server, playing each cloud's metadata
//! service at the paths and with the headers that cloud documents; `KAIROS_DATASOURCE_URL`
//! points the agent at it). `vmware-rpctool` is a stand-in script too. `layout` and the
//! `cdrom` provider need loop devices: they are in `privileged.rs`.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{agent, serve};

/// A root with accounts and one stage file.
fn root_with(stage_file: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (p, s) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        ("oem/10_stage.yaml", stage_file),
    ] {
        let f = d.path().join(p);
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(f, s).unwrap();
    }
    d
}

fn run_boot(root: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    agent(
        &[
            "run-stage",
            "boot",
            "--root",
            &root.to_string_lossy(),
            "--strict",
        ],
        env,
    )
}

fn read(root: &Path, p: &str) -> String {
    fs::read_to_string(root.join(p.trim_start_matches('/'))).unwrap_or_default()
}

// ---------------------------------------------------------------- datasource

/// The metadata stand-in: for each provider, where its user-data, hostname and keys are, and
/// which header it insists on (as the real services do).
fn metadata_stand_in() -> String {
    serve(|r| {
        let h = |k: &str| r.headers.get(k).map(String::as_str);
        let ud = |p: &str| format!("#cloud-config\nhostname: ud-{p}\n").into_bytes();
        let path = r.path.as_str();
        let ok = |b: Vec<u8>| (200, b);
        match path {
            // EC2: IMDSv2 token first; every read must carry it.
            "/latest/api/token" if r.method == "PUT" => ok(b"tok-123".to_vec()),
            p if p.starts_with("/latest/") && h("x-aws-ec2-metadata-token") != Some("tok-123") => {
                (401, Vec::new())
            }
            "/latest/user-data" => ok(ud("aws")),
            "/latest/meta-data/hostname" => ok(b"meta-aws".to_vec()),
            "/latest/meta-data/public-keys/0/openssh-key" => ok(b"ssh-ed25519 AAAAaws key\n".to_vec()),
            p if p.starts_with("/computeMetadata/") && h("metadata-flavor") != Some("Google") => {
                (403, Vec::new())
            }
            "/computeMetadata/v1/instance/attributes/user-data" => ok(ud("gcp")),
            "/computeMetadata/v1/instance/hostname" => ok(b"meta-gcp".to_vec()),
            "/computeMetadata/v1/instance/attributes/ssh-keys" => {
                ok(b"kairos:ssh-ed25519 AAAAgcp key\n".to_vec())
            }
            p if p.starts_with("/metadata/instance") && h("metadata") != Some("true") => {
                (400, Vec::new())
            }
            p if p.starts_with("/metadata/instance/compute/userData") => {
                use base64::Engine;
                ok(base64::engine::general_purpose::STANDARD
                    .encode(ud("azure"))
                    .into_bytes())
            }
            p if p.starts_with("/metadata/instance/compute/name") => ok(b"meta-azure".to_vec()),
            "/hetzner/v1/userdata" => ok(ud("hetzner")),
            "/hetzner/v1/metadata/hostname" => ok(b"meta-hetzner".to_vec()),
            "/openstack/latest/user_data" => ok(ud("openstack")),
            "/openstack/latest/meta_data.json" => ok(
                br#"{"hostname": "meta-openstack", "public_keys": {"k": "ssh-ed25519 AAAAos key"}}"#
                    .to_vec(),
            ),
            "/userdata" => ok(ud("packet-or-metaldata")),
            "/metadata" => ok(br#"{"hostname": "meta-packet", "ssh_keys": ["ssh-ed25519 AAAApk key"]}"#.to_vec()),
            "/user_data/cloud-init" => ok(ud("scaleway")),
            "/metadata/v1/user-data" => ok(ud("digitalocean")),
            "/metadata/v1/hostname" => ok(b"meta-digitalocean".to_vec()),
            _ => (404, Vec::new()),
        }
    })
}

#[test]
fn datasource_reads_every_cloud_metadata_service_from_a_stand_in() {
    let base = metadata_stand_in();
    // (provider, the user-data it gives, the hostname its metadata gives, a key it gives)
    let cases = [
        ("aws", "ud-aws", Some("meta-aws"), Some("AAAAaws")),
        ("gcp", "ud-gcp", Some("meta-gcp"), Some("AAAAgcp")),
        ("azure", "ud-azure", Some("meta-azure"), None),
        ("hetzner", "ud-hetzner", Some("meta-hetzner"), None),
        (
            "openstack",
            "ud-openstack",
            Some("meta-openstack"),
            Some("AAAAos"),
        ),
        (
            "packet",
            "ud-packet-or-metaldata",
            Some("meta-packet"),
            Some("AAAApk"),
        ),
        ("scaleway", "ud-scaleway", None, None),
        (
            "digitalocean",
            "ud-digitalocean",
            Some("meta-digitalocean"),
            None,
        ),
        ("metaldata", "ud-packet-or-metaldata", None, None),
    ];
    for (provider, ud, host, key) in cases {
        let root = root_with(&format!(
            "stages:\n  boot:\n  - datasource:\n      providers: [{provider}]\n      path: /oem/95_userdata\n"
        ));
        let (code, _, err) = run_boot(root.path(), &[("KAIROS_DATASOURCE_URL", &base)]);
        assert_eq!(code, 0, "{provider}: {err}");
        let r = root.path();
        assert_eq!(
            read(r, "/oem/95_userdata/userdata.yaml"),
            format!("#cloud-config\nhostname: {ud}\n"),
            "{provider}: {err}"
        );
        assert_eq!(
            read(r, "/oem/95_userdata/userdata"),
            read(r, "/oem/95_userdata/userdata.yaml")
        );
        if let Some(h) = host {
            assert_eq!(
                read(r, "/run/config/hostname"),
                format!("{h}\n"),
                "{provider}"
            );
            assert_eq!(
                read(r, "/etc/hostname"),
                format!("{h}\n"),
                "{provider} hostname applied"
            );
        }
        if let Some(k) = key {
            assert!(
                read(r, "/run/config/ssh/authorized_keys").contains(k),
                "{provider}"
            );
            assert!(
                read(r, "/root/.ssh/authorized_keys").contains(k),
                "{provider} key applied"
            );
        }
    }
}

#[test]
fn datasource_first_listed_wins_and_nothing_found_names_each_provider() {
    let base = metadata_stand_in();
    let root = root_with(
        "stages:\n  boot:\n  - datasource:\n      providers: [vultr, hetzner, gcp]\n      userdata_name: mine.yaml\n",
    );
    let (code, _, err) = run_boot(root.path(), &[("KAIROS_DATASOURCE_URL", &base)]);
    assert_eq!(code, 0, "{err}");
    // vultr has nothing at the stand-in; hetzner is listed before gcp.
    assert_eq!(
        read(root.path(), "/run/config/mine.yaml"),
        "#cloud-config\nhostname: ud-hetzner\n"
    );

    let empty = serve(|_| (404, Vec::new()));
    let root =
        root_with("stages:\n  boot:\n  - datasource:\n      providers: [aws, digitalocean]\n");
    let (code, _, err) = run_boot(root.path(), &[("KAIROS_DATASOURCE_URL", &empty)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no metadata/userdata found"), "{err}");
    assert!(
        err.contains("aws: nothing there") && err.contains("digitalocean: nothing there"),
        "{err}"
    );

    let root = root_with(
        "stages:\n  boot:\n  - datasource:\n      providers: [file]\n      path: /etc/passwd\n      userdata_name: ../../etc/shadow\n",
    );
    let (code, _, err) = run_boot(root.path(), &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("userdata_name \"../../etc/shadow\" must be a file name"),
        "{err}"
    );

    let root = root_with("stages:\n  boot:\n  - datasource:\n      providers: [nocloud-typo]\n");
    let (_, _, err) = run_boot(root.path(), &[("KAIROS_DATASOURCE_URL", &empty)]);
    assert!(
        err.contains("unknown provider `nocloud-typo` (known: cdrom"),
        "{err}"
    );
}

#[test]
fn datasource_file_and_vmware_guestinfo_multipart() {
    let root = root_with(
        "stages:\n  boot:\n  - datasource:\n      providers: [file]\n      path: /var/lib/ud.yaml\n",
    );
    fs::create_dir_all(root.path().join("var/lib")).unwrap();
    fs::write(
        root.path().join("var/lib/ud.yaml"),
        "#cloud-config\nusers: []\n",
    )
    .unwrap();
    let (code, _, err) = run_boot(root.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        read(root.path(), "/run/config/userdata.yaml"),
        "#cloud-config\nusers: []\n"
    );

    // vmware-rpctool stand-in: guestinfo as base64 of a MIME multipart document.
    use base64::Engine;
    let mime = "Content-Type: multipart/mixed; boundary=\"B\"\nMIME-Version: 1.0\n\n--B\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho no\n--B\nContent-Type: text/cloud-config\n\n#cloud-config\nhostname: from-vmware\n--B--\n";
    let b64 = base64::engine::general_purpose::STANDARD.encode(mime);
    let bin = tempfile::tempdir().unwrap();
    let tool = bin.path().join("vmware-rpctool");
    fs::write(
        &tool,
        format!(
            "#!/bin/sh\n# vmware-rpctool stand-in for tests\ncase \"$1\" in\n'info-get guestinfo.userdata') echo '{b64}';;\n'info-get guestinfo.userdata.encoding') echo base64;;\n*) exit 1;;\nesac\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
    let root = root_with("stages:\n  boot:\n  - datasource: {providers: [vmware]}\n");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (code, _, err) = run_boot(root.path(), &[("PATH", &path)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        read(root.path(), "/run/config/userdata.yaml"),
        "#cloud-config\nhostname: from-vmware"
    );
}

// ---------------------------------------------------------------- git

fn git(dir: &Path, args: &[&str]) {
    let o = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("git (Debian package git)");
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A bare repository with `main` (file `a` = v1) and `dev` (file `a` = dev); returns the bare
/// repo and a working clone to push more from.
fn repo(top: &Path) -> (PathBuf, PathBuf) {
    let bare = top.join("repo.git");
    let work = top.join("work");
    fs::create_dir_all(&work).unwrap();
    git(
        top,
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            &bare.to_string_lossy(),
        ],
    );
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["config", "user.email", "t@example.invalid"]);
    git(&work, &["config", "user.name", "t"]);
    fs::write(work.join("a"), "v1\n").unwrap();
    git(&work, &["add", "a"]);
    git(&work, &["commit", "-q", "-m", "v1"]);
    git(&work, &["checkout", "-q", "-b", "dev"]);
    fs::write(work.join("a"), "dev\n").unwrap();
    git(&work, &["commit", "-q", "-am", "dev"]);
    git(&work, &["checkout", "-q", "main"]);
    git(&work, &["remote", "add", "origin", &bare.to_string_lossy()]);
    git(&work, &["push", "-q", "origin", "main", "dev"]);
    git(&bare, &["update-server-info"]);
    (bare, work)
}

struct Daemon(std::process::Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn git_daemon(base: &Path) -> (Daemon, u16) {
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon (Debian package git)");
        let d = Daemon(child);
        for _ in 0..50 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (d, port);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    panic!("git daemon did not start");
}

#[test]
fn git_clones_a_branch_from_git_daemon_then_updates_it() {
    let top = tempfile::tempdir().unwrap();
    let (_bare, work) = repo(top.path());
    let (_d, port) = git_daemon(top.path());
    let cfg = format!(
        "stages:\n  boot:\n  - git:\n      url: git://127.0.0.1:{port}/repo.git\n      path: /srv/app\n      branch: dev\n"
    );
    let root = root_with(&cfg);
    let (code, _, err) = run_boot(root.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read(root.path(), "/srv/app/a"), "dev\n");
    // A new commit upstream; the next run brings the checkout up to date, even with a
    // local change in the way.
    git(&work, &["checkout", "-q", "dev"]);
    fs::write(work.join("a"), "dev2\n").unwrap();
    git(&work, &["commit", "-q", "-am", "dev2"]);
    git(&work, &["push", "-q", "origin", "dev"]);
    fs::write(root.path().join("srv/app/a"), "local edit\n").unwrap();
    let (code, _, err) = run_boot(root.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read(root.path(), "/srv/app/a"), "dev2\n");
    // Not a checkout and not empty: refused, left as it was.
    let root = root_with(&cfg.replace("/srv/app", "/etc"));
    let (code, _, err) = run_boot(root.path(), &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/etc exists, is not empty and is not a git checkout"),
        "{err}"
    );
    assert!(root.path().join("etc/passwd").exists());
}

#[test]
fn git_over_http_sends_credentials_from_the_config() {
    let top = tempfile::tempdir().unwrap();
    let (bare, _) = repo(top.path());
    use base64::Engine;
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("kairos:s3cret")
    );
    // Dumb-HTTP git: the bare repository's files, only with the right Authorization.
    let dir = bare.clone();
    let base = serve(move |r| {
        if r.headers.get("authorization") != Some(&want) {
            return (401, Vec::new());
        }
        let rel = r
            .path
            .split('?')
            .next()
            .unwrap_or("")
            .trim_start_matches("/repo.git/");
        if rel.contains("..") {
            return (404, Vec::new());
        }
        match fs::read(dir.join(rel)) {
            Ok(b) => (200, b),
            Err(_) => (404, Vec::new()),
        }
    });
    let cfg = |auth: &str| {
        format!(
            "stages:\n  boot:\n  - git:\n      url: {base}/repo.git\n      path: /srv/app\n{auth}"
        )
    };
    let root = root_with(&cfg(
        "      auth:\n        username: kairos\n        password: s3cret\n",
    ));
    let (code, _, err) = run_boot(root.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read(root.path(), "/srv/app/a"), "v1\n");
    let config = read(root.path(), "/srv/app/.git/config");
    assert!(
        !config.contains("s3cret") && !config.contains("Authorization"),
        "{config}"
    );
    let root = root_with(&cfg(""));
    let (code, _, err) = run_boot(root.path(), &[]);
    assert_eq!(code, 1, "without credentials the server refuses: {err}");
    assert!(
        err.contains("terminal prompts disabled"),
        "never a prompt: {err}"
    );
}

// ---------------------------------------------------------------- unpack_images

#[test]
fn unpack_images_extracts_layers_with_whiteouts_from_a_layout_and_a_registry() {
    let top = tempfile::tempdir().unwrap();
    let tree = top.path().join("tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::write(tree.join("bin/tool"), "v1").unwrap();
    fs::write(tree.join("gone"), "x").unwrap();
    let blobs = top.path().join("blobs");
    let base = kairos_oci::import_dir(&tree, &blobs, &[]).unwrap();
    let upper = top.path().join("upper");
    fs::create_dir_all(upper.join("bin")).unwrap();
    fs::write(upper.join("bin/tool"), "v2").unwrap();
    fs::write(upper.join(".wh.gone"), "").unwrap();
    let img = kairos_oci::append_layer(&base, &upper, &blobs, "test").unwrap();
    let layout = top.path().join("layout");
    kairos_oci::store::write_layout(&img, &layout, "v2").unwrap();

    let root = root_with(&format!(
        "stages:\n  boot:\n  - unpack_images:\n    - source: oci-layout:{}:v2\n      target: /opt/pkg\n",
        layout.display()
    ));
    let (code, _, err) = run_boot(root.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read(root.path(), "/opt/pkg/bin/tool"), "v2");
    assert!(
        !root.path().join("opt/pkg/gone").exists(),
        "whiteout applied"
    );
    assert!(!root.path().join("opt/pkg/.wh.gone").exists());

    // From a registry (Debian's docker-registry on loopback), with a platform.
    let reg = kairos_oci::testing::TestRegistry::start().expect("docker-registry");
    let r = kairos_oci::ImageRef::parse(&format!("{}/pkg/tool:v2", reg.addr)).unwrap();
    kairos_oci::store_to(&img, &r, &top.path().join("cache"), &mut |_, _, _| {}).unwrap();
    let root = root_with(&format!(
        "stages:\n  boot:\n  - unpack_images:\n    - source: {}/pkg/tool:v2\n      target: /opt/pkg\n      platform: linux/amd64\n",
        reg.addr
    ));
    let (code, _, err) = run_boot(root.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read(root.path(), "/opt/pkg/bin/tool"), "v2");
    let root = root_with(&format!(
        "stages:\n  boot:\n  - unpack_images:\n    - source: {}/pkg/tool:nope\n      target: /opt/pkg\n    - source: {}/pkg/tool:v2\n      target: /x\n      platform: amd64\n",
        reg.addr, reg.addr
    ));
    let (code, _, err) = run_boot(root.path(), &[]);
    assert_eq!(code, 1);
    assert!(err.contains("no such image or tag"), "{err}");
    assert!(
        err.contains("platform \"amd64\": write os/architecture"),
        "{err}"
    );
}
