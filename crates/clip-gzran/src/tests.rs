use std::io::{Read, Write};
use std::process::{Command, Stdio};

use super::*;

/// Deterministic, moderately compressible bytes (words from a small
/// vocabulary mixed with noise), so deflate emits many blocks of both kinds.
fn sample(len: usize, seed: u64) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"layer ",
        b"gzip ",
        b"checkpoint ",
        b"window ",
        b"\n",
        b"span ",
        b"tar ",
        b"inode ",
    ];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if x >> 60 == 0 {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(words[(x >> 61) as usize]);
        }
    }
    out.truncate(len);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .args(["-c", "-n", "-6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip is installed");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    writer.join().unwrap().unwrap();
    assert!(child.wait().unwrap().success());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rewrites a gzip member's header to carry FEXTRA, FNAME, FCOMMENT and
/// FHCRC, the optional fields a peer once mishandled.
fn with_all_header_fields(member: &[u8]) -> Vec<u8> {
    let mut h = member[..10].to_vec();
    h[3] = 0x04 | 0x08 | 0x10 | 0x02;
    h.extend_from_slice(&[6, 0, b'A', b'B', 2, 0, 1, 2]);
    h.extend_from_slice(b"name.tar\0");
    h.extend_from_slice(b"a comment\0");
    let crc = crc32(&h) as u16;
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&member[10..]);
    h
}

fn layout_of<'a>(map: &LayerMap, points: &'a [Checkpoint]) -> Layout<'a> {
    Layout {
        compression: map.compression,
        checkpoints: points,
        compressed_size: map.compressed_size,
        uncompressed_size: map.uncompressed_size,
    }
}

fn index(compressed: &[u8], compression: Compression, spacing: u64) -> (Vec<u8>, LayerMap) {
    let mut r = IndexingReader::new(compressed, compression, spacing).unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    let map = r.finish().unwrap();
    (out, map)
}

/// Every span decompresses alone to exactly its part of the original, and
/// random reads from the nearest checkpoint match too.
fn check_random_access(original: &[u8], compressed: &[u8], map: &LayerMap) {
    assert_eq!(map.uncompressed_size, original.len() as u64);
    assert_eq!(map.compressed_size, compressed.len() as u64);
    let diff_id: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(original).into();
    assert_eq!(
        map.uncompressed_digest, diff_id,
        "the uncompressed stream's digest (diff_id)"
    );
    let points: Vec<Checkpoint> = map.checkpoints.iter().map(|c| c.point).collect();
    assert_eq!(map.span_digests.len(), points.len());
    for (k, cp) in map.checkpoints.iter().enumerate() {
        let (s, e) = span_range(&points, k, map.compressed_size).unwrap();
        let bytes = decompress_span(
            &layout_of(map, &points),
            k,
            &cp.window,
            &map.span_digests[k],
            &compressed[s as usize..e as usize],
        )
        .unwrap_or_else(|e| panic!("span {k}: {e}"));
        let end = points.get(k + 1).map_or(original.len(), |c| c.out as usize);
        assert!(bytes == original[cp.point.out as usize..end], "span {k} differs");
        // A prefix is the span's first bytes, and still checks the digest.
        let limit = (bytes.len() / 3) as u64;
        let layout = layout_of(map, &points);
        let slice = &compressed[s as usize..e as usize];
        let prefix = decompress_span_prefix(&layout, k, &cp.window, &map.span_digests[k], slice, limit).unwrap();
        assert!(prefix[..] == bytes[..limit as usize], "span {k}'s prefix differs");
        let mut bad = map.span_digests[k];
        bad[0] ^= 1;
        assert!(decompress_span_prefix(&layout, k, &cp.window, &bad, slice, limit).is_err());
    }
    let mut x = 12345u64;
    for _ in 0..50 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let off = (x >> 11) % original.len() as u64;
        let k = points.partition_point(|c| c.out <= off) - 1;
        let cp = &map.checkpoints[k];
        let mut out = Vec::new();
        resume(
            map.compression,
            cp.point,
            &cp.window,
            &compressed[cp.point.in_byte() as usize..],
            off - cp.point.out,
            4096,
            &mut out,
        )
        .unwrap();
        let end = (off as usize + 4096).min(original.len());
        assert!(out == original[off as usize..end], "read at {off} differs");
    }
}

