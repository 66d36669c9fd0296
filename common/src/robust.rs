//! Robust aggregation for hostile sites: the coordinate-wise median and the coordinate-wise
//! trimmed mean of the sites' deltas, as Flower's `FedMedian` and `FedTrimmedAvg` strategies
//! compute them (`flwr.server.strategy.aggregate.aggregate_median` and
//! `aggregate_trimmed_avg`), after Yin, Chen, Ramchandran and Bartlett, "Byzantine-robust
//! distributed learning: towards optimal statistical rates", ICML 2018.
//!
//! Unlike a mean, neither rule can be folded into a running sum, so [`RobustAccumulator`]
//! keeps every accepted update as a scratch safetensors file and [`RobustAccumulator::finish`]
//! reads the same block of coordinates from all of them at once: memory is one block per
//! update plus the result, however large the model and however many sites report.
//!
//! Flower aggregates whole models and fedflow aggregates deltas from one global model; both
//! rules commute with adding the same global value to every input, so the results agree (up to
//! the rounding of that addition).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::compress::{self, Compression};
use crate::error::{Error, Result};
use crate::fedavg::{
    Added, NormBound, check_encoded, check_float_spec, check_update, check_update_file,
    check_weight,
};
use crate::params::{ParamSet, ParamSpec, SafetensorsLayout};

/// Coordinates read from every kept update at a time by [`RobustAccumulator::finish`].
const BLOCK: usize = 4096;

/// Bytes moved at a time when an update file is copied into the spill directory and then
/// checked (a multiple of every element size).
const COPY_BLOCK: usize = 1 << 20;

/// How many names [`RobustAccumulator`] tries before giving up on finding an unused one.
const MAX_NAME_TRIES: usize = 1000;

/// Numbers the spill files of this process, so that accumulators sharing a directory never
/// pick the same name.
static NEXT_SPILL: AtomicU64 = AtomicU64::new(0);

/// A coordinate-wise robust aggregation rule.
///
/// Both rules are unweighted, like Flower's `FedMedian` and `FedTrimmedAvg`: every accepted
/// update counts once whatever its weight (an example count is exactly what a hostile site
/// would inflate). Both compute in f64 and round once to the tensor's dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RobustRule {
    /// The coordinate-wise median (Yin et al. 2018, "coordinate-wise median"; Flower's
    /// `FedMedian`, which calls `np.median`). With an even number of updates it is the mean
    /// of the two middle values, as in NumPy. It tolerates up to ⌊(n−1)/2⌋ arbitrary updates
    /// out of n: the result then stays within the range of the honest values.
    Median,
    /// The coordinate-wise β-trimmed mean (Yin et al. 2018, "coordinate-wise trimmed mean";
    /// Flower's `FedTrimmedAvg` with `beta = trim_fraction`): per coordinate, the ⌊β·n⌋
    /// smallest and the ⌊β·n⌋ largest of the n values are dropped and the rest averaged.
    /// β = 0 is the plain unweighted mean; it tolerates up to ⌊β·n⌋ arbitrary updates.
    TrimmedMean {
        /// β, the fraction of values dropped at each end: finite, in `[0, 0.5)`.
        trim_fraction: f64,
    },
}

impl RobustRule {
    /// Fails with [`Error::Aggregation`] if the rule's parameter is out of its domain (a
    /// trimmed mean's β must be finite and in `[0, 0.5)`, so that a value always remains).
    pub fn check(&self) -> Result<()> {
        match *self {
            RobustRule::Median => Ok(()),
            RobustRule::TrimmedMean { trim_fraction } => {
                if (0.0..0.5).contains(&trim_fraction) {
                    Ok(())
                } else {
                    Err(Error::Aggregation(format!(
                        "the trimmed mean's trim fraction must be in [0, 0.5), got \
                         {trim_fraction}"
                    )))
                }
            }
        }
    }

    /// How many of `n` values per coordinate are dropped at each end: ⌊(n−1)/2⌋ for the
    /// median (one or two values remain), ⌊β·n⌋ for the trimmed mean (computed as Flower's
    /// `int(proportiontocut * nobs)`), which is also how many arbitrary updates the rule
    /// tolerates. Assumes [`RobustRule::check`] passed.
    pub fn trimmed_per_side(&self, n: usize) -> usize {
        match *self {
            RobustRule::Median => n.saturating_sub(1) / 2,
            // β < 0.5 keeps 2⌊β·n⌋ < n; the `min` only guards against an unchecked β.
            RobustRule::TrimmedMean { trim_fraction } => {
                ((trim_fraction * n as f64).floor() as usize).min(n.saturating_sub(1) / 2)
            }
        }
    }
}

