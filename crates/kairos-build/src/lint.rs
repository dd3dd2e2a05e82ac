//! The image contract, checked at build time: what a tree needs to boot as a Kairos node,
//! each failure saying what to add. `kairosctl lint` prints the findings; kairosify and the
//! builders refuse a tree with errors.
//!
//! Reads go beneath the tree ([`kairos_sys::beneath`]); the ELF checks parse only the header
//! and program headers (pure, unit-tested).

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use kairos_sys::beneath::{Dir, Kind};

/// `EM_X86_64`: the architecture every Kairos node here runs.
pub const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;

/// What the ELF header says about an executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elf {
    pub machine: u16,
    /// The dynamic loader it asks for (`PT_INTERP`); `None` for a static executable.
    pub interp: Option<String>,
}

/// A readable name for an `e_machine` value.
pub fn machine_name(m: u16) -> String {
    match m {
        3 => "x86 (32-bit)".into(),
        40 => "arm (32-bit)".into(),
        62 => "x86-64".into(),
        183 => "aarch64".into(),
        243 => "riscv".into(),
        other => format!("machine {other}"),
    }
}

/// Parses a 64-bit little-endian ELF header and its program headers from `data` (the first
/// few KiB of the file are enough for the interpreter path in practice).
pub fn parse_elf(data: &[u8]) -> Result<Elf, String> {
    if data.len() < 64 || &data[..4] != b"\x7fELF" {
        return Err("is not an ELF executable".into());
    }
    if data[4] != 2 || data[5] != 1 {
        return Err("is not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let machine = u16_at(18);
    let phoff = u64_at(32).unwrap_or(0) as usize;
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    if phentsize < 56 || phnum > 256 {
        return Err("has a malformed program header table".into());
    }
    let mut interp = None;
    for i in 0..phnum {
        let at = phoff.saturating_add(i * phentsize);
        let Some(kind) = u32_at(at).filter(|_| data.len() >= at.saturating_add(56)) else {
            return Err("is truncated (program headers past the end)".into());
        };
        if kind == PT_INTERP {
            let off = u64_at(at + 8).unwrap_or(0) as usize;
            let len = u64_at(at + 32).unwrap_or(0) as usize;
            let path = data
                .get(off..off.saturating_add(len))
                .map(|b| {
                    String::from_utf8_lossy(b)
                        .trim_end_matches('\0')
                        .to_string()
                })
                .unwrap_or_else(|| "(an interpreter)".into());
            interp = Some(path);
        }
    }
    Ok(Elf { machine, interp })
}

fn head(path: &Path) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = Vec::new();
    f.by_ref()
        .take(64 << 10)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(buf)
}

/// A companion binary (kairos-agent, kairos-immucore) must be a static x86-64 executable:
/// the initrd has no libc, and the image's libc may not match ours.
pub fn check_companion(path: &Path, name: &str) -> Result<()> {
    let elf =
        parse_elf(&head(path)?).map_err(|e| anyhow::anyhow!("{name} at {} {e}", path.display()))?;
    if elf.machine != EM_X86_64 {
        bail!(
            "{name} at {} is built for {}, not x86-64",
            path.display(),
            machine_name(elf.machine)
        );
    }
    if let Some(interp) = elf.interp {
        bail!(
            "{name} at {} is dynamically linked (it needs {interp}): build it with scripts/build-static",
            path.display()
        );
    }
    Ok(())
}

/// One thing found wrong (or worth knowing) about a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub error: bool,
    pub what: String,
}

/// Tree size over which the lint warns: every byte is written to STATE and RECOVERY.
pub const SIZE_BUDGET: u64 = 4 << 30;

/// Checks an image tree (the merged root of its layers).
pub fn lint(tree: &Path) -> Result<Vec<Finding>> {
    let dir = Dir::open(tree).with_context(|| format!("opening {}", tree.display()))?;
    let mut out = Vec::new();
    let err = |what: String| Finding { error: true, what };
    if let Err(e) = crate::initrd::find_kernel(tree) {
        out.push(err(format!("{e:#}")));
    }
    match crate::kairosify::detect_init(tree) {
        Ok(_) => {}
        Err(e) => out.push(err(format!("{e:#}"))),
    }
    let is_file = |p: &str| {
        dir.metadata(Path::new(p))
            .is_ok_and(|m| m.kind == Kind::File)
    };
    if !is_file("etc/os-release") && !is_file("usr/lib/os-release") {
        out.push(err(
            "no /etc/os-release (or /usr/lib/os-release): add one naming the distribution (ID=, VERSION_ID=)".into(),
        ));
    }
    // Executables the node runs: its init and, once kairosified, ours.
    for (p, ours) in [
        ("sbin/init", false),
        ("usr/lib/systemd/systemd", false),
        ("bin/busybox", false),
        ("usr/bin/kairos-agent", true),
        ("usr/bin/kairos-immucore", true),
    ] {
        // The ELF and program headers are at the start: 64 KiB is plenty.
        let mut data = Vec::new();
        let Ok(f) = dir.open_file(Path::new(p)) else {
            continue;
        };
        if f.take(64 << 10).read_to_end(&mut data).is_err() {
            continue;
        }
        match parse_elf(&data) {
            Ok(e) if e.machine != EM_X86_64 => out.push(err(format!(
                "/{p} is built for {}, not x86-64: use the image for linux/amd64",
                machine_name(e.machine)
            ))),
            Ok(e) if ours && e.interp.is_some() => out.push(err(format!(
                "/{p} is dynamically linked: kairosify the image again with binaries from scripts/build-static"
            ))),
            Ok(_) => {}
            // Scripts (`sbin/init` as a shell script) are fine.
            Err(_) => {}
        }
    }
    let size = tree_size(&dir, Path::new(""), 0);
    if size > SIZE_BUDGET {
        out.push(Finding {
            error: false,
            what: format!(
                "the tree holds {} MiB (budget {} MiB): it is written to STATE and RECOVERY; consider a smaller image",
                size >> 20,
                SIZE_BUDGET >> 20
            ),
        });
    }
    Ok(out)
}

