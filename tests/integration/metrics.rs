//! `clipctl metrics` and logs (issue 6): a real mount read through a real
//! registry, scraped over HTTP by curl and parsed by an OpenMetrics parser.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};

use crate::harness::{free_port, registry};
use crate::mount::{env, Mounted};

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

fn scrape(port: u16) -> Option<(String, String)> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-f", "--max-time", "10", "-D", "-"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.to_string(), body.to_string()))
}

/// Numeric samples of a family: label set -> value (histograms: count).
fn samples(e: &Exposition, name: &str) -> Vec<(HashMap<String, String>, f64)> {
    let Some(f) = e.families.get(name) else {
        return Vec::new();
    };
    f.iter_samples()
        .map(|s| {
            let labels: HashMap<String, String> = s
                .get_labelset()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let v = match &s.value {
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                OpenMetricsValue::Gauge(g) => g.as_f64(),
                OpenMetricsValue::Histogram(h) => h.count.map_or(0.0, |c| c as f64),
                other => panic!("{name}: unexpected {other:?}"),
            };
            (labels, v)
        })
        .collect()
}

fn total(e: &Exposition, name: &str, label: Option<(&str, &str)>) -> f64 {
    samples(e, name)
        .into_iter()
        .filter(|(l, _)| label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v)))
        .map(|(_, v)| v)
        .sum()
}

