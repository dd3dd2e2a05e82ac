//! `kairosctl`: build Kairos disks from images and try them in a VM.

mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kairosctl",
    version,
    about = "Build Kairos artifacts from images and try them in a VM"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build an artifact from an image
    Build {
        #[command(subcommand)]
        kind: BuildKind,
    },
    /// Run virtual machines
    Vm {
        #[command(subcommand)]
        command: VmCmd,
    },
}

#[derive(Debug, Subcommand)]
enum BuildKind {
    /// An already-installed disk image (raw, or qcow2 by --output extension)
    Raw(RawArgs),
}

#[derive(Debug, clap::Args)]
struct RawArgs {
    /// The image: `dir:PATH` (a root tree with a kernel); registry and OCI sources come with kairosify
    #[arg(long)]
    image: String,
    /// The disk file to write (`.qcow2` converts with qemu-img)
    #[arg(long)]
    output: PathBuf,
    /// Cloud-config to put on OEM as 90_custom.yaml
    #[arg(long)]
    cloud_config: Option<PathBuf>,
    /// Disk size in MiB (default: just large enough; COS_PERSISTENT takes the rest)
    #[arg(long)]
    size: Option<u64>,
    /// The static kairos-immucore binary (default: next to kairosctl)
    #[arg(long, env = "KAIROS_IMMUCORE")]
    immucore: Option<PathBuf>,
    /// The static kairos-agent binary put in the image (default: next to kairosctl)
    #[arg(long, env = "KAIROS_AGENT")]
    agent: Option<PathBuf>,
    /// Kernel command line added to every boot entry
    #[arg(long, default_value = "console=tty1 console=ttyS0,115200")]
    cmdline: String,
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Boot a disk in QEMU (UEFI, virtio disk, user networking); serial console on stdio
    Run {
        disk: PathBuf,
        #[arg(long)]
        iso: Option<PathBuf>,
        /// Also write the serial console to this file
        #[arg(long)]
        serial_log: Option<PathBuf>,
        /// Memory in MiB
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Accelerator: tcg (default) or kvm
        #[arg(long, default_value = "tcg")]
        accel: String,
    },
}

/// A companion binary: the flag's path, else the file next to kairosctl.
fn companion(flag: Option<PathBuf>, name: &str) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if p.exists() {
        return Ok(p);
    }
    bail!(
        "{name} not found next to {}; pass its path (scripts/build-static builds it)",
        exe.display()
    )
}

fn build_raw(a: RawArgs) -> Result<()> {
    let Some(dir) = a.image.strip_prefix("dir:") else {
        bail!(
            "--image {}: only dir:PATH sources are supported by this build so far (OCI sources arrive with kairosify)",
            a.image
        );
    };
    let rootfs = Path::new(dir);
    if !rootfs.is_dir() {
        bail!("--image {}: {dir} is not a directory", a.image);
    }
    let immucore = companion(a.immucore, "kairos-immucore")?;
    let mut layers = vec![rootfs.to_path_buf()];
    let work = tempdir_near(&a.output)?;
    if !kairos_build::kairosify::is_kairosified(rootfs) {
        let bins = kairos_build::kairosify::Binaries {
            agent: companion(a.agent, "kairos-agent")?,
            immucore: immucore.clone(),
        };
        let layer = work.join("kairos-layer");
        std::fs::create_dir_all(&layer)?;
        let init = kairos_build::kairosify::kairos_layer(
            rootfs,
            &bins,
            env!("CARGO_PKG_VERSION"),
            &layer,
        )?;
        eprintln!("kairosctl: added the Kairos layer ({init:?} init)");
        layers.push(layer);
    }
    let qcow = a.output.extension().is_some_and(|e| e == "qcow2");
    let raw_out = if qcow {
        a.output.with_extension("raw.tmp")
    } else {
        a.output.clone()
    };
    eprintln!(
        "kairosctl: building {} from {}",
        a.output.display(),
        a.image
    );
    let report = kairos_build::disk::build_raw(&kairos_build::disk::RawSpec {
        layers,
        image_ref: a.image.clone(),
        immucore: &immucore,
        cloud_config: a.cloud_config.as_deref(),
        size_mib: a.size,
        output: &raw_out,
        cmdline: a.cmdline.clone(),
    })?;
    if qcow {
        let st = Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw_out)
            .arg(&a.output)
            .status()
            .context("running qemu-img (Debian package qemu-utils)")?;
        let _ = std::fs::remove_file(&raw_out);
        if !st.success() {
            bail!("qemu-img convert failed");
        }
    }
    for p in &report.parts {
        eprintln!(
            "  {:<11} {:<15} {:>6} MiB at {:>6} MiB",
            p.name, p.label, p.size_mib, p.start_mib
        );
    }
    eprintln!(
        "  deployment {} ({} layer, {} bytes)",
        report.deployment.id,
        report.deployment.layers.len(),
        report.layer_bytes
    );
    println!("{}", a.output.display());
    Ok(())
}

fn tempdir_near(output: &Path) -> Result<PathBuf> {
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let p = dir.join(format!(".kairosctl-{}", std::process::id()));
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}

fn run() -> Result<i32> {
    match Cli::parse().command {
        Cmd::Build {
            kind: BuildKind::Raw(a),
        } => build_raw(a).map(|_| 0),
        Cmd::Vm {
            command:
                VmCmd::Run {
                    disk,
                    iso,
                    serial_log,
                    memory,
                    accel,
                },
        } => {
            let vars =
                std::env::temp_dir().join(format!("kairos-vm-vars-{}.fd", std::process::id()));
            vm::prepare(&vars)?;
            let spec = vm::VmSpec {
                disk,
                iso,
                memory_mib: memory,
                vars: vars.clone(),
                serial_log,
                accel,
                serial_stdio: true,
            };
            let st = Command::new("qemu-system-x86_64")
                .args(vm::qemu_args(&spec))
                .status()
                .context("running qemu-system-x86_64")?;
            let _ = std::fs::remove_file(&vars);
            Ok(st.code().unwrap_or(1))
        }
    }
}

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("kairosctl: {e:#}");
            std::process::exit(3);
        }
    }
}
