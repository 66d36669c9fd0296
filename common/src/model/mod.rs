//! The attention-flow model: event embedding → sequence encoder (LSTM, GRU or Transformer)
//! → dropout → linear classification head.
//!
//! Parameters live in a candle [`VarMap`] under PyTorch-compatible names (`embedding.weight`,
//! `encoder.weight_ih_l0`, ..., `head.weight`), so a safetensors file of the default model
//! loads into `nn.Embedding` + `nn.LSTM(num_layers=2, batch_first=True)` + `nn.Linear`.

mod artifact;
mod batch;
mod config;
mod explain;
mod gru;
mod init;
mod kernels;
mod lstm;
mod transformer;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use artifact::{
    CARD_FILE, MODEL_FORMAT, ModelCard, PARAMS_FILE, VOCAB_FILE, load_model, save_model,
    save_params, vocab_sha256,
};
pub use batch::Batch;
pub use config::{EncoderKind, ModelConfig};
pub use explain::{Attribution, IG_STEPS, integrated_gradients};
pub use kernels::kernel_threads;

use crate::Result;
use init::ParamBuilder;
use transformer::TransformerEncoder;

/// Whether a forward pass trains (dropout on, drawing from the given RNG) or evaluates.
#[derive(Debug)]
pub enum Mode<'a> {
    /// Inference: dropout off, deterministic.
    Eval,
    /// Training: dropout masks drawn from this RNG.
    Train(&'a mut ChaCha8Rng),
}

/// Inverted dropout with masks from a seeded RNG (candle's own dropout draws from an
/// unseedable thread RNG, which would make training irreproducible).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dropout {
    p: f64,
}

impl Dropout {
    /// The scaled keep-mask for a tensor of `shape` (values 0 or 1/(1-p)), or `None` when
    /// dropout is inactive. Values are drawn in row-major order, so slicing one mask gives
    /// the same values whichever way a layer is computed.
    pub(crate) fn mask(
        &self,
        shape: &candle_core::Shape,
        like: &Tensor,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Option<Tensor>> {
        let Mode::Train(rng) = mode else {
            return Ok(None);
        };
        if self.p == 0.0 {
            return Ok(None);
        }
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                if rng.random::<f64>() < keep {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Some(
            Tensor::from_vec(mask, shape, like.device())?.to_dtype(like.dtype())?,
        ))
    }

    pub(crate) fn apply(&self, x: &Tensor, mode: &mut Mode<'_>) -> candle_core::Result<Tensor> {
        match self.mask(x.shape(), x, mode)? {
            Some(mask) => x * mask,
            None => Ok(x.clone()),
        }
    }
}

/// One recurrent layer's parameters (PyTorch layout).
#[derive(Debug)]
struct RnnLayer {
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

#[derive(Debug)]
enum Encoder {
    Lstm(Vec<RnnLayer>),
    Gru(Vec<RnnLayer>),
    Transformer(TransformerEncoder),
}

/// The attention-flow classifier.
pub struct AttentionFlowModel {
    config: ModelConfig,
    varmap: VarMap,
    device: Device,
    dtype: DType,
    embedding: Tensor,
    encoder: Encoder,
    head_w: Tensor,
    head_b: Tensor,
    dropout: Dropout,
    fused: bool,
}

impl std::fmt::Debug for AttentionFlowModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttentionFlowModel")
            .field("config", &self.config)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("parameters", &self.num_parameters())
            .field("fused", &self.fused)
            .finish_non_exhaustive()
    }
}

impl AttentionFlowModel {
    /// Builds a model with parameters initialised from `seed` (PyTorch's default schemes:
    /// N(0, 1) embeddings, U(±1/√H) recurrent weights and biases, U(±1/√in) linear layers).
    pub fn new(config: &ModelConfig, device: &Device, seed: u64) -> Result<Self> {
        Self::with_dtype(config, device, DType::F32, seed)
    }

