//! The one image-reference syntax used everywhere:
//! `REGISTRY/NAME:TAG` (or `oci:` prefixed, `@sha256:` digests allowed), `oci-layout:DIR[:TAG]`,
//! `ocifile:TAR`, and `dir:PATH` for a plain root tree.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Registry {
        registry: String,
        repository: String,
        reference: String,
    },
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
    Archive {
        path: PathBuf,
    },
    Dir {
        path: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image reference {input:?}: {reason}")]
pub struct RefError {
    pub input: String,
    pub reason: String,
}

/// A tag as the distribution spec allows it (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`): it goes
/// into a URL path, so nothing else may.
pub fn check_tag(tag: &str) -> Result<(), crate::Error> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(crate::Error::Format(format!(
            "tag {tag:?} is not a valid tag (letters, digits, `_.-`, at most 128, not starting with `.` or `-`)"
        )))
    }
}

/// Repository path components: lowercase letters, digits and `._-`, none empty or `.`/`..`.
fn check_repository(repo: &str) -> Result<(), &'static str> {
    for c in repo.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err("repository path components must not be empty, `.` or `..`");
        }
        if !c.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        }) {
            return Err("repository names are lowercase letters, digits and `._-`");
        }
    }
    Ok(())
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, RefError> {
        let err = |reason: &str| RefError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = s.strip_prefix("oci-layout:") {
            if rest.is_empty() {
                return Err(err("oci-layout: needs a directory"));
            }
            // DIR:TAG — the tag is after the last ':' unless that is part of the path.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            return Ok(ImageRef::Layout {
                dir: dir.into(),
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("ocifile:") {
            if rest.is_empty() {
                return Err(err("ocifile: needs a tar file"));
            }
            return Ok(ImageRef::Archive { path: rest.into() });
        }
        if let Some(rest) = s.strip_prefix("dir:") {
            if rest.is_empty() {
                return Err(err("dir: needs a directory"));
            }
            return Ok(ImageRef::Dir { path: rest.into() });
        }
        let r = s
            .strip_prefix("oci:")
            .or_else(|| s.strip_prefix("docker://"))
            .unwrap_or(s);
        if r.is_empty() || r.contains(char::is_whitespace) {
            return Err(err(
                "expected REGISTRY/NAME:TAG, oci-layout:DIR[:TAG], ocifile:TAR or dir:PATH",
            ));
        }
        let (first, rest) = r.split_once('/').unwrap_or(("", r));
        // Docker's rule: the first component is a registry if it has a '.' or ':' or is localhost.
        let (registry, path) = if !first.is_empty()
            && (first.contains('.') || first.contains(':') || first == "localhost")
        {
            (first.to_string(), rest.to_string())
        } else {
            (
                "docker.io".to_string(),
                if r.contains('/') {
                    r.to_string()
                } else {
                    format!("library/{r}")
                },
            )
        };
        let (repository, reference) = if let Some((n, d)) = path.split_once('@') {
            (n.to_string(), d.to_string())
        } else {
            match path.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => (n.to_string(), t.to_string()),
                _ => (path.clone(), "latest".to_string()),
            }
        };
        if repository.is_empty() || reference.is_empty() {
            return Err(err("missing repository name or tag"));
        }
        if repository.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(err("repository names must be lowercase"));
        }
        check_repository(&repository).map_err(err)?;
        if reference.contains(':') {
            kairos_layers::Digest::parse(&reference).map_err(|e| err(&e.to_string()))?;
        } else if let Err(e) = check_tag(&reference) {
            return Err(err(&e.to_string()));
        }
        Ok(ImageRef::Registry {
            registry,
            repository,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Registry {
                registry,
                repository,
                reference,
            } => {
                let sep = if reference.starts_with("sha256:") {
                    "@"
                } else {
                    ":"
                };
                write!(f, "{registry}/{repository}{sep}{reference}")
            }
            ImageRef::Layout { dir, tag: Some(t) } => write!(f, "oci-layout:{}:{t}", dir.display()),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci-layout:{}", dir.display()),
            ImageRef::Archive { path } => write!(f, "ocifile:{}", path.display()),
            ImageRef::Dir { path } => write!(f, "dir:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> (String, String, String) {
        match ImageRef::parse(s).unwrap() {
            ImageRef::Registry {
                registry,
                repository,
                reference,
            } => (registry, repository, reference),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn registry_forms() {
        assert_eq!(
            reg("127.0.0.1:5000/kairos/tiny:v1"),
            ("127.0.0.1:5000".into(), "kairos/tiny".into(), "v1".into())
        );
        assert_eq!(
            reg("oci:localhost/x"),
            ("localhost".into(), "x".into(), "latest".into())
        );
        assert_eq!(
            reg("debian"),
            ("docker.io".into(), "library/debian".into(), "latest".into())
        );
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            reg(&format!("quay.io/kairos/core@{d}")),
            ("quay.io".into(), "kairos/core".into(), d.clone())
        );
        // Digests and tags are checked before they reach a URL.
        assert!(ImageRef::parse("quay.io/kairos/core@sha256:ab").is_err());
        assert!(ImageRef::parse("quay.io/kairos/core@sha256:../../x").is_err());
        assert!(ImageRef::parse("quay.io/a/../b:v1").is_err());
        assert!(ImageRef::parse("quay.io/a:v1?x=1").is_err());
        assert!(ImageRef::parse("Quay.io/x").is_ok());
        assert!(ImageRef::parse("quay.io/Upper/x").is_err());
        assert_eq!(
            ImageRef::parse("127.0.0.1:5000/a:b").unwrap().to_string(),
            "127.0.0.1:5000/a:b"
        );
    }

    #[test]
    fn local_forms() {
        assert_eq!(
            ImageRef::parse("oci-layout:/tmp/l:v2").unwrap(),
            ImageRef::Layout {
                dir: "/tmp/l".into(),
                tag: Some("v2".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci-layout:/tmp/l").unwrap(),
            ImageRef::Layout {
                dir: "/tmp/l".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("ocifile:/x.tar").unwrap(),
            ImageRef::Archive {
                path: "/x.tar".into()
            }
        );
        assert_eq!(
            ImageRef::parse("dir:/r").unwrap(),
            ImageRef::Dir { path: "/r".into() }
        );
        assert!(ImageRef::parse("dir:").is_err());
        assert!(ImageRef::parse("").is_err());
    }
}
