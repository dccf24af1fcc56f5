//! `clipd`, clip's node service: see the `clipd` crate.

fn main() {
    clipd::main();
}
