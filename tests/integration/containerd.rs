//! containerd with clip as its snapshotter (issue 14): a real containerd
//! 1.6 with a generated config, clipd serving the snapshots API as a proxy
//! plugin, a real registry. Driven through the CRI as the kubelet does,
//! and through `ctr`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;

use crate::harness::{layout, Registry};

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node: clipd with the snapshotter, and containerd using it.
pub(crate) struct Node {
    dir: tempfile::TempDir,
    clipd: Child,
    containerd: Child,
}

impl Node {
    pub(crate) fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn clip_env(c: &mut Command, dir: &Path) {
        c.env("CLIP_BASE_DIR", dir.join("base"))
            .env("CLIP_CACHE_DIR", dir.join("cache"))
            .env("CLIP_RUN_DIR", dir.join("run"))
            .env("CLIP_IMAGE_LINGER", "0");
    }

    fn start_clipd(dir: &Path) -> Child {
        let mut c = Command::new(env!("CARGO_BIN_EXE_clipd"));
        c.arg("--snapshotter-socket")
            .arg(dir.join("snapshotter.sock"))
            .arg("--snapshotter-root")
            .arg(dir.join("containerd/root/io.containerd.snapshotter.v1.clip"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("clipd.err")).unwrap());
        Self::clip_env(&mut c, dir);
        let child = c.spawn().unwrap();
        let sock = dir.join("snapshotter.sock");
        wait_for("clipd's snapshotter socket", || sock.exists());
        child
    }

    /// A node pulling over plain HTTP from `registries`, its sandbox image
    /// from the first.
    pub(crate) fn start(registries: &[&str]) -> Node {
        Self::start_with(registries, true)
    }

    /// The same; with `clip` false the CRI uses containerd's own overlayfs
    /// snapshotter (clipd still runs).
    pub(crate) fn start_with(registries: &[&str], clip: bool) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let clipd = Self::start_clipd(d);
        for r in registries {
            let hosts = d.join("certs.d").join(r);
            std::fs::create_dir_all(&hosts).unwrap();
            std::fs::write(
                hosts.join("hosts.toml"),
                format!("server = \"http://{r}\"\n[host.\"http://{r}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
            )
            .unwrap();
        }
        let registry = registries[0];
        // clip's part is what `clipctl containerd-config` prints.
        let mut snippet = crate::harness::clipctl();
        snippet
            .arg("containerd-config")
            .arg("--socket")
            .arg(d.join("snapshotter.sock"));
        let snippet = if clip { run(&mut snippet) } else { String::new() };
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{registry}/clip/pause:latest"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
{snippet}"#,
            root = d.join("containerd/root").display(),
            state = d.join("containerd/state").display(),
            sock = d.join("containerd.sock").display(),
            certs = d.join("certs.d").display(),
        );
        std::fs::write(d.join("containerd.toml"), config).unwrap();
        let containerd = Command::new("containerd")
            .arg("--config")
            .arg(d.join("containerd.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("containerd.log")).unwrap())
            .spawn()
            .unwrap();
        let node = Node { dir, clipd, containerd };
        let sock = node.path("containerd.sock");
        wait_for("containerd's socket", || sock.exists());
        node
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.path("containerd.sock")).args(args);
        c
    }

    fn clipctl(&self, args: &[&str]) -> Command {
        let mut c = crate::harness::clipctl();
        c.args(args);
        Self::clip_env(&mut c, self.dir.path());
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("containerd.log")).unwrap_or_default()
            + &std::fs::read_to_string(self.path("clipd.err")).unwrap_or_default()
            + &std::fs::read_to_string(self.path("run/clipd.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.containerd.kill();
        let _ = self.containerd.wait();
        // A test that failed midway leaves its pods' shims running (and
        // their containers, the shims' children): not past the test.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                // `[c]`: the pattern does not match this shell's own command line.
                "for p in $(pgrep -f '[c]ontainerd-shim.* -address {sock}'); do pkill -9 -P $p; kill -9 $p; done",
                sock = self.path("containerd.sock").display()
            ))
            .status();
        // Whatever containerd left running.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for m in $(grep -o ' {d}[^ ]*' /proc/self/mountinfo | sort -r); do umount -l $m; done",
                d = self.dir.path().display()
            ))
            .status();
        let _ = self.clipctl(&["daemon", "stop"]).output();
        let _ = self.clipd.kill();
        let _ = self.clipd.wait();
    }
}

