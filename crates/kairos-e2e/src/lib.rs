//! Test harness for VM end-to-end tests: builds disks with the real `kairosctl`, boots them in
//! QEMU (TCG, OVMF) and talks to the serial console.
//!
//! Needs `scripts/build-static` (binaries in `$KAIROS_CACHE/bin`) and
//! `scripts/images/tiny.sh` (the tiny image tree); `scripts/test` runs both before tier 3.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A cloud-config for the `tiny` flavour: root's password, and a network in the boot stage
/// (busybox has no network manager; the host is 10.0.2.2 under QEMU user networking, where
/// the tests' registry listens).
pub fn tiny_cloud_config(root_password: &str) -> String {
    format!(
        "#cloud-config
users:
- name: root
  passwd: {root_password}
stages:
  boot:
  - name: network for the tests
    commands:
    - modprobe virtio_net
    - ip link set eth0 up
    - ip addr add 10.0.2.15/24 dev eth0
    - ip route add default via 10.0.2.2
"
    )
}

/// A boot-stage command for systemd images (a YAML `- |` item for a `commands:` list, six
/// spaces in) that brings up the NIC whose MAC starts with `mac_prefix` with address `addr`
/// (a shell word; `$n` is the MAC's last byte in hex), then runs `then` (more script lines).
/// The boot stage is not ordered after udev: the NIC may not be there yet, or be renamed
/// (eth0 → enp0s3) under us, so it is found by MAC after `udevadm settle` and retried for up
/// to 60 s; the stage fails with a message if it never comes up. QEMU's user network NIC has
/// MAC 52:54:00:12:34:56 (host 10.0.2.2).
pub fn nic_up_command(mac_prefix: &str, addr: &str, then: &[&str]) -> String {
    let mut s = format!(
        "    - |
      udevadm settle -t 30 || true
      t=0
      while [ $t -lt 300 ]; do
        i=
        for d in /sys/class/net/*; do
          case $(cat $d/address) in {mac_prefix}*) i=${{d##*/}}; n=$(cut -d: -f6 $d/address);; esac
        done
        if [ -n \"$i\" ] && ip link set $i up && ip addr replace {addr} dev $i; then break; fi
        sleep 0.2; t=$((t+1))
      done
      [ $t -lt 300 ] || {{ echo \"no NIC with MAC {mac_prefix}* came up in 60 s\" >&2; exit 1; }}
"
    );
    for l in then {
        s.push_str("      ");
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// A `stages:` block for systemd images that brings up QEMU's user network (the guest is
/// 10.0.2.15, the host and its test registry 10.0.2.2), for the end of a cloud-config.
pub fn user_net_stage() -> String {
    format!(
        "stages:
  boot:
  - name: network for the tests
    commands:
{}",
        nic_up_command(
            "52:54:00:12:34:56",
            "10.0.2.15/24",
            &["ip route replace default via 10.0.2.2"]
        )
    )
}

/// A registry image reference as the guest reaches it (QEMU user networking: the host is
/// 10.0.2.2).
pub fn guest_ref(host_ref: &str) -> String {
    host_ref.replace("127.0.0.1", "10.0.2.2")
}

/// PCR 11 (SHA-256 bank) as the guest's kernel shows it, lowercase hex.
pub fn guest_pcr11(vm: &mut Vm) -> Result<String> {
    let out = vm.sh("cat /sys/class/tpm/tpm0/pcr-sha256/11")?;
    Ok(out.lines().next().unwrap_or("").trim().to_ascii_lowercase())
}

pub fn cache() -> PathBuf {
    PathBuf::from(std::env::var("KAIROS_CACHE").unwrap_or_else(|_| "/var/cache/kairos-rs".into()))
}

pub fn bin(name: &str) -> PathBuf {
    cache().join("bin").join(name)
}

/// The tiny image tree, built by `scripts/images/tiny.sh`.
pub fn tiny_rootfs() -> PathBuf {
    cache().join("images/tiny/rootfs")
}

pub fn kairosctl(args: &[&str]) -> Result<String> {
    let o = Command::new(bin("kairosctl"))
        .args(args)
        .output()
        .context("running kairosctl (scripts/build-static builds it)")?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() {
        bail!("kairosctl {} failed:\n{log}", args.join(" "));
    }
    Ok(log)
}

pub use kairos_oci::testing::TestRegistry as Registry;

pub fn start_registry() -> Result<Registry> {
    Ok(Registry::start()?)
}

/// An image tree as a user has it: imported and pushed to the registry as `<name>-base:v1`,
/// then kairosified into `<name>:v1`. Returns the kairosified reference.
pub fn image_in_registry(reg: &Registry, rootfs: &Path, name: &str) -> Result<String> {
    image_in_registry_with(reg, rootfs, name, &[])
}

/// [`image_in_registry`] with more `kairosify` arguments (`--k3s PATH`).
pub fn image_in_registry_with(
    reg: &Registry,
    rootfs: &Path,
    name: &str,
    kairosify: &[&str],
) -> Result<String> {
    let base = format!("{}/kairos/{name}-base:v1", reg.addr);
    let kairos = format!("{}/kairos/{name}:v1", reg.addr);
    kairosctl(&["image", "import", &rootfs.to_string_lossy(), &base])?;
    let mut args = vec!["kairosify"];
    args.extend_from_slice(kairosify);
    args.extend([base.as_str(), kairos.as_str()]);
    kairosctl(&args)?;
    Ok(kairos)
}

pub fn tiny_in_registry(reg: &Registry) -> Result<String> {
    image_in_registry(reg, &tiny_rootfs(), "tiny")
}

/// A new version of `base`: its layers plus one small layer with `files` (path, content),
/// pushed as `dest` — what a user's CI makes when one thing changes.
pub fn image_with_files(base: &str, files: &[(&str, &[u8])], dest: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    for (path, content) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap_or(dir.path()))?;
        std::fs::write(&p, content)?;
    }
    kairosctl(&["image", "append", base, &dir.path().to_string_lossy(), dest])?;
    Ok(dest.to_string())
}

/// Runs the static `kairos-agent` on the host (offline node tests); (exit code, stdout, stderr).
pub fn agent(args: &[&str]) -> Result<(i32, String, String)> {
    let o = Command::new(bin("kairos-agent"))
        .args(args)
        .output()
        .context("running kairos-agent (scripts/build-static builds it)")?;
    Ok((
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    ))
}

/// Deterministic filler bytes that do not compress (a stand-in for a changed binary).
pub fn incompressible(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Copies the ESP (partition 1, FAT) of a disk image into `dir` with mtools: the kernel of
/// these machines has no FAT driver, so offline tests work on a copy of the tree.
pub fn esp_tree(disk: &Path, dir: &Path) -> Result<()> {
    let (start, _) = partition(disk, 1)?;
    std::fs::create_dir_all(dir)?;
    let st = Command::new("mcopy")
        .args(["-s", "-n", "-i"])
        .arg(format!("{}@@{start}", disk.display()))
        .arg("::/")
        .arg(dir)
        .status()
        .context("running mcopy")?;
    if !st.success() {
        bail!("mcopy of the ESP of {} failed", disk.display());
    }
    Ok(())
}

/// Writes `file` onto the ESP of a disk image at `esp_path` (e.g. `kairos/<id>.efi`),
/// replacing what is there, with mtools.
pub fn put_on_esp(disk: &Path, file: &Path, esp_path: &str) -> Result<()> {
    let (start, _) = partition(disk, 1)?;
    let st = Command::new("mcopy")
        .args(["-o", "-i"])
        .arg(format!("{}@@{start}", disk.display()))
        .arg(file)
        .arg(format!("::/{}", esp_path.trim_start_matches('/')))
        .status()
        .context("running mcopy")?;
    if !st.success() {
        bail!("mcopy onto the ESP of {} failed", disk.display());
    }
    Ok(())
}

/// A disk built from `rootfs` whose layer images were removed from STATE (as a failed copy
/// would leave it) must show the failure summary on the console naming the step, reboot, and
/// leave `boot-failure.log` on OEM.
pub fn check_missing_layer_failure(rootfs: &Path, cloud_config: &str, work: &Path) -> Result<()> {
    let disk = work.join("disk.raw");
    build_raw(&format!("dir:{}", rootfs.display()), cloud_config, &disk)?;
    {
        let state = MountGuard::partition(&disk, 4, &work.join("state"), "ext4")?;
        let mut removed = 0;
        for e in std::fs::read_dir(state.path.join("layers"))? {
            std::fs::remove_file(e?.path())?;
            removed += 1;
        }
        if removed == 0 {
            bail!("no layer images in STATE");
        }
    }
    let mut vm = Vm::boot(&disk, &work.join("fail.log"))?;
    vm.wait_for("KAIROS BOOT FAILED", Duration::from_secs(300))?;
    let summary = vm.wait_for(
        "========================================",
        Duration::from_secs(30),
    )?;
    check(&summary, "mount-layers", "the failed step is named");
    check(&summary, "FAILED", "timeline");
    vm.wait_exit(Duration::from_secs(60))
        .context("the node reboots after a failed boot")?;
    drop(vm);
    let oem = MountGuard::partition(&disk, 2, &work.join("oem"), "ext4")?;
    let log = std::fs::read_to_string(oem.path.join("boot-failure.log"))
        .context("boot-failure.log on OEM")?;
    check(&log, "mount-layers", "boot-failure.log on OEM");
    Ok(())
}

/// A mount that is undone when dropped.
pub struct MountGuard {
    pub path: PathBuf,
}

impl MountGuard {
    /// Mounts partition `n` of a disk image through a loop device at its offset (these
    /// machines have no udev to make partition nodes of a scanned loop device).
    pub fn partition(disk: &Path, n: usize, path: &Path, fstype: &str) -> Result<MountGuard> {
        let (start, size) = partition(disk, n)?;
        std::fs::create_dir_all(path)?;
        let st = Command::new("mount")
            .args([
                "-t",
                fstype,
                "-o",
                &format!("loop,offset={start},sizelimit={size}"),
            ])
            .arg(disk)
            .arg(path)
            .status()?;
        if !st.success() {
            bail!(
                "mounting partition {n} of {} at {} failed",
                disk.display(),
                path.display()
            );
        }
        Ok(MountGuard {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// The debian image tree, built by `scripts/images/debian.sh`.
pub fn debian_rootfs() -> PathBuf {
    cache().join("images/debian/rootfs")
}

/// `kairosctl build KIND --image IMAGE --output OUT --cloud-config CC`, with `cloud_config`
/// written to `cc` first.
fn build_artifact(
    kind: &str,
    image: &str,
    cloud_config: &str,
    out: &Path,
    cc: &Path,
) -> Result<String> {
    std::fs::write(cc, cloud_config)?;
    let (out, cc) = (out.to_string_lossy(), cc.to_string_lossy());
    kairosctl(&[
        "build",
        kind,
        "--image",
        image,
        "--output",
        &out,
        "--cloud-config",
        &cc,
    ])
}

/// Runs `kairosctl build raw` for `image` with `cloud_config`, writing `out`.
pub fn build_raw(image: &str, cloud_config: &str, out: &Path) -> Result<String> {
    build_artifact(
        "raw",
        image,
        cloud_config,
        out,
        &out.with_extension("cloud-config.yaml"),
    )
}

/// Runs `kairosctl build iso` for `image` with `cloud_config`, writing `out`.
pub fn build_iso(image: &str, cloud_config: &str, out: &Path) -> Result<String> {
    build_artifact(
        "iso",
        image,
        cloud_config,
        out,
        &out.with_extension("cloud-config.yaml"),
    )
}

/// Runs `kairosctl build netboot` for `image` with `cloud_config` into `dir`.
pub fn build_netboot(image: &str, cloud_config: &str, dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    build_artifact(
        "netboot",
        image,
        cloud_config,
        dir,
        &dir.join("cloud-config.yaml"),
    )
}

/// A blank (sparse) disk image of `mib` MiB.
pub fn blank_disk(path: &Path, mib: u64) -> Result<()> {
    std::fs::File::create(path)?.set_len(mib << 20)?;
    Ok(())
}

/// The tiny image from a fresh local registry built into an ISO with `cloud_config`; the
/// registry is stopped again (installing from the ISO needs no network).
pub fn tiny_iso(cloud_config: &str, iso: &Path) -> Result<()> {
    let reg = start_registry()?;
    let image = tiny_in_registry(&reg)?;
    build_iso(&image, cloud_config, iso)?;
    Ok(())
}

/// Fails the test unless `out` contains `want`.
pub fn check(out: &str, want: &str, what: &str) {
    assert!(out.contains(want), "{what}: expected {want:?} in:\n{out}");
}

/// The checks every flavour passes right after boot: active mode, read-only overlay root.
pub fn check_active_immutable(vm: &mut Vm) -> Result<()> {
    check(
        &vm.sh("cat /run/cos/active_mode")?,
        "1[exit 0]",
        "active mode marker",
    );
    check(
        &vm.sh("grep ' / ' /proc/mounts")?,
        "overlay / overlay ro",
        "overlay root",
    );
    check(
        &vm.sh("touch /usr/x")?,
        "Read-only file system",
        "/usr is read-only",
    );
    Ok(())
}

/// Writes one ephemeral and two persistent files (as root) before a reboot…
pub fn write_persistence_probes(vm: &mut Vm) -> Result<()> {
    vm.sh("echo eph > /etc/foo; mkdir -p /etc/ssh; echo keep > /etc/ssh/kept; echo local > /usr/local/kept; sync")?;
    Ok(())
}

/// …and checks them after it: /etc/foo is gone, /etc/ssh and /usr/local kept their files.
pub fn check_persistence_probes(vm: &mut Vm) -> Result<()> {
    check(
        &vm.sh("cat /etc/foo")?,
        "No such file",
        "/etc/foo is ephemeral",
    );
    check(
        &vm.sh("cat /etc/ssh/kept")?,
        "keep\n[exit 0]",
        "/etc/ssh persists",
    );
    check(
        &vm.sh("cat /usr/local/kept")?,
        "local\n[exit 0]",
        "/usr/local persists",
    );
    Ok(())
}

/// (start, size) in bytes of partition `n` (1-based) of a disk image, from `sfdisk --dump`.
pub fn partition(disk: &Path, n: usize) -> Result<(u64, u64)> {
    let out = Command::new("sfdisk")
        .arg("--dump")
        .arg(disk)
        .output()
        .context("running sfdisk --dump")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .filter(|l| l.contains(": start="))
        .nth(n - 1)
        .with_context(|| format!("{}: no partition {n}", disk.display()))?;
    let num = |key: &str| -> Result<u64> {
        let v = line
            .split(key)
            .nth(1)
            .context(key.to_string())?
            .trim_start();
        Ok(v[..v.find(',').unwrap_or(v.len())].trim().parse()?)
    };
    Ok((num("start=")? * 512, num("size=")? * 512))
}

/// Makes a built disk `extra_mib` larger, as writing it to a bigger drive would.
pub fn enlarge_disk(disk: &Path, extra_mib: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(disk)?;
    let len = f.metadata()?.len();
    f.set_len(len + (extra_mib << 20))?;
    Ok(())
}

/// Checks COS_PERSISTENT (at /usr/local) is larger than `min_mib`: grown to the disk.
pub fn check_persistent_grown(vm: &mut Vm, min_mib: u64) -> Result<()> {
    let df = vm.sh("df -m /usr/local | tail -1")?;
    let size_mib: u64 = df
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(
        size_mib > min_mib,
        "COS_PERSISTENT grown to the disk (df: {df})"
    );
    Ok(())
}

/// Writes `loader.conf` on the disk's ESP (partition 1) with mtools, e.g. to pick an entry.
pub fn set_loader_conf(disk: &Path, text: &str) -> Result<()> {
    let (esp, _) = partition(disk, 1)?;
    let conf = disk.with_extension("loader.conf");
    std::fs::write(&conf, text)?;
    let st = Command::new("mcopy")
        .arg("-o")
        .arg("-i")
        .arg(format!("{}@@{esp}", disk.display()))
        .arg(&conf)
        .arg("::/loader/loader.conf")
        .status()
        .context("running mcopy")?;
    let _ = std::fs::remove_file(&conf);
    if !st.success() {
        bail!("mcopy of loader.conf onto {} failed", disk.display());
    }
    Ok(())
}

/// Boots the recovery entry of `disk` and checks the recovery marker (logs in as root).
pub fn check_recovery_boot(disk: &Path, log: &Path, root_password: &str) -> Result<()> {
    set_loader_conf(disk, "default recovery.conf\ntimeout 0\n")?;
    let mut vm = Vm::boot(disk, log)?;
    vm.login("root", root_password)?;
    check(
        &vm.sh("cat /run/cos/recovery_mode")?,
        "1[exit 0]",
        "recovery mode marker",
    );
    check(&vm.sh("ls /run/cos")?, "recovery_mode", "recovery");
    check(
        &vm.sh("grep ' / ' /proc/mounts")?,
        "overlay / overlay ro",
        "recovery root is the read-only overlay",
    );
    Ok(())
}

/// The last 3000 characters of console output, for failure messages.
fn tail(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    chars[chars.len().saturating_sub(3000)..].iter().collect()
}

/// A running VM with its serial console, and a second serial port for command output.
///
/// Commands typed on the console by [`Vm::sh`] write their output to the guest's
/// `/dev/ttyS1`, which QEMU writes to a file of its own (`LOG.harness`): kernel messages and
/// whatever services print on the console never mix into it. Each command is framed by a
/// per-command nonce. Sessions that cannot open ttyS1 (a non-root login) fall back to framed
/// output on the console.
pub struct Vm {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<String>>,
    /// Bytes of output already consumed by `wait_for`.
    seen: usize,
    /// What the guest wrote to ttyS1, and how much of it `sh` consumed.
    chan: Arc<Mutex<String>>,
    chan_seen: usize,
    /// True while the logged-in shell is root's (ttyS1 is root-only).
    use_chan: bool,
    /// Commands sent so far (part of each nonce).
    commands: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pub log: PathBuf,
}

impl Vm {
    /// Boots `disk` with `kairosctl vm run` (the users' one-liner: OVMF, TCG, virtio), one
    /// vCPU so that two VMs fit this 2-core machine; its UEFI variables live next to the disk.
    pub fn boot(disk: &Path, log: &Path) -> Result<Vm> {
        Vm::boot_with(disk, None, log)
    }

    /// Boots with an install ISO inserted (the disk stays first in the boot order).
    pub fn boot_with(disk: &Path, iso: Option<&Path>, log: &Path) -> Result<Vm> {
        let mut extra: Vec<String> = Vec::new();
        if let Some(iso) = iso {
            extra.extend(["--iso".into(), iso.to_string_lossy().into_owned()]);
        }
        Vm::spawn(disk, &extra, log)
    }

    /// Boots `disk` with a second NIC linked to another VM (`kairosctl vm run --link`): this
    /// VM's UDP port and the other's. The guest sees it as eth1, MAC ending in `mine`'s low
    /// byte.
    pub fn boot_linked(disk: &Path, log: &Path, mine: u16, theirs: u16) -> Result<Vm> {
        Vm::spawn(disk, &["--link".into(), format!("{mine}:{theirs}")], log)
    }

    /// Boots under Secure Boot with the owner's keys (`keys`, a `kairosctl keys generate`
    /// directory) enrolled and a TPM 2.0 (swtpm): both kept beside the disk across boots,
    /// fresh for a new disk.
    pub fn boot_trusted(disk: &Path, keys: &Path, log: &Path) -> Result<Vm> {
        Vm::boot_trusted_with(disk, None, keys, log)
    }

    /// [`Vm::boot_trusted`] with an install ISO inserted (the blank disk falls through to it).
    pub fn boot_trusted_with(
        disk: &Path,
        iso: Option<&Path>,
        keys: &Path,
        log: &Path,
    ) -> Result<Vm> {
        let mut extra = vec![
            "--secure-boot".into(),
            keys.to_string_lossy().into_owned(),
            "--tpm".into(),
        ];
        if let Some(iso) = iso {
            extra.extend(["--iso".into(), iso.to_string_lossy().into_owned()]);
        }
        Vm::spawn(disk, &extra, log)
    }

    /// Boots netboot artifacts (`kairosctl build netboot` output) the way the iPXE script
    /// says: its kernel, initrd and cmdline.
    pub fn boot_netboot(disk: &Path, dir: &Path, log: &Path) -> Result<Vm> {
        let script = std::fs::read_to_string(dir.join("netboot.ipxe"))?;
        let append = script
            .lines()
            .find_map(|l| l.strip_prefix("kernel vmlinuz "))
            .context("netboot.ipxe has no `kernel vmlinuz …` line")?;
        let extra = [
            "--kernel".to_string(),
            dir.join("vmlinuz").to_string_lossy().into_owned(),
            "--initrd".into(),
            dir.join("initrd").to_string_lossy().into_owned(),
            "--append".into(),
            append.to_string(),
        ];
        Vm::spawn(disk, &extra, log)
    }

    fn spawn(disk: &Path, extra: &[String], log: &Path) -> Result<Vm> {
        let mut chan_path = log.as_os_str().to_owned();
        chan_path.push(".harness");
        let chan_path = PathBuf::from(chan_path);
        std::fs::write(&chan_path, b"")?;
        let mut cmd = Command::new(bin("kairosctl"));
        cmd.args(["vm", "run", "--memory", "768", "--smp", "1"]);
        cmd.arg("--second-serial").arg(&chan_path);
        cmd.args(extra);
        let mut child = cmd
            .arg(disk)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting kairosctl vm run")?;
        let stdin = child.stdin.take().context("qemu stdin")?;
        let mut stdout = child.stdout.take().context("qemu stdout")?;
        let out = Arc::new(Mutex::new(String::new()));
        let sink = out.clone();
        let mut logf = std::fs::File::create(log)?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = logf.write_all(&buf[..n]);
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        // Tail the second serial port's file (QEMU appends to it as the guest writes).
        let chan = Arc::new(Mutex::new(String::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (chan, stop) = (chan.clone(), stop.clone());
            let mut f = std::fs::File::open(&chan_path)?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut pending = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match f.read(&mut buf) {
                        Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(20)),
                        Ok(n) => {
                            pending.extend_from_slice(&buf[..n]);
                            // Keep an incomplete UTF-8 sequence for the next read.
                            let valid = match std::str::from_utf8(&pending) {
                                Ok(_) => pending.len(),
                                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                                Err(_) => pending.len(),
                            };
                            let text = String::from_utf8_lossy(&pending[..valid]).into_owned();
                            pending.drain(..valid);
                            chan.lock().unwrap().push_str(&text);
                        }
                    }
                }
            });
        }
        Ok(Vm {
            child,
            stdin,
            out,
            seen: 0,
            chan,
            chan_seen: 0,
            use_chan: false,
            commands: 0,
            stop,
            log: log.to_path_buf(),
        })
    }

    /// Waits until `needle` appears on the second serial port after what was consumed.
    fn wait_chan(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let chan = self.chan.lock().unwrap();
                if let Some(pos) = chan[self.chan_seen..].find(needle) {
                    let text =
                        chan[self.chan_seen..self.chan_seen + pos + needle.len()].to_string();
                    self.chan_seen += pos + needle.len();
                    return Ok(text);
                }
            }
            if Instant::now() > deadline {
                let chan = self.chan.lock().unwrap();
                let out = self.out.lock().unwrap();
                bail!(
                    "timed out after {timeout:?} waiting for {needle:?} on the harness channel; channel tail:\n{}\nconsole tail:\n{}",
                    tail(&chan[self.chan_seen..]),
                    tail(&out)
                );
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!(
                    "the VM exited ({st}) while waiting for {needle:?}; console tail:\n{}",
                    tail(&self.out.lock().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `needle` appears in output not yet consumed; returns the text up to it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let out = self.out.lock().unwrap();
                if let Some(pos) = out[self.seen..].find(needle) {
                    let text = out[self.seen..self.seen + pos + needle.len()].to_string();
                    self.seen += pos + needle.len();
                    return Ok(text);
                }
            }
            if Instant::now() > deadline {
                let out = self.out.lock().unwrap();
                let tail = tail(&out[self.seen..]);
                bail!("timed out after {timeout:?} waiting for {needle:?}; console tail:\n{tail}");
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                let out = self.out.lock().unwrap();
                let tail = tail(&out);
                bail!("the VM exited ({st}) while waiting for {needle:?}; console tail:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn send(&mut self, line: &str) -> Result<()> {
        self.stdin.write_all(line.as_bytes())?;
        self.stdin.write_all(b"\r")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Logs in on the serial getty; retries while the boot stage may still be setting the
    /// password (getty can come up before it under systemd).
    pub fn login(&mut self, user: &str, password: &str) -> Result<()> {
        for attempt in 0..4 {
            self.wait_for(
                "login: ",
                Duration::from_secs(if attempt == 0 { 420 } else { 60 }),
            )?;
            self.send(user)?;
            self.wait_for("Password: ", Duration::from_secs(30))?;
            self.send(password)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let rest = self.out.lock().unwrap()[self.seen..].to_string();
                if rest.contains("Login incorrect") {
                    self.seen +=
                        rest.find("Login incorrect").unwrap_or(0) + "Login incorrect".len();
                    std::thread::sleep(Duration::from_secs(5));
                    break;
                }
                if let Some(p) = rest.find("$ ").or_else(|| rest.find("# ")) {
                    self.seen += p + 2;
                    self.use_chan = user == "root";
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!(
                        "no shell prompt after logging in as {user}; console tail:\n{}",
                        tail(&rest)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        bail!("could not log in as {user}: the password was refused 4 times")
    }

    /// Runs a shell command in a root session and returns its output, `…[exit N]`. The
    /// output goes to the second serial port, which nothing else writes: the console carries
    /// kernel and service messages that can land inside any output, so it is never parsed.
    /// A non-root session cannot write that port: give it commands with [`Vm::send`] and read
    /// what they leave as root.
    pub fn sh(&mut self, cmd: &str) -> Result<String> {
        if !self.use_chan {
            bail!(
                "Vm::sh needs a root session (the harness channel is root's); log in as root, or `send` the command and read its result as root"
            );
        }
        self.commands += 1;
        // A nonce per command: a marker can only match this command's own echo.
        let tag = format!(
            "K{}x{:x}",
            self.commands,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        self.send(&format!(
            "{{ echo {tag}-B; {cmd}; echo {tag}-E$?; }} >/dev/ttyS1 2>&1"
        ))?;
        self.wait_chan(&format!("{tag}-B"), Duration::from_secs(60))?;
        let text = self.wait_chan(&format!("{tag}-E"), Duration::from_secs(120))?;
        let status = self.wait_chan("\n", Duration::from_secs(10))?;
        let body = text.trim_end_matches(&format!("{tag}-E")).replace('\r', "");
        let body = body.strip_prefix('\n').unwrap_or(&body);
        Ok(format!("{body}[exit {}]", status.trim()))
    }

    /// Waits for the VM to stop by itself (reboot with -no-reboot, poweroff).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the VM did not stop within {timeout:?}; console tail:\n{}",
            tail(&self.out.lock().unwrap())
        )
    }

    /// Selects a boot entry (`kairos-agent bootentry --select ROLE`), reboots, and waits for
    /// the VM to stop (QEMU runs with -no-reboot): the next boot of the disk takes that entry.
    pub fn reboot_into(mut self, role: &str) -> Result<()> {
        let out = self.sh(&format!("kairos-agent bootentry --select {role}"))?;
        if !out.contains("[exit 0]") {
            bail!("selecting the {role} entry failed:\n{out}");
        }
        self.send("reboot")?;
        self.wait_exit(Duration::from_secs(120))
    }

    pub fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
