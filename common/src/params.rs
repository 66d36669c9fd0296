//! Named parameter sets: a model's weights (or one round's update) as an ordered map from
//! `VarMap` name to tensor, with safetensors (de)serialisation, validation against a spec, and
//! the arithmetic that FedAvg and differential privacy need.
//!
//! Architecture invariant: every tensor held by a [`ParamSet`] is detached from any autograd
//! graph and lives on the CPU, so a parameter set can be hashed, sent and stored without
//! touching an accelerator. Names are kept in a `BTreeMap`, so iteration order, the
//! safetensors bytes and the content hash are all deterministic.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use candle_core::{DType, Device, Storage, Tensor, WithDType};
use candle_nn::VarMap;

use crate::error::{Error, Result};
use crate::hash::HashingWriter;

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

    // --- Serialisation ---------------------------------------------------------------------

    /// Serialises to safetensors bytes, without metadata.
    ///
    /// Deterministic: the safetensors writer orders tensors by dtype, then name, and the
    /// header is written in that order, so equal parameter sets give equal bytes.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        safetensors::tensor::serialize(self.tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
            .map_err(|e| Error::Safetensors(format!("cannot serialise parameters: {e}")))
    }

    /// Writes exactly the bytes of [`ParamSet::to_safetensors_bytes`] to `w`, tensor by
    /// tensor, without building them in memory; returns how many bytes were written.
    ///
    /// The header comes from the `safetensors` crate itself (serialising zero-length views
    /// that report the real sizes), so names, order, offsets and padding are the crate's; the
    /// data of contiguous f32/f64 CPU tensors is then converted to little-endian bytes through
    /// a 64 KiB buffer, read in place. Other dtypes and non-contiguous tensors are copied
    /// once, one tensor at a time. `w` sees many small writes: give it a buffered writer.
    pub fn write_safetensors(&self, w: &mut impl std::io::Write) -> Result<u64> {
        let header = self.safetensors_header()?;
        let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header[8..])
            .map_err(|e| Error::Safetensors(format!("cannot serialise parameters: {e}")))?;
        let offsets = |name: &str| metadata.info(name).map_or((0, 0), |i| i.data_offsets);
        // The file's order (by descending dtype, then name) is the order of the offsets.
        let mut order: Vec<(&str, &Tensor)> = self.iter().collect();
        // (An empty tensor starts where the next one does: sort by the end too.)
        order.sort_by_key(|(name, _)| offsets(name));
        let io = |e: std::io::Error| Error::Safetensors(format!("cannot write parameters: {e}"));
        w.write_all(&header).map_err(io)?;
        let mut written = header.len() as u64;
        let mut buf = Vec::with_capacity(WRITE_BLOCK);
        for (name, t) in order {
            written += match t.dtype() {
                DType::F32 => write_le(w, t, &mut buf, f32::to_le_bytes)?,
                DType::F64 => write_le(w, t, &mut buf, f64::to_le_bytes)?,
                _ => {
                    let bytes = safetensors::View::data(&t);
                    w.write_all(&bytes).map_err(io)?;
                    bytes.len() as u64
                }
            };
            debug_assert_eq!(
                written,
                (header.len() + offsets(name).1) as u64,
                "tensor `{name}` must end where the header says"
            );
        }
        Ok(written)
    }

    /// The 8-byte length prefix and the JSON header that [`ParamSet::to_safetensors_bytes`]
    /// starts with, made by the `safetensors` crate from views without data.
    fn safetensors_header(&self) -> Result<Vec<u8>> {
        /// A tensor's dtype, shape and size, with no data.
        struct Shape<'a>(&'a Tensor);
        impl safetensors::View for Shape<'_> {
            fn dtype(&self) -> safetensors::Dtype {
                safetensors::View::dtype(&self.0)
            }
            fn shape(&self) -> &[usize] {
                self.0.dims()
            }
            fn data(&self) -> std::borrow::Cow<'_, [u8]> {
                std::borrow::Cow::Borrowed(&[])
            }
            fn data_len(&self) -> usize {
                safetensors::View::data_len(&self.0)
            }
        }
        safetensors::tensor::serialize(
            self.tensors.iter().map(|(k, t)| (k.as_str(), Shape(t))),
            None,
        )
        .map_err(|e| Error::Safetensors(format!("cannot serialise parameters: {e}")))
    }

    /// Parses safetensors bytes (metadata, if any, is ignored). The values are restored
    /// bit for bit.
    ///
    /// Garbage, truncated or inconsistent input gives [`Error::Safetensors`], never a panic.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, "parameter bytes")
    }

    /// Writes safetensors bytes to `path` atomically: a temporary file in the same directory
    /// is written, flushed to disk and renamed over `path`, so readers see either the old file
    /// or the complete new one.
    ///
    /// The bytes are streamed tensor by tensor ([`ParamSet::write_safetensors`]), never held
    /// whole. Returns the file's size and lowercase hex SHA-256 (that of
    /// [`ParamSet::to_safetensors_bytes`]), computed while writing.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(u64, String)> {
        let path = path.as_ref();
        crate::fsio::write_atomic_with(path, |file| {
            let mut w = HashingWriter::new(std::io::BufWriter::with_capacity(WRITE_BLOCK, file));
            self.write_safetensors(&mut w)?;
            let (_, sha256, size) = w.finish().map_err(|e| Error::io(path, e))?;
            Ok((size, sha256))
        })
    }

    /// Reads a safetensors file tensor by tensor, hashing it on the way, and returns the
    /// parameters with the file's size and lowercase hex SHA-256 (of every byte, trailing
    /// bytes included), so a caller can check the file against a recorded hash without
    /// holding its bytes and the parsed tensors at the same time: memory is the parameters
    /// plus a 64 KiB buffer (plus one tensor's bytes for dtypes other than f32/f64).
    ///
    /// The values are restored bit for bit, as by [`ParamSet::load`]. A malformed or
    /// truncated file gives [`Error::Safetensors`] or [`Error::Io`]; in particular a header
    /// describing more bytes than the file holds is refused before any tensor is allocated,
    /// so a small file cannot make the loader allocate what its header claims.
    pub fn load_hashed(path: impl AsRef<Path>) -> Result<(ParamSet, u64, String)> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let actual_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut r =
            crate::hash::HashingReader::new(std::io::BufReader::with_capacity(WRITE_BLOCK, file));
        let layout = SafetensorsLayout::read(&mut r)?;
        // Trailing bytes are allowed (and hashed), a data section shorter than the header's
        // claim is not.
        if layout.file_len > actual_len {
            return Err(Error::Safetensors(format!(
                "{} is {actual_len} bytes but its header describes {} bytes",
                path.display(),
                layout.file_len
            )));
        }
        let mut order: Vec<(&String, &std::ops::Range<u64>)> = layout.ranges.iter().collect();
        // (An empty tensor starts where the next one does: sort by the end too.)
        order.sort_by_key(|(_, range)| (range.start, range.end));
        let mut tensors = BTreeMap::new();
        for (name, range) in order {
            if range.start != r.bytes_read() {
                return Err(Error::Safetensors(format!(
                    "{}: tensor `{name}` does not start where the previous one ends",
                    path.display()
                )));
            }
            let spec = layout
                .spec
                .get(name)
                .expect("the layout's names are its spec's");
            let tensor = read_tensor(&mut r, spec, range.end - range.start)
                .map_err(|e| Error::io(path, e))?;
            tensors.insert(name.clone(), tensor);
        }
        std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| Error::io(path, e))?;
        let (sha256, size) = r.finish();
        Ok((Self::from_tensors(tensors)?, size, sha256))
    }

    /// Reads a file written by [`ParamSet::save`] (or any safetensors file).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, &path.display().to_string())
    }

    fn parse(bytes: &[u8], origin: &str) -> Result<Self> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
            Error::Safetensors(format!(
                "{origin} ({} bytes) are not a valid safetensors file: {e}",
                bytes.len()
            ))
        })?;
        Self::from_tensors(tensors.into_iter().collect())
    }

    /// SHA-256 of [`ParamSet::to_safetensors_bytes`], as 64 lowercase hex digits.
    ///
    /// Hashed while serialising tensor by tensor, so the bytes are never held whole.
    pub fn sha256_hex(&self) -> Result<String> {
        let mut w = HashingWriter::new(std::io::sink());
        self.write_safetensors(&mut w)?;
        let (_, sha256, _) = w
            .finish()
            .map_err(|e| Error::Safetensors(format!("cannot hash parameters: {e}")))?;
        Ok(sha256)
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

// ------------------------------------------------------------------------------------------------
// Safetensors headers
// ------------------------------------------------------------------------------------------------

/// The layout of a safetensors file, read from its header alone: where each tensor's bytes
/// are, so a large file can be processed tensor by tensor without loading it whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetensorsLayout {
    /// Names, shapes and dtypes of the tensors in the file.
    pub spec: ParamSpec,
    /// Each tensor's byte range, absolute within the file, keyed by name.
    pub ranges: BTreeMap<String, std::ops::Range<u64>>,
    /// Size of the whole file: the 8-byte length prefix, the JSON header and the data.
    pub file_len: u64,
}

