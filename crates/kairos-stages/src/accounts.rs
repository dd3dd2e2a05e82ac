//! The account files of a root (`/etc/passwd`, `group`, `shadow`, `gshadow`), edited as
//! text so that untouched lines stay byte-for-byte and re-runs change nothing.

use std::io;

use kairos_sys::Root;

/// One colon-separated file.
#[derive(Debug, Clone)]
pub struct Table {
    pub path: &'static str,
    pub lines: Vec<String>,
    pub exists: bool,
    default_mode: u32,
    original: Vec<String>,
}

impl Table {
    fn load(root: &Root, path: &'static str, default_mode: u32) -> io::Result<Table> {
        let (lines, exists) = match root.read_to_string(path) {
            Ok(t) => (t.lines().map(str::to_string).collect(), true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Vec::new(), false),
            Err(e) => return Err(e),
        };
        Ok(Table {
            path,
            original: lines.clone(),
            lines,
            exists,
            default_mode,
        })
    }

    /// Fields of the entry named `name`.
    pub fn get(&self, name: &str) -> Option<Vec<String>> {
        self.lines
            .iter()
            .find(|l| l.split(':').next() == Some(name))
            .map(|l| l.split(':').map(str::to_string).collect())
    }

    /// Replaces the entry named by `fields[0]`, or appends it.
    pub fn set(&mut self, fields: &[String]) {
        let line = fields.join(":");
        match self
            .lines
            .iter_mut()
            .find(|l| l.split(':').next() == Some(fields[0].as_str()))
        {
            Some(l) => *l = line,
            None => self.lines.push(line),
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.lines.retain(|l| l.split(':').next() != Some(name));
    }

    /// Numeric ids in field `idx` (uid or gid).
    pub fn ids(&self, idx: usize) -> Vec<u32> {
        self.lines
            .iter()
            .filter_map(|l| l.split(':').nth(idx)?.parse().ok())
            .collect()
    }

    fn save(&self, root: &Root) -> io::Result<()> {
        if self.lines == self.original {
            return Ok(());
        }
        let mode = root
            .metadata(self.path)
            .map(|m| m.mode)
            .unwrap_or(self.default_mode);
        root.create_parents(self.path, 0o755)?;
        let mut text = self.lines.join("\n");
        text.push('\n');
        root.write_file(self.path, text.as_bytes(), mode)
            .map(|_| ())
    }
}

/// All four account files of a root.
#[derive(Debug, Clone)]
pub struct Accounts {
    pub passwd: Table,
    pub group: Table,
    pub shadow: Table,
    pub gshadow: Table,
}

impl Accounts {
    pub fn load(root: &Root) -> io::Result<Accounts> {
        Ok(Accounts {
            passwd: Table::load(root, "etc/passwd", 0o644)?,
            group: Table::load(root, "etc/group", 0o644)?,
            shadow: Table::load(root, "etc/shadow", 0o640)?,
            gshadow: Table::load(root, "etc/gshadow", 0o640)?,
        })
    }

    pub fn save(&self, root: &Root) -> io::Result<()> {
        self.passwd.save(root)?;
        self.group.save(root)?;
        self.shadow.save(root)?;
        // gshadow is kept only where the distribution has one.
        if self.gshadow.exists {
            self.gshadow.save(root)?;
        }
        Ok(())
    }

    pub fn uid(&self, user: &str) -> Option<u32> {
        self.passwd.get(user)?.get(2)?.parse().ok()
    }

    pub fn gid(&self, group: &str) -> Option<u32> {
        self.group.get(group)?.get(2)?.parse().ok()
    }

    /// Resolves `user[:group]` (names or numbers) to ids.
    pub fn owner_string(&self, s: &str) -> Result<(Option<u32>, Option<u32>), String> {
        let (u, g) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let uid = if u.is_empty() {
            None
        } else {
            Some(
                u.parse()
                    .ok()
                    .or_else(|| self.uid(u))
                    .ok_or_else(|| format!("user {u:?} does not exist"))?,
            )
        };
        let gid = match g {
            Some(g) if !g.is_empty() => Some(
                g.parse()
                    .ok()
                    .or_else(|| self.gid(g))
                    .ok_or_else(|| format!("group {g:?} does not exist"))?,
            ),
            // `user` alone means the user's primary group, as chown does.
            _ => uid.and_then(|_| self.passwd.get(u)?.get(3)?.parse().ok()),
        };
        Ok((uid, gid))
    }

    /// First id ≥ `from` used by neither users nor groups.
    pub fn free_id(&self, from: u32) -> u32 {
        let mut used = self.passwd.ids(2);
        used.extend(self.group.ids(2));
        (from..).find(|i| !used.contains(i)).unwrap_or(from)
    }

    pub fn ensure_group(&mut self, name: &str, gid: Option<u32>) -> u32 {
        if let Some(g) = self.gid(name) {
            return g;
        }
        let gid = gid.unwrap_or_else(|| self.free_id(1000));
        self.group
            .set(&[name.into(), "x".into(), gid.to_string(), String::new()]);
        if self.gshadow.exists {
            self.gshadow
                .set(&[name.into(), "!".into(), String::new(), String::new()]);
        }
        gid
    }

    /// Adds `user` to the member list of `group`.
    pub fn add_member(&mut self, group: &str, user: &str) {
        for (table, idx) in [(&mut self.group, 3usize), (&mut self.gshadow, 3usize)] {
            if let Some(mut f) = table.get(group) {
                while f.len() <= idx {
                    f.push(String::new());
                }
                let mut members: Vec<String> = f[idx]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect();
                if !members.iter().any(|m| m == user) {
                    members.push(user.to_string());
                    f[idx] = members.join(",");
                    table.set(&f);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn edits_keep_other_lines() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc")).unwrap();
        fs::write(d.path().join("etc/group"), "root:x:0:\nadmin:x:900:a\n").unwrap();
        let root = Root::new(d.path());
        let mut a = Accounts::load(&root).unwrap();
        a.add_member("admin", "b");
        a.add_member("admin", "b");
        assert_eq!(a.ensure_group("new", None), 1000);
        a.save(&root).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("etc/group")).unwrap(),
            "root:x:0:\nadmin:x:900:a,b\nnew:x:1000:\n"
        );
        assert!(!d.path().join("etc/gshadow").exists());
    }
}
