//! The systemd-boot entries on the ESP that decide what boots: one file per role
//! (`active`, `passive`, `recovery`), a new active one with boot counting (`active+3.conf`).
//!
//! Order is set by `sort-key` (active, then passive, then recovery) and systemd-boot moves an
//! entry whose tries are spent (`+0-N`) to the end, so the first entry in [`boot_order`] is
//! what the firmware boots next — no `default` line and no EFI variable involved.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{Error, io_err};

/// What an entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    Passive,
    Recovery,
    /// The entry of install media.
    Live,
    /// Recovery that resets the node by itself (`kairos.reset`), then boots active.
    Autoreset,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Active,
        Role::Passive,
        Role::Recovery,
        Role::Live,
        Role::Autoreset,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Passive => "passive",
            Role::Recovery => "recovery",
            Role::Live => "live",
            Role::Autoreset => "autoreset",
        }
    }

    fn sort_key(self) -> &'static str {
        match self {
            Role::Active => "kairos-1-active",
            Role::Passive => "kairos-2-passive",
            Role::Recovery => "kairos-3-recovery",
            Role::Live => "kairos-0-live",
            Role::Autoreset => "kairos-4-autoreset",
        }
    }

    /// The store label and `kairos.mode` for the cmdline.
    fn store_and_mode(self) -> (&'static str, &'static str) {
        match self {
            Role::Active => ("COS_STATE", "active"),
            Role::Passive => ("COS_STATE", "passive"),
            Role::Recovery => ("COS_RECOVERY", "recovery"),
            Role::Live => ("COS_LIVE", "live"),
            Role::Autoreset => ("COS_RECOVERY", "recovery"),
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// Boot counting state from a file name: `+LEFT` or `+LEFT-DONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tries {
    pub left: u32,
    pub done: u32,
}

/// One entry file, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub role: Role,
    pub file: String,
    /// `None` = blessed (no counting).
    pub tries: Option<Tries>,
    pub deployment: String,
    pub title: String,
    pub options: String,
    pub linux: String,
    pub initrd: String,
    /// A signed UKI (trusted boot) instead of linux + initrd + options.
    pub efi: String,
}

impl Entry {
    /// Spent all its tries: systemd-boot will not pick it while anything else is there.
    pub fn is_bad(&self) -> bool {
        self.tries.is_some_and(|t| t.left == 0)
    }
}

/// Splits `active+2-1.conf` into (`active`, tries).
pub fn parse_name(file: &str) -> Option<(Role, Option<Tries>)> {
    let stem = file.strip_suffix(".conf")?;
    let (name, counter) = match stem.split_once('+') {
        Some((n, c)) => (n, Some(c)),
        None => (stem, None),
    };
    let role = Role::parse(name)?;
    let tries = match counter {
        None => None,
        Some(c) => {
            let (left, done) = match c.split_once('-') {
                Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                None => (c.parse().ok()?, 0),
            };
            Some(Tries { left, done })
        }
    };
    Some((role, tries))
}

fn entries_dir(esp: &Path) -> PathBuf {
    esp.join("loader/entries")
}

/// Reads every Kairos entry on the ESP (other files are left alone).
pub fn list(esp: &Path) -> Result<Vec<Entry>, Error> {
    let dir = entries_dir(esp);
    let mut out = Vec::new();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    for e in rd {
        let e = e.map_err(io_err(&dir))?;
        let file = e.file_name().to_string_lossy().into_owned();
        let Some((role, tries)) = parse_name(&file) else {
            continue;
        };
        let text = fs::read_to_string(e.path()).map_err(io_err(&e.path()))?;
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        let options = field("options ");
        let efi = field("efi ");
        let deployment = options
            .split_whitespace()
            .find_map(|w| w.strip_prefix("kairos.deployment="))
            .or_else(|| {
                efi.strip_prefix("/kairos/")
                    .and_then(|f| f.strip_suffix(".efi"))
            })
            .unwrap_or_default()
            .to_string();
        out.push(Entry {
            role,
            file,
            tries,
            deployment,
            title: field("title "),
            linux: field("linux "),
            initrd: field("initrd "),
            options,
            efi,
        });
    }
    out.sort_by(|a, b| (a.role, &a.file).cmp(&(b.role, &b.file)));
    Ok(out)
}

