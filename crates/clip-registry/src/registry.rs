//! One image repository of a registry, behind the blocking [`ImageSource`]
//! interface (the indexer and the FUSE threads are plain threads).

use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use clip_metrics::defs;
use futures_util::StreamExt;
use oci_spec::distribution::Reference;

use crate::auth::CredentialSource;
use crate::client::{status_error, Host, HttpError, Registries, Req};
use crate::manifest::{self, Fetched, Fetcher, ACCEPT, MAX_DOC};
use crate::{Descriptor, Error, ImageSource, Platform, ResolvedImage, Result};

pub struct RegistrySource {
    pub(crate) registries: Arc<Registries>,
    pub(crate) host: Arc<Host>,
    pub(crate) reference: Reference,
    pub(crate) creds: Arc<dyn CredentialSource>,
}

impl std::fmt::Debug for RegistrySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistrySource({})", self.reference)
    }
}

impl RegistrySource {
    pub fn new(registries: Arc<Registries>, reference: Reference, creds: Arc<dyn CredentialSource>) -> Result<Self> {
        let host = registries
            .host(reference.registry())
            .map_err(|source| Error::Registry {
                registry: reference.registry().to_string(),
                what: "setting up the client".into(),
                source,
            })?;
        Ok(Self {
            registries,
            host,
            reference,
            creds,
        })
    }

