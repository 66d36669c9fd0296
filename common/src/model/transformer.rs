//! A small Transformer encoder: pre-layer-norm blocks of multi-head self-attention (with a
//! key padding mask) and a feed-forward network, learned positional embeddings counted from
//! each session's first real event, and masked mean pooling.
//!
//! Parameter names follow PyTorch's `nn.TransformerEncoder` of
//! `nn.TransformerEncoderLayer(norm_first=True, activation="gelu")` (`layers.{i}.self_attn.*`,
//! `linear1`, `linear2`, `norm1`, `norm2`, final `norm`), plus a learned `pos_embedding`;
//! dropout sits on the attention weights and on both residual branches.
//!
//! Padding never influences real positions: padded keys get a large negative attention bias
//! (their softmax weight underflows to exactly zero), positions are relative to the first
//! real event, and pooling averages real positions only.

use candle_core::{D, Tensor};

use super::init::ParamBuilder;
use super::{Dropout, Mode};

/// Parameters of one encoder block.
#[derive(Debug)]
struct Block {
    ln1: (Tensor, Tensor),
    in_proj_w: Tensor,
    in_proj_b: Tensor,
    out_proj_w: Tensor,
    out_proj_b: Tensor,
    ln2: (Tensor, Tensor),
    ffn1_w: Tensor,
    ffn1_b: Tensor,
    ffn2_w: Tensor,
    ffn2_b: Tensor,
}

/// The Transformer encoder (embedding handled by the caller).
#[derive(Debug)]
pub(crate) struct TransformerEncoder {
    pos: Tensor,
    blocks: Vec<Block>,
    final_ln: (Tensor, Tensor),
    heads: usize,
}

const LN_EPS: f32 = 1e-5;
/// Additive attention bias for padded keys; exp() of it underflows to 0 in f32 and f64.
const MASKED: f64 = -1e9;

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (bsz, t, d) = x.dims3()?;
    x.reshape((bsz * t, d))?
        .matmul(&w.t()?)?
        .broadcast_add(b)?
        .reshape((bsz, t, w.dim(0)?))
}

fn layer_norm(x: &Tensor, ln: &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    candle_nn::ops::layer_norm_slow(x, &ln.0, &ln.1, LN_EPS)
}

impl TransformerEncoder {
    pub(crate) fn new(
        p: &mut ParamBuilder,
        dim: usize,
        layers: usize,
        heads: usize,
        ffn_dim: usize,
        max_len: usize,
    ) -> candle_core::Result<Self> {
        let pos = p.normal("encoder.pos_embedding", (max_len, dim), 0.02)?;
        let mut blocks = Vec::with_capacity(layers);
        for l in 0..layers {
            let n = |s: &str| format!("encoder.layers.{l}.{s}");
            blocks.push(Block {
                ln1: (
                    p.ones(&n("norm1.weight"), dim)?,
                    p.zeros(&n("norm1.bias"), dim)?,
                ),
                in_proj_w: p.uniform(
                    &n("self_attn.in_proj_weight"),
                    (3 * dim, dim),
                    (1.0 / dim as f64).sqrt(),
                )?,
                in_proj_b: p.zeros(&n("self_attn.in_proj_bias"), 3 * dim)?,
                out_proj_w: p.uniform(
                    &n("self_attn.out_proj.weight"),
                    (dim, dim),
                    (1.0 / dim as f64).sqrt(),
                )?,
                out_proj_b: p.zeros(&n("self_attn.out_proj.bias"), dim)?,
                ln2: (
                    p.ones(&n("norm2.weight"), dim)?,
                    p.zeros(&n("norm2.bias"), dim)?,
                ),
                ffn1_w: p.uniform(
                    &n("linear1.weight"),
                    (ffn_dim, dim),
                    (1.0 / dim as f64).sqrt(),
                )?,
                ffn1_b: p.uniform(&n("linear1.bias"), ffn_dim, (1.0 / dim as f64).sqrt())?,
                ffn2_w: p.uniform(
                    &n("linear2.weight"),
                    (dim, ffn_dim),
                    (1.0 / ffn_dim as f64).sqrt(),
                )?,
                ffn2_b: p.uniform(&n("linear2.bias"), dim, (1.0 / ffn_dim as f64).sqrt())?,
            });
        }
        let final_ln = (
            p.ones("encoder.norm.weight", dim)?,
            p.zeros("encoder.norm.bias", dim)?,
        );
        Ok(TransformerEncoder {
            pos,
            blocks,
            final_ln,
            heads,
        })
    }

    /// `x`: token embeddings (B, T, D); `positions` (B, T) u32; `mask` (B, T) float.
    /// Returns the pooled summary (B, D).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        dropout: &Dropout,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let pos = self
            .pos
            .index_select(&positions.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let mut x = (x + pos)?;
        // (B, 1, 1, T): 0 for real keys, MASKED for padding.
        let key_bias = ((1.0 - mask)? * MASKED)?.reshape((b, 1, 1, t))?;
        let heads = self.heads;
        let dh = d / heads;
        let scale = 1.0 / (dh as f64).sqrt();
        for blk in &self.blocks {
            let y = layer_norm(&x, &blk.ln1)?;
            let qkv = linear(&y, &blk.in_proj_w, &blk.in_proj_b)?
                .reshape((b, t, 3, heads, dh))?
                .permute((2, 0, 3, 1, 4))?;
            let q = qkv.get(0)?.contiguous()?;
            let k = qkv.get(1)?.contiguous()?;
            let v = qkv.get(2)?.contiguous()?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&key_bias)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let probs = dropout.apply(&probs, mode)?;
            let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
            let attn = linear(&attn, &blk.out_proj_w, &blk.out_proj_b)?;
            x = (x + dropout.apply(&attn, mode)?)?;
            let y = layer_norm(&x, &blk.ln2)?;
            let y = linear(&y, &blk.ffn1_w, &blk.ffn1_b)?.gelu_erf()?;
            let y = linear(&y, &blk.ffn2_w, &blk.ffn2_b)?;
            x = (x + dropout.apply(&y, mode)?)?;
        }
        let x = layer_norm(&x, &self.final_ln)?;
        let m = mask.unsqueeze(2)?;
        let len = mask.sum_keepdim(1)?;
        x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&len)
    }
}
