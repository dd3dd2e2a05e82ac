//! Known keys of the typed config, read from its generated JSON Schema, and "did you mean".
//!
//! Kept apart from [`crate::validate`] so the stage loader (linked into the initramfs) can
//! name unknown keys without the JSON-Schema validator.

use std::sync::OnceLock;

use serde_json::Value as Json;

/// The generated schema of [`crate::types::Config`], built once.
pub fn schema() -> &'static Json {
    static S: OnceLock<Json> = OnceLock::new();
    S.get_or_init(crate::types::schema)
}

fn resolve<'a>(root: &'a Json, s: &'a Json) -> &'a Json {
    let mut cur = s;
    for _ in 0..16 {
        match cur.get("$ref").and_then(Json::as_str) {
            Some(r) => match root.pointer(r.trim_start_matches('#')) {
                Some(t) => cur = t,
                None => break,
            },
            None => break,
        }
    }
    cur
}

/// The property names the schema `s` allows at a JSON pointer of the instance.
pub fn properties_at(root: &Json, s: &Json, ptr: &str) -> Vec<String> {
    let s = resolve(root, s);
    let mut segs = ptr.split('/').skip(1).peekable();
    let Some(seg) = segs.next() else {
        let mut names: Vec<String> = s
            .get("properties")
            .and_then(Json::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for key in ["anyOf", "oneOf", "allOf"] {
            for b in s.get(key).and_then(Json::as_array).into_iter().flatten() {
                names.extend(properties_at(root, b, ""));
            }
        }
        names.sort();
        names.dedup();
        return names;
    };
    let rest: String = segs.map(|x| format!("/{x}")).collect();
    let mut found = Vec::new();
    if let Some(p) = s.get("properties").and_then(|p| p.get(seg)) {
        found.extend(properties_at(root, p, &rest));
    } else if let Some(a) = s.get("additionalProperties").filter(|a| a.is_object()) {
        found.extend(properties_at(root, a, &rest));
    }
    if let Some(items) = s.get("items").filter(|_| seg.parse::<usize>().is_ok()) {
        found.extend(properties_at(root, items, &rest));
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for b in s.get(key).and_then(Json::as_array).into_iter().flatten() {
            found.extend(properties_at(root, b, &format!("/{seg}{rest}")));
        }
    }
    found.sort();
    found.dedup();
    found
}

fn is_null_schema(s: &Json) -> bool {
    s.get("type").is_some_and(|t| t == "null")
}

/// The zero value of what schema `s` describes, when serde cannot read null as it:
/// `{}` for a struct or map, `[]` for a list.
fn zero_of(root: &Json, s: &Json) -> Option<Json> {
    let s = resolve(root, s);
    if let Some(bs) = s.get("anyOf").and_then(Json::as_array) {
        return bs
            .iter()
            .filter(|b| !is_null_schema(b))
            .find_map(|b| zero_of(root, b));
    }
    let has = |t: &str| match s.get("type") {
        Some(Json::String(x)) => x == t,
        Some(Json::Array(xs)) => xs.iter().any(|x| x == t),
        _ => false,
    };
    if s.get("properties").is_some() || has("object") {
        Some(Json::Object(Default::default()))
    } else if has("array") {
        Some(Json::Array(Vec::new()))
    } else {
        None
    }
}

fn fill(root: &Json, s: &Json, v: &mut Json, depth: usize) {
    if depth > 64 {
        return;
    }
    let s = resolve(root, s);
    for key in ["anyOf", "oneOf", "allOf"] {
        for b in s.get(key).and_then(Json::as_array).into_iter().flatten() {
            if !is_null_schema(b) {
                fill(root, b, v, depth + 1);
            }
        }
    }
    match v {
        Json::Object(m) => {
            if let Some(props) = s.get("properties").and_then(Json::as_object) {
                for (k, x) in m.iter_mut() {
                    if let Some(ps) = props.get(k) {
                        fill(root, ps, x, depth + 1);
                    }
                }
            } else if let Some(a) = s.get("additionalProperties").filter(|a| a.is_object()) {
                let zero = zero_of(root, a);
                for x in m.values_mut() {
                    if x.is_null()
                        && let Some(z) = &zero
                    {
                        *x = z.clone();
                    }
                    fill(root, a, x, depth + 1);
                }
            }
        }
        Json::Array(items) => {
            if let Some(it) = s.get("items") {
                for x in items {
                    fill(root, it, x, depth + 1);
                }
            }
        }
        _ => {}
    }
}

/// Go gives a map entry written with no value the zero value of the map's element type
/// (`users: {kairos: }` is a user with every default, `authorized_keys: {root: }` no keys);
/// serde refuses null for a struct or a list. This writes `{}` or `[]` there, where the
/// schema of `def` says the map's values are structs or lists.
pub fn zero_null_map_values(def: &str, json: &mut Json) {
    if let Some(base) = definition(def) {
        fill(schema(), base, json, 0);
    }
}

/// The schema of definition `def` (`""`: the whole config).
fn definition(def: &str) -> Option<&'static Json> {
    let root = schema();
    if def.is_empty() {
        Some(root)
    } else {
        root.pointer(&format!("/$defs/{def}"))
    }
}

