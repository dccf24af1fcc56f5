//! create + start + wait + delete of a `true` container, interleaved
//! across clip-runtime, runc and crun; medians and ratios from one run.
//!
//! `cargo bench -p clip-runtime --bench lifecycle` (as root). ROUNDS=N
//! changes the count (default 50). The whole benchmark runs in a private
//! mount namespace without the host's cgroup2 mount, which crun needs on
//! this hybrid-cgroup host, so all three see the same cgroup v1 layout.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn private_mount_ns() {
    // SAFETY: single-threaded at this point; plain mount-namespace calls.
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare needs root");
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        libc::umount2(c"/sys/fs/cgroup/unified".as_ptr(), libc::MNT_DETACH);
    }
}

fn bundle(dir: &Path) {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/true")).unwrap();
    let o = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success());
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    c["process"]["terminal"] = false.into();
    c["process"]["args"] = serde_json::json!(["/bin/true"]);
    std::fs::write(&path, serde_json::to_vec(&c).unwrap()).unwrap();
}

fn ok(bin: &Path, root: &Path, args: &[&str]) -> String {
    let o = Command::new(bin)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{} {args:?}: {}",
        bin.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits for a process that is not our child to exit (pidfd + poll).
fn wait_exit(pid: i32) {
    // SAFETY: pidfd_open and poll on a descriptor we own.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if fd < 0 {
            return; // already gone
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        libc::poll(&mut p, 1, 10_000);
        libc::close(fd);
    }
}

/// One create + start + wait + delete.
fn lifecycle(bin: &Path, root: &Path, bundle: &Path, id: &str) -> Duration {
    let t = Instant::now();
    // create's stdio stays with the container: no pipes to wait on.
    let s = Command::new(bin)
        .arg("--root")
        .arg(root)
        .args(["create", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(s.success(), "{} create", bin.display());
    let state: serde_json::Value = serde_json::from_str(&ok(bin, root, &["state", id])).unwrap();
    let pid = state["pid"].as_i64().unwrap() as i32;
    ok(bin, root, &["start", id]);
    wait_exit(pid);
    ok(bin, root, &["delete", id]);
    t.elapsed()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    private_mount_ns();
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("bundle");
    bundle(&b);
    let runtimes: Vec<(&str, PathBuf)> = vec![
        ("clip-runtime", env!("CARGO_BIN_EXE_clip-runtime").into()),
        ("runc", "runc".into()),
        ("crun", "crun".into()),
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); runtimes.len()];
    // Warm-up, then rounds in rotating order.
    for (i, (name, bin)) in runtimes.iter().enumerate() {
        let root = tmp.path().join(format!("root-{i}"));
        lifecycle(bin, &root, &b, &format!("warm-{name}"));
    }
    for r in 0..rounds {
        for k in 0..runtimes.len() {
            let i = (r + k) % runtimes.len();
            let (_, bin) = &runtimes[i];
            let root = tmp.path().join(format!("root-{i}"));
            times[i].push(lifecycle(bin, &root, &b, &format!("c{r}")));
        }
    }
    let medians: Vec<Duration> = times.iter_mut().map(|t| median(t)).collect();
    println!("create + start + wait + delete of `true`, {rounds} rounds interleaved, medians:");
    for ((name, _), m) in runtimes.iter().zip(&medians) {
        println!("  {name:<13} {:>7.1} ms", m.as_secs_f64() * 1e3);
    }
    println!(
        "clip-runtime / runc = {:.2}   clip-runtime / crun = {:.2}",
        medians[0].as_secs_f64() / medians[1].as_secs_f64(),
        medians[0].as_secs_f64() / medians[2].as_secs_f64()
    );
}