    /// Like [`AttentionFlowModel::new`] with an explicit floating-point dtype (f64 is used by
    /// gradient checks; the fused CPU kernels run in f32 only).
    pub fn with_dtype(
        config: &ModelConfig,
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let mut p = ParamBuilder::new(
            &varmap,
            ChaCha8Rng::seed_from_u64(seed),
            device.clone(),
            dtype,
        );
        let embedding = p.normal(
            "embedding.weight",
            (config.vocab_size, config.embed_dim),
            1.0,
        )?;
        let rnn_layers =
            |p: &mut ParamBuilder, gates: usize| -> candle_core::Result<Vec<RnnLayer>> {
                let h = config.hidden_size;
                let bound = 1.0 / (h as f64).sqrt();
                (0..config.num_layers)
                    .map(|l| {
                        let input = if l == 0 { config.embed_dim } else { h };
                        Ok(RnnLayer {
                            w_ih: p.uniform(
                                &format!("encoder.weight_ih_l{l}"),
                                (gates * h, input),
                                bound,
                            )?,
                            w_hh: p.uniform(
                                &format!("encoder.weight_hh_l{l}"),
                                (gates * h, h),
                                bound,
                            )?,
                            b_ih: p.uniform(&format!("encoder.bias_ih_l{l}"), gates * h, bound)?,
                            b_hh: p.uniform(&format!("encoder.bias_hh_l{l}"), gates * h, bound)?,
                        })
                    })
                    .collect()
            };
        let encoder = match config.encoder {
            EncoderKind::Lstm => Encoder::Lstm(rnn_layers(&mut p, 4)?),
            EncoderKind::Gru => Encoder::Gru(rnn_layers(&mut p, 3)?),
            EncoderKind::Transformer => Encoder::Transformer(TransformerEncoder::new(
                &mut p,
                config.embed_dim,
                config.num_layers,
                config.num_heads,
                config.ffn_dim,
                config.max_seq_len,
            )?),
        };
        let s = config.summary_dim();
        let bound = 1.0 / (s as f64).sqrt();
        let head_w = p.uniform("head.weight", (config.num_classes, s), bound)?;
        let head_b = p.uniform("head.bias", config.num_classes, bound)?;
        Ok(AttentionFlowModel {
            config: config.clone(),
            varmap,
            device: device.clone(),
            dtype,
            embedding,
            encoder,
            head_w,
            head_b,
            dropout: Dropout { p: config.dropout },
            fused: device.is_cpu() && dtype == DType::F32,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parameters, by name. Optimisers take their `Var`s from here.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Chooses between the fused CPU LSTM and GRU kernels and the reference composition of
    /// candle ops (the default picks fused on CPU in f32). Both compute the same function.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused && self.device.is_cpu() && self.dtype == DType::F32;
    }

    /// Class logits (B, num_classes) for a batch.
    pub fn forward(&self, batch: &Batch, mode: &mut Mode<'_>) -> Result<Tensor> {
        let mask = batch.mask.to_dtype(self.dtype)?;
        let summary = match &self.encoder {
            Encoder::Lstm(layers) if self.fused => self.rnn_fused(layers, batch, &mask, mode, 4)?,
            Encoder::Lstm(layers) => self.rnn_steps(layers, batch, None, &mask, mode, 4)?,
            Encoder::Gru(layers) if self.fused => self.rnn_fused(layers, batch, &mask, mode, 3)?,
            Encoder::Gru(layers) => self.rnn_steps(layers, batch, None, &mask, mode, 3)?,
            Encoder::Transformer(enc) => {
                let (b, t) = (batch.size, batch.steps);
                let x = self
                    .embedding
                    .index_select(&batch.ids.flatten_all()?, 0)?
                    .reshape((b, t, self.config.embed_dim))?;
                enc.forward(&x, &batch.positions, &mask, &self.dropout, mode)?
            }
        };
        let summary = self.dropout.apply(&summary, mode)?;
        Ok(summary
            .matmul(&self.head_w.t()?)?
            .broadcast_add(&self.head_b)?)
    }

    /// The embeddings of a batch's events (B, T, E).
    pub fn embed(&self, batch: &Batch) -> Result<Tensor> {
        Ok(self
            .embedding
            .index_select(&batch.ids.flatten_all()?, 0)?
            .reshape((batch.size, batch.steps, self.config.embed_dim))?)
    }

    /// Class logits (B, num_classes) of `batch` with its event embeddings replaced by
    /// `embedded` (B, T, E), dropout off, through candle's differentiable ops (never the
    /// fused kernel): what attributions take gradients of. With [`AttentionFlowModel::embed`]'s
    /// output it computes [`AttentionFlowModel::forward`]'s logits.
    pub fn forward_embedded(&self, embedded: &Tensor, batch: &Batch) -> Result<Tensor> {
        let mask = batch.mask.to_dtype(self.dtype)?;
        let mode = &mut Mode::Eval;
        let summary = match &self.encoder {
            Encoder::Lstm(layers) => {
                self.rnn_steps(layers, batch, Some(embedded), &mask, mode, 4)?
            }
            Encoder::Gru(layers) => {
                self.rnn_steps(layers, batch, Some(embedded), &mask, mode, 3)?
            }
            Encoder::Transformer(enc) => {
                enc.forward(embedded, &batch.positions, &mask, &self.dropout, mode)?
            }
        };
        Ok(summary
            .matmul(&self.head_w.t()?)?
            .broadcast_add(&self.head_b)?)
    }

    /// Mean cross-entropy loss of a batch and its logits.
    pub fn loss(&self, batch: &Batch, mode: &mut Mode<'_>) -> Result<(Tensor, Tensor)> {
        let logits = self.forward(batch, mode)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &batch.labels)?;
        Ok((loss, logits))
    }

    /// The first layer's input projection folded into the embedding:
    /// `embedding · W_ihᵀ + bias` is a (vocab, gates·H) lookup table, so the projection of a
    /// whole batch is a gather instead of a (B·T, E) × (E, gates·H) matmul.
    fn input_table(&self, layer: &RnnLayer, with_hh_bias: bool) -> candle_core::Result<Tensor> {
        let bias = if with_hh_bias {
            (&layer.b_ih + &layer.b_hh)?
        } else {
            layer.b_ih.clone()
        };
        self.embedding
            .matmul(&layer.w_ih.t()?)?
            .broadcast_add(&bias)
    }

    /// The LSTM (`gates` 4) or GRU (`gates` 3) through the fused CPU kernels.
    fn rnn_fused(
        &self,
        layers: &[RnnLayer],
        batch: &Batch,
        mask: &Tensor,
        mode: &mut Mode<'_>,
        gates: usize,
    ) -> Result<Tensor> {
        let (b, t, h) = (batch.size, batch.steps, self.config.hidden_size);
        let mut hs: Option<Tensor> = None;
        for layer in layers {
            let (w_hh, b_ih, b_hh) = (&layer.w_hh, &layer.b_ih, &layer.b_hh);
            hs = Some(match &hs {
                // First layer: the input projection is a gather from the embedding folded
                // through W_ih (the op adds the biases).
                None => {
                    let xproj = self
                        .embedding
                        .matmul(&layer.w_ih.t()?)?
                        .index_select(&batch.ids.flatten_all()?, 0)?
                        .reshape((b, t, gates * h))?;
                    if gates == 4 {
                        lstm::fused_lstm_projected(&xproj, w_hh, &(b_ih + b_hh)?, mask)?
                    } else {
                        gru::fused_gru_projected(&xproj, w_hh, b_ih, b_hh, mask)?
                    }
                }
                // Later layers project their (dropped-out) input inside the fused op.
                Some(prev) => {
                    let x = self.dropout.apply(prev, mode)?;
                    if gates == 4 {
                        lstm::fused_lstm(&x, &layer.w_ih, w_hh, &(b_ih + b_hh)?, mask)?
                    } else {
                        gru::fused_gru(&x, &layer.w_ih, w_hh, b_ih, b_hh, mask)?
                    }
                }
            });
        }
        let hs = hs.expect("at least one layer (validated)");
        Ok(hs.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// LSTM or GRU from per-step candle ops (reference path; any device and dtype).
    /// The recurrent encoders through candle's ops (differentiable in every input).
    /// `embedded` (B, T, E) replaces the embedding lookup of `batch.ids` when given.
    fn rnn_steps(
        &self,
        layers: &[RnnLayer],
        batch: &Batch,
        embedded: Option<&Tensor>,
        mask: &Tensor,
        mode: &mut Mode<'_>,
        gates: usize,
    ) -> Result<Tensor> {
        let t = batch.steps;
        let mask_steps = (0..t)
            .map(|s| mask.narrow(1, s, 1)?.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut steps: Vec<Tensor> = Vec::new();
        for (l, layer) in layers.iter().enumerate() {
            let lstm = gates == 4;
            let xproj: Vec<Tensor> = if let (0, Some(x)) = (l, embedded) {
                let w_t = layer.w_ih.t()?;
                let bias = if lstm {
                    (&layer.b_ih + &layer.b_hh)?
                } else {
                    layer.b_ih.clone()
                };
                (0..t)
                    .map(|s| {
                        x.narrow(1, s, 1)?
                            .squeeze(1)?
                            .matmul(&w_t)?
                            .broadcast_add(&bias)
                    })
                    .collect::<candle_core::Result<_>>()?
            } else if l == 0 {
                // Per-step gathers from the folded table: no slicing of a (B, T, *) tensor,
                // whose backward would cost O(T²).
                let table = self.input_table(layer, lstm)?;
                (0..t)
                    .map(|s| {
                        table.index_select(&batch.ids.narrow(1, s, 1)?.squeeze(1)?.contiguous()?, 0)
                    })
                    .collect::<candle_core::Result<_>>()?
            } else {
                let w_t = layer.w_ih.t()?;
                let bias = if lstm {
                    (&layer.b_ih + &layer.b_hh)?
                } else {
                    layer.b_ih.clone()
                };
                // One (B, T, H) mask, sliced per step: the same values the fused path draws.
                let shape = candle_core::Shape::from((batch.size, t, self.config.hidden_size));
                let mask = self.dropout.mask(&shape, &steps[0], mode)?;
                steps
                    .iter()
                    .enumerate()
                    .map(|(s, x)| {
                        let x = match &mask {
                            Some(m) => (x * m.narrow(1, s, 1)?.squeeze(1)?)?,
                            None => x.clone(),
                        };
                        x.matmul(&w_t)?.broadcast_add(&bias)
                    })
                    .collect::<candle_core::Result<_>>()?
            };
            steps = if lstm {
                lstm::reference_lstm(&xproj, &layer.w_hh, &mask_steps)?
            } else {
                gru::gru_steps(&xproj, &layer.w_hh, &layer.b_hh, &mask_steps)?
            };
        }
        Ok(steps.pop().expect("at least one step (batch is non-empty)"))
    }
}
#[cfg(test)]
mod kernel_tests;
#[cfg(test)]
mod tests;
