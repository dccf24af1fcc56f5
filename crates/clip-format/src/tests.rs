use super::*;

fn sample(files: usize) -> IndexFile {
    let mut windows = WindowWriter::default();
    let (off, len) = windows.add(&[7u8; 32 * 1024]).unwrap();
    let layer = Layer {
        digest: "sha256:00".into(),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        compression: Compression::Gzip,
        compressed_size: 1000,
        uncompressed_size: 1 << 30,
        checkpoints: vec![
            Checkpoint {
                in_bits: 80,
                out: 0,
                window_offset: 0,
                window_len: 0,
                window_digest: [0; 32],
            },
            Checkpoint {
                in_bits: 4003,
                out: 1 << 20,
                window_offset: off,
                window_len: len,
                window_digest: [0; 32],
            },
        ],
        span_digests: vec![[1; 32], [2; 32]],
        pieces: vec![
            Piece {
                span: 1,
                out: 1 << 20,
                digest: [3; 32],
            },
            Piece {
                span: 1,
                out: 3 << 20,
                digest: [4; 32],
            },
        ],
    };
    let dir = |entries| Node {
        kind: Kind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 1,
        mtime_nsec: 0,
        size: 0,
        nlink: 2,
        rdev: 0,
        parent: ROOT_INO,
        target: Vec::new(),
        xattrs: Vec::new(),
        data: Data::None,
        entries,
    };
    let mut nodes = vec![dir((0..files)
        .map(|i| DirEntry {
            name: format!("f{i:07}").into_bytes(),
            ino: i as u64 + 2,
        })
        .collect())];
    for i in 0..files {
        nodes.push(Node {
            kind: Kind::File,
            mode: 0o4755,
            size: 10,
            xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
            data: Data::Contiguous {
                layer: 0,
                offset: i as u64 * 512,
            },
            entries: Vec::new(),
            ..dir(Vec::new())
        });
    }
    let index = Index {
        image: Image {
            reference: "localhost:5000/x:y".into(),
            manifest_digest: "sha256:aa".into(),
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            platform: "linux/amd64".into(),
            config_digest: "sha256:bb".into(),
            config: br#"{"architecture":"amd64"}"#.to_vec(),
        },
        spacing: 1 << 20,
        layers: vec![layer],
        nodes,
    };
    IndexFile::new(index, windows)
}

#[test]
fn round_trip() {
    let f = sample(1000);
    let bytes = f.encode().unwrap();
    let g = IndexFile::decode(&bytes).unwrap();
    assert_eq!(g.index, f.index);
    assert_eq!(g.window(0, 1).unwrap(), vec![7u8; 32 * 1024]);
    assert!(g.window(0, 0).unwrap().is_empty());
    assert!(g.window(0, 2).is_err());
    assert_eq!(g.index.resolve(b"/f0000999"), Some(1001));
    assert_eq!(g.index.resolve(b"f0000999/../f0000001"), Some(3));
    assert_eq!(g.index.resolve(b"/nope"), None);
    // Encoding is deterministic.
    assert_eq!(g.encode().unwrap(), bytes);
}

#[test]
fn symlinks_are_followed_inside_the_image() {
    let mut f = sample(3);
    let template = f.index.nodes[1].clone();
    let link = |target: &[u8]| Node {
        kind: Kind::Symlink,
        target: target.to_vec(),
        data: Data::None,
        ..template.clone()
    };
    // f0000000 is a file; add links "abs" -> /f0000001, "rel" -> ./abs,
    // "up" -> ../../f0000002 and a loop.
    let base = f.index.nodes.len() as u64;
    f.index.nodes.push(link(b"/f0000001"));
    f.index.nodes.push(link(b"./abs"));
    f.index.nodes.push(link(b"../../f0000002"));
    f.index.nodes.push(link(b"loop"));
    f.index.nodes.push(link(b"f0000000/x"));
    let names: [&[u8]; 5] = [b"abs", b"rel", b"up", b"loop", b"through-file"];
    for (i, n) in names.iter().enumerate() {
        f.index.nodes[0].entries.push(DirEntry {
            name: n.to_vec(),
            ino: base + 1 + i as u64,
        });
    }
    f.index.nodes[0].entries.sort_by(|a, b| a.name.cmp(&b.name));
    let ix = &f.index;
    assert_eq!(ix.resolve_follow(b"/abs"), Some(3));
    assert_eq!(ix.resolve_follow(b"rel"), Some(3));
    assert_eq!(ix.resolve_follow(b"/up"), Some(4));
    assert_eq!(ix.resolve_follow(b"/loop"), None);
    assert_eq!(ix.resolve_follow(b"/through-file"), None);
    assert_eq!(ix.resolve(b"/abs"), Some(base + 1));
}

