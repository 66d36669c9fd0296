//! The site agent: one long-running service per partner site that takes in the feedback the
//! application collects ([`store`]), trains on it when the coordinator asks ([`source`]:
//! the store as the trainer's data source), and serves the federation's published model
//! ([`serving`], possibly fine-tuned on the site's data) through a local HTTP API
//! ([`http`], over TLS with [`https`]); [`run`] starts it all from the site's configuration
//! ([`config`]).

pub mod config;
pub mod http;
pub mod https;
pub mod run;
pub mod serving;
pub mod source;
pub mod store;

#[cfg(test)]
mod http_tests;
#[cfg(test)]
mod run_tests;
#[cfg(test)]
mod tests;
