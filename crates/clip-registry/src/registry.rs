//! An OCI distribution registry, through `oci-client`, behind a blocking
//! interface (the indexer runs one plain thread per layer).

use std::io::{self, Read};
use std::time::Duration;

use bytes::Bytes;
use clip_metrics::defs;
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::manifest::{self, Fetched, Fetcher, ACCEPT};
use crate::{Descriptor, Error, ImageSource, Platform, ResolvedImage, Result};

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) reached over plain HTTP besides loopback
    /// ones: `CLIP_INSECURE_REGISTRIES`, comma-separated.
    pub insecure: Vec<String>,
    /// Attempts after the first for a failed request or a broken stream.
    pub retries: u32,
    /// Backoff before the first retry; doubles each time.
    pub backoff: Duration,
    pub connect_timeout: Duration,
    /// The longest a read may wait for the next bytes.
    pub read_timeout: Duration,
    /// The longest a request may take, retries included; None for no bound
    /// beyond the retry count (indexing streams whole layers).
    pub deadline: Option<Duration>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            retries: 5,
            backoff: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            deadline: None,
        }
    }
}

impl RegistryOptions {
    pub fn from_env() -> Self {
        let insecure = std::env::var("CLIP_INSECURE_REGISTRIES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        Self {
            insecure,
            ..Self::default()
        }
    }
}

/// Loopback registries are plain HTTP, as with Docker and containerd.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost" || host == "::1" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// Credentials for `registry` from the Docker config (`$DOCKER_CONFIG` or
/// `~/.docker/config.json`, credential helpers included). Never logged.
fn credentials(registry: &str) -> RegistryAuth {
    let keys: &[&str] = if matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io") {
        &["https://index.docker.io/v1/", "index.docker.io", "docker.io"]
    } else {
        &[registry]
    };
    for key in keys {
        match docker_credential::get_credential(key) {
            Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => return RegistryAuth::Basic(u, p),
            Ok(docker_credential::DockerCredential::IdentityToken(_)) => {
                tracing::warn!(
                    registry,
                    "identity-token credentials are not supported; trying anonymous access"
                );
            }
            Err(_) => {}
        }
    }
    RegistryAuth::Anonymous
}

/// An error with its causes, for messages (reqwest hides the cause, such as
/// "connection refused", in its source chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The HTTP status of a failed request, when one arrived.
fn http_status(e: &OciDistributionError) -> Option<u16> {
    match e {
        OciDistributionError::ServerError { code, .. } => Some(*code),
        OciDistributionError::RequestError(e) => e.status().map(|s| s.as_u16()),
        _ => None,
    }
}

fn transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(e) => e.status().is_none_or(|s| s.is_server_error() || s.as_u16() == 429),
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429 || *code == 408,
        OciDistributionError::IoError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => {
            format!("{envelope:?}").to_ascii_uppercase().contains("TOOMANYREQUESTS")
        }
        _ => false,
    }
}

pub struct RegistrySource {
    rt: tokio::runtime::Runtime,
    client: Client,
    reference: Reference,
    opts: RegistryOptions,
}

impl RegistrySource {
    pub fn new(reference: Reference, opts: &RegistryOptions) -> Result<Self> {
        // rustls needs a process-wide crypto provider; ring is the lean one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let registry = reference.resolve_registry().to_string();
        let mut plain: Vec<String> = opts.insecure.clone();
        if is_loopback(&registry) {
            plain.push(registry.clone());
        }
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            connect_timeout: Some(opts.connect_timeout),
            read_timeout: Some(opts.read_timeout),
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("clip-registry")
            .enable_all()
            .build()?;
        let client = Client::new(config);
        let auth = credentials(&registry);
        rt.block_on(client.store_auth_if_needed(&registry, &auth));
        Ok(Self {
            rt,
            client,
            reference,
            opts: opts.clone(),
        })
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Registry {
            registry: self.reference.registry().to_string(),
            msg: msg.to_string(),
        }
    }

