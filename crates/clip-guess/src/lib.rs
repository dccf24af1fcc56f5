//! A start guessed from the image alone, for the first start of an image
//! that has no recorded profile.
//!
//! A start without a profile is a chain of misses: the loader reads an
//! object's headers before it knows the next library, Python reads a
//! module before it knows the next import. Read-ahead at run time learns
//! each link only when the process does. But every link is written in the
//! image: `DT_NEEDED` and the loader's tables in each ELF object, the
//! `import` statements in each Python source, module names in the string
//! constants of each extension module. The indexer reads every byte of
//! every layer once anyway, so it keeps these facts ([`Hints`], next to the
//! index), and a fresh mount walks them from the container's command
//! ([`guess`]), the way the loader and the interpreter will, to fetch the
//! whole chain at once, in the order it will be read.
//!
//! A wrong guess costs a fetch or a miss, never a wrong byte: the guess
//! only names byte ranges of the image to prefetch.

mod elf;
mod guess;
mod python;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use elf::{ElfFact, ElfProbe};
pub use guess::{guess, Process, Read};
pub use python::{imports, Import};

/// Bumped when the hints file changes incompatibly.
pub const VERSION: u32 = 1;

/// The largest Python source read for its imports.
const MAX_SOURCE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading hints: {0}")]
    Decode(#[from] postcard::Error),
    #[error("hints version {0}, this build reads {VERSION}")]
    Version(u32),
}

/// What one file says about what runs after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fact {
    /// A Python source (or script): the modules it imports, and its `#!`
    /// line's interpreter if it has one.
    Python {
        shebang: Option<String>,
        imports: Vec<Import>,
    },
    /// A compiled module's header: the source mtime and size it was built
    /// from (Python reads the source too when they differ).
    Pyc {
        mtime: u32,
        size: u32,
    },
    Elf(ElfFact),
}

/// The facts of an image's files, by where each file's bytes start:
/// (layer, offset in the layer's uncompressed stream). That place is the
/// same in every index of the image, whatever its inode numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hints {
    pub version: u32,
    /// The image manifest the hints were learnt from.
    pub manifest_digest: String,
    pub files: BTreeMap<(u32, u64), Fact>,
}

