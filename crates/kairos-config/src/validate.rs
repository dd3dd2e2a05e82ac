//! Validation of config documents against the schema of [`crate::types`], with every problem
//! located (file:line:column), named by key path, and unknown keys given a "did you mean".

use std::fmt;
use std::sync::{Arc, OnceLock};

use jsonschema::error::ValidationErrorKind;
use serde_json::Value as Json;

use crate::collect::HEADERS;
use crate::keys;
use crate::node::{Node, Origin};
use crate::yaml;

/// How much a problem matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Nothing is lost: a top-level block passed to bundles and providers.
    Info,
    /// Applied without it: an unknown key inside a known block (`validate` fails on it, a
    /// stage warns and applies the rest; `strict` fails).
    Warning,
    /// Not applied: a value of the wrong type or shape, a name that would corrupt a file.
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One thing wrong with a config.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub origin: Origin,
    /// Dot path of the key (`k3s.enable`, `users.0.passwd`); empty for the document.
    pub path: String,
    pub message: String,
    pub level: Level,
}

impl Problem {
    pub fn error(origin: Origin, path: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            origin,
            path: path.into(),
            message: message.into(),
            level: Level::Error,
        }
    }
}

/// Top-level blocks that Kairos bundles and providers read (`docs/advanced/bundles.md`),
/// listed so they are reported as such even without a schema of their own.
pub const BUNDLE_BLOCKS: &[&str] = &[
    "metallb",
    "flux",
    "argocd",
    "longhorn",
    "kubevirt",
    "calico",
    "certManager",
    "kyverno",
    "nginx",
    "suc",
    "amt",
    "localai",
    "edgevpn",
    "kairos",
    "multus",
    "spinkube",
    "kubeadm",
    "nohang",
    "coco",
    "system-upgrade-controller",
    "rke2",
    "kairos-operator",
];

/// True when no problem would make `validate` fail (only information).
pub fn passes(problems: &[Problem]) -> bool {
    problems.iter().all(|p| p.level == Level::Info)
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: {}: {}", self.origin, self.path, self.message)
        }
    }
}

fn validator() -> &'static (jsonschema::Validator, Json) {
    static V: OnceLock<(jsonschema::Validator, Json)> = OnceLock::new();
    V.get_or_init(|| {
        let schema = crate::types::schema();
        let v = jsonschema::validator_for(&schema).expect("generated schema compiles");
        (v, schema)
    })
}

/// True when `text` starts with a config header, as `kairos-agent validate` requires.
pub fn starts_with_header(text: &str) -> bool {
    HEADERS.iter().any(|h| text.starts_with(h))
}

/// Validates a config file's text: header, YAML syntax, schema, semantic checks.
pub fn validate_text(text: &str, source: &str) -> Vec<Problem> {
    let src: Arc<str> = Arc::from(source);
    let mut problems = Vec::new();
    if !starts_with_header(text) {
        problems.push(Problem::error(
            Origin::new(&src, 1, 1),
            "",
            "missing header: the first line must be #cloud-config (or #kairos-config, #node-config)",
        ));
    }
    match yaml::parse(text, &src) {
        Ok(node) => problems.extend(validate_node(&node)),
        Err(e) => problems.push(Problem::error(e.origin, "", e.message)),
    }
    problems
}

/// Validates a parsed (possibly merged) document.
pub fn validate_node(node: &Node) -> Vec<Problem> {
    let mut node = node.clone();
    node.fix_cloudinit_permissions();
    let json = node.to_json();
    let (v, schema) = validator();
    let mut problems = Vec::new();
    for err in v.iter_errors(&json) {
        collect(&node, schema, &err, &mut problems);
    }
    problems.extend(semantic(&node));
    problems.sort_by(|a, b| {
        (a.origin.source.as_ref(), a.origin.line, a.origin.col).cmp(&(
            b.origin.source.as_ref(),
            b.origin.line,
            b.origin.col,
        ))
    });
    problems.dedup();
    problems
}

/// A string value at `node.key`, with its node, unless it is templated (checked once rendered).
fn plain_str<'a>(node: &'a Node, key: &str) -> Option<(&'a Node, &'a str)> {
    let n = node.get(key)?;
    match &n.value {
        crate::Value::Str(s) if !s.contains("{{") => Some((n, s.as_str())),
        _ => None,
    }
}

