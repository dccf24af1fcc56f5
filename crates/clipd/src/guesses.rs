//! Starts without a profile: what the image's files say a container's
//! process reads first (`clip_guess`), kept next to the index
//! (`INDEX.hints`) when the image is indexed here, and walked from the
//! container's command when a fresh mount has no profile to replay.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clip_fs::view::ImageView;

pub fn path_for(index: &Path) -> PathBuf {
    index.with_extension("hints")
}

/// The hints of the index at `index`, if they were learnt from this very
/// manifest.
pub fn load(index: &Path, manifest_digest: &str) -> Option<clip_guess::Hints> {
    let bytes = std::fs::read(path_for(index)).ok()?;
    decode_for(&bytes, manifest_digest).unwrap_or_else(|e| {
        tracing::warn!(index = %index.display(), error = %e, "ignoring unreadable hints");
        None
    })
}

/// `bytes` as hints, if they were learnt from this very manifest.
pub fn decode_for(bytes: &[u8], manifest_digest: &str) -> Result<Option<clip_guess::Hints>, clip_guess::Error> {
    Ok(Some(clip_guess::Hints::decode(bytes)?).filter(|h| h.manifest_digest == manifest_digest))
}

/// Queues on `view` what the command `c` (on top of the image's config) is
/// guessed to read first; returns how many units it queued.
pub fn replay(view: &ImageView, index: &Path, c: &clip_api::Command) -> usize {
    let t = Instant::now();
    let file = view.index();
    let Some(hints) = load(index, &file.index.image.manifest_digest) else {
        return 0;
    };
    let process = clip_guess::Process::of_image(
        &file.index.image.config,
        &c.cmd,
        c.entrypoint.as_deref(),
        &c.env,
        c.workdir.as_deref(),
    );
    // All at once (the walk takes tens of milliseconds): a unit several reads
    // fall in is queued once, as far as the furthest of them.
    let reads = clip_guess::guess(&file.index, &hints, &process);
    let bytes: u64 = reads.iter().map(|r| r.2).sum();
    let n = view.replay_reads(&reads);
    tracing::info!(
        program = process.args.first().map(String::as_str).unwrap_or(""),
        reads = reads.len(),
        bytes,
        units = n,
        seconds = t.elapsed().as_secs_f64(),
        "no profile: replaying a guessed start"
    );
    n
}
