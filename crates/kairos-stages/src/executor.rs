//! Running a stage graph: conditionals, then each step's modules in yip's fixed order,
//! with every failure collected and none stopping the rest.

use std::io::Write;

use kairos_config::Fetcher;
use kairos_config::types::Step;
use kairos_sys::{Root, Shell};
use regex::Regex;
use serde_json::{Value as Json, json};

use crate::dag::Graph;
use crate::modules;

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub ran: Vec<String>,
    pub skipped: Vec<(String, String)>,
    pub failed: Vec<(String, Vec<String>)>,
    /// Problems found while loading (unreadable steps, unknown `after` targets).
    pub problems: Vec<String>,
    /// Keys ignored while loading (unknown keys); what was known was applied.
    pub warnings: Vec<String>,
}

impl Report {
    pub fn merge(&mut self, other: Report) {
        self.ran.extend(other.ran);
        self.skipped.extend(other.skipped);
        self.failed.extend(other.failed);
        self.problems.extend(other.problems);
        self.warnings.extend(other.warnings);
    }

    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.problems.is_empty()
    }

    /// `ok`, and nothing was ignored either (what `strict` asks for).
    pub fn clean(&self) -> bool {
        self.ok() && self.warnings.is_empty()
    }
}

/// Everything a module needs: the target root and how to reach the outside.
pub struct Ctx<'a> {
    pub root: &'a Root,
    pub shell: &'a Shell,
    pub template: &'a Json,
    pub fetcher: &'a dyn Fetcher,
    pub warnings: std::cell::RefCell<Vec<String>>,
    /// The root is the system being booted (or the running host): kernel-wide settings
    /// (hostname, sysctl) go to this kernel too, not only to files in the root.
    pub booting: bool,
}

impl Ctx<'_> {
    /// Renders a templated field; a failing template keeps the raw text, with a warning.
    pub fn render(&self, text: &str) -> String {
        let (out, err) = kairos_template::render_or_raw(text, self.template);
        if let Some(e) = err {
            self.warnings
                .borrow_mut()
                .push(format!("template kept as written ({e}): {text}"));
        } else if text.contains("{{") {
            for empty in empty_values(self.template) {
                if text.contains(&format!(".{empty}")) {
                    self.warnings.borrow_mut().push(format!(
                        "`.{empty}` is empty on this system, so it rendered as nothing in: {text}"
                    ));
                }
            }
        }
        out
    }
}

/// Top-level template values that are empty here (`.MachineID` before a machine id exists).
fn empty_values(template: &Json) -> Vec<&str> {
    template
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_str().is_some_and(str::is_empty))
        .map(|(k, _)| k.as_str())
        .collect()
}

impl Ctx<'_> {
    /// Whether kernel-wide settings apply to the running kernel.
    pub fn kernel(&self) -> bool {
        self.booting || self.root.is_host()
    }
}

/// Runs graphs against one root.
pub struct Executor<'a> {
    pub root: Root,
    pub shell: Shell,
    pub template: Json,
    pub fetcher: &'a dyn Fetcher,
    pub out: Box<dyn Write + 'a>,
    /// See [`Ctx::booting`].
    pub booting: bool,
}

/// The template context yip gives: `.Values` (system information) plus `.Random`,
/// `.ProtectedID`, `.MachineID` and `.UUID`.
pub fn template_context(root: &Root) -> Json {
    let machine_id = kairos_sys::sysinfo::machine_id(root);
    let random = kairos_config::random_string(32);
    let protected = kairos_config::protected_id(&machine_id, "yip");
    let mut values = kairos_sys::sysinfo::values(root);
    if let Some(v) = values.as_object_mut() {
        v.insert("Random".into(), json!(random));
        v.insert("ProtectedID".into(), json!(protected));
    }
    json!({
        "Values": values,
        "Random": random,
        "ProtectedID": protected,
        "MachineID": machine_id,
        "UUID": uuid_v4(),
    })
}

