//! Batches: left-padded, masked, truncated to the most recent events.

use candle_core::{Device, Tensor};

use super::ModelConfig;
use crate::data::EncodedSession;
use crate::{Error, Result};

/// A batch of sessions laid out for the model.
///
/// Sessions are *left*-padded to the longest one in the batch (capped at `max_seq_len`,
/// keeping the most recent events), so every session's last event sits at the last step.
/// `mask` is 1 on real events and 0 on padding; `positions` counts from each session's first
/// kept event (padding gets position 0 and is masked everywhere it could matter).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Event ids (B, T), u32.
    pub ids: Tensor,
    /// 1.0 for real events, 0.0 for padding (B, T), in the model's dtype.
    pub mask: Tensor,
    /// Position of each event within its session (B, T), u32.
    pub positions: Tensor,
    /// Class indices (B), u32.
    pub labels: Tensor,
    /// Number of sessions B.
    pub size: usize,
    /// Number of steps T.
    pub steps: usize,
}

impl Batch {
    /// Lays out `sessions` for a model with `config`, on `device`.
    ///
    /// Fails if the batch is empty, a session has no events, or an id or class is outside the
    /// model's vocabulary or classes.
    pub fn new(
        sessions: &[&EncodedSession],
        config: &ModelConfig,
        device: &Device,
    ) -> Result<Self> {
        if sessions.is_empty() {
            return Err(Error::Training("empty batch".into()));
        }
        let steps = sessions
            .iter()
            .map(|s| s.events.len().min(config.max_seq_len))
            .max()
            .unwrap_or(0);
        if steps == 0 {
            return Err(Error::Training(
                "a session in the batch has no events".into(),
            ));
        }
        let b = sessions.len();
        let mut ids = vec![0u32; b * steps];
        let mut mask = vec![0f32; b * steps];
        let mut positions = vec![0u32; b * steps];
        let mut labels = Vec::with_capacity(b);
        for (r, s) in sessions.iter().enumerate() {
            if s.events.is_empty() {
                return Err(Error::Training(
                    "a session in the batch has no events".into(),
                ));
            }
            if s.class as usize >= config.num_classes {
                return Err(Error::Training(format!(
                    "class {} is outside the model's {} classes",
                    s.class, config.num_classes
                )));
            }
            let kept = &s.events[s.events.len().saturating_sub(steps)..];
            let offset = steps - kept.len();
            for (j, &id) in kept.iter().enumerate() {
                if id as usize >= config.vocab_size || id == 0 {
                    return Err(Error::Training(format!(
                        "event id {id} is outside the vocabulary (1..{})",
                        config.vocab_size
                    )));
                }
                ids[r * steps + offset + j] = id;
                mask[r * steps + offset + j] = 1.0;
                positions[r * steps + offset + j] = j as u32;
            }
            labels.push(s.class);
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, steps), device)?,
            mask: Tensor::from_vec(mask, (b, steps), device)?,
            positions: Tensor::from_vec(positions, (b, steps), device)?,
            labels: Tensor::from_vec(labels, b, device)?,
            size: b,
            steps,
        })
    }
}
