//! Whole .clip files: header and lengths, then (the checksum recomputed,
//! so that mutations get past it) the metadata, invariants and windows.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    clip_format::fix_checksum(&mut bytes);
    if let Ok(f) = clip_format::IndexFile::decode(&bytes) {
        for (l, layer) in f.index.layers.iter().enumerate() {
            for k in 0..layer.checkpoints.len() {
                let _ = f.window(l, k);
                let _ = f.window_digest(l, k);
            }
        }
        let _ = f.index.resolve_follow(b"/a/../b/c");
    }
});
