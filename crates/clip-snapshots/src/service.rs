//! The gRPC service.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::filter::Filter;
use crate::meta::{now, Kind, Meta, Remote, Snap, Store};
use crate::proto::containerd::services::snapshots::v1 as pb;
use crate::proto::containerd::types::Mount;
use crate::{Error, Result, CLIP_IMAGE, CRI_IMAGE_REF, CRI_MANIFEST, TARGET_REF};
use pb::snapshots_server::{Snapshots, SnapshotsServer};

/// What the snapshotter needs of clip's node service. Calls block; they
/// run off the gRPC threads.
pub trait Images: Send + Sync + 'static {
    /// Readies `image` (manifest `manifest`) to be served lazily: its index
    /// stored, found published or built. An error says why clip cannot
    /// serve it (containerd then pulls it).
    fn ensure(&self, image: &str, manifest: &str) -> std::result::Result<(), String>;
    /// The image's read-only merged tree, mounted if it is not.
    fn mount(&self, image: &str, manifest: &str) -> std::result::Result<PathBuf, String>;
    /// No snapshot uses the image any more.
    fn release(&self, image: &str, manifest: &str);
}

pub struct Snapshotter<I> {
    store: Arc<Store>,
    images: Arc<I>,
}

impl<I: Images> Snapshotter<I> {
    pub fn new(store: Arc<Store>, images: Arc<I>) -> Self {
        Self { store, images }
    }
}

/// The containerd namespace a request is for, from gRPC metadata when the
/// caller sends it. containerd 1.6 sends it on some calls only (none on
/// ctr's pulls); the keys its metadata store passes carry the namespace
/// (`NS/ID/NAME`), so calls without it share one space here.
fn namespace<T>(r: &Request<T>) -> Result<String, Status> {
    match r.metadata().get("containerd-namespace").map(|v| v.to_str()) {
        Some(Ok(ns)) => Ok(ns.to_string()),
        Some(Err(_)) => Err(Status::invalid_argument("malformed containerd-namespace")),
        None => Ok(String::new()),
    }
}

fn ts((secs, nanos): (i64, i32)) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: secs, nanos }
}

fn info(key: &str, s: &Snap) -> pb::Info {
    pb::Info {
        name: key.to_string(),
        parent: s.parent.clone(),
        kind: match s.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(ts(s.created)),
        updated_at: Some(ts(s.updated)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

/// A layer below a snapshot: a local directory, or an image clip serves
/// (whose merged tree holds every layer below it too).
enum Lower {
    Dir(PathBuf),
    Image(Remote),
}

fn lowers(store: &Store, space: &BTreeMap<String, Snap>, parent: &str) -> Result<Vec<Lower>> {
    let mut out = Vec::new();
    let mut cur = parent.to_string();
    while !cur.is_empty() {
        let s = space.get(&cur).ok_or_else(|| Error::NotFound(cur.clone()))?;
        if s.kind != Kind::Committed {
            return Err(Error::FailedPrecondition(format!("parent {cur:?} is not committed")));
        }
        if let Some(r) = &s.remote {
            out.push(Lower::Image(r.clone()));
            break;
        }
        out.push(Lower::Dir(store.fs(s.id)));
        cur = s.parent.clone();
    }
    Ok(out)
}

fn bind(source: &Path, rw: bool) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("a snapshot operation panicked: {e}")))
}