#[test]
fn a_directory_knows_its_path() {
    let mut f = sample(2);
    let template = f.index.nodes[0].clone();
    let dir = |parent: u64, entries: Vec<DirEntry>| Node {
        parent,
        entries,
        ..template.clone()
    };
    // /a/b, with the file f0000000 (inode 2) inside b.
    let a = f.index.nodes.len() as u64 + 1;
    let b = a + 1;
    let file = f.index.nodes[0].entries[0].clone();
    f.index.nodes.push(dir(
        ROOT_INO,
        vec![DirEntry {
            name: b"b".to_vec(),
            ino: b,
        }],
    ));
    f.index.nodes.push(dir(a, vec![file.clone()]));
    f.index.nodes[0].entries.push(DirEntry {
        name: b"a".to_vec(),
        ino: a,
    });
    f.index.nodes[0].entries.sort_by(|x, y| x.name.cmp(&y.name));
    let ix = &f.index;
    assert_eq!(ix.dir_path(ROOT_INO).unwrap(), b"");
    assert_eq!(ix.dir_path(a).unwrap(), b"a");
    assert_eq!(ix.dir_path(b).unwrap(), b"a/b");
    assert_eq!(ix.dir_path(file.ino), None, "a file is not a directory");
    assert_eq!(ix.dir_path(999), None);
    // A parent that does not list it, and a loop.
    f.index.nodes[(b - 1) as usize].parent = ROOT_INO;
    assert_eq!(f.index.dir_path(b), None);
    f.index.nodes[(b - 1) as usize].parent = a;
    f.index.nodes[(a - 1) as usize].parent = b;
    f.index.nodes[(b - 1) as usize].entries.push(DirEntry {
        name: b"z".to_vec(),
        ino: a,
    });
    assert_eq!(f.index.dir_path(b), None);
}

/// Every window of a decoded file, read and checked.
fn read_all_windows(f: &IndexFile) -> Result<()> {
    for (l, layer) in f.index.layers.iter().enumerate() {
        for k in 0..layer.checkpoints.len() {
            f.window(l, k)?;
        }
    }
    Ok(())
}

#[test]
fn every_flipped_byte_is_caught() {
    let bytes = sample(20).encode().unwrap();
    let meta_end = 72 + u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x20;
        match IndexFile::decode(&b) {
            // The header and the metadata are checked on load...
            Err(_) => assert!(i < meta_end, "flip at {i} in a window refused on load"),
            // ...each window when it is read.
            Ok(f) => {
                assert!(i >= meta_end, "flip at {i} accepted");
                let e = read_all_windows(&f).unwrap_err();
                assert!(e.to_string().contains("the index file is corrupted"), "{e}");
            }
        }
    }
}

#[test]
fn a_loaded_file_reads_its_windows_from_disk_and_checks_them() {
    let f = sample(20);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.clip");
    let bytes = f.encode().unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let g = IndexFile::load(&path).unwrap();
    assert_eq!(g.index, IndexFile::decode(&bytes).unwrap().index);
    assert_eq!(g.window(0, 1).unwrap(), vec![7u8; 32 * 1024]);
    assert_eq!(g.encode().unwrap(), bytes);
    // A window changed on disk after loading is refused when read.
    let mut bad = bytes.clone();
    let last = bad.len() - 5;
    bad[last] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let g = IndexFile::load(&path).unwrap();
    let e = g.window(0, 1).unwrap_err();
    assert!(e.to_string().contains("the index file is corrupted"), "{e}");
}

#[test]
fn truncation_and_trailing_data_are_caught() {
    let bytes = sample(20).encode().unwrap();
    for cut in 0..bytes.len() {
        let err = IndexFile::decode(&bytes[..cut]).unwrap_err();
        assert!(
            matches!(err, Error::BadMagic | Error::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(IndexFile::decode(&long), Err(Error::TrailingData { .. })));
    let mut v1 = bytes.clone();
    v1[8] = 1;
    assert!(matches!(IndexFile::decode(&v1), Err(Error::Version(1))));
}

#[test]
fn inconsistent_metadata_is_rejected_even_with_a_valid_checksum() {
    let mut f = sample(3);
    f.index.nodes[0].entries[0].ino = 99;
    assert!(matches!(
        IndexFile::decode(&f.encode().unwrap()),
        Err(Error::Invalid(_))
    ));
    let mut f = sample(3);
    f.index.nodes[1].data = Data::Contiguous {
        layer: 0,
        offset: u64::MAX,
    };
    assert!(matches!(
        IndexFile::decode(&f.encode().unwrap()),
        Err(Error::Invalid(_))
    ));
    let mut f = sample(3);
    f.index.layers[0].checkpoints[1].window_len = 1 << 30;
    assert!(matches!(
        IndexFile::decode(&f.encode().unwrap()),
        Err(Error::Invalid(_))
    ));
    // Pieces must start their span, stay inside it and go forward.
    for (i, out) in [(0, 2 << 20), (1, 1 << 20), (1, 1 << 30)] {
        let mut f = sample(1);
        f.index.layers[0].pieces[i].out = out;
        assert!(
            matches!(IndexFile::decode(&f.encode().unwrap()), Err(Error::Invalid(_))),
            "piece {i} at {out}"
        );
    }
    let mut f = sample(1);
    f.index.layers[0].pieces[1].span = 0;
    assert!(matches!(
        IndexFile::decode(&f.encode().unwrap()),
        Err(Error::Invalid(_))
    ));
}
