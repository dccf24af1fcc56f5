//! Integration tests: the real clipctl binary against a real registry,
//! real images and their real `umoci unpack`.

mod cli;
mod containerd;
mod daemon;
mod harness;
mod index;
mod metrics;
mod mount;
mod profile;
mod proxy;
mod published;
mod run;
mod security;
mod semantics;
mod tree;