    pub(crate) fn err(&self, what: impl Into<String>) -> impl FnOnce(HttpError) -> Error + '_ {
        let what = what.into();
        move |source| Error::Registry {
            registry: self.host.name.clone(),
            what,
            source,
        }
    }

    pub(crate) fn scope(&self) -> String {
        format!("repository:{}:pull", self.reference.repository())
    }

    pub(crate) fn manifest_path(&self, r: &str) -> String {
        format!("/v2/{}/manifests/{r}", self.reference.repository())
    }

    pub(crate) fn blob_path(&self, digest: &str) -> String {
        format!("/v2/{}/blobs/{digest}", self.reference.repository())
    }

    /// The tag or digest the reference names.
    fn target(&self) -> String {
        self.reference
            .digest()
            .or(self.reference.tag())
            .unwrap_or("latest")
            .to_string()
    }

    async fn get_manifest(&self, r: &str) -> std::result::Result<(Vec<u8>, Option<String>), HttpError> {
        let mut req = Req::get(self.manifest_path(r));
        req.accept = Some(ACCEPT.join(", "));
        self.host
            .retrying("manifest", || async {
                let resp = self
                    .host
                    .send_once(&req, &self.scope(), &*self.creds, "manifest")
                    .await?;
                if !resp.status().is_success() {
                    return Err(status_error(resp).await);
                }
                let media_type = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
                if resp.content_length().is_some_and(|l| l > MAX_DOC) {
                    return Err(HttpError::Protocol("manifest is implausibly large".into()));
                }
                let mut body = Vec::new();
                let mut stream = resp.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    body.extend_from_slice(&chunk.map_err(HttpError::Body)?);
                    if body.len() as u64 > MAX_DOC {
                        return Err(HttpError::Protocol("manifest is implausibly large".into()));
                    }
                }
                Ok((body, media_type))
            })
            .await
    }

    fn fetch_manifest(&self, r: &str) -> Result<Fetched> {
        let (bytes, media_type) = match self.registries.block_on(self.get_manifest(r)) {
            Ok(got) => got,
            // The usual cause is a typo in the name or tag: say so, once.
            Err(HttpError::NotFound(_)) => {
                return Err(Error::NoSuchImage {
                    registry: self.host.name.clone(),
                    repository: self.reference.repository().to_string(),
                    tag: r.to_string(),
                })
            }
            Err(e) => return Err(self.err(format!("manifest {}:{r}", self.reference.repository()))(e)),
        };
        let digest = crate::sha256_digest(&bytes);
        if r.starts_with("sha256:") {
            crate::verify_digest("manifest", r, &bytes)?;
        }
        Ok(Fetched {
            bytes,
            media_type,
            digest,
        })
    }

    /// A range GET, retried as a whole (a connection that drops mid-body
    /// too), each attempt recorded in the metrics.
    async fn range(&self, desc: &Descriptor, offset: u64, len: u64) -> std::result::Result<Vec<u8>, HttpError> {
        let meter = RangeMeter::new(desc);
        self.host
            .retrying("blob range", || async {
                let started = std::time::Instant::now();
                let mut received = 0u64;
                let result = self.range_attempt(desc, offset, len, &mut received).await;
                let status = match &result {
                    Ok(_) => "206".to_string(),
                    Err(e) => status_label(e),
                };
                meter.record(&status, received, started);
                result
            })
            .await
    }

    async fn range_attempt(
        &self,
        desc: &Descriptor,
        offset: u64,
        len: u64,
        received: &mut u64,
    ) -> std::result::Result<Vec<u8>, HttpError> {
        let mut req = Req::get(self.blob_path(&desc.digest));
        req.range = Some((offset, Some(len)));
        let resp = self
            .host
            .send_once(&req, &self.scope(), &*self.creds, "blob range")
            .await?;
        match resp.status().as_u16() {
            206 => {}
            // The whole blob from its start: take what was asked for if it
            // is the start, and never read a layer whole per span.
            200 if offset == 0 => {}
            200 => {
                self.host.note_range_ignored();
                return Err(HttpError::RangeIgnored { offset, len });
            }
            _ => return Err(status_error(resp).await),
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(HttpError::Body)?;
            *received += chunk.len() as u64;
            let take = (len as usize - out.len()).min(chunk.len());
            out.extend_from_slice(&chunk[..take]);
            if out.len() as u64 == len {
                // Dropping the response closes the connection if more
                // was coming.
                break;
            }
        }
        if (out.len() as u64) < len {
            return Err(HttpError::ShortBody {
                got: out.len() as u64,
                want: len,
            });
        }
        Ok(out)
    }

    /// Starts a blob stream: the response, and the bytes to skip when the
    /// registry sent the blob from its start (allowed only for streams of
    /// the whole blob: a range that starts later is never read that way).
    async fn stream_from(
        host: &Host,
        req: &Req,
        scope: &str,
        creds: &dyn CredentialSource,
        offset: u64,
        whole: bool,
    ) -> std::result::Result<(reqwest::Response, u64), HttpError> {
        let resp = host.send(req, scope, creds, "blob stream").await?;
        match resp.status().as_u16() {
            206 => Ok((resp, 0)),
            200 if offset == 0 || whole => Ok((resp, offset)),
            200 => {
                host.note_range_ignored();
                Err(HttpError::RangeIgnored {
                    offset,
                    len: req.range.and_then(|r| r.1).unwrap_or(0),
                })
            }
            _ => Err(status_error(resp).await),
        }
    }
}

impl Fetcher for RegistrySource {
    fn top(&self) -> Result<Fetched> {
        self.fetch_manifest(&self.target())
    }

    fn manifest(&self, desc: &Descriptor) -> Result<Fetched> {
        let mut f = self.fetch_manifest(&desc.digest)?;
        f.media_type = Some(desc.media_type.clone());
        Ok(f)
    }

    fn small_blob(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        self.read_range(desc, 0, desc.size)
    }
}

/// A range request's metrics. Label values stay bounded: a short digest,
/// and latency per layer only when asked (CLIP_METRICS_PER_LAYER=1). A
/// config or artifact blob is not a layer: `kind` says which, and only
/// layers have a `layer` value (an empty value is no label to Prometheus;
/// one label set per family).
struct RangeMeter {
    kind: &'static str,
    short: String,
}

