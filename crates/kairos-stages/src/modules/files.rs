//! `files`, `directories` and `downloads`.

use std::path::Path;

use base64::Engine;
use kairos_config::types::{Directory, Download, StepFile};

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

/// Creates the missing parents of `path` with `mode`; only the directories made here get
/// the owner.
fn ensure_parent(
    ctx: &Ctx,
    path: &Path,
    mode: u32,
    owner: (Option<u32>, Option<u32>),
) -> Result<(), String> {
    let made = ctx
        .root
        .create_parents(path, mode)
        .map_err(|e| format!("creating the directories of {}: {e}", path.display()))?;
    for d in made {
        ctx.root
            .set_owner(&d, owner.0, owner.1)
            .map_err(|e| format!("chown /{}: {e}", d.display()))?;
    }
    Ok(())
}

/// Writes a file with parents, mode and owner, all beneath the root.
fn put(
    ctx: &Ctx,
    path: &Path,
    content: &[u8],
    mode: u32,
    owner: (Option<u32>, Option<u32>),
) -> Result<(), String> {
    let shown = path.display();
    ensure_parent(ctx, path, dir_mode_for(mode), owner)?;
    ctx.root
        .write_file(path, content, mode)
        .map_err(|e| format!("writing {shown}: {e}"))?;
    ctx.root
        .set_owner(path, owner.0, owner.1)
        .map_err(|e| format!("chown {shown}: {e}"))
}

pub fn file(ctx: &Ctx, f: &StepFile) -> Result<(), String> {
    if f.path.is_empty() {
        return Err("a file needs a `path`".into());
    }
    let mode = mode_or(f.permissions.0, 0o644);
    let owner = super::owner(ctx, f.ownerstring.as_deref(), f.owner, f.group)?;
    let content = decode(&ctx.render(&f.content), f.encoding.as_deref())
        .map_err(|e| format!("{}: {e}", f.path))?;
    put(ctx, Path::new(&f.path), &content, mode, owner)
}

pub fn directory(ctx: &Ctx, d: &Directory) -> Result<(), String> {
    if d.path.is_empty() {
        return Err("a directory needs a `path`".into());
    }
    let path = Path::new(&d.path);
    let mode = mode_or(d.permissions.0, 0o755);
    let owner = super::owner(ctx, None, d.owner, d.group)?;
    if ctx.root.exists(path) && !ctx.root.is_dir(path) {
        return Err(format!("{} exists and is not a directory", d.path));
    }
    ensure_parent(ctx, path, mode, owner)?;
    ctx.root
        .create_dir_all(path, mode)
        .map_err(|e| format!("creating {}: {e}", d.path))?;
    ctx.root
        .set_mode(path, mode)
        .map_err(|e| format!("chmod {}: {e}", d.path))?;
    ctx.root
        .set_owner(path, owner.0, owner.1)
        .map_err(|e| format!("chown {}: {e}", d.path))
}

pub fn download(ctx: &Ctx, d: &Download) -> Result<(), String> {
    if d.url.is_empty() || d.path.is_empty() {
        return Err("a download needs `url` and `path`".into());
    }
    let mut path = std::path::PathBuf::from(&d.path);
    if ctx.root.is_dir(&path) || d.path.ends_with('/') {
        let name = d
            .url
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .unwrap_or("index.html");
        path = path.join(name);
    }
    let body = ctx
        .fetcher
        .fetch(&d.url)
        .map_err(|e| format!("downloading {}: {e}", d.url))?;
    let mode = mode_or(d.permissions.0, 0o644);
    let owner = super::owner(ctx, d.ownerstring.as_deref(), d.owner, d.group)?;
    put(ctx, &path, &body, mode, owner)
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
