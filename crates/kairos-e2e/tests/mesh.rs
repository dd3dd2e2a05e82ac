//! Tier 3: the P2P mesh between two VMs. Two kairosified `tiny` nodes (busybox init, Debian
//! kernel) boot from disks with the same token in their OEM config; a link between them
//! (QEMU Ethernet over UDP) is their LAN. They find each other by mDNS, take addresses by DHCP
//! over the ledger, and ping each other over the VPN by address and by mesh name.
//!
//! Run by `scripts/test` on its own, after the other VM tests (two VMs at once).

use std::time::{Duration, Instant};

use kairos_e2e::{Vm, build_raw, start_registry, tiny_in_registry};
use serde_json::Value;

fn config(token: &str) -> String {
    format!(
        "#cloud-config
users:
- name: root
  passwd: rootpw
p2p:
  network_token: {token}
  disable_dht: true
  dns: true
stages:
  boot:
  - name: the link to the other VM is the LAN
    commands:
    # busybox images have no udev: load the NIC driver, wait for the link to appear.
    - modprobe virtio_net; ip link set lo up; i=0; while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
    - |
      n=$(cut -d: -f6 /sys/class/net/eth1/address)
      ip link set eth1 up; ip addr add 192.168.50.$((0x$n))/24 dev eth1; echo node-$n > /etc/hostname
"
    )
}

/// The daemon's status, once it answers.
fn status(vm: &mut Vm) -> Option<Value> {
    let out = vm.sh("kairos-agent p2p status --json").ok()?;
    let body = out.rsplit_once("[exit 0]")?.0;
    serde_json::from_str(body.trim()).ok()
}

/// What to look at when a node did not join.
fn dump(vm: &mut Vm) -> String {
    let out = vm
        .sh("kairos-agent p2p status; ip addr; ls /sys/class/net; cat /etc/hostname; lsmod | grep -i virtio")
        .unwrap_or_default();
    let console = vm.output();
    let keep: String = console
        .lines()
        .filter(|l| !l.contains("/dev/ttyS1") && !l.starts_with("$?;"))
        .collect::<Vec<_>>()
        .join("\n");
    let boot: String = keep
        .lines()
        .filter(|l| !l.contains("p2p status --json"))
        .take(400)
        .collect::<Vec<_>>()
        .join("\n");
    format!("{out}\nconsole (harness lines left out):\n{boot}")
}

fn joined(vm: &mut Vm, what: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let v = status(vm);
        if let Some(v) = &v {
            let live = v["machines"]
                .as_array()
                .map(|m| m.iter().filter(|x| x["live"] == Value::Bool(true)).count())
                .unwrap_or(0);
            if v["vpn"]["address"].is_string() && live == 2 {
                return v.clone();
            }
        }
        if Instant::now() > end {
            let d = dump(vm);
            panic!("{what}: no address and 2 live machines in 300 s: {v:#?}\n{d}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn vpn_ip(v: &Value) -> String {
    let a = v["vpn"]["address"].as_str().unwrap();
    a.split('/').next().unwrap().to_string()
}

#[test]
#[ignore = "VM test: run by scripts/test tier 3"]
fn two_tiny_nodes_mesh_over_a_link() {
    let work = tempfile::tempdir().unwrap();
    let (disk_a, disk_b) = (work.path().join("a.raw"), work.path().join("b.raw"));
    let token = kairos_mesh::Token::generate(9000).encode();
    let reg = start_registry().unwrap();
    let image = tiny_in_registry(&reg).unwrap();
    build_raw(&image, &config(&token), &disk_a).unwrap();
    drop(reg);
    // The same disk for both: they differ by the MAC of their link (address and hostname).
    let cp = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(&disk_a)
        .arg(&disk_b)
        .status()
        .unwrap();
    assert!(cp.success());
    let base = (20 + (std::process::id() % 200) as u16) << 8;
    let (pa, pb) = (base + 10, base + 11);
    let mut a = Vm::boot_linked(&disk_a, &work.path().join("a.log"), pa, pb).unwrap();
    let mut b = Vm::boot_linked(&disk_b, &work.path().join("b.log"), pb, pa).unwrap();
    a.login("root", "rootpw").unwrap();
    b.login("root", "rootpw").unwrap();
    let va = joined(&mut a, "node a");
    let vb = joined(&mut b, "node b");
    let (ia, ib) = (vpn_ip(&va), vpn_ip(&vb));
    assert_ne!(ia, ib, "two addresses");
    assert_eq!(va["hostname"], "node-0a");
    assert_eq!(vb["hostname"], "node-0b");
    for (vm, to) in [(&mut a, &ib), (&mut b, &ia)] {
        let out = vm.sh(&format!("ping -c 3 -W 5 {to}")).unwrap();
        assert!(out.ends_with("[exit 0]"), "ping {to}: {out}");
    }
    // By name: p2p.dns pointed the node's resolv.conf at the mesh DNS.
    let out = a.sh("ping -c 2 -W 5 node-0b.mesh").unwrap();
    assert!(
        out.ends_with("[exit 0]") && out.contains(&ib),
        "ping node-0b.mesh: {out}"
    );
    let out = b.sh("cat /etc/resolv.conf").unwrap();
    assert!(out.contains("nameserver 127.0.0.1"), "{out}");
}