/// The keys the definition `def` (`Step`, `CloudUser`; `""` for the whole config) allows at
/// a dot path below it.
pub fn known_keys(def: &str, path: &[String]) -> Vec<String> {
    let Some(base) = definition(def) else {
        return Vec::new();
    };
    let root = schema();
    let ptr: String = path
        .iter()
        .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
        .collect();
    properties_at(root, base, &ptr)
}

fn norm(s: &str) -> String {
    s.to_lowercase().replace(['-', '_'], "")
}

/// The closest known key to a misspelt one, if it is close enough to be a typo.
pub fn did_you_mean(key: &str, known: &[String]) -> Option<String> {
    known
        .iter()
        .map(|k| {
            let mut score = strsim::jaro_winkler(&norm(key), &norm(k));
            if norm(key) == norm(k) {
                score = 1.0;
            }
            (score, k)
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.clone())
}

/// Keys other tools accept that Kairos does not act on, with what to write instead.
pub const NOT_IN_KAIROS: &[(&str, &str)] = &[
    (
        "sudo",
        "cloud-init's `sudo` is not applied by Kairos: add the user to a group sudoers allows (`groups: [admin]`) or write /etc/sudoers.d/<user> with a `files` step",
    ),
    ("lock-passwd", "write `lock_passwd`"),
    (
        "plain_text_passwd",
        "write the password in `passwd` (plain text is hashed for you)",
    ),
    ("hashed_passwd", "write the hash in `passwd`"),
];

/// The advice for an unknown key: what to write instead, or the closest known key.
pub fn hint(key: &str, known: &[String]) -> Option<String> {
    if let Some((_, h)) = NOT_IN_KAIROS.iter().find(|(k, _)| *k == key) {
        return Some(h.to_string());
    }
    did_you_mean(key, known).map(|s| format!("did you mean `{s}`?"))
}

/// A stricter "did you mean" for top-level keys, where most unknown keys are bundle and
/// provider blocks (`argocd`, `kubevirt`) rather than typos: one edit (a transposition counts
/// as one) — two for keys of ten characters or more — after ignoring case, `-` and `_`.
pub fn near_top_level(key: &str, known: &[String]) -> Option<String> {
    let k = norm(key);
    known
        .iter()
        .map(|c| (strsim::damerau_levenshtein(&k, &norm(c)), c))
        .filter(|(d, c)| *d <= if k.len() >= 10 && c.len() >= 10 { 2 } else { 1 })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_needs_closeness() {
        let known = vec!["enabled".to_string(), "args".to_string()];
        assert_eq!(did_you_mean("enable", &known).as_deref(), Some("enabled"));
        assert_eq!(did_you_mean("zzzz", &known), None);
    }

    #[test]
    fn top_level_suggestions_are_for_typos_not_bundles() {
        let known = known_keys("", &[]);
        let s = |k: &str| near_top_level(k, &known);
        assert_eq!(s("hostnme").as_deref(), Some("hostname"));
        assert_eq!(s("hsotname").as_deref(), Some("hostname"));
        assert_eq!(s("boot-assessment").as_deref(), Some("boot_assessment"));
        assert_eq!(s("boot_assesment").as_deref(), Some("boot_assessment"));
        for bundle in crate::validate::BUNDLE_BLOCKS {
            assert_eq!(s(bundle), None, "{bundle}");
        }
    }

    #[test]
    fn keys_of_nested_definitions() {
        let k = known_keys("Step", &["files".into(), "0".into()]);
        assert!(k.contains(&"permissions".to_string()), "{k:?}");
        let k = known_keys("", &["k3s".into()]);
        assert!(k.contains(&"enabled".to_string()), "{k:?}");
    }
}
