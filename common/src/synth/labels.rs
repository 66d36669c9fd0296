//! The label function: event kinds, the order-dependent features of a session, and
//! `p(label | events)`, shared by every site.

use crate::data::NUM_LABELS;

/// Kind of an event, as the label function sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Neither helps nor hurts by itself (browsing, waiting, opening, closing, ...).
    Neutral,
    /// Something went wrong for the user; extends the failure streak.
    Failure,
    /// A step forward that is not yet a solution; ends the failure streak.
    Progress,
    /// The user's problem was solved; ends the failure streak.
    Resolution,
    /// The user asked for a human agent.
    Escalation,
}

/// The synthetic event vocabulary, with each event's kind, in id order.
pub(super) const EVENTS: [(&str, EventKind); 34] = [
    ("opened_help", EventKind::Neutral),
    ("reopened_help", EventKind::Neutral),
    ("logged_in", EventKind::Neutral),
    ("closed_help", EventKind::Neutral),
    ("searched", EventKind::Neutral),
    ("search_refined", EventKind::Neutral),
    ("search_no_results", EventKind::Failure),
    ("viewed_article", EventKind::Neutral),
    ("scrolled_article", EventKind::Neutral),
    ("clicked_answer", EventKind::Progress),
    ("copied_solution", EventKind::Resolution),
    ("rated_article_up", EventKind::Resolution),
    ("rated_article_down", EventKind::Failure),
    ("browsed_category", EventKind::Neutral),
    ("viewed_faq", EventKind::Neutral),
    ("viewed_related", EventKind::Neutral),
    ("watched_video", EventKind::Neutral),
    ("viewed_status_page", EventKind::Neutral),
    ("downloaded_attachment", EventKind::Neutral),
    ("opened_chat", EventKind::Neutral),
    ("typed_message", EventKind::Neutral),
    ("bot_reply", EventKind::Progress),
    ("bot_misunderstood", EventKind::Failure),
    ("escalated_to_agent", EventKind::Escalation),
    ("waited_in_queue", EventKind::Neutral),
    ("agent_reply", EventKind::Progress),
    ("agent_transfer", EventKind::Neutral),
    ("agent_resolved", EventKind::Resolution),
    ("error_page", EventKind::Failure),
    ("page_timeout", EventKind::Failure),
    ("retried", EventKind::Neutral),
    ("gave_feedback", EventKind::Neutral),
    ("submitted_ticket", EventKind::Neutral),
    ("ticket_auto_reply", EventKind::Neutral),
];

/// The synthetic event vocabulary in id order (the order of [`SynthFederation::event_names`](super::SynthFederation::event_names)).
pub const EVENT_NAMES: [&str; 34] = {
    let mut names = [""; 34];
    let mut i = 0;
    while i < EVENTS.len() {
        names[i] = EVENTS[i].0;
        i += 1;
    }
    names
};

// Event indices into `EVENTS`, for the generator.

/// Sharpness of the ordinal softmax around the satisfaction score.
pub const KAPPA: f64 = 2.0;
/// A longest failure streak of at least this counts as prolonged frustration.
pub const LONG_STREAK: u32 = 3;
/// A final failure streak of at least this means the user left frustrated.
pub const FINAL_STREAK: u32 = 2;
/// Sessions with more events than this are "long" and score lower.
pub const LONG_SESSION: usize = 30;
/// Escalating with a current failure streak of at least this is a *late* escalation.
pub const LATE_ESCALATION_STREAK: u32 = 3;
/// Length of [`FlowFeatures::oracle_vector`].
pub const ORACLE_DIM: usize = 8;

/// Weights of the satisfaction score on [`FlowFeatures::oracle_vector`] (the last entry is the
/// intercept). They are integers, so that most scores sit on a class and the label is fairly
/// predictable from the events. Other weights over the same features
/// ([`FlowFeatures::label_probs_with`]) give another label function with an exact ceiling
/// too: a simulated change of what satisfies users.
pub const SCORE_WEIGHTS: [f64; ORACLE_DIM] = [
    2.0,  // ends resolved
    1.0,  // smooth: no failure at all
    -1.0, // prolonged frustration: longest failure streak >= LONG_STREAK
    -1.0, // left frustrated: final failure streak >= FINAL_STREAK
    -2.0, // late escalation
    -1.0, // relapse: a failure after a resolution
    -1.0, // long session
    1.0,  // intercept
];

/// Kind of an event name; names outside [`EVENT_NAMES`] are neutral.
pub fn event_kind(name: &str) -> EventKind {
    EVENTS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(EventKind::Neutral, |(_, k)| *k)
}