impl<I: Images> Snapshotter<I> {
    /// The mounts of snapshot `key`, its image lowers mounted as needed.
    fn mounts_of(&self, ns: &str, key: &str) -> Result<Vec<Mount>> {
        let (snap, lows) = {
            let meta = self.store.lock();
            let snap = meta.get(ns, key)?.clone();
            if snap.kind == Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is committed: it has no mounts"
                )));
            }
            let space = meta.spaces.get(ns).expect("the snapshot is in it");
            (snap.clone(), lowers(&self.store, space, &snap.parent)?)
        };
        let mut dirs = Vec::new();
        for l in lows {
            dirs.push(match l {
                Lower::Dir(d) => d,
                Lower::Image(r) => self
                    .images
                    .mount(&r.image, &r.manifest)
                    .map_err(|why| Error::FailedPrecondition(format!("image {}: {why}", r.image)))?,
            });
        }
        let (fs, work) = (self.store.fs(snap.id), self.store.work(snap.id));
        let lowerdir = || {
            format!(
                "lowerdir={}",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            )
        };
        Ok(match (snap.kind, dirs.len()) {
            (Kind::Active, 0) => vec![bind(&fs, true)],
            (Kind::Active, _) => vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    "index=off".into(),
                    format!("workdir={}", work.display()),
                    format!("upperdir={}", fs.display()),
                    lowerdir(),
                ],
            }],
            (_, 0) => vec![bind(&fs, false)],
            (_, 1) => vec![bind(&dirs[0], false)],
            _ => vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec!["index=off".into(), "ro".into(), lowerdir()],
            }],
        })
    }

    fn create_snap(
        &self,
        ns: &str,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        kind: Kind,
    ) -> Result<()> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("a snapshot needs a key".into()));
        }
        let mut meta = self.store.lock();
        if meta.spaces.get(ns).is_some_and(|s| s.contains_key(key)) {
            return Err(Error::AlreadyExists(key.to_string()));
        }
        if !parent.is_empty() {
            let p = meta.get(ns, parent)?;
            if p.kind != Kind::Committed {
                return Err(Error::FailedPrecondition(format!("parent {parent:?} is not committed")));
            }
        }
        meta.next_id += 1;
        let id = meta.next_id;
        self.store.make_dirs(id)?;
        let t = now();
        meta.space(ns).insert(
            key.to_string(),
            Snap {
                id,
                kind,
                parent: parent.to_string(),
                labels,
                created: t,
                updated: t,
                remote: None,
            },
        );
        let r = self.store.save(&meta);
        if r.is_err() {
            meta.space(ns).remove(key);
            let _ = std::fs::remove_dir_all(self.store.dir(id));
        }
        r
    }

    /// A layer clip serves: committed at once under its target name.
    fn commit_remote(
        &self,
        ns: &str,
        target: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: Remote,
    ) -> Result<()> {
        let mut meta = self.store.lock();
        if meta.spaces.get(ns).is_some_and(|s| s.contains_key(target)) {
            return Ok(());
        }
        if !parent.is_empty() {
            meta.get(ns, parent)?;
        }
        meta.next_id += 1;
        let id = meta.next_id;
        let t = now();
        let mut labels = labels;
        labels.insert(CLIP_IMAGE.into(), remote.image.clone());
        meta.space(ns).insert(
            target.to_string(),
            Snap {
                id,
                kind: Kind::Committed,
                parent: parent.to_string(),
                labels,
                created: t,
                updated: t,
                remote: Some(remote),
            },
        );
        self.store.save(&meta)
    }

    fn remove_snap(&self, ns: &str, key: &str) -> Result<()> {
        let (snap, still_used) = {
            let mut meta = self.store.lock();
            meta.get(ns, key)?;
            let space = meta.space(ns);
            if let Some(child) = space.iter().find(|(_, s)| s.parent == key).map(|(k, _)| k.clone()) {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is the parent of {child:?}"
                )));
            }
            let snap = space.remove(key).expect("checked above");
            if let Err(e) = self.store.save(&meta) {
                meta.space(ns).insert(key.to_string(), snap);
                return Err(e);
            }
            let used = snap.remote.as_ref().is_some_and(|r| {
                meta.spaces
                    .values()
                    .flat_map(|s| s.values())
                    .any(|s| s.remote.as_ref() == Some(r))
            });
            (snap, used)
        };
        match &snap.remote {
            Some(r) if !still_used => self.images.release(&r.image, &r.manifest),
            Some(_) => {}
            None => {
                let dir = self.store.dir(snap.id);
                std::fs::remove_dir_all(&dir).map_err(|source| Error::Io {
                    what: format!("removing {}", dir.display()),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Removes directories no snapshot owns (left by a crash).
    fn cleanup_dirs(&self) -> Result<()> {
        let owned: std::collections::HashSet<String> = {
            let meta = self.store.lock();
            meta.spaces
                .values()
                .flat_map(|s| s.values())
                .map(|s| s.id.to_string())
                .collect()
        };
        let dir = self.store.root().join("snapshots");
        let entries = std::fs::read_dir(&dir).map_err(|source| Error::Io {
            what: format!("reading {}", dir.display()),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !owned.contains(&name) {
                tracing::info!(dir = %e.path().display(), "removing a snapshot directory nothing owns");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }
}

/// Bytes and inodes under `dir`, not following symlinks or other mounts.
fn usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let (mut size, mut inodes) = (0i64, 0i64);
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != top.dev() || !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            size += (m.blocks() * 512) as i64;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (size, inodes)
}

#[tonic::async_trait]
impl<I: Images> Snapshots for Arc<Snapshotter<I>> {
    async fn prepare(
        &self,
        r: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let ns = namespace(&r)?;
        let req = r.into_inner();
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        if let (Some(target), Some(image), Some(manifest)) = (
            labels.get(TARGET_REF),
            labels.get(CRI_IMAGE_REF),
            labels.get(CRI_MANIFEST),
        ) {
            let (target, image, manifest) = (target.clone(), image.clone(), manifest.clone());
            let me = self.clone();
            let ready = {
                let (image, manifest) = (image.clone(), manifest.clone());
                blocking(move || me.images.ensure(&image, &manifest)).await?
            };
            match ready {
                Ok(()) => {
                    let me = self.clone();
                    let (ns2, parent) = (ns.clone(), req.parent.clone());
                    let remote = Remote {
                        image: image.clone(),
                        manifest,
                    };
                    blocking(move || me.commit_remote(&ns2, &target, &parent, labels, remote)).await??;
                    tracing::info!(%ns, key = %req.key, %image, "layer served by clip");
                    // containerd's unpacker: the target exists, skip the layer.
                    return Err(Status::already_exists(format!("target snapshot {:?}", req.key)));
                }
                Err(why) => {
                    tracing::warn!(%image, "clip cannot serve this image ({why}); containerd pulls it");
                }
            }
        }
        let me = self.clone();
        let (ns2, key) = (ns.clone(), req.key.clone());
        let mounts = blocking(move || {
            me.create_snap(&ns2, &key, &req.parent, labels, Kind::Active)?;
            me.mounts_of(&ns2, &key)
        })
        .await??;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(&self, r: Request<pb::ViewSnapshotRequest>) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let ns = namespace(&r)?;
        let req = r.into_inner();
        let me = self.clone();
        let mounts = blocking(move || {
            me.create_snap(&ns, &req.key, &req.parent, req.labels.into_iter().collect(), Kind::View)?;
            me.mounts_of(&ns, &req.key)
        })
        .await??;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(&self, r: Request<pb::MountsRequest>) -> Result<Response<pb::MountsResponse>, Status> {
        let ns = namespace(&r)?;
        let key = r.into_inner().key;
        let me = self.clone();
        let mounts = blocking(move || me.mounts_of(&ns, &key)).await??;
        Ok(Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&r)?;
        let req = r.into_inner();
        let mut meta = self.store.lock();
        let snap = meta.get(&ns, &req.key)?.clone();
        if snap.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!("snapshot {:?} is not active", req.key)).into());
        }
        if meta.spaces.get(&ns).is_some_and(|s| s.contains_key(&req.name)) {
            return Err(Error::AlreadyExists(req.name).into());
        }
        let space = meta.space(&ns);
        space.remove(&req.key);
        let mut labels = snap.labels.clone();
        labels.extend(req.labels);
        space.insert(
            req.name.clone(),
            Snap {
                kind: Kind::Committed,
                labels,
                updated: now(),
                ..snap.clone()
            },
        );
        if let Err(e) = self.store.save(&meta) {
            let space = meta.space(&ns);
            space.remove(&req.name);
            space.insert(req.key, snap);
            return Err(e.into());
        }
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&r)?;
        let key = r.into_inner().key;
        let me = self.clone();
        blocking(move || me.remove_snap(&ns, &key)).await??;
        Ok(Response::new(()))
    }

    async fn stat(&self, r: Request<pb::StatSnapshotRequest>) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let ns = namespace(&r)?;
        let key = r.into_inner().key;
        let meta = self.store.lock();
        let s = meta.get(&ns, &key)?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(&key, s)),
        }))
    }

    async fn update(
        &self,
        r: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let ns = namespace(&r)?;
        let req = r.into_inner();
        let new = req.info.ok_or_else(|| Status::invalid_argument("no info to update"))?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let mut meta = self.store.lock();
        meta.get(&ns, &new.name)?;
        let before = meta.space(&ns)[&new.name].clone();
        let s = meta.space(&ns).get_mut(&new.name).expect("checked above");
        if paths.is_empty() {
            // Labels are the only mutable field.
            s.labels = new.labels.into_iter().collect();
        } else {
            for p in &paths {
                if p == "labels" {
                    s.labels = new.labels.clone().into_iter().collect();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match new.labels.get(k) {
                        Some(v) => s.labels.insert(k.to_string(), v.clone()),
                        None => s.labels.remove(k),
                    };
                } else {
                    return Err(Status::invalid_argument(format!("cannot update field {p:?}")));
                }
            }
        }
        s.updated = now();
        let out = info(&new.name, s);
        if let Err(e) = self.store.save(&meta) {
            meta.space(&ns).insert(new.name, before);
            return Err(e.into());
        }
        Ok(Response::new(pb::UpdateSnapshotResponse { info: Some(out) }))
    }

    type ListStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(&self, r: Request<pb::ListSnapshotsRequest>) -> Result<Response<Self::ListStream>, Status> {
        let ns = namespace(&r)?;
        let filters = r
            .into_inner()
            .filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>>>()?;
        let infos: Vec<pb::Info> = {
            let meta = self.store.lock();
            let empty = BTreeMap::new();
            let space = meta.spaces.get(&ns).unwrap_or(&empty);
            space
                .iter()
                .filter(|(key, s)| {
                    let get = |f: &[String]| -> Option<String> {
                        match f {
                            [n] if n == "name" => Some(key.to_string()),
                            [n] if n == "parent" => Some(s.parent.clone()),
                            [n] if n == "kind" => Some(s.kind.name().to_string()),
                            [l, rest @ ..] if l == "labels" && !rest.is_empty() => {
                                s.labels.get(&rest.join(".")).cloned()
                            }
                            _ => None,
                        }
                    };
                    filters.is_empty() || filters.iter().any(|f| f.matches(&get))
                })
                .map(|(k, s)| info(k, s))
                .collect()
        };
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(&self, r: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let ns = namespace(&r)?;
        let key = r.into_inner().key;
        let (id, remote) = {
            let meta = self.store.lock();
            let s = meta.get(&ns, &key)?;
            (s.id, s.remote.is_some())
        };
        // A layer clip serves takes no room here: its bytes are in clip's
        // span cache, shared by every image.
        if remote {
            return Ok(Response::new(pb::UsageResponse { size: 0, inodes: 0 }));
        }
        let fs = self.store.fs(id);
        let (size, inodes) = blocking(move || usage(&fs)).await?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, r: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        namespace(&r).ok();
        let me = self.clone();
        blocking(move || me.cleanup_dirs()).await??;
        Ok(Response::new(()))
    }
}

