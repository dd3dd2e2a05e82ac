//! Built-in functions: Go's template builtins and the sprig functions configs use.

use base64::Engine;
use serde_json::{Map, Value};
use sha2::Digest;

use crate::Error;

const NAMES: &[&str] = &[
    "add",
    "and",
    "atoi",
    "b64dec",
    "b64enc",
    "cat",
    "coalesce",
    "contains",
    "default",
    "dict",
    "div",
    "empty",
    "eq",
    "first",
    "ge",
    "gt",
    "has",
    "hasKey",
    "hasPrefix",
    "hasSuffix",
    "indent",
    "index",
    "int",
    "int64",
    "join",
    "keys",
    "last",
    "le",
    "len",
    "list",
    "lower",
    "lt",
    "mod",
    "mul",
    "ne",
    "nindent",
    "nospace",
    "not",
    "or",
    "print",
    "printf",
    "println",
    "quote",
    "randAlphaNum",
    "repeat",
    "replace",
    "required",
    "sha256sum",
    "splitList",
    "squote",
    "sub",
    "substr",
    "title",
    "toJson",
    "toString",
    "ternary",
    "trim",
    "trimAll",
    "trimPrefix",
    "trimSuffix",
    "trunc",
    "upper",
    "urlquery",
];

pub fn exists(name: &str) -> bool {
    NAMES.contains(&name)
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nil",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "map",
    }
}

/// Go's notion of "true" in `if`, `and`, `or`, `not`.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(m) => !m.is_empty(),
    }
}

/// How a value prints in template output (Go's `fmt` `%v` for the common cases).
pub fn to_text(v: &Value) -> String {
    match v {
        Value::Null => "<no value>".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => format!("[{}]", a.iter().map(to_text).collect::<Vec<_>>().join(" ")),
        Value::Object(m) => {
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{k}:{}", to_text(&m[*k])))
                .collect();
            format!("map[{}]", parts.join(" "))
        }
    }
}

/// sprig's `toString`: nil becomes an empty string.
fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        other => to_text(other),
    }
}

fn num(v: &Value) -> Result<f64, Error> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or(0.0)),
        Value::String(x) => x
            .trim()
            .parse()
            .map_err(|_| Error::Exec(format!("not a number: {x:?}"))),
        Value::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
        Value::Null => Ok(0.0),
        other => Err(Error::Exec(format!("not a number: {}", kind(other)))),
    }
}

fn int(v: &Value) -> Result<i64, Error> {
    num(v).map(|f| f as i64)
}

fn from_f64(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

fn arity(name: &str, args: &[Value], n: usize) -> Result<(), Error> {
    if args.len() != n {
        return Err(Error::Exec(format!(
            "wrong number of args for {name}: want {n} got {}",
            args.len()
        )));
    }
    Ok(())
}

fn eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn cmp(a: &Value, b: &Value) -> Result<std::cmp::Ordering, Error> {
    match (a, b) {
        (Value::String(x), Value::String(y)) => Ok(x.cmp(y)),
        _ => num(a)?
            .partial_cmp(&num(b)?)
            .ok_or_else(|| Error::Exec("incomparable values".into())),
    }
}

/// Minimal `printf`: `%s %d %v %q %%` and widths are ignored.
fn printf(fmt: &str, args: &[Value]) -> Result<String, Error> {
    let mut out = String::new();
    let mut it = args.iter();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        while chars
            .peek()
            .is_some_and(|c| c.is_ascii_digit() || *c == '-' || *c == '.')
        {
            chars.next();
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('q') => out.push_str(&format!("{:?}", s(it.next().unwrap_or(&Value::Null)))),
            Some('d') => out.push_str(&int(it.next().unwrap_or(&Value::Null))?.to_string()),
            Some(_) => out.push_str(&to_text(it.next().unwrap_or(&Value::Null))),
            None => out.push('%'),
        }
    }
    Ok(out)
}

fn random_alnum(n: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let state = std::collections::hash_map::RandomState::new();
    (0..n)
        .map(|i| {
            let mut h = state.build_hasher();
            h.write_usize(i);
            CHARS[(h.finish() % CHARS.len() as u64) as usize] as char
        })
        .collect()
}

