//! OCI image data: descriptors, manifests, indexes, configs, and a local image whose blobs
//! are files in a content-addressed blob directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use kairos_layers::Digest;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::Error;

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MT_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    /// Validated when the descriptor is parsed: a bad digest fails the whole document.
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// An OCI image manifest for a config blob and layers.
    pub fn oci(config_digest: Digest, config_size: u64, layers: Vec<Descriptor>) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: Some(MT_OCI_MANIFEST.into()),
            config: Descriptor::new(MT_OCI_CONFIG, config_digest, config_size),
            layers,
            annotations: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// The tag annotation of an OCI layout's index entries.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An image whose manifest, config and layers are blobs in `blobs` (`<blobs>/sha256/<hex>`).
#[derive(Debug, Clone)]
pub struct LocalImage {
    pub blobs: PathBuf,
    pub manifest: Manifest,
    pub manifest_digest: Digest,
    pub config: Json,
}

impl LocalImage {
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path(&self.blobs, digest)
    }

    /// The uncompressed digests of the layers (`rootfs.diff_ids` of the config), each
    /// validated; a config with a bad one is refused whole.
    pub fn diff_ids(&self) -> Result<Vec<Digest>, Error> {
        config_diff_ids(&self.config)
    }
}

/// `rootfs.diff_ids` of an image config.
pub fn config_diff_ids(config: &Json) -> Result<Vec<Digest>, Error> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let s = v.as_str().unwrap_or_default();
            Digest::parse(s)
                .map_err(|e| Error::Format(format!("image config rootfs.diff_ids: {e}")))
        })
        .collect()
}

/// `<blobs>/sha256/<hex>`: a validated digest cannot name anything else.
pub fn blob_path(blobs: &Path, digest: &Digest) -> PathBuf {
    blobs.join(digest.algorithm()).join(digest.hex())
}

impl Platform {
    /// `linux/amd64`, the platform every Kairos node here runs.
    pub fn native() -> Platform {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }

    /// `os/arch[/variant]` as configs write it (`linux/arm64`, `linux/arm/v7`).
    pub fn parse(s: &str) -> Result<Platform, Error> {
        let word = |w: &str| {
            !w.is_empty()
                && w.len() <= 32
                && w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if word(os) && word(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if word(os) && word(arch) && word(v) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(Error::Format(format!(
                "platform {s:?}: write os/architecture[/variant], e.g. linux/arm64"
            ))),
        }
    }

    fn matches(&self, p: &Platform) -> bool {
        p.os == self.os
            && p.architecture == self.architecture
            && (self.variant.is_none() || p.variant == self.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// `linux/amd64` from an index, the platform every Kairos node here runs.
pub fn pick_platform(index: &Index) -> Option<&Descriptor> {
    pick_platform_for(index, &Platform::native())
}

/// The manifest for `want` from an index.
pub fn pick_platform_for<'a>(index: &'a Index, want: &Platform) -> Option<&'a Descriptor> {
    index
        .manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
}
