//! The API's requests.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clip_api::{ContainerInfo, ImageSpec, IndexSummary, MountInfo, Pong, Prepared, PsReply, Reply, Request};
use clip_rootfs::OverlayKind;

use crate::handover::{MountRecord, Msg};
use crate::images::{write_atomic, Ready};
use crate::worker::{lock, Daemon};

pub fn handle(d: &Daemon, req: Request, send: &mut dyn FnMut(Reply)) -> Result<Reply> {
    match req {
        Request::Ping => Ok(Reply::Pong(Pong {
            protocol: clip_api::PROTOCOL,
            version: env!("CARGO_PKG_VERSION").into(),
            supervisor_pid: nix::unistd::getppid().as_raw(),
            worker_pid: std::process::id() as i32,
            uptime: d.started.elapsed().as_secs_f64(),
            takeovers: d.takeovers,
        })),
        Request::Index {
            spec,
            out,
            jobs: _,
            push,
        } => {
            let ready = ensure(d, &spec, send)?;
            if let Some(out) = &out {
                write_atomic(out, &ready.index.encode()?)?;
            }
            let mut s = summary(&ready);
            if push {
                s.published = Some(publish(d, &spec, &ready, false)?);
            }
            Ok(Reply::Indexed(s))
        }
        Request::PushProfile { spec } => {
            let ready = ensure(d, &spec, send)?;
            let published = publish(d, &spec, &ready, true)?;
            Ok(Reply::Text {
                text: format!(
                    "published the index and profile of {}: {published}",
                    ready.reference.canonical()
                ),
            })
        }
        Request::Mount { spec, index, dir } => {
            let dir = std::path::absolute(&dir)?;
            let (index_path, reference) = index_for(d, spec.as_ref(), index.as_deref(), send)?;
            if let Some(m) = lock(&d.mounts).get(&dir) {
                if m.record.index == index_path {
                    return Ok(Reply::Mounted { dir });
                }
                bail!("{} is already a clip mount of another image", dir.display());
            }
            if d.mounter.is_stale(&dir) {
                d.mounter.unmount(&dir, true)?;
            }
            check_mount_point(&dir)?;
            d.mount(MountRecord {
                dir: dir.clone(),
                index: index_path,
                reference,
                key: None,
                creds: spec.map(|s| s.creds).unwrap_or_default(),
                command: None,
            })?;
            Ok(Reply::Mounted { dir })
        }
        Request::Umount { dir } => {
            let dir = std::path::absolute(&dir)?;
            let served = lock(&d.mounts).get(&dir).map(|m| m.record.key.clone());
            match served {
                Some(Some(key)) => {
                    let users = clip_rootfs::users(&d.paths, &key);
                    if !users.is_empty() {
                        bail!(
                            "{} is the image of containers {}: remove them first (clipctl umount --cid ID)",
                            dir.display(),
                            users.join(", ")
                        );
                    }
                    d.unmount(&dir, false)?;
                }
                Some(None) => d.unmount(&dir, false)?,
                None if d.mounter.is_stale(&dir) => d.mounter.unmount(&dir, true)?,
                None => match d.mounter.mount_at(&dir) {
                    Some(m) if m.is_clip() => bail!("{} is a clip mount no clipd here serves", dir.display()),
                    Some(m) => bail!("{} is not a clip mount ({})", dir.display(), m.fstype),
                    None => bail!("{} is not mounted", dir.display()),
                },
            }
            Ok(Reply::Ok)
        }
        Request::Prepare {
            spec,
            index,
            id,
            fuse_overlayfs,
            record,
            command,
        } => {
            clip_rootfs::validate_id(&id)?;
            image_mount(d, spec.as_ref(), index.as_deref(), command, send, |m| {
                prepare_on(d, m, &id, fuse_overlayfs, record)
            })
        }
        Request::Release { id } => {
            release(d, &id)?;
            Ok(Reply::Ok)
        }
        Request::Ps => Ok(Reply::Ps(ps(d))),
        Request::Images => Ok(Reply::Images { images: images(d) }),
        Request::RemoveImage { image } => {
            let gone = remove_image(d, &image)?;
            Ok(Reply::Text { text: gone })
        }
        Request::Prune => Ok(Reply::Text { text: prune(d)? }),
        Request::Metrics { json } => {
            let mut snap = clip_metrics::global().snapshot();
            snap.set_gauge(
                "clip_cache_size_bytes",
                "Bytes in the disk span cache.",
                d.store.disk().map_or(0, |c| c.size()) as f64,
            );
            snap.set_gauge(
                "clip_mounts",
                "Image mounts this clipd serves.",
                lock(&d.mounts).len() as f64,
            );
            snap.set_gauge(
                "clip_prefetch_queued",
                "Units waiting in the prefetch queue (profile replay, read-ahead).",
                d.store.queued() as f64,
            );
            let text = if json {
                serde_json::to_string_pretty(&snap)? + "\n"
            } else {
                snap.encode_text()
            };
            Ok(Reply::Text { text })
        }
        Request::ObserveFirstExec { runtime, seconds } => {
            clip_metrics::defs::FIRST_EXEC_SECONDS
                .with(&[("runtime", &runtime)])
                .observe(seconds);
            Ok(Reply::Ok)
        }
        Request::Upgrade { binary } => {
            let binary = std::path::absolute(&binary)?;
            if !binary.is_file() {
                bail!("{} is not a file", binary.display());
            }
            // No new requests; those under way finish; answered before the
            // supervisor stops this worker.
            d.handing_over.store(true, std::sync::atomic::Ordering::SeqCst);
            d.quiesce(std::time::Duration::from_secs(30));
            d.flush_span_cache();
            send(Reply::Ok);
            if let Err(e) = d.supervisor(&Msg::Upgrade { binary }, None) {
                d.handing_over.store(false, std::sync::atomic::Ordering::SeqCst);
                return Err(e);
            }
            Ok(Reply::Ok)
        }
        Request::Stop => {
            send(Reply::Ok);
            d.shutdown();
        }
    }
}

