//! A registry client (distribution API v2): pull manifests and blobs into the blob store with
//! digest checks, push blobs and manifests. Anonymous, basic and bearer-token auth, with
//! credentials from docker's `config.json`; plain HTTP for loopback registries.

use std::path::Path;
use std::time::Duration;

use base64::Engine;

use crate::Error;
use crate::image::{
    Descriptor, LocalImage, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST,
    Manifest, pick_platform,
};
use crate::store::{self, put_verified};

pub struct Registry {
    agent: ureq::Agent,
    base: String,
    host: String,
    repository: String,
    token: Option<String>,
    basic: Option<String>,
}

static ALLOW_INSECURE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets every registry be reached over plain HTTP (`upgrade.allow-insecure-registries`).
pub fn allow_insecure_registries() {
    ALLOW_INSECURE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// True for registries that are reached over plain HTTP: loopback, listed in
/// `KAIROS_INSECURE_REGISTRIES` (comma-separated hosts, `*` for all), or all once
/// [`allow_insecure_registries`] was called.
pub fn is_insecure(host: &str) -> bool {
    let name = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    matches!(name, "localhost" | "127.0.0.1" | "[::1]")
        || ALLOW_INSECURE.load(std::sync::atomic::Ordering::Relaxed)
        || std::env::var("KAIROS_INSECURE_REGISTRIES")
            .is_ok_and(|v| v.split(',').any(|h| h.trim() == host || h.trim() == "*"))
}

/// `auths.<host>.auth` from `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
fn docker_auth(host: &str) -> Option<String> {
    let dir = std::env::var("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".docker")))
        .ok()?;
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).ok()?).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let key = if host == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        host
    };
    auths
        .get(key)
        .or_else(|| auths.get(host))?
        .get("auth")?
        .as_str()
        .map(str::to_string)
}

