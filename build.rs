//! Generates the v2 gRPC service (proto/grpc_predict_v2.proto) into OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/grpc_predict_v2.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        // `bytes` fields as `Bytes`: raw tensor contents are sliced, not copied.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
