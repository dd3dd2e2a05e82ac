//! `systemctl`: on the running system it calls `systemctl`; on an offline root it does
//! what `systemctl --root` does — unit symlinks from the `[Install]` section — without
//! needing systemd on the machine doing the work.

use std::path::{Path, PathBuf};

use kairos_config::types::Systemctl;
use kairos_sys::Root;
use kairos_sys::beneath::Kind;

use crate::executor::Ctx;

const UNIT_DIRS: &[&str] = &[
    "etc/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
    "usr/local/lib/systemd/system",
];

/// A unit name as systemd accepts it: one path component of `A-Z a-z 0-9 : _ . \ @ -`.
fn check_unit(u: &str) -> Result<(), String> {
    if u.is_empty()
        || u.len() > 255
        || u.starts_with('.')
        || !u
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.\\@-".contains(&b))
    {
        return Err(format!(
            "{u:?} is not a unit name (letters, digits and `:_.\\@-`, no `/`)"
        ));
    }
    Ok(())
}

fn unit_name(u: &str) -> String {
    if u.contains('.') {
        u.to_string()
    } else {
        format!("{u}.service")
    }
}

/// `getty@tty1.service` → (`getty@.service`, Some("tty1")).
fn template_of(unit: &str) -> (String, Option<String>) {
    if let Some((prefix, rest)) = unit.split_once('@')
        && let Some((inst, suffix)) = rest.rsplit_once('.')
        && !inst.is_empty()
    {
        return (format!("{prefix}@.{suffix}"), Some(inst.to_string()));
    }
    (unit.to_string(), None)
}

/// Whether the root has unit `u` (`k3s` means `k3s.service`) in one of systemd's unit
/// directories.
pub fn unit_exists(root: &Root, u: &str) -> bool {
    find_unit(root, &unit_name(u)).is_some()
}

/// Finds a unit file under the root; returns (path inside the root as seen at boot, real path).
fn find_unit(root: &Root, unit: &str) -> Option<(String, PathBuf)> {
    UNIT_DIRS.iter().find_map(|d| {
        let p = Path::new(d).join(unit);
        root.exists(&p).then(|| (format!("/{d}/{unit}"), p))
    })
}

#[derive(Default)]
struct Install {
    wanted_by: Vec<String>,
    required_by: Vec<String>,
    alias: Vec<String>,
    also: Vec<String>,
    default_instance: Option<String>,
}

