//! Artifacts attached to an image manifest (OCI 1.1's referrers model):
//! pushing blobs and manifests, and listing a manifest's referrers through
//! the referrers API or, where the registry lacks it (distribution 2.8),
//! through the referrers tag scheme: a `sha256-<hex>` tag that points at an
//! image index of referrers, kept by read-modify-write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::client::{status_error, HttpError, Req};
use crate::manifest::{MAX_DOC, OCI_INDEX, OCI_MANIFEST};
use crate::registry::RegistrySource;
use crate::{Descriptor, Error, Result};

/// The empty config of an artifact manifest (`{}`).
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// A descriptor as the referrers list carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Referrer {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// How a registry lists referrers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `GET /v2/NAME/referrers/DIGEST`.
    Api,
    /// The `sha256-<hex>` tag.
    Tag,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Via::Api => "the referrers API",
            Via::Tag => "the referrers tag scheme",
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexDoc {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Referrer>,
}

/// The referrers tag of `digest`: `<alg>-<hex>`, at most 128 characters.
pub fn referrers_tag(digest: &str) -> String {
    let t = digest.replacen(':', "-", 1);
    t.chars().take(128).collect()
}

impl RegistrySource {
    fn push_scope(&self) -> String {
        format!("repository:{}:pull,push", self.reference.repository())
    }

    async fn call(&self, req: Req, push: bool, op: &'static str) -> std::result::Result<reqwest::Response, HttpError> {
        let scope = if push { self.push_scope() } else { self.scope() };
        self.host.send(&req, &scope, &*self.creds, op).await
    }

