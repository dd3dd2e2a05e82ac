//! The config document tree: YAML values that remember the file, line and column they came from.

use std::fmt;
use std::sync::Arc;

use serde_json::Value as Json;

/// Where a value was written: a file path, `cmdline`, a URL, `<stdin>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub source: Arc<str>,
    /// 1-based; 0 when the source has no lines (the kernel cmdline).
    pub line: usize,
    /// 1-based.
    pub col: usize,
}

impl Origin {
    pub fn new(source: &Arc<str>, line: usize, col: usize) -> Self {
        Origin {
            source: source.clone(),
            line,
            col,
        }
    }

    /// An origin without a position (generated values, the cmdline).
    pub fn whole(source: &Arc<str>) -> Self {
        Origin {
            source: source.clone(),
            line: 0,
            col: 0,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.source)
        } else {
            write!(f, "{}:{}:{}", self.source, self.line, self.col)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub origin: Origin,
    /// The source text of a plain scalar that YAML typed as a number (`644`, `0644`), for the
    /// cloud-init keys that read it as an octal string instead.
    pub raw: Option<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub name: String,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

impl Value {
    /// The kind name used in messages ("map", "list", "string"…).
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "integer",
            Value::Float(_) => "number",
            Value::Str(_) => "string",
            Value::Seq(_) => "list",
            Value::Map(_) => "map",
        }
    }

    pub fn is_scalar(&self) -> bool {
        !matches!(self, Value::Seq(_) | Value::Map(_))
    }
}

impl Node {
    pub fn new(value: Value, origin: Origin) -> Self {
        Node {
            value,
            origin,
            raw: None,
        }
    }

    /// cloud-init reads `write_files[].permissions` as an octal string even when unquoted,
    /// so `644` means 0644 there (while a yip step's `permissions: 644` is decimal, as in Go).
    pub fn fix_cloudinit_permissions(&mut self) {
        for key in ["write_files", "milpa_files"] {
            if let Some(Node {
                value: Value::Seq(files),
                ..
            }) = self.get_mut(key)
            {
                for f in files {
                    if let Some(p) = f.get_mut("permissions")
                        && let (Value::Int(_), Some(raw)) = (&p.value, &p.raw)
                    {
                        p.value = Value::Str(raw.to_string());
                    }
                }
            }
        }
    }

    pub fn empty_map(origin: Origin) -> Self {
        Node::new(Value::Map(Vec::new()), origin)
    }

    /// The entry `key` of a map node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(m) => m.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        match &mut self.value {
            Value::Map(m) => m.iter_mut().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Looks up a dot path (`install.device`, `users.0.name`).
    pub fn at_path(&self, path: &str) -> Option<&Node> {
        let mut cur = self;
        for seg in path.split('.').filter(|s| !s.is_empty()) {
            cur = match &cur.value {
                Value::Map(_) => cur.get(seg)?,
                Value::Seq(items) => items.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// Follows a JSON pointer (`/install/device`, `/users/0`) as produced by schema errors.
    pub fn at_pointer(&self, pointer: &str) -> Option<&Node> {
        let mut cur = self;
        for seg in pointer.split('/').skip(1) {
            let seg = seg.replace("~1", "/").replace("~0", "~");
            cur = match &cur.value {
                Value::Map(_) => cur.get(&seg)?,
                Value::Seq(items) => items.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// The key entry (with its own position) named `key` in a map node.
    pub fn key_of(&self, key: &str) -> Option<&Key> {
        match &self.value {
            Value::Map(m) => m.iter().find(|(k, _)| k.name == key).map(|(k, _)| k),
            _ => None,
        }
    }

    /// Converts to JSON, the form schema validation and serde deserialisation use.
    pub fn to_json(&self) -> Json {
        match &self.value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => Json::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(Json::Number)
                .unwrap_or(Json::Null),
            Value::Str(s) => Json::String(s.clone()),
            Value::Seq(items) => Json::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(m) => Json::Object(
                m.iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// Builds a tree from JSON, every node attributed to `origin`.
    pub fn from_json(j: &Json, origin: &Origin) -> Node {
        let value = match j {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(0.0)),
            },
            Json::String(s) => Value::Str(s.clone()),
            Json::Array(a) => Value::Seq(a.iter().map(|x| Node::from_json(x, origin)).collect()),
            Json::Object(m) => Value::Map(
                m.iter()
                    .map(|(k, v)| {
                        (
                            Key {
                                name: k.clone(),
                                origin: origin.clone(),
                            },
                            Node::from_json(v, origin),
                        )
                    })
                    .collect(),
            ),
        };
        Node::new(value, origin.clone())
    }

    /// Scalar as text, the way Go prints it (for `config get`).
    pub fn scalar_text(&self) -> Option<String> {
        Some(match &self.value {
            Value::Null => String::new(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) => s.clone(),
            _ => return None,
        })
    }
}
