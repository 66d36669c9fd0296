//! Streaming weighted FedAvg: client deltas are folded into one f64 buffer per tensor as they
//! arrive, so memory stays at one model's worth however many clients report.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::compress::{self, Compression};
use crate::error::{Error, Result};
use crate::params::{ParamSet, ParamSpec, SafetensorsLayout, with_slice};

/// Bytes read at a time by [`FedAvgAccumulator::add_safetensors_file`] (a multiple of every
/// element size).
const READ_BLOCK: usize = 1 << 20;

/// Accumulates `Σ wᵢ·δᵢ` and `Σ wᵢ` over client deltas and yields the weighted mean
/// `Σ wᵢ·δᵢ / Σ wᵢ`.
///
/// Memory is one f64 per model parameter (twice an f32 model), independent of the number of
/// clients; [`FedAvgAccumulator::add`] allocates nothing for contiguous f32/f64 CPU tensors
/// (which is what [`ParamSet`]s normally hold).
///
/// # Order independence
///
/// Every product `wᵢ·δᵢ` and every running sum is kept in f64, and the mean is rounded to the
/// spec's dtype once, in [`FedAvgAccumulator::finish`]. Floating-point addition is not
/// associative, so the arrival order can change the f64 sum, but only slightly: the relative
/// error of an n-term f64 sum is at most `(n-1)·2⁻⁵³·Σ|terms| / |Σ terms|`. Unless the terms
/// cancel almost completely that is far below f32 resolution (2⁻²⁴), so after the single
/// rounding to f32 the result is the same for every arrival order, or at most one ulp apart
/// when the exact mean lies within that tiny error of a rounding boundary.
///
/// # All or nothing
///
/// [`FedAvgAccumulator::add`] checks the whole input before touching the buffers, so a rejected
/// update leaves the accumulator exactly as it was and the round can go on without it.
#[derive(Debug)]
pub struct FedAvgAccumulator {
    spec: ParamSpec,
    /// One buffer per tensor, in the spec's (name) order, row-major.
    sums: Vec<Vec<f64>>,
    total_weight: f64,
    count: usize,
    /// The bound on every update's L2 norm, if any.
    norm_bound: Option<NormBound>,
    /// How updates are compressed ([`Compression::NONE`]: plain safetensors of the spec).
    compression: Compression,
}

/// A bound on the L2 norm of every update (over all tensors, computed in f64 exactly as
/// [`ParamSet::l2_norm`] does), and what happens to an update above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormBound {
    /// Refuse it with [`Error::Aggregation`], changing nothing (site-level DP's check that
    /// every site clipped).
    Refuse(f64),
    /// Scale it down to the bound before it is used (norm clipping, the defence of Sun et
    /// al. 2019, "Can you really backdoor federated learning?"): its direction is kept, its
    /// influence bounded.
    Clip(f64),
}

impl NormBound {
    /// The bound.
    pub fn limit(&self) -> f64 {
        match *self {
            NormBound::Refuse(b) | NormBound::Clip(b) => b,
        }
    }

    /// The factor an update of L2 norm `norm` is multiplied by before it is used (1 within
    /// the bound), or the refusal.
    fn scale(&self, norm: f64) -> Result<f64> {
        match *self {
            _ if norm <= self.limit() => Ok(1.0),
            NormBound::Refuse(bound) => Err(Error::Aggregation(format!(
                "update L2 norm {norm} exceeds the bound {bound} (each site must clip its \
                 delta to it)"
            ))),
            NormBound::Clip(bound) => Ok(bound / norm),
        }
    }
}

/// What an accumulator did with an accepted update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Added {
    /// The update's L2 norm as received.
    pub norm: f64,
    /// The factor it was multiplied by ([`NormBound::Clip`]; 1 when it was within the bound
    /// or there is none).
    pub scale: f64,
}

impl Added {
    /// Whether the update was clipped to the bound.
    pub fn clipped(&self) -> bool {
        self.scale < 1.0
    }
}

/// The factor an update of `norm` is used with under `bound` (see [`NormBound`]).
pub(crate) fn bounded(bound: Option<NormBound>, norm: f64) -> Result<Added> {
    let scale = match bound {
        Some(b) => b.scale(norm)?,
        None => 1.0,
    };
    Ok(Added { norm, scale })
}

