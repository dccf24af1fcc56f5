//! The streaming tar walker and the overlay merge on arbitrary archives.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut w = clip_index::tar::Walker::new(data);
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
    let mut t = clip_index::tree::TreeBuilder::new();
    t.apply_layer(0, &entries);
    t.apply_layer(1, &entries);
    let nodes = t.finish();
    assert_eq!(nodes[0].kind, clip_format::Kind::Dir);
});
