//! CRI pull + start to process exit (issue 14), as the kubelet drives it:
//! clip as containerd's snapshotter against containerd's own overlayfs
//! snapshotter, in one run. Run (as root) after `cargo bench --bench run
//! -- py` has built the image: `cargo bench --bench cri`.
//!
//! Each round, for each path: a new containerd (and clipd) with empty
//! state, the sandbox image pulled (untimed), page cache dropped; then,
//! timed: PullImage, RunPodSandbox, CreateContainer, StartContainer, until
//! the process has exited. clip's index is published in the registry
//! beforehand (once, untimed), as CI would after the push.

#[path = "../tests/integration/containerd.rs"]
#[allow(dead_code)]
mod containerd;
#[path = "../tests/integration/harness.rs"]
#[allow(dead_code)]
mod harness;
/// What containerd.rs takes from the mount tests.
mod mount {
    pub fn env(cmd: &mut std::process::Command, tmp: &std::path::Path) {
        cmd.env("CLIP_BASE_DIR", tmp.join("base"))
            .env("CLIP_CACHE_DIR", tmp.join("cache"))
            .env("CLIP_RUN_DIR", tmp.join("run"));
    }
}

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use containerd::{Cri, Node};

fn sh(cmd: &str) {
    assert!(
        Command::new("bash").arg("-c").arg(cmd).status().unwrap().success(),
        "{cmd}"
    );
}

fn main() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let layout = root.join("clip-bench-py/oci");
    assert!(
        layout.exists(),
        "run `cargo bench --bench run -- py` first: it builds the image"
    );
    let tmp = tempfile::tempdir_in(&root).unwrap();
    let reg = containerd::registry_with_images(tmp.path());
    sh(&format!(
        "skopeo copy --quiet --preserve-digests --dest-tls-verify=false oci:{}:py docker://{}/bench/py:latest",
        layout.display(),
        reg.host()
    ));
    let image = format!("{}/bench/py:latest", reg.host());
    let ci = tmp.path().join("ci");
    let mut push = harness::clipctl();
    push.args(["index", "--push", "--image", &image]);
    mount::env(&mut push, &ci);
    assert!(push.status().unwrap().success());
    let _ = {
        let mut c = harness::clipctl();
        c.args(["daemon", "stop"]);
        mount::env(&mut c, &ci);
        c.output()
    };
    let cmd = [
        "python3",
        "-c",
        "import numpy, pandas, scipy.linalg; print(numpy.__version__, pandas.__version__)",
    ];
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..3 {
        for (i, clip) in [false, true].into_iter().enumerate() {
            let node = Node::start_with(&[&reg.host()], clip);
            let mut c = Cri::connect(node.path("containerd.sock"));
            c.pull(&format!("{}/clip/pause:latest", reg.host()));
            let logs = node.path("pods");
            std::fs::create_dir_all(&logs).unwrap();
            let config = Cri::sandbox_config(&format!("b{round}{i}"), &logs);
            sh("sync; echo 3 > /proc/sys/vm/drop_caches");
            std::thread::sleep(Duration::from_millis(200));
            let t = Instant::now();
            c.pull(&image);
            let pod = c.sandbox(&config);
            let id = c.run_to_exit(&pod, &config, "py", &image, &cmd);
            times[i].push(t.elapsed());
            let out = containerd::cri_log(&logs.join("py.log"));
            assert!(out.contains('.'), "no versions printed: {out:?}");
            c.remove_container(&id);
            c.remove_sandbox(&pod);
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let [overlay, clip] = times.map(median);
    println!("## CRI pull + start to exit: `bench/py` (0.18 GB), `import numpy, pandas, scipy.linalg` (median of 3)");
    println!();
    println!("| snapshotter | seconds |");
    println!("|---|---:|");
    println!("| containerd's overlayfs (download and unpack every layer) | {overlay:.2} |");
    println!("| clip (index published, layers served lazily) | {clip:.2} |");
    println!("| ratio clip ÷ overlayfs | {:.2} |", clip / overlay);
}
