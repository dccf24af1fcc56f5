//! clip's lazy, read-only FUSE filesystem over a `.clip` index.
//!
//! * [`reader::SpanReader`] turns "bytes of this file" into spans of a
//!   layer: memory cache, persistent [`cache::DiskCache`], single-flight
//!   range fetches, digest checks, inflation from checkpoints, read-ahead.
//! * [`fs::ClipFs`] is the `fuser` filesystem on top.

pub mod cache;
pub mod fs;
pub mod mounts;
pub mod reader;
pub mod serve;

pub use cache::DiskCache;
pub use fs::ClipFs;
pub use reader::{ReadError, ReaderOptions, SpanReader};
