//! The OCI distribution protocol over HTTP, one client per registry host.
//!
//! A [`Registries`] pool holds one [`Host`] per registry: one connection
//! pool, what the registry's `WWW-Authenticate` challenge said, and bearer
//! tokens cached per scope and credential, shared by every image of that
//! registry. Requests go out with what is cached; a 401 makes the host
//! learn the challenge, ask the credential source again (a helper's token
//! may have expired) and fetch a new token, once per request. Transient
//! failures (connection errors, timeouts, 408, 429, 5xx) are retried with
//! jittered exponential backoff that honours `Retry-After`, all within the
//! operation's deadline.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clip_metrics::defs;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::Method;

use crate::auth::{parse_challenge, Challenge, Credential, CredentialSource};

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) reached over plain HTTP besides loopback
    /// ones: `CLIP_INSECURE_REGISTRIES`, comma-separated.
    pub insecure: Vec<String>,
    /// Attempts after the first for a transient failure.
    pub retries: u32,
    /// Backoff before the first retry; doubles each time, with jitter.
    pub backoff: Duration,
    pub connect_timeout: Duration,
    /// The longest a response may stall between two reads.
    pub read_timeout: Duration,
    /// The longest one operation (a manifest lookup, a range read, the start
    /// of a blob stream) may take, retries and token fetches included.
    pub deadline: Duration,
    /// Directories of per-registry TLS material, as containers/image and
    /// Docker read them: `DIR/HOST[:PORT]/*.crt` are trusted CAs,
    /// `client.cert` and `client.key` a client certificate.
    pub certs_dirs: Vec<PathBuf>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            retries: 5,
            backoff: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            deadline: Duration::from_secs(60),
            certs_dirs: vec!["/etc/containers/certs.d".into(), "/etc/docker/certs.d".into()],
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

    /// Settings for serving reads: a read fails with EIO in bounded time
    /// rather than hanging.
    pub fn for_reads(self) -> Self {
        Self {
            retries: 4,
            backoff: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(20),
            ..self
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

/// What went wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect")]
    Connect(#[source] reqwest::Error),
    #[error(
        "TLS with {host} failed; to trust a private CA put it in /etc/containers/certs.d/{host}/ca.crt \
         (or /etc/docker/certs.d/{host}/ca.crt), or, for a registry without TLS, add {host} to \
         CLIP_INSECURE_REGISTRIES"
    )]
    Tls {
        host: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("gave up after {0:?}, the operation's deadline")]
    Deadline(Duration),
    #[error("HTTP {status}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("access denied (HTTP 403){}", if .0.is_empty() { String::new() } else { format!(": {}", .0) })]
    Forbidden(String),
    #[error("not found (HTTP 404){}", if .0.is_empty() { String::new() } else { format!(": {}", .0) })]
    NotFound(String),
    #[error("the registry ignores Range requests (it answered bytes {offset}+{len} with the whole blob, HTTP 200)")]
    RangeIgnored { offset: u64, len: u64 },
    #[error("reading the response")]
    Body(#[source] reqwest::Error),
    #[error("the response ended after {got} of {want} bytes")]
    ShortBody { got: u64, want: u64 },
    #[error("malformed response: {0}")]
    Protocol(String),
    #[error("getting a token from {realm}")]
    Token {
        realm: String,
        #[source]
        source: Box<HttpError>,
    },
}

impl HttpError {
    /// Worth another attempt.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Connect(_) | HttpError::Timeout(_) | HttpError::Body(_) | HttpError::ShortBody { .. } => true,
            HttpError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            HttpError::Token { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    /// The registry refused our credentials or wants some.
    pub fn is_auth(&self) -> bool {
        match self {
            HttpError::Unauthorized(_) | HttpError::Forbidden(_) => true,
            HttpError::Token { source, .. } => source.is_auth(),
            _ => false,
        }
    }

    /// The HTTP status, when one arrived.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            HttpError::Unauthorized(_) => Some(401),
            HttpError::Forbidden(_) => Some(403),
            HttpError::NotFound(_) => Some(404),
            HttpError::RangeIgnored { .. } => Some(200),
            _ => None,
        }
    }
}

