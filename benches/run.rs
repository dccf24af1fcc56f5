//! Container start benchmark (issues 4 and 12). Run (as root):
//! `cargo bench --bench run` for both images, or `-- py` / `-- torch`.
//!
//! Images, built in this benchmark's setup (not in CI), served by a local
//! registry, run with runc on every path:
//! * `py`: Debian minbase with python3, numpy, pandas and scipy
//!   (tests/fixtures/build-python-image.sh);
//!   `python3 -c 'import numpy, pandas, scipy.linalg'`.
//! * `torch`: the same base with torch 2.3.1 and its CUDA wheels, about
//!   3.4 GB compressed (tests/fixtures/build-torch-image.sh);
//!   `python3 -c 'import torch'`.
//!
//! Paths, interleaved in each round, the page cache dropped before every
//! cold one:
//! * floor: a fresh container over the pristine unpacked image, as
//!   containerd makes one: kernel overlayfs with a new, empty upper over a
//!   rootfs no container has written, then `runc run`;
//! * warm floor: the same with the image's files in the page cache;
//! * clip cold without a profile: index present, span cache empty;
//! * clip cold with a profile (recorded once with `clipctl record`);
//! * clip warm: spans cached on disk, a new container;
//! * clip cached: spans on disk, but a fresh mount (clipd restarted) and
//!   the page cache dropped: the read path alone, no network;
//! * nydus (zran mode, FUSE, nydusd 2.2): bootstraps built with
//!   `nydus-image create -t targz-ref` per layer and merged, pushed to the
//!   same registry; each cold round starts nydusd with an empty blob
//!   cache on a local bootstrap (as nydus-snapshotter does after a pull),
//!   then the same overlay and `runc run` as the floor. Skipped, with a
//!   note, when `/opt/nydus/bin` (or `$NYDUS_BIN`) has no nydus-image:
//!   `apt-get install cmake` (its zlib build needs it), then
//!   `cargo install nydus-rs --version 2.2.0 --locked --root /opt/nydus`.
//!
//! Printed: seconds (median), cold ÷ floor and warm ÷ warm floor, and the
//! bytes fetched ÷ the bytes of the files the process read (the files it
//! opened, found with strace on one untimed floor run). Also fixed costs:
//! `clipctl run IMAGE true` (cached) against a bare `runc run` of `true`.

#[path = "../tests/integration/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    std::thread::sleep(Duration::from_millis(200));
}

/// Before a timed run: the last container's writes flushed, so that their
/// writeback does not land in this run.
fn settle() {
    sh("sync");
    std::thread::sleep(Duration::from_millis(100));
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

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

struct Image {
    name: &'static str,
    script: &'static str,
    tag: &'static str,
    cmd: Vec<String>,
    rounds: usize,
}

/// A clip node: its own clipd, index store and span cache.
struct Node {
    dir: PathBuf,
    /// Whether a start without a profile fetches its guessed reads.
    guess: bool,
}

impl Node {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_clipctl"));
        c.args(args)
            .env("CLIP_BASE_DIR", self.dir.join("base"))
            .env("CLIP_CACHE_DIR", self.dir.join("cache"))
            .env("CLIP_RUN_DIR", self.dir.join("run"))
            // Profiles only from `clipctl record`: every cold round sees
            // the same profile (or none).
            .env("CLIP_RECORD_SECS", "0")
            // Every node indexes for itself (benches/published.rs measures
            // published indexes).
            .env("CLIP_PUBLISHED_INDEX", "0")
            .env("CLIP_TAG_TTL", "3600")
            .env("CLIP_GUESS", self.guess.to_string());
        c
    }

    fn ok(&self, args: &[&str]) {
        timed(&mut self.cmd(args));
    }

    /// Cold: no daemon memory, no span cache; clipd started (untimed).
    fn cold(&self) {
        let _ = self.cmd(&["daemon", "stop"]).output();
        let _ = std::fs::remove_dir_all(self.dir.join("cache"));
        drop_caches();
        self.ok(&["ps"]);
    }

    fn run(&self, image: &str, cmd: &[String], id: &str) -> Duration {
        let mut args = vec!["run", "--rm", "--runtime", "runc", "--name", id, image];
        args.extend(cmd.iter().map(String::as_str));
        timed(&mut self.cmd(&args))
    }
}

