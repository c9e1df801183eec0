//! Compiles the sample shop's service protos with tonic/prost. Needs `protoc` (Debian:
//! protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["user.proto", "payment.proto", "order.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure().compile_protos(&files, &["."])?;
    Ok(())
}
