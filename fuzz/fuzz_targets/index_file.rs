//! Whole .clip files: header, lengths, checksum, then everything else.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(f) = clip_format::IndexFile::decode(data) {
        for (l, layer) in f.index.layers.iter().enumerate() {
            for k in 0..layer.checkpoints.len() {
                let _ = f.window(l, k);
            }
        }
    }
});
