//! The report's statement about update compression: what the run's `[compression]` does
//! to each guarantee.

use serde::Serialize;

use crate::config::RunConfig;

/// Update compression as the report states it.
#[derive(Debug, Clone, Serialize)]
pub struct CompressionNote {
    /// The compression's canonical name (e.g. `top0.01+int8/256+ef`).
    pub encoding: String,
    /// What it does to each guarantee of the run.
    pub statement: String,
}

/// What the run's `[compression]` does to its guarantees: compression runs at the site
/// after every privacy mechanism (post-processing, Dwork & Roth 2014, Prop. 2.1), and where
/// the coordinator's sum needs a bounded sensitivity it bounds the decoded update.
pub(super) fn note(cfg: &RunConfig) -> Option<CompressionNote> {
    let c = cfg.compression();
    if c.is_none() {
        return None;
    }
    let mut parts = vec![format!(
        "Sites compress every update as {} after everything that makes it private, so what \
         they send is a function of an already private release (post-processing): no ε \
         above changes.",
        c.name()
    )];
    if c.error_feedback {
        parts.push(
            "Error feedback adds to each update what compression dropped from the site's \
             earlier ones: a function of those earlier releases, so again post-processing."
                .into(),
        );
    }
    if let Some(dp) = &cfg.site_dp {
        parts.push(match dp.mode {
            fedflow_common::privacy::dpfedavg::TrustMode::Central => format!(
                "Site level, central mode: the coordinator checks the L2 norm of each decoded \
                 update against the clip (refusing any above it), and the sites keep the \
                 decoded norm within it, so one site moves the sum by at most C = {} as \
                 accounted.",
                dp.clip_norm
            ),
            mode => format!(
                "Site level, {mode} mode: each site compresses after adding its own noise, \
                 and the coordinator checks each decoded update's norm against the bound \
                 for a clipped, noised update."
            ),
        });
    }
    if cfg.site_dp.is_none() && cfg.record_dp.is_none() {
        parts.push("The run has no differential privacy for compression to affect.".into());
    }
    Some(CompressionNote {
        encoding: c.name(),
        statement: parts.join(" "),
    })
}
