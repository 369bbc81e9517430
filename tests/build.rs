//! Generates the CRI v1 gRPC client (`src/cri.rs`) from `proto/api.proto` (k8s.io/cri-api's, vendored)
//! with tonic-build; prost-build runs `protoc` ($PROTOC, else the one on PATH).
fn main() {
    println!("cargo:rerun-if-changed=proto/api.proto");
    tonic_build::configure()
        .build_server(false)
        .compile_protos(&["proto/api.proto"], &["proto"])
        .expect("generating the CRI client from proto/api.proto (is protoc installed?)");
}
