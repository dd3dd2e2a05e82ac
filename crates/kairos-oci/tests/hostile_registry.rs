//! Hostile registries, archives and layouts, served by a scripted HTTP server written for
//! these tests (a stand-in, not a real registry: it answers exactly what each test scripts,
//! including what no honest registry would). Checks: credentials never leave the registry's
//! origin, a blob larger than its descriptor is cut off with nothing left behind, index chains
//! and bad digests are refused before they become a path or a URL, and a layout's or
//! archive's "blob" that is really a host file never reaches a registry or the blob store.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use kairos_oci::image::{Descriptor, Digest, Index, MT_OCI_INDEX, Manifest, Platform};
use kairos_oci::registry::{Registry, basic_auth};
use kairos_oci::{Error, store};

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    auth: Option<String>,
    body_len: usize,
}

type Reply = (u16, Vec<(String, String)>, Vec<u8>);
type Handler = dyn Fn(&str, &str) -> Reply + Send + Sync;

/// A scripted HTTP/1.1 server on a loopback port; every request is recorded.
struct Fake {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    fn start(handler: Box<Handler>) -> Fake {
        Fake::start_on("127.0.0.1", handler)
    }

    fn start_on(ip: &str, handler: Box<Handler>) -> Fake {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (seen2, handler) = (seen.clone(), Arc::new(handler));
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (seen, handler) = (seen2.clone(), handler.clone());
                std::thread::spawn(move || serve(s, &seen, &**handler));
            }
        });
        Fake { port, seen }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(s: TcpStream, seen: &Mutex<Vec<Seen>>, handler: &Handler) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            auth: headers.get("authorization").cloned(),
            body_len: len,
        });
        let (status, hdrs, data) = handler(&method, &path);
        let mut out = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", data.len());
        for (k, v) in hdrs {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
        if method != "HEAD" && w.write_all(&data).is_err() {
            return;
        }
    }
}

fn ok(body: Vec<u8>, ct: &str) -> Reply {
    (200, vec![("Content-Type".into(), ct.into())], body)
}

fn not_found() -> Reply {
    (404, vec![], b"{}".to_vec())
}

fn desc(mt: &str, data: &[u8]) -> Descriptor {
    Descriptor::new(mt, Digest::of(data), data.len() as u64)
}

/// An image (config + one layer) as bytes, with the config's diff_ids as given.
fn image(diff_ids: serde_json::Value, layer: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap();
    let m = Manifest::oci(
        Digest::of(&config),
        config.len() as u64,
        vec![desc("application/vnd.oci.image.layer.v1.tar", layer)],
    );
    (serde_json::to_vec(&m).unwrap(), config)
}

