//! `clipctl index` and `clipctl inspect` (issue 2).

use std::path::Path;

use serde_json::Value;

use crate::harness::{self, clipctl, clipctl_ok, layout, manifest_of, registry, unpacked};
use crate::tree;

fn index_to(image: &str, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["index", "--image", image, "--out", out.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    serde_json::from_slice(&clipctl_ok(&args)).unwrap()
}

fn listing(index: &Path) -> Vec<u8> {
    clipctl_ok(&[
        "inspect",
        index.to_str().unwrap(),
        "--ls",
        "/",
        "-R",
        "--json",
        "--hash",
    ])
}

/// The index of an image pulled from the registry describes exactly the
/// tree `umoci unpack` makes of it, and every file read back through the
/// checkpoints (range GETs on the registry) has the unpacked content.
fn matches_umoci(tag: &str) {
    let reg = registry();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("image.clip");
    let summary = index_to(&format!("{}/clip/{tag}:latest", reg.host()), &out, &[]);
    assert!(summary["files"].as_u64().unwrap() > 0);
    assert_eq!(
        summary["index_bytes"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );
    let clip = tree::from_clip(&listing(&out));
    let disk = tree::from_disk(&unpacked(tag));
    tree::assert_same(&clip, &disk, tag);
}

#[test]
fn busybox_matches_umoci_unpack() {
    matches_umoci("busybox");
}

#[test]
fn debian_matches_umoci_unpack() {
    matches_umoci("debian");
}

#[test]
fn edge_cases_match_umoci_unpack() {
    matches_umoci("edge");
}

#[test]
fn zstd_layers_give_the_same_tree() {
    matches_umoci("edge-zstd");
}

#[test]
fn edge_case_details() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("edge.clip");
    let summary = index_to(&format!("oci:{}:edge", layout().display()), &out, &[]);
    assert_eq!(summary["layers"], 3);
    let clip = tree::from_clip(&listing(&out));
    let get = |p: &str| clip.entries.get(p.as_bytes()).unwrap_or_else(|| panic!("{p} missing"));
    // Whiteouts and opaque directories.
    assert!(!clip.entries.contains_key(&b"/edge/gone.txt"[..]));
    assert!(!clip.entries.contains_key(&b"/edge/gone-dir"[..]));
    assert!(!clip.entries.contains_key(&b"/edge/opaque/lower.txt"[..]));
    assert!(!clip.entries.contains_key(&b"/edge/opaque/sub"[..]));
    assert!(clip.entries.contains_key(&b"/edge/opaque/upper.txt"[..]));
    assert!(!clip.entries.keys().any(|k| k.windows(4).any(|w| w == b".wh.")));
    // Type changes across layers.
    assert_eq!(get("/edge/becomes-dir").kind, "dir");
    assert_eq!(get("/edge/dir-becomes-file").kind, "file");
    // Hardlinks: one inode, link count 4 (hard3 went with the opaque dir,
    // and odd/link-to-lower joined from the top layer).
    assert_eq!(get("/edge/hard1").nlink, Some(3));
    assert!(clip.links.contains(&vec![
        b"/edge/hard1".to_vec(),
        b"/edge/hard2".to_vec(),
        b"/odd/link-to-lower".to_vec()
    ]));
    // Special bits, capabilities and devices.
    assert_eq!(get("/edge/setuid").mode, 0o4755);
    assert_eq!(get("/edge/setgid").mode, 0o2711);
    assert_eq!(get("/edge/sticky").mode, 0o1777);
    assert!(get("/edge/ping").xattrs.contains_key(&b"security.capability"[..]));
    assert_eq!(get("/edge/chardev").dev, Some((1, 3)));
    assert_eq!(get("/edge/fifo").kind, "fifo");
    // Sparse files, both formats (over 4 GiB: mount.rs, image "large").
    assert_eq!(get("/edge/new-dir/pax-sparse").size, Some(2 << 20));
    assert_eq!(get("/edge/sparse-small").size, Some(3 << 20));
    // Hostile paths stay inside the tree; duplicates: the last one wins.
    assert!(clip.entries.contains_key(&b"/escape.txt"[..]));
    assert!(clip.entries.contains_key(&b"/abs/file.txt"[..]));
    assert!(clip.entries.contains_key(&b"/odd/plain"[..]));
    assert_eq!(get("/odd/dup").mode, 0o600);
    assert_eq!(get("/odd/dup2").kind, "dir");
    assert_eq!(get("/odd/caps").mtime, (1_700_000_000, 123_456_789));
    // Non-UTF-8 names survive byte for byte.
    assert!(clip.entries.contains_key(&b"/edge/caf\xe9"[..]));
}

#[test]
fn registry_and_layout_give_identical_trees_and_inodes() {
    let reg = registry();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a.clip"),
        dir.path().join("b.clip"),
        dir.path().join("c.clip"),
    );
    let sa = index_to(&format!("{}/clip/debian:latest", reg.host()), &a, &[]);
    let sb = index_to(&format!("oci:{}:debian", layout().display()), &b, &[]);
    index_to(&format!("{}/clip/debian:latest", reg.host()), &c, &["--jobs", "1"]);
    assert_eq!(sa["manifest_digest"], sb["manifest_digest"]);
    let list = |p: &Path| clipctl_ok(&["inspect", p.to_str().unwrap(), "--ls", "/", "-R", "--json"]);
    assert_eq!(list(&a), list(&b));
    // Same image, same index, byte for byte, however many layers ran at once.
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
}

