//! Turning config text into yip configs: plain yip YAML, or `#cloud-config` transpiled to
//! stages the way yip does (users, keys and files at `boot`, hostname at `initramfs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use kairos_config::node::{Node, Value};
use kairos_config::types::{
    Config, ExpandPartition, FileMode, Layout, LayoutDevice, Step, StepFile, StepUser,
};

/// One loaded document: its name (config `name` or source path) and its stages.
#[derive(Debug, Clone, Default)]
pub struct YipConfig {
    pub name: String,
    pub stages: BTreeMap<String, Vec<Step>>,
    /// Steps that could not be read, with the reason (reported as step errors).
    pub problems: Vec<String>,
}

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

/// Loads a document; `source` names it in op names and messages.
pub fn load_text(text: &str, source: &str) -> Result<YipConfig, String> {
    let node = kairos_config::yaml::parse(text, &Arc::from(source)).map_err(|e| e.to_string())?;
    Ok(load_node(node, source, is_cloud_config(text)))
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
    if let Some(stages) = node.get("stages") {
        let Value::Map(entries) = &stages.value else {
            cfg.problems.push(format!(
                "{}: `stages` must be a map of stage name to steps",
                stages.origin
            ));
            return cfg;
        };
        for (k, steps) in entries {
            let Value::Seq(items) = &steps.value else {
                cfg.problems.push(format!(
                    "{}: stage `{}` must be a list of steps",
                    steps.origin, k.name
                ));
                continue;
            };
            let list = cfg.stages.entry(k.name.clone()).or_default();
            for item in items {
                match serde_json::from_value::<Step>(item.to_json()) {
                    Ok(step) => list.push(step),
                    Err(e) => cfg.problems.push(format!(
                        "{}: step of stage `{}` skipped: {e}; run `kairos-agent validate` on this file",
                        item.origin, k.name
                    )),
                }
            }
        }
    }
    cfg
}

fn transpile(node: &Node, cfg: &mut YipConfig) {
    // Only the cloud-init keys matter here; read them leniently through the typed config
    // by dropping everything else first.
    const KEYS: &[&str] = &[
        "users",
        "ssh_authorized_keys",
        "write_files",
        "milpa_files",
        "runcmd",
        "hostname",
        "growpart",
    ];
    let mut compat = node.clone();
    if let Value::Map(entries) = &mut compat.value {
        entries.retain(|(k, _)| KEYS.contains(&k.name.as_str()));
    }
    let c: Config = match serde_json::from_value(compat.to_json()) {
        Ok(c) => c,
        Err(e) => {
            cfg.problems
                .push(format!("{}: cloud-config keys skipped: {e}", node.origin));
            return;
        }
    };
    let mut boot = Step::default();
    let mut network = Step::default();
    let mut key_targets: Vec<String> = c.users.iter().map(|u| u.name.clone()).collect();
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
    for u in &c.users {
        for k in &u.ssh_authorized_keys {
            add_key(&u.name, k);
        }
    }
    for k in &c.ssh_authorized_keys {
        for user in &key_targets {
            add_key(user, k);
        }
    }
    for u in &c.users {
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
    for f in c.write_files.iter().chain(&c.milpa_files) {
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
    boot.commands = c.runcmd.clone();
    let is_empty = |s: &Step| *s == Step::default();
    if !is_empty(&boot) {
        cfg.stages.entry("boot".into()).or_default().push(boot);
    }
    if let Some(g) = &c.growpart {
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
    if let Some(h) = c.hostname.filter(|h| !h.is_empty()) {
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
        assert_eq!(c.stages["boot"].len(), 1);
        assert!(c.problems[0].contains("s.yaml:3:5"), "{:?}", c.problems);
        assert!(c.problems[0].contains("comands"), "{:?}", c.problems);
    }
}
