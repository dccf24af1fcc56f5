//! The node service (issue 11): one clipd per node serves every mount
//! from one layer store, outlives its own crashes and upgrades without the
//! containers noticing, and starts cached images without the registry.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, clipctl, registry, unpacked, DaemonGuard};
use crate::mount::{daemon_log, daemon_pids, env};
use crate::proxy::FaultProxy;

fn node_cmd(tmp: &Path, args: &[&str]) -> Command {
    let mut c = clipctl();
    c.args(args);
    env(&mut c, tmp);
    c
}

fn ok(mut c: Command) -> Vec<u8> {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?}: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// A container started in the background; its stdout is collected.
struct Background {
    child: Child,
}

impl Background {
    fn start(tmp: &Path, args: &[&str]) -> Self {
        let mut c = node_cmd(tmp, args);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        Self {
            child: c.spawn().unwrap(),
        }
    }

    /// Waits for the container; (exit code, stdout, stderr).
    fn finish(mut self) -> (i32, String, String) {
        let mut out = String::new();
        let mut err = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let status = self.child.wait().unwrap();
        (status.code().unwrap_or(-1), out, err)
    }
}

/// What the containers run: the md5 of every regular file of a directory
/// (symlinks in an image may point at absolute paths, which the host would
/// resolve to its own files).
const MD5S: &str = "find /usr/bin -type f | sort | xargs md5sum";

/// md5 of each regular file of a directory of the unpacked image, by its
/// path in the image.
fn md5s(root: &Path, dir: &str) -> BTreeMap<String, String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find .{dir} -type f | xargs md5sum", root.display()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, p)| (p.trim_start_matches('.').to_string(), h.to_string()))
        .collect()
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
}

#[test]
fn twenty_containers_of_three_images_fetch_each_shared_span_once() {
    let reg = registry();
    let proxy = FaultProxy::start(reg.port);
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let images = ["debian-base", "debian", "debian-alt"];
    // Index first (each layer is streamed once for its index), then count
    // only what the containers fetch.
    for tag in images {
        ok(node_cmd(
            tmp.path(),
            &["index", "--image", &format!("{}/clip/{tag}:latest", proxy.host())],
        ));
    }
    proxy.log.lock().unwrap().clear();
    let expected = md5s(&unpacked("debian"), "/usr/bin");
    let containers: Vec<Background> = (0..20)
        .map(|i| {
            let image = format!("{}/clip/{}:latest", proxy.host(), images[i % 3]);
            Background::start(tmp.path(), &["run", "--rm", &image, "sh", "-c", MD5S])
        })
        .collect();
    for c in containers {
        let (code, out, err) = c.finish();
        assert_eq!(code, 0, "{err}");
        let got: BTreeMap<String, String> = out
            .lines()
            .filter_map(|l| l.split_once("  "))
            .map(|(h, p)| (p.to_string(), h.to_string()))
            .collect();
        assert_eq!(got, expected);
    }
    let log = proxy.log.lock().unwrap().clone();
    assert!(!log.is_empty());
    let mut seen: HashMap<(String, Option<String>), usize> = HashMap::new();
    for (path, range, ..) in log {
        *seen.entry((path, range)).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "fetched more than once: {twice:?}");
    // One image mount per image, all unmounted with their last container.
    let ps: serde_json::Value = serde_json::from_slice(&ok(node_cmd(tmp.path(), &["ps", "--json"]))).unwrap();
    assert_eq!(ps["mounts"].as_array().unwrap().len(), 0, "{ps}");
}

