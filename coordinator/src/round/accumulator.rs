//! The round's accumulator: FedAvg's streaming weighted sum, or a robust rule's kept
//! updates (`[aggregation]`). Both validate an update completely before keeping anything.

use std::path::Path;

use fedflow_common::fedavg::FedAvgAccumulator;
use fedflow_common::params::{ParamSet, ParamSpec};
use fedflow_common::robust::{RobustAccumulator, RobustRule};

use crate::Result;
use crate::config::{AggregationRule, AggregationSection};

/// The folder of a data directory where a robust rule keeps the round's updates until it
/// closes (emptied when the engine opens: what is there belongs to a round that will be
/// run again).
pub(super) const AGGREGATION_DIR: &str = "aggregation";

/// The open round's updates, as the configured rule needs them.
#[derive(Debug)]
pub(super) enum RoundAccumulator {
    /// Weighted mean, streamed.
    Mean(FedAvgAccumulator),
    /// Coordinate-wise median or trimmed mean over updates kept on disk.
    Robust(RobustAccumulator),
}

impl RoundAccumulator {
    /// The accumulator `[aggregation]` asks for (the mean unless a robust rule is set).
    pub(super) fn new(spec: &ParamSpec, cfg: &AggregationSection, dir: &Path) -> Result<Self> {
        let rule = match cfg.rule {
            AggregationRule::Mean => return Ok(Self::Mean(FedAvgAccumulator::new(spec)?)),
            AggregationRule::Median => RobustRule::Median,
            AggregationRule::TrimmedMean => RobustRule::TrimmedMean {
                trim_fraction: cfg.trim_fraction,
            },
        };
        Ok(Self::Robust(RobustAccumulator::new(
            spec,
            rule,
            &dir.join(AGGREGATION_DIR),
        )?))
    }

    pub(super) fn add(&mut self, delta: &ParamSet, weight: f64) -> Result<()> {
        match self {
            Self::Mean(a) => a.add(delta, weight)?,
            Self::Robust(a) => a.add(delta, weight)?,
        }
        Ok(())
    }

    pub(super) fn add_safetensors_file(&mut self, path: &Path, weight: f64) -> Result<()> {
        match self {
            Self::Mean(a) => a.add_safetensors_file(path, weight)?,
            Self::Robust(a) => a.add_safetensors_file(path, weight)?,
        }
        Ok(())
    }

    pub(super) fn count(&self) -> usize {
        match self {
            Self::Mean(a) => a.count(),
            Self::Robust(a) => a.count(),
        }
    }

    /// The aggregated delta.
    pub(super) fn finish(self) -> Result<ParamSet> {
        Ok(match self {
            Self::Mean(a) => a.finish()?,
            Self::Robust(a) => a.finish()?,
        })
    }
}

/// Empties (or creates) the robust rules' spill folder in `dir`.
pub(super) fn reset_aggregation_dir(dir: &Path) -> Result<()> {
    let path = dir.join(AGGREGATION_DIR);
    match std::fs::remove_dir_all(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::Error::io(path, e)),
    }
}
