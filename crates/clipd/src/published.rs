//! Indexes published in the registry, attached to the image manifest they
//! describe (OCI 1.1 referrers): a fleet indexes an image once, and every
//! node fetches the index (and its prefetch profile) instead of reading
//! the layers.
//!
//! The artifact is an image manifest with artifact type [`ARTIFACT_TYPE`],
//! the empty config, the `.clip` file as its first layer, then the
//! profile and the hints for a guessed start (`clip-guess`), each if the
//! publishing node has them; its `subject` is the image's platform manifest
//! (a multi-platform image gets one per platform). The referrers entry
//! repeats the blobs' digests in annotations, so a node needs one
//! referrers lookup and one GET per blob.
//!
//! Trust: the index is used only when it binds to the manifest being
//! run (manifest, config and layer digests and sizes), after its blob
//! digest and its own checksum are checked; file bytes are still checked
//! span by span against the layers. Whoever can push to the repository can
//! also push the image itself.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use clip_format::IndexFile;
use clip_registry::referrers::{Referrer, Via, OCI_EMPTY};
use clip_registry::{Descriptor, RegistrySource, ResolvedImage};

pub const ARTIFACT_TYPE: &str = "application/vnd.clip.index";
const PROFILE_MEDIA_TYPE: &str = "application/vnd.clip.profile.v1+json";
const HINTS_MEDIA_TYPE: &str = "application/vnd.clip.hints.v1";
const FORMAT: &str = "dev.clip.format.version";
const INDEX_DIGEST: &str = "dev.clip.index.digest";
const INDEX_SIZE: &str = "dev.clip.index.size";
const PROFILE_DIGEST: &str = "dev.clip.profile.digest";
const PROFILE_SIZE: &str = "dev.clip.profile.size";
const HINTS_DIGEST: &str = "dev.clip.hints.digest";
const HINTS_SIZE: &str = "dev.clip.hints.size";
/// Bounds on what a node downloads: far above real images.
const MAX_INDEX: u64 = 1 << 30;
const MAX_PROFILE: u64 = 16 << 20;
const MAX_HINTS: u64 = 256 << 20;

fn index_media_type() -> String {
    format!("application/vnd.clip.index.v{}", clip_format::VERSION)
}

/// An index found in the registry, checked and bound to the image.
pub struct Found {
    pub index: IndexFile,
    pub bytes: Vec<u8>,
    pub profile: Option<Vec<u8>>,
    pub hints: Option<Vec<u8>>,
    pub artifact: String,
    pub via: Via,
}

