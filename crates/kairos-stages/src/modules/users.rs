//! `users`, `authorized_keys`, `ensure_entities` and `delete_entities`: account files edited
//! under the root, never through `useradd`, so they work on any target tree.

use std::collections::BTreeMap;
use std::path::Path;

use kairos_config::names;
use kairos_config::types::{Entity, StepUser};
use serde_json::Value as Json;

use crate::accounts::Accounts;
use crate::executor::Ctx;

/// Days since the epoch, the unit of shadow's "last changed" field.
fn today() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0)
}

/// The shadow hash for a configured password: hashes are kept, plain text is SHA-512-crypted,
/// and an already-matching hash is kept so re-runs change nothing.
fn password_hash(passwd: &str, lock: bool, current: Option<&str>) -> Result<String, String> {
    if lock {
        return Ok("!".into());
    }
    if passwd.is_empty() {
        // No password and not locked: password login stays impossible; keys still work.
        return Ok(current.filter(|c| !c.is_empty()).unwrap_or("!").to_string());
    }
    if passwd.starts_with('$') || passwd.starts_with('!') || passwd.starts_with('*') {
        return Ok(passwd.to_string());
    }
    use sha_crypt::{PasswordHasher, PasswordVerifier, ShaCrypt};
    if let Some(cur) = current
        && cur.starts_with("$6$")
        && ShaCrypt::SHA512
            .verify_password(passwd.as_bytes(), cur)
            .is_ok()
    {
        return Ok(cur.to_string());
    }
    // Six random bytes encode to the eight-character salt yip uses.
    let salt: [u8; 6] = rand::random();
    ShaCrypt::SHA512
        .hash_password_with_salt(passwd.as_bytes(), &salt)
        // 5000 rounds is crypt's default: write the classic `$6$salt$hash` form yip writes.
        .map(|h| h.to_string().replacen("$rounds=5000$", "$", 1))
        .map_err(|e| format!("hashing password: {e}"))
}

/// A shadow entry with the usual aging defaults and no password yet.
fn new_shadow_entry(name: &str) -> Vec<String> {
    let mut f: Vec<String> = vec![name.into(), String::new(), today().to_string()];
    f.extend(["0", "99999", "7", "", "", ""].map(String::from));
    f
}

fn default_shell(ctx: &Ctx) -> String {
    ctx.root
        .read_to_string("etc/default/useradd")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("SHELL=")
                    .map(|s| s.trim().to_string())
            })
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/bin/sh".into())
}

