//! Named parameter sets: a model's weights (or one round's update) as an ordered map from
//! `VarMap` name to tensor, with validation against a spec and the arithmetic that FedAvg
//! and differential privacy need. The safetensors codec (encoding, decoding, streamed file
//! I/O, header checks) is in `codec.rs`.
//!
//! Architecture invariant: every tensor held by a [`ParamSet`] is detached from any autograd
//! graph and lives on the CPU, so a parameter set can be hashed, sent and stored without
//! touching an accelerator. Names are kept in a `BTreeMap`, so iteration order, the
//! safetensors bytes and the content hash are all deterministic.

use std::collections::BTreeMap;
use std::fmt;

use candle_core::{DType, Device, Storage, Tensor, WithDType};
use candle_nn::VarMap;

use crate::error::{Error, Result};

mod codec;

pub use codec::SafetensorsLayout;

/// The safetensors header key reserved for free-form metadata; no tensor may use it.
const METADATA_KEY: &str = "__metadata__";

/// How many names a mismatch message lists per category before summarising the rest.
const MAX_LISTED: usize = 10;

/// How many times [`ParamSet::clip_to_norm`] nudges its factor down to absorb f32 rounding.
const MAX_CLIP_RETRIES: usize = 8;

// ------------------------------------------------------------------------------------------------
// Specs
// ------------------------------------------------------------------------------------------------

/// The shape and dtype of one named tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Dimensions, outermost first (empty for a scalar).
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
}

impl TensorSpec {
    /// The spec of an existing tensor.
    pub fn of(tensor: &Tensor) -> Self {
        Self {
            shape: tensor.dims().to_vec(),
            dtype: tensor.dtype(),
        }
    }

    /// Number of elements (1 for a scalar).
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

impl fmt::Display for TensorSpec {
    /// Formats as `f32[2, 3]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype.as_str(), self.shape)
    }
}

/// The names, shapes and dtypes a parameter set must have (its values are not part of it).
///
/// Typically taken from the global model with [`ParamSet::spec`] and used to check every
/// update a client sends before it is aggregated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamSpec {
    entries: BTreeMap<String, TensorSpec>,
}

impl ParamSpec {
    /// A spec from explicit entries.
    pub fn new(entries: BTreeMap<String, TensorSpec>) -> Self {
        Self { entries }
    }

    /// The spec of one tensor.
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.entries.get(name)
    }

    /// Entries in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TensorSpec)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Tensor names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the spec names no tensor at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.entries.values().map(TensorSpec::elem_count).sum()
    }

    /// Checks that `params` has exactly these names, shapes and dtypes (values are not read).
    ///
    /// Every difference is reported in one [`Error::ParamMismatch`]: names missing from
    /// `params`, names `params` has but the spec does not, and tensors whose shape or dtype
    /// differ.
    pub fn check_structure(&self, params: &ParamSet) -> Result<()> {
        self.check_matches(&params.spec())
    }

    /// Checks that `got` has exactly these names, shapes and dtypes, reporting every
    /// difference in one [`Error::ParamMismatch`] as [`ParamSpec::check_structure`] does.
    pub fn check_matches(&self, got: &ParamSpec) -> Result<()> {
        let mut missing = Vec::new();
        let mut differing = Vec::new();
        for (name, want) in &self.entries {
            match got.entries.get(name) {
                None => missing.push(format!("`{name}`")),
                Some(got) => {
                    if got != want {
                        differing.push(format!("`{name}` is {got}, expected {want}"));
                    }
                }
            }
        }
        let unexpected: Vec<String> = got
            .entries
            .keys()
            .filter(|name| !self.entries.contains_key(*name))
            .map(|name| format!("`{name}`"))
            .collect();
        if missing.is_empty() && unexpected.is_empty() && differing.is_empty() {
            return Ok(());
        }
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!(
                "{} tensor(s) missing: {}",
                missing.len(),
                list(&missing)
            ));
        }
        if !unexpected.is_empty() {
            parts.push(format!(
                "{} unexpected tensor(s): {}",
                unexpected.len(),
                list(&unexpected)
            ));
        }
        if !differing.is_empty() {
            parts.push(format!(
                "{} tensor(s) differ: {}",
                differing.len(),
                list(&differing)
            ));
        }
        Err(Error::ParamMismatch(parts.join("; ")))
    }
}