impl fmt::Display for RobustRule {
    /// Formats as `median` or `trimmed mean (beta = 0.2)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RobustRule::Median => f.write_str("median"),
            RobustRule::TrimmedMean { trim_fraction } => {
                write!(f, "trimmed mean (beta = {trim_fraction})")
            }
        }
    }
}

/// One accepted update, kept as a scratch safetensors file of the accumulator's own.
#[derive(Debug)]
struct Spilled {
    path: PathBuf,
    /// Each tensor's byte range in the file, in the spec's (name) order.
    ranges: Vec<Range<u64>>,
    /// The factor its values are used with (below 1 when the norm bound clipped it).
    scale: f64,
}

/// Collects client deltas for a [`RobustRule`] and yields their coordinate-wise median or
/// trimmed mean. The API mirrors [`crate::fedavg::FedAvgAccumulator`].
///
/// # Memory and files
///
/// An accepted update is written (from memory) or copied (from a file) into `spill_dir` under
/// a fresh name; the caller may delete its own file as soon as
/// [`RobustAccumulator::add_safetensors_file`] returns. Memory held per update is its file's
/// name and one byte range per tensor. [`RobustAccumulator::finish`] opens every kept file
/// once (so the process's open-file limit must exceed the number of updates) and works
/// through one block of 4096 coordinates at a time, holding `n · 4096` f64 values plus
/// the result. The spill files are removed when the accumulator is finished or dropped; they
/// are scratch files, never synced to disk.
///
/// # All or nothing
///
/// Every update goes through the same checks as [`crate::fedavg::FedAvgAccumulator`]'s
/// (weight, names, shapes, dtypes, finite values, the norm bound); a rejected update leaves no
/// file behind and the accumulator exactly as it was.
///
/// # Order independence
///
/// Which values are dropped does not depend on the arrival order, so the median is exactly
/// the same for every order. The kept values of a trimmed mean are summed in f64 in an order
/// that may depend on it; as for FedAvg, that error is far below f32 resolution, so after the
/// single rounding the result is the same or at most one ulp apart.
///
/// `finish` is CPU- and I/O-bound: run it off the async executor.
#[derive(Debug)]
pub struct RobustAccumulator {
    spec: ParamSpec,
    rule: RobustRule,
    spill_dir: PathBuf,
    /// The accepted updates, in arrival order.
    kept: Vec<Spilled>,
    /// The bound on every update's L2 norm, if any.
    norm_bound: Option<NormBound>,
    /// Coordinates per block in `finish` ([`BLOCK`]; tests make it small).
    block: usize,
    /// How updates are compressed ([`Compression::NONE`]: plain safetensors of the spec).
    compression: Compression,
}

impl RobustAccumulator {
    /// An empty accumulator for deltas shaped like `spec`, aggregating with `rule` and keeping
    /// its scratch files in `spill_dir` (created if missing).
    ///
    /// Fails with [`Error::Aggregation`] if `rule` is invalid ([`RobustRule::check`]) or a
    /// tensor of `spec` has an integer dtype, and with [`Error::Io`] if `spill_dir` cannot be
    /// created.
    pub fn new(spec: &ParamSpec, rule: RobustRule, spill_dir: &Path) -> Result<Self> {
        rule.check()?;
        check_float_spec(spec, &format!("the {rule}"))?;
        std::fs::create_dir_all(spill_dir).map_err(|e| Error::io(spill_dir, e))?;
        Ok(Self {
            spec: spec.clone(),
            rule,
            spill_dir: spill_dir.to_path_buf(),
            kept: Vec::new(),
            norm_bound: None,
            block: BLOCK,
            compression: Compression::NONE,
        })
    }

    /// The same accumulator bounding every update's L2 norm (in f64, exactly as
    /// [`crate::fedavg::FedAvgAccumulator::with_norm_bound`] computes it) by `bound`: above
    /// it an update is refused with no change, or kept and its values scaled down to the
    /// bound when the aggregate is computed (see [`NormBound`]).
    pub fn with_norm_bound(mut self, bound: NormBound) -> Self {
        self.norm_bound = Some(bound);
        self
    }

    /// The bound on every update's norm, if any.
    pub fn norm_bound(&self) -> Option<NormBound> {
        self.norm_bound
    }

