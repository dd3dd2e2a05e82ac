//! `kairos-agent kubernetes apply` against temp roots laid out as systemd and OpenRC images:
//! the files, unit links and runlevel links it leaves, what turning a block off removes, and
//! the configs it refuses. `/usr/bin/k3s` in these roots is a **stand-in** (an empty file): no
//! k3s binary can be had here, and nothing is started in an offline root.

use std::fs;
use std::path::Path;

mod common;

/// `kairos-agent --root ROOT --cmdline '' ARGS…`.
fn agent(root: &Path, args: &[&str]) -> (i32, String, String) {
    let root = root.to_str().unwrap();
    let all: Vec<&str> = ["--root", root, "--cmdline", ""]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    common::agent(&all, &[])
}

fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

const K3S_UNIT: &str = "[Unit]\nDescription=k3s (stand-in unit)\n[Service]\nExecStart=/usr/bin/k3s server\n[Install]\nWantedBy=multi-user.target\n";

fn systemd_root() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    put(d.path(), "usr/lib/systemd/systemd", "");
    put(d.path(), "usr/bin/k3s", "");
    put(d.path(), "etc/systemd/system/k3s.service", K3S_UNIT);
    put(
        d.path(),
        "etc/systemd/system/k3s-agent.service",
        &K3S_UNIT.replace("server", "agent"),
    );
    d
}