/// A registry of the test's own with debian, busybox and a pause image
/// (busybox sleeping: nothing outside is reachable).
pub(crate) fn registry_with_images(tmp: &Path) -> Registry {
    let storage = tmp.join("registry");
    let reg = Registry::start(&storage);
    for tag in ["debian", "busybox"] {
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout().display()))
            .arg(format!("docker://{}/clip/{tag}:latest", reg.host())));
    }
    let pause = tmp.join("pause");
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:busybox", layout().display()))
        .arg(format!("oci:{}:pause", pause.display())));
    run(Command::new("umoci")
        .args(["config", "--image"])
        .arg(format!("{}:pause", pause.display()))
        .args(["--config.entrypoint", "/bin/sleep", "--config.cmd", "100000"]));
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:pause", pause.display()))
        .arg(format!("docker://{}/clip/pause:latest", reg.host())));
    reg
}

/// A CRI client on containerd's socket.
pub(crate) struct Cri {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) runtime: cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    pub(crate) images: cri::image_service_client::ImageServiceClient<tonic::transport::Channel>,
}

impl Cri {
    pub(crate) fn connect(sock: PathBuf) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Lazy: containerd may have made its socket and not yet listen on
        // it; the Version calls below wait until it answers.
        let channel = {
            let _guard = rt.enter();
            tonic::transport::Endpoint::try_from("http://[::]")
                .unwrap()
                .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
                    let sock = sock.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(sock).await?,
                        ))
                    }
                }))
        };
        let runtime = cri::runtime_service_client::RuntimeServiceClient::new(channel.clone());
        let images = cri::image_service_client::ImageServiceClient::new(channel);
        let mut c = Cri { rt, runtime, images };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut r = c.runtime.clone();
            if c.rt.block_on(r.version(cri::VersionRequest::default())).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "the CRI did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        c.runtime = c.runtime.clone();
        c
    }

    pub(crate) fn pull(&mut self, image: &str) {
        let mut i = self.images.clone();
        self.rt
            .block_on(i.pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .unwrap_or_else(|e| panic!("pulling {image}: {e}"));
    }

    pub(crate) fn sandbox_config(name: &str, logs: &Path) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "clip-test".into(),
                attempt: 0,
            }),
            log_directory: logs.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub(crate) fn sandbox(&mut self, config: &cri::PodSandboxConfig) -> String {
        let mut r = self.runtime.clone();
        self.rt
            .block_on(r.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                ..Default::default()
            }))
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"))
            .into_inner()
            .pod_sandbox_id
    }

    /// Creates and starts a container; returns its id.
    pub(crate) fn start(
        &mut self,
        pod: &str,
        config: &cri::PodSandboxConfig,
        name: &str,
        image: &str,
        cmd: &[&str],
    ) -> String {
        let mut r = self.runtime.clone();
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                command: cmd.iter().map(|s| s.to_string()).collect(),
                log_path: format!("{name}.log"),
                ..Default::default()
            }),
            sandbox_config: Some(config.clone()),
        };
        // As the kubelet does: a call that finds containerd's connection to
        // the snapshotter broken (clipd's worker restarted) is made again.
        let mut tries = 0;
        let id = loop {
            match self.rt.block_on(r.create_container(req.clone())) {
                Ok(resp) => break resp.into_inner().container_id,
                Err(e) if e.code() == tonic::Code::Unavailable && tries < 60 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("CreateContainer: {e}"),
            }
        };
        self.rt
            .block_on(r.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }))
            .unwrap_or_else(|e| panic!("StartContainer: {e}"));
        id
    }

    /// Creates and starts a container; returns its id once it has exited.
    pub(crate) fn run_to_exit(
        &mut self,
        pod: &str,
        config: &cri::PodSandboxConfig,
        name: &str,
        image: &str,
        cmd: &[&str],
    ) -> String {
        let id = self.start(pod, config, name, image, cmd);
        let mut r = self.runtime.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = self
                .rt
                .block_on(r.container_status(cri::ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                }))
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if st.state == cri::ContainerState::ContainerExited as i32 {
                assert_eq!(st.exit_code, 0, "{name} exited with {}", st.exit_code);
                break;
            }
            assert!(Instant::now() < deadline, "{name} did not exit");
            std::thread::sleep(Duration::from_millis(100));
        }
        id
    }

    pub(crate) fn remove_container(&mut self, id: &str) {
        let mut r = self.runtime.clone();
        self.rt
            .block_on(r.remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            }))
            .unwrap();
    }

    pub(crate) fn remove_sandbox(&mut self, pod: &str) {
        let mut r = self.runtime.clone();
        self.rt
            .block_on(r.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }))
            .unwrap();
        self.rt
            .block_on(r.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }))
            .unwrap();
    }
}

