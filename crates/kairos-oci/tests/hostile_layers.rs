//! Hostile layers: whatever a layer tar says, unpacking it changes nothing outside its
//! destination. A canary directory beside the destination (files, a subdirectory, no xattrs)
//! is compared before and after every unpack; the repros of the security review are fixed
//! cases, and a property test throws random entries (names with `..` and whiteout prefixes,
//! absolute and climbing symlinks, hard links, devices) at the unpacker.
//!
//! Device nodes, whiteouts and `trusted.*` xattrs need root: CI runs tier 1 as root; without
//! root these tests say so and check nothing.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kairos_oci::layer;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum E {
    File(&'static [u8]),
    Dir,
    Symlink(String),
    Hard(String),
    Block,
    Fifo,
}

/// A tar with raw names (no validation by the tar crate: hostile names are the point).
fn tar_of(entries: &[(String, E)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, e) in entries {
        let mut h = tar::Header::new_gnu();
        let (kind, data, link): (_, &[u8], Option<&str>) = match e {
            E::File(d) => (tar::EntryType::Regular, d, None),
            E::Dir => (tar::EntryType::Directory, b"", None),
            E::Symlink(t) => (tar::EntryType::Symlink, b"", Some(t)),
            E::Hard(t) => (tar::EntryType::Link, b"", Some(t)),
            E::Block => (tar::EntryType::Block, b"", None),
            E::Fifo => (tar::EntryType::Fifo, b"", None),
        };
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if matches!(e, E::Dir) { 0o755 } else { 0o644 });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        if matches!(e, E::Block) {
            h.set_device_major(7).unwrap();
            h.set_device_minor(0).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

struct Scene {
    t: tempfile::TempDir,
    canary: PathBuf,
    before: Vec<String>,
}

fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let m = fs::symlink_metadata(&d).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = rustix::fs::llistxattr(&d, &mut buf[..]).unwrap_or(0);
        let xattrs: Vec<String> = String::from_utf8_lossy(&buf[..n])
            .split('\0')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        out.push(format!(
            "{} {:o} {}:{} {xattrs:?}",
            d.display(),
            m.mode(),
            m.uid(),
            m.gid()
        ));
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else {
                let body = if m.is_file() {
                    fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                out.push(format!(
                    "{} {:o} {}:{} {} {body:?}",
                    p.display(),
                    m.mode(),
                    m.uid(),
                    m.nlink(),
                    m.rdev()
                ));
            }
        }
    }
    out.sort();
    out
}

impl Scene {
    fn new() -> Scene {
        let t = tempfile::tempdir().unwrap();
        let canary = t.path().join("canary");
        fs::create_dir_all(canary.join("sub/deeper")).unwrap();
        fs::write(canary.join("victim"), "keep").unwrap();
        fs::write(canary.join("sub/deeper/f"), "keep").unwrap();
        let before = snapshot(&canary);
        Scene { t, canary, before }
    }

    /// Unpacks `entries` into a fresh `dest` two levels below the temp dir.
    fn unpack(&self, n: usize, entries: &[(String, E)]) -> (PathBuf, Result<String, String>) {
        let tar = self.t.path().join(format!("l{n}.tar"));
        fs::write(&tar, tar_of(entries)).unwrap();
        let dest = self.t.path().join(format!("work{n}/dest"));
        let r = layer::unpack(&tar, &dest).map_err(|e| e.to_string());
        (dest, r)
    }

    fn assert_canary(&self, what: &str) {
        assert_eq!(
            snapshot(&self.canary),
            self.before,
            "{what}: canary changed"
        );
    }
}

fn root() -> bool {
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: hostile layer tests need root (device nodes, trusted xattrs)");
        return false;
    }
    true
}

fn e(p: &str, e: E) -> (String, E) {
    (p.to_string(), e)
}

#[test]
fn review_repros_through_a_symlink_write_nothing_outside() {
    if !root() {
        return;
    }
    let s = Scene::new();
    let c = s.canary.display().to_string();
    let cases: Vec<(&str, Vec<(String, E)>)> = vec![
        (
            "whiteout",
            vec![
                e("esc", E::Symlink(c.clone())),
                e("esc/.wh.victim", E::File(b"")),
            ],
        ),
        (
            "opaque",
            vec![
                e("esc", E::Symlink(c.clone())),
                e("esc/.wh..wh..opq", E::File(b"")),
            ],
        ),
        (
            "block device",
            vec![e("esc", E::Symlink(c.clone())), e("esc/blk", E::Block)],
        ),
        (
            "rm -rf",
            vec![
                e("esc", E::Symlink(c.clone())),
                e("esc/.wh.sub", E::File(b"")),
            ],
        ),
        (
            "file",
            vec![
                e("esc", E::Symlink(c.clone())),
                e("esc/victim", E::File(b"pwn")),
            ],
        ),
        (
            "relative climb",
            vec![
                e("up", E::Symlink("../../../../../..".into())),
                e("up/canary/victim", E::File(b"pwn")),
            ],
        ),
        (
            "hard link out",
            vec![e("h", E::Hard(format!("{c}/victim")))],
        ),
        (
            "hard link up",
            vec![e("h", E::Hard("../../canary/victim".into()))],
        ),
        (
            "hard link via symlink",
            vec![
                e("esc", E::Symlink(c.clone())),
                e("h", E::Hard("esc/victim".into())),
            ],
        ),
        (
            "dotdot entry",
            vec![e("../../canary/victim", E::File(b"pwn"))],
        ),
        (
            "absolute entry",
            vec![(format!("{c}/victim"), E::File(b"pwn"))],
        ),
        (
            "fifo via dir symlink",
            vec![
                e("d", E::Symlink(format!("{c}/sub"))),
                e("d/deeper/p", E::Fifo),
            ],
        ),
    ];
    for (n, (what, entries)) in cases.iter().enumerate() {
        let (dest, r) = s.unpack(n, entries);
        s.assert_canary(what);
        assert!(
            dest.is_dir(),
            "{what}: the destination itself survives ({r:?})"
        );
    }
}

