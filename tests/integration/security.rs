//! What a host user can reach (issues 10 and 11): a running container's
//! rootfs allows setuid, so every path to it, and to the rest of clip's
//! state (indexes, cached image bytes, the daemon's socket and log), is
//! root's alone.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::harness::{clipctl, registry, unpacked};
use crate::mount::env;

/// Runs `prog args...` as nobody; (success, stdout + stderr). A shell
/// running as nobody does the exec: setpriv finds its program before it
/// drops privileges, so it would look at the path as root.
fn as_nobody(prog: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .args(["/bin/sh", "-c", "exec \"$0\" \"$@\""])
        .arg(prog)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

#[test]
fn an_unprivileged_user_cannot_run_a_setuid_binary_through_a_containers_rootfs() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = crate::harness::DaemonGuard::new(tmp.path());
    // The test's own directory is open to everyone: only clip's
    // permissions stand between a host user and its state.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // The binary is a real way in: set-uid root and open to all, it runs a
    // host user's command as root.
    let control = tmp.path().join("control");
    std::fs::create_dir(&control).unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = control.join("suidsh");
    std::fs::copy(unpacked("suid").join("bin/suidsh"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let (ok, out) = as_nobody(&copy, &["-p", "-c", "exec /usr/bin/id -u"]);
    assert!(ok && out.trim() == "0", "the control should give euid 0: {out}");

    // A running container of the image.
    let image = format!("{}/clip/suid:latest", reg.host());
    let mut c = clipctl();
    c.args([
        "run",
        "--rm",
        "--name",
        "sec",
        &image,
        "sh",
        "-c",
        "trap 'exit 0' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    env(&mut c, tmp.path());
    c.stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut ready = [0u8; 6];
    child.stdout.take().unwrap().read_exact(&mut ready).unwrap();
    assert_eq!(&ready, b"ready\n");

    let run = tmp.path().join("run");
    let base = tmp.path().join("base");
    let inside = run.join("sec/rootfs/bin/suidsh");
    let md = std::fs::metadata(&inside).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o4755, "root sees the setuid binary");
    let (ok, out) = as_nobody(&inside, &["-p", "-c", "exec /usr/bin/id -u"]);
    assert!(!ok && out.trim() != "0", "a host user ran it: {out}");
    assert!(out.contains("Permission denied"), "{out}");

    // Nor can a host user look into the rest of clip's state.
    for dir in [
        run.clone(),
        run.join("sec"),
        run.join("images"),
        base.join("containers"),
        base.join("index"),
        tmp.path().join("cache"),
    ] {
        assert!(dir.exists(), "{} should exist", dir.display());
        let (ok, out) = as_nobody(Path::new("/bin/ls"), &[dir.to_str().unwrap()]);
        assert!(!ok && out.contains("Permission denied"), "{}: {out}", dir.display());
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o077,
            0,
            "{} is open to others",
            dir.display()
        );
    }

    // Nor talk to clipd: its socket is root's alone (and so is the
    // directory it is in).
    let socket = run.join("clipd.sock");
    let mode = std::fs::symlink_metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the socket is open to others: {mode:o}");
    let (ok, out) = as_nobody(
        Path::new("/usr/bin/python3"),
        &[
            "-c",
            &format!(
                "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?})",
                socket.to_str().unwrap()
            ),
        ],
    );
    assert!(!ok && out.contains("PermissionError"), "{out}");

    // SAFETY: plain kill of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
