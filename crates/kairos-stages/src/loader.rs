//! Turning config text into yip configs: plain yip YAML, or `#cloud-config` transpiled to
//! stages the way yip does (users, keys and files at `boot`, hostname at `initramfs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use kairos_config::decode;
use kairos_config::node::{Node, Value};
use kairos_config::types::{
    CloudUser, ExpandPartition, FileMode, Growpart, Layout, LayoutDevice, Step, StepFile, StepUser,
    WriteFile,
};
use kairos_config::validate::{Level, Problem};

/// A problem found while loading, tied to the stage where what it loses would have applied
/// (`None`: the whole document), so it is reported once, when that stage runs.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadProblem {
    pub stage: Option<String>,
    pub level: Level,
    pub text: String,
}

/// One loaded document: its name (config `name` or source path) and its stages.
#[derive(Debug, Clone, Default)]
pub struct YipConfig {
    pub name: String,
    pub stages: BTreeMap<String, Vec<Step>>,
    /// What could not be read (errors: not applied) or was ignored (warnings: unknown keys).
    pub problems: Vec<LoadProblem>,
}

impl YipConfig {
    /// A document none of which could be used.
    pub fn unusable(name: &str, text: String) -> YipConfig {
        YipConfig {
            name: name.to_string(),
            problems: vec![LoadProblem {
                stage: None,
                level: Level::Error,
                text,
            }],
            ..Default::default()
        }
    }

    fn problem(&mut self, stage: &str, p: &Problem, lost: &str) {
        self.problems.push(LoadProblem {
            stage: Some(stage.to_string()),
            level: p.level,
            text: format!("{p}; {lost}"),
        });
    }
}

/// The cloud-init keys turned into stage steps here (and reported here, not by `validate`).
pub const TRANSPILED_KEYS: &[&str] = &[
    "users",
    "ssh_authorized_keys",
    "write_files",
    "milpa_files",
    "runcmd",
    "hostname",
    "growpart",
];

/// yip's cloud-config detection: `#cloud-config` with only blank or `#` lines before it.
pub fn is_cloud_config(text: &str) -> bool {
    for line in text.lines() {
        let l = line.trim_end();
        if l == "#cloud-config" {
            return true;
        }
        if !(l.trim().is_empty() || l.starts_with('#')) {
            return false;
        }
    }
    false
}

/// What a document that cannot be parsed would have done, read from its lines: the users
/// it names, its hostname and its stages ("users kairos, ops; hostname; stages boot").
pub fn effects_of_text(text: &str) -> String {
    let mut users = Vec::new();
    let mut stages = Vec::new();
    let mut others = Vec::new();
    let mut section = String::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if !line.starts_with([' ', '-', '\t']) {
            section = line.split(':').next().unwrap_or("").trim().to_string();
            if !matches!(section.as_str(), "users" | "stages" | "name" | "") {
                others.push(section.clone());
            }
            continue;
        }
        let t = line.trim_start().trim_start_matches("- ").trim();
        match section.as_str() {
            "users" => {
                if let Some(n) = t.strip_prefix("name:") {
                    users.push(n.trim().trim_matches(['"', '\'']).to_string());
                }
            }
            "stages" if line.len() - line.trim_start().len() <= 2 && t.ends_with(':') => {
                stages.push(t.trim_end_matches(':').to_string());
            }
            _ => {}
        }
    }
    let mut parts = Vec::new();
    if !users.is_empty() {
        parts.push(format!("users {}", users.join(", ")));
    }
    parts.extend(others);
    if !stages.is_empty() {
        parts.push(format!("stages {}", stages.join(", ")));
    }
    if parts.is_empty() {
        "nothing in it was applied".into()
    } else {
        format!("not applied: {}", parts.join("; "))
    }
}

/// Loads a document; `source` names it in op names and messages.
pub fn load_text(text: &str, source: &str) -> Result<YipConfig, String> {
    let node = kairos_config::yaml::parse(text, &Arc::from(source))
        .map_err(|e| format!("{e}; {}", effects_of_text(text)))?;
    Ok(load_node(node, source, is_cloud_config(text)))
}