#[test]
fn whiteouts_that_name_no_file_are_refused() {
    if !root() {
        return;
    }
    let s = Scene::new();
    for (n, name) in [".wh.", ".wh..", ".wh...", "a/.wh..", "a/.wh..."]
        .iter()
        .enumerate()
    {
        let (dest, r) = s.unpack(
            n,
            &[
                e("a", E::Dir),
                e("a/keep", E::File(b"k")),
                e(name, E::File(b"")),
            ],
        );
        let err = r.expect_err(name);
        assert!(
            err.contains("names no file") || err.contains("escapes"),
            "{name}: {err}"
        );
        assert!(dest.is_dir(), "{name}: destination removed");
        assert!(
            dest.parent().unwrap().is_dir(),
            "{name}: its parent removed"
        );
        s.assert_canary(name);
    }
}

#[test]
fn legit_layers_still_unpack() {
    if !root() {
        return;
    }
    let s = Scene::new();
    let (dest, r) = s.unpack(
        0,
        &[
            e("usr", E::Dir),
            e("usr/lib", E::Dir),
            e("lib", E::Symlink("usr/lib".into())),
            e("usr/lib/a", E::File(b"a")),
            e("usr/lib/b", E::Hard("usr/lib/a".into())),
            e("etc", E::Dir),
            e("etc/.wh.gone", E::File(b"")),
            e("opt/.wh..wh..opq", E::File(b"")),
            e("run", E::Symlink("/run".into())),
            e("dev/loop0", E::Block),
        ],
    );
    r.unwrap();
    assert_eq!(fs::read(dest.join("usr/lib/b")).unwrap(), b"a");
    assert_eq!(fs::metadata(dest.join("usr/lib/b")).unwrap().nlink(), 2);
    assert_eq!(
        fs::read_link(dest.join("lib")).unwrap(),
        Path::new("usr/lib")
    );
    assert_eq!(
        fs::symlink_metadata(dest.join("etc/gone")).unwrap().rdev(),
        0
    );
    assert_eq!(
        fs::symlink_metadata(dest.join("dev/loop0")).unwrap().rdev(),
        rustix::fs::makedev(7, 0)
    );
    let wd = fs::metadata(dest.parent().unwrap()).unwrap();
    assert_eq!(
        wd.mode() & 0o777,
        0o700,
        "the work dir holding device nodes is root-only"
    );
    s.assert_canary("legit");
}

fn arb_name() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        Just("a".to_string()),
        Just("esc".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just(".wh.victim".to_string()),
        Just(".wh.sub".to_string()),
        Just(".wh.".to_string()),
        Just(".wh..".to_string()),
        Just(".wh..wh..opq".to_string()),
        Just("victim".to_string()),
        Just("sub".to_string()),
    ];
    (
        prop::collection::vec(part, 1..3),
        prop_oneof![Just(""), Just("esc/"), Just("esc/sub/"), Just("/")],
    )
        .prop_map(|(parts, prefix)| format!("{prefix}{}", parts.join("/")))
}

/// Symlink and hard-link targets; `@` stands for the scene's canary directory.
fn arb_target() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("@".to_string()),
        Just("@/sub".to_string()),
        Just("../../canary".to_string()),
        Just("../../../../../../../..".to_string()),
        Just("/".to_string()),
        Just("a".to_string()),
        Just("esc/victim".to_string()),
    ]
}

fn arb_entry() -> impl Strategy<Value = (String, E)> {
    let kind = prop_oneof![
        Just(E::File(b"pwn")),
        Just(E::Dir),
        arb_target().prop_map(E::Symlink),
        arb_target().prop_map(E::Hard),
        Just(E::Block),
        Just(E::Fifo),
    ];
    (arb_name(), kind)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// A layer that plants `esc` (a symlink to somewhere) and then random entries, many of
    /// them below `esc/`.
    #[test]
    fn random_entries_never_change_anything_outside(
        esc in arb_target(),
        random in prop::collection::vec(arb_entry(), 1..10)
    ) {
        if !root() {
            return Ok(());
        }
        let s = Scene::new();
        let c = s.canary.display().to_string();
        let at = |t: String| t.replace('@', &c);
        let mut entries = vec![("esc".to_string(), E::Symlink(at(esc)))];
        entries.extend(random.into_iter().map(|(p, e)| {
            let e = match e {
                E::Symlink(t) => E::Symlink(at(t)),
                E::Hard(t) => E::Hard(at(t)),
                other => other,
            };
            (p, e)
        }));
        let (dest, _) = s.unpack(0, &entries);
        s.assert_canary(&format!("{entries:?}"));
        prop_assert!(dest.parent().unwrap().is_dir());
    }
}

/// `layer::pack` writes sparse files as GNU sparse entries (tar's builder does); they unpack
/// to the same content.
#[test]
fn sparse_files_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::File::create(src.join("sparse")).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
    }
    let blobs = t.path().join("blobs");
    let packed = layer::pack(&src, &[], &blobs).unwrap();
    let out = t.path().join("work/out");
    let got = layer::unpack(&kairos_oci::image::blob_path(&blobs, &packed.digest), &out).unwrap();
    assert_eq!(packed.diff_id, got);
    assert_eq!(
        fs::read(src.join("sparse")).unwrap(),
        fs::read(out.join("sparse")).unwrap()
    );
}
