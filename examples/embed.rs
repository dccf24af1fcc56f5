//! Embedding clip in a scheduler, without `clipctl`: index an image, make a
//! container rootfs on it (the image mounted lazily and shared, overlayfs on
//! top), use it, release it.
//!
//! Run as root: `cargo run --example embed -- 127.0.0.1:5000/app:v1`
//! (state under CLIP_BASE_DIR, CLIP_RUN_DIR and CLIP_CACHE_DIR as usual).

use std::error::Error;

use clip_registry::{ImageRef, Platform, Registries, RegistryOptions};
use clip_rootfs::{OverlayKind, Paths};

fn main() -> Result<(), Box<dyn Error>> {
    // Mounts are served by this same program, re-executed.
    if let Some(code) = clip_rootfs::serve_if_requested() {
        std::process::exit(code);
    }
    let image = std::env::args().nth(1).ok_or("usage: embed IMAGE")?;
    let paths = Paths::from_env(std::env::current_exe()?);

    // 1. Index the image (once per image; a scheduler would keep it).
    let reference = ImageRef::parse(&image)?;
    let registries = Registries::new(RegistryOptions::from_env())?;
    let creds = clip_registry::auth::DockerConfig::from_env()
        .map(|c| std::sync::Arc::new(c) as std::sync::Arc<dyn clip_registry::CredentialSource>)
        .unwrap_or_else(|| std::sync::Arc::new(clip_registry::auth::Anonymous));
    let source = clip_registry::open(&reference, &registries, creds)?;
    let resolved = source.resolve(&Platform::default())?;
    let (file, stats) = clip_index::build(source.as_ref(), &reference.canonical(), &resolved, &Default::default())?;
    let index = paths.base.join("index").join(format!(
        "{}.clip",
        resolved.manifest_digest.trim_start_matches("sha256:")
    ));
    std::fs::create_dir_all(index.parent().ok_or("no parent")?)?;
    std::fs::write(&index, file.encode()?)?;
    println!("indexed {} files of {} layers", stats.files, stats.layers);

    // 2 and 3. Mount it and make a writable rootfs for one container.
    let rootfs = clip_rootfs::create(&paths, &index, "embed-example", OverlayKind::Auto)?;
    println!("rootfs at {} ({})", rootfs.rootfs.display(), rootfs.overlay.name());
    let entries: Vec<String> = std::fs::read_dir(&rootfs.rootfs)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    println!("/: {}", entries.join(" "));
    std::fs::write(rootfs.rootfs.join("written-by-the-example"), "hello")?;
    println!("wrote into {}", rootfs.upper.display());

    // A runtime would run the container here; see clip_run::build_spec and
    // clip_run::Runtime::run.

    // 4. Release it: the overlay, its directories, and the image mount.
    clip_rootfs::release(&paths, "embed-example")?;
    println!("released");
    Ok(())
}