    /// Keeps `delta` for the aggregate. `weight` is checked as FedAvg checks it (finite, > 0,
    /// at most [`crate::fedavg::MAX_WEIGHT`]) but otherwise ignored: the rules are
    /// unweighted.
    ///
    /// Checks everything before writing anything, and changes nothing on error: the weight
    /// ([`Error::Aggregation`]), exactly the spec's names, shapes and dtypes
    /// ([`Error::ParamMismatch`]), only finite values ([`Error::NonFinite`]) and the norm
    /// bound, if any ([`Error::Aggregation`]). Then writes the update to a new file in the
    /// spill directory ([`Error::Io`] or [`Error::Safetensors`] if that fails, and the
    /// partial file is removed).
    ///
    /// With compression ([`RobustAccumulator::with_compression`]) `delta` is the compressed
    /// update, handled as [`RobustAccumulator::add_safetensors_file`] handles a file.
    pub fn add(&mut self, delta: &ParamSet, weight: f64) -> Result<Added> {
        if self.compression.is_lossy() {
            check_weight(weight)?;
            let bytes = delta.to_safetensors_bytes()?;
            let len = bytes.len() as u64;
            let what = Path::new("<compressed update>");
            return self.add_encoded(&mut std::io::Cursor::new(bytes), len, what);
        }
        let added = check_update(&self.spec, self.norm_bound, delta, weight)?;
        let (spill, file) = self.create_spill()?;
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, file);
        delta.write_safetensors(&mut w)?;
        let mut file = w
            .into_inner()
            .map_err(|e| Error::io(spill.path(), e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(spill.path(), e))?;
        let layout = SafetensorsLayout::read(&mut file)?;
        debug_assert_eq!(layout.spec, self.spec, "a checked update matches the spec");
        self.keep(spill, &layout, added);
        Ok(added)
    }