/// Whether a reqwest error is, underneath, a TLS failure.
fn is_tls(e: &reqwest::Error) -> bool {
    // An io::Error's source() skips the error it wraps, and the TLS stack
    // wraps rustls's error in an io::Error inside another: unwrap them all.
    fn wraps_rustls(io: &std::io::Error) -> bool {
        match io.get_ref() {
            Some(inner) if inner.is::<rustls::Error>() => true,
            Some(inner) => inner.downcast_ref::<std::io::Error>().is_some_and(wraps_rustls),
            None => false,
        }
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.is::<rustls::Error>() || c.downcast_ref::<std::io::Error>().is_some_and(wraps_rustls) {
            return true;
        }
        cur = c.source();
    }
    false
}

fn classify(host: &str, e: reqwest::Error, stall: Duration) -> HttpError {
    if is_tls(&e) {
        HttpError::Tls {
            host: host.to_string(),
            source: e,
        }
    } else if e.is_timeout() {
        HttpError::Timeout(stall)
    } else if e.is_body() || e.is_decode() {
        HttpError::Body(e)
    } else {
        HttpError::Connect(e)
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

/// The pause before retry `attempt` (1-based): exponential, with ±50%
/// jitter so that many clients do not retry in lockstep.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1 << attempt.saturating_sub(1).min(6));
    exp.mul_f64(0.5 + fastrand::f64())
}

/// One request, rebuilt for every attempt.
#[derive(Debug, Clone)]
pub(crate) struct Req {
    pub method: Method,
    /// Path and query after the host, e.g. `/v2/a/b/manifests/latest`.
    pub path: String,
    pub accept: Option<String>,
    pub range: Option<(u64, Option<u64>)>,
    pub body: Option<(bytes::Bytes, String)>,
}

impl Req {
    pub fn get(path: String) -> Self {
        Self {
            method: Method::GET,
            path,
            accept: None,
            range: None,
            body: None,
        }
    }
}

#[derive(Clone)]
struct Token {
    value: String,
    expires: Instant,
}

/// One registry host.
pub struct Host {
    /// The registry as references name it (`docker.io`, `host:port`).
    pub name: String,
    endpoint: String,
    http: reqwest::Client,
    opts: RegistryOptions,
    challenge: Mutex<Option<Challenge>>,
    tokens: Mutex<HashMap<(String, u64), Token>>,
    /// Credentials the registry refused, by fingerprint, and when.
    rejected: Mutex<HashMap<u64, Instant>>,
    warned_range: AtomicBool,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("name", &self.name).finish()
    }
}

/// TLS material for `host` from the certs.d directories.
fn tls_material(dirs: &[PathBuf], host: &str) -> (Vec<reqwest::Certificate>, Option<reqwest::Identity>) {
    let mut cas = Vec::new();
    let mut identity = None;
    for dir in dirs {
        let d = dir.join(host);
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "crt") {
                match std::fs::read(&p).map(|pem| reqwest::Certificate::from_pem_bundle(&pem)) {
                    Ok(Ok(certs)) => cas.extend(certs),
                    Ok(Err(err)) => tracing::warn!(path = %p.display(), error = %err, "ignoring a CA file"),
                    Err(err) => tracing::warn!(path = %p.display(), error = %err, "ignoring a CA file"),
                }
            }
        }
        if identity.is_none() {
            if let (Ok(cert), Ok(key)) = (
                std::fs::read(d.join("client.cert")),
                std::fs::read(d.join("client.key")),
            ) {
                let mut pem = cert;
                pem.extend_from_slice(&key);
                match reqwest::Identity::from_pem(&pem) {
                    Ok(id) => identity = Some(id),
                    Err(err) => tracing::warn!(dir = %d.display(), error = %err, "ignoring a client certificate"),
                }
            }
        }
    }
    (cas, identity)
}

