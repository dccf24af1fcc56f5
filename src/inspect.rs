//! `clipctl inspect` and `clipctl cat`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clip_format::{IndexFile, Kind, Node};
use clip_fs::ImageView;
use clip_registry::{ImageRef, ImageSource};
use clip_store::{LayerStore, StoreOptions};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct Args {
    /// The .clip index.
    file: PathBuf,
    /// List this path's entries (or the entry itself, if not a directory).
    #[arg(long)]
    ls: Option<String>,
    /// With --ls: list everything below the path.
    #[arg(long, short = 'R', requires = "ls")]
    recursive: bool,
    /// With --ls: read each regular file through the checkpoints (fetching
    /// from the image's source) and print its SHA-256.
    #[arg(long, requires = "ls")]
    hash: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn load(path: &Path) -> Result<IndexFile> {
    IndexFile::load(path).with_context(|| format!("loading {}", path.display()))
}

/// A reader of the image's files through `file`'s checkpoints, fetching
/// from the source the index names; no disk cache, no prefetch.
fn span_reader(file: Arc<IndexFile>) -> Result<Arc<ImageView>> {
    let r = ImageRef::parse(&file.index.image.reference)?;
    let source: Arc<dyn ImageSource> = Arc::from(crate::source::open(&r)?);
    let store = LayerStore::new(StoreOptions {
        mem_bytes: 64 << 20,
        prefetch_workers: 0,
        ..StoreOptions::default()
    })?;
    Ok(ImageView::new(file, store, source)?)
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::CharDev => "char",
        Kind::BlockDev => "block",
        Kind::Fifo => "fifo",
    }
}

fn mode_string(n: &Node) -> String {
    let t = match n.kind {
        Kind::File => '-',
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::CharDev => 'c',
        Kind::BlockDev => 'b',
        Kind::Fifo => 'p',
    };
    let m = n.mode;
    let bit = |mask: u32, c: char| if m & mask != 0 { c } else { '-' };
    let special = |x: u32, s: u32, lower: char, upper: char| match (m & x != 0, m & s != 0) {
        (true, true) => lower,
        (false, true) => upper,
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        t,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        special(0o100, 0o4000, 's', 'S'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        special(0o010, 0o2000, 's', 'S'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        special(0o001, 0o1000, 't', 'T'),
    ]
    .iter()
    .collect()
}

fn major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)
}

fn minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)
}

