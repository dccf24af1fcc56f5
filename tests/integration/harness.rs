//! Real parts for the integration tests: the test images (built once per
//! target directory by tests/fixtures/build-images.sh), a real registry on
//! loopback serving them, their `umoci unpack`, and the clipctl binary.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const TAGS: [&str; 4] = ["busybox", "debian", "edge", "edge-zstd"];
/// The image-semantics fixtures (tests/fixtures/build-semantics.sh).
pub const SEMANTICS: [&str; 6] = [
    "neg-mtime",
    "symlink-mode",
    "symlink-parent",
    "link-whiteout",
    "implicit-dir",
    "bad-diffid",
];

/// Where fixtures live: shared by every test process of this target dir.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("clip-fixtures")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `f` once per target directory, across test processes (nextest runs
/// each test in its own process), guarded by a file lock and a stamp.
fn once_on_disk(name: &str, f: impl FnOnce()) {
    let dir = fixtures_dir();
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let lock = File::create(dir.parent().unwrap().join(format!("{name}.lock"))).unwrap();
    lock.lock().unwrap();
    let stamp = dir.parent().unwrap().join(format!("{name}.stamp"));
    if !stamp.exists() {
        f();
        File::create(&stamp).unwrap();
    }
    lock.unlock().unwrap();
}

/// The OCI layout holding every test image.
pub fn layout() -> PathBuf {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/build-images.sh");
        once_on_disk("images", || {
            run(Command::new("bash").arg(&script).arg(fixtures_dir()));
        });
        fixtures_dir().join("oci")
    })
    .clone()
}

