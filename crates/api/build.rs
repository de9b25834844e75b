//! Generates the gRPC code from ../../proto with the protoc binary that protoc-bin-vendored ships,
//! so that no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked in with env!(): clones in different folders that share one
    // target dir (CI keeps its own outside the clone) reuse this script's binary, and a baked-in
    // path would point at the clone that compiled it, which may be gone.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let protos = [
        "berth/v1/kv.proto",
        "berth/v1/cluster.proto",
        "berth/v1/raft.proto",
        "berth/v1/agent.proto",
        "berth/v1/nodes.proto",
        "berth/v1/control.proto",
        "berth/v1/access.proto",
    ]
    .map(|p| proto_root.join(p));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().file_descriptor_set_path(out_dir.join("berth_descriptor.bin")).compile_with_config(
        config,
        &protos,
        std::slice::from_ref(&proto_root),
    )?;
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    Ok(())
}