/// A container reads files in a loop while the worker is killed (`kill`)
/// or clipd is upgraded (`upgrade`), three times: every read succeeds with
/// the right bytes.
fn reads_survive(how: &str) {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/debian:latest", reg.host());
    let expected = md5s(&unpacked("debian"), "/usr/bin");
    let script = format!(
        "i=0; while [ ! -e /tmp/stop ] && [ $i -lt 2000 ]; do {MD5S} || echo READ-ERROR; i=$((i+1)); done; \
         echo LOOPS $i"
    );
    // Container names are the runtime's, host-wide: one per test.
    let name = format!("reader-{how}");
    let c = Background::start(
        tmp.path(),
        &["run", "--rm", "--name", &name, &image, "sh", "-c", &script],
    );
    // The container is up once its rootfs is.
    let rootfs = tmp.path().join("run").join(&name).join("rootfs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rootfs.join("usr").exists() {
        assert!(Instant::now() < deadline, "the container did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_clipctl")).with_file_name("clipd");
    for _ in 0..3 {
        drop_caches();
        let (supervisor, worker) = daemon_pids(tmp.path());
        match how {
            "kill" => {
                // SAFETY: plain kill of our node's worker.
                unsafe { libc::kill(worker, libc::SIGKILL) };
                while harness::process_running(worker) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Back serving: a new worker answers.
                let gone = Instant::now();
                let (s2, w2) = daemon_pids(tmp.path());
                let back = gone.elapsed();
                assert_eq!(s2, supervisor);
                assert_ne!(w2, worker);
                assert!(back < Duration::from_secs(2), "clipd took {back:?} to come back");
            }
            _ => {
                ok(node_cmd(
                    tmp.path(),
                    &["daemon", "upgrade", "--binary", binary.to_str().unwrap()],
                ));
                let (s2, w2) = daemon_pids(tmp.path());
                assert_eq!(s2, supervisor, "an upgrade keeps the supervisor's pid");
                assert_ne!(w2, worker);
            }
        }
        drop_caches();
        std::thread::sleep(Duration::from_millis(300));
    }
    std::fs::write(rootfs.join("tmp/stop"), "").unwrap();
    let (code, out, err) = c.finish();
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("READ-ERROR"), "a read failed: {err}");
    let loops: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("LOOPS "))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(loops >= 2, "{loops} loops");
    for line in out.lines().filter(|l| !l.starts_with("LOOPS")) {
        let (h, p) = line.split_once("  ").unwrap_or_else(|| panic!("{line}"));
        assert_eq!(expected.get(p), Some(&h.to_string()), "{p}: wrong bytes");
    }
    let log = daemon_log(tmp.path());
    assert_eq!(log.matches("took over the mounts").count(), 3, "{log}");
}

#[test]
fn reads_go_on_while_the_worker_is_killed() {
    reads_survive("kill");
}

#[test]
fn reads_go_on_across_an_upgrade() {
    reads_survive("upgrade");
}

#[test]
fn a_cached_image_starts_with_the_registry_stopped() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/busybox:latest", reg.host());
    let run = |image: &str, ttl: &str| {
        let mut c = node_cmd(tmp.path(), &["run", "--rm", image, "cat", "/etc/motd"]);
        c.env("CLIP_TAG_TTL", ttl);
        c.output().unwrap()
    };
    // Resolutions are never trusted for long here: every run asks.
    let o = run(&image, "0");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let digest = {
        let ps = serde_json::from_slice::<serde_json::Value>(&ok(node_cmd(tmp.path(), &["ps", "--json"]))).unwrap();
        assert_eq!(ps["mounts"].as_array().unwrap().len(), 0);
        let stored = std::fs::read_dir(tmp.path().join("base/index"))
            .unwrap()
            .flatten()
            .next()
            .unwrap();
        let name = stored.file_name().to_string_lossy().into_owned();
        format!("sha256:{}", &name[..64])
    };
    drop(reg);
    // By tag: the registry is down, the last resolution is used.
    let o = run(&image, "0");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(o.stdout, b"hello from clip\n");
    assert!(
        stderr.contains("warning") && stderr.contains("resolution from"),
        "{stderr}\n{}",
        daemon_log(tmp.path())
    );
    // By digest: no registry needed for anything already fetched.
    let by_digest = format!("{}@{digest}", image.rsplit_once(':').unwrap().0);
    let o = run(&by_digest, "0");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"hello from clip\n");
}