#[test]
fn index_holds_manifest_digest_and_config_but_no_file_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deb.clip");
    let s = index_to(&format!("oci:{}:debian", layout().display()), &out, &[]);
    let info: Value = serde_json::from_slice(&clipctl_ok(&["inspect", out.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(info["manifest_digest"], s["manifest_digest"]);
    assert_eq!(info["config"]["config"]["Cmd"][0], "/bin/bash");
    assert_eq!(info["platform"], "linux/amd64");
    // Metadata only: far smaller than the data, and no file's bytes inside.
    let index = std::fs::read(&out).unwrap();
    let compressed = s["compressed_bytes"].as_u64().unwrap();
    assert!(
        (index.len() as u64) < compressed / 20,
        "{} vs {compressed}",
        index.len()
    );
    let motd = clipctl_ok(&["cat", out.to_str().unwrap(), "/etc/motd"]);
    assert_eq!(motd, b"second layer\n");
    let random = clipctl_ok(&["cat", out.to_str().unwrap(), "/opt/clip/random.bin"]);
    assert_eq!(random.len(), 3_000_000);
    assert!(!index.windows(64).any(|w| w == &random[1_000_000..1_000_064]));
}

#[test]
fn multi_arch_index_resolves_by_platform() {
    let reg = registry();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.clip");
    let image = format!("{}/clip/multi:latest", reg.host());
    let amd = index_to(&image, &out, &[]);
    assert_eq!(amd["layers"], 1, "linux/amd64 is the busybox image");
    let arm = index_to(&image, &out, &["--platform", "linux/arm64"]);
    assert_eq!(arm["layers"], 3, "linux/arm64 is the edge image");
    let local = index_to(
        &format!("oci:{}:multi", layout().display()),
        &out,
        &["--platform", "linux/arm64"],
    );
    assert_eq!(local["manifest_digest"], arm["manifest_digest"]);
    let err = clipctl()
        .args(["index", "--image", &image, "--out"])
        .arg(&out)
        .args(["--platform", "linux/s390x"])
        .output()
        .unwrap();
    assert_eq!(err.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&err.stderr).contains("no manifest for linux/s390x"));
}

#[test]
fn checkpoint_spacing_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let image = format!("oci:{}:debian", layout().display());
    let mut last = u64::MAX;
    for mib in ["1", "2", "4", "8"] {
        let out = dir.path().join(format!("{mib}.clip"));
        let s = index_to(&image, &out, &["--checkpoint-mib", mib]);
        let n = s["checkpoints"].as_u64().unwrap();
        let expected = s["uncompressed_bytes"].as_u64().unwrap() / (mib.parse::<u64>().unwrap() << 20);
        assert!(
            n < last && n >= expected / 2 && n <= expected + 4,
            "{mib} MiB: {n} checkpoints, ~{expected} expected"
        );
        last = n;
    }
    let out = dir.path().join("env.clip");
    let s: Value = serde_json::from_slice(
        &clipctl()
            .args(["index", "--image", &image, "--out", out.to_str().unwrap(), "--json"])
            .env("CLIP_CHECKPOINT_MIB", "8")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(s["checkpoints"].as_u64(), Some(last));
}

fn expect_failure(args: &[&str], needle: &str) {
    let out = clipctl().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    harness::assert_says_once(&stderr);
}

#[test]
fn corrupted_and_truncated_index_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.clip");
    index_to(&format!("oci:{}:busybox", layout().display()), &good, &[]);
    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.path().join("bad.clip");
    let p = bad.to_str().unwrap();
    let meta_end = 72 + u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    assert!(meta_end > 100 && meta_end < bytes.len(), "the index has windows");
    for (i, needle) in [
        (100, "checksum"),
        (meta_end - 1, "checksum"),
        (50, "checksum"),
        (9, "version"),
    ] {
        let mut b = bytes.clone();
        b[i] ^= 0x40;
        std::fs::write(&bad, &b).unwrap();
        expect_failure(&["inspect", p], needle);
    }
    // A window is checked when a read needs it (loading reads only the
    // header and the metadata): reading every file finds the damage.
    let mut b = bytes.clone();
    *b.last_mut().unwrap() ^= 0x40;
    std::fs::write(&bad, &b).unwrap();
    expect_failure(
        &["inspect", p, "--ls", "/", "-R", "--hash"],
        "the index file is corrupted",
    );
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    expect_failure(&["inspect", p], "truncated");
    std::fs::write(&bad, b"not an index at all").unwrap();
    expect_failure(&["inspect", p], "not a clip index");
    std::fs::write(&bad, b"").unwrap();
    expect_failure(&["inspect", p], "not a clip index");
}

