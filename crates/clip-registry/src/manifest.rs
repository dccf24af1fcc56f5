//! From a reference's top manifest to one platform's image: multi-arch
//! indexes (OCI and Docker), image manifests (OCI and Docker schema 2) and
//! the config, every fetched document checked against its digest.

use oci_spec::image::{ImageIndex, ImageManifest};

use crate::{verify_digest, Descriptor, Error, Result};

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
/// Manifests and configs are small; a larger one is hostile.
pub(crate) const MAX_DOC: u64 = 16 << 20;

/// The platform to pick from a multi-arch index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl std::str::FromStr for Platform {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(Error::Platform(s.into())),
        }
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

impl Platform {
    fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        if p.os().to_string() != self.os || p.architecture().to_string() != self.architecture {
            return false;
        }
        match &self.variant {
            None => true,
            Some(want) => {
                let have = p
                    .variant()
                    .clone()
                    .or_else(|| (self.architecture == "arm64").then(|| "v8".to_string()));
                have.as_deref() == Some(want.as_str())
            }
        }
    }
}

/// One platform's image, ready to index.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub manifest_digest: String,
    pub manifest_media_type: String,
    pub platform: String,
    pub config_digest: String,
    /// The config JSON as stored.
    pub config: Vec<u8>,
    pub layers: Vec<Descriptor>,
}

/// A fetched manifest document.
pub(crate) struct Fetched {
    pub bytes: Vec<u8>,
    /// Media type from the response or descriptor, if any.
    pub media_type: Option<String>,
    pub digest: String,
}

/// What a source must provide for [`resolve`].
pub(crate) trait Fetcher {
    fn top(&self) -> Result<Fetched>;
    fn manifest(&self, desc: &Descriptor) -> Result<Fetched>;
    fn small_blob(&self, desc: &Descriptor) -> Result<Vec<u8>>;
}

fn malformed(digest: &str, msg: impl std::fmt::Display) -> Error {
    Error::Manifest {
        digest: digest.into(),
        msg: msg.to_string(),
    }
}

/// The media type a document declares, or what its shape says it is.
fn kind_of(doc: &Fetched) -> Result<String> {
    let v: serde_json::Value = serde_json::from_slice(&doc.bytes).map_err(|e| malformed(&doc.digest, e))?;
    let declared = v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string);
    if v.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
        return Err(Error::ManifestType(
            "application/vnd.docker.distribution.manifest.v1+json".into(),
        ));
    }
    let mt = declared.or_else(|| doc.media_type.clone()).unwrap_or_else(|| {
        if v.get("manifests").is_some() {
            OCI_INDEX.into()
        } else {
            OCI_MANIFEST.into()
        }
    });
    Ok(mt)
}

/// The digest of the platform's image manifest: the top manifest, and if
/// it is an index, the entry for the platform (which is not fetched). One
/// request for a tag, for a daemon that re-resolves tags it already has.
pub(crate) fn resolve_digest(src: &dyn Fetcher, platform: &Platform) -> Result<String> {
    let doc = src.top()?;
    match kind_of(&doc)?.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            let index: ImageIndex = serde_json::from_slice(&doc.bytes).map_err(|e| malformed(&doc.digest, e))?;
            let chosen = index
                .manifests()
                .iter()
                .find(|m| m.platform().as_ref().is_some_and(|p| platform.matches(p)))
                .ok_or_else(|| Error::NoPlatform {
                    digest: doc.digest.clone(),
                    platform: platform.to_string(),
                    available: String::new(),
                })?;
            crate::digest_hex(chosen.digest().as_ref())?;
            Ok(chosen.digest().to_string())
        }
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(doc.digest),
        other => Err(Error::ManifestType(other.into())),
    }
}

pub(crate) fn resolve(src: &dyn Fetcher, platform: &Platform) -> Result<ResolvedImage> {
    let mut doc = src.top()?;
    for _ in 0..4 {
        let mt = kind_of(&doc)?;
        match mt.as_str() {
            OCI_INDEX | DOCKER_LIST => {
                let index: ImageIndex = serde_json::from_slice(&doc.bytes).map_err(|e| malformed(&doc.digest, e))?;
                let chosen = index
                    .manifests()
                    .iter()
                    .find(|m| m.platform().as_ref().is_some_and(|p| platform.matches(p)))
                    .ok_or_else(|| Error::NoPlatform {
                        digest: doc.digest.clone(),
                        platform: platform.to_string(),
                        available: index
                            .manifests()
                            .iter()
                            .filter_map(|m| m.platform().as_ref())
                            .map(|p| {
                                let mut s = format!("{}/{}", p.os(), p.architecture());
                                if let Some(v) = p.variant() {
                                    s = format!("{s}/{v}");
                                }
                                s
                            })
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                let desc = Descriptor {
                    media_type: chosen.media_type().to_string(),
                    digest: chosen.digest().to_string(),
                    size: chosen.size(),
                };
                if desc.size > MAX_DOC {
                    return Err(malformed(&desc.digest, "manifest is implausibly large"));
                }
                doc = src.manifest(&desc)?;
                verify_digest("manifest", &desc.digest, &doc.bytes)?;
            }
            OCI_MANIFEST | DOCKER_MANIFEST => {
                let m: ImageManifest = serde_json::from_slice(&doc.bytes).map_err(|e| malformed(&doc.digest, e))?;
                let cfg = Descriptor {
                    media_type: m.config().media_type().to_string(),
                    digest: m.config().digest().to_string(),
                    size: m.config().size(),
                };
                if !cfg.media_type.contains("container.image")
                    && cfg.media_type != "application/vnd.oci.image.config.v1+json"
                {
                    return Err(malformed(
                        &doc.digest,
                        format!("config type {} is not an image config", cfg.media_type),
                    ));
                }
                if cfg.size > MAX_DOC {
                    return Err(malformed(&doc.digest, "config is implausibly large"));
                }
                let config = src.small_blob(&cfg)?;
                verify_digest("config", &cfg.digest, &config)?;
                let cfg_json: serde_json::Value =
                    serde_json::from_slice(&config).map_err(|e| malformed(&cfg.digest, format!("config: {e}")))?;
                let layers = m
                    .layers()
                    .iter()
                    .map(|l| {
                        crate::digest_hex(l.digest().as_ref())?;
                        Ok(Descriptor {
                            media_type: l.media_type().to_string(),
                            digest: l.digest().to_string(),
                            size: l.size(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let os = cfg_json.get("os").and_then(|v| v.as_str()).unwrap_or(&platform.os);
                let arch = cfg_json
                    .get("architecture")
                    .and_then(|v| v.as_str())
                    .unwrap_or(&platform.architecture);
                return Ok(ResolvedImage {
                    manifest_digest: doc.digest,
                    manifest_media_type: mt,
                    platform: format!("{os}/{arch}"),
                    config_digest: cfg.digest,
                    config,
                    layers,
                });
            }
            other => return Err(Error::ManifestType(other.into())),
        }
    }
    Err(malformed(&doc.digest, "indexes nested too deeply"))
}
