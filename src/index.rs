//! `clipctl index`

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clip_index::Options;
use clip_registry::{ImageRef, Platform};

#[derive(clap::Args)]
pub struct Args {
    /// Image reference: host[:port]/repo[:tag|@digest], Docker Hub shorthand,
    /// or oci:DIR[:TAG] for a local OCI layout.
    #[arg(long)]
    image: String,
    /// Where to write the index.
    #[arg(long)]
    out: PathBuf,
    /// Platform to pick from a multi-arch image.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Uncompressed MiB between checkpoints.
    #[arg(long, env = "CLIP_CHECKPOINT_MIB", default_value_t = clip_index::DEFAULT_CHECKPOINT_MIB)]
    checkpoint_mib: u64,
    /// Layers indexed at once (default: one per core).
    #[arg(long)]
    jobs: Option<usize>,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
}

/// Writes `bytes` to `path` atomically: a reader sees the old file or the
/// whole new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.checkpoint_mib >= 1, "--checkpoint-mib must be at least 1");
    let started = Instant::now();
    let reference = ImageRef::parse(&a.image)?;
    let platform: Platform = a.platform.parse()?;
    let source = crate::source::open(&reference)?;
    let image = source
        .resolve(&platform)
        .with_context(|| format!("resolving {}", reference.canonical()))?;
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    let counter = Arc::new(AtomicU64::new(0));
    let mut opts = Options {
        spacing: a.checkpoint_mib << 20,
        progress: Some(counter.clone()),
        ..Options::default()
    };
    if let Some(j) = a.jobs {
        opts.jobs = j.max(1);
    }
    let done = Arc::new(AtomicBool::new(false));
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("indexing {} layers", image.layers.len()));
        let (bar2, counter, done) = (bar.clone(), counter.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                bar2.set_position(counter.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        bar
    });
    let result = clip_index::build(source.as_ref(), &reference.canonical(), &image, &opts);
    done.store(true, Ordering::Relaxed);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let (file, stats) = result?;
    let bytes = file.encode()?;
    write_atomic(&a.out, &bytes)?;
    let seconds = started.elapsed().as_secs_f64();
    if a.json {
        let summary = serde_json::json!({
            "reference": reference.canonical(),
            "manifest_digest": image.manifest_digest,
            "platform": image.platform,
            "layers": stats.layers,
            "files": stats.files,
            "directories": stats.directories,
            "symlinks": stats.symlinks,
            "other": stats.other,
            "compressed_bytes": stats.compressed_bytes,
            "uncompressed_bytes": stats.uncompressed_bytes,
            "checkpoints": stats.checkpoints,
            "index_bytes": bytes.len(),
            "seconds": seconds,
            "skipped": {
                "excluded": stats.skipped.excluded,
                "bad_hardlinks": stats.skipped.bad_hardlinks,
                "replaced_by_dir": stats.skipped.replaced_by_dir,
            },
        });
        println!("{summary}");
    } else {
        println!(
            "indexed {} ({} layers, {} files, {} dirs) into {}: {} bytes, {} checkpoints, {:.2}s",
            reference.canonical(),
            stats.layers,
            stats.files,
            stats.directories,
            a.out.display(),
            bytes.len(),
            stats.checkpoints,
            seconds
        );
    }
    Ok(())
}
