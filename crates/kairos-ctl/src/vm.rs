//! `kairosctl vm run`: QEMU with OVMF, a virtio disk and user networking.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// OVMF with Secure Boot (needs SMM and a secure flash).
pub const OVMF_CODE_SECBOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
pub use kairos_sys::efi::OWNER_GUID;

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub disk: PathBuf,
    pub iso: Option<PathBuf>,
    pub memory_mib: u32,
    pub smp: u32,
    /// Where the writable copy of the UEFI variables lives.
    pub vars: PathBuf,
    pub serial_log: Option<PathBuf>,
    /// The guest's second serial port (ttyS1), written to this file.
    pub second_serial: Option<PathBuf>,
    /// `tcg` (default; guests under KVM hang on these machines) or `kvm`.
    pub accel: String,
    /// Serial console on stdio (interactive use and tests) instead of a log file only.
    pub serial_stdio: bool,
    /// Direct kernel boot: (kernel, initrd, cmdline), as netboot would load them.
    pub kernel: Option<(PathBuf, PathBuf, String)>,
    /// A second NIC: an Ethernet link to another VM over UDP on 127.0.0.1, as (this VM's
    /// port, the other's port); its MAC ends in the low byte of this VM's port.
    pub link: Option<(u16, u16)>,
    /// Secure Boot on (OVMF secboot, SMM); `vars` must hold the enrolled keys.
    pub secure_boot: bool,
    /// A TPM 2.0: the control socket of a running swtpm.
    pub tpm: Option<PathBuf>,
}

/// The QEMU command line (argv after the program name).
pub fn qemu_args(s: &VmSpec) -> Vec<String> {
    let code = if s.secure_boot {
        OVMF_CODE_SECBOOT
    } else {
        OVMF_CODE
    };
    let mut a: Vec<String> = vec![
        "-machine".into(),
        if s.secure_boot {
            "q35,smm=on".into()
        } else {
            "q35".into()
        },
        "-accel".into(),
        s.accel.clone(),
        "-cpu".into(),
        if s.accel == "kvm" {
            "host".into()
        } else {
            "max".into()
        },
        "-smp".into(),
        s.smp.to_string(),
        "-m".into(),
        s.memory_mib.to_string(),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=1,file={}", s.vars.display()),
        "-drive".into(),
        format!(
            "file={},if=none,id=disk0,format={}",
            s.disk.display(),
            if s.disk.extension().is_some_and(|e| e == "qcow2") {
                "qcow2"
            } else {
                "raw"
            }
        ),
        // The disk first (after a -kernel, which QEMU gives index 0): once installed it boots
        // even with the ISO still inserted.
        "-device".into(),
        "virtio-blk-pci,drive=disk0,bootindex=1".into(),
        "-netdev".into(),
        "user,id=n0".into(),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
    ];
    if s.secure_boot {
        a.extend([
            "-global".into(),
            "driver=cfi.pflash01,property=secure,value=on".into(),
        ]);
    }
    if let Some(sock) = &s.tpm {
        a.extend([
            "-chardev".into(),
            format!("socket,id=chrtpm,path={}", sock.display()),
            "-tpmdev".into(),
            "emulator,id=tpm0,chardev=chrtpm".into(),
            "-device".into(),
            "tpm-crb,tpmdev=tpm0".into(),
        ]);
    }
    if let Some((mine, theirs)) = s.link {
        a.extend([
            "-netdev".into(),
            format!("socket,id=n1,udp=127.0.0.1:{theirs},localaddr=127.0.0.1:{mine}"),
            "-device".into(),
            format!(
                "virtio-net-pci,netdev=n1,mac=52:54:00:4b:{:02x}:{:02x}",
                mine >> 8,
                mine & 0xff
            ),
        ]);
    }
    if let Some(iso) = &s.iso {
        // virtio-scsi: distribution cloud kernels often lack AHCI, never virtio.
        a.extend([
            "-device".into(),
            "virtio-scsi-pci,id=scsi0".into(),
            "-drive".into(),
            format!(
                "file={},if=none,id=cd0,media=cdrom,readonly=on",
                iso.display()
            ),
            "-device".into(),
            "scsi-cd,bus=scsi0.0,drive=cd0,bootindex=2".into(),
        ]);
    }
    if let Some((k, i, append)) = &s.kernel {
        a.extend([
            "-kernel".into(),
            k.display().to_string(),
            "-initrd".into(),
            i.display().to_string(),
            "-append".into(),
            append.clone(),
        ]);
    }
    match (&s.serial_log, s.serial_stdio) {
        (Some(log), true) => {
            a.extend([
                "-chardev".into(),
                format!("stdio,id=s0,logfile={},signal=off", log.display()),
            ]);
            a.extend(["-serial".into(), "chardev:s0".into()]);
        }
        (Some(log), false) => a.extend(["-serial".into(), format!("file:{}", log.display())]),
        (None, _) => a.extend(["-serial".into(), "stdio".into()]),
    }
    if let Some(p) = &s.second_serial {
        a.extend(["-serial".into(), format!("file:{}", p.display())]);
    }
    a.extend(["-monitor".into(), "none".into()]);
    a
}

