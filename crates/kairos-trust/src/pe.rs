//! PE32+ images for UKIs: read the section table of systemd-stub, append sections (`.osrel`,
//! `.cmdline`, `.linux`, `.initrd`, `.pcrpkey`, `.pcrsig`, …) at the image's own alignments,
//! and lint an image for what makes firmware refuse or stall on it (misaligned sections,
//! overlaps, a wrong `SizeOfImage`, no room in the headers).
//!
//! Our own writer instead of objcopy: it places every section at a `SectionAlignment`
//! multiple (the cause of Kairos' "misaligned PE sections → OVMF stall" reports was
//! 512-byte placement), and the same code lints what it wrote. Input images are parsed with
//! every offset checked against the file's length.

use std::ops::Range;

/// A section's flags for the data we add: initialised data, readable.
pub const DATA_READ: u32 = 0x4000_0040;
/// `IMAGE_FILE_MACHINE_AMD64`.
pub const MACHINE_AMD64: u16 = 0x8664;
const PE32_PLUS: u16 = 0x20b;
const SECTION_HEADER: usize = 40;
/// The page size our sections are aligned to at least.
const PAGE: u64 = 4096;
/// The security directory (Authenticode signature): data directory 4.
const DIR_SECURITY: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeError {
    #[error("not a PE image: {0}")]
    Malformed(String),
    #[error("not a 64-bit (PE32+) image")]
    NotPe32Plus,
    #[error(
        "no room for {wanted} more section headers ({free} free before the first section's data): use a stub with free header slots"
    )]
    NoRoom { wanted: usize, free: usize },
    #[error("section name {0:?}: 1 to 8 bytes of ASCII")]
    BadName(String),
    #[error("the image would pass 4 GiB")]
    TooLarge,
}

/// One section header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub virtual_size: u32,
    pub virtual_address: u32,
    pub raw_size: u32,
    pub raw_offset: u32,
    pub characteristics: u32,
}

impl Section {
    /// Its extent in memory: the virtual size (the raw size when that is 0).
    pub fn memory_size(&self) -> u32 {
        if self.virtual_size != 0 {
            self.virtual_size
        } else {
            self.raw_size
        }
    }

    /// The section's bytes in `image` (its virtual size, at most its raw size; zeros past
    /// the raw data are not stored).
    pub fn data<'a>(&self, image: &'a [u8]) -> &'a [u8] {
        let len = self.virtual_size.min(self.raw_size) as usize;
        let start = self.raw_offset as usize;
        image.get(start..start + len).unwrap_or_default()
    }
}

/// The parsed headers of a PE32+ image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pe {
    pub machine: u16,
    pub section_alignment: u32,
    pub file_alignment: u32,
    pub size_of_image: u32,
    pub size_of_headers: u32,
    pub checksum: u32,
    pub sections: Vec<Section>,
    /// The Authenticode signature's place (file offset, size), when signed.
    pub security: Option<(u32, u32)>,
    coff: usize,
    opt: usize,
    table: usize,
}

fn u16_at(b: &[u8], o: usize) -> Result<u16, PeError> {
    b.get(o..o + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| PeError::Malformed(format!("truncated at {o:#x}")))
}

fn u32_at(b: &[u8], o: usize) -> Result<u32, PeError> {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| PeError::Malformed(format!("truncated at {o:#x}")))
}

fn put_u16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

fn align_up(v: u64, a: u64) -> u64 {
    if a <= 1 { v } else { v.div_ceil(a) * a }
}

