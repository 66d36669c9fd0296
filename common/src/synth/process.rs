//! The generative process: site sizes, per-site habits, and the hidden-frustration event
//! process that produces sessions.

use crate::clock::rfc3339;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Dirichlet, Distribution, Gamma};

use super::labels::{EVENT_NAMES, EVENTS, FlowFeatures, argmax};
use super::{SynthConfig, SynthSite};
use crate::data::{NUM_LABELS, SessionRecord};
use crate::{Error, Result};

const OPENED_HELP: u8 = 0;
const REOPENED_HELP: u8 = 1;
const LOGGED_IN: u8 = 2;
const CLOSED_HELP: u8 = 3;
const SEARCHED: u8 = 4;
const SEARCH_REFINED: u8 = 5;
const SEARCH_NO_RESULTS: u8 = 6;
const VIEWED_ARTICLE: u8 = 7;
const SCROLLED_ARTICLE: u8 = 8;
const CLICKED_ANSWER: u8 = 9;
const COPIED_SOLUTION: u8 = 10;
const RATED_ARTICLE_UP: u8 = 11;
const RATED_ARTICLE_DOWN: u8 = 12;
const OPENED_CHAT: u8 = 19;
const TYPED_MESSAGE: u8 = 20;
const BOT_REPLY: u8 = 21;
const BOT_MISUNDERSTOOD: u8 = 22;
const ESCALATED_TO_AGENT: u8 = 23;
const WAITED_IN_QUEUE: u8 = 24;
const AGENT_REPLY: u8 = 25;
const AGENT_TRANSFER: u8 = 26;
const AGENT_RESOLVED: u8 = 27;
const ERROR_PAGE: u8 = 28;
const PAGE_TIMEOUT: u8 = 29;
const RETRIED: u8 = 30;
const GAVE_FEEDBACK: u8 = 31;
const SUBMITTED_TICKET: u8 = 32;
const TICKET_AUTO_REPLY: u8 = 33;
/// Browsing events a site's habits choose among (`browsed_category` .. `downloaded_attachment`,
/// plus `scrolled_article`).
const BROWSE_EVENTS: [u8; 7] = [13, 14, 15, 16, 17, 18, SCROLLED_ARTICLE];

/// A site's event habits, drawn once per site.
#[derive(Debug, Clone)]
struct Habits {
    chat_pref: f64,
    browse_rate: f64,
    browse_mix: [f64; BROWSE_EVENTS.len()],
    error_rate: f64,
    hidden_failure: f64,
    patience_mean: f64,
    escalate_when_frustrated: f64,
    escalate_early: f64,
    more_questions: f64,
    login_rate: f64,
    reopen_rate: f64,
    close_rate: f64,
    feedback_rate: f64,
    queue_mean: f64,
}

impl Habits {
    fn draw(rng: &mut ChaCha8Rng) -> Result<Self> {
        let browse_mix = Dirichlet::new([1.0; BROWSE_EVENTS.len()])
            .map_err(|e| Error::Config(format!("synth: browse mix: {e}")))?
            .sample(rng);
        Ok(Habits {
            chat_pref: rng.random_range(0.05..0.6),
            browse_rate: rng.random_range(0.1..0.45),
            browse_mix,
            error_rate: rng.random_range(0.01..0.06),
            hidden_failure: rng.random_range(0.15..0.4),
            patience_mean: rng.random_range(2.0..5.0),
            escalate_when_frustrated: rng.random_range(0.3..0.9),
            escalate_early: rng.random_range(0.02..0.15),
            more_questions: rng.random_range(0.15..0.45),
            login_rate: rng.random_range(0.0..0.5),
            reopen_rate: rng.random_range(0.0..0.15),
            close_rate: rng.random_range(0.4..0.9),
            feedback_rate: rng.random_range(0.05..0.3),
            queue_mean: rng.random_range(1.0..3.0),
        })
    }
}

/// Probability that one search or chat attempt solves the problem, per journey type.
const P_SUCCESS: [f64; NUM_LABELS] = [0.10, 0.22, 0.38, 0.55, 0.75];
/// Probability that a human agent solves the problem, per journey type.
const P_AGENT: [f64; NUM_LABELS] = [0.15, 0.35, 0.55, 0.75, 0.9];
/// Base mix of journey types the site Dirichlet is centred on (worst first).
pub(super) const BASE_MIX: [f64; NUM_LABELS] = [0.16, 0.16, 0.2, 0.24, 0.24];
/// Cap on attempts per session, so that the process always ends.
const MAX_ATTEMPTS: usize = 20;

