//! What happened to the node, kept on STATE under `.kairos-state/`: `history.jsonl` (one
//! line per action), `staged.json` (a deployment waiting for `upgrade --apply`) and
//! `failures.jsonl` (why a deployment failed its boot assessment).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, io_err};

pub const DIR: &str = ".kairos-state";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub time: String,
    pub action: String,
    #[serde(default)]
    pub deployment: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Record {
    pub fn new(action: &str, deployment: &str, image: &str, detail: &str) -> Record {
        Record {
            time: kairos_sys::time::now_rfc3339(),
            action: action.into(),
            deployment: deployment.into(),
            image: image.into(),
            detail: detail.into(),
        }
    }
}

fn path(store: &Path, name: &str) -> PathBuf {
    store.join(DIR).join(name)
}

fn append_line(p: &Path, r: &Record) -> Result<(), Error> {
    fs::create_dir_all(p.parent().unwrap_or(Path::new("."))).map_err(io_err(p))?;
    let mut line = serde_json::to_vec(r).map_err(|e| Error::Node(e.to_string()))?;
    line.push(b'\n');
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(io_err(p))?;
    f.write_all(&line).map_err(io_err(p))?;
    f.sync_all().map_err(io_err(p))
}

fn read_lines(p: &Path) -> Vec<Record> {
    // A line cut short by a power loss is skipped, not fatal.
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn append(store: &Path, r: &Record) -> Result<(), Error> {
    append_line(&path(store, "history.jsonl"), r)
}

pub fn read(store: &Path) -> Vec<Record> {
    read_lines(&path(store, "history.jsonl"))
}

pub fn record_failure(store: &Path, r: &Record) -> Result<(), Error> {
    append_line(&path(store, "failures.jsonl"), r)
}

pub fn failures(store: &Path) -> Vec<Record> {
    read_lines(&path(store, "failures.jsonl"))
}

/// A deployment written by `upgrade --download-only`, not yet made the next boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub deployment: String,
    pub image: String,
    pub time: String,
}

pub fn set_staged(store: &Path, s: &Staged) -> Result<(), Error> {
    let data = serde_json::to_vec_pretty(s).map_err(|e| Error::Node(e.to_string()))?;
    Ok(kairos_layers::write_atomic(
        &path(store, "staged.json"),
        &data,
    )?)
}

pub fn staged(store: &Path) -> Option<Staged> {
    serde_json::from_slice(&fs::read(path(store, "staged.json")).ok()?).ok()
}

pub fn clear_staged(store: &Path) -> Result<(), Error> {
    let p = path(store, "staged.json");
    match fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&p)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_survives_a_torn_line() {
        let d = tempfile::tempdir().unwrap();
        append(d.path(), &Record::new("installed", "d-1", "img:1", "")).unwrap();
        let p = path(d.path(), "history.jsonl");
        let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"time\":\"2026").unwrap();
        drop(f);
        let h = read(d.path());
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].deployment, "d-1");
        let s = Staged {
            deployment: "d-2".into(),
            image: "x".into(),
            time: "t".into(),
        };
        set_staged(d.path(), &s).unwrap();
        assert_eq!(staged(d.path()), Some(s));
        clear_staged(d.path()).unwrap();
        clear_staged(d.path()).unwrap();
        assert_eq!(staged(d.path()), None);
    }
}
