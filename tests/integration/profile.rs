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

/// Waits until the mount's replay has run and its last fetches landed.
fn wait_for_replay(tmp: &std::path::Path, proxy: &FaultProxy) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(tmp, "clip_prefetch_queued") > 0.0 || metric(tmp, "clip_prefetches_total") < 1.0 {
        assert!(Instant::now() < deadline, "the replay did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
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
}

/// Where the profile next to the node's one index is.
fn profile_path(tmp: &std::path::Path) -> std::path::PathBuf {
    beside_the_index(tmp, "profile")
}

/// The profile recorded next to the node's one index.
fn recorded_profile(tmp: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(profile_path(tmp)).unwrap()).unwrap()
}

/// `sh -c CMD` over the unpacked debian image, with `/` as its root.
fn expected_of(cmd: &str) -> String {
    let u = unpacked("debian");
    let cmd = cmd.replace(" /", &format!(" {}/", u.display()));
    let out = std::process::Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_replay_inflates_units_only_as_far_as_the_recording_read_and_a_read_past_that_fetches_the_rest() {
    let reg = registry();
    let proxy = FaultProxy::start(reg.port);
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/debian:latest", proxy.host());
    // The first kilobyte of a 3 MB file: the kernel reads ahead a few
    // hundred kilobytes at most, well short of the 2 MiB unit.
    let head = "head -c 1000 /opt/clip/random.bin | md5sum";
    let whole = "cat /opt/clip/random.bin | md5sum";
    let (head_sum, whole_sum) = (expected_of(head), expected_of(whole));
    assert_eq!(ok(tmp.path(), &["record", &image, "sh", "-c", head]), head_sum);
    let p = recorded_profile(tmp.path());
    let (units, reach) = (p["units"].as_array().unwrap(), p["reach"].as_array().unwrap());
    assert_eq!(units.len(), reach.len(), "{p}");
    assert!(reach.iter().all(|r| r.as_u64().is_some_and(|r| r > 0)), "{p}");

    // A cold node but for the index and the profile.
    ok(tmp.path(), &["daemon", "stop"]);
    std::fs::remove_dir_all(tmp.path().join("cache")).unwrap();
    ok(tmp.path(), &["mount", "--image", &image, "--cid", "warmup"]);
    wait_for_replay(tmp.path(), &proxy);
    // Counted as each prefix is inflated, which may trail the requests.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(tmp.path(), "clip_prefix_saved_bytes_total") == 0.0 {
        assert!(Instant::now() < deadline, "the replay inflated its units whole");
        std::thread::sleep(Duration::from_millis(100));
    }
    let requests = proxy.log.lock().unwrap().len();

    // The recorded command reads within the prefixes: nothing fetched.
    assert_eq!(ok(tmp.path(), &["run", "--rm", &image, "sh", "-c", head]), head_sum);
    assert_eq!(
        proxy.log.lock().unwrap().len(),
        requests,
        "a read went past the prefixes"
    );
    assert_eq!(metric(tmp.path(), "clip_prefix_misses_total"), 0.0);
    // One that reads further gets the whole file's right bytes.
    assert_eq!(ok(tmp.path(), &["run", "--rm", &image, "sh", "-c", whole]), whole_sum);
    assert!(metric(tmp.path(), "clip_prefix_misses_total") >= 1.0);
    assert!(proxy.log.lock().unwrap().len() > requests);
    ok(tmp.path(), &["umount", "--cid", "warmup"]);
}

