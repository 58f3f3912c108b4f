//! Generates the bodies of the binary WebSocket frames from
//! `proto/barrage/v1/frames.proto` with protox (pure Rust, no system protoc).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not when it is compiled: a target dir
    // shared by several checkouts reuses one compiled script for all.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = "barrage/v1/frames.proto";
    println!("cargo:rerun-if-changed={}", root.join(file).display());
    let fds = protox::compile([file], [&root])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
