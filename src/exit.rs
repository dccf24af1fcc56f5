//! Exit codes, as docker's: the container's own code; 125 when clipctl
//! itself fails; 126 when the command cannot be run; 127 when it is not
//! found.

/// clipctl (not the container) failed.
pub const CLIP_FAILED: i32 = 125;
/// The container's command exists but cannot be run.
pub const CANNOT_RUN: i32 = 126;
/// The container's command is not there.
pub const NOT_FOUND: i32 = 127;

/// An error that ends clipctl with a code of its own.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: String) -> Failure {
        Failure { code, message }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The exit code for an error of a command that runs containers.
pub fn code_of(e: &anyhow::Error) -> i32 {
    e.chain()
        .find_map(|c| c.downcast_ref::<Failure>())
        .map_or(CLIP_FAILED, |f| f.code)
}
