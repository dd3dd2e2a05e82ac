//! `git`: clone a repository into a path of the system, or bring an existing checkout up
//! to date (fetch, then the branch — or the remote's HEAD — checked out hard).
//!
//! yip links go-git; we run the system's `git` (Debian package `git`), in the target
//! directory opened beneath the root, with no terminal prompt and the credentials in the
//! environment (never on the command line or in `.git/config`).

use std::path::Path;

use base64::Engine;
use kairos_config::types::Git;
use kairos_sys::exec::Cmd;

use crate::executor::Ctx;

/// A branch name git would accept, and that cannot be read as an option.
fn check_branch(b: &str) -> Result<(), String> {
    let ok = !b.is_empty()
        && !b.starts_with(['-', '/', '.'])
        && !b.contains("..")
        && !b.ends_with(['/', '.'])
        && !b.ends_with(".lock")
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./+".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(format!("branch {b:?} is not a valid branch name"))
    }
}

/// Key files for ssh, removed when dropped.
struct Secrets(Option<std::path::PathBuf>);

impl Drop for Secrets {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub fn git(ctx: &Ctx, g: &Git) -> Result<(), String> {
    let url = ctx.render(&g.url);
    let path = ctx.render(&g.path);
    if url.is_empty() || url.starts_with('-') {
        return Err(format!("url {url:?} is not a repository URL"));
    }
    if !path.starts_with('/') {
        return Err(format!("{url}: path {path:?} must be an absolute path"));
    }
    let branch = g.branch.as_deref().filter(|b| !b.is_empty());
    if let Some(b) = branch {
        check_branch(b)?;
    }
    let created = ctx
        .root
        .create_dir_all(&path, 0o755)
        .map_err(|e| format!("{url}: creating {path}: {e}"))?;
    let dir = ctx
        .root
        .open_dir(&path)
        .map_err(|e| format!("{url}: opening {path}: {e}"))?;
    let entries = dir
        .read_dir(Path::new(""))
        .map_err(|e| format!("{url}: reading {path}: {e}"))?;
    let checkout = entries.iter().any(|(n, _)| n == ".git");
    if !checkout && !entries.is_empty() {
        return Err(format!(
            "{url}: {path} exists, is not empty and is not a git checkout; remove it or choose another path"
        ));
    }

    // Credentials and settings through the environment (GIT_CONFIG_*), not argv.
    let mut config: Vec<(String, String)> = Vec::new();
    let mut secrets = Secrets(None);
    let auth = g.auth.clone().unwrap_or_default();
    if let Some(user) = auth.username.as_deref().filter(|u| !u.is_empty()) {
        let pass = auth.password.clone().unwrap_or_default();
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        config.push((
            "http.extraHeader".into(),
            format!("Authorization: Basic {b}"),
        ));
    } else if let Some(token) = auth.password.as_deref().filter(|p| !p.is_empty()) {
        config.push((
            "http.extraHeader".into(),
            format!("Authorization: Bearer {token}"),
        ));
    }
    if auth.insecure.0 {
        config.push(("http.sslVerify".into(), "false".into()));
    }
    let mut ssh = None;
    if let Some(key) = auth.private_key.as_deref().filter(|k| !k.is_empty()) {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "kairos-git-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&d)
            .map_err(|e| format!("{}: {e}", d.display()))?;
        secrets.0 = Some(d.clone());
        let write = |name: &str, text: &str| -> Result<std::path::PathBuf, String> {
            let p = d.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            let text = if text.ends_with('\n') {
                text.to_string()
            } else {
                format!("{text}\n")
            };
            std::io::Write::write_all(&mut f, text.as_bytes())
                .map_err(|e| format!("{}: {e}", p.display()))?;
            Ok(p)
        };
        let key_file = write("key", key)?;
        let mut cmd = format!(
            "ssh -i '{}' -o IdentitiesOnly=yes -o BatchMode=yes",
            key_file.display()
        );
        if let Some(host_key) = auth.public_key.as_deref().filter(|k| !k.is_empty()) {
            let known = write("known_hosts", &format!("* {}", host_key.trim()))?;
            cmd.push_str(&format!(
                " -o StrictHostKeyChecking=yes -o UserKnownHostsFile='{}'",
                known.display()
            ));
        } else if auth.insecure.0 {
            cmd.push_str(" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null");
        } else {
            cmd.push_str(" -o StrictHostKeyChecking=accept-new");
        }
        ssh = Some(cmd);
    }
    let git = |args: &[&str]| {
        let mut c = Cmd::new("git")
            .args(args)
            .current_dir(dir.cwd_for_child())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            // Like go-git in yip: the node's own git settings do not change what is fetched.
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_COUNT", config.len().to_string());
        for (i, (k, v)) in config.iter().enumerate() {
            c = c
                .env(format!("GIT_CONFIG_KEY_{i}"), k)
                .env(format!("GIT_CONFIG_VALUE_{i}"), v);
        }
        if let Some(s) = &ssh {
            c = c.env("GIT_SSH_COMMAND", s);
        }
        c.run().map(|_| ()).map_err(|e| e.to_string())
    };
    if !checkout {
        let mut args = vec!["clone", "--quiet"];
        if let Some(b) = branch {
            args.extend(["--branch", b]);
            if g.branch_only.0 {
                args.push("--single-branch");
            }
        }
        args.extend(["--", &url, "."]);
        let r = git(&args);
        if r.is_err() {
            // Nothing half-written: what this step made goes, what was there stays.
            match created.first() {
                Some(top) => {
                    let _ = ctx.root.dir().and_then(|d| d.remove_all(top));
                }
                None => {
                    let _ = dir.remove_all(Path::new(".git"));
                }
            }
        }
        return r;
    }
    git(&["remote", "set-url", "origin", "--", &url])?;
    git(&["fetch", "--quiet", "origin", branch.unwrap_or("HEAD")])?;
    match branch {
        Some(b) => git(&["checkout", "--quiet", "--force", "-B", b, "FETCH_HEAD"]),
        None => git(&["reset", "--quiet", "--hard", "FETCH_HEAD"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names() {
        for good in ["main", "release/1.2", "feature-x", "v1.0+k3s"] {
            assert!(check_branch(good).is_ok(), "{good}");
        }
        for bad in ["-u", "--upload-pack=x", "a..b", "x.lock", "/x", "a b", ""] {
            assert!(check_branch(bad).is_err(), "{bad}");
        }
    }
}