impl FedAvgAccumulator {
    /// An empty accumulator for deltas shaped like `spec`.
    ///
    /// Fails with [`Error::Aggregation`] if a tensor in `spec` has an integer dtype, which
    /// cannot be averaged.
    pub fn new(spec: &ParamSpec) -> Result<Self> {
        check_float_spec(spec, "fedavg")?;
        Ok(Self {
            spec: spec.clone(),
            sums: spec
                .iter()
                .map(|(_, t)| vec![0.0; t.elem_count()])
                .collect(),
            total_weight: 0.0,
            count: 0,
            norm_bound: None,
            compression: Compression::NONE,
        })
    }

    /// The same accumulator taking updates compressed as `compression` says
    /// ([`crate::compress`]): each is decoded block by block straight into the sums, its
    /// *decoded* norm checked against the bound. Fails with [`Error::ParamMismatch`] when
    /// the spec cannot be compressed that way, [`Error::Config`] for invalid settings.
    pub fn with_compression(mut self, compression: Compression) -> Result<Self> {
        compression.check()?;
        compression.encoded_spec(&self.spec)?;
        self.compression = compression;
        Ok(self)
    }

    /// How the updates it takes are compressed.
    pub fn compression(&self) -> &Compression {
        &self.compression
    }

    /// The same accumulator bounding every update's L2 norm by `bound` (refusing or clipping
    /// what exceeds it, see [`NormBound`]). A clipped update keeps its weight: its delta is
    /// what is scaled.
    pub fn with_norm_bound(mut self, bound: NormBound) -> Self {
        self.norm_bound = Some(bound);
        self
    }

    /// The bound on every update's norm, if any.
    pub fn norm_bound(&self) -> Option<NormBound> {
        self.norm_bound
    }

    /// Adds `weight · scale · delta`, `scale` being 1 unless the norm bound clips it.
    ///
    /// Checks everything first and changes nothing on error: `weight` must be finite, positive
    /// and at most [`MAX_WEIGHT`] ([`Error::Aggregation`]); `delta` must have exactly the
    /// spec's names, shapes and dtypes ([`Error::ParamMismatch`]), only finite values
    /// ([`Error::NonFinite`]) and a norm within a refusing bound ([`Error::Aggregation`]).
    ///
    /// With compression ([`FedAvgAccumulator::with_compression`]) `delta` is the compressed
    /// update (its tensors as [`Compression::encoded_spec`] names them), checked and decoded
    /// like a file ([`FedAvgAccumulator::add_safetensors_file`]).
    pub fn add(&mut self, delta: &ParamSet, weight: f64) -> Result<Added> {
        if self.compression.is_lossy() {
            check_weight(weight)?;
            let bytes = delta.to_safetensors_bytes()?;
            let len = bytes.len() as u64;
            let what = Path::new("<compressed update>");
            return self.add_encoded(&mut std::io::Cursor::new(bytes), len, what, weight);
        }
        // Reads every value once to check it; the accumulation below reads it a second time
        // rather than buffering a copy of the update.
        let added = check_update(&self.spec, self.norm_bound, delta, weight)?;
        self.add_checked(delta, weight, added)
    }