    /// Runs `op` with retries on transient failures.
    fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, OciDistributionError>>,
    {
        let mut attempt = 0;
        let started = std::time::Instant::now();
        let deadline = self.opts.deadline.unwrap_or(Duration::MAX);
        self.rt.block_on(async {
            loop {
                let left = deadline.saturating_sub(started.elapsed());
                let result = match tokio::time::timeout(left, op()).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(self.err(format!("{what}: no answer within {:?} (deadline)", deadline)));
                    }
                };
                match result {
                    Ok(v) => return Ok(v),
                    Err(e) if transient(&e) && attempt < self.opts.retries => {
                        attempt += 1;
                        let pause = self.opts.backoff * 2u32.pow(attempt - 1);
                        if started.elapsed() + pause >= deadline {
                            return Err(self.err(format!("{what}: {} (deadline reached)", chain(&e))));
                        }
                        tracing::info!(what, attempt, error = %chain(&e), "retrying registry request");
                        defs::REGISTRY_RETRIES.with(&[("op", what)]).inc();
                        tokio::time::sleep(pause).await;
                    }
                    Err(e) => return Err(self.err(format!("{what}: {}", chain(&e)))),
                }
            }
        })
    }

    fn oci_desc(desc: &Descriptor) -> OciDescriptor {
        OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size as i64,
            ..Default::default()
        }
    }

    /// One range GET: the bytes and the HTTP status. `received` counts what
    /// arrived, a broken response included.
    async fn range_attempt(
        &self,
        od: &OciDescriptor,
        offset: u64,
        len: u64,
        received: &mut u64,
    ) -> std::result::Result<(Vec<u8>, u16), OciDistributionError> {
        let resp = self
            .client
            .pull_blob_stream_partial(&self.reference, od, offset, Some(len))
            .await?;
        let (mut stream, skip, code) = match resp {
            oci_client::client::BlobResponse::Partial(s) => (s.stream, 0, 206),
            // A registry that ignores Range sends the whole blob.
            oci_client::client::BlobResponse::Full(s) => (s.stream, offset, 200),
        };
        let mut out = Vec::with_capacity(len as usize);
        let mut seen = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let start = skip.saturating_sub(seen).min(chunk.len() as u64) as usize;
            seen += chunk.len() as u64;
            *received += chunk.len() as u64;
            let want = (len as usize - out.len()).min(chunk.len() - start);
            out.extend_from_slice(&chunk[start..start + want]);
            if out.len() as u64 == len {
                break;
            }
        }
        if (out.len() as u64) < len {
            return Err(OciDistributionError::IoError(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("range response ended after {} of {len} bytes", out.len()),
            )));
        }
        Ok((out, code))
    }

    fn fetch_manifest(&self, reference: &Reference) -> Result<Fetched> {
        let (bytes, _) = self.retry("manifest", || {
            self.client
                .pull_manifest_raw(reference, &RegistryAuth::Anonymous, ACCEPT)
        })?;
        if bytes.len() as u64 > manifest::MAX_DOC {
            return Err(self.err("manifest is implausibly large"));
        }
        let digest = crate::sha256_digest(&bytes);
        if let Some(expected) = reference.digest() {
            crate::verify_digest("manifest", expected, &bytes)?;
        }
        Ok(Fetched {
            bytes: bytes.to_vec(),
            media_type: None,
            digest,
        })
    }
}

impl Fetcher for RegistrySource {
    fn top(&self) -> Result<Fetched> {
        self.fetch_manifest(&self.reference)
    }

    fn manifest(&self, desc: &Descriptor) -> Result<Fetched> {
        let mut f = self.fetch_manifest(&self.reference.clone_with_digest(desc.digest.clone()))?;
        f.media_type = Some(desc.media_type.clone());
        Ok(f)
    }

    fn small_blob(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        self.read_range(desc, 0, desc.size)
    }
}

