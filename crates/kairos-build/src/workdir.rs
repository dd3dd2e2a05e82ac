//! Scratch directories next to an output, removed when dropped — on success and on error.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(Debug)]
pub struct WorkDir(PathBuf);

impl WorkDir {
    /// `<parent>/.<prefix>-<pid>`, fresh. Next to the output so renames stay on one filesystem.
    pub fn new(parent: &Path, prefix: &str) -> Result<WorkDir> {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let p = parent.join(format!(".{prefix}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(WorkDir(p))
    }

    /// A work dir beside the file `output`.
    pub fn beside(output: &Path, prefix: &str) -> Result<WorkDir> {
        WorkDir::new(output.parent().unwrap_or(Path::new(".")), prefix)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
