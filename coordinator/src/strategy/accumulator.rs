//! The round's accumulator: FedAvg's streaming weighted sum, or a robust rule's kept
//! updates (`[aggregation]`). Both validate an update completely before keeping anything.

use std::path::Path;

use fedflow_common::compress::Compression;
use fedflow_common::fedavg::{Added, FedAvgAccumulator, NormBound};
use fedflow_common::params::{ParamSet, ParamSpec};
use fedflow_common::robust::{RobustAccumulator, RobustRule};

use crate::Result;
use crate::config::{AggregationRule, AggregationSection};

/// The folder of a data directory where a robust rule keeps the round's updates until it
/// closes (emptied when the engine opens: what is there belongs to a round that will be
/// run again).
pub(crate) const AGGREGATION_DIR: &str = "aggregation";

/// The open round's updates, as the configured rule needs them.
#[derive(Debug)]
pub enum RoundAccumulator {
    /// Weighted mean, streamed.
    Mean(FedAvgAccumulator),
    /// Coordinate-wise median or trimmed mean over updates kept on disk.
    Robust(RobustAccumulator),
}

impl RoundAccumulator {
    /// The accumulator `[aggregation]` asks for (the mean unless a robust rule is set), every
    /// update's norm within `bound`.
    pub(crate) fn new(
        spec: &ParamSpec,
        cfg: &AggregationSection,
        dir: &Path,
        bound: NormBound,
    ) -> Result<Self> {
        let rule = match cfg.rule {
            AggregationRule::Mean => {
                return Ok(Self::Mean(
                    FedAvgAccumulator::new(spec)?.with_norm_bound(bound),
                ));
            }
            AggregationRule::Median => RobustRule::Median,
            AggregationRule::TrimmedMean => RobustRule::TrimmedMean {
                trim_fraction: cfg.trim_fraction,
            },
        };
        Ok(Self::Robust(
            RobustAccumulator::new(spec, rule, &dir.join(AGGREGATION_DIR))?.with_norm_bound(bound),
        ))
    }

    /// The same accumulator taking updates compressed as `compression` says (decoded block
    /// by block; the bound applies to the decoded update).
    pub(crate) fn with_compression(self, compression: Compression) -> Result<Self> {
        if compression.is_none() {
            return Ok(self);
        }
        Ok(match self {
            Self::Mean(a) => Self::Mean(a.with_compression(compression)?),
            Self::Robust(a) => Self::Robust(a.with_compression(compression)?),
        })
    }

    /// Validates `delta` and folds it in with `weight` (see the accumulators for the checks).
    pub(crate) fn add(&mut self, delta: &ParamSet, weight: f64) -> Result<Added> {
        Ok(match self {
            Self::Mean(a) => a.add(delta, weight)?,
            Self::Robust(a) => a.add(delta, weight)?,
        })
    }

    /// [`RoundAccumulator::add`] of a safetensors file, streamed.
    pub(crate) fn add_safetensors_file(&mut self, path: &Path, weight: f64) -> Result<Added> {
        Ok(match self {
            Self::Mean(a) => a.add_safetensors_file(path, weight)?,
            Self::Robust(a) => a.add_safetensors_file(path, weight)?,
        })
    }

    /// The largest L2 norm the aggregate of the updates added so far can have, given the
    /// bound B on each (none without one). The weighted mean is a convex combination of
    /// the k updates, so ‖Δ‖ ≤ B. The coordinate-wise median and trimmed mean take, per
    /// coordinate j, a value within the range of the k values, so |Δⱼ| ≤ maxᵢ |xᵢⱼ| and
    /// ‖Δ‖² ≤ Σⱼ maxᵢ xᵢⱼ² ≤ Σᵢ ‖xᵢ‖² ≤ k·B²: ‖Δ‖ ≤ √k·B.
    pub fn aggregate_bound(&self) -> Option<f64> {
        match self {
            Self::Mean(a) => a.norm_bound().map(|b| b.limit()),
            Self::Robust(a) => a
                .norm_bound()
                .map(|b| (a.count() as f64).sqrt() * b.limit()),
        }
    }

    /// How many updates were accepted.
    pub(crate) fn count(&self) -> usize {
        match self {
            Self::Mean(a) => a.count(),
            Self::Robust(a) => a.count(),
        }
    }

    /// The aggregated delta.
    pub(crate) fn finish(self) -> Result<ParamSet> {
        Ok(match self {
            Self::Mean(a) => a.finish()?,
            Self::Robust(a) => a.finish()?,
        })
    }
}

/// Empties (or creates) the robust rules' spill folder in `dir`.
pub(crate) fn reset_aggregation_dir(dir: &Path) -> Result<()> {
    let path = dir.join(AGGREGATION_DIR);
    match std::fs::remove_dir_all(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::Error::io(path, e)),
    }
}