/// Whether KVM can run guests here: OVMF booted under KVM must reach its boot manager
/// ("BdsDxe" on the serial console) within 10 s. On some hosts /dev/kvm exists but guests fail
/// at once or hang, so its presence proves nothing. The verdict is cached per boot of the host.
pub fn kvm_works() -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = std::env::temp_dir().join("kairos-kvm-probe");
    if let Some(v) = std::fs::read_to_string(&cache)
        .ok()
        .and_then(|t| t.strip_prefix(boot_id.trim()).map(|v| v.trim() == "kvm"))
    {
        return v;
    }
    let verdict = probe_kvm();
    let _ = std::fs::write(
        &cache,
        format!(
            "{} {}\n",
            boot_id.trim(),
            if verdict { "kvm" } else { "tcg" }
        ),
    );
    verdict
}

fn probe_kvm() -> bool {
    use std::io::Read;
    let vars = std::env::temp_dir().join(format!("kairos-kvm-probe-{}.fd", std::process::id()));
    if std::fs::copy(OVMF_VARS, &vars).is_err() {
        return false;
    }
    let child = std::process::Command::new("qemu-system-x86_64")
        .args([
            "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "128",
        ])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        let _ = std::fs::remove_file(&vars);
        return false;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(mut out) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(6).any(|w| w == b"BdsDxe") {
                    let _ = tx.send(());
                    break;
                }
            }
        });
    }
    let ok = rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&vars);
    ok
}

/// Checks QEMU and OVMF are installed and creates the writable UEFI variables if missing.
pub fn prepare(vars: &Path) -> Result<()> {
    if !Path::new(OVMF_CODE).exists() {
        bail!("missing {OVMF_CODE}: install the Debian package ovmf");
    }
    let found = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| Path::new(d).join("qemu-system-x86_64").exists());
    if !found {
        bail!("missing qemu-system-x86_64: install the Debian package qemu-system-x86");
    }
    if !vars.exists() {
        std::fs::copy(OVMF_VARS, vars)
            .with_context(|| format!("copying {OVMF_VARS} to {}", vars.display()))?;
    }
    Ok(())
}

/// UEFI variables with the owner's PK, KEK and db enrolled and Secure Boot on (user mode),
/// made once from OVMF's empty store by virt-fw-vars (PyPI `virt-firmware`; Debian 12 has no
/// package of it).
pub fn enrolled_vars(keys: &Path, vars: &Path) -> Result<()> {
    // Which certificates the store holds is kept beside it: other keys make a new store
    // (the old one would go on trusting the old keys without a word).
    let mut certs = String::new();
    for k in ["PK.pem", "KEK.pem", "db.pem"] {
        let text = std::fs::read_to_string(keys.join(k)).with_context(|| {
            format!(
                "{} is missing: --secure-boot takes a key directory made by `kairosctl keys generate`",
                keys.join(k).display()
            )
        })?;
        certs.push_str(&text);
    }
    let stamp = vars.with_extension("keys");
    let want = format!("{}\n", kairos_layers::sha256_hex(certs.as_bytes()));
    if vars.exists() {
        if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
            return Ok(());
        }
        eprintln!(
            "kairosctl: {} holds other keys than {}: enrolling these in a new variable store",
            vars.display(),
            keys.display()
        );
    }
    let tmp = vars.with_extension("tmp");
    let pem = |k: &str| keys.join(k).to_string_lossy().into_owned();
    kairos_sys::exec::Cmd::new("python3")
        .args(["-m", "virt.firmware.vars", "-i", OVMF_VARS, "-o"])
        .arg(&tmp)
        .args(["--set-pk", OWNER_GUID, &pem("PK.pem")])
        .args(["--add-kek", OWNER_GUID, &pem("KEK.pem")])
        .args(["--add-db", OWNER_GUID, &pem("db.pem")])
        .arg("--sb")
        .run()
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow::anyhow!(
                "enrolling {} into UEFI variables: {e} (virt-fw-vars comes from PyPI: python3 -m pip install virt-firmware; scripts/setup does)",
                keys.display()
            )
        })?;
    std::fs::rename(&tmp, vars).with_context(|| format!("renaming into {}", vars.display()))?;
    std::fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))
}

