//! Image semantics (issue 10): hand-built images (GNU tar, Python's
//! tarfile, hand-written headers; tests/fixtures/build-semantics.sh) whose
//! index and mount must equal what umoci (and containerd) unpack, entry by
//! entry. Where umoci itself is wrong, GNU tar's extraction is the
//! reference, as said at each place.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::harness::{self, assert_says_once, clipctl, clipctl_ok, registry, unpacked};
use crate::mount::Mounted;
use crate::tree::{self, Tree};

fn listing(index: &Path) -> Tree {
    tree::from_clip(&clipctl_ok(&[
        "inspect",
        index.to_str().unwrap(),
        "--ls",
        "/",
        "-R",
        "--json",
        "--hash",
    ]))
}

/// Indexes `tag` from the registry and mounts it; both trees must equal
/// umoci's unpack once `fix` has corrected what umoci gets wrong.
fn same_as_umoci(tag: &str, fix: impl Fn(&mut Tree)) -> Mounted {
    let reg = registry();
    let mut disk = tree::from_disk(&unpacked(tag));
    fix(&mut disk);
    let m = Mounted::new(&format!("{}/clip/{tag}:latest", reg.host()));
    tree::assert_same(&listing(&m.index), &disk, &format!("{tag} index"));
    tree::assert_same(&tree::from_disk(&m.dir), &disk, &format!("{tag} mount"));
    m
}

fn mtime(tree: &mut Tree, path: &str, secs: i64) {
    tree.entries
        .get_mut(path.as_bytes())
        .unwrap_or_else(|| panic!("{path} not in the tree"))
        .mtime = (secs, 0);
}

#[test]
fn pre_1970_and_base256_numbers_match_umoci() {
    // umoci (Go's time.Unix(..).UnixNano()) wraps dates after 2262 around
    // to 1915; GNU tar extracts the header's date, which clip keeps.
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(harness::layer_blob("neg-mtime", 1))
        .arg("-C")
        .arg(dir.path())
        .arg("py-2300.txt")
        .status()
        .unwrap();
    assert!(st.success());
    let gnu_2300 = std::fs::metadata(dir.path().join("py-2300.txt")).unwrap().mtime();
    assert_eq!(gnu_2300, 10_413_792_000);
    let m = same_as_umoci("neg-mtime", |t| mtime(t, "/py-2300.txt", gnu_2300));
    for (path, secs) in [
        ("old/1960.txt", -301_233_600),
        ("old", -631_152_000),
        ("py-1920.txt", -1_577_923_200),
        ("py-epoch-minus-1", -1),
    ] {
        assert_eq!(
            std::fs::symlink_metadata(m.dir.join(path)).unwrap().mtime(),
            secs,
            "{path}"
        );
    }
    let big = std::fs::metadata(m.dir.join("py-big-uid")).unwrap();
    assert_eq!((big.uid(), big.gid()), (3_000_000, 2_097_152), "base-256 ids");
    assert_eq!(
        std::fs::read(m.dir.join("v7-spaces.txt")).unwrap(),
        b"space-padded octal\n"
    );
}

#[test]
fn symlinks_are_0777_whatever_their_header_says() {
    let m = same_as_umoci("symlink-mode", |_| {});
    for link in ["link-0644", "link-0600"] {
        let md = std::fs::symlink_metadata(m.dir.join(link)).unwrap();
        assert!(md.file_type().is_symlink());
        assert_eq!(md.mode() & 0o7777, 0o777, "{link}");
    }
}

#[test]
fn later_layers_follow_lower_symlinks_like_containerd() {
    let m = same_as_umoci("symlink-parent", |_| {});
    for (link, target) in [
        ("rel", "real"),
        ("abs", "/real"),
        ("climb", "../../../real"),
        ("chain", "rel"),
    ] {
        assert_eq!(
            std::fs::read_link(m.dir.join(link)).unwrap(),
            Path::new(target),
            "{link} stays a symlink"
        );
    }
    for (file, text) in [
        ("real/a.txt", "through a relative symlink\n"),
        ("real/b.txt", "through an absolute symlink\n"),
        ("real/c.txt", "through a symlink that climbs out\n"),
        ("real/d.txt", "through a chain of symlinks\n"),
        ("lib/e.txt", "through ../lib from usr\n"),
    ] {
        assert_eq!(std::fs::read_to_string(m.dir.join(file)).unwrap(), text, "{file}");
    }
    assert!(std::fs::symlink_metadata(m.dir.join("lib")).unwrap().is_dir());
}

#[test]
fn a_hardlink_keeps_the_file_its_layer_whites_out() {
    let m = same_as_umoci("link-whiteout", |_| {});
    assert!(!m.dir.join("f").exists());
    assert_eq!(std::fs::read(m.dir.join("g")).unwrap(), b"the content of f\n");
    assert_eq!(std::fs::metadata(m.dir.join("g")).unwrap().mode() & 0o7777, 0o640);
}

/// The rule (README, "The index format"): a directory without an entry of
/// its own takes the newest mtime of what its layer puts beneath it; the
/// root without an entry has mtime 0. umoci leaves the time of the unpack.
#[test]
fn implicit_directories_follow_the_documented_rule() {
    let m = same_as_umoci("implicit-dir", |t| {
        mtime(t, "/", 0);
        mtime(t, "/top", 1_650_000_000);
        mtime(t, "/top/mid", 1_600_000_000);
    });
    let listed = std::fs::metadata(m.dir.join("listed")).unwrap();
    assert_eq!((listed.mtime(), listed.mode() & 0o7777), (1_400_000_000, 0o700));
}

#[test]
fn a_config_whose_diff_ids_do_not_match_is_refused() {
    let reg = registry();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.clip");
    let (_, manifest) = harness::manifest_of(&harness::layout(), "bad-diffid");
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    for image in [
        format!("{}/clip/bad-diffid:latest", reg.host()),
        format!("oci:{}:bad-diffid", harness::layout().display()),
    ] {
        let o = clipctl()
            .args(["index", "--image", &image, "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{image}: indexed a config that names other layers");
        assert!(err.contains("diff_ids") && err.contains(&layer), "{err}");
        assert_says_once(&err);
        assert!(!out.exists(), "no index is written");
    }
}
