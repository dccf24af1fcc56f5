//! The node service's memory (issue 11). Run: `cargo bench --bench daemon`
//! (as root).
//!
//! 50 images that share the test suite's `debian-base` layer, each with a
//! small layer of its own, read from an OCI layout. In one run:
//! * one clipd mounts 1, then 10, then 50 of them (a few files read from
//!   each); its resident memory (supervisor + worker, VmRSS) after each;
//! * the per-mount processes it replaces: one clipd per mount (each its
//!   own index copy, layer store, registry clients, caches), summed.
//!
//! Prints the RSS, the per-mount marginal cost, and the ratio.

#[path = "../tests/integration/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

const IMAGES: usize = 50;

fn sh(cmd: &str) {
    let st = Command::new("bash").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

fn clipctl(node: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(env!("CARGO_BIN_EXE_clipctl"))
        .args(args)
        .env("CLIP_RUN_DIR", node.join("run"))
        .env("CLIP_BASE_DIR", node.join("base"))
        .env("CLIP_CACHE_DIR", node.join("cache"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Resident kilobytes of a process.
fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resident kilobytes of a node's clipd (supervisor + worker).
fn node_rss_kb(node: &Path) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&clipctl(node, &["daemon", "status", "--json"])).unwrap();
    rss_kb(v["supervisor_pid"].as_i64().unwrap() as i32) + rss_kb(v["worker_pid"].as_i64().unwrap() as i32)
}

/// Mounts image `i` on `node` and reads a few of its files.
fn mount_and_read(node: &Path, layout: &Path, i: usize) {
    let dir = node.join(format!("mnt{i}"));
    let image = format!("oci:{}:b{i}", layout.display());
    clipctl(node, &["mount", "--image", &image, dir.to_str().unwrap()]);
    for f in ["usr/bin/bash", "usr/lib/x86_64-linux-gnu/libc.so.6", "etc/os-release"] {
        let _ = std::fs::read(dir.join(f));
    }
    assert_eq!(
        std::fs::read_to_string(dir.join(format!("bench-{i}"))).unwrap(),
        format!("{i}\n")
    );
}

fn main() {
    let fixtures = harness::layout();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("clip-bench-daemon");
    let layout = root.join("oci");
    if !root.join(".done").exists() {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        sh(&format!("cp -a {} {}", fixtures.display(), layout.display()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oci_layout.py");
        for i in 0..IMAGES {
            let w = root.join(format!("l{i}"));
            std::fs::create_dir_all(&w).unwrap();
            std::fs::write(w.join(format!("bench-{i}")), format!("{i}\n")).unwrap();
            sh(&format!(
                "cd {w} && umoci tag --image {lay}:debian-base b{i} && tar --owner=0 --group=0 -cf l.tar bench-{i} && \
                 gzip -n -c l.tar > l.tar.gz && python3 {script} add-layer {lay} b{i} l.tar.gz \
                 application/vnd.oci.image.layer.v1.tar+gzip l.tar",
                w = w.display(),
                lay = layout.display(),
                script = script.display()
            ));
        }
        std::fs::write(root.join(".done"), "").unwrap();
    }
    let nodes = tempfile::tempdir_in(&root).unwrap();

    // One clipd for all.
    let shared = nodes.path().join("shared");
    let mut daemon = Vec::new();
    let mut mounted = 0;
    for n in [1, 10, IMAGES] {
        while mounted < n {
            mount_and_read(&shared, &layout, mounted);
            mounted += 1;
        }
        daemon.push((n, node_rss_kb(&shared)));
    }
    clipctl(&shared, &["daemon", "stop"]);

    // One clipd per mount: what per-mount servers cost.
    let mut separate = Vec::new();
    let mut total = 0;
    for i in 0..IMAGES {
        let node = nodes.path().join(format!("alone{i}"));
        mount_and_read(&node, &layout, i);
        total += node_rss_kb(&node);
        if [1, 10, IMAGES].contains(&(i + 1)) {
            separate.push((i + 1, total));
        }
    }
    for i in 0..IMAGES {
        clipctl(&nodes.path().join(format!("alone{i}")), &["daemon", "stop"]);
    }

    println!("## Resident memory: one clipd vs one process per mount");
    println!();
    println!("| mounted images | one clipd MiB | per-mount processes MiB | ratio |");
    println!("|---:|---:|---:|---:|");
    for ((n, d), (_, s)) in daemon.iter().zip(&separate) {
        println!(
            "| {n} | {:.1} | {:.1} | {:.3} |",
            *d as f64 / 1024.0,
            *s as f64 / 1024.0,
            *d as f64 / *s as f64
        );
    }
    let per_mount = (daemon[2].1 - daemon[0].1) as f64 / (IMAGES - 1) as f64 / 1024.0;
    let alone = separate[0].1 as f64 / 1024.0;
    println!();
    println!(
        "Per mount: one clipd grows {per_mount:.2} MiB a mount; a process per mount costs {alone:.1} MiB a mount."
    );
}