/// The stored index for a spec (built if missing), with progress frames.
pub(crate) fn ensure(d: &Daemon, spec: &ImageSpec, send: &mut dyn FnMut(Reply)) -> Result<Ready> {
    let (tx, rx) = std::sync::mpsc::channel::<Reply>();
    let progress = {
        let tx = std::sync::Mutex::new(tx.clone());
        move |done: u64, total: u64| {
            let _ = lock(&tx).send(Reply::Progress {
                what: "indexing".into(),
                done,
                total,
            });
        }
    };
    let warn = move |message: String| {
        tracing::warn!("{message}");
        let _ = tx.send(Reply::Warning { message });
    };
    // The worker owns every sender: when it ends, the channel closes and
    // this loop ends at once (no polling delay on the fast path).
    let r = std::thread::scope(|s| {
        let h = s.spawn(move || d.images.ensure(spec, &progress, &warn));
        while let Ok(r) = rx.recv() {
            send(r);
        }
        h.join().map_err(|_| anyhow::anyhow!("indexing panicked"))?
    });
    r
}

fn summary(r: &Ready) -> IndexSummary {
    let ix = &r.index.index;
    let count = |k: clip_format::Kind| ix.nodes.iter().filter(|n| n.kind == k).count() as u64;
    let (stats, seconds, bytes) = match &r.built {
        Some((s, secs, b)) => (Some(s), *secs, *b),
        None => (None, 0.0, std::fs::metadata(&r.index_path).map_or(0, |m| m.len())),
    };
    let mut skipped = std::collections::BTreeMap::new();
    if let Some(s) = stats {
        skipped.insert("excluded".into(), s.skipped.excluded);
        skipped.insert("bad_hardlinks".into(), s.skipped.bad_hardlinks);
        skipped.insert("replaced_by_dir".into(), s.skipped.replaced_by_dir);
    }
    IndexSummary {
        reference: r.reference.canonical(),
        manifest_digest: ix.image.manifest_digest.clone(),
        platform: ix.image.platform.clone(),
        path: r.index_path.clone(),
        built: r.built.is_some(),
        layers: ix.layers.len(),
        files: count(clip_format::Kind::File),
        directories: count(clip_format::Kind::Dir),
        symlinks: count(clip_format::Kind::Symlink),
        other: ix.nodes.len() as u64
            - count(clip_format::Kind::File)
            - count(clip_format::Kind::Dir)
            - count(clip_format::Kind::Symlink),
        compressed_bytes: ix.layers.iter().map(|l| l.compressed_size).sum(),
        uncompressed_bytes: ix.layers.iter().map(|l| l.uncompressed_size).sum(),
        checkpoints: ix.layers.iter().map(|l| l.checkpoints.len() as u64).sum(),
        index_bytes: bytes,
        seconds,
        skipped,
        origin: r.origin.clone(),
        published: None,
    }
}

