//! clip's lazy, read-only FUSE filesystem over a `.clip` index.
//!
//! * [`view::ImageView`] turns "bytes of this file" into ranges of layers,
//!   read through the host's `clip_store::LayerStore`.
//! * [`fs::ClipFs`] is the `fuser` filesystem on top; [`session`] serves a
//!   FUSE connection with it, fresh or taken over from an earlier server;
//!   [`push`] hands a profile's recorded reads to the kernel's page cache.

pub mod fs;
pub mod push;
pub mod session;
pub mod view;

pub use fs::ClipFs;
pub use session::{notify_resend, serve_fd, Served};
pub use view::{CopyError, FirstRead, FirstReadIs, ImageView};
