//! What leaves the site for a training task: the one way out for an update
//! ([`SiteTrainer::release`]): site-level DP, then compression with error feedback.

use fedflow_common::compress;
use fedflow_common::params::ParamSet;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::{SiteTrainer, TaskSpec, sha256_hex};
use crate::Result;
use fedflow_common::privacy::dpfedavg::privatize;

/// An update ready to leave the site.
#[derive(Debug)]
pub(crate) struct Release {
    /// The update as the coordinator will decode it.
    pub(crate) delta: ParamSet,
    /// What goes on the wire.
    pub(crate) bytes: Vec<u8>,
    /// Their SHA-256 (hex).
    pub(crate) sha256: String,
    /// Site-level DP: the delta was within the clip before clipping.
    pub(crate) unclipped: bool,
}

impl SiteTrainer {
    /// What leaves the site for `task` given its `delta = local - global`: made private
    /// ([`site_release`]), then compressed as the task says, the decoded update's norm kept
    /// within what the coordinator accepts under site-level DP, with error feedback's
    /// residual added first and the new one recorded (before anything is sent).
    pub(crate) fn release(&self, task: &TaskSpec, delta: ParamSet) -> Result<Release> {
        let (private, unclipped) = site_release(task, delta)?;
        let c = &task.compression;
        if c.is_none() {
            let bytes = private.to_safetensors_bytes()?;
            return Ok(Release {
                sha256: sha256_hex(&bytes),
                bytes,
                delta: private,
                unclipped,
            });
        }
        let spec = private.spec();
        let max_norm = task.site_dp.map(|dp| dp.accepted_norm(spec.num_elements()));
        let residual = if c.error_feedback {
            self.feedback.residual(task, &spec)
        } else {
            None
        };
        let input = match &residual {
            Some(r) => ParamSet::apply_delta(&private, r, 1.0)?,
            None => private,
        };
        let enc = compress::encode(&input, c, max_norm)?;
        if c.error_feedback {
            self.feedback.record(task, residual, enc.residual()?)?;
        }
        tracing::info!(
            round = task.round,
            "update compressed as {}: {} bytes ({:.1}x smaller than f32)",
            c.name(),
            enc.bytes.len(),
            4.0 * spec.num_elements() as f64 / enc.bytes.len() as f64
        );
        Ok(Release {
            sha256: sha256_hex(&enc.bytes),
            bytes: enc.bytes,
            delta: enc.decoded,
            unclipped,
        })
    }
}

/// What leaves the site: `delta` checked finite and, under site-level DP, clipped to the
/// task's L2 bound with the task's noise added (drawn from a ChaCha20 CSPRNG seeded from the
/// operating system). Returns it with the adaptive-clipping bit (the delta's norm was within
/// the clip).
fn site_release(task: &TaskSpec, delta: ParamSet) -> Result<(ParamSet, bool)> {
    delta.check_finite()?;
    let Some(dp) = &task.site_dp else {
        return Ok((delta, true));
    };
    let mut rng = ChaCha20Rng::from_os_rng();
    let out = privatize(&delta, dp.clip_norm, dp.noise_std, &mut rng)?;
    tracing::info!(
        round = task.round,
        "site-level DP ({}): delta clipped to L2 norm {} ({}), N(0, {:e}^2) added per coordinate",
        dp.mode,
        dp.clip_norm,
        if out.unclipped {
            "it was within"
        } else {
            "it was above"
        },
        dp.noise_std
    );
    Ok((out.delta, out.unclipped))
}
