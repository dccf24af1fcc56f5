//! Serving a mount in the foreground: what `clipctl serve` (and any program
//! that embeds clip, see `clip_rootfs::serve_if_requested`) runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clip_format::IndexFile;
use clip_registry::{ImageRef, Registries, RegistryOptions};
use clip_store::{LayerStore, StoreOptions};

use crate::{ClipFs, ImageView};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading {0}")]
    Index(PathBuf, #[source] clip_format::Error),
    #[error(transparent)]
    Source(#[from] clip_registry::Error),
    #[error(transparent)]
    View(#[from] clip_store::ReadError),
    #[error("mounting {0}")]
    Mount(PathBuf, #[source] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub cache_dir: PathBuf,
    pub cache_max: u64,
    pub threads: usize,
    /// Where this server answers metrics requests and leaves its counts
    /// when it stops (see `clip_metrics::host`); None for no metrics.
    pub metrics_dir: Option<PathBuf>,
}

impl ServeOptions {
    /// `CLIP_CACHE_DIR` (default `/var/cache/clip`) and `CLIP_CACHE_MAX`
    /// (bytes, or with a K, M, G or T suffix; default 10G).
    pub fn from_env() -> Self {
        let cache_dir = std::env::var_os("CLIP_CACHE_DIR").map_or_else(|| "/var/cache/clip".into(), PathBuf::from);
        let v = std::env::var("CLIP_CACHE_MAX").unwrap_or_default();
        Self {
            cache_dir,
            cache_max: parse_size(&v).unwrap_or(10 << 30),
            threads: 8,
            metrics_dir: Some(clip_metrics::host::dir_from_env()),
        }
    }
}

pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = match v.chars().last()? {
        'K' | 'k' => (&v[..v.len() - 1], 1u64 << 10),
        'M' | 'm' => (&v[..v.len() - 1], 1 << 20),
        'G' | 'g' => (&v[..v.len() - 1], 1 << 30),
        'T' | 't' => (&v[..v.len() - 1], 1 << 40),
        _ => (v, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// Mounts `index` at `dir` and serves it until it is unmounted or this
/// process gets SIGTERM or SIGINT (which unmount cleanly).
pub fn serve(index: &Path, dir: &Path, opts: &ServeOptions) -> Result<(), ServeError> {
    // Block the signals in every thread and wait for them in one.
    // SAFETY: plain signal-mask calls, before this function starts threads.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let file = Arc::new(IndexFile::load(index).map_err(|e| ServeError::Index(index.into(), e))?);
    let reference = ImageRef::parse(&file.index.image.reference)?;
    let registries =
        Registries::new(RegistryOptions::from_env().for_reads()).map_err(|e| ServeError::Mount(dir.into(), e))?;
    let creds: Arc<dyn clip_registry::CredentialSource> = match clip_registry::auth::DockerConfig::from_env() {
        Some(c) => Arc::new(c),
        None => Arc::new(clip_registry::auth::Anonymous),
    };
    let source: Arc<dyn clip_registry::ImageSource> = Arc::from(clip_registry::open(&reference, &registries, creds)?);
    let store = LayerStore::new(StoreOptions {
        cache_dir: Some(opts.cache_dir.clone()),
        cache_max: opts.cache_max,
        ..StoreOptions::default()
    })
    .or_else(|e| {
        tracing::warn!(dir = %opts.cache_dir.display(), error = %e, "span cache unavailable; serving from memory only");
        LayerStore::new(StoreOptions::default())
    })
    .map_err(|e| ServeError::Mount(dir.into(), e))?;
    let view = ImageView::new(file, store, source)?;
    let mut session = fuser::Session::new(ClipFs::new(view), dir, &crate::fs::config(opts.threads))
        .map_err(|e| ServeError::Mount(dir.into(), e))?;
    let mut unmounter = session.unmount_callable();
    let d = dir.to_path_buf();
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: set holds blocked signals.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!(signal = sig, dir = %d.display(), "unmounting on signal");
        let _ = unmounter.unmount();
    });
    let exporter = opts.metrics_dir.as_deref().and_then(|d| {
        clip_metrics::host::Exporter::start(d)
            .map_err(|e| tracing::warn!(error = %e, "serving without metrics"))
            .ok()
    });
    tracing::info!(dir = %dir.display(), index = %index.display(), image = %reference.canonical(), "mounted");
    let result = session.run().map_err(|e| ServeError::Mount(dir.into(), e));
    tracing::info!(dir = %dir.display(), "unmounted");
    if let Some(e) = exporter {
        if let Err(e) = e.finish() {
            tracing::warn!(error = %e, "cannot keep this mount's metrics");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("10G"), Some(10 << 30));
        assert_eq!(super::parse_size("512k"), Some(512 << 10));
        assert_eq!(super::parse_size("1234"), Some(1234));
        assert_eq!(super::parse_size("x"), None);
        assert_eq!(super::parse_size(""), None);
    }
}
