//! Update compression: how a site's delta is made smaller before it leaves, and how the
//! coordinator reads it back.
//!
//! A [`Compression`] combines an optional *sparsifier* (top-k: per tensor, the k values of
//! largest magnitude, with `k = max(1, ⌈fraction · n⌉)`) with a *value codec* (f32, f16,
//! bf16, or blockwise int8: one f32 scale per block of values, `q = round(x / scale)` in
//! −127..=127 with `scale = max|x| / 127`). The compressed update is an ordinary
//! safetensors file whose tensors are named after the parameters
//! ([`Compression::encoded_spec`] gives its exact layout, so the coordinator refuses anything
//! else before reading a value):
//!
//! | parameter `p` of n values | tensors                                                |
//! |---------------------------|--------------------------------------------------------|
//! | f32                       | `p` (f32, the parameter's shape): no compression       |
//! | f16 / bf16                | `p` (f16 / bf16, the parameter's shape)                |
//! | int8                      | `p#q` (u8 × n, two's-complement int8), `p#scale` (f32)  |
//! | top-k + codec             | `p#index` (u32 × k, strictly increasing), then the     |
//! |                           | k values as above: `p#value`, or `p#q` and `p#scale`   |
//!
//! (u8 holds the int8 codes because candle has no i8 dtype.)
//!
//! # Decoded values
//!
//! Every decoded value is an f32: f16 and bf16 widen exactly, int8 decodes as
//! `scale * (q as f32)` computed in f32, and a coordinate top-k did not send is 0. So the
//! decoded update is an ordinary f32 [`ParamSet`](crate::params::ParamSet) whose [`l2_norm`](crate::params::ParamSet::l2_norm) is exactly
//! the norm the coordinator's streaming reader ([`visit`]) computes, and a site can make
//! sure the norm the coordinator checks is within a bound ([`encode`]'s `max_norm`).
//!
//! # Differential privacy
//!
//! Compression runs at the site after everything that makes the update private (DP-SGD's
//! noisy training, site-level clipping and noise), so what it sends is a function of an
//! already private release: post-processing (Dwork & Roth 2014, Prop. 2.1), which never
//! weakens a guarantee. Where the coordinator's sum must itself have bounded sensitivity
//! (site-level DP's central mode), it checks the *decoded* update's norm against the bound,
//! and the site's encoder shrinks its update until the decoded norm is within it. Error
//! feedback ([`Compression::error_feedback`]) adds back what earlier compressions dropped:
//! a function of the site's earlier releases, so again post-processing for record-level DP,
//! and for site-level DP each round's decoded update is still within the bound.

use std::io::{Read, Seek};

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::params::{ParamSpec, SafetensorsLayout, TensorSpec};

mod decode;
mod dense;
mod encode;

pub(crate) use decode::scatter;
pub use decode::{Positions, decode_bytes, visit};
pub(crate) use dense::DenseWriter;
pub use encode::{Encoded, encode};

/// Separates a parameter's name from its part in an encoded update (`p#q`, `p#scale`, ...).
/// Parameter names never contain it ([`Compression::encoded_spec`] refuses one that does).
pub const PART_SEPARATOR: char = '#';

/// Largest accepted int8 block size.
pub const MAX_BLOCK: usize = 1 << 20;

/// How every value (or every kept value, with top-k) is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueCodec {
    /// 32-bit floats, unchanged.
    F32,
    /// IEEE half precision, rounded to nearest (magnitudes above 65,504 saturate).
    F16,
    /// bfloat16 (f32's exponent, 8 significant bits), rounded to nearest.
    Bf16,
    /// Blockwise int8: each block of `block` consecutive values shares one f32 scale.
    Int8,
}

impl ValueCodec {
    /// The codec's name in configurations and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ValueCodec::F32 => "f32",
            ValueCodec::F16 => "f16",
            ValueCodec::Bf16 => "bf16",
            ValueCodec::Int8 => "int8",
        }
    }

    /// Parses a codec name (`f32`, `f16`, `bf16`, `int8`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "f32" => ValueCodec::F32,
            "f16" => ValueCodec::F16,
            "bf16" => ValueCodec::Bf16,
            "int8" => ValueCodec::Int8,
            _ => return None,
        })
    }
}

/// How a run's sites compress their updates (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Compression {
    /// The value codec.
    pub values: ValueCodec,
    /// Values per int8 scale (used by [`ValueCodec::Int8`] only).
    pub block_size: usize,
    /// Top-k sparsification: the fraction of each tensor's values sent (0 < f ≤ 1); `None`
    /// sends every value.
    pub top_k: Option<f64>,
    /// Each site keeps what compression dropped (its residual) and adds it to its next
    /// update before compressing.
    pub error_feedback: bool,
}