/// Reads every regular file under `dir`; returns the bytes of distinct
/// inodes read (a hardlink's second name is served from the page cache).
fn read_all(dir: &Path, seen: &mut std::collections::HashSet<u64>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_file() {
            let len = std::fs::read(e.path()).unwrap().len() as u64;
            if seen.insert(e.metadata().unwrap().ino()) {
                n += len;
            }
        } else if t.is_dir() {
            n += read_all(&e.path(), seen);
        }
    }
    n
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn scraped_range_get_bytes_equal_what_the_registry_served() {
    let reg = registry();
    let m = Mounted::new(&format!("{}/clip/debian:latest", reg.host()));
    let port = free_port();
    // No --address: loopback only.
    let mut c = m.cmd(&["metrics", "--serve", "--port"]);
    c.arg(port.to_string());
    let _server = Server(c.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    let (head, text) = loop {
        if let Some(r) = scrape(port) {
            break r;
        }
        assert!(Instant::now() < deadline, "metrics server did not answer");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    // Before reading: the index build's range GET of the image config.
    let e = openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap_or_else(|err| panic!("{err:?}\n{text}"));
    let base = total(&e, "clip_range_get_bytes", None);
    let base_requests = total(&e, "clip_range_get_requests", None);
    let before = reg.blob_bytes_served();
    let read = read_all(&m.dir.join("usr/bin"), &mut Default::default());
    assert!(read > 1 << 20, "read {read} bytes");
    let mut text = scrape(port).unwrap().1;

    // Read-ahead may still be fetching: wait until the counters settle.
    let deadline = Instant::now() + Duration::from_secs(20);
    let listening = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    assert!(
        listening
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(local.as_str())),
        "not on 127.0.0.1:{port}"
    );
    assert!(
        !listening.contains(&format!("00000000:{port:04X} 00000000:0000 0A")),
        "listening on every address"
    );
    let (e, served) = loop {
        let e =
            openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap_or_else(|err| panic!("{err:?}\n{text}"));
        let served = reg.blob_bytes_served() - before;
        if total(&e, "clip_range_get_bytes", None) - base == served as f64 || Instant::now() > deadline {
            break (e, served);
        }
        std::thread::sleep(Duration::from_millis(200));
        text = scrape(port).unwrap().1;
    };
    assert!(served > 0);
    assert_eq!(total(&e, "clip_range_get_bytes", None) - base, served as f64, "{text}");
    assert_eq!(
        total(&e, "clip_range_get_bytes", Some(("status", "206"))),
        served as f64 + base
    );
    // One request per histogram observation; layers are labelled by a short
    // digest, and the latency histogram has no per-layer series by default.
    let requests = total(&e, "clip_range_get_requests", None);
    assert!(requests > 0.0);
    assert_eq!(total(&e, "clip_range_get_seconds", None), requests);
    let mut kinds = std::collections::BTreeSet::new();
    for (labels, _) in samples(&e, "clip_range_get_requests") {
        kinds.insert(labels["kind"].clone());
        match labels["kind"].as_str() {
            "layer" => assert!(
                labels["layer"].starts_with("sha256:") && labels["layer"].len() == 19,
                "{labels:?}"
            ),
            _ => assert_eq!(labels["layer"], "", "not a layer: {labels:?}"),
        }
    }
    // The image config was fetched too (indexing), and not as a layer.
    assert!(kinds.contains("layer") && kinds.contains("config"), "{kinds:?}");
    for (labels, _) in samples(&e, "clip_range_get_seconds") {
        assert!(!labels.contains_key("layer"), "{labels:?}");
    }
    // Every fetched span was inflated, served bytes came through FUSE reads.
    // A coalesced request carries several units.
    assert!(total(&e, "clip_cache_misses", None) >= requests - base_requests);
    assert!(total(&e, "clip_inflate_bytes", None) >= read as f64);
    assert!(total(&e, "clip_inflate_cpu_seconds", None) > 0.0);
    // The cold reads waited for fetches: at most two per read (a read may
    // cross the end of a unit).
    let waits = total(&e, "clip_demand_waits", None);
    assert!(
        waits >= 1.0 && waits <= 2.0 * total(&e, "clip_fuse_ops", Some(("op", "read"))),
        "{text}"
    );
    assert!(total(&e, "clip_demand_wait_seconds", None) > 0.0);
    assert!(total(&e, "clip_fuse_bytes", Some(("op", "read"))) >= read as f64);
    assert!(total(&e, "clip_fuse_ops", Some(("op", "lookup"))) > 0.0);
    assert_eq!(
        total(&e, "clip_fuse_op_seconds", Some(("op", "read"))),
        total(&e, "clip_fuse_ops", Some(("op", "read")))
    );
    assert_eq!(total(&e, "clip_verify_failures", None), 0.0);
    // Span cache writes wait for a quiet store (2 s without fetches, and
    // no container in its first 10 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let e = loop {
        let text = scrape(port).unwrap().1;
        let e =
            openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap_or_else(|err| panic!("{err:?}\n{text}"));
        if total(&e, "clip_cache_written_bytes", None) > 0.0 || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(total(&e, "clip_cache_written_bytes", None) > 0.0);
    assert!(total(&e, "clip_cache_size_bytes", None) > 0.0);
    assert_eq!(total(&e, "clip_mounts", None), 1.0);
    // The index build, by another process that has exited.
    assert_eq!(total(&e, "clip_index_builds", Some(("result", "ok"))), 1.0);
    assert_eq!(total(&e, "clip_index_build_seconds", None), 1.0);
    assert!(total(&e, "clip_index_build_bytes", Some(("kind", "compressed"))) > 0.0);

    // JSON for scripts: the same numbers.
    let out = m.cmd(&["metrics", "--format", "json"]).output().unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes: f64 = json["clip_range_get_bytes"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["value"].as_f64().unwrap())
        .sum();
    assert_eq!(bytes, served as f64 + base);
    assert_eq!(json["clip_range_get_bytes"]["type"], "counter");

    // The server logs its mount, once, at the default level.
    let log = m.log();
    assert_eq!(log.matches(" mounted ").count(), 1, "{log}");
    assert!(!log.contains('\x1b'), "no colour codes in log files");

    // Unmounted, the counts stay (the server left them in the totals).
    m.umount();
    let (_, text) = scrape(port).unwrap();
    let e = openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap();
    assert_eq!(total(&e, "clip_mounts", None), 0.0);
    assert_eq!(total(&e, "clip_range_get_bytes", None), served as f64 + base);
    assert_eq!(total(&e, "clip_range_get_requests", None), requests);
}

#[test]
fn first_exec_latency_is_recorded_per_runtime() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = crate::harness::DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/busybox:latest", reg.host());
    let started = Instant::now();
    let mut c = crate::harness::clipctl();
    c.args(["run", "--rm", &image, "true"]);
    env(&mut c, tmp.path());
    let out = c.output().unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut c = crate::harness::clipctl();
    c.args(["metrics"]);
    env(&mut c, tmp.path());
    let out = c.output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let e = openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap();
    assert_eq!(
        total(&e, "clip_first_exec_seconds", Some(("runtime", "clip-runtime"))),
        1.0,
        "{text}"
    );
    let f = &e.families["clip_first_exec_seconds"];
    let s = f.iter_samples().next().unwrap();
    let OpenMetricsValue::Histogram(h) = &s.value else {
        panic!()
    };
    // Between zero and the whole `clipctl run`, index build included.
    let sum = h.sum.as_ref().unwrap().as_f64();
    assert!(sum > 0.0 && sum < wall, "first exec {sum} s of a {wall} s run");
    assert_eq!(total(&e, "clip_index_builds", Some(("result", "ok"))), 1.0);
}