/// Result of one attempt at the problem.
#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Solved,
    Failed,
}

/// Simulates one session of journey type `journey` at a site with `habits`.
fn simulate(rng: &mut ChaCha8Rng, habits: &Habits, journey: usize, out: &mut Vec<u8>) {
    out.clear();
    if rng.random_bool(habits.login_rate) {
        out.push(LOGGED_IN);
    }
    out.push(if rng.random_bool(habits.reopen_rate) {
        REOPENED_HELP
    } else {
        OPENED_HELP
    });
    let patience = 1.0
        + Gamma::new(3.0, habits.patience_mean / 3.0)
            .map(|g| g.sample(rng))
            .unwrap_or(habits.patience_mean)
            .round();
    let p_success = P_SUCCESS[journey];
    let mut frustration = 0.0;
    let mut escalated = false;
    // A user asks for an agent at most once per session.
    let mut may_escalate = true;
    let mut chat_open = false;
    for attempt in 0..MAX_ATTEMPTS {
        while rng.random_bool(habits.browse_rate) {
            let i = pick(rng, &habits.browse_mix);
            out.push(BROWSE_EVENTS[i]);
        }
        if rng.random_bool(habits.error_rate) {
            out.push(if rng.random_bool(0.6) {
                ERROR_PAGE
            } else {
                PAGE_TIMEOUT
            });
            frustration += 1.0;
            if rng.random_bool(0.7) {
                out.push(RETRIED);
            } else {
                continue;
            }
        }
        let outcome = if escalated {
            // With an agent: wait, talk, and the agent solves it or transfers.
            let waits = 1 + (rng.random::<f64>() * habits.queue_mean) as usize;
            out.extend(std::iter::repeat_n(WAITED_IN_QUEUE, waits));
            out.push(AGENT_REPLY);
            if rng.random_bool(P_AGENT[journey]) {
                out.push(AGENT_RESOLVED);
                Outcome::Solved
            } else {
                out.push(AGENT_TRANSFER);
                escalated = rng.random_bool(0.5);
                Outcome::Failed
            }
        } else if may_escalate
            && ((attempt == 0 && rng.random_bool(habits.escalate_early))
                || (frustration >= patience && rng.random_bool(habits.escalate_when_frustrated)))
        {
            out.push(ESCALATED_TO_AGENT);
            escalated = true;
            may_escalate = false;
            frustration = 0.0;
            continue;
        } else if frustration >= patience {
            // Gives up: sometimes files a ticket on the way out.
            if rng.random_bool(0.3) {
                out.push(SUBMITTED_TICKET);
                out.push(TICKET_AUTO_REPLY);
            }
            break;
        } else if rng.random_bool(habits.chat_pref) {
            if !chat_open {
                out.push(OPENED_CHAT);
                chat_open = true;
            }
            out.push(TYPED_MESSAGE);
            if rng.random_bool(p_success) {
                out.push(BOT_REPLY);
                out.push(if rng.random_bool(0.7) {
                    COPIED_SOLUTION
                } else {
                    RATED_ARTICLE_UP
                });
                Outcome::Solved
            } else if rng.random_bool(habits.hidden_failure) {
                out.push(BOT_REPLY);
                Outcome::Failed
            } else {
                out.push(BOT_MISUNDERSTOOD);
                Outcome::Failed
            }
        } else {
            out.push(if frustration > 0.0 && rng.random_bool(0.5) {
                SEARCH_REFINED
            } else {
                SEARCHED
            });
            if rng.random_bool(p_success) {
                out.push(CLICKED_ANSWER);
                out.push(VIEWED_ARTICLE);
                out.push(if rng.random_bool(0.6) {
                    COPIED_SOLUTION
                } else {
                    RATED_ARTICLE_UP
                });
                Outcome::Solved
            } else if rng.random_bool(0.5) {
                out.push(SEARCH_NO_RESULTS);
                Outcome::Failed
            } else {
                out.push(CLICKED_ANSWER);
                out.push(VIEWED_ARTICLE);
                if !rng.random_bool(habits.hidden_failure) {
                    out.push(RATED_ARTICLE_DOWN);
                }
                Outcome::Failed
            }
        };
        match outcome {
            Outcome::Solved => {
                if !rng.random_bool(habits.more_questions) {
                    break;
                }
                frustration = 0.0;
            }
            Outcome::Failed => frustration += 1.0,
        }
    }
    if rng.random_bool(habits.feedback_rate) {
        out.push(GAVE_FEEDBACK);
    }
    if rng.random_bool(habits.close_rate) {
        out.push(CLOSED_HELP);
    }
}

