//! YAML in and out, with go-yaml v3's scalar typing so Go-era configs mean the same here.
//!
//! Parsing goes through `saphyr-parser` events so every key and value keeps its line and
//! column. Plain scalars are resolved the way go-yaml v3 resolves them into `interface{}`:
//! `0644` is the octal integer 420, `yes` stays a string, `~`/`null`/empty are null.

use std::collections::HashMap;
use std::sync::Arc;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use crate::node::{Key, Node, Origin, Value};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct YamlError {
    pub origin: Origin,
    pub message: String,
}

enum Frame {
    Seq(Vec<Node>, Origin, usize),
    Map(Vec<(Key, Node)>, Option<Key>, Origin, usize, Vec<Node>),
}

/// Nesting deeper than this is refused (later passes recurse over the tree).
pub const MAX_DEPTH: usize = 128;
/// Aliases may make a document at most this many nodes larger than its size in bytes: a
/// config does not need more, and a "billion laughs" file of 500 bytes would otherwise expand
/// to 10⁹ nodes.
pub const MAX_ALIAS_NODES: usize = 100_000;

/// Parses the first document of `text`; an empty document is an empty map.
pub fn parse(text: &str, source: &Arc<str>) -> Result<Node, YamlError> {
    let origin_at = |span: &Span| Origin::new(source, span.start.line(), span.start.col() + 1);
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    // Nodes built so far (aliases count as the size of what they copy), each anchor's size,
    // and the count when each open collection started.
    let max_nodes = MAX_ALIAS_NODES + text.len();
    let mut nodes = 0usize;
    let mut weights: HashMap<usize, usize> = HashMap::new();
    let mut starts: Vec<usize> = Vec::new();
    let mut result: Option<Node> = None;
    let mut docs = 0;
    while let Some(ev) = parser.next_event() {
        let (ev, span) = ev.map_err(|e| YamlError {
            origin: Origin::new(source, e.marker().line(), e.marker().col() + 1),
            message: e.info().to_string(),
        })?;
        let node = match ev {
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    // go-yaml's Unmarshal reads the first document only.
                    break;
                }
                continue;
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => continue,
            Event::Alias(id) => {
                nodes += weights.get(&id).copied().unwrap_or(1);
                if nodes > max_nodes {
                    return Err(YamlError {
                        origin: origin_at(&span),
                        message: format!(
                            "aliases expand this document past {max_nodes} nodes; refused (a \"billion laughs\" file?)"
                        ),
                    });
                }
                anchors.get(&id).cloned().ok_or_else(|| YamlError {
                    origin: origin_at(&span),
                    message: "unknown anchor".into(),
                })?
            }
            Event::Scalar(text, style, anchor, tag) => {
                let tag = tag.map(|t| t.suffix.clone());
                let value =
                    resolve_scalar(&text, style, tag.as_deref()).map_err(|message| YamlError {
                        origin: origin_at(&span),
                        message,
                    })?;
                let mut n = Node::new(value, origin_at(&span));
                if style == ScalarStyle::Plain && matches!(n.value, Value::Int(_)) {
                    n.raw = Some(Arc::from(text.as_ref()));
                }
                // A plain `<<` key marks a merge; remember that through the key name.
                let n = if style == ScalarStyle::Plain && text == "<<" {
                    Node::new(Value::Str("\u{0}<<".into()), n.origin)
                } else {
                    n
                };
                nodes += 1;
                if anchor > 0 {
                    anchors.insert(anchor, n.clone());
                    weights.insert(anchor, 1);
                }
                n
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if stack.len() >= MAX_DEPTH => {
                return Err(YamlError {
                    origin: origin_at(&span),
                    message: format!("nested more than {MAX_DEPTH} levels deep; refused"),
                });
            }
            Event::SequenceStart(anchor, _) => {
                starts.push(nodes);
                stack.push(Frame::Seq(Vec::new(), origin_at(&span), anchor));
                continue;
            }
            Event::MappingStart(anchor, _) => {
                starts.push(nodes);
                stack.push(Frame::Map(
                    Vec::new(),
                    None,
                    origin_at(&span),
                    anchor,
                    Vec::new(),
                ));
                continue;
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(items, origin, anchor)) => {
                    let n = Node::new(Value::Seq(items), origin);
                    nodes += 1;
                    let start = starts.pop().unwrap_or(0);
                    if anchor > 0 {
                        anchors.insert(anchor, n.clone());
                        weights.insert(anchor, nodes - start);
                    }
                    n
                }
                _ => unreachable!("parser emits balanced events"),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(mut entries, _, origin, anchor, merges)) => {
                    for m in merges {
                        let sources = match m.value {
                            Value::Map(_) => vec![m],
                            Value::Seq(items) => items,
                            _ => {
                                return Err(YamlError {
                                    origin: m.origin,
                                    message: "merge key `<<` needs a map or a list of maps".into(),
                                });
                            }
                        };
                        for s in sources {
                            if let Value::Map(extra) = s.value {
                                for (k, v) in extra {
                                    if !entries.iter().any(|(e, _)| e.name == k.name) {
                                        entries.push((k, v));
                                    }
                                }
                            }
                        }
                    }
                    let n = Node::new(Value::Map(entries), origin);
                    nodes += 1;
                    let start = starts.pop().unwrap_or(0);
                    if anchor > 0 {
                        anchors.insert(anchor, n.clone());
                        weights.insert(anchor, nodes - start);
                    }
                    n
                }
                _ => unreachable!("parser emits balanced events"),
            },
        };
        match stack.last_mut() {
            None => {
                result = Some(node);
            }
            Some(Frame::Seq(items, ..)) => items.push(node),
            Some(Frame::Map(entries, pending, _, _, merges)) => match pending.take() {
                None => {
                    let name = match &node.value {
                        Value::Str(s) => s.clone(),
                        Value::Null => "null".to_string(),
                        v if v.is_scalar() => node.scalar_text().unwrap_or_default(),
                        _ => {
                            return Err(YamlError {
                                origin: node.origin,
                                message: "a map key must be a scalar".into(),
                            });
                        }
                    };
                    if let Some((prev, _)) = entries.iter().find(|(k, _)| k.name == name) {
                        return Err(YamlError {
                            origin: node.origin,
                            message: format!(
                                "mapping key {name:?} already defined at line {}",
                                prev.origin.line
                            ),
                        });
                    }
                    *pending = Some(Key {
                        name,
                        origin: node.origin,
                    });
                }
                Some(key) if key.name == "\u{0}<<" => merges.push(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }
    Ok(result
        .filter(|n| !matches!(n.value, Value::Null))
        .unwrap_or_else(|| Node::empty_map(Origin::new(source, 1, 1))))
}

fn resolve_scalar(text: &str, style: ScalarStyle, tag: Option<&str>) -> Result<Value, String> {
    let explicit = |kind: &str, v: Option<Value>| {
        v.ok_or_else(|| format!("cannot decode {text:?} as !!{kind}"))
    };
    match tag {
        Some("str") => return Ok(Value::Str(text.to_string())),
        Some("int") => return explicit("int", go_int(text).map(Value::Int)),
        Some("float") => return explicit("float", go_float(text).map(Value::Float)),
        Some("bool") => return explicit("bool", go_bool(text).map(Value::Bool)),
        Some("null") => return Ok(Value::Null),
        _ => {}
    }
    if style != ScalarStyle::Plain {
        return Ok(Value::Str(text.to_string()));
    }
    Ok(resolve_plain(text))
}

/// go-yaml v3 resolution of an untagged plain scalar.
pub fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        _ => {}
    }
    if let Some(b) = go_bool(text) {
        return Value::Bool(b);
    }
    let first = text.as_bytes()[0];
    if first.is_ascii_digit() || matches!(first, b'-' | b'+' | b'.') {
        if let Some(i) = go_int(text) {
            return Value::Int(i);
        }
        if let Some(f) = go_float(text) {
            return Value::Float(f);
        }
    }
    Value::Str(text.to_string())
}