/// The modules a step uses, for "what was lost" messages.
fn step_keys(item: &Node) -> String {
    match &item.value {
        Value::Map(m) => {
            let keys: Vec<&str> = m
                .iter()
                .map(|(k, _)| k.name.as_str())
                .filter(|k| *k != "name")
                .collect();
            keys.join(", ")
        }
        _ => String::new(),
    }
}

/// Loads an already-parsed document (the cmdline dot notation arrives this way).
pub fn load_node(mut node: Node, source: &str, cloud_config: bool) -> YipConfig {
    node.fix_cloudinit_permissions();
    let mut cfg = YipConfig {
        name: node
            .get("name")
            .and_then(|n| n.scalar_text())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| source.to_string()),
        ..Default::default()
    };
    if cloud_config {
        transpile(&node, &mut cfg);
    }
    let Some(stages) = node.get("stages") else {
        return cfg;
    };
    let entries = match &stages.value {
        Value::Map(entries) => entries,
        Value::Null => return cfg,
        _ => {
            cfg.problems.push(LoadProblem {
                stage: None,
                level: Level::Error,
                text: format!(
                    "{}: stages: expected a map of stage name to steps, found a {}; no stage of this file ran",
                    stages.origin,
                    stages.value.kind()
                ),
            });
            return cfg;
        }
    };
    for (k, steps) in entries {
        let stage = k.name.as_str();
        let items: &[Node] = match &steps.value {
            Value::Seq(items) => items,
            Value::Null => &[],
            other => {
                let p = Problem::error(
                    steps.origin.clone(),
                    format!("stages.{stage}"),
                    format!("expected a list of steps, found a {}", other.kind()),
                );
                cfg.problem(stage, &p, &format!("no step of stage `{stage}` ran"));
                continue;
            }
        };
        let list = cfg.stages.entry(stage.to_string()).or_default();
        let mut problems = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("stages.{stage}.{i}");
            let (step, warnings) = decode::section::<Step>(item, "Step", &at);
            for w in &warnings {
                problems.push((w.clone(), "the step runs without it".to_string()));
            }
            match step {
                Ok(step) => list.push(step),
                Err(e) => problems.push((
                    e,
                    format!(
                        "step {} of stage `{stage}` not applied (it has: {})",
                        item.get("name")
                            .and_then(Node::scalar_text)
                            .unwrap_or_else(|| i.to_string()),
                        step_keys(item)
                    ),
                )),
            }
        }
        for (p, lost) in problems {
            cfg.problem(stage, &p, &lost);
        }
    }
    cfg
}

/// Decodes `node` as `T`; problems go to `stage`, saying what is lost when it fails.
fn piece<T: serde::de::DeserializeOwned + Default>(
    cfg: &mut YipConfig,
    node: &Node,
    (def, at): (&str, &str),
    stage: &str,
    lost: &str,
    without: &str,
) -> Option<T> {
    let (v, warnings) = decode::section::<T>(node, def, at);
    for w in &warnings {
        cfg.problem(stage, w, without);
    }
    match v {
        Ok(v) => Some(v),
        Err(e) => {
            cfg.problem(stage, &e, lost);
            None
        }
    }
}