fn report(out: &mut Vec<Problem>, n: &Node, path: String, r: Result<(), String>) {
    if let Err(message) = r {
        out.push(Problem::error(n.origin.clone(), path, message));
    }
}

/// One user (top-level list item or stage `users:` entry) at `path`.
fn check_user(out: &mut Vec<Problem>, u: &Node, path: &str) {
    use crate::names;
    if let Some((n, name)) = plain_str(u, "name").filter(|(_, v)| !v.is_empty()) {
        report(
            out,
            n,
            format!("{path}.name"),
            names::account_name("user", name),
        );
    }
    for key in ["gecos", "shell", "passwd"] {
        if let Some((n, v)) = plain_str(u, key) {
            report(out, n, format!("{path}.{key}"), names::field(key, v));
        }
    }
    if let Some((n, v)) = plain_str(u, "homedir").filter(|(_, v)| !v.is_empty()) {
        report(out, n, format!("{path}.homedir"), names::homedir(v));
    }
    if let Some((n, v)) = plain_str(u, "primary_group").filter(|(_, v)| !v.is_empty()) {
        report(
            out,
            n,
            format!("{path}.primary_group"),
            names::account_name("group", v),
        );
    }
    if let Some(g) = u.get("groups")
        && let crate::Value::Seq(items) = &g.value
    {
        for (i, item) in items.iter().enumerate() {
            if let crate::Value::Str(v) = &item.value {
                report(
                    out,
                    item,
                    format!("{path}.groups.{i}"),
                    names::account_name("group", v),
                );
            }
        }
    }
}

/// Names and fields that would corrupt or inject lines into passwd/group/shadow, hostnames
/// the kernel and RFC 1123 refuse, and sysctl keys that are paths (see [`crate::names`]).
fn identity(node: &Node, out: &mut Vec<Problem>) {
    use crate::names;
    if let Some(users) = node.get("users")
        && let crate::Value::Seq(items) = &users.value
    {
        for (i, u) in items.iter().enumerate() {
            check_user(out, u, &format!("users.{i}"));
        }
    }
    if let Some((n, h)) = plain_str(node, "hostname").filter(|(_, h)| !h.is_empty()) {
        report(out, n, "hostname".into(), names::hostname(h));
    }
    let Some(crate::Value::Map(stages)) = node.get("stages").map(|s| &s.value) else {
        return;
    };
    for (stage, steps) in stages {
        let crate::Value::Seq(steps) = &steps.value else {
            continue;
        };
        for (i, step) in steps.iter().enumerate() {
            let at = format!("stages.{}.{i}", stage.name);
            if let Some((n, h)) = plain_str(step, "hostname").filter(|(_, h)| !h.is_empty()) {
                report(out, n, format!("{at}.hostname"), names::hostname(h));
            }
            if let Some(crate::Value::Map(users)) = step.get("users").map(|u| &u.value) {
                for (k, u) in users {
                    let path = format!("{at}.users.{}", k.name);
                    if plain_str(u, "name").is_none() && !k.name.contains("{{") {
                        let key = Node::new(crate::Value::Null, k.origin.clone());
                        report(
                            out,
                            &key,
                            path.clone(),
                            names::account_name("user", &k.name),
                        );
                    }
                    check_user(out, u, &path);
                }
            }
            if let Some(crate::Value::Map(kv)) = step.get("sysctl").map(|s| &s.value) {
                for (k, _) in kv {
                    let key = Node::new(crate::Value::Null, k.origin.clone());
                    report(
                        out,
                        &key,
                        format!("{at}.sysctl"),
                        names::sysctl_key(&k.name),
                    );
                }
            }
        }
    }
}

