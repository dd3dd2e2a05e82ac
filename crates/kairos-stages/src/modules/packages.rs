//! `packages` and `package_pins`, through the root's own package manager.

use std::collections::BTreeMap;

use kairos_config::types::{Packages, Text};

use crate::executor::Ctx;

/// The package manager family of the root, from `/etc/os-release` `ID` and `ID_LIKE`.
fn family(ctx: &Ctx) -> Result<&'static str, String> {
    let osr = kairos_sys::sysinfo::os_release(ctx.root);
    let ids = format!(
        "{} {}",
        osr.get("ID").cloned().unwrap_or_default(),
        osr.get("ID_LIKE").cloned().unwrap_or_default()
    );
    for (needle, fam) in [
        ("debian", "apt"),
        ("ubuntu", "apt"),
        ("alpine", "apk"),
        ("arch", "pacman"),
        ("suse", "zypper"),
        ("sles", "zypper"),
        ("fedora", "dnf"),
        ("rhel", "dnf"),
        ("centos", "dnf"),
        ("openEuler", "dnf"),
        ("ol", "dnf"),
        ("rocky", "dnf"),
        ("almalinux", "dnf"),
    ] {
        if ids.split_whitespace().any(|w| w == needle) {
            return Ok(fam);
        }
    }
    Err(format!(
        "unknown distribution (os-release ID {:?}): no package manager known for it",
        ids.trim()
    ))
}

/// The command lines yip runs for a `packages` section.
pub fn commands(fam: &str, p: &Packages) -> Vec<String> {
    let (refresh, upgrade, install, remove) = match fam {
        "apt" => (
            "apt-get -y update",
            "apt-get -y upgrade",
            "apt-get -y --no-install-recommends install",
            "apt-get -y remove",
        ),
        "apk" => ("apk update", "apk upgrade", "apk add", "apk del"),
        "pacman" => (
            "pacman -Sy --noconfirm",
            "pacman -Syu --noconfirm",
            "pacman -S --noconfirm",
            "pacman -R --noconfirm",
        ),
        "zypper" => (
            "zypper --non-interactive refresh",
            "zypper --non-interactive update",
            "zypper --non-interactive install",
            "zypper --non-interactive remove",
        ),
        _ => (
            "dnf -y makecache",
            "dnf -y upgrade",
            "dnf -y install",
            "dnf -y remove",
        ),
    };
    let mut out = Vec::new();
    if p.refresh.0 {
        out.push(refresh.to_string());
    }
    if p.upgrade.0 {
        out.push(upgrade.to_string());
    }
    if !p.install.is_empty() {
        out.push(format!("{install} {}", p.install.join(" ")));
    }
    if !p.remove.is_empty() {
        out.push(format!("{remove} {}", p.remove.join(" ")));
    }
    out
}

pub fn packages(ctx: &Ctx, p: &Packages) -> Result<(), String> {
    let fam = family(ctx)?;
    for cmd in commands(fam, p) {
        ctx.shell.run(&cmd).map_err(|e| e.to_string())?;
    }
    Ok(())
}

pub fn pins(ctx: &Ctx, pins: &BTreeMap<String, Text>) -> Result<(), String> {
    match family(ctx)? {
        "apt" => {
            let mut out = String::new();
            for (pkg, v) in pins {
                out.push_str(&format!(
                    "Package: {pkg}\nPin: version {}\nPin-Priority: 1001\n\n",
                    v.0
                ));
            }
            let p = "etc/apt/preferences.d/99-yip-pins";
            ctx.root
                .create_parents(p, 0o755)
                .and_then(|_| ctx.root.write_file(p, out.as_bytes(), 0o644))
                .map(|_| ())
                .map_err(|e| format!("writing /{p}: {e}"))
        }
        "apk" => {
            // /etc/apk/world: one constraint per line; a pinned package's line is `pkg=version`.
            let p = "etc/apk/world";
            let old = ctx.root.read_to_string(p).unwrap_or_default();
            let name_of = |l: &str| {
                l.split(['=', '<', '>', '~'])
                    .next()
                    .unwrap_or("")
                    .to_string()
            };
            let mut lines: Vec<String> = old
                .lines()
                .filter(|l| !l.trim().is_empty() && !pins.contains_key(&name_of(l.trim())))
                .map(str::to_string)
                .collect();
            lines.extend(pins.iter().map(|(pkg, v)| format!("{pkg}={}", v.0)));
            lines.sort();
            ctx.root
                .create_parents(p, 0o755)
                .and_then(|_| {
                    ctx.root
                        .write_file(p, (lines.join("\n") + "\n").as_bytes(), 0o644)
                })
                .map(|_| ())
                .map_err(|e| format!("writing /{p}: {e}"))
        }
        other => Err(format!(
            "Kairos writes package pins for apt and apk; for {other} pin in a `commands` step ({})",
            match other {
                "dnf" => "`dnf versionlock add NAME-VERSION`",
                "zypper" => "`zypper addlock NAME`",
                _ => "`IgnorePkg = NAME` in /etc/pacman.conf",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_config::types::GoBool;

    #[test]
    fn apt_lines() {
        let p = Packages {
            install: vec!["a".into(), "b".into()],
            remove: vec!["c".into()],
            refresh: GoBool(true),
            upgrade: GoBool(false),
        };
        assert_eq!(
            commands("apt", &p),
            vec![
                "apt-get -y update",
                "apt-get -y --no-install-recommends install a b",
                "apt-get -y remove c"
            ]
        );
    }
}