impl Registry {
    pub fn new(host: &str, repository: &str) -> Registry {
        let api_host = if host == "docker.io" {
            "registry-1.docker.io"
        } else {
            host
        };
        let scheme = if is_insecure(host) { "http" } else { "https" };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(15)))
            .http_status_as_error(false)
            .build()
            .into();
        Registry {
            agent,
            base: format!("{scheme}://{api_host}/v2/{repository}"),
            host: host.to_string(),
            repository: repository.to_string(),
            token: None,
            basic: docker_auth(host),
        }
    }

    fn auth_header(&self) -> Option<String> {
        self.token
            .as_ref()
            .map(|t| format!("Bearer {t}"))
            .or_else(|| self.basic.as_ref().map(|b| format!("Basic {b}")))
    }

    /// Gets a bearer token as the registry's 401 asks for it.
    fn authenticate(&mut self, challenge: &str) -> Result<(), Error> {
        let Some(params) = challenge.strip_prefix("Bearer ") else {
            return Ok(());
        };
        let get = |k: &str| {
            params.split(',').find_map(|kv| {
                let (a, b) = kv.trim().split_once('=')?;
                (a == k).then(|| b.trim_matches('"').to_string())
            })
        };
        let realm = get("realm").ok_or_else(|| {
            Error::Registry(format!("{}: bad auth challenge {challenge}", self.host))
        })?;
        let mut url = format!("{realm}?scope=repository:{}:pull,push", self.repository);
        if let Some(s) = get("service") {
            url.push_str(&format!("&service={s}"));
        }
        let mut req = self.agent.get(&url);
        if let Some(b) = &self.basic {
            req = req.header("Authorization", &format!("Basic {b}"));
        }
        let mut resp = req
            .call()
            .map_err(|e| Error::Registry(format!("{}: token request: {e}", self.host)))?;
        if resp.status() != 200 {
            return Err(Error::Registry(format!(
                "{}: token request refused (HTTP {}): check credentials in ~/.docker/config.json",
                self.host,
                resp.status()
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&Self::read_body(&mut resp)?)
            .map_err(|e| Error::Registry(format!("{}: token: {e}", self.host)))?;
        self.token = v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .map(str::to_string);
        Ok(())
    }

    /// Sends a request, authenticating once on 401.
    fn send(
        &mut self,
        method: &str,
        url: &str,
        accept: Option<&str>,
        body: Option<(&str, &[u8])>,
    ) -> Result<ureq::http::Response<ureq::Body>, Error> {
        let net = |e: ureq::Error| {
            Error::Registry(format!(
                "{url}: {e} (is the registry running and reachable?)"
            ))
        };
        for attempt in 0..2 {
            let mut req = ureq::http::Request::builder().method(method).uri(url);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if let Some(h) = self.auth_header() {
                req = req.header("Authorization", h);
            }
            let resp = match body {
                Some((ct, data)) => {
                    let req = req
                        .header("Content-Type", ct)
                        .body(data.to_vec())
                        .map_err(|e| Error::Registry(e.to_string()))?;
                    self.agent.run(req).map_err(net)?
                }
                None => {
                    let req = req.body(()).map_err(|e| Error::Registry(e.to_string()))?;
                    self.agent.run(req).map_err(net)?
                }
            };
            if resp.status() == 401 && attempt == 0 {
                let ch = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if ch.starts_with("Bearer ") {
                    self.authenticate(&ch)?;
                    continue;
                }
            }
            return Ok(resp);
        }
        Err(Error::Registry(format!("{url}: unauthorized")))
    }

    fn read_body(resp: &mut ureq::http::Response<ureq::Body>) -> Result<Vec<u8>, Error> {
        resp.body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .map_err(|e| Error::Registry(e.to_string()))
    }

    /// Pulls `reference` (tag or digest) into `blobs`, resolving an index to linux/amd64.
    /// Only blobs missing from `blobs` are downloaded; `progress(digest, done, total)`.
    pub fn pull(
        &mut self,
        reference: &str,
        blobs: &Path,
        progress: &mut dyn FnMut(&str, u64, u64),
    ) -> Result<LocalImage, Error> {
        self.pull_some(reference, blobs, &|_| true, progress)
    }

    /// Like [`Registry::pull`], but downloads only the layers for which `wanted(diff_id)` is
    /// true (the config says each layer's diff_id before any layer is fetched). The image
    /// returned then lacks the other layers' blobs: callers that skip a layer already have
    /// its content in another form (an upgrade's layer store).
    pub fn pull_some(
        &mut self,
        reference: &str,
        blobs: &Path,
        wanted: &dyn Fn(&str) -> bool,
        progress: &mut dyn FnMut(&str, u64, u64),
    ) -> Result<LocalImage, Error> {
        let (manifest, digest, body) = self.resolve(reference)?;
        self.pull_blob(&manifest.config, blobs, progress)?;
        let config: serde_json::Value =
            serde_json::from_slice(&crate::store::read_blob(blobs, &manifest.config.digest)?)
                .map_err(|e| {
                    Error::Format(format!("image config {}: {e}", manifest.config.digest))
                })?;
        let diff_ids = crate::image::config_diff_ids(&config);
        if diff_ids.len() != manifest.layers.len() {
            return Err(Error::Format(format!(
                "{}/{}:{reference}: {} layers but {} diff_ids in the config",
                self.host,
                self.repository,
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        for (d, id) in manifest.layers.iter().zip(&diff_ids) {
            if wanted(id) {
                self.pull_blob(d, blobs, progress)?;
            }
        }
        put_verified(blobs, &digest, &mut &body[..], &mut |_| {})?;
        store::local_image(blobs, manifest, digest)
    }

    /// The image manifest for `reference` (an index resolved to linux/amd64), its digest and
    /// its bytes.
    pub fn resolve(&mut self, reference: &str) -> Result<(Manifest, String, Vec<u8>), Error> {
        let accept = [
            MT_OCI_MANIFEST,
            MT_OCI_INDEX,
            MT_DOCKER_MANIFEST,
            MT_DOCKER_LIST,
        ]
        .join(", ");
        let url = format!("{}/manifests/{reference}", self.base);
        let mut resp = self.send("GET", &url, Some(&accept), None)?;
        match resp.status().as_u16() {
            200 => {}
            404 => {
                return Err(Error::NotFound(format!(
                    "{}/{}:{reference}: no such image or tag",
                    self.host, self.repository
                )));
            }
            s => return Err(Error::Registry(format!("{url}: HTTP {s}"))),
        }
        let body = Self::read_body(&mut resp)?;
        let digest = format!("sha256:{}", kairos_layers::sha256_hex(&body));
        if reference.starts_with("sha256:") && digest != reference {
            return Err(Error::Digest {
                digest: reference.into(),
                found: digest,
            });
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| Error::Format(format!("{url}: {e}")))?;
        if v.get("manifests").is_some() {
            let idx: crate::image::Index =
                serde_json::from_value(v).map_err(|e| Error::Format(e.to_string()))?;
            let d = pick_platform(&idx)
                .ok_or_else(|| {
                    Error::NotFound(format!("{url}: no linux/amd64 image in the index"))
                })?
                .digest
                .clone();
            return self.resolve(&d);
        }
        let manifest: Manifest =
            serde_json::from_value(v).map_err(|e| Error::Format(format!("{url}: {e}")))?;
        Ok((manifest, digest, body))
    }

    /// Downloads one blob into `blobs` unless it is there; verified before it is kept.
    pub fn pull_blob(
        &mut self,
        d: &Descriptor,
        blobs: &Path,
        progress: &mut dyn FnMut(&str, u64, u64),
    ) -> Result<(), Error> {
        if crate::image::blob_path(blobs, &d.digest).exists() {
            progress(&d.digest, d.size, d.size);
            return Ok(());
        }
        let url = format!("{}/blobs/{}", self.base, d.digest);
        let mut resp = self.send("GET", &url, None, None)?;
        if resp.status() != 200 {
            return Err(Error::Registry(format!("{url}: HTTP {}", resp.status())));
        }
        let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
        let total = d.size;
        let dg = d.digest.clone();
        put_verified(blobs, &d.digest, &mut reader, &mut |done| {
            progress(&dg, done, total)
        })?;
        Ok(())
    }

    /// Pushes every blob the registry lacks, then the manifest under `tag`.
    pub fn push(
        &mut self,
        img: &LocalImage,
        tag: &str,
        progress: &mut dyn FnMut(&str, u64, u64),
    ) -> Result<(), Error> {
        for d in img.manifest.layers.iter().chain([&img.manifest.config]) {
            let head = self.send(
                "HEAD",
                &format!("{}/blobs/{}", self.base, d.digest),
                None,
                None,
            )?;
            if head.status() == 200 {
                progress(&d.digest, d.size, d.size);
                continue;
            }
            let mut start =
                self.send("POST", &format!("{}/blobs/uploads/", self.base), None, None)?;
            if start.status() != 202 {
                let body =
                    String::from_utf8_lossy(&Self::read_body(&mut start).unwrap_or_default())
                        .into_owned();
                return Err(Error::Registry(format!(
                    "starting upload of {}: HTTP {} {body}",
                    d.digest,
                    start.status()
                )));
            }
            let loc = start
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let loc = if loc.starts_with('/') {
                let origin = self.base.split("/v2/").next().unwrap_or("");
                format!("{origin}{loc}")
            } else {
                loc
            };
            let sep = if loc.contains('?') { '&' } else { '?' };
            // Monolithic upload: the blob is read whole (layers here are tens to hundreds of MB).
            let data = std::fs::read(img.blob_path(&d.digest)).map_err(|e| Error::Io {
                path: img.blob_path(&d.digest),
                source: e,
            })?;
            let put = self.send(
                "PUT",
                &format!("{loc}{sep}digest={}", d.digest),
                None,
                Some(("application/octet-stream", &data)),
            )?;
            if put.status() != 201 {
                return Err(Error::Registry(format!(
                    "uploading {}: HTTP {}",
                    d.digest,
                    put.status()
                )));
            }
            progress(&d.digest, d.size, d.size);
        }
        let body = store::read_blob(&img.blobs, &img.manifest_digest)?;
        let mt = img
            .manifest
            .media_type
            .clone()
            .unwrap_or_else(|| MT_OCI_MANIFEST.into());
        let put = self.send(
            "PUT",
            &format!("{}/manifests/{tag}", self.base),
            None,
            Some((&mt, &body)),
        )?;
        if put.status() != 201 {
            return Err(Error::Registry(format!(
                "pushing manifest {tag}: HTTP {}",
                put.status()
            )));
        }
        Ok(())
    }
}

/// Basic credentials as docker stores them (`base64(user:password)`).
pub fn basic_auth(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}
