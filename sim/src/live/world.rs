//! The simulated world: every site's sessions per period, the drifted labels, and each
//! period's held-out test set with its exact label distributions.

use fedflow_common::data::{
    EncodedSession, NUM_LABELS, SessionRecord, Split, Vocab, encode_session, split_of,
};
use fedflow_common::synth::{FlowFeatures, ORACLE_DIM, SynthConfig, generate};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, weighted::WeightedIndex};

use super::LiveConfig;
use crate::{Error, Result};

/// Score weights after the drift, on [`FlowFeatures::oracle_vector`]'s features (compare
/// [`fedflow_common::synth::SCORE_WEIGHTS`]): ending resolved is taken for granted (+1
/// instead of +2), a smooth session is worth more (+2 instead of +1), prolonged frustration
/// hurts more (-2 instead of -1), a late escalation no longer hurts (the new agent team
/// rescues it: 0 instead of -2), and long sessions no longer count against (0 instead of
/// -1). Integers, as before, so the labels stay about as predictable.
pub const DRIFTED_WEIGHTS: [f64; ORACLE_DIM] = [1.0, 2.0, -2.0, -1.0, 0.0, -1.0, 0.0, 1.0];

/// One period's held-out sessions with their exact label distributions.
#[derive(Debug, Clone, Default)]
pub(super) struct TestSet {
    pub(super) sessions: Vec<EncodedSession>,
    /// The same sessions' event names, as an application sends them to an agent.
    pub(super) events: Vec<Vec<String>>,
    pub(super) probs: Vec<[f64; NUM_LABELS]>,
}

impl TestSet {
    /// `E[max_k p(k | events)]` over the sessions.
    pub(super) fn ceiling(&self) -> f64 {
        mean(
            self.probs
                .iter()
                .map(|p| p.iter().copied().fold(0.0, f64::max)),
        )
    }

    /// Expected accuracy of `predicted` classes.
    pub(super) fn expected_accuracy(&self, predicted: &[u32]) -> f64 {
        mean(
            self.probs
                .iter()
                .zip(predicted)
                .map(|(p, &c)| p[c as usize]),
        )
    }
}

pub(super) fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

/// The generated world: every site's sessions per period (labels of the drift periods
/// drawn from the drifted label function) and each period's test set.
#[derive(Debug)]
pub(super) struct World {
    pub(super) vocab: Vocab,
    /// `chunks[site][period]`.
    pub(super) chunks: Vec<Vec<Vec<SessionRecord>>>,
    pub(super) names: Vec<String>,
    pub(super) tests: Vec<TestSet>,
}

pub(super) fn build_world(cfg: &LiveConfig) -> Result<World> {
    let synth = SynthConfig {
        sites: cfg.sites,
        total_sessions: cfg.sessions_per_period * cfg.periods,
        size_skew: 0.5,
        min_site_sessions: (cfg.sessions_per_period * cfg.periods / cfg.sites / 3).max(1),
        seed: cfg.seed,
        ..SynthConfig::default()
    };
    let fed = generate(&synth)?;
    let vocab = Vocab::from_events(fed.event_names.iter().cloned())?;
    let drift = cfg.drift_period - 1;
    let mut tests = vec![TestSet::default(); cfg.periods];
    let mut chunks = Vec::with_capacity(fed.sites.len());
    let mut names = Vec::with_capacity(fed.sites.len());
    for (index, site) in fed.sites.into_iter().enumerate() {
        // The drifted labels have their own stream per site, apart from the generator's.
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6c69_7665);
        rng.set_stream(index as u64 + 1);
        let n = site.records.len();
        let mut periods = vec![Vec::new(); cfg.periods];
        for (i, (mut record, old)) in site.records.into_iter().zip(site.label_probs).enumerate() {
            let period = i * cfg.periods / n;
            let probs = if period >= drift {
                let p = FlowFeatures::from_events(&record.events)
                    .label_probs_with(&DRIFTED_WEIGHTS, fed.label_noise);
                let pick = WeightedIndex::new(p)
                    .map_err(|e| Error::Other(format!("drifted label distribution: {e}")))?;
                record.label = pick.sample(&mut rng) as u8 + 1;
                p
            } else {
                old
            };
            if split_of(&record.session_id, cfg.val_fraction) == Split::Validation {
                tests[period]
                    .sessions
                    .push(encode_session(&record, &vocab)?);
                tests[period].events.push(record.events.clone());
                tests[period].probs.push(probs);
            }
            periods[period].push(record);
        }
        chunks.push(periods);
        names.push(site.name);
    }
    Ok(World {
        vocab,
        chunks,
        names,
        tests,
    })
}