/// The int8 block size when none is configured.
pub const DEFAULT_BLOCK: usize = 256;

impl Default for Compression {
    fn default() -> Self {
        Compression::NONE
    }
}

impl Compression {
    /// No compression: updates are plain f32 safetensors, as without a `[compression]`
    /// section.
    pub const NONE: Compression = Compression {
        values: ValueCodec::F32,
        block_size: DEFAULT_BLOCK,
        top_k: None,
        error_feedback: false,
    };

    /// Whether this sends updates unchanged (f32, every value).
    pub fn is_none(&self) -> bool {
        self.values == ValueCodec::F32 && self.top_k.is_none()
    }

    /// Whether the decoded update can differ from the update (every mode but none).
    pub fn is_lossy(&self) -> bool {
        !self.is_none()
    }

    /// Checks the settings, naming the field (as in `[compression]`) that is wrong.
    pub fn check(&self) -> Result<()> {
        if self.values == ValueCodec::Int8 && !(1..=MAX_BLOCK).contains(&self.block_size) {
            return Err(Error::Config(format!(
                "compression.block_size must be in 1..={MAX_BLOCK}, got {}",
                self.block_size
            )));
        }
        if let Some(f) = self.top_k
            && !(f.is_finite() && f > 0.0 && f <= 1.0)
        {
            return Err(Error::Config(format!(
                "compression.top_k must be a fraction in (0, 1], got {f}"
            )));
        }
        if self.error_feedback && self.is_none() {
            return Err(Error::Config(
                "compression.error_feedback needs a lossy compression (values other than \
                 f32, or top_k): uncompressed updates drop nothing to feed back"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The canonical name of this compression, as sites echo it in their update headers and
    /// reports print it: `f32`, `f16`, `bf16`, `int8/256`, `top0.01+f32`, `top0.01+int8/256`,
    /// with `+ef` when error feedback is on.
    pub fn name(&self) -> String {
        let values = match self.values {
            ValueCodec::Int8 => format!("int8/{}", self.block_size),
            v => v.as_str().to_string(),
        };
        let mut name = match self.top_k {
            Some(f) => format!("top{f}+{values}"),
            None => values,
        };
        if self.error_feedback {
            name.push_str("+ef");
        }
        name
    }

    /// How many values top-k keeps of a tensor of `n` (all of them without top-k).
    pub fn kept(&self, n: usize) -> usize {
        match self.top_k {
            Some(f) if n > 0 => (((n as f64) * f).ceil() as usize).clamp(1, n),
            _ => n,
        }
    }

    /// The exact names, shapes and dtypes of an update of a model shaped like `spec`,
    /// compressed this way (see the module docs). Fails with [`Error::ParamMismatch`] for a
    /// parameter that is not f32, has [`PART_SEPARATOR`] in its name or more values than a
    /// u32 can index.
    pub fn encoded_spec(&self, spec: &ParamSpec) -> Result<ParamSpec> {
        if self.is_none() {
            return Ok(spec.clone());
        }
        let mut out = std::collections::BTreeMap::new();
        for (name, t) in spec.iter() {
            if t.dtype != DType::F32 {
                return Err(Error::ParamMismatch(format!(
                    "tensor `{name}` has dtype {}; compressed updates need f32 parameters",
                    t.dtype.as_str()
                )));
            }
            if name.contains(PART_SEPARATOR) {
                return Err(Error::ParamMismatch(format!(
                    "tensor `{name}`: a compressed update cannot name a parameter with \
                     `{PART_SEPARATOR}` in it"
                )));
            }
            let n = t.elem_count();
            if n > u32::MAX as usize {
                return Err(Error::ParamMismatch(format!(
                    "tensor `{name}` has {n} values, more than a compressed update can index"
                )));
            }
            let k = self.kept(n);
            let flat = |len: usize, dtype: DType| TensorSpec {
                shape: vec![len],
                dtype,
            };
            if self.top_k.is_some() {
                out.insert(part(name, Part::Index), flat(k, DType::U32));
            }
            match self.values {
                ValueCodec::Int8 => {
                    out.insert(part(name, Part::Codes), flat(k, DType::U8));
                    out.insert(
                        part(name, Part::Scale),
                        flat(k.div_ceil(self.block_size), DType::F32),
                    );
                }
                v => {
                    let dtype = float_dtype(v);
                    if self.top_k.is_some() {
                        out.insert(part(name, Part::Value), flat(k, dtype));
                    } else {
                        out.insert(
                            name.to_string(),
                            TensorSpec {
                                shape: t.shape.clone(),
                                dtype,
                            },
                        );
                    }
                }
            }
        }
        Ok(ParamSpec::new(out))
    }

    /// The size in bytes of a compressed update of a model shaped like `spec` (header
    /// excluded): what a site sends per round, before the safetensors header.
    pub fn payload_bytes(&self, spec: &ParamSpec) -> Result<u64> {
        Ok(self
            .encoded_spec(spec)?
            .iter()
            .map(|(_, t)| (t.elem_count() * t.dtype.size_in_bytes()) as u64)
            .sum())
    }
}

impl Compression {
    /// The exact size in bytes of every update of a model shaped like `spec` compressed
    /// this way (its layout is fixed: header and payload), so a coordinator can size its
    /// upload limit.
    pub fn update_bytes(&self, spec: &ParamSpec) -> Result<u64> {
        /// A tensor's dtype, shape and size, with no data.
        struct Shape(safetensors::Dtype, Vec<usize>, usize);
        impl safetensors::View for &Shape {
            fn dtype(&self) -> safetensors::Dtype {
                self.0
            }
            fn shape(&self) -> &[usize] {
                &self.1
            }
            fn data(&self) -> std::borrow::Cow<'_, [u8]> {
                std::borrow::Cow::Borrowed(&[])
            }
            fn data_len(&self) -> usize {
                self.2
            }
        }
        let encoded = self.encoded_spec(spec)?;
        let mut shapes = Vec::new();
        for (name, t) in encoded.iter() {
            let dtype = match t.dtype {
                DType::U8 => safetensors::Dtype::U8,
                DType::U32 => safetensors::Dtype::U32,
                DType::F16 => safetensors::Dtype::F16,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::F32 => safetensors::Dtype::F32,
                DType::F64 => safetensors::Dtype::F64,
                d => {
                    return Err(Error::ParamMismatch(format!(
                        "tensor `{name}` has dtype {}, which updates do not use",
                        d.as_str()
                    )));
                }
            };
            let len = t.elem_count() * t.dtype.size_in_bytes();
            shapes.push((name, Shape(dtype, t.shape.clone(), len)));
        }
        let header = safetensors::tensor::serialize(shapes.iter().map(|(n, s)| (*n, s)), None)
            .map_err(|e| Error::Safetensors(format!("cannot size an update: {e}")))?;
        Ok(header.len() as u64 + self.payload_bytes(spec)?)
    }
}

/// The part of a parameter a tensor of an encoded update holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// Top-k's indices.
    Index,
    /// Float values (top-k with an f32, f16 or bf16 codec).
    Value,
    /// int8 codes.
    Codes,
    /// int8 scales.
    Scale,
}

/// The name of `p`'s part in an encoded update.
pub(crate) fn part(p: &str, part: Part) -> String {
    let suffix = match part {
        Part::Index => "index",
        Part::Value => "value",
        Part::Codes => "q",
        Part::Scale => "scale",
    };
    format!("{p}{PART_SEPARATOR}{suffix}")
}

/// The candle dtype of a float codec.
pub(crate) fn float_dtype(v: ValueCodec) -> DType {
    match v {
        ValueCodec::F16 => DType::F16,
        ValueCodec::Bf16 => DType::BF16,
        _ => DType::F32,
    }
}

/// Reads the layout of the encoded update in `r` (positioned at its start, `len` bytes long,
/// named `what` in errors) and checks it describes exactly `len` bytes and the layout
/// `compression` gives `spec` ([`Error::Safetensors`], [`Error::ParamMismatch`]).
pub fn read_layout<R: Read + Seek>(
    r: &mut R,
    len: u64,
    what: &str,
    spec: &ParamSpec,
    compression: &Compression,
) -> Result<SafetensorsLayout> {
    let layout = SafetensorsLayout::read(r)?;
    if layout.file_len != len {
        return Err(Error::Safetensors(format!(
            "{what} is {len} bytes but its header describes {} bytes",
            layout.file_len
        )));
    }
    compression
        .encoded_spec(spec)?
        .check_matches(&layout.spec)
        .map_err(|e| match e {
            Error::ParamMismatch(m) => Error::ParamMismatch(format!(
                "{m} (the run compresses updates as {})",
                compression.name()
            )),
            e => e,
        })?;
    Ok(layout)
}

#[cfg(test)]
mod tests;