/// Publishes the stored index of `ready` (with its profile, which
/// `need_profile` requires) in its registry; says what it pushed.
fn publish(d: &Daemon, spec: &ImageSpec, ready: &Ready, need_profile: bool) -> Result<String> {
    let source = d.images.source(&ready.reference, d.images.creds(&spec.creds))?;
    let Some(reg) = source.registry() else {
        bail!(
            "{} is not in a registry: there is nowhere to publish its index",
            ready.reference.canonical()
        );
    };
    let bytes = std::fs::read(&ready.index_path).with_context(|| format!("reading {}", ready.index_path.display()))?;
    let profile_path = crate::profiles::path_for(&ready.index_path);
    let profile = match std::fs::read(&profile_path) {
        Ok(p) => Some(p),
        Err(_) if !need_profile => None,
        Err(_) => bail!(
            "no prefetch profile is recorded for {}: run `clipctl record {} CMD...` first",
            ready.reference.canonical(),
            spec.image
        ),
    };
    // The hints of an index built here; an adopted one has them if its
    // publisher did.
    let hints = std::fs::read(crate::guesses::path_for(&ready.index_path)).ok();
    let (artifact, via) = crate::published::publish(reg, &ready.index, &bytes, profile.as_deref(), hints.as_deref())
        .with_context(|| format!("publishing the index of {}", ready.reference.canonical()))?;
    tracing::info!(image = %ready.reference.canonical(), %artifact, %via, "index published");
    let with: Vec<&str> = [(profile.is_some(), "profile"), (hints.is_some(), "hints")]
        .into_iter()
        .filter_map(|(has, what)| has.then_some(what))
        .collect();
    Ok(format!(
        "artifact {artifact}{}, listed through {via}",
        if with.is_empty() {
            String::new()
        } else {
            format!(" (index, {})", with.join(", "))
        }
    ))
}

/// The index to mount: an image's (stored or built) or a given file; with
/// the reference whose blobs it reads.
fn index_for(
    d: &Daemon,
    spec: Option<&ImageSpec>,
    index: Option<&Path>,
    send: &mut dyn FnMut(Reply),
) -> Result<(PathBuf, String)> {
    match (spec, index) {
        (Some(spec), _) => {
            let r = ensure(d, spec, send)?;
            // Blobs from where this request names the image: a published
            // index records where it was built, maybe another registry.
            Ok((r.index_path, r.reference.canonical()))
        }
        (None, Some(path)) => {
            let path = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
            let f = d.images.load(&path)?;
            Ok((path, f.index.image.reference.clone()))
        }
        (None, None) => bail!("give an image or an index"),
    }
}

/// A mount point must be an empty directory (or not exist yet).
fn check_mount_point(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if !m.is_dir() => bail!("{} is not a directory", dir.display()),
        Ok(_) => {
            if std::fs::read_dir(dir)?.next().is_some() {
                bail!("{} is not empty: mount on an empty directory", dir.display());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
        }
        Err(e) => Err(e).with_context(|| format!("{}", dir.display())),
    }
}

/// An image mount's key: the manifest digest and where its blobs come
/// from (an index fetches from the source it names).
pub(crate) fn mount_key(index: &clip_format::IndexFile) -> Result<String> {
    use sha2::Digest;
    let hex = clip_registry::digest_hex(&index.index.image.manifest_digest)?;
    let reference = clip_registry::ImageRef::parse(&index.index.image.reference)?;
    let src = hex::encode(&sha2::Sha256::digest(reference.source().as_bytes())[..6]);
    Ok(format!("{hex}-{src}"))
}

