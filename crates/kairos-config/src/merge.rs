//! Kairos' merge laws for config documents.
//!
//! Maps merge deep; a later scalar wins; lists of maps concatenate (so two files that each
//! add a stage step or a user keep both); lists of scalars union; a later `null` resets the
//! key to the empty value of its earlier kind; a map meeting a list or a scalar is an error
//! that names both places.

use crate::node::{Node, Origin, Value};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot merge `{path}`: it is a {first_kind} at {first} but a {second_kind} at {second}")]
pub struct MergeError {
    pub path: String,
    pub first: Origin,
    pub first_kind: &'static str,
    pub second: Origin,
    pub second_kind: &'static str,
}

/// Merges `later` into `acc`.
pub fn merge(acc: &mut Node, later: Node) -> Result<(), MergeError> {
    merge_at(acc, later, "")
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn merge_at(acc: &mut Node, later: Node, path: &str) -> Result<(), MergeError> {
    match (&mut acc.value, later.value) {
        (Value::Map(a), Value::Map(b)) => {
            for (k, v) in b {
                match a.iter_mut().find(|(ak, _)| ak.name == k.name) {
                    Some((_, av)) => merge_at(av, v, &child_path(path, &k.name))?,
                    None => a.push((k, v)),
                }
            }
            Ok(())
        }
        (Value::Seq(a), Value::Seq(b)) => {
            let of_maps = a.iter().chain(b.iter()).any(|n| !n.value.is_scalar());
            for v in b {
                if of_maps || !a.iter().any(|x| x.value == v.value) {
                    a.push(v);
                }
            }
            Ok(())
        }
        (_, Value::Null) => {
            acc.value = match &acc.value {
                Value::Map(_) => Value::Map(Vec::new()),
                Value::Seq(_) => Value::Seq(Vec::new()),
                Value::Str(_) => Value::Str(String::new()),
                Value::Int(_) => Value::Int(0),
                Value::Float(_) => Value::Float(0.0),
                Value::Bool(_) => Value::Bool(false),
                Value::Null => Value::Null,
            };
            acc.origin = later.origin;
            Ok(())
        }
        (Value::Null, v) => {
            acc.value = v;
            acc.origin = later.origin;
            acc.raw = later.raw;
            Ok(())
        }
        (a, v) if a.is_scalar() && v.is_scalar() => {
            acc.value = v;
            acc.origin = later.origin;
            acc.raw = later.raw;
            Ok(())
        }
        (a, v) => Err(MergeError {
            path: if path.is_empty() {
                "(top level)".into()
            } else {
                path.to_string()
            },
            first: acc.origin.clone(),
            first_kind: a.kind(),
            second: later.origin,
            second_kind: v.kind(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml;
    use serde_json::json;
    use std::sync::Arc;

    fn p(src: &str, name: &str) -> Node {
        yaml::parse(src, &Arc::from(name)).unwrap()
    }

    fn merged(a: &str, b: &str) -> serde_json::Value {
        let mut acc = p(a, "a.yaml");
        merge(&mut acc, p(b, "b.yaml")).unwrap();
        acc.to_json()
    }

    #[test]
    fn laws() {
        assert_eq!(
            merged("x: {a: 1, b: 2}", "x: {b: 3, c: 4}"),
            json!({"x": {"a": 1, "b": 3, "c": 4}})
        );
        assert_eq!(
            merged("l: [a, b]", "l: [b, c]"),
            json!({"l": ["a", "b", "c"]})
        );
        assert_eq!(
            merged("l: [{n: 1}]", "l: [{n: 1}]"),
            json!({"l": [{"n": 1}, {"n": 1}]})
        );
        assert_eq!(merged("x: {a: 1}", "x: null"), json!({"x": {}}));
        assert_eq!(merged("x: [1]", "x: ~"), json!({"x": []}));
        assert_eq!(merged("x: str", "x: 5"), json!({"x": 5}));
    }

    #[test]
    fn kind_conflict_names_both_sources() {
        let mut acc = p("install:\n  device: /dev/sda\n", "/oem/a.yaml");
        let e = merge(&mut acc, p("install: auto\n", "/oem/b.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`install`"), "{e}");
        assert!(e.contains("map at /oem/a.yaml:2:3"), "{e}");
        assert!(e.contains("string at /oem/b.yaml:1:10"), "{e}");
    }
}
