//! The model's configuration.

use serde::{Deserialize, Serialize};

use crate::data::NUM_LABELS;
use crate::{Error, Result};

/// Which sequence encoder sits between the embedding and the classification head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    /// Stacked LSTMs (the reference design); a fused CPU kernel is used on CPU.
    #[default]
    Lstm,
    /// Stacked GRUs.
    Gru,
    /// A small pre-layer-norm Transformer encoder with masked mean pooling.
    Transformer,
}

impl std::str::FromStr for EncoderKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lstm" => Ok(EncoderKind::Lstm),
            "gru" => Ok(EncoderKind::Gru),
            "transformer" => Ok(EncoderKind::Transformer),
            other => Err(Error::Config(format!(
                "unknown encoder `{other}`: expected lstm, gru or transformer"
            ))),
        }
    }
}

/// Architecture of the attention-flow model.
///
/// The default reproduces the reference design: Embedding(vocab, 64) → LSTM(64, returning the
/// sequence) → Dropout(0.2) → LSTM(64) → Dropout(0.2) → Linear(5), trained with
/// softmax cross-entropy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Number of event ids, including padding (0) and unknown (1); take it from the vocabulary.
    pub vocab_size: usize,
    /// Width of the event embedding (also the Transformer's model width).
    pub embed_dim: usize,
    /// Sequence encoder.
    pub encoder: EncoderKind,
    /// Hidden size of each recurrent layer (ignored by the Transformer).
    pub hidden_size: usize,
    /// Number of stacked encoder layers.
    pub num_layers: usize,
    /// Dropout probability, applied between layers and before the head (training only).
    pub dropout: f64,
    /// Number of output classes (5 satisfaction levels).
    pub num_classes: usize,
    /// Longest sequence the model reads; longer sessions keep their most recent events.
    pub max_seq_len: usize,
    /// Attention heads (Transformer only); must divide `embed_dim`.
    pub num_heads: usize,
    /// Feed-forward width (Transformer only).
    pub ffn_dim: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            vocab_size: 100,
            embed_dim: 64,
            encoder: EncoderKind::Lstm,
            hidden_size: 64,
            num_layers: 2,
            dropout: 0.2,
            num_classes: NUM_LABELS,
            max_seq_len: 100,
            num_heads: 4,
            ffn_dim: 128,
        }
    }
}

impl ModelConfig {
    /// Checks every field, naming the first one that is out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| Err(Error::Config(format!("model.{field}: {why}")));
        if self.vocab_size < 3 {
            return bad(
                "vocab_size",
                format!(
                    "{} is too small: padding and unknown take ids 0 and 1",
                    self.vocab_size
                ),
            );
        }
        for (field, v) in [
            ("embed_dim", self.embed_dim),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("max_seq_len", self.max_seq_len),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if self.num_classes < 2 {
            return bad(
                "num_classes",
                format!("{} is too small: need at least 2", self.num_classes),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} is outside [0, 1)", self.dropout));
        }
        if self.encoder == EncoderKind::Transformer {
            if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
                return bad(
                    "num_heads",
                    format!(
                        "{} must be at least 1 and divide embed_dim {}",
                        self.num_heads, self.embed_dim
                    ),
                );
            }
            if self.ffn_dim == 0 {
                return bad("ffn_dim", "must be at least 1".into());
            }
        }
        Ok(())
    }

    /// Number of scalar parameters a model built from this config has (what
    /// [`AttentionFlowModel::num_parameters`](super::AttentionFlowModel::num_parameters)
    /// reports once it is built), computed in closed form without allocating anything, or
    /// `None` when the count overflows `usize`.
    ///
    /// Lets a loader check an untrusted config against parameters it already holds before
    /// building the model, whose allocation the config alone sizes. Meaningful for a config
    /// that passes [`ModelConfig::validate`].
    pub fn num_parameters(&self) -> Option<usize> {
        let add = usize::checked_add;
        let mul = usize::checked_mul;
        let embedding = mul(self.vocab_size, self.embed_dim)?;
        let encoder = match self.encoder {
            EncoderKind::Lstm | EncoderKind::Gru => {
                // PyTorch layout: per layer, weight_ih (G·H × in), weight_hh (G·H × H) and two
                // biases of G·H, with `in` the embedding width for layer 0 and H after it.
                let gates = if self.encoder == EncoderKind::Lstm {
                    4
                } else {
                    3
                };
                let (h, layers) = (self.hidden_size, self.num_layers);
                let gh = mul(gates, h)?;
                let first = mul(gh, add(add(self.embed_dim, h)?, 2)?)?;
                let later = mul(gh, add(mul(2, h)?, 2)?)?;
                add(first, mul(later, layers.saturating_sub(1))?)?
            }
            EncoderKind::Transformer => {
                // Positions (max_len × D); per block two layer norms (2·D each), the attention
                // in-projection (3D × D + 3D) and out-projection (D × D + D), and the
                // feed-forward layers (F × D + F and D × F + D); a final layer norm (2·D).
                let (d, f) = (self.embed_dim, self.ffn_dim);
                let pos = mul(self.max_seq_len, d)?;
                let d2 = mul(d, d)?;
                let fd = mul(f, d)?;
                let block = add(add(mul(4, d2)?, mul(2, fd)?)?, add(f, mul(9, d)?)?)?;
                add(add(pos, mul(block, self.num_layers)?)?, mul(2, d)?)?
            }
        };
        let s = self.summary_dim();
        let head = mul(self.num_classes, add(s, 1)?)?;
        add(add(embedding, encoder)?, head)
    }

    /// Width of the encoder's summary vector, the input of the classification head.
    pub fn summary_dim(&self) -> usize {
        match self.encoder {
            EncoderKind::Lstm | EncoderKind::Gru => self.hidden_size,
            EncoderKind::Transformer => self.embed_dim,
        }
    }
}