    /// [`FedAvgAccumulator::add`] of an update that passed [`check_update`].
    fn add_checked(&mut self, delta: &ParamSet, weight: f64, added: Added) -> Result<Added> {
        // Same names in the same (sorted) order as the spec, so the zip lines up.
        for (sum, (_, t)) in self.sums.iter_mut().zip(delta.iter()) {
            accumulate(sum, t, weight * added.scale)?;
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(added)
    }

    /// Adds `weight · delta` where `delta` is the safetensors file at `path`, streaming it
    /// tensor by tensor through one reusable buffer (1 MiB) instead of
    /// loading it, so an update never exists in memory as a whole.
    ///
    /// Same checks and same result as [`FedAvgAccumulator::add`] of the parsed file (bit for
    /// bit), and likewise all or nothing: a first pass reads the header (names, shapes,
    /// dtypes, offsets, file size) and every value (finiteness) and changes nothing on error;
    /// only then does a second pass add. Errors: the weight ([`Error::Aggregation`]), the
    /// structure ([`Error::ParamMismatch`]), non-finite values ([`Error::NonFinite`]), a
    /// malformed or truncated file ([`Error::Safetensors`]) or reading it ([`Error::Io`]).
    ///
    /// With compression the file is the compressed update: its layout must be exactly the
    /// compressed one, and its values are decoded block by block in both passes (the norm
    /// checked is the decoded update's).
    pub fn add_safetensors_file(&mut self, path: &Path, weight: f64) -> Result<Added> {
        check_weight(weight)?;
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        if self.compression.is_lossy() {
            let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
            return self.add_encoded(&mut file, len, path, weight);
        }
        let mut buf = vec![0u8; READ_BLOCK];
        // Pass 1: everything but the weight (checked above).
        let checked = check_update_file(&self.spec, self.norm_bound, &mut file, path, &mut buf)?;
        let added = checked.added;
        if let Some(parsed) = checked.parsed {
            return self.add_checked(&parsed, weight, added);
        }
        let layout = checked.layout;
        let factor = weight * added.scale;
        // Pass 2: add. A read error here (the file changed under us) would leave a partial
        // sum; spill files are private to the coordinator, so this is an I/O failure of the
        // machine, reported as such.
        for ((name, t), sum) in self.spec.iter().zip(self.sums.iter_mut()) {
            let range = layout.ranges[name].clone();
            stream_values(&mut file, path, range, t.dtype, &mut buf, |at, xs| {
                for (s, &x) in sum[at..].iter_mut().zip(xs) {
                    *s += factor * x;
                }
            })?;
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(added)
    }

    /// Adds the compressed update in `r` (`len` bytes, named `what`): pass 1 checks
    /// ([`check_encoded`]), pass 2 decodes again into the sums.
    fn add_encoded<R: Read + Seek>(
        &mut self,
        r: &mut R,
        len: u64,
        what: &Path,
        weight: f64,
    ) -> Result<Added> {
        let (layout, added) =
            check_encoded(&self.spec, &self.compression, self.norm_bound, r, len, what)?;
        let factor = weight * added.scale;
        let sums = &mut self.sums;
        // A read error here (the file changed under us) would leave a partial sum; spill
        // files are private to the coordinator, so this is an I/O failure of the machine.
        compress::visit(
            r,
            what,
            &layout,
            &self.spec,
            &self.compression,
            |t, pos, xs| {
                compress::scatter(&mut sums[t], pos, xs, |s, x| *s += factor * x);
            },
        )?;
        self.total_weight += weight;
        self.count += 1;
        Ok(added)
    }

    /// The weighted mean of everything added, rounded once to each tensor's dtype and shaped
    /// like the spec.
    ///
    /// Fails with [`Error::Aggregation`] if nothing was added.
    pub fn finish(self) -> Result<ParamSet> {
        if self.count == 0 {
            return Err(Error::Aggregation(
                "no updates were added; cannot average an empty round".into(),
            ));
        }
        let total = self.total_weight;
        let mut tensors = std::collections::BTreeMap::new();
        for ((name, t), sum) in self.spec.iter().zip(self.sums) {
            let shape = t.shape.as_slice();
            let tensor = match t.dtype {
                DType::F32 => {
                    let mean: Vec<f32> = sum.iter().map(|&s| (s / total) as f32).collect();
                    Tensor::from_vec(mean, shape, &Device::Cpu)?
                }
                dtype => {
                    let mean: Vec<f64> = sum.iter().map(|&s| s / total).collect();
                    Tensor::from_vec(mean, shape, &Device::Cpu)?.to_dtype(dtype)?
                }
            };
            tensors.insert(name.to_string(), tensor);
        }
        let mean = ParamSet::from_tensors(tensors)?;
        // Only reachable with absurd weights (f64 overflow) or f16 ranges; never hand it on.
        mean.check_finite()?;
        Ok(mean)
    }

    /// Site-level DP's release (DP-FedAvg with the fixed-denominator estimator of McMahan et
    /// al. 2018, Algorithm 1): adds N(0, `noise_std`²) to every coordinate of the f64 sum,
    /// drawn from `rng` (the coordinator's CSPRNG), then divides by `denominator` (the
    /// expected number of contributions) instead of the total weight, so one site moves the
    /// result by at most its clip / `denominator`. Unlike [`FedAvgAccumulator::finish`], an
    /// empty round is allowed: it releases the noise alone.
    pub fn finish_dp<R: rand::Rng + rand::CryptoRng>(
        mut self,
        denominator: f64,
        noise_std: f64,
        rng: &mut R,
    ) -> Result<ParamSet> {
        if !(denominator.is_finite() && denominator > 0.0) {
            return Err(Error::Aggregation(format!(
                "the DP denominator must be > 0, got {denominator}"
            )));
        }
        for sum in &mut self.sums {
            crate::privacy::add_gaussian(sum, noise_std, rng);
        }
        self.count = self.count.max(1);
        self.total_weight = denominator;
        self.finish()
    }

    /// The spec every update must match.
    pub fn spec(&self) -> &ParamSpec {
        &self.spec
    }

    /// How many updates were accepted.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Sum of the accepted updates' weights.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }
}

/// Largest accepted update weight (weights are example counts in practice).
///
/// The cap keeps every sum finite: |weight · x| ≤ 1e12 · 3.4e38 for f32 values, so even 10^200
/// updates cannot overflow f64. Without it, one update with weight 1e300 would pass
/// validation and then turn the whole round's average into infinities.
pub const MAX_WEIGHT: f64 = 1e12;

/// Fails with [`Error::Aggregation`] unless `weight` is finite, positive and at most
/// [`MAX_WEIGHT`].
pub(crate) fn check_weight(weight: f64) -> Result<()> {
    if weight.is_finite() && weight > 0.0 && weight <= MAX_WEIGHT {
        Ok(())
    } else {
        Err(Error::Aggregation(format!(
            "update weight must be finite, > 0 and <= {MAX_WEIGHT:e}, got {weight}"
        )))
    }
}

/// Fails with [`Error::Aggregation`] if a tensor of `spec` has an integer dtype: `rule` (as in
/// "`rule` needs floating-point tensors") cannot aggregate it.
pub(crate) fn check_float_spec(spec: &ParamSpec, rule: &str) -> Result<()> {
    match spec.iter().find(|(_, t)| !t.dtype.is_float()) {
        Some((name, t)) => Err(Error::Aggregation(format!(
            "tensor `{name}` has dtype {}; {rule} needs floating-point tensors",
            t.dtype.as_str()
        ))),
        None => Ok(()),
    }
}

/// Every check an in-memory update must pass before any aggregator keeps it: the weight
/// ([`check_weight`]), exactly `spec`'s names, shapes and dtypes ([`Error::ParamMismatch`]),
/// finite values ([`Error::NonFinite`]) and the `norm_bound`, if any
/// ([`Error::Aggregation`] for a refusing one). Returns its norm and the factor it is used
/// with.
pub(crate) fn check_update(
    spec: &ParamSpec,
    norm_bound: Option<NormBound>,
    delta: &ParamSet,
    weight: f64,
) -> Result<Added> {
    check_weight(weight)?;
    delta.validate_against(spec)?;
    bounded(norm_bound, delta.l2_norm()?)
}

/// A safetensors update that passed [`check_update_file`].
#[derive(Debug)]
pub(crate) struct CheckedFile {
    /// Where each tensor's bytes are (its spec equals the one checked against).
    pub(crate) layout: SafetensorsLayout,
    /// The parsed update, for specs with a dtype other than f32/f64, whose values are not
    /// streamed but parsed (and checked) whole; `None` for f32/f64 specs.
    pub(crate) parsed: Option<ParamSet>,
    /// Its norm and the factor it is used with.
    pub(crate) added: Added,
}

/// The checks of [`check_update`] but the weight's (the caller checks it first, before any
/// I/O) for the safetensors update open as `file`, whose name in messages is `path`.
///
/// The header must describe exactly the file's size ([`Error::Safetensors`]) and `spec`'s
/// names, shapes and dtypes ([`Error::ParamMismatch`]). For f32/f64 specs every value is then
/// streamed through `buf` (a multiple of 8 bytes long) to check it is finite and to sum the
/// squares in the order of [`ParamSet::l2_norm`]; other specs are parsed whole and go
/// through [`check_update`]. `file` is read from its start and left at an unspecified
/// position.
pub(crate) fn check_update_file(
    spec: &ParamSpec,
    norm_bound: Option<NormBound>,
    file: &mut std::fs::File,
    path: &Path,
    buf: &mut [u8],
) -> Result<CheckedFile> {
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let actual_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let layout = SafetensorsLayout::read(file)?;
    if layout.file_len != actual_len {
        return Err(Error::Safetensors(format!(
            "{} is {actual_len} bytes but its header describes {} bytes",
            path.display(),
            layout.file_len
        )));
    }
    spec.check_matches(&layout.spec)?;
    if spec
        .iter()
        .any(|(_, t)| !matches!(t.dtype, DType::F32 | DType::F64))
    {
        // Half-precision models are not streamed (they never occur in fedflow today).
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        let mut bytes = Vec::with_capacity(actual_len as usize);
        file.read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        let parsed = ParamSet::from_safetensors_bytes(&bytes)?;
        drop(bytes);
        // The weight was checked by the caller; 1 passes.
        let added = check_update(spec, norm_bound, &parsed, 1.0)?;
        return Ok(CheckedFile {
            layout,
            parsed: Some(parsed),
            added,
        });
    }
    // Every value must be finite (and the norm within the bound, if any; the squares are
    // summed in the same order as `ParamSet::l2_norm`).
    let mut squares = 0.0f64;
    for (name, t) in spec.iter() {
        let range = layout.ranges[name].clone();
        let mut non_finite = 0usize;
        stream_values(file, path, range, t.dtype, buf, |_, xs| {
            for &x in xs {
                non_finite += usize::from(!x.is_finite());
                squares += x * x;
            }
        })?;
        if non_finite > 0 {
            return Err(Error::NonFinite {
                name: name.to_string(),
                count: non_finite,
            });
        }
    }
    let added = bounded(norm_bound, squares.sqrt())?;
    Ok(CheckedFile {
        layout,
        parsed: None,
        added,
    })
}

/// Every check of [`check_update`] but the weight's for the update in `r` (`len` bytes,
/// named `what`) compressed as `compression` says: the layout
/// ([`compress::read_layout`]), the values while decoding them ([`compress::visit`]) and the
/// bound on the *decoded* update's norm. Returns the layout with the norm and the factor.
pub(crate) fn check_encoded<R: Read + Seek>(
    spec: &ParamSpec,
    compression: &Compression,
    norm_bound: Option<NormBound>,
    r: &mut R,
    len: u64,
    what: &Path,
) -> Result<(SafetensorsLayout, Added)> {
    r.seek(SeekFrom::Start(0)).map_err(|e| Error::io(what, e))?;
    let layout = compress::read_layout(r, len, &what.display().to_string(), spec, compression)?;
    let mut squares = 0.0f64;
    compress::visit(r, what, &layout, spec, compression, |_, _, xs| {
        for &x in xs {
            squares += x * x;
        }
    })?;
    Ok((layout, bounded(norm_bound, squares.sqrt())?))
}

/// Reads the little-endian f32 or f64 values in `range` of `file` block by block through
/// `buf`, widening them to f64 in a small stack buffer, and calls `f(index, values)` with the
/// index of the first value of each run.
fn stream_values(
    file: &mut std::fs::File,
    path: &Path,
    range: std::ops::Range<u64>,
    dtype: DType,
    buf: &mut [u8],
    mut f: impl FnMut(usize, &[f64]),
) -> Result<()> {
    let size = dtype.size_in_bytes();
    file.seek(SeekFrom::Start(range.start))
        .map_err(|e| Error::io(path, e))?;
    let mut left = range.end - range.start;
    let mut index = 0usize;
    let mut wide = [0f64; 256];
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        let block = &mut buf[..n];
        file.read_exact(block).map_err(|e| Error::io(path, e))?;
        left -= n as u64;
        for run in block.chunks(wide.len() * size) {
            let count = run.len() / size;
            match dtype {
                DType::F32 => {
                    for (w, b) in wide.iter_mut().zip(run.chunks_exact(4)) {
                        *w = f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    }
                }
                _ => {
                    for (w, b) in wide.iter_mut().zip(run.chunks_exact(8)) {
                        *w = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                    }
                }
            }
            f(index, &wide[..count]);
            index += count;
        }
    }
    Ok(())
}

/// `sum += weight · t`, element by element, reading `t` in place when it is a contiguous CPU
/// f32/f64 tensor. The caller has checked that `t` has `sum.len()` elements.
fn accumulate(sum: &mut [f64], t: &Tensor, weight: f64) -> Result<()> {
    match t.dtype() {
        DType::F32 => with_slice::<f32, _>(t, |xs| {
            for (s, &x) in sum.iter_mut().zip(xs) {
                *s += weight * f64::from(x);
            }
        }),
        DType::F64 => with_slice::<f64, _>(t, |xs| {
            for (s, &x) in sum.iter_mut().zip(xs) {
                *s += weight * x;
            }
        }),
        // Half-precision and f8 widen exactly to f64; this copies once.
        _ => {
            let t = t.to_dtype(DType::F64)?;
            accumulate(sum, &t, weight)
        }
    }
}

#[cfg(test)]
mod tests;
