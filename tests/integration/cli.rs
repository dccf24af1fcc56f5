//! `clipctl run` and its neighbours as docker, podman and nerdctl users
//! expect them (issue 16): containerd's default spec, the usual run flags,
//! detached containers, exit codes, terminals, and errors that say what to
//! do.

use std::path::Path;
use std::process::Output;

use crate::harness::{clipctl, registry, DaemonGuard};
use crate::mount::env;

/// A node of its own for one test (its clipd stopped on drop).
struct Node {
    tmp: tempfile::TempDir,
    _daemon: DaemonGuard,
    host: String,
    _reg: crate::harness::Registry,
}

impl Node {
    fn new() -> Node {
        let reg = registry();
        let tmp = tempfile::tempdir().unwrap();
        Node {
            _daemon: DaemonGuard::new(tmp.path()),
            host: reg.host(),
            tmp,
            _reg: reg,
        }
    }

    fn image(&self, tag: &str) -> String {
        format!("{}/clip/{tag}:latest", self.host)
    }

    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = clipctl();
        c.args(args);
        env(&mut c, self.tmp.path());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs, asserting success; stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// clipctl in a private mount namespace whose /etc/hosts is `hosts` (a
/// name that is not a loopback name, resolved for this test only; clipd,
/// started on demand, inherits it).
fn clipctl_with_hosts(hosts: &Path) -> std::process::Command {
    let mut c = std::process::Command::new("unshare");
    c.args([
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
    ])
    .arg(hosts)
    .arg(env!("CARGO_BIN_EXE_clipctl"));
    c
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// containerd's 14 default capabilities (docker's too) as a CapEff mask.
const CONTAINERD_CAPS: &str = "00000000a80425fb";

fn cap_line(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:\t")))
        .unwrap_or_else(|| panic!("{name} missing in {out}"))
        .to_string()
}

#[test]
fn the_default_container_matches_containerds_on_every_runtime() {
    let n = Node::new();
    let bb = n.image("busybox");
    let host_links = std::fs::read_dir("/sys/class/net").unwrap().count();
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    for rt in ["clip", "runc", "crun"] {
        let out = n.ok(&[
            "run",
            "--rm",
            "--runtime",
            rt,
            "--name",
            "box1",
            &bb,
            "sh",
            "-c",
            "grep CapEff /proc/self/status; touch /tmp/f && chown 1000:1000 /tmp/f && stat -c 'owner %u' /tmp/f; \
             su user -c 'echo su-as $(id -u)'; echo host $(hostname); grep -c box1 /etc/hosts; cat /etc/hostname; \
             echo links $(ls /sys/class/net | wc -l); mount | grep -c ' /run type tmpfs'",
        ]);
        assert_eq!(cap_line(&out, "CapEff"), CONTAINERD_CAPS, "{rt}: {out}");
        assert!(out.contains("owner 1000"), "{rt}: root can chown: {out}");
        assert!(out.contains("su-as 1000"), "{rt}: root can su: {out}");
        assert!(out.contains("host box1"), "{rt}: {out}");
        let lines: Vec<&str> = out.lines().collect();
        let at = lines.iter().position(|l| *l == "host box1").unwrap();
        assert_eq!(lines[at + 1], "1", "{rt}: /etc/hosts names the container: {out}");
        assert_eq!(lines[at + 2], "box1", "{rt}: /etc/hostname: {out}");
        // The default network is the host's (documented in the README).
        assert_eq!(lines[at + 3], format!("links {host_links}"), "{rt}: {out}");
        assert_eq!(
            lines[at + 4],
            "1",
            "{rt}: /run is a tmpfs, as containerd mounts it: {out}"
        );
        let inside = n.ok(&["run", "--rm", "--runtime", rt, &bb, "cat", "/etc/resolv.conf"]);
        assert_eq!(inside, resolv, "{rt}: resolv.conf is the host's");
        // --network none: a namespace with only lo.
        let out = n.ok(&[
            "run",
            "--rm",
            "--runtime",
            rt,
            "--network",
            "none",
            &bb,
            "ls",
            "/sys/class/net",
        ]);
        assert_eq!(out.trim(), "lo", "{rt}");
    }
    let o = n.run(&["run", "--rm", "--network", "bridge", &bb, "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(err(&o).contains("host (the default) and none"), "{}", err(&o));
}

#[test]
fn capabilities_are_added_dropped_and_all_when_privileged() {
    let n = Node::new();
    let bb = n.image("busybox");
    let caps = |extra: &[&str]| {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[bb.as_str(), "grep", "CapEff", "/proc/self/status"]);
        cap_line(&n.ok(&args), "CapEff")
    };
    assert_eq!(
        caps(&["--cap-drop", "ALL", "--cap-add", "net_admin"]),
        "0000000000001000"
    );
    assert_eq!(caps(&["--cap-drop", "CAP_CHOWN"]), "00000000a80425fa");
    assert_eq!(caps(&["--cap-add", "SYS_PTRACE"]), "00000000a80c25fb");
    // Privileged: everything this host's bounding set holds.
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    assert_eq!(caps(&["--privileged"]), cap_line(&own, "CapBnd"));
    let o = n.run(&["run", "--rm", "--cap-add", "CAP_FLY", &bb, "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(err(&o).contains("\"CAP_FLY\" is not a capability"), "{}", err(&o));
}

#[test]
fn run_flags_users_reach_for() {
    let n = Node::new();
    let bb = n.image("busybox");
    let app = n.image("app");
    // --entrypoint replaces the image's (and its Cmd).
    assert_eq!(
        n.ok(&["run", "--rm", "--entrypoint", "/bin/echo", &app, "a", "b"]),
        "a b\n"
    );
    assert_eq!(n.ok(&["run", "--rm", "--entrypoint", "/bin/pwd", &app]), "/home/user\n");
    // -e NAME takes this shell's value; unset names stay unset.
    let tmp = n.tmp.path();
    let envf = tmp.join("env.list");
    std::fs::write(&envf, "# a comment\n\nFROM_FILE=yes\nHOSTVAR\n").unwrap();
    let o = n
        .cmd(&[
            "run",
            "--rm",
            "-e",
            "HOSTVAR",
            "-e",
            "NOT_SET_ANYWHERE",
            "--env-file",
            envf.to_str().unwrap(),
            &bb,
            "sh",
            "-c",
            "echo $HOSTVAR $FROM_FILE ${NOT_SET_ANYWHERE-unset}",
        ])
        .env("HOSTVAR", "from-host")
        .env_remove("NOT_SET_ANYWHERE")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "from-host yes unset\n",
        "{}",
        err(&o)
    );
    // -v and --mount binds, read-only ones too.
    let data = tmp.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("in.txt"), "from the host\n").unwrap();
    let v = format!("{}:/data", data.display());
    let ro = format!("type=bind,source={},target=/ro,readonly", data.display());
    let out = n.ok(&[
        "run",
        "--rm",
        "-v",
        &v,
        "--mount",
        &ro,
        &bb,
        "sh",
        "-c",
        "cat /data/in.txt; echo written > /data/out.txt; echo x > /ro/y 2>/dev/null || echo ro-refused",
    ]);
    assert_eq!(out, "from the host\nro-refused\n");
    assert_eq!(std::fs::read_to_string(data.join("out.txt")).unwrap(), "written\n");
    let o = n.run(&["run", "--rm", "-v", "/nonexistent-clip:/x", &bb, "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        err(&o).contains("no such file or directory on this host"),
        "{}",
        err(&o)
    );
    // --read-only: the rootfs refuses writes; binds still take them.
    let out = n.ok(&[
        "run",
        "--rm",
        "--read-only",
        &bb,
        "sh",
        "-c",
        "touch /x 2>/dev/null || echo refused",
    ]);
    assert_eq!(out, "refused\n");
    // --init: tini is PID 1, the command its child.
    let out = n.ok(&["run", "--rm", "--init", &bb, "sh", "-c", "cat /proc/1/comm; echo $$"]);
    assert!(out.starts_with("docker-init\n") || out.starts_with("tini"), "{out}");
    assert_ne!(out.lines().nth(1), Some("1"), "{out}");
    // --memory and --cpus reach the cgroup.
    let out = n.ok(&[
        "run",
        "--rm",
        "--memory",
        "64m",
        "--cpus",
        "1.5",
        &bb,
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us",
    ]);
    assert_eq!(out, format!("{}\n150000\n", 64 << 20));
    let o = n.run(&["run", "--rm", "--memory", "lots", &bb, "true"]);
    assert_eq!(o.status.code(), Some(125));
    // Without -i stdin is empty; with it, it reaches the container.
    let mut c = n.cmd(&["run", "--rm", "-i", &bb, "cat"]);
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"piped in\n").unwrap();
    assert_eq!(child.wait_with_output().unwrap().stdout, b"piped in\n");
    assert_eq!(n.ok(&["run", "--rm", &bb, "cat"]), "");
}

#[test]
fn exit_codes_follow_docker() {
    let n = Node::new();
    let bb = n.image("busybox");
    for rt in ["clip", "runc", "crun"] {
        let code = |args: &[&str]| {
            let mut a = vec!["run", "--rm", "--runtime", rt, bb.as_str()];
            a.extend_from_slice(args);
            let o = n.run(&a);
            (o.status.code(), err(&o))
        };
        assert_eq!(code(&["sh", "-c", "exit 3"]).0, Some(3), "{rt}");
        let (c, e) = code(&["nosuchcmd"]);
        assert_eq!(c, Some(127), "{rt}: {e}");
        assert_eq!(e.lines().count(), 1, "{rt}: one line: {e}");
        assert!(e.contains("\"nosuchcmd\": executable file not found in $PATH"), "{e}");
        let (c, e) = code(&["/etc/motd"]);
        assert_eq!(c, Some(126), "{rt}: {e}");
        assert!(e.contains("not executable"), "{e}");
        assert_eq!(code(&["/etc"]).0, Some(126), "{rt}");
        assert_eq!(code(&["/no/such/file"]).0, Some(127), "{rt}");
    }
    // clip itself failing: 125, one line, the tag named.
    let o = n.run(&["run", "--rm", &format!("{}/clip/busybox:no-such-tag", n.host), "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert_eq!(err(&o).lines().count(), 1, "{}", err(&o));
    assert!(
        err(&o).contains("no-such-tag") && err(&o).contains("check the repository name and tag"),
        "{}",
        err(&o)
    );
    // A working directory that is a file: 125, said once, on every runtime.
    for rt in ["clip", "runc", "crun"] {
        let o = n.run(&["run", "--rm", "--runtime", rt, "-w", "/etc/motd", &bb, "true"]);
        assert_eq!(o.status.code(), Some(125), "{rt}: {}", err(&o));
        assert_eq!(err(&o).lines().count(), 1, "{}", err(&o));
        assert!(
            err(&o).contains("/etc/motd: not a directory in the image"),
            "{}",
            err(&o)
        );
    }
    // A runtime's own failure is one line, not libcontainer's layers of it
    // (a bind mount onto a file's place with a directory).
    let o = n.run(&["run", "--rm", "-v", "/tmp:/etc/motd", &bb, "true"]);
    assert!(!o.status.success());
    assert_eq!(err(&o).lines().count(), 1, "{}", err(&o));
    assert!(err(&o).starts_with("clip-runtime: "), "{}", err(&o));
    // Nothing is left behind by the failures.
    assert!(!n.ok(&["ps", "-a"]).contains("clip-"), "{}", n.ok(&["ps", "-a"]));
}

#[test]
fn detached_containers_are_listed_logged_stopped_execd_and_removed() {
    let n = Node::new();
    let bb = n.image("busybox");
    let id = n.ok(&[
        "run",
        "-d",
        &bb,
        "sh",
        "-c",
        "echo started; trap 'echo stopping; exit 0' TERM; while true; do sleep 0.1; done",
    ]);
    let id = id.trim();
    assert!(id.starts_with("clip-"), "{id}");
    let ps = n.ok(&["ps"]);
    assert!(ps.lines().next().unwrap().starts_with("CONTAINER ID"), "{ps}");
    assert!(ps.lines().any(|l| l.starts_with(id) && l.contains("running")), "{ps}");
    // The image mount under it cannot be unmounted while it is used.
    let v: serde_json::Value = serde_json::from_str(&n.ok(&["ps", "--json"])).unwrap();
    let image_dir = v["mounts"][0]["dir"].as_str().unwrap().to_string();
    let o = n.run(&["umount", &image_dir]);
    assert!(!o.status.success());
    assert!(
        err(&o).contains(&format!("is the image of containers {id}")),
        "{}",
        err(&o)
    );
    // exec runs in the container, with its code.
    let o = n.run(&["exec", id, "sh", "-c", "test -f /etc/motd && exit 4"]);
    assert_eq!(o.status.code(), Some(4), "{}", err(&o));
    // rm refuses a running container; stop sends SIGTERM (the trap runs).
    let o = n.run(&["rm", id]);
    assert!(!o.status.success());
    assert!(err(&o).contains("is running"), "{}", err(&o));
    let o = n.run(&["umount", "--cid", id]);
    assert!(!o.status.success());
    assert!(err(&o).contains("is running"), "{}", err(&o));
    n.ok(&["stop", id]);
    // The log is complete once stopped: what it printed, and the trap's line.
    let logs = n.ok(&["logs", id]);
    assert!(logs.starts_with("started\n") && logs.contains("stopping"), "{logs}");
    assert!(!n.ok(&["ps"]).contains(id));
    assert!(n
        .ok(&["ps", "-a"])
        .lines()
        .any(|l| l.starts_with(id) && l.contains("exited")));
    n.ok(&["rm", id]);
    assert!(!n.ok(&["ps", "-a"]).contains(id));
    // A foreground container without --rm or --name: its id on stderr, and
    // it can be removed by it.
    let o = n.run(&["run", &bb, "true"]);
    assert!(o.status.success(), "{}", err(&o));
    let id = err(&o).trim().to_string();
    assert!(n.ok(&["ps", "-a"]).contains(&id));
    n.ok(&["rm", &id]);
    // A running container's rootfs: umount --cid --force stops it first.
    // (A name of its own: runtimes keep their state host-wide.)
    let name = format!("sleeper-{}", std::process::id());
    let id = n.ok(&["run", "-d", "--name", &name, &bb, "sleep", "1000"]);
    assert_eq!(id.trim(), name);
    n.ok(&["umount", "--cid", &name, "--force"]);
    assert!(!n.ok(&["ps", "-a"]).contains(&name));
    let o = n.run(&["rm", &name]);
    assert!(err(&o).contains(&format!("no container {name}")), "{}", err(&o));
    // ...and the runtime's state went with it: the name can be used again.
    n.ok(&["run", "--rm", "--name", &name, &bb, "true"]);
}

#[test]
fn names_platforms_and_mount_points_are_checked() {
    let n = Node::new();
    let bb = n.image("busybox");
    for reserved in ["metrics", "images", "mounts", "../x"] {
        let o = n.run(&["run", "--rm", "--name", reserved, &bb, "true"]);
        assert_eq!(o.status.code(), Some(125), "{reserved}");
        assert!(err(&o).contains("invalid container name"), "{}", err(&o));
    }
    // An image for another architecture runs only when asked for.
    let arm = n.image("arm");
    let o = n.run(&["run", "--rm", &arm, "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(err(&o).contains("pass --platform linux/arm64"), "{}", err(&o));
    n.ok(&["run", "--rm", "--platform", "linux/arm64", &arm, "true"]);
    // Mount points: a file, or a directory with files in it.
    let file = n.tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let o = n.run(&["mount", "--image", &bb, file.to_str().unwrap()]);
    assert!(err(&o).contains("is not a directory"), "{}", err(&o));
    let full = n.tmp.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep"), "x").unwrap();
    let o = n.run(&["mount", "--image", &bb, full.to_str().unwrap()]);
    assert!(err(&o).contains("is not empty"), "{}", err(&o));
    // Unmounting what is not mounted says so; an image mount in use refuses.
    let o = n.run(&["umount", full.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(err(&o).contains("is not mounted"), "{}", err(&o));
    // A missing index file; an index that exists runs.
    let o = n.run(&["run", "--rm", "--index", "/nonexistent/x.clip", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(err(&o).contains("/nonexistent/x.clip"), "{}", err(&o));
    let index = n.tmp.path().join("bb.clip");
    n.ok(&["index", "--image", &bb, "--out", index.to_str().unwrap()]);
    assert_eq!(
        n.ok(&[
            "run",
            "--rm",
            "--index",
            index.to_str().unwrap(),
            "echo",
            "from",
            "index"
        ]),
        "from index
"
    );
    // Strict settings.
    let o = n
        .cmd(&["run", "--rm", &bb, "true"])
        .env("CLIP_CHECKPOINT_MIB", "0")
        .output()
        .unwrap();
    assert!(err(&o).contains("CLIP_CHECKPOINT_MIB"), "{}", err(&o));
}

/// `run -it` in a pseudo-terminal: a shell prompt, the terminal's size,
/// Ctrl-C interrupting the foreground job (not clipctl), and the exit code;
/// the first run of an image not yet indexed shows the progress bar.
#[test]
fn an_interactive_terminal_behaves_like_one() {
    let n = Node::new();
    let bb = n.image("debian");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pty_session.py");
    for rt in ["clip", "runc", "crun"] {
        let mut c = std::process::Command::new("python3");
        c.arg(&script)
            .arg(env!("CARGO_BIN_EXE_clipctl"))
            .args(["run", "--rm", "-it", "--runtime", rt, &bb, "sh"]);
        env(&mut c, n.tmp.path());
        for (k, v) in clipctl().get_envs() {
            if let Some(v) = v {
                if k != "CLIP_RUN_DIR" && k != "CLIP_BASE_DIR" && k != "CLIP_CACHE_DIR" {
                    c.env(k, v);
                }
            }
        }
        let o = c.output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{rt}: {out}{}", err(&o));
        for want in ["tty /dev/pts/0", "size 31 97", "interrupted", "exit 7"] {
            assert!(out.contains(want), "{rt}: {want:?} missing in {out}");
        }
        // Indexed on the first run only.
        assert_eq!(out.contains("indexing ["), rt == "clip", "{rt}: {out}");
    }
}

#[test]
fn images_are_listed_removed_and_pruned() {
    let n = Node::new();
    let bb = n.image("busybox");
    let app = n.image("app");
    // `index` fills the node's store: `images` shows it and `run` uses it,
    // with the registry gone.
    n.ok(&["index", "--image", &bb]);
    n.ok(&["index", "--image", &app]);
    assert_eq!(n.ok(&["run", "--rm", &bb, "echo", "stored"]), "stored\n");
    let log = crate::mount::daemon_log(n.tmp.path());
    let builds = log.matches(&format!("indexing here image={bb}")).count();
    assert_eq!(builds, 1, "run used the index `index` stored: {log}");
    let list = n.ok(&["images"]);
    let header = list.lines().next().unwrap();
    assert!(header.starts_with("IMAGE") && header.contains("SIZE"), "{list}");
    assert!(list.contains("/clip/busybox:latest") && list.contains("MiB"), "{list}");
    let v: serde_json::Value = serde_json::from_str(&n.ok(&["images", "--json"])).unwrap();
    assert_eq!(v["format_version"], 1);
    // inspect reads well: sizes in units, dates, Cmd, a header row.
    let stored = v["images"][0]["index"].as_str().unwrap().to_string();
    let info = n.ok(&["inspect", &stored]);
    for want in ["created:     20", "cmd:         [\"", "size:        ", "MiB", "LAYER  "] {
        assert!(info.contains(want), "{want:?} in {info}");
    }
    let j: serde_json::Value = serde_json::from_str(&n.ok(&["inspect", &stored, "--json"])).unwrap();
    assert_eq!(j["format_version"], 1);
    assert_eq!(v["images"].as_array().unwrap().len(), 2, "{v}");
    // A mounted image is kept; an unused one goes.
    let mnt = n.tmp.path().join("mnt");
    n.ok(&["mount", "--image", &bb, mnt.to_str().unwrap()]);
    let o = n.run(&["rmi", &bb]);
    assert!(err(&o).contains("is mounted"), "{}", err(&o));
    n.ok(&["rmi", &app]);
    let o = n.run(&["rmi", &app]);
    assert!(err(&o).contains("no stored index"), "{}", err(&o));
    assert!(n.ok(&["prune"]).contains("removed 0 indexes (1 in use kept)"));
    n.ok(&["umount", mnt.to_str().unwrap()]);
    let out = n.ok(&["prune"]);
    assert!(
        out.contains("removed 1 indexes") && out.contains("bytes of cached spans"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(&n.ok(&["images", "--json"])).unwrap();
    assert!(v["images"].as_array().unwrap().is_empty(), "{v}");
    // Removed is removed: the next run indexes the image again.
    assert_eq!(n.ok(&["run", "--rm", &bb, "echo", "again"]), "again\n");
}

/// A registry over TLS, verified against the system's roots (here its CA
/// comes in through `SSL_CERT_FILE`, which the platform verifier reads as
/// the system store): the image indexes and runs, its spans read over
/// TLS; without that trust the registry is refused with the TLS hint.
#[test]
fn a_registry_over_tls_is_verified_against_the_system_roots() {
    let _fixtures = registry();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sh = |cmd: &str| {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(st.status.success(), "{cmd}: {}", err(&st));
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj '/CN=clip test CA'");
    sh("openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj '/CN=clip-tls-test'");
    std::fs::write(d.join("ext"), "subjectAltName=DNS:clip-tls-test\n").unwrap();
    sh("openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out srv.crt -days 2 -extfile ext");
    let reg = crate::harness::Registry::start_with(
        &crate::harness::fixtures_dir().join("registry"),
        &format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            d.join("srv.crt").display(),
            d.join("srv.key").display()
        ),
    );
    let name = format!("clip-tls-test:{}", reg.port);
    let hosts = d.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 clip-tls-test\n").unwrap();
    for trusted in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let _daemon = DaemonGuard::new(tmp.path());
        let mut c = clipctl_with_hosts(&hosts);
        c.args([
            "run",
            "--rm",
            &format!("{name}/clip/busybox:latest"),
            "echo",
            "over TLS",
        ]);
        env(&mut c, tmp.path());
        if trusted {
            c.env("SSL_CERT_FILE", d.join("ca.crt"));
        }
        let o = c.output().unwrap();
        if trusted {
            assert!(o.status.success(), "{}", err(&o));
            assert_eq!(String::from_utf8_lossy(&o.stdout), "over TLS\n");
        } else {
            assert!(!o.status.success());
            assert!(
                err(&o).contains(&format!("TLS with {name} failed")) && err(&o).contains("UnknownIssuer"),
                "{}",
                err(&o)
            );
        }
    }
}

/// Errors that say what to do, before any work: not root, an output that
/// cannot be written, a registry speaking plain HTTP where TLS is expected,
/// and a registry that accepts connections and never answers.
#[test]
fn errors_say_what_to_do() {
    let n = Node::new();
    let bb = n.image("busybox");
    // Not root: one line, before anything else (exit 125 for run).
    for args in [
        vec!["run", "--rm", bb.as_str(), "true"],
        vec!["index", "--image", bb.as_str()],
    ] {
        let o = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_clipctl"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(
            err(&o).contains("needs root") && err(&o).lines().count() == 1,
            "{}",
            err(&o)
        );
        if args[0] == "run" {
            assert_eq!(o.status.code(), Some(125));
        }
    }
    // --out is checked before the image is read (this registry port is
    // closed: reading it would fail otherwise).
    let o = n.run(&[
        "index",
        "--image",
        "127.0.0.1:1/x/y:latest",
        "--out",
        "/proc/nope/x.clip",
    ]);
    assert!(err(&o).contains("/proc/nope/x.clip cannot be written"), "{}", err(&o));
    // TLS: a name that is not a loopback name (so clip speaks HTTPS) for
    // the plain-HTTP test registry, resolved by an /etc/hosts of the
    // test's own, bind-mounted in a private mount namespace where this
    // node's clipd starts. The hint's way out works.
    let port = n.host.rsplit(':').next().unwrap();
    let name = format!("clip-tls-test:{port}");
    let hosts = n.tmp.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 clip-tls-test\n").unwrap();
    for insecure in ["", name.as_str()] {
        let tmp = tempfile::tempdir().unwrap();
        let _daemon = DaemonGuard::new(tmp.path());
        let mut c = clipctl_with_hosts(&hosts);
        c.args(["index", "--image", &format!("{name}/clip/busybox:latest")])
            .env("CLIP_INSECURE_REGISTRIES", insecure);
        env(&mut c, tmp.path());
        let o = c.output().unwrap();
        let e = err(&o);
        if insecure.is_empty() {
            assert!(!o.status.success());
            assert!(
                e.contains(&format!("TLS with {name} failed")) && e.contains("CLIP_INSECURE_REGISTRIES"),
                "{e}"
            );
            assert!(
                e.contains(&format!("/etc/containers/certs.d/{name}/")) && e.contains("/etc/docker/certs.d/"),
                "{e}"
            );
        } else {
            assert!(o.status.success(), "{e}");
        }
    }
    // A registry that accepts the connection and never answers: the
    // manifest lookup ends at the deadline (CLIP_REGISTRY_DEADLINE, here
    // 3 s; 20 s by default) instead of hanging.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || silent.incoming().take(20).flatten().collect::<Vec<_>>());
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let mut c = clipctl();
    c.args(["index", "--image", &format!("127.0.0.1:{port}/x/y:latest")]);
    env(&mut c, tmp.path());
    c.env("CLIP_REGISTRY_DEADLINE", "3");
    let mut child = c.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        // Far beyond the deadline: only a hang gets here.
        assert!(started.elapsed() < std::time::Duration::from_secs(120), "index hung");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(
        err(&o).contains("manifest x/y:latest: gave up after 3s, the operation's deadline"),
        "{}",
        err(&o)
    );
    drop(held);
    // A bad setting stops clipd at once, and clipctl says which.
    for (k, v) in [("CLIP_CACHE_MAX", "10 lots"), ("CLIP_REGISTRY_DEADLINE", "0")] {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = clipctl();
        c.args(["images"]);
        env(&mut c, tmp.path());
        let o = c.env(k, v).output().unwrap();
        assert!(!o.status.success());
        assert!(
            err(&o).contains(&format!("clipd could not start: {k}=\"{v}\"")),
            "{}",
            err(&o)
        );
    }
}
