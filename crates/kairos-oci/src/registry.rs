//! A registry client (distribution API v2): pull manifests and blobs into the blob store with
//! digest checks, push blobs and manifests. Anonymous, basic and bearer-token auth, with
//! credentials from docker's `config.json`; plain HTTP for loopback registries.
//!
//! A registry's answers are untrusted: digests are parsed ([`Digest`]) before they become a
//! path or a URL, a blob is cut off one byte past its descriptor's size, every request has
//! time limits, index chains are bounded, and credentials only go back to the registry's own
//! origin (an upload `Location` or token realm elsewhere gets none; plain HTTP carries none
//! to a host that is not loopback).

use std::path::Path;
use std::time::Duration;

use base64::Engine;

use crate::Error;
use crate::image::{
    Descriptor, Digest, LocalImage, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX,
    MT_OCI_MANIFEST, Manifest,
};
use crate::store::{self, put_verified};

pub struct Registry {
    agent: ureq::Agent,
    base: String,
    /// `scheme://host[:port]` of `base`: where credentials may be sent.
    origin: String,
    host: String,
    repository: String,
    token: Option<String>,
    basic: Option<String>,
    /// The token scope asked for: `pull` until a push needs `pull,push`.
    scope: &'static str,
    /// Time for an answer's headers and a small body ([`RESPONSE_TIMEOUT`] unless changed).
    response_timeout: Duration,
    /// The platform an index is resolved to.
    platform: crate::image::Platform,
}

/// Time to get the answer's headers, and to read a small (JSON) body.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// A blob body may take this long plus one second per [`BLOB_MIN_RATE`] bytes.
pub const BLOB_BASE_TIMEOUT: Duration = Duration::from_secs(120);
/// The slowest transfer rate (bytes/s) a blob download is allowed to average.
pub const BLOB_MIN_RATE: u64 = 64 * 1024;
/// How many index levels a manifest reference may go through.
pub const MAX_INDEX_DEPTH: usize = 4;

/// `scheme://host[:port]` of a URL (lowercased), or "" when it has none.
pub fn origin_of(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return String::new();
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    // Userinfo never counts as part of the host.
    let host = host.rsplit_once('@').map(|(_, h)| h).unwrap_or(host);
    let default_port = match scheme {
        "http" => ":80",
        "https" => ":443",
        _ => "",
    };
    let host = host.strip_suffix(default_port).unwrap_or(host);
    format!(
        "{}://{}",
        scheme.to_ascii_lowercase(),
        host.to_ascii_lowercase()
    )
}