/// The output lines of a CRI log file (`TIME STREAM TAG TEXT`).
pub(crate) fn cri_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn md5_of_unpacked(files: &[&str]) -> String {
    let u = crate::harness::unpacked("debian");
    let list: Vec<String> = files.iter().map(|f| format!("{}{f}", u.display())).collect();
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("cat {} | md5sum", list.join(" ")))
        .output()
        .unwrap();
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn the_cri_starts_containers_lazily_from_clip() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry_with_images(tmp.path());
    let proxy = crate::proxy::FaultProxy::start(reg.port);
    // The image's index is published (as CI would, after the push): the
    // node reads no layer whole, not even to index it.
    let ci = tempfile::tempdir().unwrap();
    let _ci_daemon = crate::harness::DaemonGuard::new(ci.path());
    let mut push = crate::harness::clipctl();
    push.args([
        "index",
        "--push",
        "--image",
        &format!("{}/clip/debian:latest", reg.host()),
    ]);
    crate::mount::env(&mut push, ci.path());
    run(&mut push);
    let node = Node::start(&[&proxy.host()]);
    let mut c = Cri::connect(node.path("containerd.sock"));
    let image = format!("{}/clip/debian:latest", proxy.host());
    let layers = crate::harness::layer_digests("debian");
    proxy.log.lock().unwrap().clear();
    c.pull(&image);
    let logs = tmp.path().join("pods");
    std::fs::create_dir_all(&logs).unwrap();
    let config = Cri::sandbox_config("lazy", &logs);
    let pod = c.sandbox(&config);
    let files = ["/usr/bin/bash", "/opt/clip/random.bin"];
    let cmd = format!("cat {} | md5sum", files.join(" "));
    // Runs the files' md5sum in a new container of the image to its exit
    // and checks it against the unpacked image's; the container's id.
    let md5_run = |c: &mut Cri, name: &str| {
        let id = c.run_to_exit(&pod, &config, name, &image, &["sh", "-c", &cmd]);
        assert_eq!(
            cri_log(&logs.join(format!("{name}.log"))),
            md5_of_unpacked(&files),
            "{}",
            node.log()
        );
        id
    };
    let id = md5_run(&mut c, "first");
    // No full-layer GET of the image's layers: containerd downloaded
    // nothing, clip read ranges.
    crate::proxy::assert_ranges_only(&proxy.log.lock().unwrap(), &layers);
    // The image's layers are clip's snapshots, committed without data.
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(node.path("containerd/root/io.containerd.snapshotter.v1.clip/metadata.json")).unwrap(),
    )
    .unwrap();
    let served: Vec<&str> = meta["spaces"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|s| s.as_object().unwrap().values())
        .filter(|s| s["remote"]["image"].as_str() == Some(image.as_str()))
        .filter_map(|s| s["labels"]["containerd.io/snapshot/cri.layer-digest"].as_str())
        .collect();
    assert_eq!(served.len(), layers.len(), "{meta}");
    let ps = run(&mut node.clipctl(&["ps", "--mounts"]));
    assert!(ps.contains("clip/debian"), "{ps}");
    c.remove_container(&id);

    // A second container of the image reuses the mount.
    // This node's image mounts (other tests mount images too).
    let node_mounts = || {
        let run = format!(" {}/", node.path("run").display());
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains("fuse.clip") && l.contains(&run))
            .count()
    };
    let mounts_before = node_mounts();
    assert!(mounts_before >= 1);
    let id = md5_run(&mut c, "second");
    assert_eq!(mounts_before, node_mounts(), "the image is mounted once");
    c.remove_container(&id);

    // clipd's worker restarts (killed) under a running container: it goes
    // on, and a new container of the image starts.
    let mut r = c.runtime.clone();
    let long = c.start(
        &pod,
        &config,
        "long",
        &image,
        &[
            "sh",
            "-c",
            "while sleep 0.1; do cat /usr/bin/bash | md5sum > /tmp/sum; done",
        ],
    );
    let status = run(&mut node.clipctl(&["daemon", "status", "--json"]));
    let worker = serde_json::from_str::<serde_json::Value>(&status).unwrap()["worker_pid"]
        .as_i64()
        .unwrap();
    let sock = node.path("snapshotter.sock");
    let sock_ino = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&sock).unwrap());
    let bound = sock_ino();
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "containerd's socket is root's alone");
    // SAFETY: kill(2) on the worker's pid.
    assert_eq!(unsafe { libc::kill(worker as i32, libc::SIGKILL) }, 0);
    // The snapshotter socket is the supervisor's: once the dead worker is
    // gone, and whether or not the next one is up yet, a connection is
    // taken (it waits in the backlog), never refused.
    wait_for("the killed worker to be reaped", || {
        !std::path::Path::new(&format!("/proc/{worker}")).exists()
    });
    if let Err(e) = std::os::unix::net::UnixStream::connect(&sock) {
        panic!("the snapshotter socket refused a connection while its worker restarted: {e}");
    }
    wait_for("a new worker", || {
        node.clipctl(&["daemon", "status", "--json"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["worker_pid"].as_i64())
            .is_some_and(|p| p != worker)
    });
    let id = md5_run(&mut c, "after");
    let st =
        c.rt.block_on(r.container_status(cri::ContainerStatusRequest {
            container_id: long.clone(),
            verbose: false,
        }))
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32, "{}", node.log());
    // An upgrade hands the same socket on too: never unbound, never
    // refused.
    run(&mut node.clipctl(&["daemon", "upgrade", "--binary", env!("CARGO_BIN_EXE_clipd")]));
    assert_eq!(sock_ino(), bound, "the snapshotter socket was bound again");
    let upgraded = md5_run(&mut c, "upgraded");
    c.remove_container(&upgraded);
    c.rt.block_on(r.stop_container(cri::StopContainerRequest {
        container_id: long.clone(),
        timeout: 1,
    }))
    .unwrap();
    c.remove_container(&long);
    c.remove_container(&id);
    c.remove_sandbox(&pod);
}