pub fn users(ctx: &Ctx, users: &BTreeMap<String, StepUser>) -> Result<(), String> {
    let mut acc = Accounts::load(ctx.root).map_err(|e| format!("reading account files: {e}"))?;
    let mut errs = Vec::new();
    let mut homes = Vec::new();
    // BTreeMap iteration is sorted by name: uids are allocated deterministically.
    let named: Vec<(String, &StepUser)> = users
        .iter()
        .map(|(key, u)| {
            (
                u.name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| key.clone()),
                u,
            )
        })
        .collect();
    let mut valid = Vec::new();
    for (name, u) in &named {
        match check_user(name, u).and_then(|()| user(ctx, &mut acc, name, u, &mut homes)) {
            Ok(()) => valid.push((name, u)),
            Err(e) => errs.push(format!("user {name}: {e}")),
        }
    }
    // Supplementary groups come after every user, so user ids stay dense (1000, 1001, …)
    // and missing groups take the next free ids.
    for (name, u) in valid {
        for g in &u.groups.0 {
            acc.ensure_group(g, None);
            acc.add_member(g, name);
        }
    }
    acc.save(ctx.root)
        .map_err(|e| format!("writing account files: {e}"))?;
    for (home, uid, gid) in homes {
        // Only a home this step creates is given to the user: an existing directory (`/`,
        // `/root`, another user's home) keeps its owner.
        let made = ctx.root.create_dir_all(&home, 0o755).and_then(|made| {
            if made.last().map(|p| p.as_path())
                == Some(kairos_sys::beneath::normalize(Path::new(&home)).as_path())
            {
                ctx.root.set_owner(&home, Some(uid), Some(gid))?;
            }
            Ok(())
        });
        if let Err(e) = made {
            errs.push(format!("creating home {home}: {e}"));
        }
    }
    for (name, u) in &named {
        if !u.ssh_authorized_keys.is_empty()
            && let Err(e) = authorized_keys(ctx, name, &u.ssh_authorized_keys)
        {
            errs.push(e);
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// Refuses names and fields that would corrupt or inject lines into the account files.
fn check_user(name: &str, u: &StepUser) -> Result<(), String> {
    names::account_name("user", name)?;
    if let Some(h) = u.homedir.as_deref().filter(|h| !h.is_empty()) {
        names::homedir(h)?;
    }
    for (what, v) in [
        ("gecos", u.gecos.as_deref()),
        ("shell", u.shell.as_deref()),
        ("passwd", u.passwd.as_deref()),
    ] {
        names::field(what, v.unwrap_or_default())?;
    }
    if let Some(g) = u.primary_group.as_deref().filter(|g| !g.is_empty()) {
        names::account_name("primary_group", g)?;
    }
    for g in &u.groups.0 {
        names::account_name("group", g)?;
    }
    Ok(())
}

fn user(
    ctx: &Ctx,
    acc: &mut Accounts,
    name: &str,
    u: &StepUser,
    homes: &mut Vec<(String, u32, u32)>,
) -> Result<(), String> {
    let passwd = u.passwd.clone().unwrap_or_default();
    if acc.passwd.get(name).is_none() {
        let home = u
            .homedir
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("/home/{name}"));
        let uid = match u.uid.as_ref().map(|t| t.0.trim()).filter(|t| !t.is_empty()) {
            Some(t) => t
                .parse::<u32>()
                .map_err(|_| format!("uid {t:?} is not a number"))?,
            None => match ctx.root.metadata(&home) {
                Ok(m) if m.uid != 0 => m.uid,
                _ => acc.free_id(if u.system.0 { 100 } else { 1000 }),
            },
        };
        let group_name = u
            .primary_group
            .clone()
            .filter(|g| !g.is_empty())
            .unwrap_or_else(|| name.to_string());
        let want_gid = if acc.group.ids(2).contains(&uid) {
            None
        } else {
            Some(uid)
        };
        let gid = acc.ensure_group(&group_name, want_gid);
        let shell = u
            .shell
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| default_shell(ctx));
        let gecos = u
            .gecos
            .clone()
            .unwrap_or_else(|| "Created by entities".into());
        acc.passwd.set(&[
            name.into(),
            "x".into(),
            uid.to_string(),
            gid.to_string(),
            gecos,
            home.clone(),
            shell,
        ]);
        let mut entry = new_shadow_entry(name);
        entry[1] = password_hash(&passwd, u.lock_passwd.0, None)?;
        acc.shadow.set(&entry);
        if !u.no_create_home.0 {
            homes.push((home, uid, gid));
        }
    } else if !passwd.is_empty() || u.lock_passwd.0 {
        // An existing user only gets its password updated; aging fields are kept.
        let mut f = acc
            .shadow
            .get(name)
            .unwrap_or_else(|| new_shadow_entry(name));
        let hash = password_hash(&passwd, u.lock_passwd.0, f.get(1).map(String::as_str))?;
        if f[1] != hash {
            f[1] = hash;
            if f.len() > 2 {
                f[2] = today().to_string();
            }
            acc.shadow.set(&f);
        }
    }
    Ok(())
}

/// Resolves `github:user`, `gitlab:user` and URLs to key text; other keys are used as given.
fn resolve_key(ctx: &Ctx, key: &str) -> Result<String, String> {
    let url = if let Some(u) = key.strip_prefix("github:") {
        format!("https://github.com/{u}.keys")
    } else if let Some(u) = key.strip_prefix("gitlab:") {
        format!("https://gitlab.com/{u}.keys")
    } else if key.starts_with("http://") || key.starts_with("https://") {
        key.to_string()
    } else {
        return Ok(key.to_string());
    };
    ctx.fetcher
        .fetch(&url)
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .map_err(|e| format!("fetching keys from {url}: {e}"))
}