/// The items of the boot-stage list `key` (users, files), each decoded on its own as `def`;
/// a bad one is named by its `label` field (`user ops not created`, `file /x not written`).
fn list<T: serde::de::DeserializeOwned + Default>(
    cfg: &mut YipConfig,
    node: &Node,
    key: &str,
    (def, noun, label): (&str, &str, &str),
) -> Vec<T> {
    let effect = |name: &str, ok: bool| match (noun, ok) {
        ("user", false) => format!("user {name} not created"),
        ("user", true) => format!("user {name} is created without it"),
        (_, false) => format!("{noun} {name} not written"),
        (_, true) => format!("{noun} {name} is written without it"),
    };
    match node.get(key) {
        Some(Node {
            value: Value::Seq(items),
            ..
        }) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let name = item
                    .get(label)
                    .and_then(Node::scalar_text)
                    .unwrap_or_else(|| format!("number {}", i + 1));
                let at = format!("{key}.{i}");
                let (lost, without) = (effect(&name, false), effect(&name, true));
                piece::<T>(cfg, item, (def, &at), "boot", &lost, &without)
            })
            .collect(),
        Some(n) if n.value != Value::Null => {
            let p = Problem::error(
                n.origin.clone(),
                key,
                format!("expected a list of {noun}s, found a {}", n.value.kind()),
            );
            cfg.problem("boot", &p, &format!("no {noun} of this list was applied"));
            Vec::new()
        }
        _ => Vec::new(),
    }
}