fn uuid_v4() -> String {
    let r = kairos_config::random_string(32)
        .bytes()
        .map(|b| b % 16)
        .collect::<Vec<_>>();
    let hex: String = r.iter().map(|n| format!("{n:x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

impl<'a> Executor<'a> {
    pub fn new(root: Root, fetcher: &'a dyn Fetcher, out: Box<dyn Write + 'a>) -> Self {
        Executor {
            shell: Shell::new(root.clone()),
            template: template_context(&root),
            root,
            fetcher,
            out,
            booting: false,
        }
    }

    pub fn run(&mut self, graph: &Graph) -> Report {
        let mut report = Report {
            problems: graph.problems.clone(),
            warnings: graph.warnings.clone(),
            ..Default::default()
        };
        for p in &graph.problems {
            let _ = writeln!(self.out, "  problem  {p}");
        }
        for w in &graph.warnings {
            let _ = writeln!(self.out, "  warn  {w}");
        }
        for op in graph.ordered() {
            if let Err(reason) = self.check(&op.step, true) {
                let _ = writeln!(self.out, "  skip  {} ({reason})", op.name);
                report.skipped.push((op.name.clone(), reason));
                continue;
            }
            let _ = writeln!(self.out, "  run   {}", op.name);
            let errors = self.apply(&op.step);
            if errors.is_empty() {
                report.ran.push(op.name.clone());
            } else {
                for e in &errors {
                    let _ = writeln!(self.out, "  FAIL  {}: {e}", op.name);
                }
                report.failed.push((op.name.clone(), errors));
            }
        }
        report
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            root: &self.root,
            shell: &self.shell,
            template: &self.template,
            fetcher: self.fetcher,
            warnings: Default::default(),
            booting: self.booting,
        }
    }

    /// Runs one step's modules in yip's order; returns every error.
    pub fn apply(&mut self, step: &Step) -> Vec<String> {
        let ctx = self.ctx();
        let mut errors = Vec::new();
        for m in modules::ORDER {
            if let Err(e) = modules::run(m, &ctx, step) {
                errors.push(format!("{m}: {e}"));
            }
        }
        let warnings = ctx.warnings.take();
        for w in warnings {
            let _ = writeln!(self.out, "  warn  {w}");
        }
        errors
    }

    /// The conditionals, in yip's order; `Err` says why the step is skipped. Without
    /// `run_if` the `if:` command is not run (an analysis must not change the system).
    pub fn check(&self, step: &Step, run_if: bool) -> Result<(), String> {
        let ctx = self.ctx();
        let re = |pat: &str, what: &str| {
            Regex::new(pat).map_err(|e| format!("{what}: bad regex {pat:?}: {e}"))
        };
        if let Some(n) = step.node.as_deref().filter(|n| !n.is_empty()) {
            let host = kairos_sys::sysinfo::hostname(&self.root);
            if !re(n, "node")?.is_match(&host) {
                return Err(format!("node: hostname {host:?} does not match {n:?}"));
            }
        }
        if let Some(cond) = step.if_.as_deref().filter(|c| !c.is_empty() && run_if) {
            let cmd = ctx.render(cond);
            match self.shell.run_status(&cmd) {
                Ok(o) if o.status == 0 => {}
                Ok(o) => return Err(format!("if: `{cmd}` exited {}", o.status)),
                Err(e) => return Err(format!("if: {e}")),
            }
        }
        let osr = kairos_sys::sysinfo::os_release(&self.root);
        for (pat, key, what) in [
            (&step.only_os, "PRETTY_NAME", "only_os"),
            (&step.only_os_version, "VERSION_ID", "only_os_version"),
        ] {
            if let Some(p) = pat.as_deref().filter(|p| !p.is_empty()) {
                let v = osr.get(key).cloned().unwrap_or_default();
                if v.is_empty() || !re(p, what)?.is_match(&v) {
                    return Err(format!("{what}: {v:?} does not match {p:?}"));
                }
            }
        }
        if let Some(p) = step.only_arch.as_deref().filter(|p| !p.is_empty()) {
            let arch = kairos_sys::sysinfo::go_arch();
            if !re(p, "only_arch")?.is_match(arch) {
                return Err(format!("only_arch: {arch} does not match {p:?}"));
            }
        }
        if let Some(want) = step
            .only_service_manager
            .as_deref()
            .filter(|p| !p.is_empty())
        {
            let has = |bin: &str| {
                ["sbin", "bin", "usr/sbin", "usr/bin"]
                    .iter()
                    .any(|d| self.root.exists(std::path::Path::new(d).join(bin)))
            };
            let (systemd, openrc) = (has("systemctl"), has("openrc"));
            let found = match (systemd, openrc) {
                (true, false) => "systemd",
                (false, true) => "openrc",
                (true, true) => "both systemd and openrc",
                _ => "none",
            };
            if found != want {
                return Err(format!("only_service_manager: want {want}, found {found}"));
            }
        }
        if let Some(f) = &step.if_files {
            let exists = |p: &String| self.root.exists(ctx.render(p));
            if !f.any.is_empty() && !f.any.iter().any(exists) {
                return Err("if_files: none of `any` exist".into());
            }
            if !f.all.iter().all(exists) {
                return Err("if_files: not all of `all` exist".into());
            }
            if f.none.iter().any(exists) {
                return Err("if_files: one of `none` exists".into());
            }
        }
        Ok(())
    }
}
