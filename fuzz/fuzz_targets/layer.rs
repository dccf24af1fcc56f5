//! Checkpointing decompression of arbitrary gzip/zstd/plain input: errors,
//! never panics, and whatever is indexed reads back the same.
#![no_main]
use std::io::Read;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else { return };
    let compression = match sel % 3 {
        0 => clip_gzran::Compression::Gzip,
        1 => clip_gzran::Compression::Zstd,
        _ => clip_gzran::Compression::None,
    };
    let Ok(mut r) = clip_gzran::IndexingReader::new(input, compression, 64 * 1024) else { return };
    let mut out = Vec::new();
    if r.read_to_end(&mut out).is_err() {
        return;
    }
    let Ok(map) = r.finish() else { return };
    let points: Vec<_> = map.checkpoints.iter().map(|c| c.point).collect();
    let layout = clip_gzran::Layout {
        compression,
        checkpoints: &points,
        compressed_size: map.compressed_size,
        uncompressed_size: map.uncompressed_size,
    };
    for (k, cp) in map.checkpoints.iter().enumerate() {
        let (s, e) = clip_gzran::span_range(&points, k, map.compressed_size).unwrap();
        let span = clip_gzran::decompress_span(&layout, k, &cp.window, &map.span_digests[k], &input[s as usize..e as usize])
            .expect("a span of a stream that indexed cleanly decompresses");
        let (a, b) = layout.span_out(k);
        assert!(span == out[a as usize..b as usize]);
    }
});