fn is_loopback(host: &str) -> bool {
    let name = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    matches!(name, "localhost" | "127.0.0.1" | "[::1]")
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
    is_loopback(host)
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
            .timeout_send_request(Some(RESPONSE_TIMEOUT))
            .timeout_recv_response(Some(RESPONSE_TIMEOUT))
            .timeout_recv_body(Some(RESPONSE_TIMEOUT))
            .http_status_as_error(false)
            // Redirects are followed by hand-free ureq only without credentials (ureq drops
            // Authorization on a redirect to another host).
            .build()
            .into();
        let base = format!("{scheme}://{api_host}/v2/{repository}");
        Registry {
            agent,
            origin: origin_of(&base),
            base,
            host: host.to_string(),
            repository: repository.to_string(),
            token: None,
            basic: docker_auth(host),
            scope: "pull",
            response_timeout: RESPONSE_TIMEOUT,
            platform: crate::image::Platform::native(),
        }
    }

    /// Resolves indexes to `p` instead of linux/amd64.
    pub fn set_platform(&mut self, p: crate::image::Platform) {
        self.platform = p;
    }

    /// Waits at most `t` for an answer (instead of [`RESPONSE_TIMEOUT`]).
    pub fn set_response_timeout(&mut self, t: Duration) {
        self.response_timeout = t;
    }

    /// Uses `basic` (`base64(user:password)`) instead of what docker's config.json holds.
    pub fn set_credentials(&mut self, basic: Option<String>) {
        self.basic = basic;
    }

    /// Credentials for a request to `url`: only to the registry's own origin, and over plain
    /// HTTP only to a loopback registry.
    fn auth_header(&self, url: &str) -> Option<String> {
        if origin_of(url) != self.origin {
            return None;
        }
        if self.origin.starts_with("http://") && !is_loopback(&self.host) {
            return None;
        }
        self.token
            .as_ref()
            .map(|t| format!("Bearer {t}"))
            .or_else(|| self.basic.as_ref().map(|b| format!("Basic {b}")))
    }

    /// May the registry's basic credentials go to this token realm? Its own origin, or for
    /// Docker Hub its token service; any other realm gets an anonymous token request.
    fn realm_gets_credentials(&self, realm: &str) -> bool {
        let o = origin_of(realm);
        o == self.origin || (self.host == "docker.io" && o == "https://auth.docker.io")
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
        if !realm.starts_with("https://") && !realm.starts_with("http://") {
            return Err(Error::Registry(format!(
                "{}: token realm {realm:?} is not an http(s) URL",
                self.host
            )));
        }
        let sep = if realm.contains('?') { '&' } else { '?' };
        let mut url = format!(
            "{realm}{sep}scope=repository:{}:{}",
            self.repository, self.scope
        );
        if let Some(s) = get("service") {
            url.push_str(&format!("&service={s}"));
        }
        let mut req = self.agent.get(&url);
        if let Some(b) = &self.basic
            && self.realm_gets_credentials(&realm)
            && (realm.starts_with("https://") || is_loopback(&self.host))
        {
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
        self.send_with(method, url, accept, body, self.response_timeout)
    }

    /// The per-request time limits: the answer's headers, then its body.
    fn with_timeouts<B: ureq::AsSendBody>(
        &self,
        req: ureq::http::Request<B>,
        body_timeout: Duration,
    ) -> ureq::http::Request<B> {
        self.agent
            .configure_request(req)
            .timeout_recv_response(Some(self.response_timeout))
            .timeout_recv_body(Some(body_timeout))
            .build()
    }

    fn send_with(
        &mut self,
        method: &str,
        url: &str,
        accept: Option<&str>,
        body: Option<(&str, &[u8])>,
        body_timeout: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, Error> {
        let net = |e: ureq::Error| {
            let hint = match e {
                ureq::Error::Timeout(_) => "the registry stopped answering in time",
                _ => "is the registry running and reachable?",
            };
            Error::Registry(format!("{url}: {e} ({hint})"))
        };
        for attempt in 0..2 {
            let mut req = ureq::http::Request::builder().method(method).uri(url);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if let Some(h) = self.auth_header(url) {
                req = req.header("Authorization", h);
            }
            let resp = match body {
                Some((ct, data)) => {
                    let req = req
                        .header("Content-Type", ct)
                        .body(data.to_vec())
                        .map_err(|e| Error::Registry(e.to_string()))?;
                    self.agent
                        .run(self.with_timeouts(req, body_timeout))
                        .map_err(net)?
                }
                None => {
                    let req = req.body(()).map_err(|e| Error::Registry(e.to_string()))?;
                    self.agent
                        .run(self.with_timeouts(req, body_timeout))
                        .map_err(net)?
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
        self.pull_some(reference, blobs, &|_| true, &|_| Ok(()), progress)
    }

    /// Like [`Registry::pull`], but downloads only the layers for which `wanted(diff_id)` is
    /// true (the config says each layer's diff_id before any layer is fetched). The image
    /// returned then lacks the other layers' blobs: callers that skip a layer already have
    /// its content in another form (an upgrade's layer store).
    ///
    /// `room(bytes)` is asked, before any layer is downloaded, whether the wanted layers'
    /// compressed bytes fit; its error stops the pull.
    pub fn pull_some(
        &mut self,
        reference: &str,
        blobs: &Path,
        wanted: &dyn Fn(&str) -> bool,
        room: &dyn Fn(u64) -> Result<(), Error>,
        progress: &mut dyn FnMut(&str, u64, u64),
    ) -> Result<LocalImage, Error> {
        let (manifest, digest, body) = self.resolve(reference)?;
        self.pull_blob(&manifest.config, blobs, progress)?;
        let config: serde_json::Value =
            serde_json::from_slice(&crate::store::read_blob(blobs, &manifest.config.digest)?)
                .map_err(|e| {
                    Error::Format(format!("image config {}: {e}", manifest.config.digest))
                })?;
        let diff_ids = crate::image::config_diff_ids(&config)?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(Error::Format(format!(
                "{}/{}:{reference}: {} layers but {} diff_ids in the config",
                self.host,
                self.repository,
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        let bytes: u64 = manifest
            .layers
            .iter()
            .zip(&diff_ids)
            .filter(|(_, id)| wanted(id.as_str()))
            .map(|(d, _)| d.size)
            .sum();
        room(bytes)?;
        for (d, id) in manifest.layers.iter().zip(&diff_ids) {
            if wanted(id.as_str()) {
                self.pull_blob(d, blobs, progress)?;
            }
        }
        put_verified(blobs, &digest, &mut &body[..], &mut |_| {})?;
        store::local_image(blobs, manifest, digest)
    }

    /// The image manifest for `reference` (an index resolved to linux/amd64), its digest and
    /// its bytes.
    pub fn resolve(&mut self, reference: &str) -> Result<(Manifest, Digest, Vec<u8>), Error> {
        self.resolve_at(reference, 0)
    }

    fn resolve_at(
        &mut self,
        reference: &str,
        depth: usize,
    ) -> Result<(Manifest, Digest, Vec<u8>), Error> {
        if depth > MAX_INDEX_DEPTH {
            return Err(Error::Format(format!(
                "{}/{}: more than {MAX_INDEX_DEPTH} nested indexes at {reference} (a loop?); refused",
                self.host, self.repository
            )));
        }
        // A reference is a tag or a digest; either goes into the URL only once checked.
        let by_digest = if reference.contains(':') {
            Some(
                Digest::parse(reference)
                    .map_err(|e| Error::Format(format!("manifest reference: {e}")))?,
            )
        } else {
            crate::reference::check_tag(reference)?;
            None
        };
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
        let digest = Digest::of(&body);
        if let Some(want) = &by_digest
            && *want != digest
        {
            return Err(Error::Digest {
                digest: want.to_string(),
                found: digest.to_string(),
            });
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| Error::Format(format!("{url}: {e}")))?;
        if v.get("manifests").is_some() {
            let idx: crate::image::Index =
                serde_json::from_value(v).map_err(|e| Error::Format(e.to_string()))?;
            let d = crate::image::pick_platform_for(&idx, &self.platform)
                .ok_or_else(|| {
                    Error::NotFound(format!("{url}: no {} image in the index", self.platform))
                })?
                .digest
                .clone();
            return self.resolve_at(&d, depth + 1);
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
        let timeout = BLOB_BASE_TIMEOUT + Duration::from_secs(d.size / BLOB_MIN_RATE);
        let mut resp = self.send_with("GET", &url, None, None, timeout)?;
        if resp.status() != 200 {
            return Err(Error::Registry(format!("{url}: HTTP {}", resp.status())));
        }
        // One byte past the descriptor's size is an error, not a bigger download.
        let mut reader = resp.body_mut().with_config().limit(d.size).reader();
        let total = d.size;
        let dg = d.digest.to_string();
        put_verified(blobs, &d.digest, &mut reader, &mut |done| {
            progress(&dg, done, total)
        })
        .map_err(|e| match e {
            Error::Io { source, .. } => Error::Registry(format!(
                "{}/{}: blob {} (descriptor size {} bytes): {source}",
                self.host, self.repository, d.digest, d.size
            )),
            other => other,
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
        self.scope = "pull,push";
        crate::reference::check_tag(tag)?;
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
            // Monolithic upload: the blob is read whole (layers here are tens to hundreds of MB),
            // and checked against its digest before a byte of it leaves the machine.
            let data = store::read_verified(&img.blobs, &d.digest, d.size)?;
            let put = self.send_with(
                "PUT",
                &format!("{loc}{sep}digest={}", d.digest),
                None,
                Some(("application/octet-stream", &data)),
                BLOB_BASE_TIMEOUT + Duration::from_secs(d.size / BLOB_MIN_RATE),
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
