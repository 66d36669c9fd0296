//! fedflow's end-to-end tests across crates, in one test binary: linking the whole tree once
//! instead of once per file keeps a cold `.ci/run` within its time budget.
//!
//! Run one group with e.g. `cargo test -p fedflow-tests --test e2e python_interop`.

mod agent;
mod claims;
mod compression;
mod ctl;
mod deploy;
mod enrolment;
mod enrolment_online;
mod federation;
mod growing;
mod grpc_failures;
mod malicious;
mod netns;
mod protocol;
mod python_interop;
mod registry;
mod reload;
mod rollover;
mod safe_text;
mod security;
mod sequence_model_quality;