fn entry_json(path: &[u8], ino: u64, n: &Node, hash: Option<String>) -> Value {
    let mut v = json!({
        "path": String::from_utf8_lossy(path),
        "ino": ino,
        "type": kind_name(n.kind),
        "mode": n.mode,
        "uid": n.uid,
        "gid": n.gid,
        "size": n.size,
        "mtime": n.mtime,
        "mtime_nsec": n.mtime_nsec,
        "nlink": n.nlink,
    });
    if std::str::from_utf8(path).is_err() {
        v["path_hex"] = hex(path).into();
    }
    if n.kind == Kind::Symlink {
        v["target"] = String::from_utf8_lossy(&n.target).into();
        v["target_hex"] = hex(&n.target).into();
    }
    if matches!(n.kind, Kind::CharDev | Kind::BlockDev) {
        v["major"] = major(n.rdev).into();
        v["minor"] = minor(n.rdev).into();
    }
    if !n.xattrs.is_empty() {
        let x: serde_json::Map<String, Value> = n
            .xattrs
            .iter()
            .map(|(k, val)| (String::from_utf8_lossy(k).into_owned(), hex(val).into()))
            .collect();
        v["xattrs_hex"] = x.into();
    }
    if let Some(h) = hash {
        v["sha256"] = h.into();
    }
    v
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

pub fn run(a: Args) -> Result<()> {
    let file = Arc::new(load(&a.file)?);
    let index = &file.index;
    let Some(ls) = &a.ls else {
        return summary(&file, &a.file, a.json);
    };
    let root = index
        .resolve(ls.as_bytes())
        .with_context(|| format!("{ls}: no such file or directory in the image"))?;
    let mut listing: Vec<(Vec<u8>, u64)> = Vec::new();
    let root_node = index.node(root).expect("resolved");
    if root_node.kind == Kind::Dir {
        let mut stack = vec![(ls.as_bytes().to_vec(), root)];
        if a.recursive {
            listing.push((ls.as_bytes().to_vec(), root));
        }
        while let Some((path, ino)) = stack.pop() {
            let n = index.node(ino).expect("valid index");
            for e in n.entries.iter().rev() {
                let p = join(&path, &e.name);
                if a.recursive && index.node(e.ino).is_some_and(|c| c.kind == Kind::Dir) {
                    stack.push((p.clone(), e.ino));
                }
                listing.push((p, e.ino));
            }
        }
        if a.recursive {
            listing.sort();
        } else {
            listing.reverse();
        }
    } else {
        listing.push((ls.as_bytes().to_vec(), root));
    }
    let reader = if a.hash { Some(span_reader(file.clone())?) } else { None };
    let mut hashes: Vec<Option<String>> = vec![None; listing.len()];
    if let Some(reader) = &reader {
        // Read files in stream order so that each span is inflated once.
        let mut order: Vec<usize> = (0..listing.len())
            .filter(|&i| index.node(listing[i].1).is_some_and(|n| n.kind == Kind::File))
            .collect();
        order.sort_by_key(|&i| match &index.node(listing[i].1).expect("valid").data {
            clip_format::Data::Contiguous { layer, offset } => (*layer, *offset),
            clip_format::Data::Sparse { layer, segments } => (*layer, segments.first().map_or(0, |s| s.offset)),
            clip_format::Data::None => (0, 0),
        });
        for i in order {
            let mut h = HashWriter(sha2::Sha256::default());
            reader
                .copy_file(index.node(listing[i].1).expect("valid"), &mut h)
                .with_context(|| format!("reading {}", String::from_utf8_lossy(&listing[i].0)))?;
            hashes[i] = Some(hex(&sha2::Digest::finalize(h.0)));
        }
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        let arr: Vec<Value> = listing
            .iter()
            .zip(hashes)
            .map(|((p, ino), h)| entry_json(p, *ino, index.node(*ino).expect("valid"), h))
            .collect();
        writeln!(out, "{}", Value::Array(arr))?;
    } else {
        for ((p, ino), h) in listing.iter().zip(hashes) {
            let n = index.node(*ino).expect("valid");
            let mut line = format!(
                "{} {:>3} {:>5} {:>5} {:>10} {:>10} {}",
                mode_string(n),
                n.nlink,
                n.uid,
                n.gid,
                n.size,
                n.mtime,
                String::from_utf8_lossy(p)
            );
            if n.kind == Kind::Symlink {
                line += &format!(" -> {}", String::from_utf8_lossy(&n.target));
            }
            if let Some(h) = h {
                line += &format!("  sha256:{h}");
            }
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

/// Where a stored index came from, as clipd recorded it next to it.
fn origin(path: &Path) -> String {
    std::fs::read_to_string(path.with_extension("origin"))
        .unwrap_or_else(|_| "not recorded (not an index from clipd's store)".into())
}

fn summary(file: &IndexFile, path: &Path, as_json: bool) -> Result<()> {
    let index = &file.index;
    let origin = origin(path);
    let count = |k: Kind| index.nodes.iter().filter(|n| n.kind == k).count();
    let layers: Vec<Value> = index
        .layers
        .iter()
        .map(|l| {
            json!({
                "digest": l.digest,
                "media_type": l.media_type,
                "compressed_bytes": l.compressed_size,
                "uncompressed_bytes": l.uncompressed_size,
                "checkpoints": l.checkpoints.len(),
            })
        })
        .collect();
    let config: Value = serde_json::from_slice(&index.image.config).unwrap_or(Value::Null);
    let v = json!({
        "format_version": 1,
        "reference": index.image.reference,
        "manifest_digest": index.image.manifest_digest,
        "manifest_media_type": index.image.manifest_media_type,
        "platform": index.image.platform,
        "config_digest": index.image.config_digest,
        "config": config,
        "layers": layers,
        "inodes": index.nodes.len(),
        "files": count(Kind::File),
        "directories": count(Kind::Dir),
        "symlinks": count(Kind::Symlink),
        "window_bytes": file.windows_len(),
        "origin": origin,
    });
    if as_json {
        println!("{v}");
        return Ok(());
    }
    let human = crate::images::human;
    let c = &config["config"];
    let list = |v: &Value| match v.as_array() {
        Some(a) if !a.is_empty() => serde_json::to_string(a).unwrap_or_default(),
        _ => "-".to_string(),
    };
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).unwrap_or("-").to_string();
    let size: u64 = index.layers.iter().map(|l| l.uncompressed_size).sum();
    let compressed: u64 = index.layers.iter().map(|l| l.compressed_size).sum();
    println!("image:       {}", index.image.reference);
    println!(
        "manifest:    {} ({})",
        index.image.manifest_digest, index.image.manifest_media_type
    );
    println!("platform:    {}", index.image.platform);
    println!("created:     {}", text(&config["created"]));
    println!("entrypoint:  {}", list(&c["Entrypoint"]));
    println!("cmd:         {}", list(&c["Cmd"]));
    println!("user:        {}", text(&c["User"]));
    println!("workdir:     {}", text(&c["WorkingDir"]));
    println!("size:        {} ({} compressed)", human(size), human(compressed));
    println!("config:      {}", index.image.config_digest);
    println!("origin:      {origin}");
    println!(
        "tree:        {} inodes: {} files, {} directories, {} symlinks",
        index.nodes.len(),
        count(Kind::File),
        count(Kind::Dir),
        count(Kind::Symlink)
    );
    println!();
    println!(
        "{:<21} {:>10} {:>10} {:>11}  MEDIA TYPE",
        "LAYER", "COMPRESSED", "SIZE", "CHECKPOINTS"
    );
    for l in &index.layers {
        let hex = l.digest.trim_start_matches("sha256:");
        println!(
            "sha256:{:<14} {:>10} {:>10} {:>11}  {}",
            &hex[..hex.len().min(12)],
            human(l.compressed_size),
            human(l.uncompressed_size),
            l.checkpoints.len(),
            l.media_type
        );
    }
    Ok(())
}

pub fn cat(index_path: &Path, path: &str) -> Result<()> {
    let file = load(index_path)?;
    let ino = file
        .index
        .resolve_follow(path.as_bytes())
        .with_context(|| format!("{path}: not in the image"))?;
    let node = file.index.node(ino).expect("resolved");
    if node.kind != Kind::File {
        bail!("{path}: not a regular file");
    }
    let node = node.clone();
    let reader = span_reader(Arc::new(file))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    reader.copy_file(&node, &mut out)?;
    out.flush()?;
    Ok(())
}

struct HashWriter(sha2::Sha256);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(&mut self.0, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