/// Serves the snapshots API on `listener` until the future is dropped.
pub async fn serve<I: Images>(
    listener: tokio::net::UnixListener,
    snapshotter: Arc<Snapshotter<I>>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(snapshotter))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
}

impl Meta {
    /// Snapshots whose image clip serves, for a restart to mount again.
    pub fn remotes(&self) -> Vec<Remote> {
        // Each image once, however many of its layers are snapshots.
        let mut v: Vec<Remote> = Vec::new();
        for r in self
            .spaces
            .values()
            .flat_map(|s| s.values())
            .filter_map(|s| s.remote.as_ref())
        {
            if !v.contains(r) {
                v.push(r.clone());
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CRI_LAYER, TARGET_REF};
    use std::sync::Mutex;

    /// Images behind a switch: served from a fixed directory, or refused.
    struct Fake {
        tree: PathBuf,
        refuse: bool,
        released: Mutex<Vec<String>>,
    }

    impl Images for Fake {
        fn ensure(&self, image: &str, _: &str) -> std::result::Result<(), String> {
            if self.refuse {
                Err(format!("{image}: unauthorized"))
            } else {
                Ok(())
            }
        }
        fn mount(&self, _: &str, _: &str) -> std::result::Result<PathBuf, String> {
            Ok(self.tree.clone())
        }
        fn release(&self, image: &str, _: &str) {
            self.released.lock().unwrap().push(image.into());
        }
    }

    fn req<T>(t: T) -> Request<T> {
        let mut r = Request::new(t);
        r.metadata_mut()
            .insert("containerd-namespace", "k8s.io".parse().unwrap());
        r
    }

    fn snapshotter(root: &Path, refuse: bool) -> Arc<Snapshotter<Fake>> {
        let tree = root.join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        Arc::new(Snapshotter::new(
            Arc::new(Store::open(&root.join("snap")).unwrap()),
            Arc::new(Fake {
                tree,
                refuse,
                released: Mutex::new(Vec::new()),
            }),
        ))
    }

    fn layer_labels(target: &str) -> std::collections::HashMap<String, String> {
        [
            (TARGET_REF, target),
            (CRI_IMAGE_REF, "r.example/app:1"),
            (CRI_MANIFEST, "sha256:m"),
            (CRI_LAYER, "sha256:l"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn prepare(
        s: &Arc<Snapshotter<Fake>>,
        rt: &tokio::runtime::Runtime,
        key: &str,
        parent: &str,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        rt.block_on(s.prepare(req(pb::PrepareSnapshotRequest {
            snapshotter: "clip".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        })))
        .map(|r| r.into_inner().mounts)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn served_layers_are_committed_at_once_and_containers_overlay_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let s = snapshotter(dir.path(), false);
        let e = prepare(&s, &rt, "extract-1 sha256:a", "", layer_labels("sha256:a")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        let e = prepare(&s, &rt, "extract-2 sha256:b", "sha256:a", layer_labels("sha256:b")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        let info = rt
            .block_on(s.stat(req(pb::StatSnapshotRequest {
                snapshotter: "clip".into(),
                key: "sha256:b".into(),
            })))
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.kind, pb::Kind::Committed as i32);
        assert_eq!(info.parent, "sha256:a");
        assert_eq!(info.labels[CLIP_IMAGE], "r.example/app:1");
        // A container: overlay with the image's tree as its only lower.
        let m = prepare(&s, &rt, "ctr", "sha256:b", Default::default()).unwrap();
        assert_eq!(m[0].r#type, "overlay");
        let tree = dir.path().join("tree");
        assert!(m[0].options.contains(&format!("lowerdir={}", tree.display())), "{m:?}");
        // A parent cannot go before its child.
        let e = rt
            .block_on(s.remove(req(pb::RemoveSnapshotRequest {
                snapshotter: "clip".into(),
                key: "sha256:b".into(),
            })))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        // Listing with containerd's filters.
        let list = |filters: Vec<&str>| -> Vec<String> {
            use tokio_stream::StreamExt;
            rt.block_on(async {
                let mut st = s
                    .list(req(pb::ListSnapshotsRequest {
                        snapshotter: "clip".into(),
                        filters: filters.into_iter().map(String::from).collect(),
                    }))
                    .await
                    .unwrap()
                    .into_inner();
                let mut out = Vec::new();
                while let Some(r) = st.next().await {
                    out.extend(r.unwrap().info.into_iter().map(|i| i.name));
                }
                out
            })
        };
        assert_eq!(list(vec![]).len(), 3);
        assert_eq!(list(vec!["parent==sha256:a"]), vec!["sha256:b"]);
        assert_eq!(list(vec!["kind==active", "name==sha256:a"]).len(), 2);
        assert_eq!(
            list(vec![r#"labels."containerd.io/snapshot.ref"==sha256:a"#]),
            vec!["sha256:a"]
        );
        // Labels are updated, field by field.
        let mut labels = std::collections::HashMap::new();
        labels.insert("containerd.io/gc.root".to_string(), "now".to_string());
        let info = rt
            .block_on(s.update(req(pb::UpdateSnapshotRequest {
                snapshotter: "clip".into(),
                info: Some(pb::Info {
                    name: "ctr".into(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["labels.containerd.io/gc.root".into()],
                }),
            })))
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.labels["containerd.io/gc.root"], "now");
        // A restart finds every snapshot; removing the image's last one
        // lets the image go.
        let s = snapshotter(dir.path(), false);
        let restored = rt
            .block_on(s.stat(req(pb::StatSnapshotRequest {
                snapshotter: "clip".into(),
                key: "ctr".into(),
            })))
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(restored.labels["containerd.io/gc.root"], "now");
        for key in ["ctr", "sha256:b", "sha256:a"] {
            rt.block_on(s.remove(req(pb::RemoveSnapshotRequest {
                snapshotter: "clip".into(),
                key: key.into(),
            })))
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        assert_eq!(*s.images.released.lock().unwrap(), vec!["r.example/app:1".to_string()]);
    }

    #[test]
    fn an_image_clip_cannot_serve_gets_plain_overlay_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let s = snapshotter(dir.path(), true);
        let m = prepare(&s, &rt, "extract-1 sha256:a", "", layer_labels("sha256:a")).unwrap();
        assert_eq!((m[0].r#type.as_str(), m[0].options[0].as_str()), ("bind", "rw"));
        let fs = PathBuf::from(&m[0].source);
        std::fs::write(fs.join("file"), vec![7u8; 10_000]).unwrap();
        rt.block_on(s.commit(req(pb::CommitSnapshotRequest {
            snapshotter: "clip".into(),
            name: "sha256:a".into(),
            key: "extract-1 sha256:a".into(),
            labels: Default::default(),
        })))
        .unwrap();
        let usage = rt
            .block_on(s.usage(req(pb::UsageRequest {
                snapshotter: "clip".into(),
                key: "sha256:a".into(),
            })))
            .unwrap()
            .into_inner();
        assert!(usage.size >= 10_000 && usage.inodes == 1, "{usage:?}");
        let v = rt
            .block_on(s.view(req(pb::ViewSnapshotRequest {
                snapshotter: "clip".into(),
                key: "v".into(),
                parent: "sha256:a".into(),
                labels: Default::default(),
            })))
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(
            (v[0].r#type.as_str(), v[0].source.as_str(), v[0].options[0].as_str()),
            ("bind", m[0].source.as_str(), "ro")
        );
        // Directories nothing owns go at Cleanup.
        let stray = s.store.dir(999);
        std::fs::create_dir_all(&stray).unwrap();
        rt.block_on(s.cleanup(req(pb::CleanupRequest {
            snapshotter: "clip".into(),
        })))
        .unwrap();
        assert!(!stray.exists() && fs.exists());
    }
}
