//! `kairosctl`: build Kairos disks from images and try them in a VM.

mod qr;
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
    /// Work with OCI images
    Image {
        #[command(subcommand)]
        command: ImageCmd,
    },
    /// Make a distribution image bootable as Kairos: SRC plus one layer with kairos-agent,
    /// kairos-immucore, /boot/initrd from the image's own modules, init hooks, default configs
    Kairosify {
        /// Source image (REGISTRY/NAME:TAG, oci-layout:DIR[:TAG], ocifile:TAR)
        src: String,
        /// Destination image (same syntax)
        dest: String,
        #[arg(long, env = "KAIROS_IMMUCORE")]
        immucore: Option<PathBuf>,
        #[arg(long, env = "KAIROS_AGENT")]
        agent: Option<PathBuf>,
        /// A k3s binary to carry in the image (/usr/bin/k3s, with the k3s and k3s-agent
        /// units); the config's `k3s:` or `k3s-agent:` block then starts it
        #[arg(long, value_name = "PATH")]
        k3s: Option<PathBuf>,
        /// A k0s binary to carry in the image (/usr/bin/k0s, with its controller and worker
        /// units); the config's `k0s:` or `k0s-worker:` block then starts it
        #[arg(long, value_name = "PATH")]
        k0s: Option<PathBuf>,
    },
    /// Print a new P2P network token for `p2p.network_token` (EdgeVPN's format: base64 of a
    /// YAML document with the keys of the rotating secrets, room, rendezvous and mDNS name)
    GenerateToken {
        /// Seconds between rotations of the derived keys and topics
        #[arg(long, default_value_t = kairos_mesh::token::DEFAULT_INTERVAL)]
        interval: u64,
    },
    /// Check a network token and show what it derives now or at `--at` (never its keys).
    /// Exit 0 for a valid token, 1 for a malformed one
    Token {
        /// The token, or `-` to read it from stdin
        token: String,
        /// Unix time to derive at (default: now)
        #[arg(long)]
        at: Option<u64>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Join a node network's mesh from this workstation as a VPN peer (10.1.0.254/24 on
    /// kairos0 by default; needs root for the TUN device), so the cluster's API at the
    /// master's mesh address answers here; `--kubeconfig FILE` writes the cluster's
    /// kubeconfig. Runs until stopped
    Bridge(kairos_agent::bridge::BridgeArgs),
    /// The cluster's roles, through a running `kairosctl bridge`: `role list`, `role set UUID
    /// ROLE` (a role set by hand wins over the election)
    Role {
        #[command(subcommand)]
        command: RoleCmd,
    },
    /// Print the cluster's kubeconfig (server: the master's mesh address), through a running
    /// `kairosctl bridge`
    GetKubeconfig {
        /// The bridge's status socket
        #[arg(long, value_name = "PATH", default_value = kairos_agent::bridge::BRIDGE_SOCKET)]
        socket: PathBuf,
        /// The coordination bucket (`p2p.network_id`)
        #[arg(long, default_value = "kairos")]
        network_id: String,
    },
    /// The running bridge's view of the mesh and the cluster: peers, its VPN address,
    /// nodes and roles, the API address, the kubeconfig (exit 1 when no bridge answers)
    Status {
        /// Print the status document as JSON
        #[arg(long)]
        json: bool,
        /// The bridge's status socket
        #[arg(long, value_name = "PATH", default_value = kairos_agent::bridge::BRIDGE_SOCKET)]
        socket: PathBuf,
    },
    /// Trusted-boot keys
    Keys {
        #[command(subcommand)]
        command: KeysCmd,
    },
    /// Send a cloud-config to a node showing a pairing QR code (`kairos-agent install
    /// --pair` or `kairos-agent pair` on its console), over an ephemeral mesh on the LAN
    Register {
        /// The token printed under the node's QR code (`-` reads it from stdin); or use
        /// --qr-code-image
        #[arg(required_unless_present = "qr_code_image")]
        token: Option<String>,
        /// A PNG picture of the node's QR code (a screenshot of its console)
        #[arg(long, value_name = "PNG", conflicts_with = "token")]
        qr_code_image: Option<PathBuf>,
        /// The cloud-config for the node
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The disk to install to (else the config's install.device)
        #[arg(long)]
        device: Option<String>,
        /// Reboot the node when installed
        #[arg(long)]
        reboot: bool,
        /// Power the node off when installed
        #[arg(long)]
        poweroff: bool,
        /// Give up after this many seconds
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The node's mesh address (`/ip4/…/tcp/…/p2p/<id>`) where mDNS does not reach it
        #[arg(long = "bootstrap-peer", value_name = "MULTIADDR")]
        bootstrap_peers: Vec<String>,
    },
    /// Check an image against the Kairos image contract: kernel and matching modules, an
    /// init, /etc/os-release, x86-64 executables, static kairos binaries, the size budget.
    /// Each finding says what to add. Exit 0 when clean, 1 when something is missing
    Lint {
        /// The image (REGISTRY/NAME:TAG, oci-layout:DIR[:TAG], ocifile:TAR, dir:PATH)
        image: String,
        /// One JSON object per finding, on stdout
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Make the owner's keys in DIR: PK, KEK and db (RSA 2048 X.509: .key, .pem, .der) for
    /// Secure Boot, and tpm2-pcr-private.pem that signs the PCR policy. Never overwrites
    Generate {
        dir: PathBuf,
        /// The name in the certificates (CN "<NAME> PK", …)
        #[arg(long, default_value = "Kairos")]
        name: String,
        /// Validity of the certificates
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
enum RoleCmd {
    /// List the nodes: uuid, role, mesh address, last advert
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// The bridge's status socket
        #[arg(long, value_name = "PATH", default_value = kairos_agent::bridge::BRIDGE_SOCKET)]
        socket: PathBuf,
        /// The coordination bucket (`p2p.network_id`)
        #[arg(long, default_value = "kairos")]
        network_id: String,
    },
    /// Set a node's role by hand: master, master/clusterinit, master/ha or worker
    Set {
        /// The node's uuid (`kairosctl role list`)
        uuid: String,
        role: String,
        /// The bridge's status socket
        #[arg(long, value_name = "PATH", default_value = kairos_agent::bridge::BRIDGE_SOCKET)]
        socket: PathBuf,
        /// The coordination bucket (`p2p.network_id`)
        #[arg(long, default_value = "kairos")]
        network_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Make an OCI image from a root filesystem tree (e.g. made by debootstrap) or a rootfs tar
    Import {
        /// A directory, or a tar of a root filesystem
        src: PathBuf,
        /// Destination image (REGISTRY/NAME:TAG, oci-layout:DIR[:TAG], ocifile:TAR)
        dest: String,
        /// Top-level paths that get layers of their own, comma-separated (e.g. usr,lib)
        #[arg(long, value_delimiter = ',')]
        split: Vec<String>,
    },
    /// Add a layer made from a directory on top of an image (your files over a base image)
    Append {
        /// The base image (REGISTRY/NAME:TAG, oci-layout:DIR[:TAG], ocifile:TAR)
        src: String,
        /// A directory whose contents become the new top layer, as paths from /
        dir: PathBuf,
        /// Destination image (same syntax)
        dest: String,
    },
}

#[derive(Debug, Subcommand)]
enum BuildKind {
    /// An already-installed disk image (raw, or qcow2 by --output extension)
    Raw(RawArgs),
    /// A hybrid UEFI install ISO (label COS_LIVE): boots live, `kairos-agent install` copies
    /// its layers to a disk without network
    Iso(IsoArgs),
    /// Netboot artifacts in a directory: vmlinuz, an initrd carrying the layers (boots live
    /// from RAM) and netboot.ipxe
    Netboot(IsoArgs),
    /// A signed unified kernel image (UKI) on systemd-stub: kernel, initrd, command line and
    /// os-release inside one PE signed with the db key, with PCR 11 predicted for every boot
    /// phase and the policy signed with the PCR key (.pcrpkey, .pcrsig)
    Uki(UkiArgs),
}

#[derive(Debug, clap::Args)]
struct UkiArgs {
    /// The image whose deployment the UKI boots (as for `build raw`): its kernel and
    /// initrd, and a cmdline that names the deployment and pins the dm-verity root hash of
    /// every layer image. Give this UKI to `kairos-agent upgrade --uki` on the nodes.
    #[arg(long, conflicts_with_all = ["kernel", "initrd"], required_unless_present = "kernel")]
    image: Option<String>,
    /// The kernel (bzImage), for a UKI not tied to an image
    #[arg(long, requires = "initrd")]
    kernel: Option<PathBuf>,
    /// The initrd
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The kernel command line (signed into the UKI; loader-entry options are not used).
    /// `rd.kairos.verity=lazy`: layer blocks are checked as they are read, not all at boot
    #[arg(long, default_value = "console=tty1 console=ttyS0,115200")]
    cmdline: String,
    /// The static kairos-immucore binary, for --image (default: next to kairosctl)
    #[arg(long, env = "KAIROS_IMMUCORE")]
    immucore: Option<PathBuf>,
    /// An os-release file for .osrel (default: Kairos' own)
    #[arg(long)]
    osrel: Option<PathBuf>,
    /// The key directory (`kairosctl keys generate`)
    #[arg(long)]
    keys: PathBuf,
    /// systemd-stub (systemd 252 or later)
    #[arg(long, default_value = kairos_build::uki::STUB)]
    stub: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// Print what was built (size, PCR 11 per phase, findings) as JSON
    #[arg(long)]
    json: bool,
}

/// What every artifact is built from.
#[derive(Debug, clap::Args)]
struct ImageArgs {
    /// The image: REGISTRY/NAME:TAG, oci-layout:DIR[:TAG], ocifile:TAR (kairosified), or dir:PATH (a root tree with a kernel; the Kairos layer is added)
    #[arg(long)]
    image: String,
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

#[derive(Debug, clap::Args)]
struct RawArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// The disk file to write (`.qcow2` converts with qemu-img)
    #[arg(long)]
    output: PathBuf,
    /// Cloud-config to put on OEM as 90_custom.yaml
    #[arg(long)]
    cloud_config: Option<PathBuf>,
    /// Disk size in MiB (default: just large enough; COS_PERSISTENT takes the rest)
    #[arg(long)]
    size: Option<u64>,
    #[command(flatten)]
    trust: TrustArgs,
}

/// Trusted boot for `build raw` and `build iso`.
#[derive(Debug, clap::Args)]
struct TrustArgs {
    /// Trusted boot: systemd-boot and a UKI signed with the db key of --keys, the UKI's
    /// cmdline pinning every layer image; boots only under Secure Boot with those keys
    #[arg(long, requires = "keys")]
    trusted: bool,
    /// The key directory (`kairosctl keys generate`) for --trusted
    #[arg(long, requires = "trusted")]
    keys: Option<PathBuf>,
    /// systemd-stub for --trusted (systemd 252 or later)
    #[arg(long, default_value = kairos_build::uki::STUB)]
    stub: PathBuf,
}

impl TrustArgs {
    fn trust(&self) -> Option<kairos_build::os::Trust> {
        self.keys.clone().map(|keys| kairos_build::os::Trust {
            keys,
            stub: self.stub.clone(),
        })
    }
}

#[derive(Debug, clap::Args)]
struct IsoArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// The ISO file to write
    #[arg(long)]
    output: PathBuf,
    /// Cloud-config embedded in the ISO (e.g. with `install: {auto: true, device: auto}`)
    #[arg(long)]
    cloud_config: Option<PathBuf>,
    /// (`build iso` only: the installed disk boots the same signed UKI)
    #[command(flatten)]
    trust: TrustArgs,
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
        /// A second serial port (the guest's /dev/ttyS1) written to this file: a channel of
        /// its own for whatever drives the VM (test harnesses send command output there, so
        /// nothing else the node prints on its console can mix in)
        #[arg(long)]
        second_serial: Option<PathBuf>,
        /// Memory in MiB
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Virtual CPUs
        #[arg(long, default_value_t = 2)]
        smp: u32,
        /// Boot this kernel directly (netboot artifacts), with --initrd and --append
        #[arg(long, requires = "initrd")]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line for --kernel
        #[arg(long, default_value = "")]
        append: String,
        /// Accelerator: auto (KVM if a probe boot under KVM succeeds, else TCG), tcg or kvm
        #[arg(long, default_value = "auto", value_parser = ["auto", "tcg", "kvm"])]
        accel: String,
        /// A second NIC linked to another VM (Ethernet over UDP on 127.0.0.1): this VM's port
        /// and the other's, `MINE:THEIRS` (the other VM runs with `THEIRS:MINE`)
        #[arg(long, value_name = "MINE:THEIRS", value_parser = parse_link)]
        link: Option<(u16, u16)>,
        /// Secure Boot with the owner's keys (a `kairosctl keys generate` directory)
        /// enrolled: the UEFI variables then live in DISK.sb-vars.fd
        #[arg(long, value_name = "KEYS")]
        secure_boot: Option<PathBuf>,
        /// A TPM 2.0 (swtpm) whose state lives in DISK.tpm/, kept across boots
        #[arg(long)]
        tpm: bool,
    },
}

fn parse_link(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected MINE:THEIRS, two UDP ports"))?;
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a UDP port"))
    };
    Ok((port(a)?, port(b)?))
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

fn cache() -> PathBuf {
    PathBuf::from(std::env::var("KAIROS_CACHE").unwrap_or_else(|_| "/var/cache/kairos-rs".into()))
        .join("oci")
}

/// Prints one line per blob as it completes.
/// Transfer progress: a bar per blob on a terminal, a line per blob otherwise (logs, CI).
fn progress_printer(verb: &'static str) -> impl FnMut(&str, u64, u64) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let mut bar: Option<indicatif::ProgressBar> = None;
    move |digest: &str, done: u64, total: u64| {
        let name = &digest[..digest.len().min(19)];
        if tty {
            if digest != last {
                let pb = indicatif::ProgressBar::new(total);
                pb.set_style(
                    indicatif::ProgressStyle::with_template(
                        "  {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                pb.set_message(format!("{verb} {name}"));
                bar = Some(pb);
                last = digest.to_string();
            }
            if let Some(pb) = &bar {
                pb.set_position(done);
                if done >= total {
                    pb.finish();
                }
            }
        } else if done >= total && digest != last {
            eprintln!("  {verb} {name} ({:.1} MiB)", total as f64 / 1048576.0);
            last = digest.to_string();
        }
    }
}

fn fetch(r: &str) -> Result<kairos_oci::LocalImage> {
    let r = kairos_oci::ImageRef::parse(r)?;
    eprintln!("kairosctl: reading {r}");
    Ok(kairos_oci::fetch(
        &r,
        &cache(),
        &mut progress_printer("have"),
    )?)
}

fn store(img: &kairos_oci::LocalImage, dest: &str) -> Result<()> {
    let r = kairos_oci::ImageRef::parse(dest)?;
    kairos_oci::store_to(img, &r, &cache(), &mut progress_printer("wrote"))?;
    eprintln!("kairosctl: wrote {r} ({})", img.manifest_digest);
    Ok(())
}

fn image_import(src: &Path, dest: &str, split: &[String]) -> Result<()> {
    let blobs = cache().join("blobs");
    let work = kairos_build::WorkDir::new(&cache(), "kairosctl")?;
    let tree = if src.is_dir() {
        src.to_path_buf()
    } else {
        let t = work.path().join("rootfs");
        std::fs::create_dir_all(&t)?;
        kairos_sys::exec::Cmd::new("tar")
            .args(["-xpf"])
            .arg(src)
            .arg("-C")
            .arg(&t)
            .arg("--numeric-owner")
            .run()
            .with_context(|| format!("{}: not a readable rootfs tar", src.display()))?;
        t
    };
    let img = kairos_oci::import_dir(&tree, &blobs, split);
    store(&img?, dest)
}

fn lint(image: &str, json: bool) -> Result<i32> {
    let work = kairos_build::WorkDir::new(&cache(), "kairosctl")?;
    let tree = if let Some(dir) = image.strip_prefix("dir:") {
        PathBuf::from(dir)
    } else {
        let img = fetch(image)?;
        kairos_build::image::unpack(&img, work.path())?.merged
    };
    let found = kairos_build::lint::lint(&tree)?;
    for f in &found {
        if json {
            println!(
                "{}",
                serde_json::json!({"level": if f.error { "error" } else { "warning" }, "message": f.what})
            );
        } else {
            println!("{}: {}", if f.error { "error" } else { "warning" }, f.what);
        }
    }
    let errors = found.iter().filter(|f| f.error).count();
    if !json {
        if errors == 0 {
            eprintln!("kairosctl lint: {image} meets the Kairos image contract");
        } else {
            eprintln!("kairosctl lint: {image}: {errors} problem(s)");
        }
    }
    Ok(if errors == 0 { 0 } else { 1 })
}

fn kairosify(
    src: &str,
    dest: &str,
    immucore: Option<PathBuf>,
    agent: Option<PathBuf>,
    kubernetes: [Option<PathBuf>; 2],
) -> Result<()> {
    let img = fetch(src)?;
    let [k3s, k0s] = kubernetes;
    let bins = kairos_build::kairosify::Binaries {
        agent: companion(agent, "kairos-agent")?,
        immucore: companion(immucore, "kairos-immucore")?,
        k3s,
        k0s,
    };
    let work = kairos_build::WorkDir::new(&cache(), "kairosctl")?;
    let out = kairos_build::image::kairosify(
        &img,
        &cache().join("blobs"),
        &bins,
        env!("CARGO_PKG_VERSION"),
        work.path(),
    );
    store(&out?, dest)
}

/// The image's layers, unpacked under `work`, with the Kairos layer added to `dir:` trees.
fn os_spec<'a>(
    a: &ImageArgs,
    immucore: &'a Path,
    work: &Path,
) -> Result<kairos_build::os::OsSpec<'a>> {
    // Checked first: it costs nothing, unpacking the image does.
    kairos_build::lint::check_companion(immucore, "kairos-immucore")?;
    let (mut layers, boot_tree, manifest_digest, diff_ids) =
        if let Some(dir) = a.image.strip_prefix("dir:") {
            let rootfs = PathBuf::from(dir);
            if !rootfs.is_dir() {
                bail!("--image {}: {dir} is not a directory", a.image);
            }
            (vec![rootfs.clone()], rootfs, None, None)
        } else {
            let img = fetch(&a.image)?;
            let un = kairos_build::image::unpack(&img, work)?;
            (
                un.layers,
                un.merged,
                Some(img.manifest_digest.to_string()),
                Some(img.diff_ids()?),
            )
        };
    if !kairos_build::kairosify::is_kairosified(&boot_tree) {
        if manifest_digest.is_some() {
            bail!(
                "--image {} is not kairosified: run `kairosctl kairosify {} <dest>` first, then build from <dest>",
                a.image,
                a.image
            );
        }
        let bins = kairos_build::kairosify::Binaries {
            agent: companion(a.agent.clone(), "kairos-agent")?,
            immucore: immucore.to_path_buf(),
            k3s: None,
            k0s: None,
        };
        let layer = work.join("kairos-layer");
        std::fs::create_dir_all(&layer)?;
        let init = kairos_build::kairosify::kairos_layer(
            &boot_tree,
            &bins,
            env!("CARGO_PKG_VERSION"),
            &layer,
        )?;
        eprintln!("kairosctl: added the Kairos layer ({init:?} init)");
        layers.push(layer);
    } else {
        // A kairosified image: its own binaries must be static x86-64, its kernel present.
        kairos_build::lint::require_clean(&boot_tree)?;
    }
    Ok(kairos_build::os::OsSpec {
        layers,
        boot_tree,
        manifest_digest,
        diff_ids,
        image_ref: a.image.clone(),
        immucore,
        cmdline: a.cmdline.clone(),
    })
}

fn build_iso(a: IsoArgs) -> Result<()> {
    let immucore = companion(a.image.immucore.clone(), "kairos-immucore")?;
    let work = kairos_build::WorkDir::beside(&a.output, "kairosctl")?;
    let os = os_spec(&a.image, &immucore, work.path())?;
    eprintln!(
        "kairosctl: building {} from {}",
        a.output.display(),
        a.image.image
    );
    let built = kairos_build::iso::build_iso(&kairos_build::iso::IsoSpec {
        os,
        cloud_config: a.cloud_config.as_deref(),
        output: &a.output,
        trust: a.trust.trust(),
    })?;
    eprintln!(
        "  deployment {} ({} layers, {} bytes), {} bytes in all",
        built.dep.id,
        built.dep.layers.len(),
        built.layer_bytes,
        std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0)
    );
    println!("{}", a.output.display());
    Ok(())
}

fn build_netboot(a: IsoArgs) -> Result<()> {
    if a.trust.trusted {
        bail!(
            "build netboot has no trusted flavour: netboot hands the kernel and initrd over unsigned; use build iso --trusted or build raw --trusted"
        );
    }
    let immucore = companion(a.image.immucore.clone(), "kairos-immucore")?;
    std::fs::create_dir_all(&a.output)?;
    let work = kairos_build::WorkDir::new(&a.output, "kairosctl")?;
    let os = os_spec(&a.image, &immucore, work.path())?;
    let built = kairos_build::netboot::build_netboot(&kairos_build::netboot::NetbootSpec {
        os,
        cloud_config: a.cloud_config.as_deref(),
        output: &a.output,
    })?;
    eprintln!(
        "  deployment {} ({} layers): {}/{{vmlinuz,initrd,netboot.ipxe}}",
        built.dep.id,
        built.dep.layers.len(),
        a.output.display()
    );
    println!("{}", a.output.join("netboot.ipxe").display());
    Ok(())
}

fn build_raw(a: RawArgs) -> Result<()> {
    let immucore = companion(a.image.immucore.clone(), "kairos-immucore")?;
    let work = kairos_build::WorkDir::beside(&a.output, "kairosctl")?;
    build_raw_in(a, &immucore, work.path())
}

fn build_raw_in(a: RawArgs, immucore: &Path, work: &Path) -> Result<()> {
    let os = os_spec(&a.image, immucore, work)?;
    let qcow = a.output.extension().is_some_and(|e| e == "qcow2");
    let raw_out = if qcow {
        a.output.with_extension("raw.tmp")
    } else {
        a.output.clone()
    };
    eprintln!(
        "kairosctl: building {} from {}",
        a.output.display(),
        a.image.image
    );
    let report = kairos_build::disk::build_raw(&kairos_build::disk::RawSpec {
        os,
        cloud_config: a.cloud_config.as_deref(),
        size_mib: a.size,
        output: &raw_out,
        trust: a.trust.trust(),
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
    if let Some(u) = &report.uki {
        eprintln!(
            "  signed UKI {} ({} bytes)",
            kairos_build::os::esp_uki_path(&report.deployment.id),
            u.size
        );
        for (phase, v) in &u.pcr11 {
            eprintln!("  PCR 11 at {phase}: {v}");
        }
    }
    println!("{}", a.output.display());
    Ok(())
}

/// Kairos' os-release for a UKI built without one.
const UKI_OSREL: &str = "NAME=\"Kairos\"\nID=kairos\nPRETTY_NAME=\"Kairos (trusted boot)\"\n";

fn build_uki(a: UkiArgs) -> Result<()> {
    let osrel = match &a.osrel {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    // With --image: the deployment's store is made in a work dir beside the output, exactly
    // as `build raw` and a node's upgrade make it, for its kernel, initrd and layer hashes.
    let work = kairos_build::WorkDir::beside(&a.output, "kairosctl-uki")?;
    let (kernel, initrd, cmdline, osrel, dep) = match (&a.image, a.kernel, a.initrd) {
        (Some(image), _, _) => {
            let immucore = companion(a.immucore.clone(), "kairos-immucore")?;
            let args = ImageArgs {
                image: image.clone(),
                immucore: Some(immucore.clone()),
                agent: None,
                cmdline: a.cmdline.clone(),
            };
            let spec = os_spec(&args, &immucore, work.path())?;
            let os = kairos_build::os::build_store(&spec, &work.path().join("store"), work.path())?;
            let cmdline = kairos_build::os::trusted_cmdline(&os.dep);
            let osrel = osrel.unwrap_or_else(|| kairos_build::os::uki_osrel(&os.dep));
            (os.kernel, os.initrd, cmdline, osrel, Some(os.dep))
        }
        (None, Some(k), Some(i)) => (
            k,
            i,
            a.cmdline.clone(),
            osrel.unwrap_or_else(|| UKI_OSREL.to_string()),
            None,
        ),
        _ => bail!("give --image REF, or --kernel and --initrd"),
    };
    let input = kairos_build::uki::UkiInput {
        kernel,
        initrd,
        cmdline,
        osrel,
        keys: a.keys,
        stub: a.stub,
    };
    let r = kairos_build::uki::build_uki(&input, &a.output)?;
    drop(work);
    if let Some(d) = &dep {
        eprintln!(
            "  deployment {} of {} ({} layers pinned)",
            d.id,
            d.image,
            d.layers.len()
        );
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    for f in &r.stub_findings {
        eprintln!("note: in the stub itself (not what we added): {f}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} ({} bytes, signed with the db key)",
            r.output.display(),
            r.size
        );
        for (phase, v) in &r.pcr11 {
            println!("  PCR 11 at {phase}: {v}");
        }
    }
    Ok(())
}

fn run() -> Result<i32> {
    match Cli::parse().command {
        Cmd::Build {
            kind: BuildKind::Raw(a),
        } => build_raw(a).map(|_| 0),
        Cmd::Build {
            kind: BuildKind::Iso(a),
        } => build_iso(a).map(|_| 0),
        Cmd::Build {
            kind: BuildKind::Netboot(a),
        } => build_netboot(a).map(|_| 0),
        Cmd::Build {
            kind: BuildKind::Uki(a),
        } => build_uki(a).map(|_| 0),
        Cmd::Image {
            command: ImageCmd::Import { src, dest, split },
        } => image_import(&src, &dest, &split).map(|_| 0),
        Cmd::Image {
            command: ImageCmd::Append { src, dir, dest },
        } => {
            if !dir.is_dir() {
                bail!("{}: not a directory", dir.display());
            }
            let img = fetch(&src)?;
            let out = kairos_oci::append_layer(
                &img,
                &dir,
                &cache().join("blobs"),
                &format!("kairosctl image append {}", dir.display()),
            )?;
            store(&out, &dest).map(|_| 0)
        }
        Cmd::Kairosify {
            src,
            dest,
            immucore,
            agent,
            k3s,
            k0s,
        } => kairosify(&src, &dest, immucore, agent, [k3s, k0s]).map(|_| 0),
        Cmd::Lint { image, json } => lint(&image, json),
        Cmd::Bridge(args) => kairos_agent::bridge::run(&args),
        Cmd::Keys {
            command: KeysCmd::Generate { dir, name, days },
        } => {
            let made = kairos_build::uki::generate_keys(&dir, &name, days)?;
            for f in made {
                println!("{}", f.display());
            }
            Ok(0)
        }
        Cmd::Status { json, socket } => Ok(kairos_agent::p2p::status_cmd(&socket, json)),
        Cmd::Register {
            token,
            qr_code_image,
            config,
            device,
            reboot,
            poweroff,
            timeout,
            bootstrap_peers,
        } => {
            let token = match (token, qr_code_image) {
                (_, Some(img)) => qr::decode_png_file(&img)?,
                (Some(t), None) => kairos_agent::pair::token_arg(&t)?,
                (None, None) => bail!("give the token or --qr-code-image"),
            };
            let token = token.trim();
            kairos_mesh::Token::parse(token).map_err(|e| {
                anyhow::anyhow!(
                    "the token is not a pairing token ({e}): copy the whole line under the QR code"
                )
            })?;
            let cc = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let payload = kairos_agent::pair::payload(cc, device, reboot, poweroff);
            // The node refuses what it cannot use: check here first, naming the file.
            kairos_agent::pair::parse_payload(&serde_json::to_string(&payload)?)
                .with_context(|| format!("{}", config.display()))?;
            eprintln!("register: sending {} to the node …", config.display());
            kairos_agent::pair::send(
                token,
                &payload,
                &bootstrap_peers,
                std::time::Duration::from_secs(timeout),
            )?;
            println!("the node took the config");
            Ok(0)
        }
        Cmd::Role {
            command:
                RoleCmd::List {
                    json,
                    socket,
                    network_id,
                },
        } => Ok(kairos_agent::p2p::role_list(&socket, &network_id, json)),
        Cmd::Role {
            command:
                RoleCmd::Set {
                    uuid,
                    role,
                    socket,
                    network_id,
                },
        } => Ok(kairos_agent::p2p::role_set(
            &socket,
            &network_id,
            &uuid,
            &role,
        )),
        Cmd::GetKubeconfig { socket, network_id } => {
            Ok(kairos_agent::p2p::get_kubeconfig(&socket, &network_id))
        }
        Cmd::GenerateToken { interval } => {
            println!("{}", kairos_mesh::Token::generate(interval).encode());
            Ok(0)
        }
        Cmd::Token { token, at, json } => token_show(&token, at, json),
        Cmd::Vm {
            command:
                VmCmd::Run {
                    disk,
                    iso,
                    serial_log,
                    second_serial,
                    memory,
                    smp,
                    accel,
                    kernel,
                    initrd,
                    append,
                    link,
                    secure_boot,
                    tpm,
                },
        } => {
            // The UEFI variables live next to the disk, like a machine's NVRAM.
            let beside = |suffix: &str| {
                let mut p = disk.clone().into_os_string();
                p.push(suffix);
                PathBuf::from(p)
            };
            let vars = match &secure_boot {
                Some(keys) => {
                    let vars = beside(".sb-vars.fd");
                    vm::enrolled_vars(keys, &vars)?;
                    vars
                }
                None => beside(".vars.fd"),
            };
            vm::prepare(&vars)?;
            let tpm = if tpm {
                Some(vm::start_swtpm(&beside(".tpm"))?)
            } else {
                None
            };
            let accel = match accel.as_str() {
                "auto" if vm::kvm_works() => "kvm".to_string(),
                "auto" => "tcg".to_string(),
                other => other.to_string(),
            };
            let spec = vm::VmSpec {
                disk,
                iso,
                memory_mib: memory,
                smp,
                vars,
                serial_log,
                second_serial,
                accel,
                serial_stdio: true,
                kernel: kernel.zip(initrd).map(|(k, i)| (k, i, append)),
                link,
                secure_boot: secure_boot.is_some(),
                tpm,
            };
            // exec: QEMU takes over this process (and its stdio), so stopping kairosctl stops the VM.
            use std::os::unix::process::CommandExt;
            let err = Command::new("qemu-system-x86_64")
                .args(vm::qemu_args(&spec))
                .exec();
            Err(anyhow::anyhow!("running qemu-system-x86_64: {err}"))
        }
    }
}

fn token_show(token: &str, at: Option<u64>, json: bool) -> Result<i32> {
    let text = if token == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading the token from stdin")?;
        s
    } else {
        token.to_string()
    };
    let t = match kairos_mesh::Token::parse(&text) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("kairosctl: {e}");
            return Ok(1);
        }
    };
    println!("{}", kairos_mesh::token::report(&t, at, json));
    Ok(0)
}

fn main() {
    kairos_sys::exec::default_sigpipe();
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("kairosctl: {e:#}");
            std::process::exit(3);
        }
    }
}
