//! The DP-SGD path of a training task: re-send a recorded update, or check the site's and
//! the run's limits, train with DP-SGD, record the release in the ledger, and return it.
//!
//! What leaves the site besides the update is kept to what the guarantee can live with: no
//! training time, no validation count and no metrics unless the site releases metrics, and
//! decline reasons that name the limit but carry no epsilon figures (those would reveal the
//! site's spending in other runs); the figures go to the site's own log. A training failure
//! is declined with a generic reason for the same reason.

use fedflow_common::failpoint::failpoint;
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_common::train::{EpochReport, privacy_units, train_dp};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::{SiteMetrics, SiteTrainer, TaskOutcome, TaskSpec};
use crate::ledger::{CountRelease, NewEntry};
use crate::privacy::{RecordDp, SitePrivacy};
use crate::{Error, Result};

impl SitePrivacy {
    /// Marks a task's update delivered to the coordinator.
    pub fn delivered(&self, task: &TaskSpec) -> Result<()> {
        self.ledger()
            .mark_released(&task.run_id, task.round, &task.task_id)
    }
}

impl SiteTrainer {
    /// The DP-SGD path of a training task, after the global model was verified and loaded
    /// into `model`: re-send a recorded update, or check the limits, train, record, and
    /// return the update for upload.
    pub(super) fn train_private(
        &self,
        privacy: &SitePrivacy,
        dp: &RecordDp,
        task: &TaskSpec,
        model: &AttentionFlowModel,
        global: &ParamSet,
        on_epoch: &mut dyn FnMut(&EpochReport),
    ) -> Result<TaskOutcome> {
        let dataset = self.dataset();
        // Without released metrics only the training count goes out (the FedAvg weight).
        let counts = SiteMetrics {
            validation_examples: 0,
            ..self.counts()
        };
        // A task already recorded is answered with the recorded bytes: never fresh noise.
        if let Some((entry, bytes)) =
            privacy
                .ledger()
                .find(&task.run_id, task.round, &task.task_id)?
        {
            let Some(bytes) = bytes else {
                return Err(Error::Budget(format!(
                    "run {} round {}: an update for this task was already recorded (ledger entry \
                     {}) and its bytes are no longer held; declining rather than releasing a \
                     second update for the same task",
                    task.run_id, task.round, entry.id
                )));
            };
            tracing::info!(
                round = task.round,
                "re-sending the update recorded in ledger entry {}",
                entry.id
            );
            let delta = if task.compression.is_lossy() {
                fedflow_common::compress::decode_bytes(&bytes, &global.spec(), &task.compression)?
            } else {
                ParamSet::from_safetensors_bytes(&bytes)?
            };
            // The recorded count too: never a fresh draw for a recorded task.
            let metrics = match entry.count {
                Some(c) => SiteMetrics {
                    train_examples: c.released as usize,
                    ..counts
                },
                None => counts,
            };
            return Ok(TaskOutcome {
                delta,
                delta_sha256: entry.update_sha256,
                delta_bytes: bytes,
                metrics,
                // The bit is not recorded; "clipped" only nudges adaptive clipping (its noisy
                // count is accounted whatever the bits are).
                unclipped: false,
            });
        }
        if let Some(held) = privacy.ledger().unit()?
            && held != dp.sgd.unit
        {
            return Err(Error::Policy(format!(
                "run {} round {}: this site's privacy ledger accounts for {held}-level releases \
                 and the task asks for {}-level DP-SGD; one ledger accounts for one privacy unit \
                 (a session-level release gives no user-level bound), so this site declines",
                task.run_id, task.round, dp.sgd.unit
            )));
        }
        let units = privacy_units(&dataset.train_users, &dp.sgd);
        for (delta, whose) in [
            (privacy.delta, "the site's"),
            (dp.target_delta, "the run's"),
        ] {
            if delta * units.len() as f64 >= 1.0 {
                tracing::warn!(
                    round = task.round,
                    "{whose} delta {delta:e} is not below 1/n = 1/{} (this site's privacy \
                     units): a mechanism publishing one unit in n outright meets it, so the \
                     guarantee is weak whatever epsilon says; choose delta well below 1/n",
                    units.len()
                );
            }
        }
        let event = dp.sgd.round_event(units.len(), task.train.epochs)?;
        let mut rng = ChaCha20Rng::from_os_rng();
        // Drawn before the limits are checked (its cost is known without its value), so
        // that the check covers everything this task releases.
        let count = (dp.count_noise_multiplier > 0.0)
            .then(|| CountRelease::draw(units.len() as u64, dp.count_noise_multiplier, &mut rng));
        let mut spend = privacy.ledger().spend()?;
        let before = spend.epsilon(privacy.delta)?;
        spend.compose(&event)?;
        if let Some(c) = &count {
            spend.compose(&c.event())?;
        }
        for (limit, delta, whose) in [
            (privacy.max_epsilon, privacy.delta, "this site's own limit"),
            (dp.target_epsilon, dp.target_delta, "the run's target"),
        ] {
            // The smaller of the RDP and PLD bounds: both hold.
            let after = spend.epsilon(delta)?;
            if after > limit {
                // The figures stay in the site's log: sent, they would tell the coordinator
                // how much this site spent in other runs.
                tracing::warn!(
                    round = task.round,
                    "declining: training would take this site's record-level epsilon to \
                     {after:.4} at delta {delta:e}, above {whose} of {limit} (spent before: \
                     {before:.4} at delta {:e})",
                    privacy.delta
                );
                return Err(Error::Budget(format!(
                    "run {} round {}: training would take this site's record-level epsilon \
                     above {whose}; declining",
                    task.run_id, task.round
                )));
            }
        }
        let generic = |what: &str, e: Error| {
            tracing::error!(round = task.round, "{what}: {e}");
            Error::Task(format!(
                "run {} round {}: {what} at this site (the reason is in the site's log: under \
                 record-level DP it is not sent)",
                task.run_id, task.round
            ))
        };
        let report = train_dp(
            model,
            &dataset.train,
            &units,
            &task.train,
            &dp.sgd,
            &mut rng,
            on_epoch,
        )
        .map_err(|e| generic("DP-SGD training failed", e.into()))?;
        if report.non_finite > 0 {
            tracing::warn!(
                round = task.round,
                "{} sampled unit(s) had a non-finite gradient and contributed zero; consider a \
                 lower learning rate",
                report.non_finite
            );
        }
        let local = ParamSet::from_varmap(model.varmap())?;
        let super::release::Release {
            delta,
            bytes: delta_bytes,
            unclipped,
            ..
        } = ParamSet::delta(&local, global)
            .map_err(Error::from)
            .and_then(|d| self.release(task, d))
            .map_err(|e| generic("the DP-SGD update could not be released", e))?;
        let entry = privacy.ledger().record(
            &NewEntry {
                run_id: task.run_id.clone(),
                round: task.round,
                task_id: task.task_id.clone(),
                unit: dp.sgd.unit,
                units: units.len() as u64,
                clip_norm: dp.sgd.clip_norm,
                expected_batch_size: (report.event.q * units.len() as f64).round() as u64,
                epochs: task.train.epochs as u64,
                event: report.event,
                metrics_released: privacy.release_metrics,
                count,
            },
            &delta_bytes,
        )?;
        failpoint("after-ledger-record");
        tracing::info!(
            round = task.round,
            "ledger entry {} recorded: q {:.5}, {} steps, z {}; {:.1}% of sampled units clipped",
            entry.id,
            report.event.q,
            report.event.steps,
            report.event.z,
            100.0 * report.clipped_fraction
        );
        let mut m = if privacy.release_metrics && !self.withholds_metrics() {
            let mut m = self.validation_metrics(model)?;
            m.train_loss = report.train.epochs.last().map(|e| e.train_loss);
            m
        } else {
            counts
        };
        if let Some(c) = count {
            // The FedAvg weight is the noisy count of units, as recorded.
            m.train_examples = c.released as usize;
        }
        m.epochs_run = report.train.epochs.len();
        m.best_epoch = report.train.best_epoch;
        Ok(TaskOutcome {
            delta,
            delta_sha256: entry.update_sha256,
            delta_bytes,
            metrics: m,
            unclipped,
        })
    }
}
