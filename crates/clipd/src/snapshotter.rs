//! containerd's snapshotter, served from the worker (`clip-snapshots`):
//! images are readied and mounted through the daemon's own image store and
//! mounts, so containerd's containers share them with clipctl's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clip_api::ImageSpec;
use clip_snapshots::{Images, Snapshotter, Store};

use crate::worker::{lock, Daemon};

pub struct ClipImages {
    d: Arc<Daemon>,
}

/// The image as the CRI names it, pinned to the manifest it resolved.
fn spec(image: &str, manifest: &str) -> ImageSpec {
    let image = if image.contains('@') {
        image.to_string()
    } else {
        format!("{image}@{manifest}")
    };
    ImageSpec {
        image,
        platform: clip_registry::Platform::default().to_string(),
        // The CRI's pull secret does not reach a snapshotter: clipd's own
        // credentials (CLIP_AUTH_FILE) are used.
        creds: Default::default(),
        checkpoint_mib: None,
    }
}

impl ClipImages {
    /// The key of the image's shared mount (its index readied).
    fn key(&self, image: &str, manifest: &str) -> Result<String> {
        let ready = crate::handlers::ensure(&self.d, &spec(image, manifest), &mut |_| {})?;
        crate::handlers::mount_key(&ready.index)
    }

    fn mount(&self, image: &str, manifest: &str) -> Result<(PathBuf, String)> {
        let s = spec(image, manifest);
        crate::handlers::image_mount(&self.d, Some(&s), None, Some(Default::default()), &mut |_| {}, |m| {
            lock(&self.d.pinned).insert(m.key.clone());
            // Asked for a container's mounts (Prepare, Mounts): it is about
            // to start.
            self.d.starting(format!("image {}", m.key));
            Ok((m.dir.clone(), m.key.clone()))
        })
    }
}

impl Images for ClipImages {
    fn ensure(&self, image: &str, manifest: &str) -> std::result::Result<(), String> {
        crate::handlers::ensure(&self.d, &spec(image, manifest), &mut |_| {})
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }

    fn mount(&self, image: &str, manifest: &str) -> std::result::Result<PathBuf, String> {
        ClipImages::mount(self, image, manifest)
            .map(|(dir, _)| dir)
            .map_err(|e| format!("{e:#}"))
    }

    fn release(&self, image: &str, manifest: &str) {
        if let Ok(key) = self.key(image, manifest) {
            lock(&self.d.pinned).remove(&key);
            self.d.ended(&format!("image {key}"));
            let dir = self.d.paths.image_mount(&key);
            self.d.retire_image(
                &dir,
                &key,
                Some(std::time::Duration::from_secs(self.d.opts.image_linger)),
            );
        }
    }
}

/// Serves the snapshots API on `std_listener` (bound at `socket`) from a
/// thread of its own.
pub fn start(d: Arc<Daemon>, std_listener: std::os::unix::net::UnixListener, socket: &Path, root: &Path) -> Result<()> {
    let store =
        Arc::new(Store::open(root).with_context(|| format!("opening the snapshotter root {}", root.display()))?);
    let images = Arc::new(ClipImages { d });
    // Images that snapshots use stay pinned (mounted again when asked).
    for r in store.lock().remotes() {
        match images.key(&r.image, &r.manifest) {
            Ok(key) => {
                lock(&images.d.pinned).insert(key);
            }
            Err(e) => tracing::warn!(image = %r.image, error = %format!("{e:#}"), "a snapshot's image is not ready"),
        }
    }
    std_listener.set_nonblocking(true)?;
    let snapshotter = Arc::new(Snapshotter::new(store, images));
    std::thread::Builder::new()
        .name("clipd-snapshots".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "cannot start the snapshotter's runtime"),
            };
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "cannot serve the snapshotter socket"),
                };
                if let Err(e) = clip_snapshots::serve(listener, snapshotter).await {
                    tracing::error!(error = %e, "the snapshotter stopped");
                }
            });
        })?;
    tracing::info!(socket = %socket.display(), root = %root.display(), "serving containerd's snapshots API");
    Ok(())
}
