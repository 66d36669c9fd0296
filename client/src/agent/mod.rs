//! The site agent: one long-running service per partner site that takes in the feedback the
//! application collects ([`store`]), trains on it when the coordinator asks ([`source`]:
//! the store as the trainer's data source), and serves the federation's published model.

pub mod source;
pub mod store;

#[cfg(test)]
mod tests;