impl RangeMeter {
    fn new(desc: &Descriptor) -> Self {
        let kind = blob_kind(&desc.media_type);
        let hex = desc.digest.trim_start_matches("sha256:");
        let short = if kind == "layer" {
            format!("sha256:{}", &hex[..hex.len().min(12)])
        } else {
            String::new()
        };
        Self { kind, short }
    }

    /// One request: its status, the body bytes it brought, its latency.
    fn record(&self, status: &str, received: u64, started: std::time::Instant) {
        let labels = [("kind", self.kind), ("status", status), ("layer", self.short.as_str())];
        defs::RANGE_GET_REQUESTS.with(&labels).inc();
        defs::RANGE_GET_BYTES.with(&labels).inc_by(received);
        let per_layer = std::env::var("CLIP_METRICS_PER_LAYER").is_ok_and(|v| v == "1");
        defs::RANGE_GET_SECONDS
            .with(if per_layer { &labels[..] } else { &labels[..2] })
            .observe_duration(started.elapsed());
    }
}

fn status_label(e: &HttpError) -> String {
    e.status().map_or_else(|| "error".to_string(), |c| c.to_string())
}

/// What a blob is, for metrics: `layer`, `config`, or `other` (artifacts).
fn blob_kind(media_type: &str) -> &'static str {
    if media_type.contains("layer") || media_type.contains("rootfs.diff") {
        "layer"
    } else if media_type.contains("config") {
        "config"
    } else {
        "other"
    }
}

impl ImageSource for RegistrySource {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage> {
        manifest::resolve(self, platform)
    }

    fn resolve_digest(&self, platform: &Platform) -> Result<String> {
        manifest::resolve_digest(self, platform)
    }

    fn open_range(&self, desc: &Descriptor, offset: u64, len: Option<u64>) -> Result<Box<dyn Read + Send>> {
        crate::digest_hex(&desc.digest)?;
        let end = len.map_or(Some(desc.size), |l| offset.checked_add(l));
        let Some(end) = end.filter(|&e| e <= desc.size && offset <= e) else {
            return Err(Error::Range {
                digest: desc.digest.clone(),
                offset,
                len: len.unwrap_or(0),
                size: desc.size,
            });
        };
        let ranged = offset > 0 || end < desc.size;
        let task = BlobStream {
            host: self.host.clone(),
            req: Req::get(self.blob_path(&desc.digest)),
            scope: self.scope(),
            creds: self.creds.clone(),
            digest: desc.digest.clone(),
            whole: offset == 0 && end == desc.size,
            end,
            // A part of a blob is a range GET (a whole one, a download).
            meter: ranged.then(|| RangeMeter::new(desc)),
        };
        let mut req = task.req.clone();
        if ranged {
            req.range = Some((offset, Some(end - offset)));
        }
        let started = std::time::Instant::now();
        let (resp, skip) = self
            .registries
            .block_on(Self::stream_from(
                &self.host,
                &req,
                &task.scope,
                &*self.creds,
                offset,
                task.whole,
            ))
            .inspect_err(|e| {
                if let Some(m) = &task.meter {
                    m.record(&status_label(e), 0, started);
                }
            })
            .map_err(self.err(format!("blob {} from byte {offset}", desc.digest)))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        self.registries
            .handle()
            .spawn(task.run(resp, offset, skip, started, tx));
        Ok(Box::new(ChannelReader { rx, cur: Bytes::new() }))
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.reference.registry(), self.reference.repository())
    }

    fn registry(&self) -> Option<&RegistrySource> {
        Some(self)
    }

    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>> {
        crate::digest_hex(&desc.digest)?;
        if offset.checked_add(len).is_none_or(|end| end > desc.size) {
            return Err(Error::Range {
                digest: desc.digest.clone(),
                offset,
                len,
                size: desc.size,
            });
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        self.registries
            .block_on(self.range(desc, offset, len))
            .map_err(self.err(format!("blob {} bytes {offset}+{len}", desc.digest)))
    }
}