#[test]
fn a_recorded_profile_is_fetched_in_parallel_and_the_container_reads_the_cache() {
    let reg = registry();
    let proxy = FaultProxy::start(reg.port);
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/debian:latest", proxy.host());
    let cmd = "cat /usr/bin/bash /usr/lib/x86_64-linux-gnu/libc.so.6 /opt/clip/random.bin | md5sum";
    let expected = expected_of(cmd);

    // Record.
    let out = ok(tmp.path(), &["record", &image, "sh", "-c", cmd]);
    assert_eq!(out, expected);
    let p = recorded_profile(tmp.path());
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
    wait_for_replay(tmp.path(), &proxy);
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

/// The LOOKUPs clipd has answered so far (its counter of the op).
fn lookups(tmp: &std::path::Path) -> f64 {
    metric(tmp, "clip_fuse_ops_total{op=\"lookup\"}")
}

#[test]
fn a_fresh_mount_looks_up_the_profiles_names_before_its_container_does() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/debian:latest", reg.host());
    // 200 names that are not there (each a LOOKUP the kernel then caches
    // as absent), and files that are.
    let cmd = "for i in $(seq 1 200); do [ -e /usr/share/absent-$i ] && echo ?; done; \
               cat /etc/os-release /usr/bin/bash | md5sum";
    let expected = expected_of(cmd);
    assert_eq!(ok(tmp.path(), &["record", &image, "sh", "-c", cmd]), expected);
    let p = recorded_profile(tmp.path());
    let names: Vec<&str> = p["lookups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert!(
        names.contains(&"usr/share/absent-1") && names.contains(&"usr/share/absent-200"),
        "{p}"
    );
    assert!(
        names.contains(&"usr/bin/bash") && names.contains(&"etc/os-release"),
        "{p}"
    );

    // A fresh mount: its own lookups of the profile's names wait for the
    // first read (a container's exec: the runtime's setup needs none of
    // them), and then come first.
    ok(tmp.path(), &["daemon", "stop"]);
    let rootfs = ok(tmp.path(), &["mount", "--image", &image, "--cid", "warmup"]);
    let rootfs = std::path::Path::new(rootfs.trim());
    let unread = lookups(tmp.path());
    assert!(unread < 200.0, "the mount looked up {unread} names before a read");
    assert!(!crate::mount::daemon_log(tmp.path()).contains("looked up the profile's names"));
    assert!(!std::fs::read(rootfs.join("etc/os-release")).unwrap().is_empty());
    wait_for_log(
        tmp.path(),
        "looked up the profile's names",
        60,
        "the mount did not look up the profile's names",
    );
    let before = lookups(tmp.path());
    assert!(before >= 200.0, "the mount made {before} lookups");

    // The container finds every name in the kernel's cache: of its 200
    // probes and the rest, next to nothing reaches clipd.
    assert_eq!(ok(tmp.path(), &["run", "--rm", &image, "sh", "-c", cmd]), expected);
    let made = lookups(tmp.path()) - before;
    assert!(made < 20.0, "the container made {made} lookups of its own");
    ok(tmp.path(), &["umount", "--cid", "warmup"]);

    // A mount that ends unread makes none, and its lookups do not wait
    // out the first read's 60 s holding the image.
    ok(tmp.path(), &["mount", "--image", &image, "--cid", "unread"]);
    ok(tmp.path(), &["umount", "--cid", "unread"]);
    wait_for_log(
        tmp.path(),
        "the mount ended unread: no lookups",
        30,
        "the unread mount's lookups still wait",
    );
}

/// Waits up to `secs` for the node's clipd to log `line`; fails with
/// `otherwise`.
fn wait_for_log(tmp: &std::path::Path, line: &str, secs: u64, otherwise: &str) {
    wait_for_logs(tmp, line, 1, secs, otherwise)
}

