//! Reading one section of a config into its type the way Go's `yaml.Unmarshal` does: keys
//! the type does not know are ignored — and reported, located, with a did-you-mean — and a
//! key with no value is the field's zero value. A value of the wrong type fails the section
//! (it is reported with the key that holds it); the caller says what is lost.
//!
//! This is what the stage loader and the lifecycle commands use; `validate` (the strict
//! view of the same schema) is in [`crate::validate`].

use serde::de::DeserializeOwned;

use crate::keys;
use crate::node::Node;
use crate::validate::{Level, Problem};

/// A dot path below a section, as segments.
fn ignored_path(p: &serde_ignored::Path, out: &mut Vec<String>) {
    use serde_ignored::Path;
    match p {
        Path::Root => {}
        Path::Seq { parent, index } => {
            ignored_path(parent, out);
            out.push(index.to_string());
        }
        Path::Map { parent, key } => {
            ignored_path(parent, out);
            out.push(key.clone());
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent, out),
    }
}

fn join(base: &str, rest: &[String]) -> String {
    let mut parts: Vec<&str> = Vec::new();
    if !base.is_empty() {
        parts.push(base);
    }
    parts.extend(rest.iter().map(String::as_str));
    parts.join(".")
}

/// Decodes `node` as `T`, the schema definition `def` (`Step`, `CloudUser`, `Install`…),
/// found at dot path `at` of its document (for messages). `Err` holds the reason the
/// section cannot be used; the problems hold every unknown key either way.
pub fn section<T: DeserializeOwned>(
    node: &Node,
    def: &str,
    at: &str,
) -> (Result<T, Problem>, Vec<Problem>) {
    let mut unknown: Vec<Vec<String>> = Vec::new();
    let mut json = node.to_json();
    keys::zero_null_map_values(def, &mut json);
    let mut note = |p: serde_ignored::Path<'_>| {
        let mut segs = Vec::new();
        ignored_path(&p, &mut segs);
        unknown.push(segs);
    };
    let de = serde_ignored::Deserializer::new(json, &mut note);
    let result: Result<T, _> = serde_path_to_error::deserialize(de);
    let mut problems = Vec::new();
    for segs in unknown {
        let Some((key, parent)) = segs.split_last() else {
            continue;
        };
        let holder = node.at_path(&parent.join("."));
        let origin = holder
            .and_then(|h| h.key_of(key))
            .map(|k| k.origin.clone())
            .unwrap_or_else(|| node.origin.clone());
        let known = keys::known_keys(def, parent);
        let hint = keys::hint(key, &known)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        problems.push(Problem {
            origin,
            path: join(at, &segs),
            message: format!("unknown key `{key}` ignored{hint}"),
            level: Level::Warning,
        });
    }
    let result = result.map_err(|e| {
        let segs: Vec<String> = e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                _ => None,
            })
            .collect();
        let at_node = node.at_path(&segs.join(".")).unwrap_or(node);
        Problem {
            origin: at_node.origin.clone(),
            path: join(at, &segs),
            message: e.into_inner().to_string(),
            level: Level::Error,
        }
    });
    (result, problems)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::types::{CloudUser, Step, Upgrade};

    fn parse(text: &str) -> Node {
        crate::yaml::parse(text, &Arc::from("t.yaml")).unwrap()
    }

    #[test]
    fn unknown_keys_are_ignored_and_located() {
        let n = parse("files:\n- path: /etc/sudoers\n  permsisions: 0600\n  content: x\n");
        let (step, problems) = section::<Step>(&n, "Step", "stages.boot.0");
        let step = step.unwrap();
        assert_eq!(step.files[0].path, "/etc/sudoers");
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].to_string(),
            "t.yaml:3:3: stages.boot.0.files.0.permsisions: unknown key `permsisions` ignored: did you mean `permissions`?"
        );
        assert_eq!(problems[0].level, Level::Warning);
    }

    #[test]
    fn null_is_the_zero_value() {
        let n = parse(
            "name: kairos\npasswd: kairos\nssh_authorized_keys:\n# - github:me\ngroups:\nsudo: ALL\n",
        );
        let (u, problems) = section::<CloudUser>(&n, "CloudUser", "users.0");
        let u = u.unwrap();
        assert_eq!(u.name, "kairos");
        assert!(u.ssh_authorized_keys.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].path == "users.0.sudo", "{problems:?}");
    }

    #[test]
    fn a_map_value_with_nothing_is_its_zero_value() {
        let n = parse(
            "users:\n  kairos:\n  ops: {passwd: x}\nauthorized_keys:\n  root:\nsysctl:\n  a.b:\n",
        );
        let (s, p) = section::<Step>(&n, "Step", "stages.boot.0");
        let s = s.unwrap();
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(s.users["kairos"], crate::types::StepUser::default());
        assert_eq!(s.users["ops"].passwd.as_deref(), Some("x"));
        assert!(s.authorized_keys["root"].is_empty());
        assert_eq!(s.sysctl["a.b"].0, "");
    }

    #[test]
    fn a_wrong_type_names_its_key() {
        let n = parse("reboot: true\nfoo: 1\n");
        let (u, p) = section::<Upgrade>(&n, "Upgrade", "upgrade");
        assert!(
            u.unwrap().reboot.0,
            "upgrade with an unknown key still reboots"
        );
        assert_eq!(p.len(), 1);
        let n = parse("commands: [a]\nfiles:\n- path: [x]\n");
        let (s, _) = section::<Step>(&n, "Step", "stages.boot.1");
        let e = s.unwrap_err();
        assert_eq!(e.path, "stages.boot.1.files.0.path");
        assert_eq!((e.origin.line, e.origin.col), (3, 9));
        assert_eq!(e.level, Level::Error);
    }
}
