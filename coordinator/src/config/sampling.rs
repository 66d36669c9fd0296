//! `[sampling]`: how many of the available sites a round selects.

use serde::{Deserialize, Serialize};

/// How many of the available sites a round selects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// Fraction of the available sites to select (rounded up); ignored when `count` is set.
    pub fraction: f64,
    /// Exact number of sites to select (capped at the number available).
    pub count: Option<usize>,
    /// Never select fewer than this many sites (unless fewer are available).
    pub min_selected: usize,
    /// Do not start a round with fewer sites available than this.
    pub min_available: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            fraction: 1.0,
            count: None,
            min_selected: 1,
            min_available: 1,
        }
    }
}

impl SamplingConfig {
    /// Checks the fields, naming the first bad one.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(format!(
                "sampling.fraction: {} is outside (0, 1]",
                self.fraction
            ));
        }
        if self.count == Some(0) {
            return Err("sampling.count: must be at least 1".into());
        }
        if self.min_selected == 0 {
            return Err("sampling.min_selected: must be at least 1".into());
        }
        if self.min_available < self.min_selected {
            return Err(format!(
                "sampling.min_available: {} is below min_selected {}",
                self.min_available, self.min_selected
            ));
        }
        Ok(())
    }

    /// How many of `available` sites to select.
    pub fn target(&self, available: usize) -> usize {
        let wanted = match self.count {
            Some(c) => c,
            None => (self.fraction * available as f64).ceil() as usize,
        };
        wanted.max(self.min_selected).min(available)
    }
}
