//! The kernel command line as config: `kairos.config=K=V`, `kairos.config_url=`, `cos.setup=`,
//! filtered generic `a.b=c` keys, and yip's dot notation for `stages.…` tokens.

use std::sync::Arc;

use crate::node::{Key, Node, Origin, Value};

/// Top-level keys a generic `k=v` cmdline token may set (Kairos' `FilterKeys`).
pub const CMDLINE_KEYS: &[&str] = &[
    "install",
    "config_url",
    "options",
    "fail_on_bundles_errors",
    "bundles",
    "grub_options",
    "env",
    "debug",
    "strict",
    "cloud-init-paths",
    "eject-cd",
    "cosign",
    "verify",
    "cosign-key",
    "arch",
    "squash-compression",
    "squash-no-compression",
    "uki-max-entries",
    "bind-pcrs",
    "bind-public-pcrs",
    "logs",
];

/// Splits a cmdline shell-style; unbalanced quotes fall back to whitespace splitting.
pub fn tokens(cmdline: &str) -> Vec<String> {
    shlex::split(cmdline)
        .unwrap_or_else(|| cmdline.split_whitespace().map(str::to_string).collect())
}

/// Splits `a.b[0].c` or `a.b.0.c` into segments.
fn segments(path: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if name.is_empty() && out.is_empty() {
            return None;
        }
        if !name.is_empty() {
            out.push(name.to_string());
        }
        while let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let idx = &r[..end];
            idx.parse::<usize>().ok()?;
            out.push(idx.to_string());
            rest = &r[end + 1..];
        }
        if !rest.is_empty() {
            return None;
        }
    }
    Some(out)
}

/// Sets `value` at `path` in `root`; numeric segments index lists (growing them with nulls).
fn set_path(root: &mut Node, segs: &[String], value: Node, origin: &Origin) -> bool {
    let Some((first, rest)) = segs.split_first() else {
        *root = value;
        return true;
    };
    if let Ok(idx) = first.parse::<usize>() {
        if idx > 1024 {
            return false;
        }
        if !matches!(root.value, Value::Seq(_)) {
            root.value = Value::Seq(Vec::new());
        }
        let Value::Seq(items) = &mut root.value else {
            return false;
        };
        while items.len() <= idx {
            items.push(Node::new(Value::Null, origin.clone()));
        }
        return set_path(&mut items[idx], rest, value, origin);
    }
    if !matches!(root.value, Value::Map(_)) {
        root.value = Value::Map(Vec::new());
    }
    let Value::Map(entries) = &mut root.value else {
        return false;
    };
    let pos = match entries.iter().position(|(k, _)| &k.name == first) {
        Some(p) => p,
        None => {
            entries.push((
                Key {
                    name: first.clone(),
                    origin: origin.clone(),
                },
                Node::new(Value::Null, origin.clone()),
            ));
            entries.len() - 1
        }
    };
    set_path(&mut entries[pos].1, rest, value, origin)
}

/// Cmdline values are text; `true`/`false` and plain decimal numbers get their natural type
/// so that `install.auto=true` and `install.partitions.oem.size=100` validate.
fn typed(v: &str) -> Value {
    match v {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ if !v.is_empty()
            && v.len() < 18
            && v.bytes().all(|b| b.is_ascii_digit())
            && (v == "0" || !v.starts_with('0')) =>
        {
            Value::Int(v.parse().unwrap_or(0))
        }
        _ => Value::Str(v.to_string()),
    }
}

/// The config the collector takes from the cmdline.
pub fn config_from_cmdline(cmdline: &str) -> Node {
    let source: Arc<str> = Arc::from("cmdline");
    let origin = Origin::whole(&source);
    let mut generic = Node::empty_map(origin.clone());
    let mut owned = Node::empty_map(origin.clone());
    for tok in tokens(cmdline) {
        let (k, v) = match tok.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (tok.clone(), "true".to_string()),
        };
        let owned_kv = match k.as_str() {
            "kairos.config" => Some(v.clone()),
            "kairos.config_url" => Some(format!("config_url={v}")),
            "cos.setup" if v.contains('=') => Some(v.clone()),
            "cos.setup" => Some(format!("config_url={v}")),
            _ => None,
        };
        if let Some(kv) = owned_kv {
            let (path, val) = kv.split_once('=').unwrap_or((kv.as_str(), "true"));
            if let Some(segs) = segments(path) {
                let val = if path == "config_url" {
                    Value::Str(val.to_string())
                } else {
                    typed(val)
                };
                set_path(&mut owned, &segs, Node::new(val, origin.clone()), &origin);
            }
            continue;
        }
        let Some(segs) = segments(&k) else { continue };
        if !CMDLINE_KEYS.contains(&segs[0].as_str()) {
            continue;
        }
        set_path(
            &mut generic,
            &segs,
            Node::new(typed(&v), origin.clone()),
            &origin,
        );
    }
    // Kairos-owned tokens win over the generic ones.
    let fallback = generic.clone();
    if crate::merge::merge(&mut generic, owned.clone()).is_err() {
        generic = fallback;
        if let Value::Map(entries) = owned.value {
            for (k, v) in entries {
                set_path(&mut generic, std::slice::from_ref(&k.name), v, &origin);
            }
        }
    }
    generic
}

/// yip's dot-notation modifier over the whole cmdline: every `a.b[0].c=v` token becomes a
/// value; tokens that are not valid paths (`ip=dhcp` is valid, `=x` is not) are ignored.
pub fn dot_notation(cmdline: &str) -> Node {
    let source: Arc<str> = Arc::from("cmdline");
    let origin = Origin::whole(&source);
    let mut root = Node::empty_map(origin.clone());
    for tok in tokens(cmdline) {
        let Some((k, v)) = tok.split_once('=') else {
            continue;
        };
        let Some(segs) = segments(k) else { continue };
        if segs
            .iter()
            .any(|s| s.is_empty() || s.contains(|c: char| c.is_whitespace()))
        {
            continue;
        }
        set_path(
            &mut root,
            &segs,
            Node::new(Value::Str(v.to_string()), origin.clone()),
            &origin,
        );
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kairos_config_tokens() {
        let n = config_from_cmdline(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 kairos.config=install.device=/dev/vda kairos.config=users.0.name=kairos \"kairos.config=install.grub_options.extra_cmdline=a b\" rd.cos.oemlabel=COS_OEM install.auto=true kairos.config_url=http://x/c.yaml",
        );
        assert_eq!(
            n.to_json(),
            json!({"install": {"auto": true, "device": "/dev/vda", "grub_options": {"extra_cmdline": "a b"}},
                   "users": [{"name": "kairos"}], "config_url": "http://x/c.yaml"})
        );
    }

    #[test]
    fn cos_setup_legacy() {
        assert_eq!(
            config_from_cmdline("cos.setup=http://a/b").to_json(),
            json!({"config_url": "http://a/b"})
        );
        assert_eq!(
            config_from_cmdline("cos.setup=install.device=/dev/sda").to_json(),
            json!({"install": {"device": "/dev/sda"}})
        );
    }

    #[test]
    fn dot_notation_stages() {
        let n = dot_notation(
            "stages.boot[0].commands[0]=\"touch /x\" ip=dhcp =bad stages.boot[0].name=s",
        );
        assert_eq!(
            n.to_json(),
            json!({"stages": {"boot": [{"commands": ["touch /x"], "name": "s"}]}, "ip": "dhcp"})
        );
    }
}
