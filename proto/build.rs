//! Compiles `quiver/v1/*.proto` without a system `protoc`: protox parses them into a file
//! descriptor set (kept for gRPC reflection), tonic-prost-build generates the code.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "quiver/v1/types.proto",
        "quiver/v1/registry.proto",
        "quiver/v1/feature_service.proto",
        "quiver/v1/replication.proto",
        "quiver/v1/admin.proto",
        "quiver/v1/monitor.proto",
        "quiver/v1/flight.proto",
        "quiver/v1/cluster.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("quiver_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // Malformed requests are INVALID_ARGUMENT, not tonic's INTERNAL (see `src/codec.rs`).
    tonic_prost_build::configure()
        .codec_path("crate::codec::QuiverCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