#[test]
fn gzip_single_member() {
    let data = sample(3 << 20, 1);
    let gz = gzip(&data);
    let (out, map) = index(&gz, Compression::Gzip, 256 * 1024);
    assert!(out == data);
    assert!(map.checkpoints.len() >= 10, "{} checkpoints", map.checkpoints.len());
    // Most checkpoints are not byte-aligned: the reason for inflatePrime.
    assert!(map.checkpoints.iter().any(|c| c.point.in_bits % 8 != 0));
    assert!(map.checkpoints[1..].iter().all(|c| c.window.len() == WINDOW_SIZE));
    let whole: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&gz).into();
    assert_eq!(map.digest, whole);
    check_random_access(&data, &gz, &map);
}

#[test]
fn gzip_multi_member_with_header_fields() {
    let parts: Vec<Vec<u8>> = (0..3).map(|i| sample(700_000 + i * 1000, 10 + i as u64)).collect();
    let mut gz = Vec::new();
    for p in &parts {
        gz.extend(with_all_header_fields(&gzip(p)));
    }
    let data = parts.concat();
    let (out, map) = index(&gz, Compression::Gzip, 64 * 1024);
    assert!(out == data);
    check_random_access(&data, &gz, &map);
}

#[test]
fn gzip_empty_content() {
    let gz = gzip(b"");
    let (out, map) = index(&gz, Compression::Gzip, 64 * 1024);
    assert!(out.is_empty());
    assert_eq!(map.checkpoints.len(), 1);
}

#[test]
fn gzip_truncated_and_corrupt_are_errors() {
    let data = sample(1 << 20, 2);
    let gz = gzip(&data);
    for cut in [0, 5, 20, gz.len() / 2, gz.len() - 4, gz.len() - 1] {
        let mut r = IndexingReader::new(&gz[..cut], Compression::Gzip, 1 << 20).unwrap();
        let err = r.read_to_end(&mut Vec::new()).map_err(unwrap_io).err();
        let err = match err {
            Some(e) => e,
            None => r.finish().unwrap_err(),
        };
        assert!(
            matches!(err, Error::Truncated(_) | Error::Gzip { .. }),
            "cut {cut}: {err}"
        );
    }
    // A flipped byte in the data is caught by inflate or by the CRC check.
    let mut bad = gz.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    let mut r = IndexingReader::new(&bad[..], Compression::Gzip, 1 << 20).unwrap();
    let err = r.read_to_end(&mut Vec::new()).map_err(unwrap_io).unwrap_err();
    assert!(matches!(err, Error::Gzip { .. }), "{err}");
    // Junk after the last member is rejected, as Go's gzip reader does.
    let mut junk = gz.clone();
    junk.extend_from_slice(b"junk");
    let mut r = IndexingReader::new(&junk[..], Compression::Gzip, 1 << 20).unwrap();
    let err = r.read_to_end(&mut Vec::new()).map_err(unwrap_io).unwrap_err();
    assert!(matches!(err, Error::TrailingData(_)), "{err}");
}

#[test]
fn tampered_span_is_rejected() {
    let data = sample(1 << 20, 3);
    let gz = gzip(&data);
    let (_, map) = index(&gz, Compression::Gzip, 64 * 1024);
    let points: Vec<Checkpoint> = map.checkpoints.iter().map(|c| c.point).collect();
    let (s, e) = span_range(&points, 2, map.compressed_size).unwrap();
    let mut bytes = gz[s as usize..e as usize].to_vec();
    bytes[10] ^= 1;
    let err = decompress_span(
        &layout_of(&map, &points),
        2,
        &map.checkpoints[2].window,
        &map.span_digests[2],
        &bytes,
    )
    .unwrap_err();
    assert!(matches!(err, Error::SpanDigest { span: 2 }));
    let err = decompress_span(
        &layout_of(&map, &points),
        2,
        &map.checkpoints[2].window,
        &map.span_digests[2],
        &bytes[1..],
    )
    .unwrap_err();
    assert!(matches!(err, Error::SpanLength { .. }));
}