    /// Keeps the safetensors update at `path` for the aggregate, copying it into the spill
    /// directory, so the caller may delete `path` as soon as this returns. `weight` is
    /// checked but ignored, as in [`RobustAccumulator::add`].
    ///
    /// The update is copied through one 1 MiB buffer, and the copy is what gets checked, so
    /// what is kept is exactly what passed (f32/f64 updates are never loaded whole; other
    /// dtypes are parsed whole to be checked, as by FedAvg): the same checks as
    /// [`crate::fedavg::FedAvgAccumulator::add_safetensors_file`] (and the same errors, which
    /// name `path`), all or nothing: a rejected update's copy is removed before this returns.
    /// Errors: the weight ([`Error::Aggregation`]), the structure ([`Error::ParamMismatch`]),
    /// non-finite values ([`Error::NonFinite`]), the norm bound ([`Error::Aggregation`]), a
    /// malformed or truncated file ([`Error::Safetensors`]), reading it or writing the copy
    /// ([`Error::Io`]).
    ///
    /// With compression the file is the compressed update: it is checked in place (layout,
    /// values, the decoded norm) and then decoded into the kept copy, a plain f32 file of
    /// the spec.
    pub fn add_safetensors_file(&mut self, path: &Path, weight: f64) -> Result<Added> {
        check_weight(weight)?;
        let mut src = File::open(path).map_err(|e| Error::io(path, e))?;
        if self.compression.is_lossy() {
            let len = src.metadata().map_err(|e| Error::io(path, e))?.len();
            return self.add_encoded(&mut src, len, path);
        }
        let (spill, mut file) = self.create_spill()?;
        let mut buf = vec![0u8; COPY_BLOCK];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(path, e)),
            };
            file.write_all(&buf[..n])
                .map_err(|e| Error::io(spill.path(), e))?;
        }
        drop(src);
        let checked = check_update_file(&self.spec, self.norm_bound, &mut file, path, &mut buf)?;
        self.keep(spill, &checked.layout, checked.added);
        Ok(checked.added)
    }

    /// The same accumulator taking updates compressed as `compression` says
    /// ([`crate::compress`]); each is decoded into its kept copy. Fails like
    /// [`crate::fedavg::FedAvgAccumulator::with_compression`].
    pub fn with_compression(mut self, compression: Compression) -> Result<Self> {
        compression.check()?;
        compression.encoded_spec(&self.spec)?;
        self.compression = compression;
        Ok(self)
    }

    /// Checks the compressed update in `r` (`len` bytes, named `what`), then decodes it into
    /// a new spill file: the spec's f32 safetensors, zeros where top-k sent nothing.
    fn add_encoded<R: Read + Seek>(&mut self, r: &mut R, len: u64, what: &Path) -> Result<Added> {
        let (layout, added) =
            check_encoded(&self.spec, &self.compression, self.norm_bound, r, len, what)?;
        let (spill, file) = self.create_spill()?;
        let mut w = compress::DenseWriter::new(
            &self.spec,
            std::io::BufWriter::with_capacity(COPY_BLOCK, file),
        )
        .map_err(|e| Error::io(spill.path(), e))?;
        let mut failed = None;
        compress::visit(
            r,
            what,
            &layout,
            &self.spec,
            &self.compression,
            |t, pos, xs| {
                if failed.is_none()
                    && let Err(e) = w.put(t, pos, xs)
                {
                    failed = Some(e);
                }
            },
        )?;
        if let Some(e) = failed {
            return Err(Error::io(spill.path(), e));
        }
        let mut file = w.finish().map_err(|e| Error::io(spill.path(), e))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(spill.path(), e))?;
        let kept = SafetensorsLayout::read(&mut file)?;
        debug_assert_eq!(kept.spec, self.spec, "a decoded update matches the spec");
        self.keep(spill, &kept, added);
        Ok(added)
    }

    /// Records a checked spill file as accepted.
    fn keep(&mut self, spill: SpillGuard, layout: &SafetensorsLayout, added: Added) {
        let ranges = self
            .spec
            .names()
            .map(|name| layout.ranges[name].clone())
            .collect();
        self.kept.push(Spilled {
            path: spill.keep(),
            ranges,
            scale: added.scale,
        });
    }

    /// Creates a new, empty file in the spill directory under a name no other file has, and
    /// returns it (open for reading and writing) with a guard that removes it unless kept.
    fn create_spill(&self) -> Result<(SpillGuard, File)> {
        for _ in 0..MAX_NAME_TRIES {
            let n = NEXT_SPILL.fetch_add(1, Ordering::Relaxed);
            let path = self
                .spill_dir
                .join(format!("robust-{}-{n}.safetensors.tmp", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => return Ok((SpillGuard { path: Some(path) }, file)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        Err(Error::io(
            &self.spill_dir,
            std::io::Error::other(format!(
                "no unused spill file name after {MAX_NAME_TRIES} tries; clear the directory"
            )),
        ))
    }

    /// The coordinate-wise median or trimmed mean of everything added, computed in f64 and
    /// rounded once to each tensor's dtype, shaped like the spec. Removes the spill files.
    ///
    /// Fails with [`Error::Aggregation`] if nothing was added, with [`Error::Io`] if a spill
    /// file cannot be read back.
    pub fn finish(self) -> Result<ParamSet> {
        let n = self.kept.len();
        if n == 0 {
            return Err(Error::Aggregation(format!(
                "no updates were added; cannot take the {} of an empty round",
                self.rule
            )));
        }
        let k = self.rule.trimmed_per_side(n);
        let mut files = self
            .kept
            .iter()
            .map(|s| File::open(&s.path).map_err(|e| Error::io(&s.path, e)))
            .collect::<Result<Vec<_>>>()?;
        let block = self.block;
        // Raw bytes of one file's block, and the block's values of all files, coordinate by
        // coordinate: `values[j * n + i]` is coordinate j of update i.
        let mut bytes = vec![0u8; block * 8];
        let mut values = vec![0f64; block * n];
        let mut tensors = std::collections::BTreeMap::new();
        for (ti, (name, t)) in self.spec.iter().enumerate() {
            let size = t.dtype.size_in_bytes();
            let count = t.elem_count();
            let mut out = Output::new(t.dtype, count);
            let mut start = 0;
            while start < count {
                let len = block.min(count - start);
                for (i, (file, spilled)) in files.iter_mut().zip(&self.kept).enumerate() {
                    let at = spilled.ranges[ti].start + (start * size) as u64;
                    let raw = &mut bytes[..len * size];
                    file.seek(SeekFrom::Start(at))
                        .and_then(|_| file.read_exact(raw))
                        .map_err(|e| Error::io(&spilled.path, e))?;
                    let scale = spilled.scale;
                    decode(t.dtype, raw, |j, x| values[j * n + i] = scale * x)?;
                }
                for xs in values[..len * n].chunks_exact_mut(n) {
                    out.push(trimmed_mean(xs, k));
                }
                start += len;
            }
            tensors.insert(name.to_string(), out.into_tensor(&t.shape)?);
        }
        drop(files);
        let aggregate = ParamSet::from_tensors(tensors)?;
        // Only reachable by rounding to a narrow dtype (f16); never hand it on.
        aggregate.check_finite()?;
        Ok(aggregate)
        // `self` drops here, removing the spill files.
    }

    /// The rule this accumulator applies.
    pub fn rule(&self) -> RobustRule {
        self.rule
    }

    /// The spec every update must match.
    pub fn spec(&self) -> &ParamSpec {
        &self.spec
    }

    /// How many updates were accepted.
    pub fn count(&self) -> usize {
        self.kept.len()
    }
}

impl Drop for RobustAccumulator {
    /// Removes the spill files (a file already gone is fine; other failures are logged).
    fn drop(&mut self) {
        for spilled in self.kept.drain(..) {
            remove_scratch(&spilled.path);
        }
    }
}

/// A new spill file, removed when dropped unless [`SpillGuard::keep`] was called: an update
/// that fails half way leaves no file.
#[derive(Debug)]
struct SpillGuard {
    /// The file's path; `None` once kept.
    path: Option<PathBuf>,
}

impl SpillGuard {
    /// The file's path.
    fn path(&self) -> &Path {
        self.path
            .as_deref()
            .expect("a guard is disarmed only by `keep`")
    }

    /// Disarms the guard and returns the file's path.
    fn keep(mut self) -> PathBuf {
        self.path
            .take()
            .expect("a guard is disarmed only by `keep`")
    }
}

impl Drop for SpillGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            remove_scratch(&path);
        }
    }
}