impl ImageSource for RegistrySource {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage> {
        manifest::resolve(self, platform)
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        crate::digest_hex(&desc.digest)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let task = BlobStream {
            client: self.client.clone(),
            reference: self.reference.clone(),
            desc: desc.clone(),
            opts: self.opts.clone(),
            registry: self.reference.registry().to_string(),
        };
        self.rt.spawn(task.run(tx));
        Ok(Box::new(ChannelReader { rx, cur: Bytes::new() }))
    }

    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>> {
        crate::digest_hex(&desc.digest)?;
        if offset.checked_add(len).is_none_or(|end| end > desc.size) {
            return Err(self.err(format!("range {offset}+{len} is outside blob {}", desc.digest)));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let od = Self::oci_desc(desc);
        let bytes = self.retry("blob range", || async {
            let started = std::time::Instant::now();
            let mut received = 0u64;
            let result = self.range_attempt(&od, offset, len, &mut received).await;
            let status = match &result {
                Ok((_, code)) => code.to_string(),
                Err(e) => http_status(e).map_or_else(|| "error".to_string(), |c| c.to_string()),
            };
            let labels = [("layer", desc.digest.as_str()), ("status", status.as_str())];
            defs::RANGE_GET_REQUESTS.with(&labels).inc();
            defs::RANGE_GET_BYTES.with(&labels).inc_by(received);
            defs::RANGE_GET_SECONDS
                .with(&labels)
                .observe_duration(started.elapsed());
            result.map(|(bytes, _)| bytes)
        })?;
        Ok(bytes)
    }
}

/// Streams a whole blob into a channel, resuming with a Range request
/// where a connection broke.
struct BlobStream {
    client: Client,
    reference: Reference,
    desc: Descriptor,
    opts: RegistryOptions,
    registry: String,
}

impl BlobStream {
    async fn run(self, tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>) {
        let od = RegistrySource::oci_desc(&self.desc);
        let mut offset = 0u64;
        let mut attempt = 0u32;
        loop {
            let failure: String = match self
                .client
                .pull_blob_stream_partial(&self.reference, &od, offset, None)
                .await
            {
                Ok(resp) => {
                    let (mut stream, mut skip) = match resp {
                        oci_client::client::BlobResponse::Partial(s) => (s.stream, 0),
                        oci_client::client::BlobResponse::Full(s) => (s.stream, offset),
                    };
                    let mut broke = None;
                    while let Some(chunk) = stream.next().await {
                        match chunk {
                            Ok(mut b) => {
                                let s = skip.min(b.len() as u64) as usize;
                                skip -= s as u64;
                                let _ = b.split_to(s);
                                if b.is_empty() {
                                    continue;
                                }
                                offset += b.len() as u64;
                                attempt = 0;
                                if tx.send(Ok(b)).await.is_err() {
                                    return; // the reader is gone
                                }
                            }
                            Err(e) => {
                                broke = Some(chain(&e));
                                break;
                            }
                        }
                    }
                    match broke {
                        None if offset >= self.desc.size => return,
                        None => format!("stream ended at byte {offset} of {}", self.desc.size),
                        Some(e) => e,
                    }
                }
                Err(e) if transient(&e) => chain(&e),
                Err(e) => {
                    let _ = tx
                        .send(Err(io::Error::other(format!(
                            "registry {}: {}",
                            self.registry,
                            chain(&e)
                        ))))
                        .await;
                    return;
                }
            };
            attempt += 1;
            if attempt > self.opts.retries {
                let msg = format!(
                    "registry {}: blob {}: {failure} (gave up after {} retries)",
                    self.registry, self.desc.digest, self.opts.retries
                );
                let _ = tx.send(Err(io::Error::other(msg))).await;
                return;
            }
            tracing::info!(digest = %self.desc.digest, offset, attempt, error = %failure, "resuming blob stream");
            defs::REGISTRY_RETRIES.with(&[("op", "blob stream")]).inc();
            tokio::time::sleep(self.opts.backoff * 2u32.pow(attempt - 1)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback() {
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.1.2.3"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }
}
