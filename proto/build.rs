//! Generates the fedflow.v1 code with tonic-prost-build, using a vendored `protoc` when
//! `PROTOC` is not set, so a fresh clone builds without system packages.
//!
//! Two passes over the same files: the messages and the clients (prost's codec), then the
//! servers alone (`OUT_DIR/server/`, with the messages taken from the first pass), with
//! `codec::ServerCodec`, which answers an undecodable request with `INVALID_ARGUMENT`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let protos = [
        "fedflow/v1/federation.proto",
        "fedflow/v1/admin.proto",
        "fedflow/v1/enrolment.proto",
    ];
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Payload chunks as `bytes::Bytes`: slicing a model into chunks copies nothing.
        .bytes(".fedflow.v1")
        .build_server(false)
        .file_descriptor_set_path(out.join("fedflow_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    let servers = out.join("server");
    std::fs::create_dir_all(&servers)?;
    tonic_prost_build::configure()
        .build_client(false)
        // The messages are the first pass's (`crate::v1`): only the servers are generated.
        .extern_path(".fedflow.v1", "crate::v1")
        .codec_path("crate::codec::ServerCodec")
        .out_dir(&servers)
        .compile_protos(&protos, &["."])?;
    Ok(())
}
