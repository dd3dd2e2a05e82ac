//! `files`, `directories` and `downloads`.

use std::path::Path;

use base64::Engine;
use kairos_config::types::{Directory, Download, StepFile};
use kairos_sys::fs as sysfs;

use crate::executor::Ctx;

/// Modes left at 0 get the usual defaults rather than an unreadable 0000 file.
pub(crate) fn mode_or(m: u32, default: u32) -> u32 {
    if m == 0 { default } else { m }
}

/// A parent directory gets the file's mode with search (x) added wherever it can be read.
fn dir_mode_for(file_mode: u32) -> u32 {
    (file_mode | ((file_mode & 0o444) >> 2) | 0o700) & 0o777
}

pub fn decode(content: &str, encoding: Option<&str>) -> Result<Vec<u8>, String> {
    let b64 = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s.split_whitespace().collect::<String>())
            .map_err(|e| format!("bad base64 content: {e}"))
    };
    let gunzip = |data: Vec<u8>| {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&data[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("bad gzip content: {e}"))?;
        Ok::<_, String>(out)
    };
    match encoding.unwrap_or("").to_lowercase().as_str() {
        "b64" | "base64" => b64(content),
        "gz" | "gzip" => gunzip(content.as_bytes().to_vec()),
        "gz+base64" | "gzip+base64" | "gz+b64" | "gzip+b64" => gunzip(b64(content)?),
        _ => Ok(content.as_bytes().to_vec()),
    }
}

fn ensure_parent(path: &Path, mode: u32, owner: (Option<u32>, Option<u32>)) -> Result<(), String> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    if parent.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut p = parent;
    while !p.exists() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(pp) => p = pp,
            None => break,
        }
    }
    sysfs::create_dir_all(parent, mode)
        .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    for d in missing {
        sysfs::set_owner(&d, owner.0, owner.1)
            .map_err(|e| format!("chown {}: {e}", d.display()))?;
    }
    Ok(())
}

pub fn file(ctx: &Ctx, f: &StepFile) -> Result<(), String> {
    if f.path.is_empty() {
        return Err("a file needs a `path`".into());
    }
    let path = ctx.path(&f.path);
    let mode = mode_or(f.permissions.0, 0o644);
    let owner = super::owner(ctx, f.ownerstring.as_deref(), f.owner, f.group)?;
    let content = decode(&ctx.render(&f.content), f.encoding.as_deref())
        .map_err(|e| format!("{}: {e}", f.path))?;
    ensure_parent(&path, dir_mode_for(mode), owner).map_err(|e| format!("{}: {e}", f.path))?;
    sysfs::write_file(&path, &content, mode).map_err(|e| format!("writing {}: {e}", f.path))?;
    sysfs::set_owner(&path, owner.0, owner.1).map_err(|e| format!("chown {}: {e}", f.path))
}

pub fn directory(ctx: &Ctx, d: &Directory) -> Result<(), String> {
    if d.path.is_empty() {
        return Err("a directory needs a `path`".into());
    }
    let path = ctx.path(&d.path);
    let mode = mode_or(d.permissions.0, 0o755);
    let owner = super::owner(ctx, None, d.owner, d.group)?;
    if path.exists() && !path.is_dir() {
        return Err(format!("{} exists and is not a directory", d.path));
    }
    ensure_parent(&path, mode, owner).map_err(|e| format!("{}: {e}", d.path))?;
    sysfs::create_dir_all(&path, mode).map_err(|e| format!("creating {}: {e}", d.path))?;
    sysfs::set_mode(&path, mode).map_err(|e| format!("chmod {}: {e}", d.path))?;
    sysfs::set_owner(&path, owner.0, owner.1).map_err(|e| format!("chown {}: {e}", d.path))
}

pub fn download(ctx: &Ctx, d: &Download) -> Result<(), String> {
    if d.url.is_empty() || d.path.is_empty() {
        return Err("a download needs `url` and `path`".into());
    }
    let mut path = ctx.path(&d.path);
    if path.is_dir() || d.path.ends_with('/') {
        let name = d
            .url
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("index.html");
        path = path.join(name);
    }
    let body = ctx
        .fetcher
        .fetch(&d.url)
        .map_err(|e| format!("downloading {}: {e}", d.url))?;
    let mode = mode_or(d.permissions.0, 0o644);
    let owner = super::owner(ctx, d.ownerstring.as_deref(), d.owner, d.group)?;
    ensure_parent(&path, dir_mode_for(mode), owner)?;
    sysfs::write_file(&path, &body, mode)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    sysfs::set_owner(&path, owner.0, owner.1).map_err(|e| format!("chown {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(decode("aGVsbG8=", Some("b64")).unwrap(), b"hello");
        assert_eq!(decode("plain", None).unwrap(), b"plain");
        assert!(decode("!!", Some("base64")).is_err());
        assert_eq!(dir_mode_for(0o644), 0o755);
        assert_eq!(dir_mode_for(0o600), 0o700);
    }
}
