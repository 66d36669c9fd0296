//! End-to-end tests of the partner-site client, in one test binary (the tree is linked once):
//! the `fedflow-client` commands on real files, record-level DP against a real coordinator
//! over gRPC, crash included, sites' own protections under site-level DP, and SIGTERM.

mod agent_crash;
mod commands;
mod ledger_backup;
mod record_privacy;
mod signals;
mod site_privacy;
