//! Helpers shared by fedflow's end-to-end tests (the `e2e` test binary of this crate and the
//! client's `cli_e2e`): a real coordinator on 127.0.0.1:0 ([`coordinator`]), a federation PKI
//! with every identity the tests use ([`pki`]), a hand-made site speaking the `Federation`
//! protocol call by call ([`site`]), the workspace's binaries ([`bin`]), files on disk
//! ([`files`]), an HTTP client
//! ([`http`]), and network hosts made of namespaces with a proxy that spoils a path
//! ([`netns`]).
//!
//! Waits here are on observable state (gRPC health, the coordinator's answers), bounded, and
//! panic saying what never happened; none is a sleep standing in for synchronisation.

pub mod bin;
pub mod coordinator;
pub mod files;
pub mod http;
pub mod netns;
pub mod pki;
pub mod site;

pub use coordinator::{TestCoordinator, wait_serving};
pub use pki::Pki;
