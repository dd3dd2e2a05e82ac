//! Reading files from an ISO 9660 image or device in userspace — the `cidata` and `config-2`
//! media of the `datasource` stage module — with Rock Ridge and Joliet names.
//!
//! No mount, so no `isofs` kernel module and no trust in the medium beyond this parser: every
//! offset and length is checked against what was read, directories are read up to 1 MiB,
//! paths at most 8 components deep, files up to the caller's limit.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const SECTOR: u64 = 2048;
const MAX_DIR: u64 = 1 << 20;
const MAX_DEPTH: usize = 8;

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("ISO 9660: {msg}"))
}

fn read_at(f: &File, off: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64)? {
            0 => return Err(bad("the image ends inside a record")),
            n => done += n,
        }
    }
    Ok(buf)
}

fn le32(b: &[u8]) -> u64 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    lba: u64,
    size: u64,
    dir: bool,
}

/// The Rock Ridge `NM` name in a record's system use area, if any.
fn rock_ridge_name(mut su: &[u8]) -> Option<String> {
    let mut name = String::new();
    while su.len() >= 4 {
        let len = su[2] as usize;
        if len < 4 || len > su.len() {
            break;
        }
        if &su[..2] == b"NM" && len >= 5 {
            name.push_str(&String::from_utf8_lossy(&su[5..len]));
        }
        su = &su[len..];
    }
    (!name.is_empty()).then_some(name)
}

fn entries(f: &File, lba: u64, size: u64, joliet: bool) -> io::Result<Vec<Entry>> {
    let data = read_at(f, lba * SECTOR, size.min(MAX_DIR))?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let len = data[pos] as usize;
        if len == 0 {
            // Records never cross a sector: the rest of this one is padding.
            pos = (pos / SECTOR as usize + 1) * SECTOR as usize;
            continue;
        }
        if len < 34 || pos + len > data.len() {
            return Err(bad("a directory record runs past its directory"));
        }
        let r = &data[pos..pos + len];
        let name_len = r[32] as usize;
        if 33 + name_len > len {
            return Err(bad("a name runs past its record"));
        }
        let raw = &r[33..33 + name_len];
        pos += len;
        if raw == [0] || raw == [1] {
            continue;
        }
        let su_start = 33 + name_len + (1 - name_len % 2);
        let name = if joliet {
            let units: Vec<u16> = raw
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        } else {
            rock_ridge_name(r.get(su_start..).unwrap_or(&[]))
                .unwrap_or_else(|| String::from_utf8_lossy(raw).into_owned())
        };
        let name = name.split(';').next().unwrap_or("").to_string();
        let name = name.strip_suffix('.').map(str::to_string).unwrap_or(name);
        out.push(Entry {
            name,
            lba: le32(&r[2..6]),
            size: le32(&r[10..14]),
            dir: r[25] & 2 != 0,
        });
    }
    Ok(out)
}

/// The root directories to search: the primary volume, then a Joliet one.
fn roots(f: &File) -> io::Result<Vec<(Entry, bool)>> {
    let pvd = read_at(f, 16 * SECTOR, SECTOR)?;
    if pvd[0] != 1 || &pvd[1..6] != b"CD001" {
        return Err(bad("no primary volume descriptor (not an ISO 9660 image)"));
    }
    let rec = |d: &[u8]| Entry {
        name: String::new(),
        lba: le32(&d[156 + 2..156 + 6]),
        size: le32(&d[156 + 10..156 + 14]),
        dir: true,
    };
    let mut out = vec![(rec(&pvd), false)];
    for n in 17..33 {
        let d = read_at(f, n * SECTOR, SECTOR)?;
        if d[0] == 255 || &d[1..6] != b"CD001" {
            break;
        }
        if d[0] == 2 && &d[88..90] == b"%/" && matches!(d[90], b'@' | b'C' | b'E') {
            out.push((rec(&d), true));
        }
    }
    Ok(out)
}

/// The file at `path` (`openstack/latest/user_data`) on the ISO 9660 image or device `dev`,
/// at most `limit` bytes; `None` when it is not there.
pub fn read_file(dev: &Path, path: &str, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let f = File::open(dev)?;
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if comps.is_empty() || comps.len() > MAX_DEPTH {
        return Err(bad("path must have 1 to 8 components"));
    }
    for (root, joliet) in roots(&f)? {
        let mut cur = root;
        let mut found = true;
        for (i, c) in comps.iter().enumerate() {
            let last = i + 1 == comps.len();
            let next = entries(&f, cur.lba, cur.size, joliet)?
                .into_iter()
                .find(|e| e.dir != last && (e.name == *c || e.name.eq_ignore_ascii_case(c)));
            match next {
                Some(e) => cur = e,
                None => {
                    found = false;
                    break;
                }
            }
        }
        if found {
            if cur.size > limit {
                return Err(bad(&format!("{path} is bigger than {limit} bytes")));
            }
            return read_at(&f, cur.lba * SECTOR, cur.size).map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso(args: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("openstack/latest")).unwrap();
        std::fs::write(src.join("user-data"), "#cloud-config\nhostname: iso\n").unwrap();
        std::fs::write(src.join("openstack/latest/meta_data.json"), "{}").unwrap();
        let out = d.path().join("ci.iso");
        let st = std::process::Command::new("xorriso")
            .args(["-as", "mkisofs", "-quiet", "-V", "cidata"])
            .args(args)
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .status()
            .expect("xorriso (Debian package xorriso)");
        assert!(st.success());
        (d, out)
    }

    #[test]
    fn rock_ridge_joliet_and_plain_names() {
        for args in [&["-r"][..], &["-J"][..], &["-J", "-r"][..]] {
            let (_d, img) = iso(args);
            assert_eq!(
                read_file(&img, "user-data", 1 << 20).unwrap().as_deref(),
                Some(&b"#cloud-config\nhostname: iso\n"[..]),
                "{args:?}"
            );
            assert_eq!(
                read_file(&img, "openstack/latest/meta_data.json", 1 << 20)
                    .unwrap()
                    .as_deref(),
                Some(&b"{}"[..]),
                "{args:?}"
            );
            assert_eq!(read_file(&img, "meta-data", 1 << 20).unwrap(), None);
            assert!(read_file(&img, "user-data", 4).is_err(), "limit");
        }
        let (_d, img) = iso(&["-r"]);
        assert_eq!(crate::blockdev::label_of(&img).as_deref(), Some("cidata"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, vec![0u8; 40_000]).unwrap();
        assert!(read_file(&p, "user-data", 100).is_err());
        let (_d, img) = iso(&["-r"]);
        let mut bytes = std::fs::read(&img).unwrap();
        // Corrupt every directory record length in the root directory's sector.
        let root_lba = le32(&bytes[16 * 2048 + 158..]) as usize;
        for b in &mut bytes[root_lba * 2048..root_lba * 2048 + 2048] {
            *b = b.wrapping_mul(31).wrapping_add(7);
        }
        std::fs::write(&p, &bytes).unwrap();
        let _ = read_file(&p, "user-data", 1 << 20);
    }
}
