//! OCI round trips through real parts: layout dirs, archives, and Debian's docker-registry on
//! a loopback port; layer unpacking with whiteouts on a real filesystem (needs root).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use kairos_oci::{Error, ImageRef, fetch, import_dir, layer, store, store_to};

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("etc/hostname"), "img\n").unwrap();
    fs::write(root.join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(
        root.join("usr/bin/tool"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::os::unix::fs::symlink("../usr/bin/tool", root.join("etc/link")).unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("etc/hard")).unwrap();
    if is_root() {
        std::os::unix::fs::chown(root.join("etc/hostname"), Some(1234), Some(5678)).unwrap();
        fs::create_dir_all(root.join("dev")).unwrap();
        let st = Command::new("mknod")
            .arg(root.join("dev/null"))
            .args(["c", "1", "3"])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

#[test]
fn import_layout_archive_and_unpack_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let cache = t.path().join("cache");
    let img = import_dir(&src, &cache.join("blobs"), &["usr".to_string()]).unwrap();
    assert_eq!(img.manifest.layers.len(), 2, "usr split into its own layer");
    assert_eq!(img.diff_ids().unwrap().len(), 2);

    let layout = t.path().join("layout");
    store_to(
        &img,
        &ImageRef::parse(&format!("oci-layout:{}:v1", layout.display())).unwrap(),
        &cache,
        &mut |_, _, _| {},
    )
    .unwrap();
    let back = fetch(
        &ImageRef::parse(&format!("oci-layout:{}:v1", layout.display())).unwrap(),
        &cache,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(back.manifest_digest, img.manifest_digest);
    let e = fetch(
        &ImageRef::parse(&format!("oci-layout:{}:nope", layout.display())).unwrap(),
        &cache,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("no tag \"nope\"") && e.to_string().contains("v1"),
        "{e}"
    );

    let tar = t.path().join("img.tar");
    store_to(
        &img,
        &ImageRef::parse(&format!("ocifile:{}", tar.display())).unwrap(),
        &cache,
        &mut |_, _, _| {},
    )
    .unwrap();
    let cache2 = t.path().join("cache2");
    let from_tar = fetch(
        &ImageRef::parse(&format!("ocifile:{}", tar.display())).unwrap(),
        &cache2,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(from_tar.manifest_digest, img.manifest_digest);

    // Unpack both layers and check what a root tree needs survived, diff_ids included.
    let out = t.path().join("out");
    for (d, diff) in img.manifest.layers.iter().zip(img.diff_ids().unwrap()) {
        let got = layer::unpack(&img.blob_path(&d.digest), &out).unwrap();
        assert_eq!(diff, got);
    }
    assert_eq!(
        fs::read_to_string(out.join("etc/hostname")).unwrap(),
        "img\n"
    );
    assert_eq!(
        fs::metadata(out.join("usr/bin/tool"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::read_link(out.join("etc/link")).unwrap(),
        Path::new("../usr/bin/tool")
    );
    assert_eq!(
        fs::metadata(out.join("etc/hard")).unwrap().ino(),
        fs::metadata(out.join("etc/hostname")).unwrap().ino()
    );
    if is_root() {
        let m = fs::metadata(out.join("etc/hostname")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 5678));
        let dev = fs::symlink_metadata(out.join("dev/null")).unwrap();
        assert_eq!(
            dev.rdev(),
            fs::metadata("/dev/null").unwrap().rdev(),
            "device nodes keep their numbers"
        );
    }
}

#[test]
fn whiteouts_become_overlay_whiteouts() {
    if !is_root() {
        eprintln!("whiteouts need root (mknod, trusted.* xattrs): run as root (CI does)");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let tar_path = t.path().join("layer.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&tar_path).unwrap());
        for (path, data) in [
            ("etc/.wh.removed", &b""[..]),
            ("opt/.wh..wh..opq", b""),
            ("opt/new", b"n"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, path, data).unwrap();
        }
        b.finish().unwrap();
    }
    let out = t.path().join("tree");
    layer::unpack(&tar_path, &out).unwrap();
    let wh = fs::symlink_metadata(out.join("etc/removed")).unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout is a 0:0 char device"
    );
    let o = Command::new("getfattr")
        .args(["-n", "trusted.overlay.opaque", "--only-values"])
        .arg(out.join("opt"))
        .output()
        .expect("getfattr (Debian package attr; scripts/setup installs it)");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "y",
        "opaque directory marked for overlayfs"
    );
    assert!(!out.join("opt/.wh..wh..opq").exists());
    assert_eq!(fs::read_to_string(out.join("opt/new")).unwrap(), "n");
}

#[test]
fn registry_push_pull_only_missing_blobs_and_refuse_bad_digests() {
    let t = tempfile::tempdir().unwrap();
    let reg = kairos_oci::testing::TestRegistry::start().unwrap();
    let src = t.path().join("src");
    sample_tree(&src);
    let cache = t.path().join("cache");
    let img = import_dir(&src, &cache.join("blobs"), &[]).unwrap();
    let r = ImageRef::parse(&format!("{}/kairos/test:v1", reg.addr)).unwrap();
    store_to(&img, &r, &cache, &mut |_, _, _| {}).unwrap();

    // A fresh cache pulls every blob; a second pull transfers nothing new.
    let fresh = t.path().join("fresh");
    let mut downloaded = 0u64;
    let pulled = fetch(&r, &fresh, &mut |_, done, total| {
        if done == total {
            downloaded += total
        }
    })
    .unwrap();
    assert_eq!(pulled.manifest_digest, img.manifest_digest);
    assert!(downloaded > 0);
    // The registry's own count (its access log) agrees: blobs plus the manifest.
    let served = reg.bytes_served();
    assert!(
        served >= downloaded && served < downloaded + (64 << 10),
        "registry served {served} bytes for {downloaded} downloaded"
    );
    let before: Vec<_> = fs::read_dir(fresh.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    fetch(&r, &fresh, &mut |_, _, _| {}).unwrap();
    assert_eq!(
        fs::read_dir(fresh.join("blobs/sha256")).unwrap().count(),
        before.len()
    );

    // Unknown tag, unknown registry.
    let e = fetch(
        &ImageRef::parse(&format!("{}/kairos/test:nope", reg.addr)).unwrap(),
        &fresh,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    let e = fetch(
        &ImageRef::parse("127.0.0.1:9/x/y:z").unwrap(),
        &fresh,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("is the registry running"), "{e}");

    // A blob whose bytes do not match its digest is refused and not stored.
    let layer = &img.manifest.layers[0].digest;
    let hex = layer.trim_start_matches("sha256:");
    let data = reg.storage.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    fs::write(&data, b"tampered").unwrap();
    let other = t.path().join("other");
    let e = fetch(&r, &other, &mut |_, _, _| {}).unwrap_err();
    assert!(matches!(e, Error::Digest { .. }), "{e}");
    assert!(
        !store::layout_blobs(&other)
            .join(format!("sha256/{hex}"))
            .exists()
    );
}

#[test]
fn zstd_layers_unpack_and_verify_against_the_tar_digest() {
    let t = tempfile::tempdir().unwrap();
    let tar_path = t.path().join("layer.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&tar_path).unwrap());
        let data = b"compressed with zstd\n";
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o640);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, "etc/zstd-file", &data[..]).unwrap();
        b.finish().unwrap();
    }
    let diff_id = format!("sha256:{}", kairos_layers::sha256_file(&tar_path).unwrap());
    let st = Command::new("zstd")
        .args(["-q", "-19", "-k"])
        .arg(&tar_path)
        .status()
        .expect("zstd (Debian package zstd; scripts/setup installs it)");
    assert!(st.success());
    let out = t.path().join("tree");
    let got = layer::unpack(&t.path().join("layer.tar.zst"), &out).unwrap();
    assert_eq!(
        got, diff_id,
        "the diff_id is the digest of the uncompressed tar"
    );
    assert_eq!(
        fs::read_to_string(out.join("etc/zstd-file")).unwrap(),
        "compressed with zstd\n"
    );
}
