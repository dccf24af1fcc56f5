//! The metadata parser and the invariant checks behind the checksum: what a
//! crafted file with a correct checksum reaches.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(index) = clip_format::parse_meta(data) {
        if index.validate(1 << 20).is_ok() {
            // Lookups on a validated index must not panic.
            for ino in 1..=index.nodes.len() as u64 {
                let n = index.node(ino).unwrap();
                for e in &n.entries {
                    let _ = index.lookup(ino, &e.name);
                }
            }
            let _ = index.resolve_follow(b"/a/b/../c");
        }
    }
});