fn go_bool(t: &str) -> Option<bool> {
    match t {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)`: `0x`, `0o`, `0b` prefixes, a leading `0` is octal.
pub fn go_int(t: &str) -> Option<i64> {
    let (neg, body) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if body.is_empty() {
        return None;
    }
    let lower = body.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.to_string())
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_string())
    } else {
        (10, lower.clone())
    };
    // Go accepts `_` separators only together with a base prefix.
    let digits = if radix != 10
        && lower.len() > 1
        && !lower[1..].starts_with(|c: char| c.is_ascii_digit())
    {
        digits.replace('_', "")
    } else {
        digits
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i64::from_str_radix(&digits, radix).ok()?;
    Some(if neg { -v } else { v })
}

fn go_float(t: &str) -> Option<f64> {
    match t {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let ok = t
        .trim_start_matches(['-', '+'])
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'));
    if !ok {
        return None;
    }
    t.parse::<f64>().ok()
}

/// Renders a tree as block-style YAML that parses back to the same values.
pub fn to_string(node: &Node) -> String {
    let mut out = String::new();
    match &node.value {
        Value::Map(m) if m.is_empty() => out.push_str("{}\n"),
        Value::Seq(s) if s.is_empty() => out.push_str("[]\n"),
        Value::Map(_) | Value::Seq(_) => emit(node, 0, &mut out),
        _ => {
            out.push_str(&scalar(node, 0));
            out.push('\n');
        }
    }
    out
}

fn emit(node: &Node, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match &node.value {
        Value::Map(m) => {
            for (k, v) in m {
                out.push_str(&pad);
                out.push_str(&quote_str(&k.name));
                out.push(':');
                emit_child(v, indent, out);
            }
        }
        Value::Seq(items) => {
            for v in items {
                out.push_str(&pad);
                out.push('-');
                match &v.value {
                    Value::Map(m) if !m.is_empty() => {
                        // First entry on the dash line, the rest aligned under it.
                        let mut sub = String::new();
                        emit(v, indent + 2, &mut sub);
                        out.push(' ');
                        out.push_str(&sub[indent + 2..]);
                    }
                    _ => emit_child(v, indent, out),
                }
            }
        }
        _ => {
            out.push_str(&pad);
            out.push_str(&scalar(node, indent));
            out.push('\n');
        }
    }
}

fn emit_child(v: &Node, indent: usize, out: &mut String) {
    match &v.value {
        Value::Map(m) if !m.is_empty() => {
            out.push('\n');
            emit(v, indent + 2, out);
        }
        Value::Seq(s) if !s.is_empty() => {
            out.push('\n');
            emit(v, indent + 2, out);
        }
        Value::Map(_) => out.push_str(" {}\n"),
        Value::Seq(_) => out.push_str(" []\n"),
        _ => {
            out.push(' ');
            out.push_str(&scalar(v, indent + 2));
            out.push('\n');
        }
    }
}

fn scalar(node: &Node, indent: usize) -> String {
    match &node.value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        // Keep `0640` as written: it means the same and reads as a mode.
        Value::Int(i) => match &node.raw {
            Some(raw) if go_int(raw) == Some(*i) => raw.to_string(),
            _ => i.to_string(),
        },
        Value::Float(f) if f.is_nan() => ".nan".into(),
        Value::Float(f) if f.is_infinite() => if *f > 0.0 { ".inf" } else { "-.inf" }.into(),
        Value::Float(f) => {
            let s = f.to_string();
            if s.contains(['.', 'e']) {
                s
            } else {
                format!("{s}.0")
            }
        }
        Value::Str(s) => {
            // A literal block guesses its indentation from the first non-empty line, so that
            // line must not start with blanks, and there must be one.
            let first_content = s.lines().find(|l| !l.is_empty());
            let block_ok = s.contains('\n')
                && first_content.is_some_and(|l| !l.starts_with([' ', '\t']))
                && !s.contains('\r')
                && s.lines().all(|l| !l.ends_with([' ', '\t']))
                && !s.ends_with("\n\n");
            if block_ok {
                let pad = " ".repeat(indent);
                let chomp = if s.ends_with('\n') { "|" } else { "|-" };
                let body: Vec<String> = s
                    .trim_end_matches('\n')
                    .split('\n')
                    .map(|l| {
                        if l.is_empty() {
                            String::new()
                        } else {
                            format!("{pad}{l}")
                        }
                    })
                    .collect();
                format!("{chomp}\n{}", body.join("\n"))
            } else {
                quote_str(s)
            }
        }
        _ => String::new(),
    }
}

/// Quotes a string only when plain style would change its meaning.
fn quote_str(s: &str) -> String {
    let needs = s.is_empty()
        || !matches!(resolve_plain(s), Value::Str(_))
        || s.starts_with(|c: char| " \t-?:,[]{}#&*!|>'\"%@`".contains(c))
        || s.ends_with([' ', '\t', ':'])
        || s.contains(": ")
        || s.contains(" #")
        || s.chars().any(|c| c.is_control());
    if needs {
        serde_json::to_string(s).unwrap_or_default()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn billion_laughs_and_deep_nesting_are_refused() {
        let mut doc = String::from(
            "#cloud-config\na: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (i, prev) in ["b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .zip(["a", "b", "c", "d", "e", "f", "g", "h"])
        {
            let refs = vec![format!("*{prev}"); 9].join(",");
            doc.push_str(&format!("{i}: &{i} [{refs}]\n"));
        }
        assert!(doc.len() < 600, "{}", doc.len());
        let e = parse(&doc, &Arc::from("bomb.yaml")).unwrap_err();
        assert!(e.message.contains("billion laughs"), "{e}");
        assert!(e.to_string().starts_with("bomb.yaml:"), "{e}");
        let deep = format!("a: {}{}\n", "[".repeat(200), "]".repeat(200));
        let e = parse(&deep, &Arc::from("deep.yaml")).unwrap_err();
        assert!(e.message.contains("nested"), "{e}");
        // Ordinary anchors still work.
        let ok = parse(
            "base: &b {x: 1}\nuse: *b\nlist: [*b, *b]\n",
            &Arc::from("ok"),
        )
        .unwrap();
        assert_eq!(ok.to_json()["list"][1]["x"], 1);
    }

    use super::*;

    fn p(t: &str) -> Node {
        parse(t, &Arc::from("t.yaml")).unwrap()
    }

    #[test]
    fn go_scalar_typing() {
        let n = p(
            "a: 0644\nb: 644\nc: 0o644\nd: 0x1a4\ne: yes\nf: true\ng: ~\nh: '0644'\ni: 1.5\nj: -3\nk: 089\n",
        );
        let j = n.to_json();
        assert_eq!(j["a"], 420);
        assert_eq!(j["b"], 644);
        assert_eq!(j["c"], 420);
        assert_eq!(j["d"], 420);
        assert_eq!(j["e"], "yes");
        assert_eq!(j["f"], true);
        assert!(j["g"].is_null());
        assert_eq!(j["h"], "0644");
        assert_eq!(j["i"], 1.5);
        assert_eq!(j["j"], -3);
        assert_eq!(j["k"], 89.0);
    }

    #[test]
    fn positions_are_one_based() {
        let n = p("#cloud-config\ninstall:\n  device: /dev/vda\n");
        let d = n.at_path("install.device").unwrap();
        assert_eq!((d.origin.line, d.origin.col), (3, 11));
        let k = n.get("install").unwrap().key_of("device").unwrap();
        assert_eq!((k.origin.line, k.origin.col), (3, 3));
    }

    #[test]
    fn anchors_merge_keys_and_duplicates() {
        let n = p("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n");
        assert_eq!(n.to_json()["other"], serde_json::json!({"y": 3, "x": 1}));
        let e = parse("a: 1\na: 2\n", &Arc::from("d.yaml")).unwrap_err();
        assert!(e.to_string().contains("already defined at line 1"), "{e}");
        assert!(e.to_string().starts_with("d.yaml:2:1"), "{e}");
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse("a: [1, 2\n", &Arc::from("x.yaml")).unwrap_err();
        assert!(e.to_string().starts_with("x.yaml:"), "{e}");
    }

    #[test]
    fn emit_round_trips() {
        let src = "a:\n  b: [1, 'x: y', '0644', yes, null, '']\n  c: \"multi\\nline\\n\"\nl:\n- name: u\n  groups: [a]\n- {}\ne: {}\n";
        let n = p(src);
        let out = to_string(&n);
        assert_eq!(p(&out).to_json(), n.to_json(), "{out}");
    }
}
