//! Embedding clip in a scheduler that drives containers itself.
//!
//! Two ways, one program:
//!
//! * `embed IMAGE` talks to the host's clipd (started if none runs) over
//!   its socket with `clip_api`: the rootfs is ready at once, the image is
//!   mounted once for every container and scheduler on the host, the layer
//!   store and its cache are shared, and mounts survive the scheduler's
//!   and clipd's restarts. Use this on a node.
//! * `embed --in-process IMAGE` runs the same layer store inside this
//!   process: index, mount (this process serves FUSE), overlay, release.
//!   Use this where no daemon may run (a test harness, a one-shot tool);
//!   its mounts end with the process.
//!
//! Run as root: `cargo run --example embed -- 127.0.0.1:5000/app:v1`
//! (state under CLIP_BASE_DIR, CLIP_RUN_DIR and CLIP_CACHE_DIR as usual).

use std::error::Error;
use std::sync::Arc;

use clip_api::{Reply, Request};
use clip_registry::{ImageRef, Platform, Registries, RegistryOptions};
use clip_rootfs::{Kernel, Mounter, OverlayKind, Paths};

fn use_rootfs(rootfs: &std::path::Path) -> Result<(), Box<dyn Error>> {
    let entries: Vec<String> = std::fs::read_dir(rootfs)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    println!("/: {}", entries.join(" "));
    // A runtime would run the container here: clip_run::build_spec with
    // the image config, then clip_run::Runtime::run.
    std::fs::write(rootfs.join("written-by-the-example"), "hello")?;
    Ok(())
}

/// Through the host's clipd.
fn with_daemon(image: &str) -> Result<(), Box<dyn Error>> {
    let run = clip_api::run_dir();
    let prepare = Request::Prepare {
        spec: Some(clip_api::ImageSpec {
            image: image.into(),
            platform: "linux/amd64".into(),
            ..Default::default()
        }),
        index: None,
        id: "embed-example".into(),
        fuse_overlayfs: false,
        record: false,
        command: None,
    };
    let Reply::Prepared(p) = clip_api::Client::connect(&run, true)?.call(&prepare, |_| {})? else {
        return Err("clipd answered something else".into());
    };
    println!("rootfs at {} (image {})", p.rootfs.display(), p.image);
    use_rootfs(&p.rootfs)?;
    clip_api::Client::connect(&run, true)?.call(
        &Request::Release {
            id: "embed-example".into(),
        },
        |_| {},
    )?;
    println!("released");
    Ok(())
}

/// The same layer store, in this process.
fn in_process(image: &str) -> Result<(), Box<dyn Error>> {
    let paths = Paths::from_env();
    // 1. Index the image.
    let reference = ImageRef::parse(image)?;
    let registries = Registries::new(RegistryOptions::from_env())?;
    let source: Arc<dyn clip_registry::ImageSource> = Arc::from(clip_registry::open(
        &reference,
        &registries,
        Arc::new(clip_registry::auth::Anonymous),
    )?);
    let resolved = source.resolve(&Platform::default())?;
    let (file, stats) = clip_index::build(source.as_ref(), &reference.canonical(), &resolved, &Default::default())?;
    println!("indexed {} files of {} layers", stats.files, stats.layers);

    // 2. Mount it, served by this process, over a layer store.
    let store = clip_store::LayerStore::new(clip_store::StoreOptions::default())?;
    let view = clip_fs::ImageView::new(Arc::new(file), store, source)?;
    let mnt = paths.image_mount("embed-example");
    clip_rootfs::private_dir(mnt.parent().ok_or("no parent")?)?;
    std::fs::create_dir_all(&mnt)?;
    let fd = Kernel.mount_fuse(&mnt)?;
    let served = clip_fs::serve_fd(view, fd, false, 2)?;

    // 3. A writable rootfs for one container.
    let rootfs = clip_rootfs::create(
        &paths,
        &Kernel,
        "embed-example",
        &mnt,
        "embed-example",
        OverlayKind::Auto,
    )?;
    println!("rootfs at {} ({})", rootfs.rootfs.display(), rootfs.overlay.name());
    use_rootfs(&rootfs.rootfs)?;

    // 4. Release it, then the image mount (its session ends with it).
    clip_rootfs::release(&paths, &Kernel, "embed-example")?;
    Kernel.unmount(&mnt, false)?;
    let _ = served.thread.join();
    println!("released");
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, image] if flag == "--in-process" => in_process(image),
        [image] => with_daemon(image),
        _ => Err("usage: embed [--in-process] IMAGE".into()),
    }
}
