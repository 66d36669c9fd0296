//! Compressing an update at the site: [`encode`].

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use half::{bf16, f16};

use super::{Compression, Part, ValueCodec, decode_bytes, part};
use crate::error::{Error, Result};
use crate::params::ParamSet;

/// How many times [`encode`] shrinks an update whose decoded norm is above `max_norm`
/// before giving up (one is enough for int8 and top-k; rounding to f16 or bf16 may need a
/// second).
const MAX_SHRINK: i32 = 8;

/// A compressed update, with what a site needs to know about it.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The compressed update's safetensors bytes: what goes on the wire.
    pub bytes: Vec<u8>,
    /// What was compressed: the update given to [`encode`], clipped to `max_norm` (and,
    /// when the decoded update came out above it, scaled down until it did not).
    pub input: ParamSet,
    /// The update as the coordinator decodes it ([`decode_bytes`]).
    pub decoded: ParamSet,
    /// The decoded update's L2 norm, exactly as the coordinator computes it.
    pub norm: f64,
}

impl Encoded {
    /// What compression dropped, `input - decoded`: error feedback's residual.
    pub fn residual(&self) -> Result<ParamSet> {
        ParamSet::delta(&self.input, &self.decoded)
    }
}

/// Compresses `update` (f32 tensors, every value finite) as `compression` says. With
/// `max_norm`, the update is first clipped to it and, if the *decoded* update's norm is
/// still above it (quantisation can round values up), scaled down until it is not, so the
/// coordinator's check of the decoded norm passes and the bound it accounts for holds for
/// what it sums.
///
/// Deterministic: the same update gives the same bytes (top-k breaks ties between equal
/// magnitudes by the lower index; rounding is to nearest). Fails on a non-finite value
/// ([`Error::NonFinite`]), a parameter compression cannot hold
/// ([`Error::ParamMismatch`], see [`Compression::encoded_spec`]) or invalid settings
/// ([`Error::Config`]).
pub fn encode(
    update: &ParamSet,
    compression: &Compression,
    max_norm: Option<f64>,
) -> Result<Encoded> {
    compression.check()?;
    let spec = update.spec();
    compression.encoded_spec(&spec)?;
    update.check_finite()?;
    let mut input = match max_norm {
        Some(m) => update.clip_to_norm(m)?.0,
        None => update.clone(),
    };
    if compression.is_none() {
        let norm = input.l2_norm()?;
        return Ok(Encoded {
            bytes: input.to_safetensors_bytes()?,
            decoded: input.clone(),
            input,
            norm,
        });
    }
    for attempt in 0..MAX_SHRINK {
        let bytes = encode_once(&input, compression)?;
        let decoded = decode_bytes(&bytes, &spec, compression)?;
        let norm = decoded.l2_norm()?;
        match max_norm {
            Some(m) if norm > m => {
                // A margin that grows with every attempt, so rounding cannot undo it forever.
                let factor = m / norm * (1.0 - f64::powi(2.0, -20 + 2 * attempt));
                input = input.scale(factor as f32)?;
            }
            _ => {
                return Ok(Encoded {
                    bytes,
                    input,
                    decoded,
                    norm,
                });
            }
        }
    }
    Err(Error::Aggregation(format!(
        "cannot compress the update as {} within L2 norm {}",
        compression.name(),
        max_norm.unwrap_or(f64::INFINITY)
    )))
}

/// One compression of `input`, without the norm check.
fn encode_once(input: &ParamSet, c: &Compression) -> Result<Vec<u8>> {
    let mut out = BTreeMap::new();
    let cpu = &Device::Cpu;
    for (name, t) in input.iter() {
        let xs: Vec<f32> = t.flatten_all()?.to_vec1::<f32>()?;
        let n = xs.len();
        let kept: Vec<f32> = match c.top_k {
            Some(_) => {
                let indices = top_k(&xs, c.kept(n));
                let values = indices.iter().map(|&i| xs[i as usize]).collect();
                let k = indices.len();
                out.insert(part(name, Part::Index), Tensor::from_vec(indices, k, cpu)?);
                values
            }
            None => xs,
        };
        let k = kept.len();
        let dense_shape = t.dims().to_vec();
        let shape = |k: usize| -> Vec<usize> {
            if c.top_k.is_some() {
                vec![k]
            } else {
                dense_shape.clone()
            }
        };
        let value_name = if c.top_k.is_some() {
            part(name, Part::Value)
        } else {
            name.to_string()
        };
        match c.values {
            ValueCodec::F32 => {
                out.insert(value_name, Tensor::from_vec(kept, shape(k), cpu)?);
            }
            ValueCodec::F16 => {
                let max = f16::MAX.to_f32();
                let v: Vec<f16> = kept
                    .iter()
                    .map(|&x| f16::from_f32(x.clamp(-max, max)))
                    .collect();
                out.insert(value_name, Tensor::from_vec(v, shape(k), cpu)?);
            }
            ValueCodec::Bf16 => {
                let max = bf16::MAX.to_f32();
                let v: Vec<bf16> = kept
                    .iter()
                    .map(|&x| bf16::from_f32(x.clamp(-max, max)))
                    .collect();
                out.insert(value_name, Tensor::from_vec(v, shape(k), cpu)?);
            }
            ValueCodec::Int8 => {
                let (codes, scales) = int8(&kept, c.block_size);
                let blocks = scales.len();
                out.insert(part(name, Part::Codes), Tensor::from_vec(codes, k, cpu)?);
                out.insert(
                    part(name, Part::Scale),
                    Tensor::from_vec(scales, blocks, cpu)?,
                );
            }
        }
    }
    ParamSet::from_tensors(out)?.to_safetensors_bytes()
}

/// The indices of the `k` values of largest magnitude, in increasing order (ties go to the
/// lower index).
fn top_k(xs: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..xs.len() as u32).collect();
    if k < xs.len() {
        let order = |a: &u32, b: &u32| {
            xs[*b as usize]
                .abs()
                .total_cmp(&xs[*a as usize].abs())
                .then(a.cmp(b))
        };
        if k > 0 {
            idx.select_nth_unstable_by(k - 1, order);
        }
        idx.truncate(k);
        idx.sort_unstable();
    }
    idx
}

/// Blockwise symmetric int8: per block of `block` values, `scale = max|x| / 127` and
/// `q = round(x / scale)` (0 for an all-zero block), the codes as two's-complement bytes.
fn int8(xs: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(xs.len());
    let mut scales = Vec::with_capacity(xs.len().div_ceil(block));
    for chunk in xs.chunks(block) {
        let max = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = max / 127.0;
        scales.push(scale);
        for &x in chunk {
            let q = if scale > 0.0 {
                (x / scale).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            };
            codes.push(q as u8);
        }
    }
    (codes, scales)
}
