fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The client is for tests (a containerd stand-in).
    tonic_prost_build::configure().compile_protos(&["proto/snapshots.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