impl Host {
    fn new(name: &str, opts: &RegistryOptions) -> Result<Self, reqwest::Error> {
        let api = if matches!(name, "docker.io" | "index.docker.io") {
            "registry-1.docker.io"
        } else {
            name
        };
        let plain = is_loopback(name) || opts.insecure.iter().any(|i| i == name);
        let (cas, identity) = tls_material(&opts.certs_dirs, api);
        let mut b = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("clip/", env!("CARGO_PKG_VERSION")));
        if cas.is_empty() && identity.is_none() {
            // The shared configuration: the system roots load once, at the
            // first handshake, not with every new host.
            if let Ok(cfg) = crate::tls::lazy_config() {
                b = b.tls_backend_preconfigured(cfg);
            }
        }
        if !cas.is_empty() {
            b = b.tls_certs_merge(cas);
        }
        if let Some(id) = identity {
            b = b.identity(id);
        }
        Ok(Self {
            name: name.to_string(),
            endpoint: format!("{}://{api}", if plain { "http" } else { "https" }),
            http: b.build()?,
            opts: opts.clone(),
            challenge: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            warned_range: AtomicBool::new(false),
        })
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.opts
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Authorization header for `scope` with what is known and cached.
    /// The credentials to try, in order: every source's, minus those the
    /// registry refused lately (a request's expired token gives way to the
    /// daemon's own source), then anonymous.
    fn candidates(&self, creds: &dyn CredentialSource) -> Vec<Option<Credential>> {
        let rejected = Self::lock(&self.rejected);
        let mut v: Vec<Option<Credential>> = creds
            .candidates(&self.name)
            .into_iter()
            .filter(|c| {
                rejected
                    .get(&c.fingerprint())
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(600))
            })
            .map(Some)
            .collect();
        v.push(None);
        v
    }

    fn reject(&self, cred: &Credential) {
        Self::lock(&self.rejected).insert(cred.fingerprint(), Instant::now());
    }

    async fn authorization(&self, scope: &str, creds: &dyn CredentialSource) -> Result<Option<HeaderValue>, HttpError> {
        let challenge = Self::lock(&self.challenge).clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(match self.candidates(creds).into_iter().next().flatten() {
                Some(Credential::Basic { username, password }) => Some(basic(&username, &password)),
                _ => None,
            }),
            Some(Challenge::Bearer { realm, service }) => {
                let mut last = None;
                for cred in self.candidates(creds) {
                    let key = (scope.to_string(), cred.as_ref().map_or(0, Credential::fingerprint));
                    if let Some(t) = Self::lock(&self.tokens).get(&key) {
                        if t.expires > Instant::now() {
                            return Ok(Some(bearer(&t.value)));
                        }
                    }
                    match self.fetch_token(&realm, service.as_deref(), scope, cred.as_ref()).await {
                        Ok(token) => {
                            let header = bearer(&token.value);
                            Self::lock(&self.tokens).insert(key, token);
                            return Ok(Some(header));
                        }
                        Err(e @ HttpError::Unauthorized(_)) => {
                            if let Some(c) = &cred {
                                self.reject(c);
                            }
                            last = Some(e);
                        }
                        Err(e) => {
                            return Err(HttpError::Token {
                                realm: realm.clone(),
                                source: Box::new(e),
                            })
                        }
                    }
                }
                Err(HttpError::Token {
                    realm,
                    source: Box::new(last.unwrap_or(HttpError::Unauthorized("no credential worked".into()))),
                })
            }
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        cred: Option<&Credential>,
    ) -> Result<Token, HttpError> {
        let mut params = vec![("scope", scope.to_string())];
        if let Some(s) = service {
            params.push(("service", s.to_string()));
        }
        let rb = match cred {
            Some(Credential::IdentityToken(refresh)) => {
                params.push(("grant_type", "refresh_token".into()));
                params.push(("refresh_token", refresh.clone()));
                params.push(("client_id", "clip".into()));
                self.http.post(realm).form(&params)
            }
            Some(Credential::Basic { username, password }) => {
                self.http.get(realm).query(&params).basic_auth(username, Some(password))
            }
            None => self.http.get(realm).query(&params),
        };
        let resp = rb
            .send()
            .await
            .map_err(|e| classify(&self.name, e, self.opts.read_timeout))?;
        let status = resp.status();
        let retry = retry_after(resp.headers());
        let body = resp.bytes().await.map_err(HttpError::Body)?;
        match status.as_u16() {
            200 => {}
            401 => {
                return Err(HttpError::Unauthorized(match cred {
                    Some(_) => "unauthorized (HTTP 401): the token service refused the credentials".into(),
                    None => format!(
                        "unauthorized (HTTP 401): the registry wants credentials and none are configured for \
                         {} (docker login, or a Docker config with auths or credHelpers)",
                        self.name
                    ),
                }))
            }
            403 => return Err(HttpError::Forbidden(error_message(&body))),
            s => {
                return Err(HttpError::Status {
                    status: s,
                    message: error_message(&body),
                    retry_after: retry,
                })
            }
        }
        #[derive(serde::Deserialize)]
        struct Resp {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let r: Resp = serde_json::from_slice(&body).map_err(|e| HttpError::Protocol(format!("token response: {e}")))?;
        let value = r
            .token
            .or(r.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| HttpError::Protocol("token response without a token".into()))?;
        // The spec's default lifetime is 60 s; renew a little early.
        let life = Duration::from_secs(r.expires_in.unwrap_or(60).max(60));
        Ok(Token {
            value,
            expires: Instant::now() + life.mul_f64(0.9),
        })
    }

    /// Learns from a 401 and forgets what the registry refused.
    fn refused(&self, headers: &HeaderMap, scope: &str, creds: &dyn CredentialSource) -> Result<(), HttpError> {
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge)
            .ok_or_else(|| HttpError::Unauthorized("HTTP 401 without a usable WWW-Authenticate challenge".into()))?;
        let was = Self::lock(&self.challenge).replace(challenge.clone());
        let used = self.candidates(creds).into_iter().next().flatten();
        if was == Some(Challenge::Basic) && challenge == Challenge::Basic {
            // Basic credentials sent and refused: try the next source's.
            if let Some(c) = &used {
                self.reject(c);
            }
        }
        // A bearer token refused: it expired or was revoked; the
        // credential behind it may be fine, so get a new token.
        let fp = used.as_ref().map_or(0, Credential::fingerprint);
        Self::lock(&self.tokens).retain(|k, _| !(k.0 == scope && k.1 == fp));
        Ok(())
    }

    /// Runs `op` (one request and whatever it reads of the response) until
    /// it succeeds or fails for good: transient failures are retried with
    /// jittered backoff (at least what `Retry-After` asked for), all within
    /// the operation's deadline.
    pub(crate) async fn retrying<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T, HttpError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, HttpError>>,
    {
        let deadline = self.opts.deadline;
        let started = Instant::now();
        let work = async {
            let mut attempt = 0u32;
            loop {
                let err = match op().await {
                    Ok(v) => return Ok(v),
                    Err(e) if e.is_transient() => e,
                    Err(e) => return Err(e),
                };
                let asked = match &err {
                    HttpError::Status { retry_after, .. } => *retry_after,
                    HttpError::Token { source, .. } => match **source {
                        HttpError::Status { retry_after, .. } => retry_after,
                        _ => None,
                    },
                    _ => None,
                };
                attempt += 1;
                if attempt > self.opts.retries {
                    return Err(err);
                }
                let pause = backoff(self.opts.backoff, attempt).max(asked.unwrap_or_default());
                if started.elapsed() + pause >= deadline {
                    return Err(err);
                }
                tracing::info!(registry = %self.name, op = what, attempt, error = %err, "retrying registry request");
                defs::REGISTRY_RETRIES.with(&[("op", what)]).inc();
                tokio::time::sleep(pause).await;
            }
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Deadline(deadline)),
        }
    }

    /// Sends `req` once with authentication: a 401 makes the host learn
    /// the challenge and ask the credential source again, then the request
    /// is sent once more. Transient statuses (408, 429, 5xx) come back as
    /// errors, for [`Host::retrying`]; other statuses as responses.
    pub(crate) async fn send_once(
        &self,
        req: &Req,
        scope: &str,
        creds: &dyn CredentialSource,
        op: &'static str,
    ) -> Result<reqwest::Response, HttpError> {
        // One round to learn the challenge, then one per credential to try.
        let mut rounds = 0;
        loop {
            let resp = self.attempt(req, scope, creds).await?;
            let status = resp.status().as_u16();
            if status == 401 {
                rounds += 1;
                if rounds > 1 + creds.candidates(&self.name).len() {
                    return Err(HttpError::Unauthorized(match creds.get(&self.name) {
                        Some(_) => "unauthorized (HTTP 401): the registry refused the credentials".into(),
                        None => format!(
                            "unauthorized (HTTP 401): the registry wants credentials and none are configured \
                             for {} (docker login, or a Docker config with auths or credHelpers)",
                            self.name
                        ),
                    }));
                }
                let had_auth = Self::lock(&self.challenge).is_some();
                self.refused(resp.headers(), scope, creds)?;
                // A token that expired or was revoked: ask the credential
                // source again (a helper's token may have rotated).
                if had_auth {
                    tracing::info!(registry = %self.name, op, "renewing credentials after HTTP 401");
                }
                continue;
            }
            if status >= 500 || status == 429 || status == 408 {
                let ra = retry_after(resp.headers());
                let body = resp.bytes().await.unwrap_or_default();
                return Err(HttpError::Status {
                    status,
                    message: error_message(&body),
                    retry_after: ra,
                });
            }
            return Ok(resp);
        }
    }

    /// [`Host::send_once`] with retries and the deadline.
    pub(crate) async fn send(
        &self,
        req: &Req,
        scope: &str,
        creds: &dyn CredentialSource,
        op: &'static str,
    ) -> Result<reqwest::Response, HttpError> {
        self.retrying(op, || self.send_once(req, scope, creds, op)).await
    }

    async fn attempt(
        &self,
        req: &Req,
        scope: &str,
        creds: &dyn CredentialSource,
    ) -> Result<reqwest::Response, HttpError> {
        let auth = self.authorization(scope, creds).await?;
        let mut rb = self
            .http
            .request(req.method.clone(), format!("{}{}", self.endpoint, req.path));
        if let Some(a) = auth {
            rb = rb.header(AUTHORIZATION, a);
        }
        if let Some(accept) = &req.accept {
            rb = rb.header(ACCEPT, accept.as_str());
        }
        if let Some((off, len)) = req.range {
            let v = match len {
                Some(l) => format!("bytes={off}-{}", off + l - 1),
                None => format!("bytes={off}-"),
            };
            rb = rb.header(RANGE, v);
        }
        if let Some((body, ct)) = &req.body {
            rb = rb.header(reqwest::header::CONTENT_TYPE, ct.as_str()).body(body.clone());
        }
        rb.send()
            .await
            .map_err(|e| classify(&self.name, e, self.opts.read_timeout))
    }

    /// Warns once per host that range requests are ignored.
    pub(crate) fn note_range_ignored(&self) {
        if !self.warned_range.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                registry = %self.name,
                "the registry (or a proxy in front of it) ignores HTTP Range requests: layers it serves \
                 are read whole, once each, instead of span by span"
            );
        }
    }
}

