//! Where this process's images come from: one set of registry clients, and
//! the caller's Docker config for credentials.

use std::sync::{Arc, OnceLock};

use anyhow::Result;
use clip_registry::{CredentialSource, ImageRef, ImageSource, Registries, RegistryOptions};

/// This process's registry clients (connections and tokens shared by every
/// image it touches).
pub fn registries() -> Result<Arc<Registries>> {
    static R: OnceLock<Arc<Registries>> = OnceLock::new();
    if let Some(r) = R.get() {
        return Ok(r.clone());
    }
    let r = Registries::new(RegistryOptions::from_env())?;
    Ok(R.get_or_init(|| r).clone())
}

/// The caller's credentials: `$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`, helpers included.
pub fn creds() -> Arc<dyn CredentialSource> {
    match clip_registry::auth::DockerConfig::from_env() {
        Some(c) => Arc::new(c),
        None => Arc::new(clip_registry::auth::Anonymous),
    }
}

pub fn open(reference: &ImageRef) -> Result<Box<dyn ImageSource>> {
    Ok(clip_registry::open(reference, &registries()?, creds())?)
}