#[test]
fn zstd_multi_frame_has_a_checkpoint_per_spacing() {
    let data = sample(2 << 20, 4);
    let mut zst = Vec::new();
    let mut frame_starts = Vec::new();
    for chunk in data.chunks(100_000) {
        frame_starts.push(zst.len() as u64);
        zst.extend(zstd::bulk::compress(chunk, 3).unwrap());
    }
    let (out, map) = index(&zst, Compression::Zstd, 64 * 1024);
    assert!(out == data);
    assert!(map.pieces.is_empty(), "spans of short frames need no pieces");
    assert_eq!(map.checkpoints.len(), frame_starts.len());
    for (cp, start) in map.checkpoints.iter().zip(&frame_starts) {
        assert_eq!(cp.point.in_bits, start * 8);
    }
    check_random_access(&data, &zst, &map);
}

#[test]
fn zstd_single_frame_is_served_from_its_start() {
    let data = sample(1 << 20, 5);
    let zst = zstd::bulk::compress(&data, 3).unwrap();
    let (out, map) = index(&zst, Compression::Zstd, 64 * 1024);
    assert!(out == data);
    assert_eq!(map.checkpoints.len(), 1);
    check_random_access(&data, &zst, &map);
    let mut r = IndexingReader::new(&zst[..zst.len() - 3], Compression::Zstd, 1 << 20).unwrap();
    let err = r.read_to_end(&mut Vec::new()).map_err(unwrap_io).unwrap_err();
    assert!(matches!(err, Error::Truncated(_)), "{err}");
}

#[test]
fn plain_tar_checkpoints_every_spacing() {
    let data = sample(1_000_000, 6);
    let (out, map) = index(&data, Compression::None, 64 * 1024);
    assert!(out == data);
    assert_eq!(map.checkpoints.len(), 1_000_000usize.div_ceil(65536));
    assert!(map
        .checkpoints
        .iter()
        .all(|c| c.point.out % 65536 == 0 && c.point.in_bits == c.point.out * 8));
    check_random_access(&data, &data, &map);
}

#[test]
fn a_long_zstd_frame_is_decoded_piece_by_piece() {
    let data = sample(1 << 20, 7);
    let zst = zstd::bulk::compress(&data, 3).unwrap();
    let spacing = 64 * 1024;
    let (_, map) = index(&zst, Compression::Zstd, spacing);
    assert_eq!(map.checkpoints.len(), 1);
    assert_eq!(map.pieces.len(), 16);
    for (i, p) in map.pieces.iter().enumerate() {
        assert_eq!((p.span, p.out), (0, i as u64 * spacing));
    }
    let mut dec = PieceDecoder::new(&zst[..], 0).unwrap();
    let mut whole = Vec::new();
    for p in &map.pieces {
        whole.extend(dec.next_piece(spacing, &p.digest).unwrap());
    }
    assert!(whole == data);
    // A piece that does not match its digest is never handed out.
    let mut dec = PieceDecoder::new(&zst[..], 0).unwrap();
    dec.next_piece(spacing, &map.pieces[0].digest).unwrap();
    let err = dec.next_piece(spacing, &map.pieces[0].digest).unwrap_err();
    assert!(matches!(err, Error::PieceDigest { span: 0, piece: 1 }), "{err}");
    // Nor are the bytes of a damaged stream.
    let mut bad = zst.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x55;
    let mut dec = PieceDecoder::new(&bad[..], 0).unwrap();
    let mut failed = false;
    for p in &map.pieces {
        if dec.next_piece(spacing, &p.digest).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed);
}