impl Pe {
    /// Parses the headers and section table.
    pub fn parse(b: &[u8]) -> Result<Pe, PeError> {
        if b.get(0..2) != Some(b"MZ") {
            return Err(PeError::Malformed("no MZ header".into()));
        }
        let pe = u32_at(b, 0x3c)? as usize;
        if b.get(pe..pe + 4) != Some(b"PE\0\0") {
            return Err(PeError::Malformed("no PE signature".into()));
        }
        let coff = pe + 4;
        let machine = u16_at(b, coff)?;
        let count = u16_at(b, coff + 2)? as usize;
        let opt_size = u16_at(b, coff + 16)? as usize;
        let opt = coff + 20;
        if u16_at(b, opt)? != PE32_PLUS {
            return Err(PeError::NotPe32Plus);
        }
        let dirs = u32_at(b, opt + 108)? as usize;
        let security = if dirs > DIR_SECURITY {
            let d = opt + 112 + DIR_SECURITY * 8;
            let (off, size) = (u32_at(b, d)?, u32_at(b, d + 4)?);
            (size != 0).then_some((off, size))
        } else {
            None
        };
        let table = opt + opt_size;
        let mut sections = Vec::with_capacity(count);
        for i in 0..count {
            let h = table + i * SECTION_HEADER;
            let raw = b
                .get(h..h + 8)
                .ok_or_else(|| PeError::Malformed("truncated section table".into()))?;
            let name: String = raw
                .iter()
                .take_while(|c| **c != 0)
                .map(|c| *c as char)
                .collect();
            sections.push(Section {
                name,
                virtual_size: u32_at(b, h + 8)?,
                virtual_address: u32_at(b, h + 12)?,
                raw_size: u32_at(b, h + 16)?,
                raw_offset: u32_at(b, h + 20)?,
                characteristics: u32_at(b, h + 36)?,
            });
        }
        Ok(Pe {
            machine,
            section_alignment: u32_at(b, opt + 32)?,
            file_alignment: u32_at(b, opt + 36)?,
            size_of_image: u32_at(b, opt + 56)?,
            size_of_headers: u32_at(b, opt + 60)?,
            checksum: u32_at(b, opt + 64)?,
            sections,
            security,
            coff,
            opt,
            table,
        })
    }

    /// File offset of the optional header (the checksum is at +64, the data directories at
    /// +112).
    pub fn optional_header_offset(&self) -> usize {
        self.opt
    }

    /// The section named `name`.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// Section headers that still fit before the first section's data (and within
    /// `SizeOfHeaders`).
    pub fn free_header_slots(&self) -> usize {
        let end_of_table = self.table + self.sections.len() * SECTION_HEADER;
        let first_data = self
            .sections
            .iter()
            .filter(|s| s.raw_size > 0)
            .map(|s| s.raw_offset as usize)
            .min()
            .unwrap_or(self.size_of_headers as usize)
            .min(self.size_of_headers as usize);
        first_data.saturating_sub(end_of_table) / SECTION_HEADER
    }
}

