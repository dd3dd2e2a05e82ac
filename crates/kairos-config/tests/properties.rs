//! Property tests over parse + merge + validate: nothing panics on any input, emitted YAML
//! parses back to the same values, and merge agrees with a plain model of Kairos' merge laws.

use std::sync::Arc;

use kairos_config::merge::merge;
use kairos_config::node::Node;
use kairos_config::{validate, yaml};
use proptest::prelude::*;
use serde_json::{Map, Value as Json};

const KEYS: &[&str] = &[
    "install",
    "device",
    "users",
    "name",
    "stages",
    "boot",
    "files",
    "path",
    "k3s",
    "enabled",
    "env",
    "a",
    "b",
    "weird key",
    "0644",
    "yes",
    "-dash",
    "x: y",
    "#c",
];

fn scalar() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        (-100_000i64..100_000).prop_map(Json::from),
        prop_oneof![Just(0.5f64), Just(-2.25), Just(1e10)].prop_map(Json::from),
        "[a-z0-9 :#'\"\\-\\n{}\\[\\],.|>*&!%@`]{0,12}".prop_map(Json::String),
        prop_oneof![
            Just("0644"),
            Just("yes"),
            Just("~"),
            Just("null"),
            Just("true"),
            Just("1e3"),
            Just(" lead"),
            Just("trail ")
        ]
        .prop_map(|s| Json::String(s.into())),
    ]
}

fn tree() -> impl Strategy<Value = Json> {
    scalar().prop_recursive(4, 40, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::btree_map(prop::sample::select(KEYS), inner, 0..5).prop_map(|m| {
                Json::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

fn doc() -> impl Strategy<Value = Json> {
    prop::collection::btree_map(prop::sample::select(KEYS), tree(), 0..5)
        .prop_map(|m| Json::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

fn node(j: &Json, src: &str) -> Node {
    Node::from_json(j, &kairos_config::Origin::whole(&Arc::from(src)))
}

fn is_scalar(j: &Json) -> bool {
    !matches!(j, Json::Array(_) | Json::Object(_))
}

/// The merge laws, stated directly on JSON. `None` = kind conflict.
fn model(a: &Json, b: &Json) -> Option<Json> {
    Some(match (a, b) {
        (Json::Object(x), Json::Object(y)) => {
            let mut out = x.clone();
            for (k, v) in y {
                let merged = match x.get(k) {
                    Some(old) => model(old, v)?,
                    None => v.clone(),
                };
                out.insert(k.clone(), merged);
            }
            Json::Object(out)
        }
        (Json::Array(x), Json::Array(y)) => {
            let of_maps = x.iter().chain(y).any(|v| !is_scalar(v));
            let mut out = x.clone();
            for v in y {
                if of_maps || !out[..x.len()].contains(v) && !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Json::Array(out)
        }
        (old, Json::Null) => match old {
            Json::Object(_) => Json::Object(Map::new()),
            Json::Array(_) => Json::Array(Vec::new()),
            Json::String(_) => Json::String(String::new()),
            Json::Number(n) if n.is_i64() => Json::from(0),
            Json::Number(_) => Json::from(0.0),
            Json::Bool(_) => Json::Bool(false),
            Json::Null => Json::Null,
        },
        (Json::Null, v) => v.clone(),
        (x, y) if is_scalar(x) && is_scalar(y) => y.clone(),
        _ => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn any_text_parses_or_errors_without_panic(s in "\\PC{0,200}") {
        let _ = yaml::parse(&s, &Arc::from("fuzz.yaml"));
        let _ = validate::validate_text(&s, "fuzz.yaml");
        let _ = kairos_config::cmdline::config_from_cmdline(&s);
        let _ = kairos_config::cmdline::dot_notation(&s);
    }

    #[test]
    fn yaml_like_text_never_panics(lines in prop::collection::vec("( {0,4})([a-z]{1,5}: ?|- ?)?[a-z0-9'\"\\[\\]{}&*!|>:,#]{0,8}", 0..12)) {
        let s = lines.join("\n");
        let _ = validate::validate_text(&format!("#cloud-config\n{s}"), "f.yaml");
    }

    #[test]
    fn emitted_yaml_round_trips(d in doc()) {
        let n = node(&d, "a");
        let text = yaml::to_string(&n);
        let back = yaml::parse(&text, &Arc::from("b")).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(back.to_json(), d, "{}", text);
    }

    #[test]
    fn merge_follows_the_laws(a in doc(), b in doc()) {
        let mut acc = node(&a, "a.yaml");
        let result = merge(&mut acc, node(&b, "b.yaml"));
        match model(&a, &b) {
            Some(expected) => {
                prop_assert!(result.is_ok(), "unexpected conflict: {:?}", result);
                prop_assert_eq!(acc.to_json(), expected);
            }
            None => {
                let e = result.expect_err("a kind conflict must be an error").to_string();
                prop_assert!(e.contains("a.yaml") && e.contains("b.yaml"), "{}", e);
            }
        }
    }

    #[test]
    fn merging_an_empty_document_changes_nothing(a in doc()) {
        let mut acc = node(&a, "a");
        merge(&mut acc, node(&Json::Object(Map::new()), "e")).unwrap();
        prop_assert_eq!(acc.to_json(), a.clone());
        let mut empty = node(&Json::Object(Map::new()), "e");
        merge(&mut empty, node(&a, "a")).unwrap();
        prop_assert_eq!(empty.to_json(), a);
    }

    #[test]
    fn validation_of_merged_documents_never_panics(a in doc(), b in doc()) {
        let mut acc = node(&a, "a");
        if merge(&mut acc, node(&b, "b")).is_ok() {
            for p in validate::validate_node(&acc) {
                prop_assert!(!p.message.is_empty());
            }
        }
    }
}