/// A container's directories under `work/id`, its bundle written for
/// `cmd` over `config`; `mount` puts a fresh overlay over `rootfs` at its
/// root, `remove` takes it all away.
struct Fresh {
    dir: PathBuf,
    upper: PathBuf,
    wdir: PathBuf,
    merged: PathBuf,
    bundle: PathBuf,
}

impl Fresh {
    fn new(work: &Path, id: &str, config: &[u8], cmd: &[String], hostname: Option<&str>) -> Self {
        let dir = work.join(id);
        let f = Fresh {
            upper: dir.join("upper"),
            wdir: dir.join("work"),
            merged: dir.join("merged"),
            bundle: dir.join("bundle"),
            dir,
        };
        for d in [&f.upper, &f.wdir, &f.merged, &f.bundle] {
            std::fs::create_dir_all(d).unwrap();
        }
        let opts = clip_run::RunOptions {
            cmd: cmd.to_vec(),
            hostname: hostname.map(String::from),
            ..Default::default()
        };
        let spec = clip_run::build_spec(config, &f.merged, &opts).unwrap();
        clip_run::write_bundle(&f.bundle, &spec).unwrap();
        f
    }

    fn mount(&self, rootfs: &Path) {
        sh(&format!(
            "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={},index=off,metacopy=off {}",
            rootfs.display(),
            self.upper.display(),
            self.wdir.display(),
            self.merged.display()
        ));
    }

    fn remove(self) {
        sh(&format!("umount {}", self.merged.display()));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh container over `rootfs`: a new upper on kernel overlayfs, runc,
/// then everything removed. Timed from the overlay mount.
fn floor_run(work: &Path, rootfs: &Path, config: &[u8], cmd: &[String], id: &str) -> Duration {
    let f = Fresh::new(work, id, config, cmd, Some(id));
    let t = Instant::now();
    f.mount(rootfs);
    timed(Command::new("runc").arg("run").arg("--bundle").arg(&f.bundle).arg(id));
    let total = t.elapsed();
    f.remove();
    total
}

/// Bytes of the regular files the command opens, from one untimed floor
/// run under strace. runc is traced from the host; only the opens of the
/// container's process (from its exec on) and of what it forks count.
fn bytes_of_files_read(work: &Path, rootfs: &Path, config: &[u8], cmd: &[String]) -> (u64, usize) {
    let f = Fresh::new(work, "trace", config, cmd, None);
    f.mount(rootfs);
    let log = work.join("strace.log");
    let ok = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=open,openat,execve,clone,clone3,fork,vfork",
            "-o",
        ])
        .arg(&log)
        .args(["runc", "run", "--bundle"])
        .arg(&f.bundle)
        .arg("strace")
        .stdout(Stdio::null())
        .status();
    f.remove();
    assert!(ok.is_ok_and(|s| s.success()), "the traced run failed");
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let exe = format!("execve(\"{}", cmd[0]);
    let mut pids = std::collections::HashSet::new();
    let mut files = BTreeSet::new();
    // A call another thread interrupted is split in two lines: `call(args
    // <unfinished ...>`, later `<... call resumed>) = ret`. Joined first.
    let mut unfinished = std::collections::HashMap::new();
    for line in text.lines() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        if let Some(head) = call.strip_suffix(" <unfinished ...>") {
            unfinished.insert(pid.to_string(), head.to_string());
            continue;
        }
        let joined;
        let call = match (call.strip_prefix("<... "), unfinished.remove(pid)) {
            (Some(rest), Some(head)) => {
                joined = format!("{head}{}", rest.split_once("resumed>").map_or("", |(_, r)| r));
                joined.as_str()
            }
            _ => call,
        };
        if call.starts_with("execve(") && call.contains(" = 0") && pids.is_empty() {
            // runc init execs the process: the first exec of something
            // other than runc, matching the command's name.
            let prog = call.split('"').nth(1).unwrap_or("");
            if prog.ends_with(&format!("/{}", cmd[0].rsplit('/').next().unwrap())) || call.starts_with(&exe) {
                pids.insert(pid.to_string());
            }
        }
        if !pids.contains(pid) {
            continue;
        }
        if call.starts_with("clone") || call.starts_with("fork") || call.starts_with("vfork") {
            if let Some(child) = call.rsplit("= ").next().map(str::trim) {
                if child.parse::<u32>().is_ok() {
                    pids.insert(child.to_string());
                }
            }
            continue;
        }
        if call.contains(" = -1") || !(call.starts_with("open") || call.starts_with("execve")) {
            continue;
        }
        if let Some(p) = call.split('"').nth(1) {
            files.insert(p.to_string());
        }
    }
    assert!(!pids.is_empty(), "no exec of {} in the trace", cmd[0]);
    let mut bytes = 0;
    let mut n = 0;
    for f in &files {
        let p = rootfs.join(f.trim_start_matches('/'));
        if let Ok(m) = std::fs::metadata(&p) {
            if m.is_file() {
                bytes += m.len();
                n += 1;
            }
        }
    }
    (bytes, n)
}

