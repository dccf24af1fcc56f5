//! Time to the first container on a new node (issue 13): with the index
//! published in the registry, against indexing locally. Run (as root)
//! after `cargo bench --bench run -- torch` has built and pushed the torch
//! image: `cargo bench --bench published` (or `-- py`).
//!
//! Node A indexes and publishes (untimed). Then, in each round, a new node
//! with an empty store and cache, page cache dropped, runs the image's
//! command: once finding the published index, once with
//! `CLIP_PUBLISHED_INDEX=0` (it reads every layer to index).

#[path = "../tests/integration/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn clipctl(dir: &Path, published: bool, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_clipctl"))
        .args(args)
        .env("CLIP_BASE_DIR", dir.join("base"))
        .env("CLIP_CACHE_DIR", dir.join("cache"))
        .env("CLIP_RUN_DIR", dir.join("run"))
        .env("CLIP_PUBLISHED_INDEX", if published { "1" } else { "0" })
        .output()
        .unwrap();
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn stop(dir: &Path) {
    let _ = Command::new(env!("CARGO_BIN_EXE_clipctl"))
        .args(["daemon", "stop"])
        .env("CLIP_BASE_DIR", dir.join("base"))
        .env("CLIP_CACHE_DIR", dir.join("cache"))
        .env("CLIP_RUN_DIR", dir.join("run"))
        .output();
}

fn main() {
    let name = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "torch".into());
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = root.join(format!("clip-bench-{name}"));
    assert!(
        dir.join(".pushed").exists(),
        "run `cargo bench --bench run -- {name}` first: it builds and pushes the image"
    );
    let reg = harness::Registry::start(&dir.join("registry"));
    let image = format!("{}/bench/{name}:latest", reg.host());
    let cmd = match name.as_str() {
        "torch" => "import torch; print(torch.__version__)",
        _ => "import numpy, pandas, scipy.linalg; print(numpy.__version__, pandas.__version__)",
    };
    let work = tempfile::tempdir_in(&root).unwrap();
    let a = work.path().join("a");
    clipctl(&a, false, &["index", "--image", &image, "--push"]);
    stop(&a);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for published in [true, false] {
            let n = work.path().join(format!("n{round}-{published}"));
            let status = Command::new("bash")
                .arg("-c")
                .arg("sync; echo 3 > /proc/sys/vm/drop_caches")
                .status()
                .unwrap();
            assert!(status.success());
            let d = clipctl(
                &n,
                published,
                &["run", "--rm", "--runtime", "runc", &image, "python3", "-c", cmd],
            );
            stop(&n);
            let _ = std::fs::remove_dir_all(&n);
            if published {
                with.push(d)
            } else {
                without.push(d)
            }
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let (w, wo) = (median(with), median(without));
    println!("## `{name}`: first container on a new node (median of 3)");
    println!();
    println!("| path | seconds |");
    println!("|---|---:|");
    println!("| index published in the registry (one lookup, a GET per blob, then lazy reads) | {w:.2} |");
    println!("| indexed locally (every layer read) | {wo:.2} |");
    println!("| ratio | {:.3} |", w / wo);
}