/// Copies the layout so that a test can damage it.
fn scratch_layout(dir: &Path) -> std::path::PathBuf {
    let dst = dir.join("oci");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(layout())
        .arg(&dst)
        .status()
        .unwrap();
    assert!(st.success());
    dst
}

#[test]
fn tampered_truncated_and_unknown_layers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let lay = scratch_layout(dir.path());
    let out = dir.path().join("x.clip");
    let image = format!("oci:{}:busybox", lay.display());
    let (_, m) = manifest_of(&lay, "busybox");
    let layer = lay
        .join("blobs/sha256")
        .join(m["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:"));
    let original = std::fs::read(&layer).unwrap();
    let args = ["index", "--image", &image, "--out", out.to_str().unwrap()];

    // A flipped bit deep in the data: gzip's CRC or our digest catches it.
    let mut b = original.clone();
    let n = b.len();
    b[n - 100] ^= 1;
    std::fs::write(&layer, &b).unwrap();
    expect_failure(&args, "layer 0");
    // Same size, valid gzip, different content: only the digest can tell.
    let gz = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc {} | gzip -1 -n", layer.display()))
        .output()
        .unwrap()
        .stdout;
    std::fs::write(&layer, &gz).unwrap();
    expect_failure(&args, "layer 0");
    // Truncated blob.
    std::fs::write(&layer, &original[..original.len() / 2]).unwrap();
    expect_failure(&args, "bytes");
    assert!(!out.exists(), "no index is written for a failed run");
    std::fs::write(&layer, &original).unwrap();
    clipctl_ok(&args);

    // Unknown layer media type, and a malformed manifest.
    let (mpath, mut m) = manifest_of(&lay, "edge");
    m["layers"][1]["mediaType"] = "application/vnd.example.layer.v1.tar+lz4".into();
    let doc = serde_json::to_vec(&m).unwrap();
    std::fs::write(&mpath, &doc).unwrap();
    let image = format!("oci:{}:edge", lay.display());
    // The manifest no longer matches its descriptor: refused before anything else.
    expect_failure(
        &["index", "--image", &image, "--out", out.to_str().unwrap()],
        "its descriptor says",
    );
    let lay2 = dir.path().join("oci2");
    std::fs::create_dir_all(lay2.join("blobs/sha256")).unwrap();
    std::fs::copy(lay.join("oci-layout"), lay2.join("oci-layout")).unwrap();
    for e in std::fs::read_dir(lay.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), lay2.join("blobs/sha256").join(e.file_name())).unwrap();
    }
    let digest = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&doc));
    std::fs::write(lay2.join("blobs/sha256").join(&digest), &doc).unwrap();
    let idx = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{digest}"), "size": doc.len(),
        "annotations": {"org.opencontainers.image.ref.name": "lz4"}}]});
    std::fs::write(lay2.join("index.json"), serde_json::to_vec(&idx).unwrap()).unwrap();
    expect_failure(
        &[
            "index",
            "--image",
            &format!("oci:{}:lz4", lay2.display()),
            "--out",
            out.to_str().unwrap(),
        ],
        "unsupported media type",
    );
    let bad = b"{\"schemaVersion\": 2, \"layers\": 7}";
    let digest = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(bad));
    std::fs::write(lay2.join("blobs/sha256").join(&digest), bad).unwrap();
    let idx = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{digest}"), "size": bad.len(),
        "annotations": {"org.opencontainers.image.ref.name": "bad"}}]});
    std::fs::write(lay2.join("index.json"), serde_json::to_vec(&idx).unwrap()).unwrap();
    expect_failure(
        &[
            "index",
            "--image",
            &format!("oci:{}:bad", lay2.display()),
            "--out",
            out.to_str().unwrap(),
        ],
        "malformed manifest",
    );
    expect_failure(
        &[
            "index",
            "--image",
            &format!("oci:{}:nosuchtag", lay2.display()),
            "--out",
            out.to_str().unwrap(),
        ],
        "no image tagged",
    );
}

