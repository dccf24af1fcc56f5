//! Container rootfs and `clipctl run` (issue 4): real containers under runc,
//! crun and runsc on overlayfs over the lazy image mount.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::{clipctl, registry};
use crate::mount::env;

fn clip(tmp: &Path, args: &[&str]) -> Output {
    let mut c = clipctl();
    c.args(args);
    env(&mut c, tmp);
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn clip_mounts(tmp: &Path) -> (usize, usize) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let t = tmp.to_string_lossy();
    let mine: Vec<&str> = info.lines().filter(|l| l.contains(t.as_ref())).collect();
    let images = mine
        .iter()
        .filter(|l| l.contains(" - fuse clip ") || l.contains(" - fuse.clip "))
        .count();
    let overlays = mine
        .iter()
        .filter(|l| l.contains(" - overlay ") || l.contains("fuse-overlayfs"))
        .count();
    (images, overlays)
}

fn run_on(runtime: &str) {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = crate::harness::DaemonGuard::new(tmp.path());
    let app = format!("{}/clip/app:latest", reg.host());
    // The image's own Entrypoint, Cmd, Env, WorkingDir and User.
    let o = clip(tmp.path(), &["run", "--rm", "--runtime", runtime, &app]);
    assert!(o.status.success(), "{runtime}: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o), "hello from /home/user as 1000:1000\n", "{runtime}");
    // Overrides: command, env, workdir, user; the exit code passes through.
    let o = clip(
        tmp.path(),
        &[
            "run",
            "--rm",
            "--runtime",
            runtime,
            "-e",
            "GREETING=hi",
            "-w",
            "/tmp",
            "-u",
            "root",
            &app,
            "echo \"$GREETING $(pwd) $(id -u)\"; exit 7",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(7),
        "{runtime}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(stdout(&o), "hi /tmp 0\n");
    assert_eq!(clip_mounts(tmp.path()), (0, 0), "{runtime}: --rm left mounts");
}

#[test]
fn clip_runtime_runs_the_image_config() {
    run_on("clip");
}

#[test]
fn runc_runs_the_image_config() {
    run_on("runc");
}

#[test]
fn crun_runs_the_image_config() {
    run_on("crun");
}

#[test]
fn runsc_runs_the_image_config() {
    run_on("runsc");
}

#[test]
fn overlay_rootfs_behaves_like_any_overlay() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = crate::harness::DaemonGuard::new(tmp.path());
    let deb = format!("{}/clip/debian:latest", reg.host());
    let script = "set -e; echo new > /root/new; rm /etc/motd; mv /etc/issue /etc/issue2; \
                  ln /etc/os-release /root/os-link; test \"$(stat -c %h /root/os-link)\" = 2; \
                  mkdir -p /opt/clip/sub && echo x > /opt/clip/sub/f; rm -rf /usr/share/zoneinfo; \
                  test ! -e /etc/motd; cat /etc/issue2 > /dev/null; echo done";
    let o = clip(tmp.path(), &["run", "--name", "ovl", &deb, "sh", "-c", script]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o), "done\n");
    // Written files land in the upper dir and stay until umount --cid.
    let upper = tmp.path().join("base/containers/ovl/upper");
    assert_eq!(std::fs::read(upper.join("root/new")).unwrap(), b"new\n");
    assert!(upper.join("opt/clip/sub/f").exists());
    let rootfs = tmp.path().join("run/ovl/rootfs");
    assert!(!rootfs.join("etc/motd").exists());
    assert!(
        rootfs.join("etc/os-release").exists(),
        "the lower file behind the link is still there"
    );
    // The image mount below is untouched.
    let o = clip(
        tmp.path(),
        &[
            "run",
            "--rm",
            &deb,
            "sh",
            "-c",
            "cat /etc/motd; test -d /usr/share/zoneinfo && echo zoneinfo",
        ],
    );
    assert_eq!(stdout(&o), "second layer\nzoneinfo\n");
    let o = clip(tmp.path(), &["umount", "--cid", "ovl"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!tmp.path().join("base/containers/ovl").exists());
    assert_eq!(clip_mounts(tmp.path()), (0, 0));
}

#[test]
fn twenty_containers_share_one_image_mount() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = crate::harness::DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/busybox:latest", reg.host());
    let ids: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    let threads: Vec<_> = ids
        .iter()
        .map(|id| {
            let (id, image, t) = (id.clone(), image.clone(), tmp.path().to_path_buf());
            std::thread::spawn(move || clip(&t, &["mount", "--image", &image, "--cid", &id]))
        })
        .collect();
    for t in threads {
        let o = t.join().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout(&o).trim().ends_with("/rootfs"));
    }
    assert_eq!(clip_mounts(tmp.path()), (1, 20));
    // Each rootfs is writable on its own.
    std::fs::write(tmp.path().join("run/c3/rootfs/etc/motd"), "c3\n").unwrap();
    assert_eq!(
        std::fs::read(tmp.path().join("run/c4/rootfs/etc/motd")).unwrap(),
        b"hello from clip\n"
    );
    for (n, id) in ids.iter().enumerate() {
        let o = clip(tmp.path(), &["umount", "--cid", id]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // The image stays mounted while any container uses it.
        let expect = if n < 19 { (1, 19 - n) } else { (0, 0) };
        assert_eq!(clip_mounts(tmp.path()), expect, "after {id}");
    }
    // Gone, and said so.
    let o = clip(tmp.path(), &["umount", "--cid", "c0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no container c0"), "{o:?}");
}

#[test]
fn fuse_overlayfs_fallback() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = crate::harness::DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/busybox:latest", reg.host());
    let o = clip(
        tmp.path(),
        &["mount", "--image", &image, "--cid", "f1", "--fuse-overlayfs"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rootfs = std::path::PathBuf::from(stdout(&o).trim());
    std::fs::write(rootfs.join("etc/new"), "x").unwrap();
    assert_eq!(
        std::fs::read(tmp.path().join("base/containers/f1/upper/etc/new")).unwrap(),
        b"x"
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(info
        .lines()
        .any(|l| l.contains(rootfs.to_str().unwrap()) && l.contains("fuse-overlayfs")));
    assert!(clip(tmp.path(), &["umount", "--cid", "f1"]).status.success());
    assert_eq!(clip_mounts(tmp.path()), (0, 0));
}

#[test]
fn signals_reach_the_container() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = crate::harness::DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/busybox:latest", reg.host());
    let mut c = clipctl();
    c.args([
        "run",
        "--rm",
        &image,
        "sh",
        "-c",
        "trap 'echo got TERM; exit 42' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    env(&mut c, tmp.path());
    c.stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: plain kill of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(rest, "got TERM\n");
    assert_eq!(status.code(), Some(42));
    assert_eq!(clip_mounts(tmp.path()), (0, 0));
    let _ = Command::new("true").status();
}

#[test]
fn the_same_image_from_another_registry_uses_that_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = crate::harness::DaemonGuard::new(tmp.path());
    let first = registry();
    let o = clip(
        tmp.path(),
        &["run", "--rm", &format!("{}/clip/busybox:latest", first.host()), "true"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(first);
    // Same manifest digest, same base dir, another registry: the stored
    // index of the first must not send reads to a registry that is gone.
    let second = registry();
    let o = clip(
        tmp.path(),
        &[
            "run",
            "--rm",
            &format!("{}/clip/busybox:latest", second.host()),
            "cat",
            "/etc/motd",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o), "hello from clip\n");
}

#[test]
fn relative_state_directories_name_the_same_places() {
    // CLIP_*_DIR relative to the working directory, as a user might set
    // them: runc resolves the bundle's rootfs from the bundle, so clip
    // must hand it absolute paths.
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = crate::harness::DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/busybox:latest", reg.host());
    let o = clipctl()
        .args(["run", "--rm", "--runtime", "runc", &image, "echo", "relative"])
        .current_dir(tmp.path())
        .env("CLIP_BASE_DIR", "base")
        .env("CLIP_CACHE_DIR", "cache")
        .env("CLIP_RUN_DIR", "run")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o), "relative\n");
    assert!(tmp.path().join("base").is_dir() && tmp.path().join("run").is_dir());
    assert_eq!(clip_mounts(tmp.path()), (0, 0), "--rm left mounts");
}
