//! Subcommands of the `fedflow-coordinator` binary that need more than a few lines.
pub(crate) mod security;