/// `umoci unpack` of an image: the reference the index must equal.
pub fn unpacked(tag: &str) -> PathBuf {
    let layout = layout();
    // edge-zstd has the same layers as edge (umoci 0.4.7 cannot read zstd).
    let tag = if tag == "edge-zstd" { "edge" } else { tag };
    let dest = fixtures_dir().join("unpacked").join(tag);
    once_on_disk(&format!("unpack-{tag}"), || {
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        run(Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&dest));
    });
    dest.join("rootfs")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A status code from a plain HTTP/1.0 GET on loopback.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A real distribution registry (Debian's docker-registry) on loopback.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start(storage: &Path) -> Registry {
        Self::start_with(storage, "")
    }

    /// Starts a registry with extra YAML config: top-level (such as
    /// `auth:`), or, indented, more of its `http:` section (`  tls:`).
    pub fn start_with(storage: &Path, extra: &str) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                     delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                    storage.display()
                ),
            )
            .unwrap();
            let log = dir.path().join("registry.log");
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(File::create(dir.path().join("stdout.log")).unwrap())
                .stderr(File::create(&log).unwrap())
                .spawn()
                .expect("docker-registry is installed");
            let mut reg = Registry {
                child,
                port,
                log,
                _dir: tempfile::tempdir().unwrap(),
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                // A TLS registry answers a plain request with 400.
                let tls = extra.contains("tls:");
                if matches!(http_status(port, "/v2/"), Some(200 | 401))
                    || (tls && http_status(port, "/v2/") == Some(400))
                {
                    reg._dir = dir;
                    return reg;
                }
                if reg.child.try_wait().unwrap().is_some() {
                    break; // port taken between probe and bind: try another
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = reg.child.kill();
        }
        panic!("docker-registry did not start");
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes the registry wrote in response bodies, from its access log.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served_matching("")
    }

    /// [`Registry::bytes_served`] once it is at least `min`, or after 60 s.
    /// The registry logs a response just after sending it, so a client
    /// that has its bytes can look before the line is there.
    pub fn bytes_served_at_least(&self, min: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let b = self.bytes_served();
            if b >= min || Instant::now() > deadline {
                return b;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Registry::bytes_served`] after a pause for the registry to log
    /// the responses it has just sent.
    pub fn settled_bytes(&self) -> u64 {
        std::thread::sleep(Duration::from_millis(300));
        self.bytes_served()
    }

    /// Bytes the registry wrote in blob responses (whole or ranges).
    pub fn blob_bytes_served(&self) -> u64 {
        self.bytes_served_matching("/blobs/")
    }

    fn bytes_served_matching(&self, uri_part: &str) -> u64 {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("response completed") && l.contains(uri_part))
            .filter_map(|l| l.split("http.response.written=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A registry serving every test image as `127.0.0.1:PORT/clip/TAG:latest`.
/// The images are pushed once (by skopeo) into storage shared by all tests.
pub fn registry() -> Registry {
    let layout = layout();
    let storage = fixtures_dir().join("registry");
    once_on_disk("push", || {
        let _ = std::fs::remove_dir_all(&storage);
        let reg = Registry::start(&storage);
        for tag in TAGS
            .iter()
            .chain(&["multi", "debian-base", "debian-alt", "app", "suid", "large", "arm"])
            .chain(&SEMANTICS)
        {
            run(Command::new("skopeo")
                .args([
                    "copy",
                    "--all",
                    "--quiet",
                    "--preserve-digests",
                    "--dest-tls-verify=false",
                ])
                .arg(format!("oci:{}:{tag}", layout.display()))
                .arg(format!("docker://{}/clip/{tag}:latest", reg.host())));
        }
    });
    Registry::start(&storage)
}

/// clipctl, talking to the tests' shared clipd (its state under the
/// fixtures, out of the host's /run/clip and /var/lib/clip); tests that
/// need a node of their own set the directories again (`mount::env`).
pub fn clipctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clipctl"));
    // Image mounts go with their last container (the linger has its own test).
    c.env_remove("CLIP_CHECKPOINT_MIB")
        .env("CLIP_IMAGE_LINGER", "0")
        .env("DOCKER_CONFIG", "/nonexistent-clip-test")
        .env("CLIP_RUN_DIR", fixtures_dir().join("run"))
        .env("CLIP_BASE_DIR", fixtures_dir().join("base"))
        .env("CLIP_CACHE_DIR", fixtures_dir().join("cache"));
    c.stdin(Stdio::null());
    c
}

/// Stops the clipd of a test's own state directory when dropped.
pub struct DaemonGuard(pub PathBuf);

impl DaemonGuard {
    pub fn new(tmp: &Path) -> Self {
        Self(tmp.to_path_buf())
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        // A test that failed between `mount --cid` and `umount --cid` left
        // a container's overlay mounted over clipd's mount: detach it
        // first, or it outlives the test.
        for dir in overlays_under(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&dir).output();
        }
        let _ = clipctl()
            .args(["daemon", "stop"])
            .env("CLIP_RUN_DIR", self.0.join("run"))
            .env("CLIP_BASE_DIR", self.0.join("base"))
            .env("CLIP_CACHE_DIR", self.0.join("cache"))
            .output();
    }
}

/// Overlay mount points below `dir`, deepest first (from this process's
/// mountinfo, whose paths escape spaces and the like as octal).
pub fn overlays_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == "overlay").then(|| PathBuf::from(unescape_mountinfo(point)))
        })
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok())
        {
            Some(v) if b[i] == b'\\' => {
                out.push(v);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs clipctl, asserting success; returns stdout.
pub fn clipctl_ok(args: &[&str]) -> Vec<u8> {
    run(clipctl().args(args)).stdout
}

pub fn process_running(pid: i32) -> bool {
    // A zombie still answers kill(0); look at its threads' states instead.
    // A killed process's leader is a zombie while its other threads are
    // still exiting, holding its descriptors (a listening socket, say).
    let live = |stat: &str| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with(['Z', 'X']))
    };
    pid > 0
        && std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
            tasks
                .flatten()
                .any(|t| std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| live(&s)))
        })
}

/// The manifest of `tag` in an OCI layout: its blob path and JSON.
pub fn manifest_of(layout: &Path, tag: &str) -> (PathBuf, serde_json::Value) {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {}", layout.display()));
    let path = layout
        .join("blobs/sha256")
        .join(m["digest"].as_str().unwrap().trim_start_matches("sha256:"));
    let v = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    (path, v)
}

/// The digests of `tag`'s layers in the test layout.
pub fn layer_digests(tag: &str) -> Vec<String> {
    let (_, m) = manifest_of(&layout(), tag);
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// The blob of layer `i` of `tag` in the test layout.
pub fn layer_blob(tag: &str, i: usize) -> PathBuf {
    let lay = layout();
    let (_, m) = manifest_of(&lay, tag);
    lay.join("blobs/sha256")
        .join(m["layers"][i]["digest"].as_str().unwrap().trim_start_matches("sha256:"))
}

/// Asserts that an error message says each thing once: no part of it
/// (split at ": ") is repeated.
pub fn assert_says_once(msg: &str) {
    let parts: Vec<&str> = msg.trim().split(": ").map(str::trim).filter(|p| p.len() >= 8).collect();
    for (i, p) in parts.iter().enumerate() {
        for q in &parts[i + 1..] {
            assert!(!q.contains(p) && !p.contains(q), "the message repeats {q:?}: {msg}");
        }
    }
}
