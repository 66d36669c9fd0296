//! `fedflow-client`: what a partner site runs.
//!
//! Local data tools and local training ([`local`]): generate realistic partner data, validate a
//! data file against the federation's vocabulary, train the attention-flow model on one site's
//! data or on several sites pooled (the centralised baseline), and evaluate a saved model.
//!
//! The federation client: what a partner site does with one federated task ([`site`]) —
//! verify the global model, check it fits the site's vocabulary, train locally (optionally
//! with FedProx, record-level DP-SGD under the site's own limits and ledger ([`privacy`],
//! [`ledger`]), and site-level DP) and produce the serialised weight delta with its hash and
//! metrics, or only evaluate. The networking loop ([`federation`]: enrol, long-poll,
//! download, train or evaluate with heartbeats, upload, reconnect) calls into it through
//! [`work::SiteWork`]; every protocol message is built and read, and every coordinator status
//! mapped to an [`Error`], in [`wire`]. [`noop`] is a site that answers without training, for
//! measuring the coordinator's own overhead; [`report`] writes the site's privacy report.
//!
//! The site agent ([`agent`]): one service per site that keeps the feedback the application
//! posts, trains on it when the coordinator asks, and serves predictions and explanations
//! from the published version ([`published`]), or from that version fine-tuned on the
//! site's own data when it predicts the site better ([`personalise`]).
//!
//! The binary `fedflow-client` is a thin command-line layer over these functions.

pub mod agent;
pub mod enrol;
pub mod error;
pub mod federation;
pub mod ledger;
pub mod local;
pub mod noop;
mod pacing;
pub mod personalise;
pub mod privacy;
pub mod published;
pub mod report;
pub mod site;
pub mod tls;
pub mod wire;
pub mod work;

pub use error::{Error, Result};