fn parse_install(text: &str) -> Install {
    let mut i = Install::default();
    let mut in_install = false;
    for l in text.lines() {
        let l = l.trim();
        if l.starts_with('[') {
            in_install = l == "[Install]";
            continue;
        }
        if !in_install {
            continue;
        }
        if let Some((k, v)) = l.split_once('=') {
            let vals = v.split_whitespace().map(str::to_string);
            match k.trim() {
                "WantedBy" => i.wanted_by.extend(vals),
                "RequiredBy" => i.required_by.extend(vals),
                "Alias" => i.alias.extend(vals),
                "Also" => i.also.extend(vals),
                "DefaultInstance" => i.default_instance = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    i
}

/// A symlink `at` (in /etc/systemd/system) to `target`, beneath the root.
fn link(root: &Root, target: &str, at: &Path) -> Result<(), String> {
    if root
        .read_link(at)
        .is_ok_and(|existing| existing == Path::new(target))
    {
        return Ok(());
    }
    root.create_parents(at, 0o755)
        .map_err(|e| format!("creating the directories of /{}: {e}", at.display()))?;
    root.symlink(target, at)
        .map_err(|e| format!("linking /{} → {target}: {e}", at.display()))
}

fn enable_offline(root: &Root, unit: &str, depth: usize) -> Result<(), String> {
    check_unit(unit)?;
    let (template, instance) = template_of(unit);
    let (boot_path, real) = find_unit(root, unit)
        .or_else(|| find_unit(root, &template))
        .ok_or_else(|| format!("unit {unit} not found under {}", UNIT_DIRS.join(", ")))?;
    let inst = parse_install(
        &root
            .read_to_string(&real)
            .map_err(|e| format!("reading /{}: {e}", real.display()))?,
    );
    let instance = instance.or(inst.default_instance.clone());
    let linked_name = match (&instance, unit == template) {
        (Some(i), true) => template.replacen("@.", &format!("@{i}."), 1),
        _ => unit.to_string(),
    };
    if inst.wanted_by.is_empty()
        && inst.required_by.is_empty()
        && inst.alias.is_empty()
        && inst.also.is_empty()
    {
        return Err(format!(
            "unit {unit} has no [Install] section, so it cannot be enabled (it is static)"
        ));
    }
    let etc = Path::new("etc/systemd/system");
    // Names from the unit file are checked like names from the config.
    for t in inst
        .wanted_by
        .iter()
        .chain(&inst.required_by)
        .chain(&inst.alias)
    {
        check_unit(t).map_err(|e| format!("{real:?} [Install]: {e}"))?;
    }
    for t in &inst.wanted_by {
        link(
            root,
            &boot_path,
            &etc.join(format!("{t}.wants")).join(&linked_name),
        )?;
    }
    for t in &inst.required_by {
        link(
            root,
            &boot_path,
            &etc.join(format!("{t}.requires")).join(&linked_name),
        )?;
    }
    for a in &inst.alias {
        link(root, &boot_path, &etc.join(a))?;
    }
    if depth < 4 {
        for also in &inst.also {
            enable_offline(root, also, depth + 1)?;
        }
    }
    Ok(())
}

/// Removes every `*.wants`/`*.requires` link and alias to `unit` under /etc/systemd/system.
fn disable_offline(root: &Root, unit: &str) -> Result<(), String> {
    check_unit(unit)?;
    let etc = Path::new("etc/systemd/system");
    let Ok(rd) = root.read_dir(etc) else {
        return Ok(());
    };
    for (name, kind) in rd {
        let p = etc.join(&name);
        let is_dep_dir = kind == Kind::Dir
            && p.extension()
                .is_some_and(|x| x == "wants" || x == "requires");
        let candidates: Vec<PathBuf> = if is_dep_dir {
            root.read_dir(&p)
                .map(|r| r.into_iter().map(|(n, _)| p.join(n)).collect())
                .unwrap_or_default()
        } else {
            vec![p.clone()]
        };
        for c in candidates {
            let Ok(target) = root.read_link(&c) else {
                continue;
            };
            let points_at_unit = target
                .file_name()
                .is_some_and(|n| n == unit || template_of(unit).0 == n.to_string_lossy());
            let named_unit = c.file_name().is_some_and(|n| n == unit);
            if (is_dep_dir && named_unit)
                || (!is_dep_dir && points_at_unit && target != Path::new("/dev/null"))
            {
                root.remove_file(&c)
                    .map_err(|e| format!("removing /{}: {e}", c.display()))?;
            }
        }
    }
    Ok(())
}

fn override_path(service: &str, name: Option<&str>) -> String {
    let unit = unit_name(service);
    let mut file = name
        .filter(|n| !n.is_empty())
        .unwrap_or("override-yip.conf")
        .to_string();
    if !file.ends_with(".conf") {
        file.push_str(".conf");
    }
    format!("/etc/systemd/system/{unit}.d/{file}")
}

pub fn apply(ctx: &Ctx, s: &Systemctl) -> Result<(), String> {
    let mut errs = Vec::new();
    let live = ctx.root.is_host() && kairos_sys::host::systemd_running();
    let root = ctx.root;
    for (verb, units) in [
        ("enable", &s.enable),
        ("disable", &s.disable),
        ("mask", &s.mask),
        ("start", &s.start),
    ] {
        for u in units {
            let unit = unit_name(u);
            let r = if live {
                kairos_sys::host::systemctl(&[verb.to_string(), unit.clone()])
                    .map_err(|e| e.to_string())
            } else {
                match verb {
                    "enable" => enable_offline(root, &unit, 0),
                    "disable" => disable_offline(root, &unit),
                    "mask" => check_unit(&unit).and_then(|()| {
                        link(
                            root,
                            "/dev/null",
                            &Path::new("etc/systemd/system").join(&unit),
                        )
                    }),
                    // Nothing runs in an offline root; enabling is how it starts at boot.
                    _ => Ok(()),
                }
            };
            if let Err(e) = r {
                errs.push(format!("{verb} {unit}: {e}"));
            }
        }
    }
    for o in &s.overrides {
        if o.service.is_empty() || o.content.is_empty() {
            continue;
        }
        if let Err(e) = check_unit(&unit_name(&o.service)) {
            errs.push(format!("override: {e}"));
            continue;
        }
        let path = override_path(&o.service, o.name.as_deref());
        let r = ctx.root.create_parents(&path, 0o755).and_then(|_| {
            ctx.root
                .write_file(&path, ctx.render(&o.content).as_bytes(), 0o644)
        });
        if let Err(e) = r {
            errs.push(format!("override {path}: {e}"));
        }
    }
    if live && !s.overrides.is_empty() {
        let _ = kairos_sys::host::systemctl(&["daemon-reload".into()]);
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn names() {
        assert_eq!(
            override_path("foo", None),
            "/etc/systemd/system/foo.service.d/override-yip.conf"
        );
        assert_eq!(
            override_path("foo.socket", Some("bar")),
            "/etc/systemd/system/foo.socket.d/bar.conf"
        );
        assert_eq!(
            template_of("getty@tty1.service"),
            ("getty@.service".into(), Some("tty1".into()))
        );
        assert_eq!(template_of("sshd.service"), ("sshd.service".into(), None));
    }

    #[test]
    fn enable_disable_mask_offline() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let lib = d.path().join("usr/lib/systemd/system");
        fs::create_dir_all(&lib).unwrap();
        fs::write(
            lib.join("getty@.service"),
            "[Service]\nExecStart=x\n[Install]\nWantedBy=getty.target\n",
        )
        .unwrap();
        fs::write(
            lib.join("a.service"),
            "[Install]\nWantedBy=multi-user.target\nAlias=b.service\n",
        )
        .unwrap();
        enable_offline(&root, "getty@tty1.service", 0).unwrap();
        enable_offline(&root, "a.service", 0).unwrap();
        enable_offline(&root, "a.service", 0).unwrap();
        let etc = d.path().join("etc/systemd/system");
        assert_eq!(
            fs::read_link(etc.join("getty.target.wants/getty@tty1.service")).unwrap(),
            Path::new("/usr/lib/systemd/system/getty@.service")
        );
        assert_eq!(
            fs::read_link(etc.join("b.service")).unwrap(),
            Path::new("/usr/lib/systemd/system/a.service")
        );
        disable_offline(&root, "a.service").unwrap();
        assert!(!etc.join("multi-user.target.wants/a.service").exists());
        assert!(fs::symlink_metadata(etc.join("b.service")).is_err());
        assert!(
            enable_offline(&root, "missing.service", 0)
                .unwrap_err()
                .contains("not found")
        );
    }
}