/// nydus's tools, if installed.
fn nydus_bin() -> Option<PathBuf> {
    let dir = std::env::var_os("NYDUS_BIN").map_or_else(|| PathBuf::from("/opt/nydus/bin"), PathBuf::from);
    dir.join("nydus-image").exists().then_some(dir)
}

/// The image converted for nydus: one zran bootstrap per layer, merged,
/// with the zran metadata blobs pushed next to the layers. Returns the
/// merged bootstrap (local). nydusd names a layer's blob after its
/// bootstrap's file name, so each is named by its layer's digest.
fn nydus_convert(
    bin: &Path,
    dir: &Path,
    layout: &Path,
    layers: &[String],
    reg: &harness::Registry,
    repo: &str,
) -> PathBuf {
    let nd = dir.join("nydus");
    let merged = nd.join("merged.boot");
    if !merged.exists() {
        let _ = std::fs::remove_dir_all(&nd);
        std::fs::create_dir_all(nd.join("blobs")).unwrap();
        let mut boots = Vec::new();
        for hex in layers {
            let boot = nd.join(format!("{hex}.boot"));
            sh(&format!(
                "{}/nydus-image create -t targz-ref --log-level warn -D {} -B {} {}",
                bin.display(),
                nd.join("blobs").display(),
                boot.display(),
                layout.join("blobs/sha256").join(hex).display()
            ));
            boots.push(boot.display().to_string());
        }
        sh(&format!(
            "{}/nydus-image merge --log-level warn -B {}.tmp {} && mv {}.tmp {}",
            bin.display(),
            merged.display(),
            boots.join(" "),
            merged.display(),
            merged.display()
        ));
    }
    // The registry's storage may be new; pushing an existing blob is cheap.
    for e in std::fs::read_dir(nd.join("blobs")).unwrap() {
        let p = e.unwrap().path();
        let hex = p.file_name().unwrap().to_str().unwrap().to_string();
        sh(&format!(
            "loc=$(curl -sf -D - -o /dev/null -X POST http://{host}/v2/{repo}/blobs/uploads/ | tr -d '\\r' | sed -n 's/^[Ll]ocation: //p'); \
             case $loc in http*) ;; *) loc=http://{host}$loc;; esac; \
             curl -sf -X PUT -H 'Content-Type: application/octet-stream' --data-binary @{} \"$loc&digest=sha256:{hex}\"",
            p.display(),
            host = reg.host(),
        ));
    }
    merged
}