/// Turns a non-success response into an error.
pub(crate) async fn status_error(resp: reqwest::Response) -> HttpError {
    let status = resp.status().as_u16();
    let ra = retry_after(resp.headers());
    let body = resp.bytes().await.unwrap_or_default();
    let message = error_message(&body);
    match status {
        401 => HttpError::Unauthorized(message),
        403 => HttpError::Forbidden(message),
        404 => HttpError::NotFound(message),
        _ => HttpError::Status {
            status,
            message,
            retry_after: ra,
        },
    }
}

/// The first error of a distribution-spec error body, briefly.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct E {
        code: Option<String>,
        message: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        errors: Vec<E>,
    }
    if let Ok(b) = serde_json::from_slice::<Body>(body) {
        if let Some(e) = b.errors.first() {
            return match (&e.code, &e.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.clone(),
                (None, Some(m)) => m.clone(),
                (None, None) => String::new(),
            };
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.len() > 200 || text.starts_with('<') {
        String::new()
    } else {
        text.to_string()
    }
}

fn basic(user: &str, pass: &str) -> HeaderValue {
    use std::io::Write;
    let mut raw = Vec::new();
    let _ = write!(raw, "{user}:{pass}");
    let mut v = HeaderValue::from_str(&format!("Basic {}", base64(&raw))).unwrap_or(HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

fn bearer(token: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).unwrap_or(HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

pub(crate) fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() {
                T[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// Every registry this process talks to, and the runtime their requests
/// run on. Blocking callers (indexer threads, FUSE threads) use
/// [`Registries::block_on`]; it must not be called from inside the runtime.
pub struct Registries {
    rt: tokio::runtime::Runtime,
    opts: RegistryOptions,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries").finish_non_exhaustive()
    }
}

impl Registries {
    pub fn new(opts: RegistryOptions) -> std::io::Result<Arc<Self>> {
        // rustls needs a process-wide crypto provider; ring is the lean one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("clip-registry")
            .enable_all()
            .build()?;
        Ok(Arc::new(Self {
            rt,
            opts,
            hosts: Mutex::new(HashMap::new()),
        }))
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.opts
    }

    /// The client for `registry` (`host[:port]`), made on first use.
    pub fn host(&self, registry: &str) -> Result<Arc<Host>, HttpError> {
        let mut hosts = Host::lock(&self.hosts);
        if let Some(h) = hosts.get(registry) {
            return Ok(h.clone());
        }
        let h = Arc::new(Host::new(registry, &self.opts).map_err(HttpError::Connect)?);
        hosts.insert(registry.to_string(), h.clone());
        Ok(h)
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.handle()
    }
}

#[cfg(test)]
mod tests {
    /// A registry without TLS reached over https: the error names the way
    /// out (CLIP_INSECURE_REGISTRIES, certs.d), whatever wraps rustls's.
    #[test]
    fn a_plain_http_server_reached_over_tls_is_a_tls_error() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Some(Ok(mut s)) = l.incoming().next() {
                use std::io::Write;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\nplain http\n");
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(
                reqwest::Client::builder()
                    .build()
                    .unwrap()
                    .get(format!("https://127.0.0.1:{port}/v2/"))
                    .send(),
            )
            .unwrap_err();
        let e = super::classify("reg.example:5000", e, std::time::Duration::from_secs(1));
        let text = e.to_string();
        assert!(matches!(e, super::HttpError::Tls { .. }), "{text}");
        assert!(
            text.contains("CLIP_INSECURE_REGISTRIES") && text.contains("/etc/containers/certs.d/reg.example:5000"),
            "{text}"
        );
    }

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

    #[test]
    fn backoff_grows_with_jitter_and_retry_after_is_read() {
        let base = Duration::from_millis(100);
        for attempt in 1..=4 {
            let exp = base * (1 << (attempt - 1));
            for _ in 0..50 {
                let b = backoff(base, attempt);
                assert!(b >= exp / 2 && b <= exp * 3 / 2, "{b:?} for attempt {attempt}");
            }
        }
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120), "{d:?}");
    }

    #[test]
    fn error_bodies_and_basic_auth() {
        assert_eq!(
            error_message(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#),
            "MANIFEST_UNKNOWN: manifest unknown"
        );
        assert_eq!(error_message(b"<html>bad gateway</html>"), "");
        assert_eq!(base64(b"alice:s3cret"), "YWxpY2U6czNjcmV0");
        assert_eq!(base64(b"a"), "YQ==");
        assert!(basic("a", "b").is_sensitive());
    }
}