/// The entries in the order systemd-boot sorts them: spent entries last, then by sort-key.
pub fn boot_order(entries: &[Entry]) -> Vec<&Entry> {
    let mut v: Vec<&Entry> = entries.iter().collect();
    v.sort_by(|a, b| {
        (a.is_bad(), a.role.sort_key())
            .cmp(&(b.is_bad(), b.role.sort_key()))
            // Same role twice only after a cut between writing the new entry and removing
            // the old one; systemd-boot 252 then boots the one with tries (seen in QEMU).
            .then_with(|| b.tries.is_some().cmp(&a.tries.is_some()))
            .then_with(|| b.file.cmp(&a.file))
    });
    v
}

/// What an entry boots.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub deployment: &'a str,
    pub version: &'a str,
    /// ESP paths, e.g. `/kairos/vmlinuz-<hex>`.
    pub linux: &'a str,
    pub initrd: &'a str,
    /// The image's cmdline (console etc.) without Kairos' own keys.
    pub cmdline: &'a str,
}

/// The text of an entry file for `role`.
pub fn render(role: Role, t: &Target) -> String {
    let (store, mode) = role.store_and_mode();
    let name = title_name(role);
    let title = if t.version.is_empty() {
        format!("{name} {}", t.deployment)
    } else {
        format!("{name} {}", t.version)
    };
    let reset = if role == Role::Autoreset {
        " kairos.reset"
    } else {
        ""
    };
    let options = format!(
        "{} kairos.deployment={} kairos.store=LABEL={store} kairos.mode={mode}{reset}",
        t.cmdline, t.deployment
    );
    format!(
        // No `version` line: systemd-boot would compare versions before file names.
        "title {title}\nsort-key {}\nlinux {}\ninitrd {}\noptions {}\n",
        role.sort_key(),
        t.linux,
        t.initrd,
        options.trim()
    )
}

/// The text of an entry file for `role` booting a deployment's signed UKI: no options (the
/// cmdline is inside the UKI; systemd-boot would ignore them under Secure Boot anyway).
pub fn render_uki(role: Role, deployment: &str, version: &str) -> String {
    let name = title_name(role);
    let title = if version.is_empty() {
        format!("{name} {deployment}")
    } else {
        format!("{name} {version}")
    };
    format!(
        "title {title}\nsort-key {}\nefi {}\n",
        role.sort_key(),
        crate::esp_uki_path(deployment)
    )
}

fn title_name(role: Role) -> &'static str {
    match role {
        Role::Active => "Kairos",
        Role::Passive => "Kairos (fallback)",
        Role::Recovery => "Kairos recovery",
        Role::Live => "Kairos live (install)",
        Role::Autoreset => "Kairos reset (wipes the node)",
    }
}

/// Makes `role` boot `text`, with `tries` boot attempts (`None` = blessed). The new file
/// appears atomically; older files for the role are removed after it, so a cut in between
/// leaves two entries of which either boots.
pub fn set(esp: &Path, role: Role, text: &str, tries: Option<u32>) -> Result<(), Error> {
    let dir = entries_dir(esp);
    let name = match tries {
        Some(n) => format!("{}+{n}.conf", role.name()),
        None => format!("{}.conf", role.name()),
    };
    kairos_layers::write_atomic(&dir.join(&name), text.as_bytes())?;
    sync_dir(&dir);
    crate::failpoint(&format!("{}-entry-added", role.name()));
    for e in list(esp)? {
        if e.role == role && e.file != name {
            remove(&dir.join(&e.file))?;
        }
    }
    sync_dir(&dir);
    Ok(())
}

/// Removes the entry for `role`, if any.
pub fn clear(esp: &Path, role: Role) -> Result<(), Error> {
    let dir = entries_dir(esp);
    for e in list(esp)? {
        if e.role == role {
            remove(&dir.join(&e.file))?;
        }
    }
    sync_dir(&dir);
    Ok(())
}

/// Blesses an entry under trial: `active+2-1.conf` → `active.conf` (what systemd-bless-boot
/// does). Returns false when it had no counter.
pub fn bless(esp: &Path, entry: &Entry) -> Result<bool, Error> {
    if entry.tries.is_none() {
        return Ok(false);
    }
    let dir = entries_dir(esp);
    let to = dir.join(format!("{}.conf", entry.role.name()));
    fs::rename(dir.join(&entry.file), &to).map_err(io_err(&to))?;
    sync_dir(&dir);
    Ok(true)
}

