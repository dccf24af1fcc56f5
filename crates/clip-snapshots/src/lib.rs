//! containerd's snapshots API (`containerd.services.snapshots.v1`), served
//! over gRPC as a containerd proxy plugin, so that containerd and its CRI
//! plugin start images lazily from clip.
//!
//! An image's layers are *remote* snapshots: when the CRI plugin prepares a
//! layer with `containerd.io/snapshot.ref` and the image's reference and
//! manifest digest (`containerd.io/snapshot/cri.*` labels), the image is
//! readied through [`Images`] (its index stored, published or built) and the
//! layer is committed at once; the answer is `AlreadyExists`, so containerd
//! downloads nothing. clip's index holds the image's merged tree, so one
//! read-only mount serves the whole image: a container's snapshot is
//! kernel overlayfs with that mount as its only lower layer (as nydus does,
//! unlike stargz and SOCI, which mount each layer).
//!
//! Everything else is a plain overlay snapshotter, as containerd's own:
//! images clip cannot serve (no labels, as with `ctr`, or an image it cannot
//! index) are pulled and unpacked by containerd into directories under the
//! root. Metadata is one JSON file under the root, written atomically at
//! each change, so snapshots survive a restart of clipd.
//!
//! The service is generated from containerd's `snapshots.proto` (copied
//! to `proto/`) with the tonic already in the tree for the CRI tests,
//! rather than taken from the `containerd-snapshots` crate: that one is on
//! tonic 0.9 / prost 0.11 (a second gRPC stack to build) and its trait
//! drops the request's metadata, where the containerd namespace travels.

pub mod filter;
mod meta;
mod service;

pub use meta::{Kind, Store};
pub use service::{serve, Images, Snapshotter};

/// Generated from `proto/` (containerd's API, gogoproto options left out).
pub mod proto {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
}

/// The snapshot's target name, set by containerd's unpacker: a remote
/// snapshotter that has the layer commits it under this name.
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const CRI_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
/// Set on the snapshots clip serves: the image they come from.
pub const CLIP_IMAGE: &str = "containerd.io/snapshot/clip.image";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = match &e {
            Error::Io { what, source } => format!("{what}: {source}"),
            other => other.to_string(),
        };
        match e {
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::Io { .. } => tonic::Status::internal(msg),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
