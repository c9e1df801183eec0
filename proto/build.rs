//! Compiles the control-plane API with tonic/prost. Needs `protoc` (Debian: protobuf-compiler,
//! installed by `make deps`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "ferrule/v1/endpoint.proto",
        "ferrule/v1/registry.proto",
        "ferrule/v1/discovery.proto",
        "ferrule/v1/config.proto",
        "ferrule/v1/identity.proto",
        "ferrule/v1/admin.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure().compile_protos(&files, &["."])?;
    Ok(())
}