impl SafetensorsLayout {
    /// Reads the 8-byte length prefix and the JSON header from `r` (positioned at the start
    /// of the file) and checks them with the `safetensors` crate (offsets contiguous and
    /// consistent with shapes and dtypes). Leaves `r` just after the header. The tensor data
    /// is not read, so `file_len` is the header's claim; compare it with the real size.
    ///
    /// Garbage or inconsistent headers give [`Error::Safetensors`]; dtypes candle cannot hold
    /// give [`Error::ParamMismatch`].
    pub fn read(r: &mut impl std::io::Read) -> Result<Self> {
        let bad = |why: String| Error::Safetensors(format!("invalid safetensors header: {why}"));
        let mut prefix = [0u8; 8];
        r.read_exact(&mut prefix)
            .map_err(|e| bad(format!("cannot read the length prefix: {e}")))?;
        let n = u64::from_le_bytes(prefix);
        if n > MAX_HEADER_BYTES {
            return Err(bad(format!(
                "header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES}"
            )));
        }
        let mut header = vec![0u8; n as usize];
        r.read_exact(&mut header)
            .map_err(|e| bad(format!("cannot read the {n}-byte header: {e}")))?;
        // `Metadata`'s deserialiser sorts by offset and validates offsets against shapes and
        // dtypes (what `SafeTensors::read_metadata` does, minus its whole-buffer check).
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
        let data_start = 8 + n;
        let mut entries = BTreeMap::new();
        let mut ranges = BTreeMap::new();
        for (name, info) in metadata.tensors() {
            let dtype = dtype_from_safetensors(info.dtype).ok_or_else(|| {
                Error::ParamMismatch(format!(
                    "tensor `{name}` has unsupported dtype {:?}",
                    info.dtype
                ))
            })?;
            let (start, end) = info.data_offsets;
            ranges.insert(
                name.clone(),
                data_start + start as u64..data_start + end as u64,
            );
            entries.insert(
                name,
                TensorSpec {
                    shape: info.shape.clone(),
                    dtype,
                },
            );
        }
        Ok(SafetensorsLayout {
            spec: ParamSpec::new(entries),
            ranges,
            file_len: data_start + metadata.data_len() as u64,
        })
    }
}