fn tree_size(dir: &Dir, rel: &Path, depth: usize) -> u64 {
    let Ok(entries) = dir.read_dir(rel) else {
        return 0;
    };
    let mut total = 0;
    for (name, kind) in entries {
        let p = rel.join(&name);
        match kind {
            Kind::Dir if depth < 64 => total += tree_size(dir, &p, depth + 1),
            Kind::File => total += dir.symlink_metadata(&p).map(|m| m.size).unwrap_or(0),
            _ => {}
        }
    }
    total
}

/// Fails with every error finding, one per line.
pub fn require_clean(tree: &Path) -> Result<()> {
    let found = lint(tree)?;
    let errors: Vec<&str> = found
        .iter()
        .filter(|f| f.error)
        .map(|f| f.what.as_str())
        .collect();
    for f in found.iter().filter(|f| !f.error) {
        eprintln!("kairosctl: warning: {}", f.what);
    }
    if !errors.is_empty() {
        bail!(
            "the image does not meet the Kairos image contract:\n  - {}",
            errors.join("\n  - ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with one program header, PT_INTERP or PT_LOAD.
    fn elf(machine: u16, interp: Option<&str>) -> Vec<u8> {
        let mut d = vec![0u8; 64 + 56];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[18..20].copy_from_slice(&machine.to_le_bytes());
        d[32..40].copy_from_slice(&64u64.to_le_bytes());
        d[54..56].copy_from_slice(&56u16.to_le_bytes());
        d[56..58].copy_from_slice(&1u16.to_le_bytes());
        let kind: u32 = if interp.is_some() { PT_INTERP } else { 1 };
        d[64..68].copy_from_slice(&kind.to_le_bytes());
        if let Some(i) = interp {
            let off = d.len() as u64;
            d[64 + 8..64 + 16].copy_from_slice(&off.to_le_bytes());
            d[64 + 32..64 + 40].copy_from_slice(&((i.len() + 1) as u64).to_le_bytes());
            d.extend_from_slice(i.as_bytes());
            d.push(0);
        }
        d
    }

    #[test]
    fn static_dynamic_and_foreign_executables() {
        assert_eq!(
            parse_elf(&elf(62, None)).unwrap(),
            Elf {
                machine: 62,
                interp: None
            }
        );
        let dynamic = parse_elf(&elf(62, Some("/lib64/ld-linux-x86-64.so.2"))).unwrap();
        assert_eq!(
            dynamic.interp.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(parse_elf(&elf(183, None)).unwrap().machine, 183);
        assert!(parse_elf(b"#!/bin/sh\n").is_err());
        let mut trunc = elf(62, None);
        trunc.truncate(70);
        assert!(parse_elf(&trunc).is_err());
    }

    #[test]
    fn companions_must_be_static_x86_64() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kairos-immucore");
        std::fs::write(&p, elf(62, Some("/lib64/ld-linux-x86-64.so.2"))).unwrap();
        let e = check_companion(&p, "kairos-immucore")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dynamically linked") && e.contains("scripts/build-static"),
            "{e}"
        );
        std::fs::write(&p, elf(183, None)).unwrap();
        assert!(
            check_companion(&p, "kairos-immucore")
                .unwrap_err()
                .to_string()
                .contains("aarch64")
        );
        std::fs::write(&p, elf(62, None)).unwrap();
        check_companion(&p, "kairos-immucore").unwrap();
        // The busybox-static scripts/setup installs is a real static executable.
        check_companion(Path::new("/bin/busybox"), "busybox").unwrap();
    }

    #[test]
    fn lint_names_what_is_missing() {
        let d = tempfile::tempdir().unwrap();
        let found = lint(d.path()).unwrap();
        let text: Vec<&str> = found.iter().map(|f| f.what.as_str()).collect();
        assert!(text.iter().any(|t| t.contains("linux-image")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("os-release")), "{text:?}");
        assert!(found.iter().all(|f| f.error));
        let r = d.path();
        std::fs::create_dir_all(r.join("boot")).unwrap();
        std::fs::create_dir_all(r.join("lib/modules/6.1.0-t")).unwrap();
        std::fs::write(r.join("boot/vmlinuz-6.1.0-t"), "k").unwrap();
        std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
        std::fs::write(r.join("usr/lib/systemd/systemd"), elf(183, None)).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/os-release"), "ID=debian\n").unwrap();
        let found = lint(r).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].what.contains("aarch64"), "{found:?}");
    }
}
