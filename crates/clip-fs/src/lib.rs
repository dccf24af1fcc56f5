//! clip's lazy, read-only FUSE filesystem over a `.clip` index.
//!
//! * [`view::ImageView`] turns "bytes of this file" into ranges of layers,
//!   read through the host's `clip_store::LayerStore`.
//! * [`fs::ClipFs`] is the `fuser` filesystem on top.

pub mod fs;
pub mod mounts;
pub mod serve;
pub mod view;

pub use fs::ClipFs;
pub use view::ImageView;