/// nydus set up for one image: its tools, the merged bootstrap and where
/// the blobs are.
struct Nydus {
    bin: PathBuf,
    boot: PathBuf,
    host: String,
    repo: String,
}

impl Nydus {
    /// One cold nydus start: nydusd on an empty blob cache, then the floor's
    /// overlay and runc over its mount. Timed from nydusd's start.
    fn run(&self, work: &Path, config: &[u8], cmd: &[String], id: &str) -> Duration {
        let d = work.join(format!("nydus-{id}"));
        let (mnt, cache) = (d.join("mnt"), d.join("cache"));
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        let cfg = serde_json::json!({
            "device": {
                "backend": {"type": "registry", "config": {
                    "scheme": "http", "host": self.host, "repo": self.repo,
                    "timeout": 30, "connect_timeout": 10, "retry_limit": 2}},
                "cache": {"type": "blobcache", "config": {"work_dir": cache}}
            },
            "mode": "direct",
            "digest_validate": false,
            "iostats_files": false,
            "enable_xattr": true,
            "fs_prefetch": {"enable": false}
        });
        let cfg_path = d.join("config.json");
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let mountinfo_has = |p: &Path| {
            let needle = format!(" {} ", p.display());
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(&needle)
        };
        let t = Instant::now();
        let mut nydusd = Command::new(self.bin.join("nydusd"))
            .args(["--log-level", "warn", "--rlimit-nofile", "0", "--config"])
            .arg(&cfg_path)
            .arg("--mountpoint")
            .arg(&mnt)
            .arg("--bootstrap")
            .arg(&self.boot)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while !mountinfo_has(&mnt) {
            assert!(nydusd.try_wait().unwrap().is_none(), "nydusd exited before mounting");
            assert!(t.elapsed() < Duration::from_secs(60), "nydusd did not mount");
            std::thread::sleep(Duration::from_millis(2));
        }
        let mounted = t.elapsed();
        let run = floor_run(work, &mnt, config, cmd, id);
        sh(&format!("umount {}", mnt.display()));
        let _ = nydusd.wait();
        let _ = std::fs::remove_dir_all(&d);
        mounted + run
    }
}

