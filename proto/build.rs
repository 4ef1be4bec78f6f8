//! Compiles `proto/**/*.proto` into Rust at build time: protox parses the files
//! (pure Rust, no system `protoc`), tonic-prost-build generates prost messages
//! plus tonic clients and servers into `OUT_DIR`, one file per protobuf package.

use std::error::Error;
use std::path::PathBuf;

/// Every file to compile, relative to `proto/`. Imports are resolved from the
/// same root; `google/protobuf/*` comes bundled with protox.
const PROTOS: &[&str] = &[
    "google/rpc/status.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "envoy/service/discovery/v3/ads.proto",
    "ambit/workload/v1/workload.proto",
    "ambit/security/v1/authorization.proto",
    "ambit/waypoint/v1/l7.proto",
    "ambit/ca/v1/ca.proto",
    "ambit/zds/v1/zds.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let mut compiler = protox::Compiler::new([&root])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(&files)?;

    // Kept as bytes for `ambit_proto::FILE_DESCRIPTOR_SET` (gRPC reflection, and
    // tests that check hand-written names against the compiled schema).
    std::fs::write(
        out_dir.join("file_descriptor_set.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let descriptors = compiler.file_descriptor_set();

    // Well-known types (Struct, Duration) map to `prost_types`; `Any` maps to
    // this crate's own, whose value is `Bytes`: a resource body goes into every
    // client's response without a copy.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".google.protobuf.Any", "crate::Any")
        .compile_fds(descriptors)?;
    Ok(())
}