/// The order-dependent features of an event sequence that the label function reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowFeatures {
    /// Number of events.
    pub len: usize,
    /// Longest run of failures not interrupted by a progress or resolution event.
    pub max_fail_streak: u32,
    /// Failures since the last progress or resolution event, at the end of the session.
    pub final_fail_streak: u32,
    /// The session contains a resolution and no failure after the last one.
    pub ends_resolved: bool,
    /// A failure occurred after a resolution (resolved, then failed again).
    pub relapsed: bool,
    /// The user escalated with a current failure streak of at least
    /// [`LATE_ESCALATION_STREAK`].
    pub late_escalation: bool,
    /// The user escalated with a shorter current failure streak (no penalty: asking for help
    /// early is fine).
    pub early_escalation: bool,
}

impl FlowFeatures {
    /// Reads the features from a sequence of event kinds, in order.
    pub fn from_kinds(kinds: impl IntoIterator<Item = EventKind>) -> Self {
        let mut f = FlowFeatures::default();
        let mut streak = 0u32;
        let mut seen_resolution = false;
        let mut failure_since_resolution = false;
        for kind in kinds {
            f.len += 1;
            match kind {
                EventKind::Neutral => {}
                EventKind::Failure => {
                    streak += 1;
                    f.max_fail_streak = f.max_fail_streak.max(streak);
                    if seen_resolution {
                        f.relapsed = true;
                    }
                    failure_since_resolution = true;
                }
                EventKind::Progress => streak = 0,
                EventKind::Resolution => {
                    streak = 0;
                    seen_resolution = true;
                    failure_since_resolution = false;
                }
                EventKind::Escalation => {
                    if streak >= LATE_ESCALATION_STREAK {
                        f.late_escalation = true;
                    } else {
                        f.early_escalation = true;
                    }
                }
            }
        }
        f.final_fail_streak = streak;
        f.ends_resolved = seen_resolution && !failure_since_resolution;
        f
    }

    /// Reads the features from event names (unknown names are neutral).
    pub fn from_events<S: AsRef<str>>(events: &[S]) -> Self {
        Self::from_kinds(events.iter().map(|e| event_kind(e.as_ref())))
    }

    /// The terms the satisfaction score is linear in; the last entry is a constant 1.
    ///
    /// A multinomial logistic regression on this vector can represent the Bayes decision.
    pub fn oracle_vector(&self) -> [f64; ORACLE_DIM] {
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        [
            b(self.ends_resolved),
            b(self.max_fail_streak == 0),
            b(self.max_fail_streak >= LONG_STREAK),
            b(self.final_fail_streak >= FINAL_STREAK),
            b(self.late_escalation),
            b(self.relapsed),
            b(self.len > LONG_SESSION),
            1.0,
        ]
    }

    /// The satisfaction score `s` (roughly 0 = very unhappy .. 4 = very happy).
    pub fn score(&self) -> f64 {
        self.score_with(&SCORE_WEIGHTS)
    }

    /// The score with other `weights` on [`FlowFeatures::oracle_vector`].
    pub fn score_with(&self, weights: &[f64; ORACLE_DIM]) -> f64 {
        self.oracle_vector()
            .iter()
            .zip(weights)
            .map(|(x, w)| x * w)
            .sum()
    }

    /// `p(label = k + 1)` for `k` in 0..5, given these features and the label noise.
    pub fn label_probs(&self, label_noise: f64) -> [f64; NUM_LABELS] {
        self.label_probs_with(&SCORE_WEIGHTS, label_noise)
    }

    /// `p(label = k + 1)` for `k` in 0..5 when the score has other `weights`: the same
    /// ordinal softmax around [`FlowFeatures::score_with`], mixed with the label noise.
    pub fn label_probs_with(
        &self,
        weights: &[f64; ORACLE_DIM],
        label_noise: f64,
    ) -> [f64; NUM_LABELS] {
        let s = self.score_with(weights);
        let mut logits = [0.0; NUM_LABELS];
        for (k, l) in logits.iter_mut().enumerate() {
            let d = s - k as f64;
            *l = -KAPPA * d * d;
        }
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut total = 0.0;
        for l in &mut logits {
            *l = (*l - max).exp();
            total += *l;
        }
        logits.map(|e| (1.0 - label_noise) * e / total + label_noise / NUM_LABELS as f64)
    }
}

/// `p(label = k + 1 | events)` for `k` in 0..5: the exact label distribution of the generator,
/// shared by all sites (see the module documentation).
pub fn label_probs<S: AsRef<str>>(events: &[S], label_noise: f64) -> [f64; NUM_LABELS] {
    FlowFeatures::from_events(events).label_probs(label_noise)
}

/// Index of the largest probability (the Bayes decision; ties go to the lower class).
pub fn argmax(p: &[f64; NUM_LABELS]) -> usize {
    let mut best = 0;
    for k in 1..NUM_LABELS {
        if p[k] > p[best] {
            best = k;
        }
    }
    best
}