/// Starts a software TPM 2.0 (swtpm) whose state lives in `dir` (kept across boots, like a
/// machine's TPM); it stops when QEMU disconnects. Returns its control socket.
pub fn start_swtpm(dir: &Path) -> Result<PathBuf> {
    kairos_sys::exec::require(&["swtpm"])?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Absolute: swtpm --daemon changes to /.
    let dir = &std::fs::canonicalize(dir)?;
    let sock = dir.join("swtpm.sock");
    let _ = std::fs::remove_file(&sock);
    kairos_sys::exec::Cmd::new("swtpm")
        .args(["socket", "--tpm2", "--terminate", "--daemon"])
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.display()))
        .arg("--ctrl")
        .arg(format!("type=unixio,path={}", sock.display()))
        .arg("--log")
        .arg(format!("file={}", dir.join("swtpm.log").display()))
        .run()
        .context("starting swtpm (Debian package swtpm)")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        if std::time::Instant::now() > deadline {
            bail!("swtpm did not create {} within 10 s", sock.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let s = VmSpec {
            disk: "/d/disk.qcow2".into(),
            iso: Some("/d/k.iso".into()),
            memory_mib: 1024,
            smp: 2,
            vars: "/d/vars.fd".into(),
            serial_log: Some("/d/serial.log".into()),
            second_serial: Some("/d/harness.log".into()),
            accel: "tcg".into(),
            serial_stdio: false,
            kernel: Some(("/d/vmlinuz".into(), "/d/initrd".into(), "a=b".into())),
            link: Some((0x1f0a, 0x1f0b)),
            secure_boot: false,
            tpm: None,
        };
        let a = qemu_args(&s).join(" ");
        assert!(a.contains("-accel tcg -cpu max"), "{a}");
        assert!(
            a.contains("file=/d/disk.qcow2,if=none,id=disk0,format=qcow2"),
            "{a}"
        );
        assert!(a.contains("virtio-blk-pci,drive=disk0,bootindex=1"), "{a}");
        assert!(
            a.contains("file=/d/k.iso,if=none,id=cd0,media=cdrom"),
            "{a}"
        );
        assert!(
            a.contains("scsi-cd,bus=scsi0.0,drive=cd0,bootindex=2"),
            "{a}"
        );
        assert!(a.contains("-serial file:/d/serial.log"), "{a}");
        assert!(
            a.ends_with("-serial file:/d/harness.log -monitor none")
                || a.contains("-serial file:/d/serial.log -serial file:/d/harness.log"),
            "the second serial port comes after the console: {a}"
        );
        assert!(a.contains("unit=1,file=/d/vars.fd"), "{a}");
        assert!(
            a.contains("-netdev socket,id=n1,udp=127.0.0.1:7947,localaddr=127.0.0.1:7946 -device virtio-net-pci,netdev=n1,mac=52:54:00:4b:1f:0a"),
            "{a}"
        );
        assert!(
            a.contains("-kernel /d/vmlinuz -initrd /d/initrd -append a=b"),
            "{a}"
        );
        assert!(!a.contains("secboot") && !a.contains("tpm"), "{a}");
        let a = qemu_args(&VmSpec {
            secure_boot: true,
            tpm: Some("/d/tpm/swtpm.sock".into()),
            ..s
        })
        .join(" ");
        assert!(a.starts_with("-machine q35,smm=on"), "{a}");
        assert!(a.contains(&format!("file={OVMF_CODE_SECBOOT}")), "{a}");
        assert!(
            a.contains("-global driver=cfi.pflash01,property=secure,value=on"),
            "{a}"
        );
        assert!(
            a.contains("-chardev socket,id=chrtpm,path=/d/tpm/swtpm.sock -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0"),
            "{a}"
        );
    }
}
