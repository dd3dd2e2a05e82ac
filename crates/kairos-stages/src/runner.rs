//! `run-stage X`: where stage documents come from and in which order they run.
//!
//! For each of `X.before`, `X`, `X.after`: every stage path (`/system/oem`, `/oem`,
//! `/usr/local/cloud-config`, then `cloud-init-paths`) as its own graph, then the document at
//! the cmdline's `kairos.config_url`, then the cmdline's own `stages.…` dot notation.

use std::io::Write;

use kairos_config::Fetcher;
use kairos_config::collect::{read_config, walk_yaml};
use kairos_sys::Root;

use crate::dag::Graph;
use crate::executor::{Executor, Report};
use crate::loader::{self, YipConfig};

pub const STAGE_PATHS: &[&str] = &["/system/oem", "/oem", "/usr/local/cloud-config"];

/// Where kairos-immucore mounts install media (ISO `COS_LIVE`).
pub const LIVE_MEDIUM: &str = "/run/initramfs/live";

/// Where a stage's documents are read from.
pub struct StageRun<'a> {
    pub root: Root,
    pub cmdline: Option<String>,
    /// `cloud-init-paths` from the config, scanned after the standard paths.
    pub extra_paths: Vec<String>,
    pub fetcher: &'a dyn Fetcher,
    /// The root is the system now booting (immucore's `/sysroot`): the kernel hostname and
    /// sysctls are set, as they are when the root is `/`.
    pub booting: bool,
}

/// The documents of one source (a directory, a URL, the cmdline).
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub configs: Vec<YipConfig>,
}

/// The analysis of one sub-stage of one source.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub stage: String,
    pub source: String,
    pub layers: Vec<Vec<String>>,
    /// Steps that will not run, and why (a conditional that fails here and now, or a step
    /// that could not be read).
    pub skipped: Vec<(String, String)>,
    /// Steps whose `if:` decides when the stage runs.
    pub conditional: Vec<(String, String)>,
    /// Problems and warnings of the documents for this sub-stage.
    pub problems: Vec<String>,
}

fn read_file(root: &Root, path: &std::path::Path) -> YipConfig {
    let shown = path.display().to_string();
    let loaded = read_config(root, path).and_then(|t| loader::load_text(&t, &shown));
    loaded.unwrap_or_else(|e| {
        let text = if e.starts_with(&shown) {
            e
        } else {
            format!("{shown}: {e}")
        };
        YipConfig::unusable(&shown, text)
    })
}

/// Problems of whole documents (unreadable files, broken YAML), reported once per run.
fn document_problems(s: &Source) -> Vec<String> {
    s.configs
        .iter()
        .flat_map(|c| &c.problems)
        .filter(|p| p.stage.is_none())
        .map(|p| p.text.clone())
        .collect()
}

impl StageRun<'_> {
    /// The cmdline's `kairos.config_url` (or legacy `cos.setup=<url>`).
    fn cmdline_url(&self) -> Option<String> {
        let cmdline = self.cmdline.as_deref()?;
        kairos_config::cmdline::tokens(cmdline)
            .into_iter()
            .find_map(|t| {
                let (k, v) = t.split_once('=')?;
                match k {
                    "kairos.config_url" => Some(v.to_string()),
                    "cos.setup" if !v.contains('=') => Some(v.to_string()),
                    _ => None,
                }
            })
    }

    pub fn sources(&self) -> Vec<Source> {
        let mut out = Vec::new();
        // Install media: the ISO's embedded cloud-config applies to the live system, first
        // (lowest priority), only where a live medium is mounted.
        let live = Some(LIVE_MEDIUM)
            .filter(|p| self.root.is_dir(p))
            .map(str::to_string);
        let paths = live
            .into_iter()
            .chain(STAGE_PATHS.iter().map(|s| s.to_string()))
            .chain(self.extra_paths.iter().cloned());
        for p in paths {
            if self.root.is_host() && !self.root.exists(&p) {
                let _ = self.root.create_dir_all(&p, 0o755);
            }
            let files = walk_yaml(&self.root, std::path::Path::new(&p));
            out.push(Source {
                name: p.clone(),
                configs: files.iter().map(|f| read_file(&self.root, f)).collect(),
            });
        }
        if let Some(url) = self.cmdline_url() {
            let cfg = match self.fetcher.fetch(&url) {
                Ok(body) => loader::load_text(&String::from_utf8_lossy(&body), &url)
                    .unwrap_or_else(|e| YipConfig::unusable(&url, format!("{url}: {e}"))),
                Err(e) => YipConfig::unusable(
                    &url,
                    format!("{url}: unreachable, its stages were not run: {e}"),
                ),
            };
            out.push(Source {
                name: url,
                configs: vec![cfg],
            });
        }
        if let Some(cmdline) = &self.cmdline {
            let node = kairos_config::cmdline::dot_notation(cmdline);
            if node.get("stages").is_some() {
                let mut only = node.clone();
                if let kairos_config::Value::Map(entries) = &mut only.value {
                    entries.retain(|(k, _)| k.name == "stages");
                }
                out.push(Source {
                    name: "cmdline".into(),
                    configs: vec![loader::load_node(only, "cmdline", false)],
                });
            }
        }
        out
    }

    fn sub_stages(stage: &str) -> [String; 3] {
        [
            format!("{stage}.before"),
            stage.to_string(),
            format!("{stage}.after"),
        ]
    }

    /// The DAG layers that `run` would execute, without running anything.
    pub fn analyze(&self, stage: &str) -> Vec<Plan> {
        let sources = self.sources();
        let exec = Executor::new(self.root.clone(), self.fetcher, Box::new(std::io::sink()));
        let mut plans = Vec::new();
        for (n, sub) in Self::sub_stages(stage).into_iter().enumerate() {
            for s in &sources {
                let g = Graph::build(&s.configs, &sub);
                let mut problems = if n == 0 {
                    document_problems(s)
                } else {
                    Vec::new()
                };
                problems.extend(g.problems.iter().cloned());
                problems.extend(g.warnings.iter().cloned());
                if g.ops.is_empty() && problems.is_empty() {
                    continue;
                }
                let mut skipped = Vec::new();
                let mut conditional = Vec::new();
                for op in &g.ops {
                    if let Err(reason) = exec.check(&op.step, false) {
                        skipped.push((op.name.clone(), reason));
                    } else if let Some(c) = op.step.if_.as_deref().filter(|c| !c.is_empty()) {
                        conditional.push((op.name.clone(), c.to_string()));
                    }
                }
                plans.push(Plan {
                    stage: sub.clone(),
                    source: s.name.clone(),
                    layers: g.layers(),
                    skipped,
                    conditional,
                    problems,
                });
            }
        }
        plans
    }

    pub fn run(&self, stage: &str, out: &mut dyn Write) -> Report {
        let sources = self.sources();
        let mut report = Report::default();
        let mut exec = Executor::new(self.root.clone(), self.fetcher, Box::new(&mut *out));
        exec.booting = self.booting;
        for (n, sub) in Self::sub_stages(stage).into_iter().enumerate() {
            for s in &sources {
                let mut g = Graph::build(&s.configs, &sub);
                // A step's problems come with its stage; a whole document's come once.
                if n == 0 {
                    g.problems.splice(0..0, document_problems(s));
                }
                if g.ops.is_empty() && g.problems.is_empty() && g.warnings.is_empty() {
                    continue;
                }
                let _ = writeln!(exec.out, "{sub} from {}", s.name);
                report.merge(exec.run(&g));
            }
        }
        report
    }
}