    /// Uploads `bytes` as a blob (monolithic POST then PUT), unless the
    /// repository has it; returns its digest.
    pub fn push_blob(&self, bytes: &[u8]) -> Result<String> {
        let digest = crate::sha256_digest(bytes);
        let repo = self.reference.repository().to_string();
        let r: std::result::Result<(), HttpError> = self.registries.block_on(async {
            let mut head = Req::get(self.blob_path(&digest));
            head.method = reqwest::Method::HEAD;
            let resp = self.call(head, true, "blob check").await?;
            if resp.status().is_success() {
                return Ok(());
            }
            let mut post = Req::get(format!("/v2/{repo}/blobs/uploads/"));
            post.method = reqwest::Method::POST;
            let resp = self.call(post, true, "blob upload").await?;
            if resp.status().as_u16() != 202 {
                return Err(status_error(resp).await);
            }
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| HttpError::Protocol("blob upload without a Location".into()))?
                .to_string();
            // Location may be absolute; only its path and query are ours.
            let path = match location.find("://") {
                Some(i) => location[i + 3..]
                    .find('/')
                    .map_or("/".to_string(), |j| location[i + 3 + j..].to_string()),
                None => location,
            };
            let sep = if path.contains('?') { '&' } else { '?' };
            let mut put = Req::get(format!("{path}{sep}digest={digest}"));
            put.method = reqwest::Method::PUT;
            put.body = Some((bytes::Bytes::copy_from_slice(bytes), "application/octet-stream".into()));
            let resp = self.call(put, true, "blob upload").await?;
            if resp.status().as_u16() != 201 {
                return Err(status_error(resp).await);
            }
            Ok(())
        });
        r.map_err(self.err(format!("pushing blob {digest} to {repo}")))?;
        Ok(digest)
    }

    /// Puts a manifest at `target` (a tag or its digest). Returns its
    /// digest and whether the registry said it indexed its subject
    /// (`OCI-Subject`: it has the referrers API).
    pub fn put_manifest(&self, target: &str, bytes: &[u8], media_type: &str) -> Result<(String, bool)> {
        let digest = crate::sha256_digest(bytes);
        let r: std::result::Result<bool, HttpError> = self.registries.block_on(async {
            let mut put = Req::get(self.manifest_path(target));
            put.method = reqwest::Method::PUT;
            put.body = Some((bytes::Bytes::copy_from_slice(bytes), media_type.to_string()));
            let resp = self.call(put, true, "manifest upload").await?;
            if resp.status().as_u16() != 201 {
                return Err(status_error(resp).await);
            }
            Ok(resp.headers().contains_key("oci-subject"))
        });
        let subject = r.map_err(self.err(format!("pushing manifest {}:{target}", self.reference.repository())))?;
        Ok((digest, subject))
    }

    /// A manifest (or index) by tag or digest, if there is one; a digest
    /// is checked against the bytes.
    pub fn manifest_if_any(&self, target: &str, accept: &[&str]) -> Result<Option<Vec<u8>>> {
        let r: std::result::Result<Option<Vec<u8>>, HttpError> = self.registries.block_on(async {
            let mut req = Req::get(self.manifest_path(target));
            req.accept = Some(accept.join(", "));
            let resp = self.call(req, false, "manifest").await?;
            match resp.status().as_u16() {
                404 => Ok(None),
                200 => {
                    if resp.content_length().is_some_and(|l| l > MAX_DOC) {
                        return Err(HttpError::Protocol("manifest is implausibly large".into()));
                    }
                    let body = resp.bytes().await.map_err(HttpError::Body)?;
                    if body.len() as u64 > MAX_DOC {
                        return Err(HttpError::Protocol("manifest is implausibly large".into()));
                    }
                    Ok(Some(body.to_vec()))
                }
                _ => Err(status_error(resp).await),
            }
        });
        let got = r.map_err(self.err(format!("manifest {}:{target}", self.reference.repository())))?;
        if let (Some(b), true) = (&got, target.starts_with("sha256:")) {
            crate::verify_digest("manifest", target, b)?;
        }
        Ok(got)
    }

    /// A whole blob of at most `max` bytes, checked against its digest.
    pub fn small_blob_checked(&self, desc: &Descriptor, max: u64) -> Result<Vec<u8>> {
        crate::digest_hex(&desc.digest)?;
        if desc.size > max {
            return Err(Error::Manifest {
                digest: desc.digest.clone(),
                msg: format!("blob of {} bytes is larger than the {max} allowed", desc.size),
            });
        }
        let bytes = crate::ImageSource::read_range(self, desc, 0, desc.size)?;
        crate::verify_digest("blob", &desc.digest, &bytes)?;
        Ok(bytes)
    }

    /// The referrers of manifest `subject`, those of `artifact_type` only,
    /// and how the registry lists them.
    pub fn referrers(&self, subject: &str, artifact_type: &str) -> Result<(Vec<Referrer>, Via)> {
        crate::digest_hex(subject)?;
        let path = format!("/v2/{}/referrers/{subject}", self.reference.repository());
        let r: std::result::Result<Option<Vec<u8>>, HttpError> = self.registries.block_on(async {
            let mut req = Req::get(path);
            req.accept = Some(OCI_INDEX.into());
            let resp = self.call(req, false, "referrers").await?;
            match resp.status().as_u16() {
                // A registry with the API never answers 404 (spec); one
                // without it does, for an unknown route.
                404 => Ok(None),
                200 => Ok(Some(resp.bytes().await.map_err(HttpError::Body)?.to_vec())),
                _ => Err(status_error(resp).await),
            }
        });
        let api = r.map_err(self.err(format!("referrers of {subject}")))?;
        let (doc, via) = match api {
            Some(b) => (b, Via::Api),
            None => match self.manifest_if_any(&referrers_tag(subject), &[OCI_INDEX])? {
                Some(b) => (b, Via::Tag),
                None => return Ok((Vec::new(), Via::Tag)),
            },
        };
        let index: IndexDoc = serde_json::from_slice(&doc).map_err(|e| Error::Manifest {
            digest: format!("referrers of {subject}"),
            msg: e.to_string(),
        })?;
        let list = index
            .manifests
            .into_iter()
            .filter(|r| r.artifact_type.as_deref() == Some(artifact_type))
            .collect();
        Ok((list, via))
    }

    /// Pushes artifact manifest `bytes` (whose `subject` is `subject`) and
    /// makes it a listed referrer: by the registry itself when it has the
    /// referrers API, else by adding it to the referrers tag's index, where
    /// the entries `replaces` accepts are dropped (older versions).
    pub fn push_referrer(
        &self,
        subject: &str,
        bytes: &[u8],
        entry: Referrer,
        replaces: &dyn Fn(&Referrer) -> bool,
    ) -> Result<(String, Via)> {
        let (digest, indexed) = self.put_manifest(&crate::sha256_digest(bytes), bytes, OCI_MANIFEST)?;
        if indexed {
            return Ok((digest, Via::Api));
        }
        let tag = referrers_tag(subject);
        let mut index: IndexDoc = match self.manifest_if_any(&tag, &[OCI_INDEX])? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| Error::Manifest {
                digest: format!("referrers tag {tag}"),
                msg: e.to_string(),
            })?,
            None => IndexDoc::default(),
        };
        index.schema_version = 2;
        index.media_type = Some(OCI_INDEX.into());
        index.manifests.retain(|r| r.digest != digest && !replaces(r));
        index.manifests.push(Referrer {
            digest: digest.clone(),
            ..entry
        });
        let doc = serde_json::to_vec(&index).map_err(|e| Error::Manifest {
            digest: format!("referrers tag {tag}"),
            msg: e.to_string(),
        })?;
        self.put_manifest(&tag, &doc, OCI_INDEX)?;
        Ok((digest, Via::Tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};

    /// A registry that speaks the referrers API, as recorded exchanges:
    /// each request is matched by method and path prefix and answered with
    /// its canned response; every request line is kept.
    struct Recorded {
        port: u16,
        seen: Arc<Mutex<Vec<String>>>,
    }

    type Exchange = (&'static str, String, u16, Vec<(&'static str, String)>, Vec<u8>);

    impl Recorded {
        fn start(exchanges: Vec<Exchange>) -> Self {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = seen.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { return };
                    let (exchanges, log) = (exchanges.clone(), log.clone());
                    std::thread::spawn(move || {
                        let mut r = BufReader::new(conn.try_clone().unwrap());
                        let mut w = conn;
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let mut len = 0usize;
                            loop {
                                let mut h = String::new();
                                r.read_line(&mut h).unwrap();
                                if h.trim().is_empty() {
                                    break;
                                }
                                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                                    len = v.trim().parse().unwrap();
                                }
                            }
                            let mut body = vec![0; len];
                            r.read_exact(&mut body).unwrap();
                            let mut parts = line.split_whitespace();
                            let (method, path) = (parts.next().unwrap().to_string(), parts.next().unwrap().to_string());
                            log.lock().unwrap().push(format!("{method} {path}"));
                            let found = exchanges
                                .iter()
                                .find(|(m, p, ..)| *m == method && path.starts_with(p.as_str()));
                            let (status, headers, body) = match found {
                                Some((_, _, s, h, b)) => (*s, h.clone(), b.clone()),
                                None => (404, vec![], br#"{"errors":[{"code":"NOT_FOUND"}]}"#.to_vec()),
                            };
                            let mut resp = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                            for (k, v) in headers {
                                resp.push_str(&format!("{k}: {v}\r\n"));
                            }
                            resp.push_str("\r\n");
                            w.write_all(resp.as_bytes()).unwrap();
                            if method != "HEAD" {
                                w.write_all(&body).unwrap();
                            }
                        }
                    });
                }
            });
            Self { port, seen }
        }

        fn source(&self) -> RegistrySource {
            let reference = crate::reference::parse(&format!("127.0.0.1:{}/r/app:latest", self.port)).unwrap();
            let registries = crate::Registries::new(crate::RegistryOptions::default()).unwrap();
            RegistrySource::new(registries, reference, Arc::new(crate::auth::Anonymous)).unwrap()
        }
    }

    #[test]
    fn a_registry_with_the_referrers_api_lists_and_indexes_referrers_itself() {
        let subject = format!("sha256:{}", "a".repeat(64));
        let listed = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", "b".repeat(64)), "size": 10,
                 "artifactType": "application/vnd.clip.index", "annotations": {"k": "v"}},
                {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", "c".repeat(64)), "size": 11,
                 "artifactType": "application/vnd.example.sbom"},
            ]
        });
        let reg = Recorded::start(vec![
            (
                "GET",
                format!("/v2/r/app/referrers/{subject}"),
                200,
                vec![("Content-Type", OCI_INDEX.into())],
                serde_json::to_vec(&listed).unwrap(),
            ),
            (
                "PUT",
                "/v2/r/app/manifests/sha256:".into(),
                201,
                vec![("OCI-Subject", subject.clone())],
                vec![],
            ),
        ]);
        let src = reg.source();
        let (list, via) = src.referrers(&subject, "application/vnd.clip.index").unwrap();
        assert_eq!(via, Via::Api);
        assert_eq!(list.len(), 1, "filtered by artifact type");
        assert_eq!(list[0].annotations["k"], "v");
        let entry = Referrer {
            media_type: OCI_MANIFEST.into(),
            digest: String::new(),
            size: 3,
            artifact_type: Some("application/vnd.clip.index".into()),
            annotations: BTreeMap::new(),
        };
        let (digest, via) = src.push_referrer(&subject, b"{}\n", entry, &|_| true).unwrap();
        assert_eq!(via, Via::Api);
        assert_eq!(digest, crate::sha256_digest(b"{}\n"));
        let seen = reg.seen.lock().unwrap().clone();
        assert!(
            !seen.iter().any(|l| l.contains("sha256-")),
            "the referrers tag is left alone: {seen:?}"
        );
        assert_eq!(seen.last().unwrap(), &format!("PUT /v2/r/app/manifests/{digest}"));
    }

    #[test]
    fn without_the_api_referrers_come_from_the_tag() {
        let subject = format!("sha256:{}", "d".repeat(64));
        let reg = Recorded::start(vec![("PUT", "/v2/r/app/manifests/".into(), 201, vec![], vec![])]);
        let src = reg.source();
        let (list, via) = src.referrers(&subject, "x").unwrap();
        assert_eq!((list.len(), via), (0, Via::Tag));
        let entry = Referrer {
            media_type: OCI_MANIFEST.into(),
            digest: String::new(),
            size: 2,
            artifact_type: Some("x".into()),
            annotations: BTreeMap::new(),
        };
        let (_, via) = src.push_referrer(&subject, b"{}", entry, &|_| true).unwrap();
        assert_eq!(via, Via::Tag);
        let seen = reg.seen.lock().unwrap().clone();
        assert!(
            seen.contains(&format!("PUT /v2/r/app/manifests/{}", referrers_tag(&subject))),
            "{seen:?}"
        );
    }

    #[test]
    fn the_referrers_tag_names_the_digest() {
        assert_eq!(referrers_tag("sha256:abc"), "sha256-abc");
        let long = format!("sha512:{}", "a".repeat(128));
        assert_eq!(referrers_tag(&long).len(), 128);
    }
}