#[test]
fn ps_lists_what_is_mounted_and_who_uses_it() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/busybox:latest", reg.host());
    let dir = tmp.path().join("plain");
    ok(node_cmd(
        tmp.path(),
        &["mount", "--image", &image, dir.to_str().unwrap()],
    ));
    ok(node_cmd(tmp.path(), &["mount", "--image", &image, "--cid", "web"]));
    let ps: serde_json::Value = serde_json::from_slice(&ok(node_cmd(tmp.path(), &["ps", "--json"]))).unwrap();
    let mounts = ps["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 2, "{ps}");
    let shared = mounts
        .iter()
        .find(|m| m["containers"] == serde_json::json!(["web"]))
        .unwrap();
    assert!(shared["image"].as_str().unwrap().ends_with("/clip/busybox:latest"));
    assert!(mounts
        .iter()
        .any(|m| m["dir"] == dir.canonicalize().unwrap().to_str().unwrap()));
    assert_eq!(ps["containers"][0]["id"], "web");
    let text = String::from_utf8(ok(node_cmd(tmp.path(), &["ps", "--mounts"]))).unwrap();
    assert!(text.lines().next().unwrap().starts_with("IMAGE"), "{text}");
    assert!(text.contains("web"), "{text}");
    ok(node_cmd(tmp.path(), &["umount", "--cid", "web"]));
    ok(node_cmd(tmp.path(), &["umount", dir.to_str().unwrap()]));
}

/// An image stays mounted for `CLIP_IMAGE_LINGER` seconds after its last
/// container, so the next one finds the kernel's caches warm; a new
/// container takes it up again, and an idle one is unmounted.
#[test]
fn an_image_lingers_after_its_last_container() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/busybox:latest", reg.host());
    let run = || {
        let mut c = node_cmd(tmp.path(), &["run", "--rm", &image, "cat", "/etc/motd"]);
        c.env("CLIP_IMAGE_LINGER", "3");
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.stdout, b"hello from clip\n");
    };
    let mounts = || -> Vec<serde_json::Value> {
        let ps: serde_json::Value = serde_json::from_slice(&ok(node_cmd(tmp.path(), &["ps", "--json"]))).unwrap();
        ps["mounts"].as_array().unwrap().clone()
    };
    // The kernel's ids of the node's FUSE mounts.
    let fuse_mounts = || -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(tmp.path().to_str().unwrap()) && l.contains("fuse.clip"))
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect()
    };
    run();
    let first = mounts();
    assert_eq!(first.len(), 1, "the image lingers: {first:?}");
    assert_eq!(first[0]["containers"], serde_json::json!([]));
    let id = fuse_mounts();
    assert_eq!(id.len(), 1);
    // The next container uses the same mount.
    run();
    assert_eq!(mounts().len(), 1);
    assert_eq!(fuse_mounts(), id);
    // Idle for 3 s, then unmounted (checked every half second).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mounts().is_empty() {
        assert!(Instant::now() < deadline, "never unmounted: {:?}", mounts());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(fuse_mounts().is_empty());
    // It mounts again on demand.
    run();
}

/// A test that fails between `mount --cid` and `umount --cid` must not
/// leave the container's overlay mounted: its `DaemonGuard` detaches every
/// overlay below its directory, paths with spaces included.
#[test]
fn a_daemon_guard_detaches_overlays_left_mounted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("containers/a b");
    for d in ["lower", "upper", "work", "rootfs"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        root.join("lower").display(),
        root.join("upper").display(),
        root.join("work").display()
    );
    let o = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(root.join("rootfs"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(harness::overlays_under(tmp.path()), vec![root.join("rootfs")]);
    drop(DaemonGuard::new(tmp.path()));
    assert!(harness::overlays_under(tmp.path()).is_empty());
}