/// Largest safetensors JSON header accepted (the `safetensors` crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

fn dtype_from_safetensors(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F64 => DType::F64,
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I16 => DType::I16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

/// Bytes converted at a time by [`ParamSet::write_safetensors`].
const WRITE_BLOCK: usize = 64 * 1024;

/// Writes the values of `t` (of dtype `T`) to `w` as little-endian bytes through `buf`;
/// returns the number of bytes written.
fn write_le<T: WithDType, const N: usize>(
    w: &mut impl std::io::Write,
    t: &Tensor,
    buf: &mut Vec<u8>,
    to_le: fn(T) -> [u8; N],
) -> Result<u64> {
    with_slice::<T, _>(t, |xs| {
        for run in xs.chunks(WRITE_BLOCK / N) {
            buf.clear();
            for &x in run {
                buf.extend_from_slice(&to_le(x));
            }
            w.write_all(buf)?;
        }
        Ok((xs.len() * N) as u64)
    })?
    .map_err(|e: std::io::Error| Error::Safetensors(format!("cannot write parameters: {e}")))
}

/// Reads one tensor of `len` bytes shaped like `spec` from `r`: f32 and f64 values are
/// decoded block by block straight into the tensor's buffer; other dtypes are read whole and
/// then copied into a tensor.
fn read_tensor(r: &mut impl std::io::Read, spec: &TensorSpec, len: u64) -> std::io::Result<Tensor> {
    let bad = |e: candle_core::Error| std::io::Error::other(e.to_string());
    let shape = spec.shape.as_slice();
    match spec.dtype {
        DType::F32 => {
            Tensor::from_vec(read_le(r, len, f32::from_le_bytes)?, shape, &Device::Cpu).map_err(bad)
        }
        DType::F64 => {
            Tensor::from_vec(read_le(r, len, f64::from_le_bytes)?, shape, &Device::Cpu).map_err(bad)
        }
        dtype => {
            let mut bytes = vec![0u8; len as usize];
            r.read_exact(&mut bytes)?;
            Tensor::from_raw_buffer(&bytes, dtype, shape, &Device::Cpu).map_err(bad)
        }
    }
}

/// Reads `len` bytes of little-endian values from `r` through a 64 KiB buffer.
fn read_le<T, const N: usize>(
    r: &mut impl std::io::Read,
    len: u64,
    from_le: fn([u8; N]) -> T,
) -> std::io::Result<Vec<T>> {
    let count = (len / N as u64) as usize;
    let mut out = Vec::with_capacity(count);
    let mut buf = vec![0u8; WRITE_BLOCK];
    let mut left = count * N;
    while left > 0 {
        let block = &mut buf[..left.min(WRITE_BLOCK)];
        r.read_exact(block)?;
        left -= block.len();
        out.extend(
            block
                .chunks_exact(N)
                .map(|b| from_le(b.try_into().expect("chunks of N bytes"))),
        );
    }
    Ok(out)
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