#[test]
fn k3s_on_systemd_then_turned_off() {
    let d = systemd_root();
    let r = d.path();
    put(
        r,
        "oem/90_k3s.yaml",
        "#cloud-config\nk3s:\n  enabled: true\n  args: [--disable=traefik]\n  env:\n    K3S_NODE_NAME: \"node one\"\n",
    );
    let (code, out, err) = agent(r, &["kubernetes", "apply"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        fs::read_to_string(r.join("etc/sysconfig/k3s")).unwrap(),
        "K3S_NODE_NAME=\"node one\"\n"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(r.join("etc/sysconfig/k3s"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "the env file may hold a join token"
    );
    let dropin =
        fs::read_to_string(r.join("etc/systemd/system/k3s.service.d/override.conf")).unwrap();
    assert!(
        dropin.contains("ExecStart=\nExecStart=/usr/bin/k3s server --disable=traefik\n"),
        "{dropin}"
    );
    let wants = r.join("etc/systemd/system/multi-user.target.wants/k3s.service");
    assert!(wants.symlink_metadata().is_ok(), "k3s enabled\n{out}{err}");
    assert!(out.contains("enabled  k3s"), "{out}");

    // Off: its files go and it is disabled.
    put(
        r,
        "oem/90_k3s.yaml",
        "#cloud-config\nk3s:\n  enabled: false\n",
    );
    let (code, out, err) = agent(r, &["kubernetes", "apply", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!r.join("etc/sysconfig/k3s").exists());
    assert!(
        !r.join("etc/systemd/system/k3s.service.d/override.conf")
            .exists()
    );
    assert!(wants.symlink_metadata().is_err(), "k3s disabled");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["enabled"], serde_json::json!([]));
    assert_eq!(v["service_manager"], "systemd");
}

#[test]
fn k3s_agent_on_openrc() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    put(r, "sbin/openrc-run", "");
    put(r, "usr/bin/k3s", "");
    put(
        r,
        "oem/90_k3s.yaml",
        "#cloud-config\nk3s-agent:\n  enabled: true\n  args: [--node-label=zone=a]\n  env: {K3S_URL: \"https://10.1.0.1:6443\"}\n",
    );
    let (code, out, err) = agent(r, &["kubernetes", "apply"]);
    assert_eq!(code, 0, "{out}{err}");
    let init = fs::read_to_string(r.join("etc/init.d/k3s-agent")).unwrap();
    assert!(
        init.contains("command_args=\"agent --node-label=zone=a\""),
        "{init}"
    );
    assert_eq!(
        fs::read_to_string(r.join("etc/rancher/k3s/k3s-agent.env")).unwrap(),
        "K3S_URL=\"https://10.1.0.1:6443\"\n"
    );
    assert_eq!(
        fs::read_link(r.join("etc/runlevels/default/k3s-agent")).unwrap(),
        Path::new("/etc/init.d/k3s-agent")
    );
}

#[test]
fn refusals() {
    let d = systemd_root();
    let r = d.path();
    put(
        r,
        "oem/90_k3s.yaml",
        "#cloud-config\nk3s: {enabled: true}\nk3s-agent: {enabled: true}\n",
    );
    let (code, _, err) = agent(r, &["kubernetes", "apply"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("`k3s.enabled` and `k3s-agent.enabled` are both true"),
        "{err}"
    );
    assert!(
        !r.join("etc/sysconfig/k3s").exists(),
        "nothing half-written"
    );

    put(
        r,
        "oem/90_k3s.yaml",
        "#cloud-config\nk0s: {enabled: true}\n",
    );
    let (code, _, err) = agent(r, &["kubernetes", "apply"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("/usr/bin/k0s is not in the image") && err.contains("--k0s"),
        "{err}"
    );

    // With a network token (and p2p.auto on), roles come from the mesh (`p2p run`): nothing
    // is written here.
    put(
        r,
        "oem/90_k3s.yaml",
        "#cloud-config\nk3s: {enabled: true}\np2p: {network_token: b3RwOgo=}\n",
    );
    let (code, out, err) = agent(r, &["kubernetes", "apply"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("comes from the mesh"), "{out}");
    assert!(!r.join("etc/sysconfig/k3s").exists());
}

/// One coordinator tick on `root` for a node whose config is `yaml` (forced roles need no
/// other node), with VPN address 10.1.0.5.
fn mesh_tick(root: &Path, yaml: &str) -> serde_json::Value {
    use kairos_cluster::roles::{KEY_IP_MASTER, KEY_NODETOKEN, encode};
    use kairos_vpn::daemon::{Coordinator, TickInput};
    let v = kairos_config::yaml::parse(yaml, &std::sync::Arc::from("t.yaml"))
        .unwrap()
        .to_json();
    let cfg: kairos_config::types::Config = serde_json::from_value(v).unwrap();
    let settings = kairos_cluster::roles::Settings::new(
        cfg.p2p.as_ref().unwrap(),
        cfg.kubevip.as_ref(),
        "abc-node".into(),
    );
    let mut m = kairos_agent::cluster::MeshCluster::new(
        kairos_sys::Root::new(root),
        kairos_cluster::single::Blocks::from_config(&cfg),
        settings,
        "kairos".into(),
    );
    m.tick(TickInput {
        // A master elsewhere, for a worker to join.
        entries: [
            (KEY_IP_MASTER, "10.1.0.1"),
            (KEY_NODETOKEN, "K10abc::server:secret"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), encode(&serde_json::json!(v))))
        .collect(),
        active_nodes: 1,
        vpn_ip: Some("10.1.0.5".parse().unwrap()),
        live_addresses: Vec::new(),
        now: 1_800_000_000,
    })
    .status
}

/// kube-vip on a master over the mesh: its RBAC and DaemonSet (or static pod) are written
/// where k3s deploys them, k3s gets `--tls-san=<eip>`, the VIP is the API address; a worker
/// removes them; a bad `eip` turns kube-vip off and the status says why.
#[test]
fn kube_vip_on_a_mesh_master() {
    let d = systemd_root();
    let r = d.path();
    let master = "p2p:\n  network_token: x\n  role: master\nk3s:\n  enabled: true\nkubevip:\n  eip: 192.168.1.240\n  interface: eth7\n";
    let st = mesh_tick(r, master);
    assert_eq!(st["role"], "master", "{st:#}");
    let ds =
        fs::read_to_string(r.join("var/lib/rancher/k3s/server/manifests/kubevip.yaml")).unwrap();
    assert!(
        ds.contains("kind: DaemonSet")
            && ds.contains("\"192.168.1.240\"")
            && ds.contains("\"eth7\""),
        "{ds}"
    );
    assert!(
        r.join("var/lib/rancher/k3s/server/manifests/kubevipmanifest.yaml")
            .is_file()
    );
    let unit =
        fs::read_to_string(r.join("etc/systemd/system/k3s.service.d/override.conf")).unwrap();
    assert!(
        unit.contains("--tls-san=192.168.1.240") && unit.contains("--node-ip=10.1.0.5"),
        "{unit}"
    );

    // static_pod: the kubelet's directory instead, the DaemonSet gone.
    mesh_tick(r, &master.replace("eth7\n", "eth7\n  static_pod: true\n"));
    assert!(
        r.join("var/lib/rancher/k3s/agent/pod-manifests/kubevip.yaml")
            .is_file()
    );
    assert!(
        !r.join("var/lib/rancher/k3s/server/manifests/kubevip.yaml")
            .exists()
    );

    // The same node as a worker: no kube-vip files.
    let worker = master.replace("role: master", "role: worker");
    let st = mesh_tick(r, &worker);
    assert_eq!(st["service"], "k3s-agent", "{st:#}");
    for f in kairos_cluster::kubevip::ALL_FILES {
        assert!(
            !r.join(f.trim_start_matches('/')).exists(),
            "{f} left on a worker"
        );
    }

    // A bad eip: off, and said.
    let st = mesh_tick(r, &master.replace("192.168.1.240", "192.168.1.999"));
    assert!(st["errors"].to_string().contains("kubevip.eip"), "{st:#}");
    assert!(
        !r.join("var/lib/rancher/k3s/server/manifests/kubevip.yaml")
            .exists()
    );
}
