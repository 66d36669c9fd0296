//! `fedflow-client`: what a partner site runs.
//!
//! Today: local data tools and local training ([`local`]) — generate realistic partner data,
//! validate a data file against the federation's vocabulary, train the attention-flow model on
//! one site's data or on several sites pooled (the centralised baseline), and evaluate a saved
//! model. The binary `fedflow-client` is a thin command-line layer over these functions.
//!
//! For federation: what a partner site does with one federated task ([`site`]) — verify the
//! global model, check it fits the site's vocabulary, train locally (optionally with FedProx)
//! and produce the serialised weight delta with its hash and metrics, or only evaluate. The
//! networking client loop ([`federation`]: enrol, long-poll, download, train or evaluate with
//! heartbeats, upload, reconnect) calls into it through [`work::SiteWork`]. [`noop`] is a site
//! that answers without training, for measuring the coordinator's own overhead.

pub mod error;
pub mod federation;
pub mod ledger;
pub mod local;
pub mod noop;
pub mod privacy;
pub mod report;
pub mod site;
pub mod tls;
pub mod work;

pub use error::{Error, Result};