/// An image's shared mount, made if it is not there.
pub(crate) struct ImageMount {
    pub dir: PathBuf,
    pub key: String,
    pub file: std::sync::Arc<clip_format::IndexFile>,
    pub reference: String,
    pub index_path: PathBuf,
}

/// Mounts the image (once per image, shared) and runs `then` on it while
/// no one can retire the mount.
pub(crate) fn image_mount<T>(
    d: &Daemon,
    spec: Option<&ImageSpec>,
    index: Option<&Path>,
    command: Option<clip_api::Command>,
    send: &mut dyn FnMut(Reply),
    then: impl FnOnce(&ImageMount) -> Result<T>,
) -> Result<T> {
    let (index_path, reference) = index_for(d, spec, index, send)?;
    let file = d.images.load(&index_path)?;
    let key = mount_key(&file)?;
    let image_mount = d.paths.image_mount(&key);
    let gate = d.image_lock(&key);
    let _g = lock(&gate);
    let served = match lock(&d.mounts).get_mut(&image_mount) {
        Some(m) => {
            m.idle_since = None;
            true
        }
        None => false,
    };
    if !served {
        if d.mounter.is_stale(&image_mount) || d.mounter.mount_at(&image_mount).is_some() {
            let _ = d.mounter.unmount(&image_mount, true);
        }
        clip_rootfs::private_dir(image_mount.parent().expect("images/KEY/mnt"))?;
        std::fs::create_dir_all(&image_mount)?;
        d.mount(MountRecord {
            dir: image_mount.clone(),
            index: index_path.clone(),
            reference: reference.clone(),
            key: Some(key.clone()),
            creds: spec.map(|s| s.creds.clone()).unwrap_or_default(),
            command,
        })?;
    }
    then(&ImageMount {
        dir: image_mount,
        key,
        file,
        reference,
        index_path,
    })
}

fn prepare_on(d: &Daemon, m: &ImageMount, id: &str, fuse_overlayfs: bool, record: bool) -> Result<Reply> {
    let (key, image_mount, file) = (&m.key, &m.dir, &m.file);
    let kind = if fuse_overlayfs {
        OverlayKind::Fuse
    } else {
        OverlayKind::Auto
    };
    let r = match clip_rootfs::create(&d.paths, d.mounter.as_ref(), key, image_mount, id, kind) {
        Ok(r) => r,
        Err(e) => {
            if clip_rootfs::users(&d.paths, key).is_empty() && !lock(&d.pinned).contains(key) {
                let _ = d.unmount(image_mount, true);
            }
            return Err(e.into());
        }
    };
    // What the container reads first goes into the image's profile: for
    // its first seconds, or (clipctl record) until it is released.
    let window = if record {
        std::time::Duration::from_secs(365 * 24 * 3600)
    } else {
        std::time::Duration::from_secs(d.opts.record_secs)
    };
    d.record(image_mount, window);
    d.starting(id.into());
    Ok(Reply::Prepared(Prepared {
        id: id.into(),
        rootfs: r.rootfs,
        bundle: d.paths.bundle(id),
        config: String::from_utf8_lossy(&file.index.image.config).into_owned(),
        image: m.reference.clone(),
        index: m.index_path.clone(),
    }))
}

fn release(d: &Daemon, id: &str) -> Result<()> {
    if !d.paths.container_dir(id).exists() && d.mounter.mount_at(&d.paths.rootfs(id)).is_none() {
        bail!("no container {id}");
    }
    let key = clip_rootfs::release(&d.paths, d.mounter.as_ref(), id)?;
    d.ended(id);
    if let Some(key) = key {
        let dir = d.paths.image_mount(&key);
        // A recording ends with its container (clipctl record).
        d.flush_recording(&dir);
        d.retire_image(&dir, &key, Some(std::time::Duration::from_secs(d.opts.image_linger)));
    }
    Ok(())
}