fn bench(img: &Image, root: &Path) {
    let dir = root.join(format!("clip-bench-{}", img.name));
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(img.script);
    sh(&format!("bash {} {}", script.display(), dir.display()));
    let layout = dir.join("oci");
    let storage = dir.join("registry");
    let pushed = dir.join(".pushed");
    let reg = harness::Registry::start(&storage);
    let image = format!("{}/bench/{}:latest", reg.host(), img.name);
    if !pushed.exists() {
        sh(&format!(
            "skopeo copy --quiet --preserve-digests --dest-tls-verify=false oci:{}:{} docker://{image}",
            layout.display(),
            img.tag
        ));
        std::fs::write(&pushed, "").unwrap();
    }
    // The pristine unpacked image: the floor's lower layer, never written.
    let unpacked = dir.join("unpacked");
    if !unpacked.join("rootfs").exists() {
        sh(&format!(
            "umoci unpack --image {}:{} {}",
            layout.display(),
            img.tag,
            unpacked.display()
        ));
    }
    let rootfs = unpacked.join("rootfs");
    let local = clip_registry::open(
        &clip_registry::ImageRef::parse(&format!("oci:{}:{}", layout.display(), img.tag)).unwrap(),
        &clip_registry::Registries::new(clip_registry::RegistryOptions::default()).unwrap(),
        std::sync::Arc::new(clip_registry::auth::Anonymous),
    )
    .unwrap();
    let resolved = local.resolve(&clip_registry::Platform::default()).unwrap();
    let compressed: u64 = resolved.layers.iter().map(|l| l.size).sum();
    let work = tempfile::tempdir_in(root).unwrap();
    let (read_bytes, read_files) = bytes_of_files_read(work.path(), &rootfs, &resolved.config, &img.cmd);

    // Nodes: two without a profile (one guessing its start from the
    // image, one left to demand reads), one with a recorded profile.
    let plain = Node {
        dir: work.path().join("plain"),
        guess: true,
    };
    let unguessed = Node {
        dir: work.path().join("unguessed"),
        guess: false,
    };
    let profiled = Node {
        dir: work.path().join("profiled"),
        guess: true,
    };
    for n in [&plain, &unguessed, &profiled] {
        n.ok(&["index", "--image", &image]);
    }
    let mut rec = vec!["record", "--runtime", "runc", image.as_str()];
    rec.extend(img.cmd.iter().map(String::as_str));
    profiled.ok(&rec);

    let repo = format!("bench/{}", img.name);
    let nydus = match nydus_bin() {
        Some(bin) => {
            let hexes: Vec<String> = resolved
                .layers
                .iter()
                .map(|l| l.digest.trim_start_matches("sha256:").to_string())
                .collect();
            let boot = nydus_convert(&bin, &dir, &layout, &hexes, &reg, &repo);
            Some(Nydus {
                bin,
                boot,
                host: reg.host(),
                repo: repo.clone(),
            })
        }
        None => {
            eprintln!("nydus skipped: no nydus-image in /opt/nydus/bin or $NYDUS_BIN (with cmake installed: cargo install nydus-rs --version 2.2.0 --locked --root /opt/nydus)");
            None
        }
    };

    let mut t = [(); 8].map(|_| Vec::new());
    let mut fetched = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..img.rounds {
        drop_caches();
        t[0].push(floor_run(
            work.path(),
            &rootfs,
            &resolved.config,
            &img.cmd,
            &format!("f{round}"),
        ));
        settle();
        t[1].push(floor_run(
            work.path(),
            &rootfs,
            &resolved.config,
            &img.cmd,
            &format!("fw{round}"),
        ));
        // The profiled node last: its warm run follows its cold one.
        for (i, n) in [&unguessed, &plain, &profiled].into_iter().enumerate() {
            n.cold();
            let before = reg.blob_bytes_served();
            t[[7, 2, 3][i]].push(n.run(&image, &img.cmd, &format!("c{i}-{round}")));
            std::thread::sleep(Duration::from_millis(500));
            fetched[[2, 0, 1][i]].push(reg.blob_bytes_served() - before);
            if i != 2 {
                // A node without a profile is done for this round:
                // stopped, it writes its span cache now (untimed), not in
                // the runs that follow (clipd writes once its store has
                // been quiet for 2 s).
                n.ok(&["daemon", "stop"]);
            }
        }
        settle();
        t[4].push(profiled.run(&image, &img.cmd, &format!("w{round}")));
        // Spans on disk, nothing else: a new clipd, page cache dropped.
        profiled.ok(&["daemon", "stop"]);
        drop_caches();
        profiled.ok(&["ps"]);
        t[5].push(profiled.run(&image, &img.cmd, &format!("d{round}")));
        if let Some(n) = &nydus {
            drop_caches();
            t[6].push(n.run(work.path(), &resolved.config, &img.cmd, &format!("n{round}")));
        }
    }
    // Fixed costs: `true` in a cached image against a bare runc run.
    let truecmd = vec!["true".to_string()];
    let mut fixed = (Vec::new(), Vec::new());
    for round in 0..5 {
        settle();
        fixed.0.push(profiled.run(&image, &truecmd, &format!("t{round}")));
        settle();
        fixed.1.push(floor_run(
            work.path(),
            &rootfs,
            &resolved.config,
            &truecmd,
            &format!("ft{round}"),
        ));
    }
    for n in [&plain, &unguessed, &profiled] {
        let _ = n.cmd(&["daemon", "stop"]).output();
    }
    let nydus_t = (!t[6].is_empty()).then(|| median(t[6].clone()));
    let [floor, warm_floor, cold, cold_p, warm, cached, _, cold_u] =
        t.map(|v| if v.is_empty() { 0.0 } else { median(v) });
    let min = |v: &Vec<u64>| *v.iter().min().unwrap();
    let (fb, fbp, fbu) = (min(&fetched[0]), min(&fetched[1]), min(&fetched[2]));
    println!(
        "## `{}`: {} layers, {:.2} GB compressed; `{}` (median of {}, runc everywhere)",
        img.name,
        resolved.layers.len(),
        compressed as f64 / 1e9,
        img.cmd.join(" "),
        img.rounds
    );
    println!();
    println!("| path | seconds |");
    println!("|---|---:|");
    println!("| floor (fresh overlay over the pristine unpacked image, cold) | {floor:.2} |");
    println!("| warm floor (the same, page cache warm) | {warm_floor:.2} |");
    println!("| clip cold, no profile (start guessed from the image) | {cold:.2} |");
    println!("| clip cold, no profile, no guess (demand reads only) | {cold_u:.2} |");
    println!("| clip cold, profile | {cold_p:.2} |");
    println!("| clip warm (spans cached, new container) | {warm:.2} |");
    println!("| clip cached (spans on disk, fresh clipd and mount, page cache dropped) | {cached:.2} |");
    match nydus_t {
        Some(n) => println!("| nydus cold (zran, FUSE, empty blob cache, local bootstrap) | {n:.2} |"),
        None => println!("| nydus cold | not installed |"),
    }
    println!();
    println!("| ratio | value | goal |");
    println!("|---|---:|---|");
    println!("| cold, profile ÷ floor | **{:.2}** | ≤ 1.2 |", cold_p / floor);
    println!("| cold, no profile ÷ floor | **{:.2}** | ≤ 1.6 |", cold / floor);
    println!("| cold, no profile, no guess ÷ floor | {:.2} | |", cold_u / floor);
    println!("| warm ÷ warm floor | **{:.2}** | ≤ 1.05 |", warm / warm_floor);
    println!("| cached (fresh mount) ÷ floor | {:.2} | |", cached / floor);
    if let Some(n) = nydus_t {
        println!(
            "| nydus cold ÷ floor | {:.2} | clip's cold ratios below it |",
            n / floor
        );
    }
    println!(
        "| bytes fetched, profile ÷ bytes of files read | **{:.2}** ({fbp} ÷ {read_bytes}, {read_files} files) | ≤ 1.3 |",
        fbp as f64 / read_bytes as f64
    );
    println!(
        "| bytes fetched, no profile ÷ bytes of files read | {:.2} ({fb}) | |",
        fb as f64 / read_bytes as f64
    );
    println!(
        "| bytes fetched, no profile, no guess ÷ bytes of files read | {:.2} ({fbu}) | |",
        fbu as f64 / read_bytes as f64
    );
    println!(
        "| fixed cost: `clipctl run IMAGE true` ÷ bare `runc run` (fresh overlay) | {:.2} ({:.3} s ÷ {:.3} s) | |",
        median(fixed.0.clone()) / median(fixed.1.clone()),
        median(fixed.0),
        median(fixed.1)
    );
    println!();
}

fn main() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let py = |s: &str| vec!["python3".to_string(), "-c".to_string(), s.to_string()];
    let images = [
        Image {
            name: "py",
            script: "build-python-image.sh",
            tag: "py",
            cmd: py("import numpy, pandas, scipy.linalg; print(numpy.__version__, pandas.__version__)"),
            rounds: 5,
        },
        Image {
            name: "torch",
            script: "build-torch-image.sh",
            tag: "torch",
            cmd: py("import torch; print(torch.__version__)"),
            rounds: 3,
        },
    ];
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    for img in &images {
        if wanted.is_empty() || wanted.iter().any(|w| w == img.name) {
            bench(img, &root);
        }
    }
}