/// Streams a blob (or a range of it) into a channel, resuming with a Range
/// request where a connection broke.
struct BlobStream {
    host: Arc<Host>,
    req: Req,
    scope: String,
    creds: Arc<dyn CredentialSource>,
    digest: String,
    /// The stream is the whole blob: a registry that answers a resume with
    /// the blob from its start may be read past what was already seen.
    whole: bool,
    end: u64,
    /// Range GET metrics, for a part of a blob.
    meter: Option<RangeMeter>,
}

impl BlobStream {
    fn record(&self, status: &str, received: u64, started: std::time::Instant) {
        if let Some(m) = &self.meter {
            m.record(status, received, started);
        }
    }

    fn fail(&self, what: String, source: HttpError) -> io::Error {
        io::Error::other(Error::Registry {
            registry: self.host.name.clone(),
            what,
            source,
        })
    }

    async fn run(
        self,
        first: reqwest::Response,
        mut offset: u64,
        first_skip: u64,
        first_started: std::time::Instant,
        tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    ) {
        let opts = self.host.options().clone();
        let mut attempt = 0u32;
        let mut current = Some((first, first_skip));
        let mut started = first_started;
        loop {
            let failure = match current.take() {
                Some((resp, mut skip)) => {
                    let status = resp.status().as_u16().to_string();
                    // Recorded when this response ends, however it ends.
                    struct Done<'a>(&'a BlobStream, String, u64, std::time::Instant);
                    impl Drop for Done<'_> {
                        fn drop(&mut self) {
                            self.0.record(&self.1, self.2, self.3);
                        }
                    }
                    let mut done = Done(&self, status, 0, started);
                    let mut stream = resp.bytes_stream();
                    let mut broke = None;
                    while let Some(chunk) = stream.next().await {
                        match chunk {
                            Ok(mut b) => {
                                done.2 += b.len() as u64;
                                let s = skip.min(b.len() as u64) as usize;
                                skip -= s as u64;
                                let _ = b.split_to(s);
                                b.truncate(b.len().min((self.end - offset) as usize));
                                if b.is_empty() {
                                    if offset >= self.end {
                                        break;
                                    }
                                    continue;
                                }
                                offset += b.len() as u64;
                                attempt = 0;
                                if tx.send(Ok(b)).await.is_err() {
                                    return; // the reader is gone
                                }
                                if offset >= self.end {
                                    break;
                                }
                            }
                            Err(e) => {
                                broke = Some(HttpError::Body(e));
                                break;
                            }
                        }
                    }
                    match broke {
                        None if offset >= self.end => return,
                        None => HttpError::Protocol(format!("stream ended at byte {offset} of {}", self.end)),
                        Some(e) => e,
                    }
                }
                None => {
                    let mut req = self.req.clone();
                    req.range = Some((offset, Some(self.end - offset)));
                    started = std::time::Instant::now();
                    match RegistrySource::stream_from(&self.host, &req, &self.scope, &*self.creds, offset, self.whole)
                        .await
                    {
                        Ok(r) => {
                            current = Some(r);
                            continue;
                        }
                        Err(e) if e.is_transient() => {
                            self.record(&status_label(&e), 0, started);
                            e
                        }
                        Err(e) => {
                            self.record(&status_label(&e), 0, started);
                            let _ = tx.send(Err(self.fail(format!("blob {}", self.digest), e))).await;
                            return;
                        }
                    }
                }
            };
            attempt += 1;
            if attempt > opts.retries {
                let what = format!(
                    "blob {} (gave up after {} attempts to resume at byte {offset})",
                    self.digest, opts.retries
                );
                let _ = tx.send(Err(self.fail(what, failure))).await;
                return;
            }
            tracing::info!(digest = %self.digest, offset, attempt, error = %failure, "resuming blob stream");
            defs::REGISTRY_RETRIES.with(&[("op", "blob stream")]).inc();
            tokio::time::sleep(opts.backoff * 2u32.pow(attempt - 1)).await;
        }
    }
}

struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = self.cur.len().min(buf.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}
