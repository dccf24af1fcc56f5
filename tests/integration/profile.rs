//! Record and replay (issue 12): `clipctl record` writes an image's
//! prefetch profile; a fresh mount of the image fetches the profile's
//! spans in parallel before the container asks, and the container's reads
//! then hit the cache.

use std::time::{Duration, Instant};

use crate::harness::{clipctl, registry, unpacked, DaemonGuard};
use crate::mount::env;
use crate::proxy::{Fault, FaultProxy};

fn node(tmp: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut c = clipctl();
    c.args(args);
    env(&mut c, tmp);
    c.output().unwrap()
}

fn ok(tmp: &std::path::Path, args: &[&str]) -> String {
    let o = node(tmp, args);
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// The largest number of blob requests in flight at once.
fn concurrency(log: &crate::proxy::RequestLog) -> usize {
    let mut events: Vec<(Instant, i32)> = Vec::new();
    for (.., came, done) in log {
        events.push((*came, 1));
        events.push((*done, -1));
    }
    events.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        max = max.max(now);
    }
    max as usize
}

fn metric(tmp: &std::path::Path, name: &str) -> f64 {
    ok(tmp, &["metrics"])
        .lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_recorded_profile_is_fetched_in_parallel_and_the_container_reads_the_cache() {
    let reg = registry();
    let proxy = FaultProxy::start(reg.port);
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/debian:latest", proxy.host());
    let cmd = "cat /usr/bin/bash /usr/lib/x86_64-linux-gnu/libc.so.6 /opt/clip/random.bin | md5sum";
    let expected = {
        let u = unpacked("debian");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cat {0}/usr/bin/bash {0}/usr/lib/x86_64-linux-gnu/libc.so.6 {0}/opt/clip/random.bin | md5sum",
                u.display()
            ))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };

    // Record.
    let out = ok(tmp.path(), &["record", &image, "sh", "-c", cmd]);
    assert_eq!(out, expected);
    let profile = std::fs::read_dir(tmp.path().join("base/index"))
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "profile"))
        .expect("a profile next to the index")
        .path();
    let p: serde_json::Value = serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap();
    let units = p["units"].as_array().unwrap().len();
    assert!(units >= 3, "{p}");

    // A cold node but for the index and the profile: no spans cached.
    ok(tmp.path(), &["daemon", "stop"]);
    std::fs::remove_dir_all(tmp.path().join("cache")).unwrap();
    proxy.log.lock().unwrap().clear();
    // Every blob request takes a while: replay requests overlap for sure.
    proxy.always(Some(Fault::Stall(Duration::from_millis(150))));

    // Mount (for a container): the replay starts and the mount is ready
    // at once.
    ok(tmp.path(), &["mount", "--image", &image, "--cid", "warmup"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(tmp.path(), "clip_prefetch_queued") > 0.0 || metric(tmp.path(), "clip_prefetches_total") < 1.0 {
        assert!(Instant::now() < deadline, "the replay did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the last fetches land.
    let settle = Instant::now() + Duration::from_secs(30);
    let mut last = usize::MAX;
    loop {
        let n = proxy.log.lock().unwrap().len();
        if n == last || Instant::now() > settle {
            break;
        }
        last = n;
        std::thread::sleep(Duration::from_millis(500));
    }
    let replay = proxy.log.lock().unwrap().clone();
    assert!(!replay.is_empty());
    assert!(
        concurrency(&replay) >= 2,
        "the profile's spans were fetched one at a time: {replay:?}"
    );

    // The container: right bytes, and nothing more from the registry.
    proxy.always(None);
    let out = ok(tmp.path(), &["run", "--rm", &image, "sh", "-c", cmd]);
    assert_eq!(out, expected);
    let after = proxy.log.lock().unwrap().len();
    assert_eq!(after, replay.len(), "the container's reads went to the registry");
    ok(tmp.path(), &["umount", "--cid", "warmup"]);
    assert!(crate::mount::daemon_log(tmp.path()).contains("replaying the prefetch profile"));
}