fn ps(d: &Daemon) -> PsReply {
    let containers: Vec<ContainerInfo> = clip_rootfs::list(&d.paths)
        .into_iter()
        .map(|id| {
            let key = clip_rootfs::image_of(&d.paths, &id).unwrap_or_default();
            let image = lock(&d.mounts)
                .get(&d.paths.image_mount(&key))
                .map(|m| m.image.clone())
                .unwrap_or_default();
            ContainerInfo {
                rootfs: d.paths.rootfs(&id),
                overlay: clip_rootfs::overlay_of(&d.paths, &id),
                image,
                id,
            }
        })
        .collect();
    let mounts = lock(&d.mounts)
        .iter()
        .map(|(dir, m)| MountInfo {
            dir: dir.clone(),
            image: m.image.clone(),
            manifest_digest: m.manifest_digest.clone(),
            index: m.record.index.clone(),
            origin: crate::images::origin_of(&m.record.index),
            containers: m
                .record
                .key
                .as_deref()
                .map(|k| clip_rootfs::users(&d.paths, k))
                .unwrap_or_default(),
            live: true,
        })
        .collect();
    PsReply { mounts, containers }
}

/// Index files in use by a mount (the ones `rmi` and `prune` keep).
fn indexes_in_use(d: &Daemon) -> std::collections::HashSet<PathBuf> {
    lock(&d.mounts).values().map(|m| m.record.index.clone()).collect()
}

fn images(d: &Daemon) -> Vec<clip_api::ImageInfo> {
    let used = indexes_in_use(d);
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(d.paths.index_dir()) else {
        return out;
    };
    for e in dir.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "clip") {
            continue;
        }
        let Ok(f) = d.images.peek(&path) else { continue };
        let md = e.metadata().ok();
        out.push(clip_api::ImageInfo {
            reference: f.index.image.reference.clone(),
            manifest_digest: f.index.image.manifest_digest.clone(),
            index_bytes: md.as_ref().map_or(0, |m| m.len()),
            created: md
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |t| t.as_secs()),
            size: f.index.layers.iter().map(|l| l.uncompressed_size).sum(),
            mounted: used.contains(&path),
            origin: crate::images::origin_of(&path),
            index: path,
        });
    }
    out.sort_by(|a, b| a.reference.cmp(&b.reference).then(a.index.cmp(&b.index)));
    out
}

/// Deletes a stored index and what sits beside it (profile, origin).
fn delete_index(d: &Daemon, path: &Path) -> Result<()> {
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    for ext in ["profile", "origin", "hints"] {
        let _ = std::fs::remove_file(path.with_extension(ext));
    }
    d.images.forget(path);
    Ok(())
}

fn remove_image(d: &Daemon, name: &str) -> Result<String> {
    let all = images(d);
    let bare = name.strip_prefix("sha256:").unwrap_or(name);
    let matches: Vec<&clip_api::ImageInfo> = all
        .iter()
        .filter(|i| {
            let reference_matches = i.reference == name
                || i.reference == format!("{name}:latest")
                || i.reference.rsplit_once('/').is_some_and(|(_, last)| last == name);
            let digest_matches = bare.len() >= 12 && i.manifest_digest.trim_start_matches("sha256:").starts_with(bare);
            reference_matches || digest_matches || i.index == Path::new(name)
        })
        .collect();
    match matches.as_slice() {
        [] => bail!("no stored index for {name} (see clipctl images)"),
        [one] => {
            if one.mounted {
                bail!(
                    "{} is mounted: unmount it (and remove its containers) first",
                    one.reference
                );
            }
            delete_index(d, &one.index)?;
            Ok(format!("removed {} ({})", one.reference, one.manifest_digest))
        }
        many => bail!(
            "{name} names {} stored indexes: give the digest ({})",
            many.len(),
            many.iter()
                .map(|i| i.manifest_digest.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn prune(d: &Daemon) -> Result<String> {
    let mut removed = 0;
    let mut kept = 0;
    for i in images(d) {
        if i.mounted {
            kept += 1;
        } else {
            delete_index(d, &i.index)?;
            removed += 1;
        }
    }
    let spans = if kept == 0 && lock(&d.mounts).is_empty() {
        match d.store.disk() {
            Some(c) => format!(", {} bytes of cached spans", c.clear()?),
            None => String::new(),
        }
    } else {
        ", cached spans kept (images are mounted)".to_string()
    };
    Ok(format!("removed {removed} indexes ({kept} in use kept){spans}"))
}
