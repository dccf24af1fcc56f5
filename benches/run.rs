//! Container start benchmark (issue 4). Run: `cargo bench --bench run` (as root).
//!
//! Image: Debian minbase with python3, plus numpy, pandas and scipy from
//! PyPI wheels (tests/fixtures/build-python-image.sh), served by a local
//! registry. Command: `python3 -c 'import numpy, pandas, scipy.linalg'`.
//! In one run, interleaved, page cache dropped before each:
//! * clip cold: `clipctl run --rm` with the index present, the span cache
//!   empty and nothing mounted, until the container exits;
//! * full pull: `skopeo copy` to an OCI layout + `umoci unpack` + `runc run`,
//!   pull included;
//! * floor: `runc run` on the already unpacked rootfs.
//!
//! Also the bytes clip fetched ÷ the image's compressed bytes.

#[path = "../tests/integration/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clip_registry::{ImageRef, Platform, Registries, RegistryOptions};

const PY: &str = "import numpy, pandas, scipy.linalg; print(numpy.__version__, pandas.__version__)";

fn sh(cmd: &str) {
    let st = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{cmd}");
}

fn drop_caches() {
    sh("sync; echo 3 > /proc/sys/vm/drop_caches");
}

fn timed(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn clipctl(tmp: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clipctl"));
    c.env("CLIP_BASE_DIR", tmp.join("base"))
        .env("CLIP_CACHE_DIR", tmp.join("cache"))
        .env("CLIP_RUN_DIR", tmp.join("run"));
    c
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("clip-bench-py");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/build-python-image.sh");
    sh(&format!("bash {} {}", script.display(), root.display()));
    let layout = root.join("oci");
    let storage = root.join("registry");
    let _ = std::fs::remove_dir_all(&storage);
    let reg = harness::Registry::start(&storage);
    let image = format!("{}/bench/py:latest", reg.host());
    sh(&format!(
        "skopeo copy --quiet --preserve-digests --dest-tls-verify=false oci:{}:py docker://{image}",
        layout.display()
    ));
    let local = clip_registry::open(
        &ImageRef::parse(&format!("oci:{}:py", layout.display())).unwrap(),
        &Registries::new(RegistryOptions::default()).unwrap(),
        std::sync::Arc::new(clip_registry::auth::Anonymous),
    )
    .unwrap();
    let resolved = local.resolve(&Platform::default()).unwrap();
    let compressed: u64 = resolved.layers.iter().map(|l| l.size).sum();

    // Checkpoint spacing against the cold start: the issue 2 default is
    // chosen here. Each spacing gets its own base dir (and so its own index).
    let tmp = tempfile::tempdir().unwrap();
    let prep = |t: &Path, mib: Option<u64>| {
        let mut c = clipctl(t);
        if let Some(m) = mib {
            c.env("CLIP_CHECKPOINT_MIB", m.to_string());
        }
        let o = c.args(["mount", "--image", &image, "--cid", "prep"]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(clipctl(t).args(["umount", "--cid", "prep"]).status().unwrap().success());
    };
    // The index is present (built once, as a node would ahead of time).
    prep(tmp.path(), None);
    println!("## Cold `clipctl run` by checkpoint spacing (median of 3)");
    println!();
    println!("| spacing MiB | seconds | bytes fetched |");
    println!("|---:|---:|---:|");
    for mib in [1u64, 2, 4] {
        let t = tempfile::tempdir().unwrap();
        prep(t.path(), Some(mib));
        let mut times = Vec::new();
        let mut bytes = u64::MAX;
        for round in 0..3 {
            let _ = std::fs::remove_dir_all(t.path().join("cache"));
            drop_caches();
            std::thread::sleep(Duration::from_millis(300));
            let before = reg.bytes_served();
            times.push(timed(clipctl(t.path()).args([
                "run",
                "--rm",
                // The baselines below use runc: so does this.
                "--runtime",
                "runc",
                "--name",
                &format!("s{mib}-{round}"),
                &image,
                "python3",
                "-c",
                PY,
            ])));
            std::thread::sleep(Duration::from_millis(300));
            bytes = bytes.min(reg.bytes_served() - before);
        }
        println!("| {mib} | {:.2} | {bytes} |", median(times).as_secs_f64());
    }
    println!();

    let pull = tmp.path().join("pull");
    let (mut clip, mut full, mut floor, mut fetched) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        // clip, cold.
        let _ = std::fs::remove_dir_all(tmp.path().join("cache"));
        drop_caches();
        std::thread::sleep(Duration::from_millis(300));
        let before = reg.bytes_served();
        clip.push(timed(clipctl(tmp.path()).args([
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--name",
            &format!("b{round}"),
            &image,
            "python3",
            "-c",
            PY,
        ])));
        std::thread::sleep(Duration::from_millis(300));
        fetched.push(reg.bytes_served() - before);

        // Full pull, then run.
        let _ = std::fs::remove_dir_all(&pull);
        std::fs::create_dir_all(&pull).unwrap();
        drop_caches();
        let t = Instant::now();
        sh(&format!(
            "skopeo copy --quiet --src-tls-verify=false docker://{image} oci:{}/oci:py",
            pull.display()
        ));
        sh(&format!(
            "umoci unpack --image {p}/oci:py {p}/bundle",
            p = pull.display()
        ));
        let opts = clip_run::RunOptions {
            cmd: vec!["python3".into(), "-c".into(), PY.into()],
            ..Default::default()
        };
        let spec = clip_run::build_spec(&resolved.config, &pull.join("bundle/rootfs"), &opts).unwrap();
        clip_run::write_bundle(&pull.join("bundle"), &spec).unwrap();
        let id = format!("full{round}");
        timed(
            Command::new("runc")
                .arg("run")
                .arg("--bundle")
                .arg(pull.join("bundle"))
                .arg(&id),
        );
        full.push(t.elapsed());

        // Floor: runc on the unpacked rootfs.
        drop_caches();
        floor.push(timed(
            Command::new("runc")
                .arg("run")
                .arg("--bundle")
                .arg(pull.join("bundle"))
                .arg(format!("floor{round}")),
        ));
    }
    let (c, f, fl) = (median(clip), median(full), median(floor));
    let bytes = fetched.iter().copied().min().unwrap();
    println!(
        "# clip run benchmark: {} layers, {compressed} compressed bytes (median of 3, page cache dropped)",
        resolved.layers.len()
    );
    println!();
    println!("| path | seconds |");
    println!("|---|---:|");
    println!(
        "| clip cold (`clipctl run --rm`, index present, empty cache) | {:.2} |",
        c.as_secs_f64()
    );
    println!(
        "| full pull (`skopeo copy` + `umoci unpack` + `runc run`) | {:.2} |",
        f.as_secs_f64()
    );
    println!(
        "| floor (`runc run` on the unpacked rootfs) | {:.2} |",
        fl.as_secs_f64()
    );
    println!();
    println!("| ratio | value | goal |");
    println!("|---|---:|---|");
    println!(
        "| clip ÷ full pull | **{:.2}** | ≤ 0.25 |",
        c.as_secs_f64() / f.as_secs_f64()
    );
    println!(
        "| clip ÷ floor | **{:.2}** | ≤ 1.5 |",
        c.as_secs_f64() / fl.as_secs_f64()
    );
    println!(
        "| bytes fetched ÷ image bytes | **{:.3}** ({bytes} of {compressed}) | |",
        bytes as f64 / compressed as f64
    );
}