impl From<&ParamSet> for ParamSpec {
    fn from(params: &ParamSet) -> Self {
        params.spec()
    }
}

/// Joins at most [`MAX_LISTED`] items, saying how many more were left out.
fn list(items: &[String]) -> String {
    let mut out = items
        .iter()
        .take(MAX_LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > MAX_LISTED {
        out.push_str(&format!(" and {} more", items.len() - MAX_LISTED));
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Parameter sets
// ------------------------------------------------------------------------------------------------

/// An ordered map from parameter name (as in a candle `VarMap`, e.g.
/// `encoder.lstm.weight_ih_l0`) to a detached CPU tensor.
///
/// Cloning is cheap: tensors share their storage, which a `ParamSet` never mutates.
#[derive(Clone, Default)]
pub struct ParamSet {
    tensors: BTreeMap<String, Tensor>,
}

impl fmt::Debug for ParamSet {
    /// Lists names and specs only; values would flood logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Spec(TensorSpec);
        impl fmt::Debug for Spec {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        struct Specs<'a>(&'a BTreeMap<String, Tensor>);
        impl fmt::Debug for Specs<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|(k, t)| (k, Spec(TensorSpec::of(t)))))
                    .finish()
            }
        }
        f.debug_struct("ParamSet")
            .field("num_elements", &self.num_elements())
            .field("tensors", &Specs(&self.tensors))
            .finish()
    }
}

impl ParamSet {
    /// Wraps named tensors, detaching them and moving them to the CPU.
    ///
    /// CPU tensors are not copied: do not pass tensors whose storage is later changed in place
    /// (a `Var`'s tensor, say); [`ParamSet::from_varmap`] copies for that reason.
    ///
    /// Fails on an empty name, on the name `__metadata__` (reserved by safetensors) and on the
    /// sub-byte dtypes (`f4`, `f6e2m3`, `f6e3m2`, `f8e8m0`), which cannot be serialised.
    pub fn from_tensors(tensors: BTreeMap<String, Tensor>) -> Result<Self> {
        let mut out = BTreeMap::new();
        for (name, tensor) in tensors {
            if name.is_empty() || name == METADATA_KEY {
                return Err(Error::ParamMismatch(format!(
                    "invalid tensor name `{name}`: names must be non-empty and not `{METADATA_KEY}`"
                )));
            }
            if !is_supported_dtype(tensor.dtype()) {
                return Err(Error::ParamMismatch(format!(
                    "tensor `{name}` has dtype {}, which parameter sets do not support",
                    tensor.dtype().as_str()
                )));
            }
            let tensor = tensor.detach().to_device(&Device::Cpu)?;
            out.insert(name, tensor);
        }
        Ok(Self { tensors: out })
    }