/// Publishes `bytes` (the encoded `index`), `profile` and `hints` as a
/// referrer of the image manifest the index describes, replacing older
/// clip artifacts in the referrers tag. Returns the artifact's digest.
pub fn publish(
    src: &RegistrySource,
    index: &IndexFile,
    bytes: &[u8],
    profile: Option<&[u8]>,
    hints: Option<&[u8]>,
) -> Result<(String, Via)> {
    let image = &index.index.image;
    let subject = src
        .manifest_if_any(&image.manifest_digest, &[&image.manifest_media_type])?
        .with_context(|| format!("the registry has no manifest {}", image.manifest_digest))?;
    let empty = src.push_blob(b"{}")?;
    let index_digest = src.push_blob(bytes)?;
    let mut layers = vec![serde_json::json!({
        "mediaType": index_media_type(),
        "digest": index_digest,
        "size": bytes.len(),
        "annotations": {"org.opencontainers.image.title": "index.clip"},
    })];
    let mut annotations = BTreeMap::from([
        (FORMAT.to_string(), clip_format::VERSION.to_string()),
        (INDEX_DIGEST.to_string(), index_digest.clone()),
        (INDEX_SIZE.to_string(), bytes.len().to_string()),
        (
            "org.opencontainers.image.created".to_string(),
            rfc3339(std::time::SystemTime::now()),
        ),
    ]);
    for (blob, media_type, title, digest, size) in [
        (
            profile,
            PROFILE_MEDIA_TYPE,
            "index.profile",
            PROFILE_DIGEST,
            PROFILE_SIZE,
        ),
        (hints, HINTS_MEDIA_TYPE, "index.hints", HINTS_DIGEST, HINTS_SIZE),
    ] {
        let Some(b) = blob else { continue };
        let d = src.push_blob(b)?;
        layers.push(serde_json::json!({
            "mediaType": media_type,
            "digest": d,
            "size": b.len(),
            "annotations": {"org.opencontainers.image.title": title},
        }));
        annotations.insert(digest.into(), d);
        annotations.insert(size.into(), b.len().to_string());
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": OCI_EMPTY, "digest": empty, "size": 2, "data": "e30="},
        "layers": layers,
        "subject": {
            "mediaType": image.manifest_media_type,
            "digest": image.manifest_digest,
            "size": subject.len(),
        },
        "annotations": annotations,
    });
    let doc = serde_json::to_vec(&manifest)?;
    let entry = Referrer {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        digest: String::new(),
        size: doc.len() as u64,
        artifact_type: Some(ARTIFACT_TYPE.into()),
        annotations,
    };
    let replaces = |r: &Referrer| r.artifact_type.as_deref() == Some(ARTIFACT_TYPE);
    Ok(src.push_referrer(&image.manifest_digest, &doc, entry, &replaces)?)
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn rfc3339(t: std::time::SystemTime) -> String {
    clip_registry::rfc3339(t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// Checks that `index` describes exactly `image`.
pub fn binds(index: &IndexFile, image: &ResolvedImage) -> Result<()> {
    let i = &index.index;
    ensure!(
        i.image.manifest_digest == image.manifest_digest,
        "it describes manifest {}, not {}",
        i.image.manifest_digest,
        image.manifest_digest
    );
    ensure!(
        i.image.config_digest == image.config_digest,
        "its config {} is not the image's {}",
        i.image.config_digest,
        image.config_digest
    );
    ensure!(
        i.layers.len() == image.layers.len(),
        "it has {} layers, the image {}",
        i.layers.len(),
        image.layers.len()
    );
    for (k, (a, b)) in i.layers.iter().zip(&image.layers).enumerate() {
        ensure!(
            a.digest == b.digest && a.compressed_size == b.size,
            "its layer {k} is {} ({} bytes), the image's {} ({} bytes)",
            a.digest,
            a.compressed_size,
            b.digest,
            b.size
        );
    }
    Ok(())
}

fn blob_of(annotations: &BTreeMap<String, String>, digest: &str, size: &str, media_type: String) -> Option<Descriptor> {
    Some(Descriptor {
        media_type,
        digest: annotations.get(digest)?.clone(),
        size: annotations.get(size)?.parse().ok()?,
    })
}

/// The published index of `image`, if there is one. An error says why one
/// that exists cannot be used.
pub fn find(src: &RegistrySource, image: &ResolvedImage) -> Result<Option<Found>> {
    let (list, via) = src.referrers(&image.manifest_digest, ARTIFACT_TYPE)?;
    // The newest last (the tag scheme appends); RFC 3339 sorts as time.
    let Some(r) = list
        .iter()
        .max_by_key(|r| r.annotations.get("org.opencontainers.image.created").cloned())
    else {
        return Ok(None);
    };
    let format = r.annotations.get(FORMAT).map(String::as_str).unwrap_or("?");
    if format != clip_format::VERSION.to_string() {
        bail!(
            "artifact {} has index format {format}, this clip reads {}",
            r.digest,
            clip_format::VERSION
        );
    }
    let (index_desc, profile_desc, hints_desc) =
        match blob_of(&r.annotations, INDEX_DIGEST, INDEX_SIZE, index_media_type()) {
            Some(d) => (
                d,
                blob_of(&r.annotations, PROFILE_DIGEST, PROFILE_SIZE, PROFILE_MEDIA_TYPE.into()),
                blob_of(&r.annotations, HINTS_DIGEST, HINTS_SIZE, HINTS_MEDIA_TYPE.into()),
            ),
            // Listed without the shortcut: read the artifact's manifest.
            None => from_manifest(src, &r.digest)?,
        };
    let bytes = src
        .small_blob_checked(&index_desc, MAX_INDEX)
        .with_context(|| format!("artifact {}", r.digest))?;
    let index = IndexFile::decode(&bytes).with_context(|| format!("the index of artifact {}", r.digest))?;
    binds(&index, image).with_context(|| format!("artifact {} is for another image", r.digest))?;
    // A profile or hints that cannot be read cost speed, not correctness.
    let optional = |d: Option<Descriptor>, max, what| {
        d.and_then(|d| match src.small_blob_checked(&d, max) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(artifact = %r.digest, error = %crate::images::chain(&e), "ignoring the published {what}");
                None
            }
        })
    };
    let profile = optional(profile_desc, MAX_PROFILE, "profile");
    let hints = optional(hints_desc, MAX_HINTS, "hints");
    Ok(Some(Found {
        index,
        bytes,
        profile,
        hints,
        artifact: r.digest.clone(),
        via,
    }))
}

type Blobs = (Descriptor, Option<Descriptor>, Option<Descriptor>);

/// The index, profile and hints an artifact's manifest lists.
fn from_manifest(src: &RegistrySource, digest: &str) -> Result<Blobs> {
    let doc = src
        .manifest_if_any(digest, &["application/vnd.oci.image.manifest.v1+json"])?
        .with_context(|| format!("artifact {digest} is listed but missing"))?;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Layer {
        media_type: String,
        digest: String,
        size: u64,
    }
    #[derive(serde::Deserialize)]
    struct M {
        layers: Vec<Layer>,
    }
    let m: M = serde_json::from_slice(&doc).with_context(|| format!("artifact {digest}: malformed manifest"))?;
    let pick = |mt: &str| {
        m.layers.iter().find(|l| l.media_type == mt).map(|l| Descriptor {
            media_type: l.media_type.clone(),
            digest: l.digest.clone(),
            size: l.size,
        })
    };
    let index = pick(&index_media_type()).with_context(|| format!("artifact {digest} has no clip index"))?;
    Ok((index, pick(PROFILE_MEDIA_TYPE), pick(HINTS_MEDIA_TYPE)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_times_are_rfc3339() {
        let at = |s| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_444_496), "2026-11-23T14:34:56Z");
    }
}