fn remove(p: &Path) -> Result<(), Error> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(p)(e)),
    }
}

/// Makes a rename in `dir` durable before the next step: the whole filesystem is flushed,
/// as a directory fsync does not reach FAT's directory entries.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
    let _ = kairos_sys::fs::sync_filesystem(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dep: &str) -> Target<'_> {
        Target {
            deployment: dep,
            version: "1.0",
            linux: "/kairos/vmlinuz-aa",
            initrd: "/kairos/initrd-bb",
            cmdline: "console=ttyS0",
        }
    }

    #[test]
    fn names_with_and_without_counters() {
        assert_eq!(parse_name("active.conf"), Some((Role::Active, None)));
        assert_eq!(
            parse_name("active+3.conf"),
            Some((Role::Active, Some(Tries { left: 3, done: 0 })))
        );
        assert_eq!(
            parse_name("passive+0-3.conf"),
            Some((Role::Passive, Some(Tries { left: 0, done: 3 })))
        );
        assert_eq!(parse_name("other.conf"), None);
        assert_eq!(parse_name("active+x.conf"), None);
        assert_eq!(parse_name("active.conf.tmp"), None);
    }

    #[test]
    fn spent_active_falls_back_to_passive_then_recovery() {
        let esp = tempfile::tempdir().unwrap();
        set(
            esp.path(),
            Role::Recovery,
            &render(Role::Recovery, &target("r")),
            None,
        )
        .unwrap();
        set(
            esp.path(),
            Role::Passive,
            &render(Role::Passive, &target("old")),
            None,
        )
        .unwrap();
        set(
            esp.path(),
            Role::Active,
            &render(Role::Active, &target("new")),
            Some(3),
        )
        .unwrap();
        let e = list(esp.path()).unwrap();
        assert_eq!(boot_order(&e)[0].deployment, "new");
        // systemd-boot counts the tries down in the file name.
        let dir = esp.path().join("loader/entries");
        fs::rename(dir.join("active+3.conf"), dir.join("active+0-3.conf")).unwrap();
        let e = list(esp.path()).unwrap();
        let order: Vec<_> = boot_order(&e).iter().map(|e| e.role).collect();
        assert_eq!(order, [Role::Passive, Role::Recovery, Role::Active]);
        // Without a passive entry, recovery comes before the spent one.
        clear(esp.path(), Role::Passive).unwrap();
        let e = list(esp.path()).unwrap();
        assert_eq!(boot_order(&e)[0].role, Role::Recovery);
    }

    #[test]
    fn set_replaces_the_role_and_bless_drops_the_counter() {
        let esp = tempfile::tempdir().unwrap();
        set(
            esp.path(),
            Role::Active,
            &render(Role::Active, &target("a")),
            None,
        )
        .unwrap();
        set(
            esp.path(),
            Role::Active,
            &render(Role::Active, &target("b")),
            Some(3),
        )
        .unwrap();
        let e = list(esp.path()).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].file, "active+3.conf");
        assert_eq!(e[0].deployment, "b");
        assert!(e[0].options.contains("kairos.mode=active"));
        assert!(e[0].options.contains("kairos.store=LABEL=COS_STATE"));
        assert!(bless(esp.path(), &e[0]).unwrap());
        let e = list(esp.path()).unwrap();
        assert_eq!(e[0].file, "active.conf");
        assert!(!bless(esp.path(), &e[0]).unwrap());
        assert!(
            fs::read_dir(esp.path().join("loader/entries"))
                .unwrap()
                .all(|f| !f.unwrap().file_name().to_string_lossy().contains("tmp")),
            "no temp files left"
        );
    }

    #[test]
    fn a_cut_between_write_and_remove_boots_the_new_entry() {
        let esp = tempfile::tempdir().unwrap();
        let dir = esp.path().join("loader/entries");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("active.conf"),
            render(Role::Active, &target("old")),
        )
        .unwrap();
        fs::write(
            dir.join("active+3.conf"),
            render(Role::Active, &target("new")),
        )
        .unwrap();
        let e = list(esp.path()).unwrap();
        // Either is a bootable node; systemd-boot 252 picks the new one, with its tries.
        assert_eq!(boot_order(&e)[0].deployment, "new");
    }
}