    /// Copies every variable of `varmap` (detached, to the CPU), so later training steps do
    /// not change the copy.
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let vars = varmap
            .data()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut tensors = BTreeMap::new();
        for (name, var) in vars.iter() {
            let t = var.as_tensor().detach();
            // `to_device` is a shallow clone on the CPU, so copy explicitly there.
            let t = if t.device().is_cpu() {
                t.copy()?
            } else {
                t.to_device(&Device::Cpu)?
            };
            tensors.insert(name.clone(), t);
        }
        drop(vars);
        Self::from_tensors(tensors)
    }

    /// Sets every variable of `varmap` to the value of the same-named tensor here, moving it to
    /// the variable's device.
    ///
    /// Nothing is changed unless the names, shapes and dtypes match exactly: tensors missing
    /// here, tensors the `VarMap` does not have, and differing shapes/dtypes are all reported
    /// (as [`Error::ParamMismatch`]).
    pub fn load_into_varmap(&self, varmap: &VarMap) -> Result<()> {
        let vars = varmap
            .data()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let spec = ParamSpec::new(
            vars.iter()
                .map(|(name, var)| (name.clone(), TensorSpec::of(var.as_tensor())))
                .collect(),
        );
        spec.check_structure(self)?;
        for (name, var) in vars.iter() {
            let src = self.tensors[name].to_device(var.device())?;
            var.set(&src)?;
        }
        Ok(())
    }

    /// Tensors in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Tensor names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.tensors.values().map(Tensor::elem_count).sum()
    }

    /// The names, shapes and dtypes of these tensors.
    pub fn spec(&self) -> ParamSpec {
        ParamSpec::new(
            self.tensors
                .iter()
                .map(|(k, t)| (k.clone(), TensorSpec::of(t)))
                .collect(),
        )
    }

    /// Gives back the underlying map.
    pub fn into_tensors(self) -> BTreeMap<String, Tensor> {
        self.tensors
    }

    // --- Validation ------------------------------------------------------------------------

    /// Checks names, shapes and dtypes against `spec` (see [`ParamSpec::check_structure`]),
    /// then that every value is finite.
    ///
    /// A non-finite value gives [`Error::NonFinite`] with the first offending tensor (in name
    /// order) and how many of its values are NaN or infinite.
    pub fn validate_against(&self, spec: &ParamSpec) -> Result<()> {
        spec.check_structure(self)?;
        self.check_finite()
    }

    /// Fails with [`Error::NonFinite`] on the first tensor (in name order) holding NaN or Inf.
    pub fn check_finite(&self) -> Result<()> {
        for (name, t) in &self.tensors {
            let count = count_non_finite(t)?;
            if count > 0 {
                return Err(Error::NonFinite {
                    name: name.clone(),
                    count,
                });
            }
        }
        Ok(())
    }

    // --- Arithmetic ------------------------------------------------------------------------

    /// `local - global`, tensor by tensor. Both must have the same names, shapes and dtypes
    /// ("missing" in an error means present in `global` but not in `local`). Values are not
    /// checked; use [`ParamSet::validate_against`] for that.
    pub fn delta(local: &ParamSet, global: &ParamSet) -> Result<ParamSet> {
        global.spec().check_structure(local)?;
        let tensors = local
            .tensors
            .iter()
            .map(|(name, l)| Ok((name.clone(), l.sub(&global.tensors[name])?)))
            .collect::<Result<_>>()?;
        Ok(ParamSet { tensors })
    }

    /// `global + scale * delta`, tensor by tensor. Both must have the same names, shapes and
    /// dtypes. Values are not checked.
    pub fn apply_delta(global: &ParamSet, delta: &ParamSet, scale: f32) -> Result<ParamSet> {
        global.spec().check_structure(delta)?;
        let tensors = global
            .tensors
            .iter()
            .map(|(name, g)| {
                let d = &delta.tensors[name];
                let sum = if scale == 1.0 {
                    g.add(d)?
                } else {
                    g.add(&d.affine(f64::from(scale), 0.0)?)?
                };
                Ok((name.clone(), sum))
            })
            .collect::<Result<_>>()?;
        Ok(ParamSet { tensors })
    }

    /// Every tensor multiplied by `factor`.
    pub fn scale(&self, factor: f32) -> Result<ParamSet> {
        let tensors = self
            .tensors
            .iter()
            .map(|(name, t)| Ok((name.clone(), t.affine(f64::from(factor), 0.0)?)))
            .collect::<Result<_>>()?;
        Ok(ParamSet { tensors })
    }

    /// The L2 norm of all values taken together, as if the tensors were one flat vector.
    ///
    /// Squares are accumulated in f64, which cannot overflow for f32 inputs (at most
    /// `(2^128)^2 = 2^256` per term). NaN or Inf anywhere makes the result non-finite.
    pub fn l2_norm(&self) -> Result<f64> {
        let mut sum = 0.0f64;
        for t in self.tensors.values() {
            for_each_value(t, |x| sum += x * x)?;
        }
        Ok(sum.sqrt())
    }

    /// Scales the whole set by `min(1, c / norm)` so its L2 norm is at most `c`, and returns
    /// the scaled set with the norm it had before.
    ///
    /// A set already within the bound (including the all-zero set, whose norm is 0 and where
    /// Flower's version divides by zero) is returned unchanged, bit for bit. The bound is
    /// guaranteed after f32 rounding: if rounding pushes the norm just above `c`, the factor is
    /// nudged down by one ulp at a time until it does not.
    ///
    /// Fails when `c` is not finite and positive ([`Error::Aggregation`]) or when a value is
    /// NaN or infinite ([`Error::NonFinite`]).
    pub fn clip_to_norm(&self, c: f64) -> Result<(ParamSet, f64)> {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::Aggregation(format!(
                "clipping norm must be finite and > 0, got {c}"
            )));
        }
        let norm = self.l2_norm()?;
        if !norm.is_finite() {
            self.check_finite()?;
            // Unreachable for finite inputs (see `l2_norm`), but never return a bogus clip.
            return Err(Error::Aggregation(format!(
                "l2 norm is not finite ({norm})"
            )));
        }
        if norm <= c {
            return Ok((self.clone(), norm));
        }
        let mut factor = (c / norm) as f32;
        for _ in 0..MAX_CLIP_RETRIES {
            let clipped = self.scale(factor)?;
            if clipped.l2_norm()? <= c {
                return Ok((clipped, norm));
            }
            factor = factor.next_down();
        }
        Err(Error::Aggregation(format!(
            "cannot clip l2 norm {norm} to {c} in f32"
        )))
    }
}