/// Removes a scratch file, logging failures other than its being gone already.
fn remove_scratch(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a spill file");
    }
}

/// One result tensor being built: f32 directly, other dtypes in f64 and converted once.
enum Output {
    F32(Vec<f32>),
    Wide(DType, Vec<f64>),
}

impl Output {
    fn new(dtype: DType, count: usize) -> Self {
        match dtype {
            DType::F32 => Output::F32(Vec::with_capacity(count)),
            dtype => Output::Wide(dtype, Vec::with_capacity(count)),
        }
    }

    fn push(&mut self, x: f64) {
        match self {
            Output::F32(v) => v.push(x as f32),
            Output::Wide(_, v) => v.push(x),
        }
    }

    fn into_tensor(self, shape: &[usize]) -> Result<Tensor> {
        Ok(match self {
            Output::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu)?,
            Output::Wide(dtype, v) => Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?,
        })
    }
}

/// Calls `f(j, x)` for the j-th little-endian value of `dtype` in `raw`, widened to f64.
///
/// f32 and f64 are decoded in place; other float dtypes (never used by fedflow today) go
/// through one candle conversion per call.
fn decode(dtype: DType, raw: &[u8], mut f: impl FnMut(usize, f64)) -> Result<()> {
    match dtype {
        DType::F32 => {
            for (j, b) in raw.chunks_exact(4).enumerate() {
                f(j, f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
        }
        DType::F64 => {
            for (j, b) in raw.chunks_exact(8).enumerate() {
                f(
                    j,
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                );
            }
        }
        dtype => {
            let count = raw.len() / dtype.size_in_bytes();
            let wide = Tensor::from_raw_buffer(raw, dtype, &[count], &Device::Cpu)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            for (j, x) in wide.into_iter().enumerate() {
                f(j, x);
            }
        }
    }
    Ok(())
}

/// The mean of `xs` without its `k` smallest and `k` largest values (`2k < xs.len()`),
/// reordering `xs`. With `k = ⌊(n−1)/2⌋` that is the median (the mean of the two middle
/// values for even n). With `k = 0` the values are summed in their given order.
fn trimmed_mean(xs: &mut [f64], k: usize) -> f64 {
    let n = xs.len();
    debug_assert!(2 * k < n, "trimming {k} of {n} values at each end");
    let kept_len = n - 2 * k;
    let kept: &[f64] = if k == 0 {
        xs
    } else {
        // First the k smallest to the front, then, among the rest, the k largest to the back.
        xs.select_nth_unstable_by(k, f64::total_cmp);
        let rest = &mut xs[k..];
        rest.select_nth_unstable_by(kept_len - 1, f64::total_cmp);
        &rest[..kept_len]
    };
    let m = kept_len as f64;
    let mean = kept.iter().sum::<f64>() / m;
    if mean.is_finite() {
        mean
    } else {
        // The sum of huge f64 values overflowed; their mean cannot.
        kept.iter().map(|x| x / m).sum()
    }
}

#[cfg(test)]
mod tests;