fn transpile(node: &Node, cfg: &mut YipConfig) {
    // Each cloud-init key (and each user, each file) is read on its own, so one bad value
    // loses only what it describes.
    let users: Vec<CloudUser> = list(cfg, node, "users", ("CloudUser", "user", "name"));
    let global_keys: Vec<String> = node
        .get("ssh_authorized_keys")
        .and_then(|n| {
            piece(
                cfg,
                n,
                ("", "ssh_authorized_keys"),
                "boot",
                "these keys were not added",
                "",
            )
        })
        .unwrap_or_default();
    let mut files: Vec<WriteFile> = list(cfg, node, "write_files", ("WriteFile", "file", "path"));
    files.extend(list::<WriteFile>(
        cfg,
        node,
        "milpa_files",
        ("WriteFile", "file", "path"),
    ));
    let runcmd: Vec<String> = node
        .get("runcmd")
        .and_then(|n| piece(cfg, n, ("", "runcmd"), "boot", "runcmd did not run", ""))
        .unwrap_or_default();
    let growpart: Option<Growpart> = node.get("growpart").and_then(|n| {
        piece(
            cfg,
            n,
            ("Growpart", "growpart"),
            "boot",
            "no partition was grown",
            "partitions are grown without it",
        )
    });
    // Go reads any scalar as a string (`hostname: 1234`).
    let hostname = match node.get("hostname") {
        Some(n) if n.value.is_scalar() => n.scalar_text().filter(|h| !h.is_empty()),
        Some(n) => {
            let p = Problem::error(
                n.origin.clone(),
                "hostname",
                format!("expected a name, found a {}", n.value.kind()),
            );
            cfg.problem("initramfs", &p, "hostname not set");
            None
        }
        None => None,
    };

    let mut boot = Step::default();
    let mut network = Step::default();
    let mut key_targets: Vec<String> = users.iter().map(|u| u.name.clone()).collect();
    if key_targets.is_empty() {
        key_targets.push("root".into());
    }
    let mut add_key = |user: &str, key: &str| {
        let step = if key.starts_with("github") || key.starts_with("gitlab") {
            &mut network
        } else {
            &mut boot
        };
        let keys = step.authorized_keys.entry(user.to_string()).or_default();
        if !keys.iter().any(|k| k == key) {
            keys.push(key.to_string());
        }
    };
    for u in &users {
        for k in &u.ssh_authorized_keys {
            add_key(&u.name, k);
        }
    }
    for k in &global_keys {
        for user in &key_targets {
            add_key(user, k);
        }
    }
    for u in &users {
        boot.users.insert(
            u.name.clone(),
            StepUser {
                name: Some(u.name.clone()),
                passwd: u.passwd.clone(),
                lock_passwd: u.lock_passwd,
                gecos: u.gecos.clone(),
                homedir: u.homedir.clone(),
                no_create_home: u.no_create_home,
                primary_group: u.primary_group.clone(),
                groups: u.groups.clone(),
                ssh_authorized_keys: Vec::new(),
                system: u.system,
                no_user_group: u.no_user_group,
                no_log_init: u.no_log_init,
                shell: u.shell.clone(),
                uid: u.uid.clone(),
            },
        );
    }
    for f in &files {
        boot.files.push(StepFile {
            path: f.path.clone(),
            permissions: FileMode(f.permissions.map(|p| p.0).unwrap_or(0o644)),
            owner: None,
            group: None,
            content: f.content.clone(),
            encoding: f.encoding.clone(),
            ownerstring: f.owner.clone(),
        });
    }
    boot.commands = runcmd;
    let is_empty = |s: &Step| *s == Step::default();
    if !is_empty(&boot) {
        cfg.stages.entry("boot".into()).or_default().push(boot);
    }
    if let Some(g) = &growpart {
        for d in &g.devices {
            cfg.stages.entry("boot".into()).or_default().push(Step {
                layout: Some(Layout {
                    device: Some(LayoutDevice {
                        path: Some(d.clone()),
                        ..Default::default()
                    }),
                    expand_partition: Some(ExpandPartition { size: 0 }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    if !is_empty(&network) {
        cfg.stages
            .entry("network".into())
            .or_default()
            .push(network);
    }
    if let Some(h) = hostname {
        cfg.stages
            .entry("initramfs".into())
            .or_default()
            .push(Step {
                hostname: Some(h),
                ..Default::default()
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        assert!(is_cloud_config("#cloud-config\nx: 1"));
        assert!(is_cloud_config("## template: jinja\n\n#cloud-config\n"));
        assert!(!is_cloud_config("stages: {}\n#cloud-config\n"));
        assert!(!is_cloud_config("#kairos-config\n"));
    }

    #[test]
    fn transpiles_cloud_init_keys() {
        let c = load_text(
            "#cloud-config\nhostname: h1\nusers:\n- name: bar\n  passwd: foo\n  uid: \"1002\"\n  lock_passwd: true\n  ssh_authorized_keys: [faaapploo, github:mudler]\nssh_authorized_keys: [asdd]\nwrite_files:\n- path: /foo\n  content: x\n  permissions: \"0644\"\n  owner: bar\n- path: /bar\n  permissions: 600\nruncmd: [foo]\ngrowpart:\n  devices: ['/']\nstages:\n  boot:\n  - commands: [after]\n",
            "t.yaml",
        )
        .unwrap();
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        let boot = &c.stages["boot"];
        assert_eq!(boot.len(), 3);
        let u = &boot[0].users["bar"];
        assert_eq!(u.passwd.as_deref(), Some("foo"));
        assert!(u.lock_passwd.0);
        assert_eq!(u.uid.as_ref().unwrap().0, "1002");
        assert_eq!(boot[0].authorized_keys["bar"], vec!["faaapploo", "asdd"]);
        assert_eq!(
            c.stages["network"][0].authorized_keys["bar"],
            vec!["github:mudler"]
        );
        assert_eq!(boot[0].files[0].permissions.0, 0o644);
        assert_eq!(boot[0].files[1].permissions.0, 0o600);
        assert_eq!(boot[0].files[0].ownerstring.as_deref(), Some("bar"));
        assert_eq!(boot[0].commands, vec!["foo"]);
        assert_eq!(
            boot[1]
                .layout
                .as_ref()
                .unwrap()
                .device
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/")
        );
        assert_eq!(boot[2].commands, vec!["after"]);
        assert_eq!(c.stages["initramfs"][0].hostname.as_deref(), Some("h1"));
    }

    #[test]
    fn bad_step_is_reported_not_silently_dropped() {
        let c = load_text(
            "stages:\n  boot:\n  - comands: [x]\n  - commands: [y]\n",
            "s.yaml",
        )
        .unwrap();
        // An unknown key is ignored: the step runs with what it knows (here, nothing).
        assert_eq!(c.stages["boot"].len(), 2);
        assert_eq!(c.problems[0].level, Level::Warning);
        assert!(
            c.problems[0].text.contains("s.yaml:3:5"),
            "{:?}",
            c.problems
        );
        assert!(
            c.problems[0].text.contains("did you mean `commands`"),
            "{:?}",
            c.problems
        );
    }
}