// ------------------------------------------------------------------------------------------------
// Element access
// ------------------------------------------------------------------------------------------------

/// Whether a [`ParamSet`] may hold this dtype: everything safetensors and candle can round
/// trip, which excludes the sub-byte float formats.
fn is_supported_dtype(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::U8
            | DType::U32
            | DType::I16
            | DType::I32
            | DType::I64
            | DType::BF16
            | DType::F16
            | DType::F32
            | DType::F64
            | DType::F8E4M3
    )
}

/// Runs `f` on the tensor's elements as one slice in row-major order.
///
/// A contiguous CPU tensor is borrowed in place (no copy, no allocation); anything else is
/// copied once. `T` must be the tensor's dtype.
pub(crate) fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            let data = cpu.as_slice::<T>()?;
            return Ok(f(&data[start..end]));
        }
    }
    let owned = t.flatten_all()?.to_vec1::<T>()?;
    Ok(f(&owned))
}

/// Calls `f` with every element as f64 (exact for every supported dtype but large i64).
///
/// f32 and f64 tensors are read in place; other dtypes are converted once.
pub(crate) fn for_each_value(t: &Tensor, mut f: impl FnMut(f64)) -> Result<()> {
    match t.dtype() {
        DType::F32 => with_slice::<f32, _>(t, |s| s.iter().for_each(|&x| f(f64::from(x)))),
        DType::F64 => with_slice::<f64, _>(t, |s| s.iter().for_each(|&x| f(x))),
        _ => {
            let t = t.to_dtype(DType::F64)?;
            with_slice::<f64, _>(&t, |s| s.iter().for_each(|&x| f(x)))
        }
    }
}

/// How many elements are NaN or infinite (always 0 for integer dtypes).
pub(crate) fn count_non_finite(t: &Tensor) -> Result<usize> {
    if !t.dtype().is_float() {
        return Ok(0);
    }
    let mut count = 0;
    for_each_value(t, |x| count += usize::from(!x.is_finite()))?;
    Ok(count)
}

#[cfg(test)]
mod tests;
