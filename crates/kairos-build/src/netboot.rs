//! Netboot artifacts: the kernel, an initrd that carries the layer store (the Kairos initrd
//! with a second cpio appended: `/kairos-store/…`), and an iPXE script. The node boots live
//! from RAM, like the ISO, with `kairos.store=initrd`.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use crate::os::{Os, OsSpec};

/// Where the store sits inside the initrd.
pub const STORE_IN_INITRD: &str = "kairos-store";

pub struct NetbootSpec<'a> {
    pub os: OsSpec<'a>,
    /// Embedded as `/kairos-store/cloud-config.yaml`: the live system applies it.
    pub cloud_config: Option<&'a Path>,
    /// Directory for `vmlinuz`, `initrd` and `netboot.ipxe`.
    pub output: &'a Path,
}

/// The kernel cmdline that boots the netboot initrd.
pub fn cmdline(os: &Os, extra: &str) -> String {
    format!(
        "{extra} kairos.deployment={} kairos.store=initrd kairos.mode=live",
        os.dep.id
    )
    .trim()
    .to_string()
}

pub fn build_netboot(spec: &NetbootSpec) -> Result<Os> {
    crate::disk::check_tools(&["mkfs.erofs"])?;
    fs::create_dir_all(spec.output)
        .with_context(|| format!("creating {}", spec.output.display()))?;
    let work = crate::WorkDir::new(spec.output, "kairos-netboot")?;
    let store = work.path().join("store");
    let os = crate::os::build_store(&spec.os, &store, work.path())?;
    // The Kairos initrd, then the store as a second (uncompressed) cpio: the kernel unpacks both.
    // (build_store keeps its initrd at work/initrd: this one needs its own name.)
    let initrd = work.path().join("initrd.netboot");
    fs::copy(&os.initrd, &initrd)?;
    {
        let f = fs::OpenOptions::new().append(true).open(&initrd)?;
        let mut w = crate::cpio::Writer::new(std::io::BufWriter::new(f));
        w.dir(STORE_IN_INITRD)?;
        for sub in ["layers", "deployments"] {
            w.dir(&format!("{STORE_IN_INITRD}/{sub}"))?;
        }
        let mut files: Vec<String> = os.dep.layers.iter().map(|l| l.image.file.clone()).collect();
        files.push(format!("deployments/{}.json", os.dep.id));
        for rel in files {
            let data = fs::read(store.join(&rel))?;
            w.file(&format!("{STORE_IN_INITRD}/{rel}"), 0o644, &data)?;
        }
        if let Some(cc) = spec.cloud_config {
            let data = fs::read(cc).with_context(|| format!("reading {}", cc.display()))?;
            w.file(
                &format!("{STORE_IN_INITRD}/cloud-config.yaml"),
                0o600,
                &data,
            )?;
        }
        w.finish()?.flush()?;
    }
    let script = format!(
        "#!ipxe\nkernel vmlinuz {}\ninitrd initrd\nboot\n",
        cmdline(&os, &spec.os.cmdline)
    );
    // Files appear under their final names only when all are complete.
    fs::write(work.path().join("netboot.ipxe"), script)?;
    fs::copy(&os.kernel, work.path().join("vmlinuz"))?;
    for (from, to) in [
        ("vmlinuz", "vmlinuz"),
        ("initrd.netboot", "initrd"),
        ("netboot.ipxe", "netboot.ipxe"),
    ] {
        fs::rename(work.path().join(from), spec.output.join(to))?;
    }
    Ok(os)
}
