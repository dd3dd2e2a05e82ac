//! Collecting the node's config: config dirs in Kairos' order, the kernel cmdline, and
//! `config_url` chains, folded with the merge laws into one document.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kairos_sys::Root;
use kairos_sys::beneath::Kind;
use serde_json::Value as Json;

use crate::merge::{MergeError, merge};
use crate::node::{Node, Origin, Value};
use crate::yaml::{self, YamlError};

/// Collector dirs, in merge order (later wins). The code order of Go Kairos, not its docs.
pub const CONFIG_DIRS: &[&str] = &[
    "/run/initramfs/live",
    "/etc/kairos",
    "/usr/local/cloud-config",
    "/oem",
];

/// Headers that mark a file as config.
pub const HEADERS: &[&str] = &["#cloud-config", "#kairos-config", "#node-config"];

/// Files of 2 MiB and more are skipped, as Kairos does.
pub const MAX_FILE_SIZE: u64 = 2 * 1024 * 1024;

const MAX_URL_DEPTH: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Yaml(#[from] YamlError),
    #[error(transparent)]
    Merge(#[from] MergeError),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Fetches a URL's body. A trait so tests can serve configs without a network.
pub trait Fetcher {
    fn fetch(&self, url: &str) -> Result<Vec<u8>, String>;
}

/// HTTP(S) GET with Kairos' retry policy: 3 tries, 1 s apart.
#[derive(Debug, Clone)]
pub struct HttpFetcher {
    pub tries: u32,
    pub delay: Duration,
}

impl Default for HttpFetcher {
    fn default() -> Self {
        HttpFetcher {
            tries: 3,
            delay: Duration::from_secs(1),
        }
    }
}

impl Fetcher for HttpFetcher {
    fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        if let Some(path) = url.strip_prefix("file://") {
            return fs::read(path).map_err(|e| format!("reading {path}: {e}"));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut last = String::new();
        for attempt in 0..self.tries.max(1) {
            if attempt > 0 {
                std::thread::sleep(self.delay);
            }
            match agent.get(url).call() {
                Ok(mut resp) if resp.status() == 200 => {
                    return resp
                        .body_mut()
                        .with_config()
                        .limit(64 * 1024 * 1024)
                        .read_to_vec()
                        .map_err(|e| e.to_string());
                }
                Ok(resp) => last = format!("HTTP status {}", resp.status()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

/// What to collect from.
pub struct Collector<'a> {
    pub root: Root,
    /// The cmdline to read config from; `None` skips the cmdline.
    pub cmdline: Option<String>,
    pub dirs: Vec<String>,
    /// Extra files (CLI arguments) read after the dirs; they need no header.
    pub files: Vec<PathBuf>,
    pub fetcher: &'a dyn Fetcher,
}

/// The merged config and how it was made.
#[derive(Debug, Clone)]
pub struct Collected {
    pub config: Node,
    pub sources: Vec<String>,
    pub warnings: Vec<String>,
    /// Files left out for having no header (plain yip stage files are such files, so this is
    /// reported apart from the warnings).
    pub skipped: Vec<String>,
}

impl Collected {
    /// `#cloud-config`, the `# Sources:` block, then the YAML — the form Kairos writes to
    /// `/oem/90_custom.yaml` at install.
    pub fn render(&self) -> String {
        let mut out = String::from("#cloud-config\n\n# Sources:\n");
        for s in &self.sources {
            out.push_str(&format!("# - {s}\n"));
        }
        out.push('\n');
        out.push_str(&yaml::to_string(&self.config));
        out
    }
}

/// True when one of the first lines is exactly a config header.
pub fn has_header(text: &str) -> bool {
    text.splitn(10, '\n')
        .any(|l| HEADERS.contains(&l.trim_end()))
}

/// How deep [`walk_yaml`] descends below a config dir.
pub const MAX_WALK_DEPTH: usize = 16;

/// `.yaml`/`.yml` files under `dir` in walk order (recursive, lexical), as paths inside the
/// root (`/oem/a.yaml`). Everything is resolved beneath the root. Directories reached through
/// a symlink are not entered (so `l1 -> .` cannot loop), nor are levels past
/// [`MAX_WALK_DEPTH`]. Symlinks, FIFOs and devices named `*.yaml` are listed, for
/// [`read_config`] to refuse (and say so) unless they lead to a regular file inside the root.
pub fn walk_yaml(root: &Root, dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Root, dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = root.read_dir(dir) else {
            return;
        };
        for (name, kind) in entries {
            let p = dir.join(&name);
            match kind {
                Kind::Dir if depth < MAX_WALK_DEPTH => walk(root, &p, depth + 1, out),
                Kind::File | Kind::Symlink | Kind::Other
                    if p.extension().is_some_and(|e| e == "yaml" || e == "yml") =>
                {
                    out.push(p)
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    let top = Path::new("/").join(kairos_sys::beneath::normalize(dir));
    if root
        .symlink_metadata(&top)
        .is_ok_and(|m| m.kind == Kind::File)
    {
        out.push(top);
    } else {
        walk(root, &top, 0, &mut out);
    }
    out
}

/// Reads a config file found by [`walk_yaml`]: a regular file inside the root, under
/// [`MAX_FILE_SIZE`], UTF-8. The error says why the file was left out.
pub fn read_config(root: &Root, path: &Path) -> Result<String, String> {
    if root
        .symlink_metadata(path)
        .is_ok_and(|m| m.kind == Kind::Other)
    {
        return Err("skipped, a FIFO, device or socket is not a config file".into());
    }
    let data = root
        .dir()
        .and_then(|d| d.read_limited(path, MAX_FILE_SIZE - 1))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput if e.to_string().contains("limit") => {
                "skipped, files of 2 MiB or more are ignored".to_string()
            }
            _ => format!("skipped, not read: {e}"),
        })?;
    String::from_utf8(data).map_err(|e| {
        format!(
            "skipped, not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// The path as the node sees it (`/oem/a.yaml`), for messages and the sources list.
pub fn display_path(root: &Root, p: &Path) -> String {
    match p.strip_prefix(root.path()) {
        Ok(rel) if !root.is_host() => format!("/{}", rel.display()),
        _ => p.display().to_string(),
    }
}

impl Collector<'_> {
    pub fn new(root: Root, cmdline: Option<String>, fetcher: &dyn Fetcher) -> Collector<'_> {
        Collector {
            root,
            cmdline,
            dirs: CONFIG_DIRS.iter().map(|s| s.to_string()).collect(),
            files: Vec::new(),
            fetcher,
        }
    }

    pub fn collect(&self) -> Result<Collected, CollectError> {
        let mut out = Collected {
            config: Node::empty_map(Origin::whole(&Arc::from("(empty)"))),
            sources: Vec::new(),
            warnings: Vec::new(),
            skipped: Vec::new(),
        };
        for dir in &self.dirs {
            for path in walk_yaml(&self.root, Path::new(dir)) {
                let shown = path.display().to_string();
                // One unreadable, oversized or non-UTF-8 file is reported, not fatal.
                let text = match read_config(&self.root, &path) {
                    Ok(t) => t,
                    Err(why) => {
                        out.warnings.push(format!("{shown}: {why}"));
                        continue;
                    }
                };
                if !has_header(&text) {
                    out.skipped.push(format!(
                        "{shown}: skipped, no #cloud-config (or #kairos-config, #node-config) header in its first lines"
                    ));
                    continue;
                }
                match yaml::parse(&text, &Arc::from(shown.as_str())) {
                    Ok(node) => self.fold(&mut out, node, shown)?,
                    Err(e) => out
                        .warnings
                        .push(format!("{e} (the file was skipped; the others apply)")),
                }
            }
        }
        for path in &self.files {
            let shown = path.display().to_string();
            let text = fs::read_to_string(path).map_err(|source| CollectError::Read {
                path: shown.clone(),
                source,
            })?;
            let node = yaml::parse(&text, &Arc::from(shown.as_str()))?;
            self.fold(&mut out, node, shown)?;
        }
        if let Some(cmdline) = &self.cmdline {
            let node = crate::cmdline::config_from_cmdline(cmdline);
            if matches!(&node.value, Value::Map(m) if !m.is_empty()) {
                self.fold(&mut out, node, "cmdline".into())?;
            }
        }
        Ok(out)
    }

    fn fold(
        &self,
        out: &mut Collected,
        mut node: Node,
        source: String,
    ) -> Result<(), CollectError> {
        out.sources.push(source);
        self.resolve_url(&mut node, out, 0)?;
        merge(&mut out.config, node)?;
        Ok(())
    }

    /// Fetches `config_url` of `node` (recursively) and merges the result over `node`.
    fn resolve_url(
        &self,
        node: &mut Node,
        out: &mut Collected,
        depth: usize,
    ) -> Result<(), CollectError> {
        let Some(url) = node.get("config_url").and_then(|n| match &n.value {
            Value::Str(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        }) else {
            return Ok(());
        };
        if depth >= MAX_URL_DEPTH {
            out.warnings.push(format!(
                "config_url {url}: chain deeper than {MAX_URL_DEPTH}, not followed"
            ));
            return Ok(());
        }
        let url = match self.render_url(&url) {
            Ok(u) => u,
            Err(e) => {
                out.warnings
                    .push(format!("config_url {url}: template failed: {e}"));
                return Ok(());
            }
        };
        let text = match self.fetcher.fetch(&url) {
            Ok(t) => String::from_utf8_lossy(&t).into_owned(),
            Err(e) => {
                out.warnings.push(format!(
                    "config_url {url}: unreachable, continuing without it: {e}"
                ));
                return Ok(());
            }
        };
        if !has_header(&text) {
            out.warnings.push(format!(
                "config_url {url}: no #cloud-config header, ignored"
            ));
            return Ok(());
        }
        let mut fetched = yaml::parse(&text, &Arc::from(url.as_str()))?;
        self.resolve_url(&mut fetched, out, depth + 1)?;
        out.sources.push(url);
        merge(node, fetched)?;
        Ok(())
    }

    fn render_url(&self, url: &str) -> Result<String, kairos_template::Error> {
        if !kairos_template::has_actions(url) {
            return Ok(url.to_string());
        }
        let values = url_escape_leaves(kairos_sys::sysinfo::values(&self.root));
        let machine_id = kairos_sys::sysinfo::machine_id(&self.root);
        let mut ctx = serde_json::Map::new();
        ctx.insert("Values".into(), values);
        ctx.insert("Random".into(), Json::String(crate::random_string(32)));
        ctx.insert(
            "ProtectedID".into(),
            Json::String(crate::protected_id(&machine_id, "kairos-config-url")),
        );
        kairos_template::render_with(
            url,
            &Json::Object(ctx),
            kairos_template::Options {
                missing_key_error: true,
            },
        )
    }
}

fn url_escape_leaves(v: Json) -> Json {
    match v {
        Json::String(s) => Json::String(
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect(),
        ),
        Json::Array(a) => Json::Array(a.into_iter().map(url_escape_leaves).collect()),
        Json::Object(m) => Json::Object(
            m.into_iter()
                .map(|(k, v)| (k, url_escape_leaves(v)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct Map(HashMap<String, String>);
    impl Fetcher for Map {
        fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
            self.0
                .get(url)
                .map(|s| s.as_bytes().to_vec())
                .ok_or_else(|| "connection refused".into())
        }
    }

    fn write(root: &Path, p: &str, s: &str) {
        let p = root.join(p.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn order_headers_and_cmdline() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "/etc/kairos/a.yaml",
            "#cloud-config\ninstall:\n  device: /dev/sda\n  auto: true\n",
        );
        write(
            d.path(),
            "/oem/b.yaml",
            "#cloud-config\ninstall:\n  device: /dev/sdb\n",
        );
        write(d.path(), "/oem/sub/c.yml", "#kairos-config\nhostname: h\n");
        write(d.path(), "/oem/noheader.yaml", "hostname: ignored\n");
        write(d.path(), "/oem/x.txt", "#cloud-config\nhostname: ignored\n");
        let f = Map(HashMap::new());
        let c = Collector::new(
            Root::new(d.path()),
            Some("kairos.config=install.device=/dev/vda".into()),
            &f,
        )
        .collect()
        .unwrap();
        assert_eq!(
            c.config.to_json(),
            json!({"install": {"device": "/dev/vda", "auto": true}, "hostname": "h"})
        );
        assert_eq!(
            c.sources,
            vec![
                "/etc/kairos/a.yaml",
                "/oem/b.yaml",
                "/oem/sub/c.yml",
                "cmdline"
            ]
        );
        assert!(c.skipped.iter().any(|w| w.contains("noheader.yaml")));
        let shown = c.render();
        assert!(
            shown.starts_with("#cloud-config\n\n# Sources:\n# - /etc/kairos/a.yaml\n"),
            "{shown}"
        );
    }

    #[test]
    fn config_url_chain_wins_over_referencing_file() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "/oem/a.yaml",
            "#cloud-config\nconfig_url: http://h/1\nhostname: file\n",
        );
        let f = Map(HashMap::from([
            (
                "http://h/1".to_string(),
                "#cloud-config\nhostname: url1\nconfig_url: http://h/2\n".to_string(),
            ),
            (
                "http://h/2".to_string(),
                "#cloud-config\ninstall: {device: /dev/x}\n".to_string(),
            ),
        ]));
        let c = Collector::new(Root::new(d.path()), None, &f)
            .collect()
            .unwrap();
        assert_eq!(c.config.get("hostname").unwrap().to_json(), json!("url1"));
        assert_eq!(
            c.config.at_path("install.device").unwrap().to_json(),
            json!("/dev/x")
        );
        assert!(c.sources.contains(&"http://h/2".to_string()));
    }

    #[test]
    fn unreachable_url_is_a_warning() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "/oem/a.yaml",
            "#cloud-config\nconfig_url: http://down/\nhostname: x\n",
        );
        let f = Map(HashMap::new());
        let c = Collector::new(Root::new(d.path()), None, &f)
            .collect()
            .unwrap();
        assert_eq!(c.config.get("hostname").unwrap().to_json(), json!("x"));
        assert!(
            c.warnings.iter().any(|w| w.contains("unreachable")),
            "{:?}",
            c.warnings
        );
    }
}