#[test]
fn missing_image_on_registry_is_a_clear_error() {
    let reg = registry();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.clip");
    expect_failure(
        &[
            "index",
            "--image",
            &format!("{}/clip/nope:latest", reg.host()),
            "--out",
            out.to_str().unwrap(),
        ],
        "has no clip/nope:latest (HTTP 404)",
    );
}

#[test]
fn cat_fetches_only_the_spans_that_hold_the_file() {
    let reg = registry();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deb.clip");
    let s = index_to(
        &format!("{}/clip/debian:latest", reg.host()),
        &out,
        &["--checkpoint-mib", "1"],
    );
    let before = reg.bytes_served_at_least(s["compressed_bytes"].as_u64().unwrap());
    assert!(
        before >= s["compressed_bytes"].as_u64().unwrap(),
        "indexing read every layer once"
    );
    // Every line of the indexing is in: nothing more comes before the cat.
    let before = reg.settled_bytes();
    let motd = clipctl_ok(&["cat", out.to_str().unwrap(), "/etc/os-release"]);
    assert!(String::from_utf8_lossy(&motd).contains("Debian"));
    reg.bytes_served_at_least(before + 1);
    // Any later response of the cat's is logged too.
    let fetched = reg.settled_bytes() - before;
    let info: Value = serde_json::from_slice(&clipctl_ok(&["inspect", out.to_str().unwrap(), "--json"])).unwrap();
    let big = info["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["compressed_bytes"].as_u64().unwrap())
        .max()
        .unwrap();
    let spans = info["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["checkpoints"].as_u64().unwrap())
        .sum::<u64>();
    // Two spans of the largest layer are about 2/spans of it; allow 3.
    assert!(
        fetched > 0 && fetched < 3 * big / (spans / 2),
        "fetched {fetched} of a {big}-byte layer"
    );
}

#[test]
fn credentials_come_from_the_docker_config_and_never_leak() {
    let _ = registry(); // images pushed into the shared storage
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = std::process::Command::new("htpasswd")
        .args(["-Bbn", "clipuser", "s3cret-Pa55"])
        .output()
        .unwrap();
    assert!(htpasswd.status.success());
    let hp = dir.path().join("htpasswd");
    std::fs::write(&hp, &htpasswd.stdout).unwrap();
    let reg = harness::Registry::start_with(
        &harness::fixtures_dir().join("registry"),
        &format!("auth:\n  htpasswd:\n    realm: clip-test\n    path: {}\n", hp.display()),
    );
    let out = dir.path().join("a.clip");
    let image = format!("{}/clip/busybox:latest", reg.host());
    let args = ["index", "--image", &image, "--out", out.to_str().unwrap()];

    // No credentials: a clear refusal.
    let r = clipctl().args(args).output().unwrap();
    assert_eq!(r.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&r.stderr).to_lowercase();
    assert!(
        stderr.contains("401") || stderr.contains("unauthorized") || stderr.contains("not authorized"),
        "{stderr}"
    );

    // Credentials from $DOCKER_CONFIG/config.json.
    let cfg = dir.path().join("docker");
    std::fs::create_dir_all(&cfg).unwrap();
    let auth = std::process::Command::new("sh")
        .arg("-c")
        .arg("printf clipuser:s3cret-Pa55 | base64")
        .output()
        .unwrap();
    let auth = String::from_utf8(auth.stdout).unwrap().trim().to_string();
    std::fs::write(
        cfg.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host()),
    )
    .unwrap();
    let r = clipctl()
        .args(args)
        .env("DOCKER_CONFIG", &cfg)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    let index = std::fs::read(&out).unwrap();
    for secret in ["s3cret-Pa55", auth.as_str()] {
        assert!(!stderr.contains(secret), "credential in the log");
        assert!(
            !index.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "credential in the index"
        );
    }
    // Range reads through the index use the same credentials.
    let cat = clipctl()
        .args(["cat", out.to_str().unwrap(), "/etc/motd"])
        .env("DOCKER_CONFIG", &cfg)
        .output()
        .unwrap();
    assert_eq!(
        cat.stdout,
        b"hello from clip\n",
        "{}",
        String::from_utf8_lossy(&cat.stderr)
    );
}

/// Indexing through a registry that answers 500 and 429 and drops
/// connections mid-blob still reads every layer exactly, resuming with range
/// requests; a registry that never recovers gives a clear error in bounded
/// time.
#[test]
fn indexing_survives_a_flaky_registry() {
    use crate::proxy::{Fault, FaultProxy};
    let reg = registry();
    let proxy = FaultProxy::start(reg.port);
    let dir = tempfile::tempdir().unwrap();
    let (direct, flaky) = (dir.path().join("direct.clip"), dir.path().join("flaky.clip"));
    index_to(&format!("{}/clip/debian:latest", reg.host()), &direct, &["--jobs", "1"]);
    proxy.queue(&[
        Fault::Status(500),
        Fault::Status(429),
        Fault::DropAfter(5_000_000),
        Fault::Status(503),
        Fault::DropAfter(1_000_000),
        Fault::Stall(std::time::Duration::from_millis(300)),
    ]);
    index_to(
        &format!("{}/clip/debian:latest", proxy.host()),
        &flaky,
        &["--jobs", "1"],
    );
    // Config: 500, 429, then served (the 5 MB drop does not bite a small blob);
    // layer 0: 503, cut after 1 MB and resumed (stalled); layer 1.
    assert!(
        proxy.blob_requests.load(std::sync::atomic::Ordering::Relaxed) >= 7,
        "{} blob requests",
        proxy.blob_requests.load(std::sync::atomic::Ordering::Relaxed)
    );
    let list = |p: &Path| clipctl_ok(&["inspect", p.to_str().unwrap(), "--ls", "/", "-R", "--json"]);
    assert_eq!(list(&direct), list(&flaky));
    let summary = |p: &Path| {
        let mut v: Value = serde_json::from_slice(&clipctl_ok(&["inspect", p.to_str().unwrap(), "--json"])).unwrap();
        v["reference"] = Value::Null;
        v
    };
    assert_eq!(summary(&direct), summary(&flaky));

    // A registry that corrupts a blob in flight is caught by the digest
    // (on a node of its own: the shared one has this image indexed now).
    proxy.always(Some(Fault::FlipAt(2_000_000)));
    let out = dir.path().join("corrupt.clip");
    let _daemon = harness::DaemonGuard::new(dir.path());
    let mut c = clipctl();
    c.args([
        "index",
        "--image",
        &format!("{}/clip/debian:latest", proxy.host()),
        "--out",
    ])
    .arg(&out);
    crate::mount::env(&mut c, dir.path());
    let o = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("layer 0"), "{stderr}");
    harness::assert_says_once(&stderr);
    // A registry that never recovers: retries, then a clear error.
    proxy.always(Some(Fault::Status(500)));
    let started = std::time::Instant::now();
    expect_failure(
        &[
            "index",
            "--image",
            &format!("{}/clip/busybox:latest", proxy.host()),
            "--out",
            out.to_str().unwrap(),
        ],
        "500",
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "gave up in {:?}",
        started.elapsed()
    );
}