/// Checks the schema cannot express.
fn semantic(node: &Node) -> Vec<Problem> {
    let mut out = Vec::new();
    identity(node, &mut out);
    if let Some(h) = node.at_path("install.ssh_hardening")
        && h.to_json() == Json::Bool(true)
    {
        let has_key = node
            .get("users")
            .map(|u| u.to_json())
            .and_then(|u| u.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .any(|u| {
                u["ssh_authorized_keys"]
                    .as_array()
                    .is_some_and(|k| !k.is_empty())
            });
        if !has_key {
            out.push(Problem::error(
                h.origin.clone(),
                "install.ssh_hardening",
                "ssh_hardening disables password logins, but no user has ssh_authorized_keys: you would be locked out",
            ));
        }
    }
    out
}

fn pointer_to_path(p: &str) -> String {
    p.split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect::<Vec<_>>()
        .join(".")
}

fn collect(root: &Node, schema: &Json, err: &jsonschema::ValidationError, out: &mut Vec<Problem>) {
    let ptr = err.instance_path().as_str().to_string();
    let path = pointer_to_path(&ptr);
    let at = root.at_pointer(&ptr).unwrap_or(root);
    if path == "p2p.role" && at.to_json() == "none" {
        out.push(Problem::error(
            at.origin.clone(),
            path,
            "`none` is not a role (provider-kairos refuses it too): leave p2p.role unset or \"\" for an automatic role, or write master or worker",
        ));
        return;
    }
    match err.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let known = keys::properties_at(schema, schema, &ptr);
            for key in unexpected {
                let origin = at
                    .key_of(key)
                    .map(|k| k.origin.clone())
                    .unwrap_or_else(|| at.origin.clone());
                let key_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                // Top level: bundles and providers read their own blocks; only a key one
                // typo away from a known one is a mistake.
                if ptr.is_empty() {
                    let near = (!BUNDLE_BLOCKS.contains(&key.as_str()))
                        .then(|| keys::near_top_level(key, &known))
                        .flatten();
                    out.push(match near {
                        Some(s) => Problem {
                            origin,
                            path: key_path,
                            message: format!("unknown key `{key}`: did you mean `{s}`? (if it is a bundle's or provider's block, ignore this)"),
                            level: Level::Warning,
                        },
                        None => Problem {
                            origin,
                            path: key_path,
                            message: format!("`{key}` is not a Kairos key: passed to bundles/providers"),
                            level: Level::Info,
                        },
                    });
                    continue;
                }
                let mut message = format!("unknown key `{key}`");
                if let Some(h) = keys::hint(key, &known) {
                    message.push_str(&format!(": {h}"));
                } else if !known.is_empty() && known.len() <= 12 {
                    message.push_str(&format!(" (expected one of: {})", known.join(", ")));
                }
                out.push(Problem {
                    origin,
                    path: key_path,
                    message,
                    level: Level::Warning,
                });
            }
        }
        ValidationErrorKind::AnyOf { context } => {
            // An `Option<T>` is `anyOf [T, null]`: report the errors of the branch the user
            // evidently meant (the one that failed deeper than this value's own type).
            let deeper: Vec<_> = context
                .iter()
                .filter(|branch| {
                    branch.iter().any(|e| {
                        e.instance_path().as_str().len() > ptr.len()
                            || !matches!(
                                e.kind(),
                                ValidationErrorKind::Type { .. }
                                    | ValidationErrorKind::Enum { .. }
                                    | ValidationErrorKind::AnyOf { .. }
                            )
                    })
                })
                .collect();
            if let [branch] = deeper.as_slice() {
                for e in branch.iter() {
                    collect(root, schema, e, out);
                }
            } else {
                out.push(Problem::error(
                    at.origin.clone(),
                    path,
                    format!(
                        "{} is not valid here: expected {}",
                        show(&at.to_json()),
                        expected_of(context)
                    ),
                ));
            }
        }
        ValidationErrorKind::Type { kind } => out.push(Problem::error(
            at.origin.clone(),
            path,
            format!("expected {}, found {}", type_name(kind), found(at)),
        )),
        ValidationErrorKind::Enum { options } => out.push(Problem::error(
            at.origin.clone(),
            path,
            format!("{} is not one of {}", show(&at.to_json()), options),
        )),
        ValidationErrorKind::Pattern { pattern } => out.push(Problem::error(
            at.origin.clone(),
            path,
            format!(
                "{} does not match the pattern {pattern}",
                show(&at.to_json())
            ),
        )),
        _ => out.push(Problem::error(at.origin.clone(), path, err.to_string())),
    }
}

/// What was written, for a message: `a string "x"`, `nothing (null)`, `true`.
fn found(n: &Node) -> String {
    match &n.value {
        crate::Value::Null => "nothing (null)".into(),
        crate::Value::Bool(b) => format!("the boolean {b}"),
        v => format!("{} {}", article(v.kind()), show(&n.to_json())),
    }
}

/// The expected types; null is left out (every key may be empty).
fn type_name(kind: &jsonschema::error::TypeKind) -> String {
    match kind {
        jsonschema::error::TypeKind::Single(t) => article(&t.to_string()),
        jsonschema::error::TypeKind::Multiple(ts) => {
            let names: Vec<String> = ts
                .iter()
                .map(|t| t.to_string())
                .filter(|t| t != "null")
                .map(|t| article(&t))
                .collect();
            names.join(" or ")
        }
    }
}

