//! `fedflow-proto`: the one crate that knows fedflow's wire protocol.
//!
//! - [`v1`]: code generated from `proto/fedflow/v1/*.proto` (messages, clients, servers).
//! - [`codec`]: the servers' codec (an undecodable request is `INVALID_ARGUMENT`).
//! - [`transfer`]: chunked transfers of models and updates, with size limits and SHA-256
//!   verification on the receiving side.
//! - [`pushback`]: how a refusal for calling too fast says when to call again.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//!
//! Other crates convert between these wire types and their own at the boundary; nothing
//! outside the coordinator's and client's gRPC layers should touch [`v1`] types.

pub mod codec;
pub mod compat;
pub mod pushback;
pub mod tls;
pub mod transfer;

/// Generated fedflow.v1 protocol code.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]
pub mod v1 {
    tonic::include_proto!("fedflow.v1");
    // The servers, generated apart with `codec::ServerCodec` (see build.rs).
    include!(concat!(env!("OUT_DIR"), "/server/fedflow.v1.rs"));
}

/// Encoded `FileDescriptorSet` of fedflow.v1, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fedflow_v1_descriptor");
