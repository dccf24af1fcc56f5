//! Registry credentials and the token flow.
//!
//! Credentials come from a [`CredentialSource`], asked again whenever a
//! registry refuses what we have (a 401), so that a credential helper whose
//! tokens expire is simply run again. Sources: a Docker config file
//! (`config.json` with `auths`, `credHelpers`, `credsStore`; podman's
//! `auth.json` has the same shape), credentials given with a request, or a
//! chain of them. Nothing here is ever logged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// What a registry accepts from us.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken` in a Docker config),
    /// exchanged at the token endpoint.
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret, not even in a debug dump.
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

impl Credential {
    /// A key for caching tokens per credential, without keeping the secret.
    pub(crate) fn fingerprint(&self) -> u64 {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        match self {
            Credential::Basic { username, password } => {
                h.update(b"basic\0");
                h.update(username.as_bytes());
                h.update(b"\0");
                h.update(password.as_bytes());
            }
            Credential::IdentityToken(t) => {
                h.update(b"identity\0");
                h.update(t.as_bytes());
            }
        }
        u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
    }
}

/// Where credentials for a registry come from. `get` is called again after
/// a registry refuses a credential, so sources must not cache what can
/// expire.
pub trait CredentialSource: Send + Sync + std::fmt::Debug {
    /// The credential for `registry` (`host[:port]`), if this source has one.
    fn get(&self, registry: &str) -> Option<Credential>;
    /// Every credential this source could offer, best first (a chain's,
    /// from each of its sources).
    fn candidates(&self, registry: &str) -> Vec<Credential> {
        self.get(registry).into_iter().collect()
    }
}

/// The keys a Docker config may file a registry's credentials under.
fn config_keys(registry: &str) -> Vec<String> {
    if matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io") {
        vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
        ]
    } else {
        vec![registry.into(), format!("https://{registry}")]
    }
}

/// A Docker config file, read (and its credential helpers run) on every
/// request for credentials.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    pub path: PathBuf,
}

impl DockerConfig {
    /// `$DOCKER_CONFIG/config.json`, or `~/.docker/config.json`.
    pub fn from_env() -> Option<Self> {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
        Some(Self {
            path: dir.join("config.json"),
        })
    }
}

impl CredentialSource for DockerConfig {
    fn get(&self, registry: &str) -> Option<Credential> {
        let bytes = std::fs::read(&self.path).ok()?;
        for key in config_keys(registry) {
            match docker_credential::get_credential_from_reader(bytes.as_slice(), &key) {
                Ok(docker_credential::DockerCredential::UsernamePassword(username, password)) => {
                    return Some(Credential::Basic { username, password });
                }
                Ok(docker_credential::DockerCredential::IdentityToken(t)) => {
                    return Some(Credential::IdentityToken(t));
                }
                Err(docker_credential::CredentialRetrievalError::NoCredentialConfigured) => {}
                Err(e) => {
                    tracing::warn!(registry, config = %self.path.display(), error = %e, "cannot read credentials");
                }
            }
        }
        None
    }
}

/// Credentials given with a request (resolved by the caller, who can read
/// its own config and run its own helpers), by registry.
#[derive(Default, Clone)]
pub struct StaticCredentials(pub HashMap<String, Credential>);

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl CredentialSource for StaticCredentials {
    fn get(&self, registry: &str) -> Option<Credential> {
        config_keys(registry).iter().find_map(|k| self.0.get(k).cloned())
    }
}

/// The first source that has a credential wins.
#[derive(Debug, Default, Clone)]
pub struct Chain(pub Vec<Arc<dyn CredentialSource>>);

impl CredentialSource for Chain {
    fn get(&self, registry: &str) -> Option<Credential> {
        self.0.iter().find_map(|s| s.get(registry))
    }

    fn candidates(&self, registry: &str) -> Vec<Credential> {
        let mut v: Vec<Credential> = Vec::new();
        for c in self.0.iter().flat_map(|s| s.candidates(registry)) {
            if !v.contains(&c) {
                v.push(c);
            }
        }
        v
    }
}

/// No credentials: anonymous access.
#[derive(Debug, Default, Clone, Copy)]
pub struct Anonymous;

impl CredentialSource for Anonymous {
    fn get(&self, _: &str) -> Option<Credential> {
        None
    }
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String> },
}

/// Parses the first challenge of a `WWW-Authenticate` header: `Basic
/// realm="..."` or `Bearer realm="...",service="...",scope="..."`.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key, value.to_string());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(parse_challenge("Basic realm=\"Registry\""), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(
                "Bearer realm=\"https://auth.example/token\",service=\"registry.example\",scope=\"repository:a/b:pull\""
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into())
            })
        );
        assert_eq!(
            parse_challenge("bearer realm=https://t.example/x, service=svc"),
            Some(Challenge::Bearer {
                realm: "https://t.example/x".into(),
                service: Some("svc".into())
            })
        );
        assert_eq!(parse_challenge("Bearer service=\"x\""), None, "no realm");
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn docker_config_is_read_again_each_time_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let src = DockerConfig { path: path.clone() };
        assert_eq!(src.get("r.example:5000"), None, "no file: no credential");
        let auth = |u: &str, p: &str| {
            let encoded = crate::client::base64(format!("{u}:{p}").as_bytes());
            format!(r#"{{"auths":{{"r.example:5000":{{"auth":"{encoded}"}}}}}}"#)
        };
        std::fs::write(&path, auth("alice", "s3cret")).unwrap();
        let c = src.get("r.example:5000").unwrap();
        assert_eq!(
            c,
            Credential::Basic {
                username: "alice".into(),
                password: "s3cret".into()
            }
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        // A rotated secret is seen at the next request.
        std::fs::write(&path, auth("alice", "rotated")).unwrap();
        assert!(matches!(src.get("r.example:5000"), Some(Credential::Basic { password, .. }) if password == "rotated"));
        let chain = Chain(vec![Arc::new(StaticCredentials::default()), Arc::new(src)]);
        assert!(chain.get("r.example:5000").is_some());
        assert!(chain.get("other:5000").is_none());
    }
}
