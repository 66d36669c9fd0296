//! Generates the fedflow.v1 code with tonic-prost-build, using a vendored `protoc` when
//! `PROTOC` is not set, so a fresh clone builds without system packages.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Payload chunks as `bytes::Bytes`: slicing a model into chunks copies nothing.
        .bytes(".fedflow.v1")
        .file_descriptor_set_path(out.join("fedflow_v1_descriptor.bin"))
        .compile_protos(
            &["fedflow/v1/federation.proto", "fedflow/v1/admin.proto"],
            &["."],
        )?;
    Ok(())
}