impl Hints {
    pub fn new() -> Self {
        Self {
            version: VERSION,
            manifest_digest: String::new(),
            files: BTreeMap::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let h: Hints = postcard::from_bytes(bytes)?;
        if h.version != VERSION {
            return Err(Error::Version(h.version));
        }
        Ok(h)
    }

    /// Keeps, of the names extension modules hold, those whose first part
    /// names a module somewhere in the image (a `X.py`, a package `X`, an
    /// extension `X.….so`): most strings of a module are not module names.
    pub fn prune_names(&mut self, index: &clip_format::Index) {
        let mut modules: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
        for n in &index.nodes {
            for e in &n.entries {
                let name = e.name.as_slice();
                if let Some(stem) = name.strip_suffix(b".py") {
                    modules.insert(stem);
                } else if name.ends_with(b".so") {
                    modules.insert(name.split(|&b| b == b'.').next().unwrap_or(name));
                } else if index
                    .node(e.ino)
                    .is_some_and(|d| d.entries.iter().any(|x| x.name == b"__init__.py"))
                {
                    modules.insert(name);
                }
            }
        }
        for f in self.files.values_mut() {
            if let Fact::Elf(e) = f {
                e.names
                    .retain(|s| modules.contains(s.split('.').next().unwrap_or(s).as_bytes()));
            }
        }
    }

    /// Adds one layer's facts.
    pub fn extend(&mut self, layer: u32, facts: Vec<(u64, Fact)>) {
        self.files.extend(facts.into_iter().map(|(o, f)| ((layer, o), f)));
    }
}

/// Whether `s` reads as a dotted module name.
pub(crate) fn is_module_name(s: &[u8]) -> bool {
    !s.is_empty()
        && s.split(|&b| b == b'.').all(|p| {
            p.first().is_some_and(|&f| f.is_ascii_alphabetic() || f == b'_')
                && p.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// Watches one file's bytes as the indexer streams them past.
#[derive(Debug)]
pub enum Probe {
    Source { buf: Vec<u8> },
    Pyc { buf: Vec<u8> },
    Other { elf: Box<ElfProbe>, start: Vec<u8> },
}

impl Probe {
    /// A probe for a regular file at `path` (as stored in the tar) of
    /// `size` bytes, or None when no fact can come from it.
    pub fn for_file(path: &[u8], size: u64) -> Option<Self> {
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        if name.ends_with(b".py") {
            return (size <= MAX_SOURCE).then(|| Probe::Source { buf: Vec::new() });
        }
        if name.ends_with(b".pyc") {
            return (size >= 16).then(|| Probe::Pyc { buf: Vec::new() });
        }
        if size < 64 {
            return None;
        }
        // Scripts (`#!…python…`) and ELF objects are told by their first
        // bytes.
        let ext_module = name.ends_with(b".so") && (contains(name, b".cpython-") || contains(name, b".abi3."));
        Some(Probe::Other {
            elf: Box::new(ElfProbe::new(size, ext_module)),
            start: Vec::new(),
        })
    }

    /// Whether later bytes can still matter.
    pub fn wants_more(&self) -> bool {
        match self {
            Probe::Source { .. } => true,
            Probe::Pyc { buf } => buf.len() < 16,
            Probe::Other { elf, start } => !elf.is_dead() || (start.len() < 2 || start.starts_with(b"#!")),
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            Probe::Source { buf } => buf.extend_from_slice(chunk),
            Probe::Pyc { buf } => buf.extend_from_slice(&chunk[..chunk.len().min(16 - buf.len().min(16))]),
            Probe::Other { elf, start } => {
                if (start.len() < 2 || start.starts_with(b"#!")) && (start.len() as u64) < MAX_SOURCE {
                    start.extend_from_slice(&chunk[..chunk.len().min(MAX_SOURCE as usize - start.len())]);
                }
                elf.feed(chunk);
            }
        }
    }

    pub fn finish(self) -> Option<Fact> {
        match self {
            Probe::Source { buf } => Some(Fact::Python {
                shebang: shebang(&buf),
                imports: imports(&buf),
            }),
            Probe::Pyc { buf } => {
                let word = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap_or_default());
                // Flags 0: checked by mtime and size (not by hash).
                (buf.len() >= 16 && word(4) == 0).then(|| Fact::Pyc {
                    mtime: word(8),
                    size: word(12),
                })
            }
            Probe::Other { elf, start } => {
                if let Some(f) = elf.finish() {
                    return Some(Fact::Elf(f));
                }
                let interp = shebang(&start)?;
                interp.contains("python").then(|| Fact::Python {
                    shebang: Some(interp),
                    imports: imports(&start),
                })
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The interpreter of a `#!` line, with its one argument (`/usr/bin/env
/// python3` gives `python3`).
fn shebang(src: &[u8]) -> Option<String> {
    let line = src.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n')?];
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let first = words.next()?;
    if first.ends_with("/env") {
        words.find(|w| !w.starts_with('-')).map(str::to_string)
    } else {
        Some(first.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(path: &str, bytes: &[u8]) -> Option<Fact> {
        let mut p = Probe::for_file(path.as_bytes(), bytes.len() as u64)?;
        for c in bytes.chunks(5) {
            if !p.wants_more() {
                break;
            }
            p.feed(c);
        }
        p.finish()
    }

    #[test]
    fn facts_by_kind() {
        assert_eq!(
            run("a/m.py", b"import os\n"),
            Some(Fact::Python {
                shebang: None,
                imports: vec![Import {
                    level: 0,
                    module: "os".into(),
                    names: vec![]
                }]
            })
        );
        let mut pyc = vec![0xa7, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0];
        pyc.extend_from_slice(&1234u32.to_le_bytes());
        pyc.extend_from_slice(&99u32.to_le_bytes());
        pyc.extend_from_slice(b"code");
        assert_eq!(
            run("__pycache__/m.cpython-311.pyc", &pyc),
            Some(Fact::Pyc { mtime: 1234, size: 99 })
        );
        pyc[4] = 1; // checked by hash
        assert_eq!(run("__pycache__/m.cpython-311.pyc", &pyc), None);
        let script = format!("#!/usr/bin/env python3\nimport json\n{}\n", "#".repeat(64));
        match run("usr/bin/tool", script.as_bytes()) {
            Some(Fact::Python { shebang, imports }) => {
                assert_eq!(shebang.as_deref(), Some("python3"));
                assert_eq!(imports[0].module, "json");
            }
            other => panic!("{other:?}"),
        }
        let sh = format!("#!/bin/sh\necho {}\n", "x".repeat(64));
        assert_eq!(run("usr/bin/tool", sh.as_bytes()), None);
        assert_eq!(run("usr/share/doc/x.txt", &[b'x'; 100]), None);
    }

    #[test]
    fn hints_round_trip_and_reject_garbage() {
        let mut h = Hints::new();
        h.extend(3, vec![(512, Fact::Pyc { mtime: 1, size: 2 })]);
        assert_eq!(Hints::decode(&h.encode()).unwrap(), h);
        assert!(Hints::decode(b"\xff\xff\xff").is_err());
        let mut old = h.clone();
        old.version = 0;
        assert!(matches!(Hints::decode(&old.encode()), Err(Error::Version(0))));
    }
}
