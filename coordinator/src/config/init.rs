//! `[init]`: where a new run's round-0 model comes from, instead of a fresh initialisation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[init]`: start a new run from a version of another run in the same data directory
/// (`from_run` with `round` or `published = true`) or from an exported model directory
/// (`model_dir`, as `fedflow-coordinator export` writes it). The source's architecture and
/// vocabulary must be the new run's (dropout aside, which changes no parameter): a mismatch
/// is refused naming what differs. Only read when the run is created: a resumed run already
/// has its round 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct InitConfig {
    /// A run in the same data directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_run: Option<String>,
    /// With `from_run`: this committed round of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    /// With `from_run`: its published version.
    pub published: bool,
    /// Or: an exported model directory (relative paths resolve against the configuration
    /// file's directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_dir: Option<PathBuf>,
}

impl InitConfig {
    /// Checks that exactly one source is named, naming the field otherwise.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match (&self.from_run, &self.model_dir) {
            (Some(_), Some(_)) => {
                Err("init.model_dir: give either init.from_run or init.model_dir, not both".into())
            }
            (None, None) => Err("init: name a source, init.from_run or init.model_dir".into()),
            (Some(run), None) => {
                fedflow_common::names::check_name(run)
                    .map_err(|e| format!("init.from_run: {e}"))?;
                match (self.round, self.published) {
                    (Some(_), true) => Err(
                        "init.published: give either init.round or init.published, not both".into(),
                    ),
                    (None, false) => Err(
                        "init.round: with init.from_run, name the version: init.round = N or \
                         init.published = true"
                            .into(),
                    ),
                    _ => Ok(()),
                }
            }
            (None, Some(_)) if self.round.is_some() || self.published => Err(
                "init.round: init.round and init.published go with init.from_run, not \
                 init.model_dir"
                    .into(),
            ),
            (None, Some(_)) => Ok(()),
        }
    }
}