pub fn call(name: &str, a: &[Value]) -> Result<Value, Error> {
    let str1 = |f: fn(&str) -> String| -> Result<Value, Error> {
        arity(name, a, 1)?;
        Ok(Value::String(f(&s(&a[0]))))
    };
    Ok(match name {
        "default" => {
            arity(name, a, 2)?;
            if truthy(&a[1]) {
                a[1].clone()
            } else {
                a[0].clone()
            }
        }
        "empty" => {
            arity(name, a, 1)?;
            Value::Bool(!truthy(&a[0]))
        }
        "coalesce" => a.iter().find(|v| truthy(v)).cloned().unwrap_or(Value::Null),
        "required" => {
            arity(name, a, 2)?;
            if a[1].is_null() || a[1] == Value::String(String::new()) {
                return Err(Error::Exec(s(&a[0])));
            }
            a[1].clone()
        }
        "ternary" => {
            arity(name, a, 3)?;
            if truthy(&a[2]) {
                a[0].clone()
            } else {
                a[1].clone()
            }
        }
        "upper" => str1(|x| x.to_uppercase())?,
        "lower" => str1(|x| x.to_lowercase())?,
        "trim" => str1(|x| x.trim().to_string())?,
        "nospace" => str1(|x| x.chars().filter(|c| !c.is_whitespace()).collect())?,
        "title" => str1(|x| {
            x.split(' ')
                .map(|w| {
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_uppercase().chain(c).collect())
                        .unwrap_or_default()
                })
                .collect::<Vec<String>>()
                .join(" ")
        })?,
        "quote" => Value::String(
            a.iter()
                .map(|v| format!("{:?}", s(v)))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        "squote" => Value::String(
            a.iter()
                .map(|v| format!("'{}'", s(v)))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        "b64enc" => str1(|x| base64::engine::general_purpose::STANDARD.encode(x))?,
        "b64dec" => {
            arity(name, a, 1)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s(&a[0]).trim())
                .map_err(|e| Error::Exec(format!("b64dec: {e}")))?;
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        }
        "sha256sum" => str1(|x| {
            sha2::Sha256::digest(x.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })?,
        "urlquery" => Value::String(
            a.iter()
                .map(s)
                .collect::<String>()
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    b' ' => "+".into(),
                    _ => format!("%{b:02X}"),
                })
                .collect(),
        ),
        "toString" => {
            arity(name, a, 1)?;
            Value::String(s(&a[0]))
        }
        "toJson" => {
            arity(name, a, 1)?;
            Value::String(serde_json::to_string(&a[0]).unwrap_or_default())
        }
        "trimAll" | "trimPrefix" | "trimSuffix" | "contains" | "hasPrefix" | "hasSuffix"
        | "repeat" => {
            arity(name, a, 2)?;
            let (arg, x) = (s(&a[0]), s(&a[1]));
            match name {
                "trimAll" => Value::String(x.trim_matches(|c| arg.contains(c)).to_string()),
                "trimPrefix" => {
                    Value::String(x.strip_prefix(arg.as_str()).unwrap_or(&x).to_string())
                }
                "trimSuffix" => {
                    Value::String(x.strip_suffix(arg.as_str()).unwrap_or(&x).to_string())
                }
                "contains" => Value::Bool(x.contains(&arg)),
                "hasPrefix" => Value::Bool(x.starts_with(&arg)),
                "hasSuffix" => Value::Bool(x.ends_with(&arg)),
                _ => Value::String(x.repeat(int(&a[0])?.max(0) as usize)),
            }
        }
        "replace" => {
            arity(name, a, 3)?;
            Value::String(s(&a[2]).replace(&s(&a[0]), &s(&a[1])))
        }
        "trunc" => {
            arity(name, a, 2)?;
            let n = int(&a[0])?;
            let x: Vec<char> = s(&a[1]).chars().collect();
            let out: String = if n >= 0 {
                x.iter().take(n as usize).collect()
            } else {
                x[x.len().saturating_sub(n.unsigned_abs() as usize)..]
                    .iter()
                    .collect()
            };
            Value::String(out)
        }
        "substr" => {
            arity(name, a, 3)?;
            let x: Vec<char> = s(&a[2]).chars().collect();
            let start = (int(&a[0])?.max(0) as usize).min(x.len());
            let end = int(&a[1])?;
            let end = if end < 0 {
                x.len()
            } else {
                (end as usize).min(x.len())
            };
            Value::String(x[start..end.max(start)].iter().collect())
        }
        "indent" | "nindent" => {
            arity(name, a, 2)?;
            let pad = " ".repeat(int(&a[0])?.max(0) as usize);
            let body = s(&a[1])
                .lines()
                .map(|l| format!("{pad}{l}"))
                .collect::<Vec<_>>()
                .join("\n");
            Value::String(if name == "nindent" {
                format!("\n{body}")
            } else {
                body
            })
        }
        "cat" => Value::String(
            a.iter()
                .filter(|v| !v.is_null())
                .map(s)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        "join" => {
            arity(name, a, 2)?;
            let items = match &a[1] {
                Value::Array(v) => v.iter().map(s).collect::<Vec<_>>(),
                other => vec![s(other)],
            };
            Value::String(items.join(&s(&a[0])))
        }
        "splitList" => {
            arity(name, a, 2)?;
            Value::Array(
                s(&a[1])
                    .split(&s(&a[0]))
                    .map(|x| Value::String(x.into()))
                    .collect(),
            )
        }
        "list" => Value::Array(a.to_vec()),
        "dict" => {
            let mut m = Map::new();
            for pair in a.chunks(2) {
                m.insert(s(&pair[0]), pair.get(1).cloned().unwrap_or(Value::Null));
            }
            Value::Object(m)
        }
        "keys" => {
            let mut k: Vec<String> = a
                .iter()
                .filter_map(Value::as_object)
                .flat_map(|m| m.keys().cloned())
                .collect();
            k.sort();
            Value::Array(k.into_iter().map(Value::String).collect())
        }
        "has" => {
            arity(name, a, 2)?;
            Value::Bool(
                a[1].as_array()
                    .is_some_and(|l| l.iter().any(|x| eq(x, &a[0]))),
            )
        }
        "hasKey" => {
            arity(name, a, 2)?;
            Value::Bool(a[0].as_object().is_some_and(|m| m.contains_key(&s(&a[1]))))
        }
        "first" | "last" => {
            arity(name, a, 1)?;
            let l = a[0].as_array().cloned().unwrap_or_default();
            let v = if name == "first" { l.first() } else { l.last() };
            v.cloned().unwrap_or(Value::Null)
        }
        "len" => {
            arity(name, a, 1)?;
            Value::from(match &a[0] {
                Value::String(x) => x.len(),
                Value::Array(x) => x.len(),
                Value::Object(x) => x.len(),
                Value::Null => 0,
                other => return Err(Error::Exec(format!("len of {}", kind(other)))),
            })
        }
        "index" => {
            let mut cur = a.first().cloned().unwrap_or(Value::Null);
            for k in &a[1.min(a.len())..] {
                cur = match (&cur, k) {
                    (Value::Array(l), _) => l.get(int(k)? as usize).cloned().ok_or_else(|| {
                        Error::Exec(format!("index out of range: {}", to_text(k)))
                    })?,
                    (Value::Object(m), _) => m.get(&s(k)).cloned().unwrap_or(Value::Null),
                    (Value::Null, _) => Value::Null,
                    (other, _) => {
                        return Err(Error::Exec(format!(
                            "can't index item of type {}",
                            kind(other)
                        )));
                    }
                };
            }
            cur
        }
        "eq" => {
            if a.len() < 2 {
                return Err(Error::Exec("eq needs at least two arguments".into()));
            }
            Value::Bool(a[1..].iter().any(|x| eq(&a[0], x)))
        }
        "ne" => {
            arity(name, a, 2)?;
            Value::Bool(!eq(&a[0], &a[1]))
        }
        "lt" | "le" | "gt" | "ge" => {
            arity(name, a, 2)?;
            let o = cmp(&a[0], &a[1])?;
            Value::Bool(match name {
                "lt" => o.is_lt(),
                "le" => o.is_le(),
                "gt" => o.is_gt(),
                _ => o.is_ge(),
            })
        }
        "and" => a
            .iter()
            .find(|v| !truthy(v))
            .or(a.last())
            .cloned()
            .unwrap_or(Value::Null),
        "or" => a
            .iter()
            .find(|v| truthy(v))
            .or(a.last())
            .cloned()
            .unwrap_or(Value::Null),
        "not" => {
            arity(name, a, 1)?;
            Value::Bool(!truthy(&a[0]))
        }
        "print" => Value::String(a.iter().map(to_text).collect::<Vec<_>>().join("")),
        "println" => Value::String(format!(
            "{}\n",
            a.iter().map(to_text).collect::<Vec<_>>().join(" ")
        )),
        "printf" => {
            let (f, rest) = a
                .split_first()
                .ok_or_else(|| Error::Exec("printf needs a format".into()))?;
            Value::String(printf(&s(f), rest)?)
        }
        "int" | "int64" | "atoi" => {
            arity(name, a, 1)?;
            Value::from(int(&a[0]).unwrap_or(0))
        }
        "add" => from_f64(a.iter().map(num).sum::<Result<f64, _>>()?),
        "mul" => from_f64(a.iter().map(num).product::<Result<f64, _>>()?),
        "sub" | "div" | "mod" => {
            arity(name, a, 2)?;
            let (x, y) = (int(&a[0])?, int(&a[1])?);
            if name != "sub" && y == 0 {
                return Err(Error::Exec("division by zero".into()));
            }
            Value::from(match name {
                "sub" => x - y,
                "div" => x / y,
                _ => x % y,
            })
        }
        "randAlphaNum" => {
            arity(name, a, 1)?;
            Value::String(random_alnum(int(&a[0])?.max(0) as usize))
        }
        other => return Err(Error::Exec(format!("function {other:?} not defined"))),
    })
}
