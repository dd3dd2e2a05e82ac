//! Our PE writer on the real systemd-stub 252 (`systemd-boot-efi`): the UKI sections land
//! where binutils' `objdump` reads them, at the image's section alignment, lint-clean, and
//! the stub's own sections are untouched.

use std::process::Command;

use kairos_trust::pe;

const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

#[test]
fn sections_appended_to_systemd_stub() {
    let stub = match std::fs::read(STUB) {
        Ok(b) => b,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{STUB}: {e} (scripts/setup installs systemd-boot-efi)"
            );
            eprintln!("skipped: no {STUB}");
            return;
        }
    };
    let before = pe::Pe::parse(&stub).unwrap();
    // systemd 252's stub is itself off: its `.sdmagic` (0x19100) and SizeOfImage are not
    // multiples of its 0x200 section alignment (OVMF boots it anyway). The lint says so; what
    // we add must add nothing to that.
    let stub_findings = pe::lint(&stub);
    assert!(
        stub_findings
            .iter()
            .all(|f| f.contains(".sdmagic") || f.contains("SizeOfImage")),
        "{stub_findings:?}"
    );
    assert!(
        before.free_header_slots() >= 6,
        "{}",
        before.free_header_slots()
    );
    let linux: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let add: [(&str, &[u8]); 5] = [
        (".osrel", b"ID=kairos\n"),
        (".cmdline", b"console=ttyS0"),
        (".pcrpkey", b"-----BEGIN PUBLIC KEY-----\n"),
        (".linux", &linux),
        (".initrd", b"070701"),
    ];
    let uki = pe::append_sections(&stub, &add).unwrap();
    let new: Vec<String> = pe::lint(&uki)
        .into_iter()
        .filter(|f| !stub_findings.contains(f))
        .collect();
    assert!(new.is_empty(), "{new:?}");
    let after = pe::Pe::parse(&uki).unwrap();
    assert_eq!(after.sections.len(), before.sections.len() + add.len());
    for s in &before.sections {
        let n = after.section(&s.name).unwrap();
        assert_eq!(n, s);
        assert_eq!(n.data(&uki), s.data(&stub));
    }
    for (name, data) in add {
        let s = after.section(name).unwrap();
        assert_eq!(s.data(&uki), data, "{name}");
        assert_eq!(s.virtual_address % after.section_alignment, 0, "{name}");
    }

    // binutils reads the same table.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("uki.efi");
    std::fs::write(&f, &uki).unwrap();
    let out = Command::new("objdump").arg("-h").arg(&f).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let image_base = 0u64; // objdump prints VMA = ImageBase + RVA
    for (name, data) in add {
        let s = after.section(name).unwrap();
        let line = text
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("objdump does not list {name}:\n{text}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        let size = u64::from_str_radix(cols[2], 16).unwrap();
        let vma = u64::from_str_radix(cols[3], 16).unwrap();
        let off = u64::from_str_radix(cols[5], 16).unwrap();
        assert_eq!(size, data.len() as u64, "{name}: {line}");
        assert_eq!(
            vma & 0xffff_ffff,
            u64::from(s.virtual_address) + image_base,
            "{name}: {line}"
        );
        assert_eq!(off, u64::from(s.raw_offset), "{name}: {line}");
    }
}
