//! End-to-end tests of the partner-site client, in one test binary (the tree is linked once):
//! the `fedflow-client` commands on real files, and record-level DP against a real
//! coordinator over gRPC, crash included.

mod commands;
mod record_privacy;
