//! Mount benchmark (issue 3). Run: `cargo bench --bench mount` (as root).
//!
//! In one run, against baselines measured in the same run:
//! * cold read of a 64 MiB file through the mount (page cache dropped, span
//!   cache empty, fresh mount) ÷ `curl BLOB | gzip -dc` of the same layer
//!   from the same registry: throughput ratio, goal ≥ 0.8;
//! * warm read through the mount ÷ reading the same file from local disk,
//!   both in the page cache: goal ≥ 0.9;
//! * `find -ls` (lstat of every entry) of the debian test image through a
//!   fresh mount ÷ the same on its `umoci unpack`: goal ≤ 1.5×.
//!
//! Each figure is the best of 3 runs.

#[path = "../tests/integration/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sh(cmd: &str) {
    let st = Command::new("bash").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

fn drop_caches() {
    sh("sync; echo 3 > /proc/sys/vm/drop_caches");
}

fn best<F: FnMut() -> Duration>(n: usize, mut f: F) -> Duration {
    (0..n).map(|_| f()).min().unwrap()
}

fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// A one-layer image holding `/big.bin`: 64 MiB of the machine's own
/// binaries and libraries, which compress about as real image content does.
fn big_image(root: &Path) -> (PathBuf, PathBuf) {
    let layout = root.join("oci");
    let big = root.join("rootfs/big.bin");
    if !root.join(".done").exists() {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root.join("rootfs")).unwrap();
        sh(&format!(
            "find /usr/lib /usr/bin -type f -size +100k 2>/dev/null | sort | xargs cat 2>/dev/null | head -c 67108864 > {}",
            big.display()
        ));
        assert_eq!(std::fs::metadata(&big).unwrap().len(), 64 << 20);
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        sh(&format!(
            "cd {r} && umoci init --layout oci && umoci new --image oci:big && \
             tar --numeric-owner -C rootfs -cf layer.tar big.bin && gzip -n -6 -c layer.tar > layer.tar.gz && \
             python3 {f}/oci_layout.py add-layer oci big layer.tar.gz application/vnd.oci.image.layer.v1.tar+gzip layer.tar && \
             touch .done",
            r = root.display(),
            f = fixtures.display()
        ));
    }
    (layout, big)
}

fn clipctl(tmp: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clipctl"));
    c.env("CLIP_BASE_DIR", tmp.join("base"))
        .env("CLIP_CACHE_DIR", tmp.join("cache"))
        .env("CLIP_RUN_DIR", tmp.join("run"));
    c
}

fn run(mut c: Command) {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn read_all(p: &Path) -> u64 {
    use std::io::Read;
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            return n;
        }
        n += k as u64;
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("clip-bench-mount");
    let (layout, big) = big_image(&root);
    let storage = root.join("registry");
    let _ = std::fs::remove_dir_all(&storage);
    let reg = harness::Registry::start(&storage);
    let image = format!("{}/bench/big:latest", reg.host());
    sh(&format!(
        "skopeo copy --quiet --preserve-digests --dest-tls-verify=false oci:{}:big docker://{image}",
        layout.display()
    ));
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("big.clip");
    let mut c = clipctl(tmp.path());
    c.args(["index", "--image", &image, "--out"]).arg(&index);
    run(c);
    let info: serde_json::Value = {
        let out = clipctl(tmp.path())
            .args(["inspect", index.to_str().unwrap(), "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let digest = info["layers"][0]["digest"].as_str().unwrap().to_string();
    let mnt = tmp.path().join("mnt");
    let mount = || {
        let mut c = clipctl(tmp.path());
        c.args(["mount", "--index"]).arg(&index).arg(&mnt);
        run(c);
    };
    let umount = || {
        let mut c = clipctl(tmp.path());
        c.arg("umount").arg(&mnt);
        run(c);
    };

    println!("# clip mount benchmark (best of 3)");
    println!();
    // Cold: baseline pipe vs the mount, interleaved.
    let url = format!("http://{}/v2/bench/big/blobs/{digest}", reg.host());
    let mut pipe = Duration::MAX;
    let mut cold = Duration::MAX;
    for _ in 0..3 {
        drop_caches();
        pipe = pipe.min(time(|| sh(&format!("curl -sf {url} | gzip -dc > /dev/null"))));
        let _ = std::fs::remove_dir_all(tmp.path().join("cache"));
        mount();
        drop_caches();
        cold = cold.min(time(|| assert_eq!(read_all(&mnt.join("big.bin")), 64 << 20)));
        umount();
    }
    let mib = 64.0;
    println!("| measure | baseline | clip | ratio | goal |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| cold read of a 64 MiB file | curl \\| gzip -dc: {:.0} MiB/s | mount: {:.0} MiB/s | **{:.2}** | ≥ 0.8 |",
        mib / pipe.as_secs_f64(),
        mib / cold.as_secs_f64(),
        pipe.as_secs_f64() / cold.as_secs_f64()
    );
    // Warm: page cache warm on both sides.
    mount();
    read_all(&mnt.join("big.bin"));
    read_all(&big);
    let warm = best(3, || time(|| assert_eq!(read_all(&mnt.join("big.bin")), 64 << 20)));
    let local = best(3, || time(|| assert_eq!(read_all(&big), 64 << 20)));
    umount();
    println!(
        "| warm read of the same file | local disk: {:.0} MiB/s | mount: {:.0} MiB/s | **{:.2}** | ≥ 0.9 |",
        mib / local.as_secs_f64(),
        mib / warm.as_secs_f64(),
        local.as_secs_f64() / warm.as_secs_f64()
    );

    // Metadata walk over the debian test image.
    let deb_reg = harness::registry();
    let deb_index = tmp.path().join("deb.clip");
    let mut c = clipctl(tmp.path());
    c.args([
        "index",
        "--image",
        &format!("{}/clip/debian:latest", deb_reg.host()),
        "--out",
    ])
    .arg(&deb_index);
    run(c);
    let unpacked = harness::unpacked("debian");
    let walk = |dir: &Path| {
        let st = Command::new("find")
            .arg(dir)
            .arg("-ls")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    };
    let mut fresh = Duration::MAX;
    let mut again = Duration::MAX;
    let mut local_cold = Duration::MAX;
    let mut local_warm = Duration::MAX;
    for _ in 0..3 {
        let mut c = clipctl(tmp.path());
        c.args(["mount", "--index"]).arg(&deb_index).arg(&mnt);
        run(c);
        drop_caches();
        fresh = fresh.min(time(|| walk(&mnt)));
        again = again.min(time(|| walk(&mnt)));
        umount();
        drop_caches();
        local_cold = local_cold.min(time(|| walk(&unpacked)));
        local_warm = local_warm.min(time(|| walk(&unpacked)));
    }
    println!(
        "| `find -ls` of the debian image, fresh mount vs cold local | {:.1} ms | {:.1} ms | **{:.2}×** | ≤ 1.5× |",
        local_cold.as_secs_f64() * 1e3,
        fresh.as_secs_f64() * 1e3,
        fresh.as_secs_f64() / local_cold.as_secs_f64()
    );
    println!(
        "| `find -ls` again, both warm | {:.1} ms | {:.1} ms | **{:.2}×** | ≤ 1.5× |",
        local_warm.as_secs_f64() * 1e3,
        again.as_secs_f64() * 1e3,
        again.as_secs_f64() / local_warm.as_secs_f64()
    );
}
