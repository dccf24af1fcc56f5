//! The streaming tar walker (learning files' facts for guessed starts on
//! the way) and the overlay merge on arbitrary archives.
//! Every block's header checksum is recomputed first, so that mutations
//! reach the parsing behind it rather than stopping at the checksum.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut data = data.to_vec();
    for block in data.chunks_exact_mut(512) {
        if block.iter().any(|&b| b != 0) {
            block[148..156].copy_from_slice(b"        ");
            let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
            block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        }
    }
    let data = &data[..];
    let mut w = clip_index::tar::Walker::new(data).with_facts();
    let mut entries = Vec::new();
    while let Ok(Some(e)) = w.next_entry() {
        // Offsets the walker reports lie inside the stream.
        if let Some(segs) = &e.sparse {
            for s in segs {
                assert!(s.offset + s.len <= data.len() as u64);
            }
        } else if e.kind == clip_index::tar::EntryKind::File {
            assert!(e.offset + e.size <= data.len() as u64);
        }
        entries.push(e);
    }
    // Facts are keyed by where a file's bytes start.
    for (offset, _) in w.take_facts() {
        assert!(entries.iter().any(|e| e.offset == offset));
    }
    let mut t = clip_index::tree::TreeBuilder::new();
    // Two layers of the same entries: whiteouts, symlinked parents and
    // hardlinks across layers.
    if t.apply_layer(0, &entries).is_ok() && t.apply_layer(1, &entries).is_ok() {
        let nodes = t.finish();
        assert_eq!(nodes[0].kind, clip_format::Kind::Dir);
    }
});