#[test]
fn ctr_pulls_into_clip_snapshots_without_cri_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry_with_images(tmp.path());
    let node = Node::start(&[&reg.host()]);
    let image = format!("{}/clip/busybox:latest", reg.host());
    // ctr adds no CRI labels: containerd downloads and unpacks the layers
    // into clip's overlay snapshots, as with its own overlayfs snapshotter.
    run(&mut node.ctr(&["image", "pull", "--plain-http", "--snapshotter", "clip", &image]));
    let out = run(&mut node.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "clip",
        &image,
        "ctr-test",
        "sh",
        "-c",
        "echo hello from $(cat /etc/hostname 2>/dev/null || echo busybox) > /tmp/x && cat /tmp/x",
    ]));
    assert!(out.starts_with("hello from"), "{out}");
    let snaps = run(&mut node.ctr(&["snapshots", "--snapshotter", "clip", "ls"]));
    assert!(snaps.contains("Committed"), "{snaps}");
    // Stat, usage and removal through containerd.
    let usage = run(&mut node.ctr(&["snapshots", "--snapshotter", "clip", "usage"]));
    assert!(usage.lines().count() >= 2, "{usage}");
    run(&mut node.ctr(&["image", "rm", "--sync", &image]));
    run(&mut node.ctr(&["snapshots", "--snapshotter", "clip", "ls"]));
}

/// An image clip cannot serve is pulled by containerd as usual: here the
/// registry wants credentials that only the CRI's pull request carries
/// (the pull secret does not reach a snapshotter, and this clipd has none
/// of its own).
#[test]
fn an_image_clip_cannot_serve_falls_back_to_containerds_pull() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry_with_images(tmp.path());
    let proxy = crate::proxy::FaultProxy::start(reg.port);
    proxy.bearer("alice", "secret");
    // The sandbox image from the registry itself, without credentials.
    let node = Node::start(&[&reg.host(), &proxy.host()]);
    let mut c = Cri::connect(node.path("containerd.sock"));
    let image = format!("{}/clip/debian:latest", proxy.host());
    let mut i = c.images.clone();
    c.rt.block_on(i.pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        }),
        auth: Some(cri::AuthConfig {
            username: "alice".into(),
            password: "secret".into(),
            ..Default::default()
        }),
        ..Default::default()
    }))
    .unwrap_or_else(|e| panic!("pulling {image}: {e}\n{}", node.log()));
    let log = node.log();
    assert!(log.contains("clip cannot serve this image"), "{log}");
    let logs = tmp.path().join("pods");
    std::fs::create_dir_all(&logs).unwrap();
    let config = Cri::sandbox_config("fallback", &logs);
    let pod = c.sandbox(&config);
    let files = ["/usr/bin/bash", "/opt/clip/random.bin"];
    let cmd = format!("cat {} | md5sum", files.join(" "));
    let id = c.run_to_exit(&pod, &config, "pulled", &image, &["sh", "-c", &cmd]);
    assert_eq!(
        cri_log(&logs.join("pulled.log")),
        md5_of_unpacked(&files),
        "{}",
        node.log()
    );
    c.remove_container(&id);
    c.remove_sandbox(&pod);
}