fn blobs_left(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("sha256")) {
        for e in rd.flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn credentials_never_leave_the_registry_origin() {
    // B: another origin (a different port), asked for tokens and uploads.
    let b = Fake::start(Box::new(|method, path| {
        if path.starts_with("/token") {
            return ok(br#"{"token":"tok-from-b"}"#.to_vec(), "application/json");
        }
        if method == "PUT" {
            return (201, vec![], Vec::new());
        }
        not_found()
    }));
    let b_host = b.host();
    // A: the registry; it wants a bearer token from B's realm, and sends uploads to B.
    let a = Fake::start(Box::new(move |method, path| match (method, path) {
        (_, p) if p.starts_with("/v2/x/blobs/uploads") => (
            202,
            vec![("Location".into(), format!("http://{b_host}/upload/1"))],
            Vec::new(),
        ),
        ("HEAD", _) => not_found(),
        _ => (
            401,
            vec![(
                "WWW-Authenticate".into(),
                format!("Bearer realm=\"http://{b_host}/token\",service=\"svc\""),
            )],
            Vec::new(),
        ),
    }));
    let t = tempfile::tempdir().unwrap();
    let blobs = t.path().join("blobs");
    let (m, config) = image(serde_json::json!([Digest::of(b"l").to_string()]), b"l");
    store::put_bytes(&blobs, &config).unwrap();
    store::put_bytes(&blobs, b"l").unwrap();
    let md = store::put_bytes(&blobs, &m).unwrap();
    let img = store::local_image(&blobs, serde_json::from_slice(&m).unwrap(), md).unwrap();

    let mut reg = Registry::new(&a.host(), "x");
    reg.set_credentials(Some(basic_auth("user", "secret")));
    // A pull asks B for a `pull` token, without A's password.
    let _ = reg.pull("v1", &t.path().join("pulled"), &mut |_, _, _| {});
    let token_reqs: Vec<_> = b
        .seen()
        .into_iter()
        .filter(|s| s.path.starts_with("/token"))
        .collect();
    assert!(!token_reqs.is_empty(), "the realm was asked for a token");
    for s in &token_reqs {
        assert_eq!(
            s.auth, None,
            "credentials sent to another origin's realm: {s:?}"
        );
        assert!(
            s.path.contains("scope=repository:x:pull&") || s.path.ends_with(":pull"),
            "{s:?}"
        );
        assert!(!s.path.contains("push"), "a pull asked for push: {s:?}");
    }
    // A push uploads to B's Location: without A's credentials or A's token.
    let _ = reg.push(&img, "v1", &mut |_, _, _| {});
    let puts: Vec<_> = b.seen().into_iter().filter(|s| s.method == "PUT").collect();
    assert!(!puts.is_empty(), "the upload went to the Location");
    for s in &puts {
        assert_eq!(
            s.auth, None,
            "credentials sent with an upload to another origin: {s:?}"
        );
    }
    // A itself saw the basic credentials or the token (same origin), never over to B.
    assert!(a.seen().iter().any(|s| s.auth.is_some()));
}

#[test]
fn plain_http_carries_no_credentials_to_a_remote_host() {
    // 127.0.0.2 stands in for a remote host: reached over plain HTTP only because insecure
    // registries are allowed, and not one of the loopback names credentials may go to.
    kairos_oci::registry::allow_insecure_registries();
    let fake = Fake::start_on("127.0.0.2", Box::new(|_, _| not_found()));
    let host = format!("127.0.0.2:{}", fake.port);
    let mut reg = Registry::new(&host, "x");
    reg.set_credentials(Some(basic_auth("user", "secret")));
    let e = reg.pull("v1", Path::new("/nonexistent-blobs"), &mut |_, _, _| {});
    assert!(matches!(e, Err(Error::NotFound(_))), "{:?}", e.err());
    let seen = fake.seen();
    assert!(!seen.is_empty(), "the request was made over plain HTTP");
    assert!(seen.iter().all(|s| s.auth.is_none()), "{seen:?}");
}

#[test]
fn oversized_blob_is_cut_off_and_nothing_is_left() {
    let layer = vec![7u8; 4096];
    let (m, config) = image(serde_json::json!([Digest::of(&layer).to_string()]), &layer);
    let (m2, config2, layer2) = (m.clone(), config.clone(), layer.clone());
    let fake = Fake::start(Box::new(move |_, path| {
        let hex = |d: &[u8]| Digest::of(d).hex().to_string();
        if path.contains("/manifests/") {
            ok(m2.clone(), "application/vnd.oci.image.manifest.v1+json")
        } else if path.ends_with(&hex(&config2)) {
            ok(config2.clone(), "application/octet-stream")
        } else if path.ends_with(&hex(&layer2)) {
            // Twice the bytes the descriptor promises (a "gzip bomb" sent raw).
            let mut big = layer2.clone();
            big.extend_from_slice(&layer2);
            ok(big, "application/octet-stream")
        } else {
            not_found()
        }
    }));
    let t = tempfile::tempdir().unwrap();
    let blobs = t.path().join("blobs");
    let mut reg = Registry::new(&fake.host(), "x");
    let e = reg.pull("v1", &blobs, &mut |_, _, _| {}).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(Digest::of(&layer).as_str()),
        "names the blob: {msg}"
    );
    assert!(msg.contains("4096"), "names the descriptor size: {msg}");
    let left = blobs_left(&blobs);
    assert!(
        left.iter().all(|n| !n.contains("partial"))
            && !left.contains(&Digest::of(&layer).hex().to_string()),
        "{left:?}"
    );
}

#[test]
fn bad_digests_and_index_loops_are_refused() {
    // An index whose linux/amd64 entry is a tag, not a digest (looped forever before).
    let bad_index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"v1","size":1,"platform":{"architecture":"amd64","os":"linux"}}]}"#.to_vec();
    // A chain of nested indexes, each pointing to the next by a valid digest.
    let mut chain: Vec<Vec<u8>> = Vec::new();
    let mut next = Digest::of(b"bottom");
    for _ in 0..8 {
        let idx = Index {
            schema_version: 2,
            media_type: Some(MT_OCI_INDEX.into()),
            manifests: vec![Descriptor {
                platform: Some(Platform {
                    architecture: "amd64".into(),
                    os: "linux".into(),
                    variant: None,
                }),
                ..Descriptor::new(MT_OCI_INDEX, next.clone(), 10)
            }],
        };
        let bytes = serde_json::to_vec(&idx).unwrap();
        next = Digest::of(&bytes);
        chain.push(bytes);
    }
    let top = chain.last().unwrap().clone();
    // An image whose config names a diff_id that is a path.
    let (evil_m, evil_config) = image(serde_json::json!(["sha256:/../../x"]), b"l");
    let fake = Fake::start(Box::new(move |_, path| {
        let by_digest: HashMap<String, Vec<u8>> = chain
            .iter()
            .map(|c| (Digest::of(c).to_string(), c.clone()))
            .chain([(Digest::of(&evil_config).to_string(), evil_config.clone())])
            .collect();
        let r = path.rsplit('/').next().unwrap_or("");
        match r {
            "loop" => ok(bad_index.clone(), MT_OCI_INDEX),
            "chain" => ok(top.clone(), MT_OCI_INDEX),
            "evil" => ok(evil_m.clone(), "application/vnd.oci.image.manifest.v1+json"),
            d => by_digest
                .get(d)
                .map(|b| ok(b.clone(), MT_OCI_INDEX))
                .unwrap_or_else(not_found),
        }
    }));
    let t = tempfile::tempdir().unwrap();
    let blobs = t.path().join("blobs");
    let mut reg = Registry::new(&fake.host(), "x");
    let e = reg.pull("loop", &blobs, &mut |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("not a valid digest"), "{e}");
    let e = reg.pull("chain", &blobs, &mut |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("nested indexes"), "{e}");
    let e = reg.pull("evil", &blobs, &mut |_, _, _| {}).unwrap_err();
    assert!(
        matches!(e, Error::Format(_)) && e.to_string().contains("diff_ids"),
        "{e}"
    );
    // The digest in a manifest request is checked before it goes into the URL.
    let before = fake.seen().len();
    assert!(reg.resolve("sha256:../../../etc").is_err());
    assert!(reg.resolve("../../x").is_err());
    assert_eq!(
        fake.seen().len(),
        before,
        "a bad reference reached the server"
    );
}

