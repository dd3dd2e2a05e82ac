//! Tier 3: a Kubernetes cluster that forms itself over the mesh, between two VMs. Two
//! `debian` nodes (systemd: k3s needs a service manager, and busybox-init `tiny` has none)
//! kairosified with `--k3s` — where the binary is **k3s-standin, a stand-in for k3s written
//! for the tests** (k3s cannot be had here) — boot from disks with only a network token and
//! `k3s.enabled` in their config, linked by a QEMU Ethernet link (their LAN). They elect a
//! master; the worker's k3s-agent joins the master's API over the VPN with the master's
//! token; `get-kubeconfig` points at the master's mesh address; the services are systemd's.
//!
//! Run by `scripts/test` on its own, after the other VM tests (two VMs at once).

use std::time::{Duration, Instant};

use kairos_e2e::{
    Vm, bin, build_raw, debian_rootfs, image_in_registry_with, nic_up_command, start_registry,
};
use serde_json::Value;

fn config(token: &str) -> String {
    format!(
        "#cloud-config
users:
- name: root
  passwd: debianpw
p2p:
  network_token: {token}
  disable_dht: true
k3s:
  enabled: true
# docs/kubernetes.md's health checks (a shorter timeout: the test stops k3s-agent below).
boot_assessment:
  timeout: 30
  health_checks:
  - until systemctl is-active --quiet k3s || systemctl is-active --quiet k3s-agent; do sleep 2; done
  - if systemctl is-enabled --quiet k3s; then until k3s kubectl get --raw=/readyz; do sleep 2; done; fi
stages:
  boot:
  - name: the link to the other VM is the LAN
    commands:
{}",
        nic_up_command(
            "52:54:00:4b:",
            "192.168.50.$((0x$n))/24",
            &["hostname node-$n; echo node-$n > /etc/hostname"]
        )
    )
}

/// The daemon's status, once it answers.
fn status(vm: &mut Vm) -> Option<Value> {
    let out = vm.sh("kairos-agent p2p status --json").ok()?;
    let body = out.rsplit_once("[exit 0]")?.0;
    serde_json::from_str(body.trim()).ok()
}

fn role(v: &Option<Value>) -> Option<String> {
    v.as_ref()?["cluster"]["role"].as_str().map(str::to_string)
}

fn vpn_ip(v: &Value) -> String {
    let a = v["vpn"]["address"].as_str().unwrap_or_default();
    a.split('/').next().unwrap_or_default().to_string()
}

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn two_debian_nodes_form_a_cluster() {
    let work = tempfile::tempdir().unwrap();
    let (disk_a, disk_b) = (work.path().join("a.raw"), work.path().join("b.raw"));
    let token = kairos_mesh::Token::generate(9000).encode();
    let reg = start_registry().unwrap();
    let standin = bin("k3s-standin");
    let image = image_in_registry_with(
        &reg,
        &debian_rootfs(),
        "debian-k3s",
        &["--k3s", &standin.to_string_lossy()],
    )
    .unwrap();
    build_raw(&image, &config(&token), &disk_a).unwrap();
    drop(reg);
    let cp = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(&disk_a)
        .arg(&disk_b)
        .status()
        .unwrap();
    assert!(cp.success());
    let base = (20 + (std::process::id() % 200) as u16) << 8;
    let (pa, pb) = (base + 20, base + 21);
    let mut a = Vm::boot_linked(&disk_a, &work.path().join("a.log"), pa, pb).unwrap();
    let mut b = Vm::boot_linked(&disk_b, &work.path().join("b.log"), pb, pa).unwrap();
    a.login("root", "debianpw").unwrap();
    b.login("root", "debianpw").unwrap();

    // One master, one worker, no human step.
    let end = Instant::now() + Duration::from_secs(420);
    let (va, vb) = loop {
        let (va, vb) = (status(&mut a), status(&mut b));
        let mut roles = [role(&va), role(&vb)];
        roles.sort();
        let joined = a
            .sh("cat /var/lib/rancher/k3s/agent/standin-joined /var/lib/rancher/k3s/server/standin-nodes")
            .unwrap_or_default()
            + &b.sh("cat /var/lib/rancher/k3s/agent/standin-joined /var/lib/rancher/k3s/server/standin-nodes")
                .unwrap_or_default();
        if roles == [Some("master".to_string()), Some("worker".to_string())]
            && joined.contains(" agent 10.1.0.")
        {
            break (va.unwrap(), vb.unwrap());
        }
        if Instant::now() > end {
            let da = a
                .sh("kairos-agent p2p status; ip -br addr; journalctl -b -u cos-setup-boot --no-pager | tail -n 15; systemctl status k3s k3s-agent kairos-p2p --no-pager -n 20")
                .unwrap_or_default();
            let db = b
                .sh("kairos-agent p2p status; ip -br addr; journalctl -b -u cos-setup-boot --no-pager | tail -n 15; systemctl status k3s k3s-agent kairos-p2p --no-pager -n 20")
                .unwrap_or_default();
            panic!("no cluster in 420 s:\n--- a:\n{da}\n--- b:\n{db}\n{joined}");
        }
        std::thread::sleep(Duration::from_secs(3));
    };
    let (master, worker, master_v) = if role(&Some(va.clone())).as_deref() == Some("master") {
        (&mut a, &mut b, va)
    } else {
        (&mut b, &mut a, vb)
    };
    let master_ip = vpn_ip(&master_v);
    assert!(master_ip.starts_with("10.1.0."), "{master_v:#}");
    let out = master
        .sh("systemctl is-active k3s; k3s kubectl get --raw=/readyz")
        .unwrap();
    assert!(
        out.contains("active\nok") && out.ends_with("[exit 0]"),
        "{out}"
    );
    let out = worker
        .sh("systemctl is-active k3s-agent; systemctl is-enabled k3s-agent")
        .unwrap();
    assert!(out.contains("active\nenabled"), "{out}");
    let out = worker.sh("cat /etc/sysconfig/k3s-agent").unwrap();
    assert!(
        out.contains(&format!("K3S_URL=\"https://{master_ip}:6443\"")),
        "{out}"
    );
    let out = worker.sh("kairos-agent get-kubeconfig").unwrap();
    assert!(
        out.contains(&format!("server: https://{master_ip}:6443")) && out.ends_with("[exit 0]"),
        "{out}"
    );

    // The documented health checks pass on both, and fail on a worker whose k3s-agent stopped.
    for (who, vm) in [("master", &mut *master), ("worker", &mut *worker)] {
        let out = vm.sh("kairos-agent boot-assessment --json").unwrap();
        assert!(
            out.contains("\"verdict\":\"healthy\"") && out.ends_with("[exit 0]"),
            "{who}: {out}"
        );
    }
    let out = worker
        .sh("systemctl stop k3s-agent; kairos-agent boot-assessment --json")
        .unwrap();
    assert!(
        out.contains("\"verdict\":\"unhealthy\"")
            && out.contains("k3s-agent")
            && out.ends_with("[exit 1]"),
        "{out}"
    );
}