pub fn authorized_keys(ctx: &Ctx, user: &str, keys: &[String]) -> Result<(), String> {
    let acc = Accounts::load(ctx.root).map_err(|e| format!("reading account files: {e}"))?;
    let f = acc
        .passwd
        .get(user)
        .ok_or_else(|| format!("authorized_keys: user {user:?} does not exist"))?;
    let (uid, gid) = (f[2].parse().ok(), f[3].parse().ok());
    let home = f.get(5).cloned().unwrap_or_default();
    let ssh = Path::new(&home).join(".ssh");
    let path = ssh.join("authorized_keys");
    let mut text = ctx.root.read_to_string(&path).unwrap_or_default();
    let mut errs = Vec::new();
    for k in keys {
        match resolve_key(ctx, k) {
            Ok(resolved) => {
                for line in resolved.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    if !text.lines().any(|l| l.trim() == line) {
                        if !text.is_empty() && !text.ends_with('\n') {
                            text.push('\n');
                        }
                        text.push_str(line);
                        text.push('\n');
                    }
                }
            }
            Err(e) => errs.push(e),
        }
    }
    // The user's own `.ssh` (made now, or in a home the user owns) is theirs; in a home
    // that belongs to someone else (`homedir: /root`) nothing is chowned to the user.
    let owns_home = ctx.root.metadata(&home).is_ok_and(|m| Some(m.uid) == uid);
    let write = || -> std::io::Result<()> {
        let made = ctx.root.create_dir_all(&ssh, 0o700)?;
        let ours = owns_home || !made.is_empty();
        ctx.root.set_mode(&ssh, 0o700)?;
        if ours {
            ctx.root.set_owner(&ssh, uid, gid)?;
        }
        ctx.root.write_file(&path, text.as_bytes(), 0o600)?;
        if ours {
            ctx.root.set_owner(&path, uid, gid)?;
        }
        Ok(())
    };
    write().map_err(|e| format!("writing {}: {e}", path.display()))?;
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// Entity kinds (mudler/entities): kind, the field naming the entry, its file, and the fields
/// after the name in file order ("" is a field that is always empty).
const ENTITY_KINDS: &[(&str, &str, &str, &[&str])] = &[
    (
        "user",
        "username",
        "/etc/passwd",
        &["password", "uid", "gid", "info", "homedir", "shell"],
    ),
    (
        "group",
        "group_name",
        "/etc/group",
        &["password", "gid", "users"],
    ),
    (
        "shadow",
        "username",
        "/etc/shadow",
        &[
            "password",
            "last_changed",
            "minimum_changed",
            "maximum_changed",
            "warn",
            "inactive",
            "expire",
            "",
        ],
    ),
    (
        "gshadow",
        "name",
        "/etc/gshadow",
        &["password", "administrators", "members"],
    ),
];

/// The passwd-style line an entity describes, and the file it belongs to.
fn entity_line(e: &Json) -> Result<(String, &'static str, String), String> {
    // Scalars as text; lists (group members) comma-joined.
    let field = |k: &str| match e.get(k) {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(s)) => s.clone(),
        Some(Json::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    };
    let kind = field("kind");
    let (_, name_key, path, fields) =
        ENTITY_KINDS
            .iter()
            .find(|(k, ..)| *k == kind)
            .ok_or_else(|| {
                format!("unknown entity kind {kind:?} (expected user, group, shadow or gshadow)")
            })?;
    let name = field(name_key);
    names::account_name(kind.as_str(), &name)?;
    let mut parts = vec![name.clone()];
    parts.extend(fields.iter().map(|f| field(f)));
    for (key, value) in fields.iter().zip(&parts[1..]) {
        names::field(key, value)?;
    }
    Ok((name, path, parts.join(":")))
}

pub fn entity(ctx: &Ctx, e: &Entity, ensure: bool) -> Result<(), String> {
    let rendered = ctx.render(&e.entity);
    let doc = kairos_config::yaml::parse(&rendered, &std::sync::Arc::from("entity"))
        .map_err(|e| e.to_string())?;
    let (name, default_path, line) = entity_line(&doc.to_json())?;
    if name.is_empty() {
        return Err("entity has no name".into());
    }
    let path = e
        .path
        .as_deref()
        .filter(|p| !p.is_empty())
        .unwrap_or(default_path);
    let text = ctx.root.read_to_string(path).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let pos = lines
        .iter()
        .position(|l| l.split(':').next() == Some(name.as_str()));
    match (ensure, pos) {
        (true, Some(i)) => lines[i] = line,
        (true, None) => lines.push(line),
        (false, Some(i)) => {
            lines.remove(i);
        }
        (false, None) => return Ok(()),
    }
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    let mode = ctx.root.metadata(path).map(|m| m.mode).unwrap_or(0o644);
    ctx.root
        .create_parents(path, 0o755)
        .map_err(|e| format!("creating the directories of {path}: {e}"))?;
    ctx.root
        .write_file(path, out.as_bytes(), mode)
        .map(|_| ())
        .map_err(|e| format!("writing {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_are_kept() {
        let h = password_hash("secret", false, None).unwrap();
        assert!(h.starts_with("$6$"));
        assert_eq!(h.split('$').nth(2).unwrap().len(), 8);
        assert_eq!(password_hash("secret", false, Some(&h)).unwrap(), h);
        assert_ne!(password_hash("other", false, Some(&h)).unwrap(), h);
        assert_eq!(password_hash("secret", true, Some(&h)).unwrap(), "!");
        assert_eq!(password_hash("$6$x$y", false, None).unwrap(), "$6$x$y");
    }

    #[test]
    fn matches_glibc_crypt() {
        // crypt("kairos", "$6$abcdefgh$") from glibc: a hash we write must verify there too.
        let glibc = "$6$abcdefgh$PajO0NcUUyDLVnsQuRYrsKO/BKf43NXiYtTChwVyhlUABtfwZsNRZDOEjUjW6gBboiVkvkDmIuG7Vm6e5FpLA1";
        assert_eq!(password_hash("kairos", false, Some(glibc)).unwrap(), glibc);
    }
}