/// The PE checksum (as `IMAGE_OPTIONAL_HEADER.CheckSum`): 16-bit one's-complement-style sum of
/// the file with the checksum field taken as zero, plus the file's length.
pub fn checksum(b: &[u8], field: usize) -> u32 {
    let mut sum: u64 = 0;
    let mut i = 0;
    while i < b.len() {
        let w = if i + 1 < b.len() {
            u16::from_le_bytes([b[i], b[i + 1]])
        } else {
            u16::from(b[i])
        };
        let w = if (field..field + 4).contains(&i) {
            0
        } else {
            w
        };
        sum += u64::from(w);
        sum = (sum & 0xffff) + (sum >> 16);
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(b.len() as u32)
}

/// Appends `(name, data)` sections to `image` (a PE32+ such as systemd-stub) and returns the
/// new image. A signature in the input is dropped (it would no longer match). Each section
/// starts at the next `SectionAlignment` multiple after the image's end in memory and the
/// next `FileAlignment` multiple in the file; `SizeOfImage`, the section count,
/// `SizeOfInitializedData` and the checksum are updated.
pub fn append_sections(image: &[u8], add: &[(&str, &[u8])]) -> Result<Vec<u8>, PeError> {
    let pe = Pe::parse(image)?;
    for (name, _) in add {
        if name.is_empty() || name.len() > 8 || !name.is_ascii() {
            return Err(PeError::BadName(name.to_string()));
        }
    }
    let free = pe.free_header_slots();
    if add.len() > free {
        return Err(PeError::NoRoom {
            wanted: add.len(),
            free,
        });
    }
    // The file: the headers and the sections' raw data, without a signature or overlay.
    let data_end = pe
        .sections
        .iter()
        .map(|s| u64::from(s.raw_offset) + u64::from(s.raw_size))
        .max()
        .unwrap_or(u64::from(pe.size_of_headers))
        .max(u64::from(pe.size_of_headers)) as usize;
    let mut out = image
        .get(..data_end)
        .ok_or_else(|| PeError::Malformed("section data past the end of the file".into()))?
        .to_vec();
    let (sa, fa) = (
        u64::from(pe.section_alignment.max(1)),
        u64::from(pe.file_alignment.max(1)),
    );
    // Our sections start on pages even where the stub's alignment is smaller (systemd-stub
    // 252 has 512): firmware that maps images with page-granular protections needs it, and
    // a page is a multiple of every smaller power-of-two alignment.
    let sa = sa.max(PAGE);
    let mut va = align_up(
        pe.sections
            .iter()
            .map(|s| u64::from(s.virtual_address) + u64::from(s.memory_size()))
            .max()
            .unwrap_or(0)
            .max(u64::from(pe.size_of_image)),
        sa,
    );
    let mut init_data = u64::from(u32_at(image, pe.opt + 8)?);
    let mut count = pe.sections.len();
    for (name, data) in add {
        let off = align_up(out.len() as u64, fa);
        let raw = align_up(data.len() as u64, fa);
        if off + raw > u64::from(u32::MAX) || va + data.len() as u64 > u64::from(u32::MAX) {
            return Err(PeError::TooLarge);
        }
        out.resize(off as usize, 0);
        out.extend_from_slice(data);
        out.resize((off + raw) as usize, 0);
        let h = pe.table + count * SECTION_HEADER;
        let mut header = [0u8; SECTION_HEADER];
        header[..name.len()].copy_from_slice(name.as_bytes());
        put_u32(&mut header, 8, data.len() as u32);
        put_u32(&mut header, 12, va as u32);
        put_u32(&mut header, 16, raw as u32);
        put_u32(&mut header, 20, off as u32);
        put_u32(&mut header, 36, DATA_READ);
        out[h..h + SECTION_HEADER].copy_from_slice(&header);
        count += 1;
        init_data += raw;
        va = align_up(va + data.len() as u64, sa);
    }
    put_u16(&mut out, pe.coff + 2, count as u16);
    put_u32(
        &mut out,
        pe.opt + 8,
        init_data.min(u64::from(u32::MAX)) as u32,
    );
    put_u32(&mut out, pe.opt + 56, va as u32);
    if pe.security.is_some() {
        let d = pe.opt + 112 + DIR_SECURITY * 8;
        put_u32(&mut out, d, 0);
        put_u32(&mut out, d + 4, 0);
    }
    let sum = checksum(&out, pe.opt + 64);
    put_u32(&mut out, pe.opt + 64, sum);
    Ok(out)
}

/// What the lint found: each line says what is wrong and where.
pub fn lint(image: &[u8]) -> Vec<String> {
    let pe = match Pe::parse(image) {
        Ok(p) => p,
        Err(e) => return vec![e.to_string()],
    };
    let mut out = Vec::new();
    if pe.machine != MACHINE_AMD64 {
        out.push(format!("machine {:#x}, not x86-64", pe.machine));
    }
    let (sa, fa) = (pe.section_alignment.max(1), pe.file_alignment.max(1));
    let mut end_va = 0u64;
    let mut spans: Vec<(Range<u64>, &str)> = Vec::new();
    for s in &pe.sections {
        if s.virtual_address % sa != 0 {
            out.push(format!(
                "section {}: virtual address {:#x} is not a multiple of the section alignment {sa:#x} (firmware may refuse or stall)",
                s.name, s.virtual_address
            ));
        }
        if s.raw_size > 0 && s.raw_offset % fa != 0 {
            out.push(format!(
                "section {}: file offset {:#x} is not a multiple of the file alignment {fa:#x}",
                s.name, s.raw_offset
            ));
        }
        if s.raw_size % fa != 0 {
            out.push(format!(
                "section {}: raw size {:#x} is not a multiple of the file alignment {fa:#x}",
                s.name, s.raw_size
            ));
        }
        if u64::from(s.raw_offset) + u64::from(s.raw_size) > image.len() as u64 {
            out.push(format!(
                "section {}: its data passes the end of the file",
                s.name
            ));
        }
        let r =
            u64::from(s.virtual_address)..u64::from(s.virtual_address) + u64::from(s.memory_size());
        for (o, n) in &spans {
            if r.start < o.end && o.start < r.end {
                out.push(format!("sections {n} and {} overlap in memory", s.name));
            }
        }
        end_va = end_va.max(r.end);
        spans.push((r, &s.name));
    }
    let want = align_up(end_va, u64::from(sa));
    if u64::from(pe.size_of_image) < want {
        out.push(format!(
            "SizeOfImage is {:#x}, the sections end at {want:#x}",
            pe.size_of_image
        ));
    }
    if pe.size_of_image % sa != 0 {
        out.push(format!(
            "SizeOfImage {:#x} is not a multiple of the section alignment {sa:#x}",
            pe.size_of_image
        ));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal PE32+ image: headers (0x400), one `.text` section at 0x1000 (file 0x400,
    /// 0x200 bytes), section alignment 0x1000, file alignment 0x200.
    pub(crate) fn tiny_pe() -> Vec<u8> {
        let mut b = vec![0u8; 0x600];
        b[0..2].copy_from_slice(b"MZ");
        put_u32(&mut b, 0x3c, 0x80);
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        put_u16(&mut b, coff, MACHINE_AMD64);
        put_u16(&mut b, coff + 2, 1);
        put_u16(&mut b, coff + 16, 240);
        let opt = coff + 20;
        put_u16(&mut b, opt, PE32_PLUS);
        put_u32(&mut b, opt + 32, 0x1000);
        put_u32(&mut b, opt + 36, 0x200);
        put_u32(&mut b, opt + 56, 0x2000);
        put_u32(&mut b, opt + 60, 0x400);
        put_u32(&mut b, opt + 108, 16);
        let t = opt + 240;
        b[t..t + 5].copy_from_slice(b".text");
        put_u32(&mut b, t + 8, 0x180);
        put_u32(&mut b, t + 12, 0x1000);
        put_u32(&mut b, t + 16, 0x200);
        put_u32(&mut b, t + 20, 0x400);
        put_u32(&mut b, t + 36, 0x6000_0020);
        for (i, x) in b[0x400..0x580].iter_mut().enumerate() {
            *x = i as u8;
        }
        b
    }

    #[test]
    fn parses_and_finds_free_slots() {
        let b = tiny_pe();
        let pe = Pe::parse(&b).unwrap();
        assert_eq!(pe.sections.len(), 1);
        assert_eq!(pe.sections[0].name, ".text");
        assert_eq!(pe.sections[0].data(&b).len(), 0x180);
        // Table at 0x84+20+240 = 0x188; one header; up to 0x400: (0x400-0x1b0)/40.
        assert_eq!(pe.free_header_slots(), (0x400 - 0x1b0) / 40);
        assert!(lint(&b).is_empty(), "{:?}", lint(&b));
    }

    #[test]
    fn appended_sections_are_aligned_and_lint_clean() {
        let b = tiny_pe();
        let linux = vec![0xaau8; 5000];
        let out = append_sections(&b, &[(".osrel", b"ID=kairos\n"), (".linux", &linux)]).unwrap();
        let pe = Pe::parse(&out).unwrap();
        assert_eq!(pe.sections.len(), 3);
        let osrel = pe.section(".osrel").unwrap();
        assert_eq!(osrel.virtual_address, 0x2000);
        assert_eq!(osrel.raw_offset, 0x600);
        assert_eq!(osrel.data(&out), b"ID=kairos\n");
        let l = pe.section(".linux").unwrap();
        assert_eq!(l.virtual_address, 0x3000);
        assert_eq!(l.raw_offset, 0x800);
        assert_eq!(l.raw_size, 0x1400);
        assert_eq!(l.data(&out), &linux[..]);
        assert_eq!(pe.size_of_image, 0x5000);
        assert!(lint(&out).is_empty(), "{:?}", lint(&out));
        assert_eq!(pe.checksum, checksum(&out, pe.opt + 64));
        // The stub's own section header and data are kept.
        assert_eq!(&out[0x188..0x1b0], &b[0x188..0x1b0]);
        assert_eq!(&out[0x400..0x600], &b[0x400..0x600]);
    }

    #[test]
    fn refusals_and_lint_findings() {
        let b = tiny_pe();
        assert!(matches!(
            append_sections(&b, &[(".toolongname", b"x")]),
            Err(PeError::BadName(_))
        ));
        let many: Vec<(&str, &[u8])> = (0..20).map(|_| (".x", &b"x"[..])).collect();
        assert!(matches!(
            append_sections(&b, &many),
            Err(PeError::NoRoom { .. })
        ));
        assert!(Pe::parse(b"MZ").is_err());
        assert!(Pe::parse(&b[..0x100]).is_err());
        // A section placed at a 512-byte boundary, as objcopy-based tools do.
        let mut bad = append_sections(&b, &[(".osrel", b"x")]).unwrap();
        let h = 0x188 + 40;
        put_u32(&mut bad, h + 12, 0x2200);
        let l = lint(&bad);
        assert!(
            l.iter()
                .any(|f| f.contains(".osrel") && f.contains("section alignment")),
            "{l:?}"
        );
        // A truncated file.
        let out = append_sections(&b, &[(".linux", &[1u8; 3000])]).unwrap();
        let l = lint(&out[..out.len() - 512]);
        assert!(l.iter().any(|f| f.contains("passes the end")), "{l:?}");
    }
}