#[test]
fn a_layout_blob_that_is_a_host_file_is_never_uploaded() {
    let t = tempfile::tempdir().unwrap();
    let secret = t.path().join("secret");
    std::fs::write(&secret, b"host secret").unwrap();
    // A layout whose layer "blob" is a symlink to the host file; the manifest claims it.
    let layout = t.path().join("layout");
    let blobs = layout.join("blobs");
    let claimed = Digest::of(b"what the manifest says");
    let (m, config) = {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec();
        let m = Manifest::oci(
            Digest::of(&config),
            config.len() as u64,
            vec![Descriptor::new(
                "application/vnd.oci.image.layer.v1.tar",
                claimed.clone(),
                11,
            )],
        );
        (serde_json::to_vec(&m).unwrap(), config)
    };
    store::put_bytes(&blobs, &config).unwrap();
    let md = store::put_bytes(&blobs, &m).unwrap();
    std::os::unix::fs::symlink(&secret, blobs.join("sha256").join(claimed.hex())).unwrap();
    let img = store::local_image(&blobs, serde_json::from_slice(&m).unwrap(), md).unwrap();
    let fake = Fake::start(Box::new(|method, path| {
        if method == "HEAD" {
            not_found()
        } else if path.contains("/blobs/uploads/") && method == "POST" {
            (
                202,
                vec![("Location".into(), "/v2/x/blobs/uploads/1".into())],
                Vec::new(),
            )
        } else {
            (201, vec![], Vec::new())
        }
    }));
    let mut reg = Registry::new(&fake.host(), "x");
    let e = reg.push(&img, "v1", &mut |_, _, _| {}).unwrap_err();
    assert!(matches!(e, Error::Digest { .. }), "{e}");
    assert!(
        fake.seen()
            .iter()
            .all(|s| s.method != "PUT" || s.body_len == 0),
        "a blob body was uploaded: {:?}",
        fake.seen()
    );
}

#[test]
fn a_docker_save_layer_outside_the_archive_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let secret = t.path().join("secret");
    std::fs::write(&secret, b"host secret").unwrap();
    let tar_path = t.path().join("save.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        let manifest = format!(
            r#"[{{"Config":"c.json","Layers":["{}"]}}]"#,
            secret.display()
        );
        for (name, data) in [
            ("manifest.json", manifest.as_bytes()),
            ("c.json", br#"{"rootfs":{"diff_ids":[]}}"#.as_slice()),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        b.finish().unwrap();
    }
    let blobs = t.path().join("blobs");
    let e = kairos_oci::archive::read_archive(&tar_path, &blobs, &t.path().join("scratch"))
        .unwrap_err();
    assert!(e.to_string().contains("not a file in the archive"), "{e}");
    let secret_blob = Digest::of(b"host secret").hex().to_string();
    assert!(
        !blobs_left(&blobs).contains(&secret_blob),
        "the host file became a blob"
    );
}

#[test]
fn a_registry_that_stops_answering_times_out_with_a_clear_error() {
    // Accepts the connection, reads the request, never answers.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    let mut reg = Registry::new(&format!("127.0.0.1:{port}"), "x");
    reg.set_response_timeout(std::time::Duration::from_millis(500));
    let e = reg
        .pull("v1", Path::new("/nonexistent-blobs"), &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{port}")),
        "names the registry: {e}"
    );
    assert!(e.contains("stopped answering in time"), "{e}");
}
