//! `[compression]`: how sites compress their updates (`fedflow_common::compress`).

use fedflow_common::compress::{Compression, DEFAULT_BLOCK, ValueCodec};
use fedflow_common::privacy::dpfedavg::TrustMode;
use serde::{Deserialize, Serialize};

use super::{AggregationRule, AggregationSection, SiteDpSection};

/// `[compression]`: how every site compresses the update it sends. Absent (default): plain
/// f32 updates. The coordinator refuses an update in any other form.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionSection {
    /// `"f32"` (no quantisation), `"f16"`, `"bf16"` or `"int8"` (blockwise: one f32 scale
    /// per `block_size` values). Default `"f32"`.
    pub values: ValueCodec,
    /// Values per int8 scale. Default 256.
    pub block_size: usize,
    /// Top-k sparsification: the fraction of each tensor's values (largest magnitudes
    /// first) a site sends, in (0, 1]; absent (default) sends every value.
    pub top_k: Option<f64>,
    /// Each site keeps what compression dropped and adds it to its next update (error
    /// feedback; kept in the site's `--state-dir` across restarts). Default false.
    pub error_feedback: bool,
}

impl Default for CompressionSection {
    fn default() -> Self {
        CompressionSection {
            values: ValueCodec::F32,
            block_size: DEFAULT_BLOCK,
            top_k: None,
            error_feedback: false,
        }
    }
}

impl CompressionSection {
    /// The compression sites apply.
    pub fn compression(&self) -> Compression {
        Compression {
            values: self.values,
            block_size: self.block_size,
            top_k: self.top_k,
            error_feedback: self.error_feedback,
        }
    }

    /// Checks the section alone and with the rest of the run.
    pub(super) fn validate(
        &self,
        site_dp: Option<&SiteDpSection>,
        aggregation: &AggregationSection,
    ) -> std::result::Result<(), String> {
        let c = self.compression();
        c.check().map_err(|e| match e {
            fedflow_common::Error::Config(m) => m,
            e => e.to_string(),
        })?;
        if !c.is_lossy() {
            return Ok(());
        }
        if let Some(dp) = site_dp
            && dp.mode == TrustMode::Distributed
        {
            return Err(format!(
                "[compression] ({}) cannot be combined with site_dp.mode = \"distributed\": \
                 the guarantee downstream rests on the sum of the sites' Gaussian noise \
                 shares, and a sum of separately quantised noisy updates is not that sum; use \
                 mode \"central\" or \"local\" (where compression after the noise is \
                 post-processing) or remove [compression]",
                c.name()
            ));
        }
        if c.top_k.is_some() && aggregation.rule != AggregationRule::Mean {
            return Err(format!(
                "compression.top_k cannot be combined with aggregation.rule = {:?}: sites \
                 send different coordinates, so the coordinate-wise rule would see mostly \
                 zeros and keep the model almost still; use a dense codec (values = \"f16\", \
                 \"bf16\" or \"int8\" without top_k) with a robust rule",
                aggregation.rule
            ));
        }
        Ok(())
    }
}
