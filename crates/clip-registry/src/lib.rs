//! Where images come from: image references, manifests and blobs, from an
//! OCI registry (the distribution protocol over `reqwest`, with Docker
//! config credentials, helpers and the token flow) or from a local OCI
//! image layout (`oci:DIR[:TAG]`).
//!
//! Everything a caller needs goes through [`ImageSource`]: resolve a
//! reference to one platform's manifest and config, stream a blob from its
//! start, or read a byte range of it.

pub mod auth;
mod client;
mod layout;
mod manifest;
mod reference;
pub mod referrers;
mod registry;
mod tls;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

pub use auth::{Credential, CredentialSource};
pub use client::{is_loopback, HttpError, Registries, RegistryOptions};
pub use layout::LayoutSource;
pub use manifest::{Platform, ResolvedImage};
pub use oci_spec::distribution::Reference;
pub use registry::RegistrySource;
pub use tls::warm as warm_tls_roots;

/// A blob the image refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {msg}")]
    Reference { reference: String, msg: String },
    #[error("{registry} has no {repository}:{tag} (HTTP 404): check the repository name and tag")]
    NoSuchImage {
        registry: String,
        repository: String,
        tag: String,
    },
    #[error("invalid platform {0:?}: expected os/arch[/variant]")]
    Platform(String),
    #[error("malformed manifest {digest}: {msg}")]
    Manifest { digest: String, msg: String },
    #[error("unsupported manifest media type {0:?}")]
    ManifestType(String),
    #[error("image index {digest} has no manifest for {platform} (it has {available})")]
    NoPlatform {
        digest: String,
        platform: String,
        available: String,
    },
    #[error("{what} {expected}: content has digest {actual}")]
    DigestMismatch {
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("blob {digest} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch { digest: String, expected: u64, actual: u64 },
    #[error("bytes {offset}+{len} are outside blob {digest} ({size} bytes)")]
    Range {
        digest: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("unsupported or malformed digest {0:?}")]
    BadDigest(String),
    #[error("OCI layout {dir}: {msg}")]
    Layout { dir: PathBuf, msg: String },
    #[error("registry {registry}: {what}")]
    Registry {
        registry: String,
        what: String,
        #[source]
        source: HttpError,
    },
    #[error("reading {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The registry failure underneath, if any.
    pub fn http(&self) -> Option<&HttpError> {
        match self {
            Error::Registry { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The registry answered a range request with the whole blob.
    pub fn is_range_ignored(&self) -> bool {
        matches!(self.http(), Some(HttpError::RangeIgnored { .. }))
    }

    /// Worth another attempt later (the source already retried).
    pub fn is_transient(&self) -> bool {
        self.http().is_some_and(HttpError::is_transient)
    }
}

/// Recovers a registry error that went through `io::Error` (the `Read` of
/// a blob stream).
pub fn from_io(e: std::io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        *e.into_inner()
            .expect("checked above")
            .downcast::<Error>()
            .expect("checked above")
    } else {
        Error::Io {
            what: "a blob stream".into(),
            source: e,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `host[:port]/repo[:tag][@digest]`, or Docker Hub shorthand.
    Registry(Reference),
    /// `oci:DIR[:TAG]`, the convention of skopeo, umoci and buildah.
    Layout { dir: PathBuf, tag: Option<String> },
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // As containers/image does: the first ':' separates the tag.
            let (dir, tag) = match rest.split_once(':') {
                Some((d, t)) if !t.is_empty() => (d, Some(t.to_string())),
                Some((d, _)) => (d, None),
                None => (rest, None),
            };
            if dir.is_empty() {
                return Err(Error::Reference {
                    reference: s.into(),
                    msg: "no directory".into(),
                });
            }
            // Absolute, so that an index names its source wherever it is read.
            let dir = std::path::absolute(dir).unwrap_or_else(|_| PathBuf::from(dir));
            return Ok(ImageRef::Layout { dir, tag });
        }
        let r = reference::parse(s).map_err(|e| Error::Reference {
            reference: s.into(),
            msg: e.to_string(),
        })?;
        Ok(ImageRef::Registry(r))
    }

    /// Where the image's blobs come from, without tag or digest: the
    /// registry and repository, or the layout directory. Indexes stored per
    /// image are keyed by this and the manifest digest, since an index
    /// fetches from the place it names.
    pub fn source(&self) -> String {
        match self {
            ImageRef::Registry(r) => format!("{}/{}", r.registry(), r.repository()),
            ImageRef::Layout { dir, .. } => format!("oci:{}", dir.display()),
        }
    }

    /// The canonical spelling, e.g. `docker.io/library/alpine:latest`.
    pub fn canonical(&self) -> String {
        match self {
            ImageRef::Registry(r) => r.whole(),
            ImageRef::Layout { dir, tag } => match tag {
                Some(t) => format!("oci:{}:{t}", dir.display()),
                None => format!("oci:{}", dir.display()),
            },
        }
    }
}

/// Reads an image's manifests and blobs. Implementations retry transient
/// failures themselves; an error they return is final.
pub trait ImageSource: Send + Sync {
    /// Resolves the reference to one platform's image manifest and config.
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage>;
    /// Only the digest of the platform's image manifest (fewer requests).
    fn resolve_digest(&self, platform: &Platform) -> Result<String> {
        self.resolve(platform).map(|r| r.manifest_digest)
    }
    /// Streams a blob from its start. The reader does not check the digest;
    /// callers that read it to the end do.
    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        self.open_range(desc, 0, None)
    }
    /// Streams `len` bytes of a blob (to its end if None) from `offset`.
    /// A registry that ignores Range for an `offset` past 0 is an error
    /// ([`HttpError::RangeIgnored`]), never a silent read of the blob's
    /// start.
    fn open_range(&self, desc: &Descriptor, offset: u64, len: Option<u64>) -> Result<Box<dyn Read + Send>>;
    /// Reads `len` bytes of a blob starting at `offset`.
    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// Where the blobs come from, for logs: `registry/repository` or the
    /// layout directory.
    fn describe(&self) -> String;
    /// The registry behind this source, for what only registries do
    /// (artifacts attached to a manifest).
    fn registry(&self) -> Option<&RegistrySource> {
        None
    }
}

/// Opens the source a reference names: a registry through the shared
/// clients of `registries`, with `creds`; a layout directly.
pub fn open(
    reference: &ImageRef,
    registries: &Arc<Registries>,
    creds: Arc<dyn CredentialSource>,
) -> Result<Box<dyn ImageSource>> {
    Ok(match reference {
        ImageRef::Registry(r) => Box::new(RegistrySource::new(registries.clone(), r.clone(), creds)?),
        ImageRef::Layout { dir, tag } => Box::new(LayoutSource::new(dir.clone(), tag.clone())),
    })
}

/// `sha256:<64 hex>` → the hex part; anything else is refused, so a digest
/// from a hostile manifest can never become a path or URL of its choosing.
pub fn digest_hex(digest: &str) -> Result<&str> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(Error::BadDigest(digest.to_string())),
    }
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Fails unless `bytes` have the digest `expected`.
pub fn verify_digest(what: &'static str, expected: &str, bytes: &[u8]) -> Result<()> {
    digest_hex(expected)?;
    let actual = sha256_digest(bytes);
    if actual != expected {
        return Err(Error::DigestMismatch {
            what,
            expected: expected.into(),
            actual,
        });
    }
    Ok(())
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), as OCI's
/// `created` fields and annotations write times.
pub fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86400, secs % 86400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = ImageRef::parse("alpine").unwrap();
        assert_eq!(r.canonical(), "docker.io/library/alpine:latest");
        let r = ImageRef::parse("127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(r.canonical(), "127.0.0.1:5000/a/b:v1");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("localhost:5000/x@{d}")).unwrap();
        assert_eq!(r.canonical(), format!("localhost:5000/x@{d}"));
        assert_eq!(
            ImageRef::parse("oci:/tmp/img:v2").unwrap(),
            ImageRef::Layout {
                dir: "/tmp/img".into(),
                tag: Some("v2".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:rel").unwrap(),
            ImageRef::Layout {
                dir: std::env::current_dir().unwrap().join("rel"),
                tag: None
            }
        );
        assert!(ImageRef::parse("oci:").is_err());
        assert!(ImageRef::parse("has spaces/x").is_err());
        assert!(ImageRef::parse("").is_err());
    }

    #[test]
    fn digests() {
        let d = sha256_digest(b"x");
        assert!(digest_hex(&d).is_ok());
        assert!(verify_digest("blob", &d, b"x").is_ok());
        assert!(matches!(
            verify_digest("blob", &d, b"y"),
            Err(Error::DigestMismatch { .. })
        ));
        assert!(digest_hex("sha256:../../etc/passwd").is_err());
        assert!(digest_hex("md5:abc").is_err());
    }
}