/// Index drawn with probabilities `p` (which sum to 1).
fn pick(rng: &mut ChaCha8Rng, p: &[f64]) -> usize {
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, &pi) in p.iter().enumerate() {
        acc += pi;
        if u < acc {
            return i;
        }
    }
    p.len() - 1
}

/// Splits `total` sessions over sites: `min` each, the rest by a power law over a random
/// ranking, rounded by largest remainder so that the sizes sum exactly to `total`.
pub(super) fn site_sizes(cfg: &SynthConfig, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let n = cfg.sites;
    let mut ranks: Vec<usize> = (1..=n).collect();
    ranks.shuffle(rng);
    let weights: Vec<f64> = ranks
        .iter()
        .map(|&r| (r as f64).powf(-cfg.size_skew))
        .collect();
    let sum: f64 = weights.iter().sum();
    let extra = cfg.total_sessions - n * cfg.min_site_sessions;
    let quotas: Vec<f64> = weights.iter().map(|w| extra as f64 * w / sum).collect();
    let mut sizes: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
    let left = extra - sizes.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let fa = quotas[a] - quotas[a].floor();
        let fb = quotas[b] - quotas[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &i in order.iter().take(left) {
        sizes[i] += 1;
    }
    sizes.iter().map(|s| s + cfg.min_site_sessions).collect()
}

/// 2026-01-01T00:00:00Z, where synthetic timestamps start.
pub(super) const EPOCH_2026: u64 = 1_767_225_600;

/// Generates one site.
pub(super) fn generate_site(
    cfg: &SynthConfig,
    index: usize,
    size: usize,
    label_mix: [f64; NUM_LABELS],
) -> Result<SynthSite> {
    let name = format!("site-{index:03}");
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    // Each site has its own stream, so a site's data does not depend on the other sites'.
    rng.set_stream(index as u64 + 1);
    let habits = Habits::draw(&mut rng)?;
    let mut records = Vec::with_capacity(size);
    let mut label_probs = Vec::with_capacity(size);
    let mut kinds = Vec::new();
    let mut bayes = 0.0;
    let mut user = 0usize;
    let mut user_left = 0usize;
    let mut clock = EPOCH_2026 + rng.random_range(0..86_400);
    for i in 0..size {
        let journey = pick(&mut rng, &label_mix);
        simulate(&mut rng, &habits, journey, &mut kinds);
        if kinds.len() < cfg.min_len {
            let missing = cfg.min_len - kinds.len();
            let prefix: Vec<u8> = (0..missing)
                .map(|_| BROWSE_EVENTS[pick(&mut rng, &habits.browse_mix)])
                .collect();
            kinds.splice(0..0, prefix);
        }
        kinds.truncate(cfg.max_len);
        let p = FlowFeatures::from_kinds(kinds.iter().map(|&e| EVENTS[e as usize].1))
            .label_probs(cfg.label_noise);
        let label = pick(&mut rng, &p) as u8 + 1;
        bayes += p[argmax(&p)];
        let user_id = if cfg.with_user_ids {
            if user_left == 0 {
                user += 1;
                user_left = rng.random_range(1..=5);
            }
            user_left -= 1;
            Some(format!("{name}-user-{user:05}"))
        } else {
            None
        };
        let timestamp = if cfg.with_timestamps {
            clock += rng.random_range(1..1_200);
            Some(rfc3339(clock))
        } else {
            None
        };
        records.push(SessionRecord {
            session_id: format!("{name}-session-{i:06}"),
            events: kinds
                .iter()
                .map(|&e| EVENT_NAMES[e as usize].to_string())
                .collect(),
            label,
            user_id,
            timestamp,
        });
        label_probs.push(p);
    }
    Ok(SynthSite {
        name,
        records,
        label_probs,
        label_mix,
        bayes_accuracy: if size == 0 { 0.0 } else { bayes / size as f64 },
    })
}
