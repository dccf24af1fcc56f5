//! Indexes published in the registry (issue 13): one node indexes and
//! pushes, the others fetch the index instead of reading the layers; an
//! artifact that is tampered with, or belongs to another image, is refused
//! and the node indexes for itself.

use std::path::Path;
use std::process::Command;

use crate::harness::{clipctl, layout, manifest_of, unpacked, DaemonGuard, Registry};
use crate::mount::env;
use crate::proxy::FaultProxy;

fn node(tmp: &Path, args: &[&str]) -> std::process::Output {
    let mut c = clipctl();
    c.args(args);
    env(&mut c, tmp);
    c.output().unwrap()
}

fn ok(tmp: &Path, args: &[&str]) -> (String, String) {
    let o = node(tmp, args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{args:?}: {err}");
    (out, err)
}

fn curl(args: &[&str]) -> Vec<u8> {
    let o = Command::new("curl").arg("-sSf").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The stored index of a node (there is one image per node here).
fn stored_index(tmp: &Path) -> std::path::PathBuf {
    std::fs::read_dir(tmp.join("base/index"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "clip"))
        .expect("a stored index")
}

#[test]
fn a_published_index_is_used_by_other_nodes_and_a_bad_one_is_refused() {
    // A registry of its own: artifacts pushed here must not reach the
    // other tests' images.
    let storage = tempfile::tempdir().unwrap();
    let reg = Registry::start(storage.path());
    for tag in ["debian", "busybox"] {
        let o = Command::new("skopeo")
            .args(["copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout().display()))
            .arg(format!("docker://{}/clip/app:{tag}", reg.host()))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let proxy = FaultProxy::start(reg.port);
    // Nodes read through the proxy (it logs blob requests); node A pushes
    // to the registry directly (the proxy forwards reads only).
    let image = |tag: &str| format!("{}/clip/app:{tag}", proxy.host());
    let direct = |tag: &str| format!("{}/clip/app:{tag}", reg.host());
    let digest_of = |tag: &str| {
        let (path, _) = manifest_of(&layout(), tag);
        format!("sha256:{}", path.file_name().unwrap().to_str().unwrap())
    };
    let (debian, busybox) = (digest_of("debian"), digest_of("busybox"));
    let cmd = "cat /usr/bin/bash /opt/clip/random.bin | md5sum";
    let expected = {
        let u = unpacked("debian");
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cat {0}/usr/bin/bash {0}/opt/clip/random.bin | md5sum",
                u.display()
            ))
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    let nodes: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let _daemons: Vec<DaemonGuard> = nodes.iter().map(|n| DaemonGuard::new(n.path())).collect();
    let (a, b, c, d) = (nodes[0].path(), nodes[1].path(), nodes[2].path(), nodes[3].path());

    // Node A indexes and publishes; Debian's registry has no referrers
    // API, so the artifact is listed under the referrers tag.
    let (out, _) = ok(a, &["index", "--image", &direct("debian"), "--push"]);
    assert!(out.contains("published: artifact sha256:"), "{out}");
    assert!(out.contains("(index, hints)"), "{out}");
    assert!(out.contains("referrers tag scheme"), "{out}");
    let tag = debian.replacen(':', "-", 1);
    let listed = curl(&[
        "-H",
        &format!("Accept: {OCI_INDEX}"),
        &format!("http://{}/v2/clip/app/manifests/{tag}", reg.host()),
    ]);
    let listed: serde_json::Value = serde_json::from_slice(&listed).unwrap();
    assert_eq!(listed["manifests"][0]["artifactType"], "application/vnd.clip.index");
    let hints_a = std::fs::read(stored_index(a).with_extension("hints")).unwrap();
    assert_eq!(
        listed["manifests"][0]["annotations"]["dev.clip.hints.size"],
        hints_a.len().to_string()
    );

    // Node B, empty: runs the image with the published index, reading
    // only ranges of the layers.
    let layers = crate::harness::layer_digests("debian");
    proxy.log.lock().unwrap().clear();
    let (out, err) = ok(b, &["run", "--rm", &image("debian"), "sh", "-c", cmd]);
    assert_eq!(out, expected);
    assert!(!err.contains("cannot be used"), "{err}");
    let log = proxy.log.lock().unwrap().clone();
    let n = crate::proxy::assert_ranges_only(&log, &layers);
    assert!(n > 0, "no layer reads: {log:?} {layers:?}");
    let (info, _) = ok(b, &["inspect", stored_index(b).to_str().unwrap()]);
    assert!(info.contains("origin:      registry (artifact sha256:"), "{info}");
    // The publisher's hints came along, for a guessed start here too.
    let hints_b = std::fs::read(stored_index(b).with_extension("hints")).unwrap();
    assert!(hints_b == hints_a, "node B has node A's hints");

    // An artifact copied from another image: node A publishes busybox's,
    // then its referrers list is put under Debian's tag.
    let (out, _) = ok(a, &["index", "--image", &direct("busybox"), "--push"]);
    assert!(out.contains("published"), "{out}");
    let original = curl(&[
        "-H",
        &format!("Accept: {OCI_INDEX}"),
        &format!("http://{}/v2/clip/app/manifests/{tag}", reg.host()),
    ]);
    let busybox_list = curl(&[
        "-H",
        &format!("Accept: {OCI_INDEX}"),
        &format!(
            "http://{}/v2/clip/app/manifests/{}",
            reg.host(),
            busybox.replacen(':', "-", 1)
        ),
    ]);
    let put = |body: &[u8]| {
        let file = storage.path().join("list.json");
        std::fs::write(&file, body).unwrap();
        curl(&[
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {OCI_INDEX}"),
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("http://{}/v2/clip/app/manifests/{tag}", reg.host()),
        ]);
    };
    put(&busybox_list);
    let (out, err) = ok(c, &["run", "--rm", &image("debian"), "sh", "-c", cmd]);
    assert_eq!(out, expected);
    assert!(
        err.contains("cannot be used") && err.contains("for another image"),
        "{err}"
    );
    assert!(stored_index(c).with_extension("origin").exists());
    let (info, _) = ok(c, &["inspect", stored_index(c).to_str().unwrap()]);
    assert!(
        info.contains("origin:      built here (the published one was unusable)"),
        "{info}"
    );

    // A tampered artifact: Debian's list back, its index blob altered in
    // the registry's storage (the registry serves it as it is).
    put(&original);
    let listed: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let blob = listed["manifests"][0]["annotations"]["dev.clip.index.digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let data = storage
        .path()
        .join("docker/registry/v2/blobs/sha256")
        .join(&blob[..2])
        .join(&blob)
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&data, bytes).unwrap();
    let (out, err) = ok(d, &["run", "--rm", &image("debian"), "sh", "-c", cmd]);
    assert_eq!(out, expected);
    assert!(err.contains("cannot be used") && err.contains("digest"), "{err}");

    // A multi-platform image: one index per platform manifest, each
    // attached to its own manifest, none to the image index.
    let o = Command::new("skopeo")
        .args([
            "copy",
            "--all",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:multi", layout().display()))
        .arg(format!("docker://{}/clip/app:multi", reg.host()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for platform in ["linux/amd64", "linux/arm64"] {
        let (out, _) = ok(
            a,
            &["index", "--image", &direct("multi"), "--platform", platform, "--push"],
        );
        assert!(out.contains("published"), "{out}");
    }
    let (_, multi) = manifest_of(&layout(), "multi");
    let lists = |digest: &str| {
        Command::new("curl")
            .args(["-sf", "-H", &format!("Accept: {OCI_INDEX}")])
            .arg(format!(
                "http://{}/v2/clip/app/manifests/{}",
                reg.host(),
                digest.replacen(':', "-", 1)
            ))
            .output()
            .unwrap()
    };
    for m in multi["manifests"].as_array().unwrap() {
        let o = lists(m["digest"].as_str().unwrap());
        assert!(o.status.success(), "no referrers of the {} manifest", m["platform"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["manifests"][0]["artifactType"], "application/vnd.clip.index");
    }
    assert!(
        !lists(&digest_of("multi")).status.success(),
        "an index attached to the image index"
    );
}