/// [`wait_for_log`], until the log (kept across restarts) has `line`
/// `count` times.
fn wait_for_logs(tmp: &std::path::Path, line: &str, count: usize, secs: u64, otherwise: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while crate::mount::daemon_log(tmp).matches(line).count() < count {
        assert!(Instant::now() < deadline, "{otherwise}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_fresh_mount_pushes_the_profiles_reads_into_the_page_cache_and_shrugs_off_bogus_ones() {
    let reg = registry();
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/debian:latest", reg.host());
    let cmd = "cat /usr/bin/bash /usr/lib/x86_64-linux-gnu/libc.so.6 /opt/clip/random.bin | md5sum";
    let expected = expected_of(cmd);
    assert_eq!(ok(tmp.path(), &["record", &image, "sh", "-c", cmd]), expected);
    let mut p = recorded_profile(tmp.path());
    let recorded: u64 = p["reads"]
        .as_array()
        .expect("the profile keeps its reads")
        .iter()
        .map(|r| r[2].as_u64().unwrap())
        .sum();
    let files = [
        "usr/bin/bash",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "opt/clip/random.bin",
    ];
    let sizes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(unpacked("debian").join(f)).unwrap().len())
        .sum();
    assert!(recorded >= sizes, "the reads cover {recorded} bytes, the files {sizes}");

    // A cold node but for the index and the profile. The mount pushes
    // once its first read (a container's exec) has come and the lookups
    // are made.
    let push_and_run = |tmp: &std::path::Path, nth: usize| {
        ok(tmp, &["daemon", "stop"]);
        std::fs::remove_dir_all(tmp.join("cache")).unwrap();
        let rootfs = ok(tmp, &["mount", "--image", &image, "--cid", "warmup"]);
        assert!(
            !std::fs::read(std::path::Path::new(rootfs.trim()).join("etc/os-release"))
                .unwrap()
                .is_empty()
        );
        wait_for_logs(
            tmp,
            "pushed the profile's reads into the page cache",
            nth,
            60,
            "the mount did not push the profile's reads",
        );
        let pushed = metric(tmp, "clip_page_cache_pushed_bytes_total");
        let before = metric(tmp, "clip_fuse_bytes_total{op=\"read\"}");
        // The container's bytes are right, and nearly all of them come
        // from the page cache: the pushed pieces, not FUSE reads.
        assert_eq!(ok(tmp, &["run", "--rm", &image, "sh", "-c", cmd]), expected);
        let read = metric(tmp, "clip_fuse_bytes_total{op=\"read\"}") - before;
        ok(tmp, &["umount", "--cid", "warmup"]);
        (pushed, read)
    };
    let (pushed, read) = push_and_run(tmp.path(), 1);
    assert!(pushed >= sizes as f64, "pushed {pushed} bytes of the files' {sizes}");
    assert!(
        read < sizes as f64 / 10.0,
        "the container still read {read} bytes through FUSE"
    );

    // Reads that name no layer, bytes past a layer's end, or overflow,
    // among the good ones: skipped, and the container's bytes stay right.
    let reads = p["reads"].as_array_mut().unwrap();
    for bogus in [
        serde_json::json!([99, 0, 4096]),
        serde_json::json!([0, u64::MAX - 10, u64::MAX]),
        serde_json::json!([0, 1u64 << 50, 1 << 20]),
    ] {
        reads.insert(0, bogus);
    }
    std::fs::write(profile_path(tmp.path()), serde_json::to_vec(&p).unwrap()).unwrap();
    let (pushed, read) = push_and_run(tmp.path(), 2);
    assert!(pushed >= sizes as f64, "pushed {pushed} bytes of the files' {sizes}");
    assert!(
        read < sizes as f64 / 10.0,
        "the container still read {read} bytes through FUSE"
    );
}

#[test]
fn without_a_profile_a_fresh_mount_fetches_the_guessed_start_and_the_container_reads_the_cache() {
    let reg = registry();
    let proxy = FaultProxy::start(reg.port);
    let tmp = tempfile::tempdir().unwrap();
    let _daemon = DaemonGuard::new(tmp.path());
    let image = format!("{}/clip/debian:latest", proxy.host());
    // Indexed, never run: no profile, only what indexing learnt.
    ok(tmp.path(), &["index", "--image", &image]);
    let index = beside_the_index(tmp.path(), "clip");
    assert!(std::fs::metadata(index.with_extension("hints")).unwrap().len() > 0);
    assert!(!index.with_extension("profile").exists());
    ok(tmp.path(), &["daemon", "stop"]);
    proxy.log.lock().unwrap().clear();
    proxy.always(Some(Fault::Stall(Duration::from_millis(150))));

    // The image's Cmd is /bin/bash: the mount fetches bash, the loader,
    // and the libraries bash needs, side by side, before anyone reads.
    ok(tmp.path(), &["mount", "--image", &image, "--cid", "warmup"]);
    // The walk queues each read as it finds it, and logs when it is done:
    // only then can an empty queue mean the replay is over.
    wait_for_log(
        tmp.path(),
        "no profile: replaying a guessed start",
        60,
        "the mount did not guess its start",
    );
    wait_for_replay(tmp.path(), &proxy);
    let replay = proxy.log.lock().unwrap().clone();
    assert!(
        concurrency(&replay) >= 2,
        "the guessed spans were fetched one at a time: {replay:?}"
    );

    // bash's start then reads nothing the guess did not fetch.
    proxy.always(None);
    let out = ok(tmp.path(), &["run", "--rm", &image, "/bin/bash", "-c", "echo guessed"]);
    assert_eq!(out, "guessed\n");
    let after = proxy.log.lock().unwrap().len();
    assert_eq!(
        after,
        replay.len(),
        "bash's start went to the registry ({} reads past a guessed prefix): {:?}",
        metric(tmp.path(), "clip_prefix_misses_total"),
        &proxy.log.lock().unwrap()[replay.len()..]
    );
    ok(tmp.path(), &["umount", "--cid", "warmup"]);
}

/// The file with extension `ext` next to the node's one index.
fn beside_the_index(tmp: &std::path::Path, ext: &str) -> std::path::PathBuf {
    std::fs::read_dir(tmp.join("base/index"))
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == ext))
        .unwrap_or_else(|| panic!("no .{ext} next to the index"))
        .path()
}