fn article(t: &str) -> String {
    match t {
        "object" => "a map".into(),
        "array" => "a list".into(),
        "integer" => "an integer".into(),
        "list" => "a list".into(),
        "map" => "a map".into(),
        "null" => "nothing (null)".into(),
        other => format!("a {other}"),
    }
}

fn expected_of(context: &[Vec<jsonschema::ValidationError<'static>>]) -> String {
    let mut kinds: Vec<String> = Vec::new();
    for branch in context {
        for e in branch {
            let s = match e.kind() {
                ValidationErrorKind::Type {
                    kind: jsonschema::error::TypeKind::Single(t),
                } if t.to_string() == "null" => continue,
                ValidationErrorKind::Type { kind } => type_name(kind),
                ValidationErrorKind::Enum { options } => format!("one of {options}"),
                ValidationErrorKind::Pattern { pattern } => format!("text matching {pattern}"),
                _ => continue,
            };
            if !kinds.contains(&s) {
                kinds.push(s);
            }
        }
    }
    if kinds.is_empty() {
        "a different value".into()
    } else {
        kinds.join(", or ")
    }
}

fn show(v: &Json) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..s.floor_char_boundary(57)])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn identity_fields_that_would_inject_lines_are_reported() {
        let text = "#cloud-config\nhostname: \"a b\"\nusers:\n- name: \"x:y\"\n  gecos: \"g\\nroot::0:0\"\n  homedir: rel\n  groups: [\"w:0\"]\n- name: \"{{ .Values.x }}\"\nstages:\n  boot:\n  - hostname: \"-bad\"\n    users:\n      \"ev:il\": {passwd: x}\n    sysctl:\n      /etc/shadow: 1\n";
        let p = validate_text(text, "u.yaml");
        let shown: Vec<String> = p.iter().map(|p| p.to_string()).collect();
        for want in [
            "u.yaml:2:11: hostname: hostname \"a b\"",
            "u.yaml:4:9: users.0.name: user name \"x:y\"",
            "users.0.gecos: gecos",
            "users.0.homedir: homedir \"rel\" must be an absolute path",
            "users.0.groups.0: group name \"w:0\"",
            "stages.boot.0.hostname: hostname \"-bad\"",
            "stages.boot.0.users.ev:il: user name \"ev:il\"",
            "stages.boot.0.sysctl: sysctl key \"/etc/shadow\"",
        ] {
            assert!(
                shown.iter().any(|s| s.contains(want)),
                "missing {want:?} in {shown:#?}"
            );
        }
        assert!(
            !shown.iter().any(|s| s.contains("users.1.name")),
            "templated names are checked when rendered: {shown:#?}"
        );
    }

    use super::*;

    fn problems(text: &str) -> Vec<String> {
        validate_text(text, "c.yaml")
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn k3s_enable_typo() {
        let p = problems("#cloud-config\nk3s:\n  enable: true\n");
        assert_eq!(
            p,
            vec!["c.yaml:3:3: k3s.enable: unknown key `enable`: did you mean `enabled`?"]
        );
    }

    #[test]
    fn valid_config_passes() {
        let p = problems(
            "#cloud-config\nusers:\n- name: kairos\n  passwd: kairos\n  lock_passwd: true\n  groups: [admin]\ninstall:\n  device: /dev/vda\n  auto: yes\nk3s:\n  enabled: true\nstages:\n  boot:\n  - name: x\n    files:\n    - path: /a\n      permissions: 0644\n      content: x\n",
        );
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn header_type_and_pattern_problems() {
        let p = problems("install:\n  device: sda\n  auto: 3\n");
        assert!(p[0].contains("c.yaml:1:1: missing header"), "{p:?}");
        assert!(
            p.iter()
                .any(|x| x.starts_with("c.yaml:2:11: install.device:") && x.contains("pattern")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|x| x.starts_with("c.yaml:3:9: install.auto:")),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_step_key_in_stage() {
        let p = problems("#cloud-config\nstages:\n  boot:\n  - comands: [ls]\n");
        assert_eq!(
            p,
            vec![
                "c.yaml:4:5: stages.boot.0.comands: unknown key `comands`: did you mean `commands`?"
            ]
        );
    }
}
