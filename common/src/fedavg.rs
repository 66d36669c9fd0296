//! Streaming weighted FedAvg: client deltas are folded into one f64 buffer per tensor as they
//! arrive, so memory stays at one model's worth however many clients report.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

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
    /// Largest L2 norm an update may have (site-level DP), if any.
    norm_bound: Option<f64>,
}

impl FedAvgAccumulator {
    /// An empty accumulator for deltas shaped like `spec`.
    ///
    /// Fails with [`Error::Aggregation`] if a tensor in `spec` has an integer dtype, which
    /// cannot be averaged.
    pub fn new(spec: &ParamSpec) -> Result<Self> {
        let mut sums = Vec::with_capacity(spec.len());
        for (name, t) in spec.iter() {
            if !t.dtype.is_float() {
                return Err(Error::Aggregation(format!(
                    "tensor `{name}` has dtype {}; fedavg needs floating-point tensors",
                    t.dtype.as_str()
                )));
            }
            sums.push(vec![0.0; t.elem_count()]);
        }
        Ok(Self {
            spec: spec.clone(),
            sums,
            total_weight: 0.0,
            count: 0,
            norm_bound: None,
        })
    }

    /// The same accumulator refusing updates whose L2 norm (over all tensors, computed in f64
    /// exactly as [`ParamSet::l2_norm`] does) exceeds `bound`, with [`Error::Aggregation`]
    /// and no change: site-level DP's check that every site clipped.
    pub fn with_norm_bound(mut self, bound: f64) -> Self {
        self.norm_bound = Some(bound);
        self
    }

    fn check_norm(&self, norm: f64) -> Result<()> {
        match self.norm_bound {
            Some(bound) if norm > bound => Err(Error::Aggregation(format!(
                "update L2 norm {norm} exceeds the bound {bound} of site-level DP (each site \
                 must clip its delta)"
            ))),
            _ => Ok(()),
        }
    }

    /// Adds `weight · delta`.
    ///
    /// Checks everything first and changes nothing on error: `weight` must be finite, positive
    /// and at most [`MAX_WEIGHT`] ([`Error::Aggregation`]); `delta` must have exactly the spec's names, shapes
    /// and dtypes ([`Error::ParamMismatch`]) and only finite values ([`Error::NonFinite`]).
    pub fn add(&mut self, delta: &ParamSet, weight: f64) -> Result<()> {
        check_weight(weight)?;
        // Reads every value once to check it; the accumulation below reads it a second time
        // rather than buffering a copy of the update.
        delta.validate_against(&self.spec)?;
        if self.norm_bound.is_some() {
            self.check_norm(delta.l2_norm()?)?;
        }
        // Same names in the same (sorted) order as the spec, so the zip lines up.
        for (sum, (_, t)) in self.sums.iter_mut().zip(delta.iter()) {
            accumulate(sum, t, weight)?;
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
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
    pub fn add_safetensors_file(&mut self, path: &Path, weight: f64) -> Result<()> {
        check_weight(weight)?;
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let actual_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let layout = SafetensorsLayout::read(&mut file)?;
        if layout.file_len != actual_len {
            return Err(Error::Safetensors(format!(
                "{} is {actual_len} bytes but its header describes {} bytes",
                path.display(),
                layout.file_len
            )));
        }
        self.spec.check_matches(&layout.spec)?;
        if self
            .spec
            .iter()
            .any(|(_, t)| !matches!(t.dtype, DType::F32 | DType::F64))
        {
            // Half-precision models are not streamed (they never occur in fedflow today).
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            return self.add(&ParamSet::from_safetensors_bytes(&bytes)?, weight);
        }
        let mut buf = vec![0u8; READ_BLOCK];
        // Pass 1: every value must be finite (and the norm within the bound, if any; the
        // squares are summed in the same order as `ParamSet::l2_norm`).
        let mut squares = 0.0f64;
        for (name, t) in self.spec.iter() {
            let range = layout.ranges[name].clone();
            let mut non_finite = 0usize;
            stream_values(&mut file, path, range, t.dtype, &mut buf, |_, xs| {
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
        self.check_norm(squares.sqrt())?;
        // Pass 2: add. A read error here (the file changed under us) would leave a partial
        // sum; spill files are private to the coordinator, so this is an I/O failure of the
        // machine, reported as such.
        for ((name, t), sum) in self.spec.iter().zip(self.sums.iter_mut()) {
            let range = layout.ranges[name].clone();
            stream_values(&mut file, path, range, t.dtype, &mut buf, |at, xs| {
                for (s, &x) in sum[at..].iter_mut().zip(xs) {
                    *s += weight * x;
                }
            })?;
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
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

fn check_weight(weight: f64) -> Result<()> {
    if weight.is_finite() && weight > 0.0 && weight <= MAX_WEIGHT {
        Ok(())
    } else {
        Err(Error::Aggregation(format!(
            "update weight must be finite, > 0 and <= {MAX_WEIGHT:e}, got {weight}"
        )))
    }
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
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
    }

    fn set(entries: Vec<(&str, Tensor)>) -> ParamSet {
        ParamSet::from_tensors(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
        )
        .unwrap()
    }

    fn values(p: &ParamSet, name: &str) -> Vec<f32> {
        p.get(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// The three client deltas of the NumPy reference below.
    fn reference_deltas() -> Vec<ParamSet> {
        vec![
            set(vec![
                ("a.w", t(&[0.1, -0.2, 0.3, 1e-3], &[2, 2])),
                ("b", t(&[1.5, -0.75, 0.01], &[3])),
            ]),
            set(vec![
                ("a.w", t(&[-0.05, 0.25, 0.7, -2e-3], &[2, 2])),
                ("b", t(&[-2.0, 0.6, 0.02], &[3])),
            ]),
            set(vec![
                ("a.w", t(&[0.3333, -0.125, -1.1, 5e-4], &[2, 2])),
                ("b", t(&[0.2, 0.1, -0.07], &[3])),
            ]),
        ]
    }

    const REFERENCE_WEIGHTS: [f64; 3] = [10.0, 25.0, 7.0];

    fn run(deltas: &[(ParamSet, f64)]) -> ParamSet {
        let mut acc = FedAvgAccumulator::new(&deltas[0].0.spec()).unwrap();
        for (d, w) in deltas {
            acc.add(d, *w).unwrap();
        }
        acc.finish().unwrap()
    }

    /// Expected values from NumPy 2.4 (`python3 fedavg_ref.py`), which prints
    /// `a.w 0.049597617, 0.08035714, 0.3047619, -0.00086904765`
    /// and `b -0.8, 0.19523811, 0.0026190472`:
    ///
    /// ```python
    /// import numpy as np
    /// w = np.array([10.0, 25.0, 7.0])  # float64 weights (e.g. example counts)
    /// deltas = {
    ///     "a.w": np.array([[[0.1, -0.2], [0.3, 1e-3]],
    ///                      [[-0.05, 0.25], [0.7, -2e-3]],
    ///                      [[0.3333, -0.125], [-1.1, 5e-4]]], dtype=np.float32),
    ///     "b": np.array([[1.5, -0.75, 0.01],
    ///                    [-2.0, 0.6, 0.02],
    ///                    [0.2, 0.1, -0.07]], dtype=np.float32),
    /// }
    /// for name, d in deltas.items():
    ///     d64 = d.astype(np.float64)  # exact widening, as in Rust
    ///     avg = (w.reshape(-1, *([1] * (d.ndim - 1))) * d64).sum(axis=0) / w.sum()
    ///     print(name, ", ".join(str(x) for x in avg.astype(np.float32).ravel()))
    /// ```
    ///
    /// NumPy sums the three products in the same order and rounds to f32 once, as we do, so
    /// the results agree bit for bit.
    #[test]
    fn matches_numpy_reference() {
        let inputs: Vec<_> = reference_deltas()
            .into_iter()
            .zip(REFERENCE_WEIGHTS)
            .collect();
        let mut acc = FedAvgAccumulator::new(&inputs[0].0.spec()).unwrap();
        for (d, w) in &inputs {
            acc.add(d, *w).unwrap();
        }
        assert_eq!(acc.count(), 3);
        assert_eq!(acc.total_weight(), 42.0);
        let mean = acc.finish().unwrap();
        assert_eq!(mean.get("a.w").unwrap().dims(), &[2, 2]);
        assert_eq!(
            values(&mean, "a.w"),
            vec![0.049597617, 0.08035714, 0.3047619, -0.00086904765]
        );
        assert_eq!(values(&mean, "b"), vec![-0.8, 0.19523811, 0.0026190472]);
    }

    #[test]
    fn single_update_with_any_accepted_weight_is_returned_exactly() {
        let d = &reference_deltas()[2];
        for w in [1e-300, 0.3, 1.0, 7.0, MAX_WEIGHT] {
            let mean = run(&[(d.clone(), w)]);
            assert_eq!(
                mean.to_safetensors_bytes().unwrap(),
                d.to_safetensors_bytes().unwrap(),
                "weight {w}"
            );
        }
    }

    /// Distance in units in the last place between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{a} vs {b}");
        a.to_bits().abs_diff(b.to_bits())
    }

    fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut out = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut p in permutations(&rest) {
                p.insert(0, first);
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn result_does_not_depend_on_arrival_order() {
        // Five clients, values spread over many magnitudes, uneven weights.
        let n = 1000;
        let inputs: Vec<(ParamSet, f64)> = (0..5u32)
            .map(|c| {
                let v: Vec<f32> = (0..n as u32)
                    .map(|i| {
                        let x =
                            (i.wrapping_mul(2_654_435_761).wrapping_add(c * 97) % 10_007) as f32;
                        (x / 10_007.0 - 0.5) * 10f32.powi((i % 7) as i32 - 3)
                    })
                    .collect();
                let w = [3.0, 117.0, 0.25, 42.5, 1e4][c as usize];
                (set(vec![("w", t(&v, &[n]))]), w)
            })
            .collect();
        let first = values(&run(&inputs), "w");
        let mut worst = 0;
        for order in permutations(&[0, 1, 2, 3, 4]) {
            let permuted: Vec<_> = order.iter().map(|&i| inputs[i].clone()).collect();
            let got = values(&run(&permuted), "w");
            for (a, b) in first.iter().zip(&got) {
                if *a != 0.0 || *b != 0.0 {
                    worst = worst.max(ulps(*a, *b));
                }
            }
        }
        assert!(worst <= 1, "arrival order changed a result by {worst} ulp");
    }

    /// Adds a good update, then `bad` (which must be rejected), then the good one again, and
    /// checks the result equals adding the good update twice.
    fn check_rejected(bad: &ParamSet, weight: f64) -> Error {
        let good = &reference_deltas()[0];
        let mut acc = FedAvgAccumulator::new(&good.spec()).unwrap();
        acc.add(good, 2.0).unwrap();
        let err = acc.add(bad, weight).unwrap_err();
        assert_eq!(acc.count(), 1);
        assert_eq!(acc.total_weight(), 2.0);
        acc.add(good, 3.0).unwrap();
        let got = acc.finish().unwrap();
        let want = run(&[(good.clone(), 2.0), (good.clone(), 3.0)]);
        assert_eq!(
            got.to_safetensors_bytes().unwrap(),
            want.to_safetensors_bytes().unwrap()
        );
        err
    }

    #[test]
    fn rejected_updates_leave_the_accumulator_unchanged() {
        let good = reference_deltas()[1].clone();
        let b = t(&[1.0, 1.0, 1.0], &[3]);
        let aw = t(&[1.0; 4], &[2, 2]);

        // Non-finite values, after other tensors that are fine (`a.w` sorts before `b`).
        for (bad, count) in [
            (vec![f32::NAN, 0.0, 1.0], 1),
            (vec![f32::INFINITY, f32::NEG_INFINITY, 1.0], 2),
        ] {
            let d = set(vec![("a.w", aw.clone()), ("b", t(&bad, &[3]))]);
            match check_rejected(&d, 1.0) {
                Error::NonFinite { name, count: got } => {
                    assert_eq!(name, "b");
                    assert_eq!(got, count);
                }
                other => panic!("expected non-finite, got {other:?}"),
            }
        }

        let structural = [
            (
                "wrong shape",
                set(vec![("a.w", t(&[1.0; 4], &[4])), ("b", b.clone())]),
            ),
            ("missing name", set(vec![("a.w", aw.clone())])),
            (
                "extra name",
                set(vec![
                    ("a.w", aw.clone()),
                    ("b", b.clone()),
                    ("c", t(&[0.0], &[1])),
                ]),
            ),
            (
                "wrong dtype",
                set(vec![
                    ("a.w", aw.to_dtype(DType::F64).unwrap()),
                    ("b", b.clone()),
                ]),
            ),
        ];
        for (what, bad) in structural {
            assert!(
                matches!(check_rejected(&bad, 1.0), Error::ParamMismatch(_)),
                "{what}"
            );
        }

        for w in [
            0.0,
            -0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e300,
            MAX_WEIGHT * 2.0,
        ] {
            match check_rejected(&good, w) {
                Error::Aggregation(msg) => assert!(msg.contains("weight"), "{msg}"),
                other => panic!("weight {w}: expected an aggregation error, got {other:?}"),
            }
        }
    }

    #[test]
    fn finish_without_updates_is_an_error() {
        let acc = FedAvgAccumulator::new(&reference_deltas()[0].spec()).unwrap();
        match acc.finish() {
            Err(Error::Aggregation(msg)) => assert!(msg.contains("no updates"), "{msg}"),
            other => panic!("expected an aggregation error, got {other:?}"),
        }
    }

    #[test]
    fn integer_specs_are_refused() {
        let ints = set(vec![(
            "steps",
            Tensor::new(&[1i64, 2], &Device::Cpu).unwrap(),
        )]);
        assert!(matches!(
            FedAvgAccumulator::new(&ints.spec()),
            Err(Error::Aggregation(_))
        ));
    }

    #[test]
    fn f64_and_non_contiguous_inputs_are_averaged() {
        let spec_src = set(vec![
            ("d", Tensor::new(&[0.0f64, 0.0], &Device::Cpu).unwrap()),
            ("m", t(&[0.0; 6], &[3, 2])),
        ]);
        let mut acc = FedAvgAccumulator::new(&spec_src.spec()).unwrap();
        let transposed = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).t().unwrap();
        let a = set(vec![
            ("d", Tensor::new(&[1.0f64, -1.0], &Device::Cpu).unwrap()),
            ("m", transposed),
        ]);
        let b = set(vec![
            ("d", Tensor::new(&[4.0f64, 2.0], &Device::Cpu).unwrap()),
            ("m", t(&[0.0; 6], &[3, 2])),
        ]);
        acc.add(&a, 1.0).unwrap();
        acc.add(&b, 3.0).unwrap();
        let mean = acc.finish().unwrap();
        assert_eq!(
            mean.get("d").unwrap().to_vec1::<f64>().unwrap(),
            vec![3.25, 1.25]
        );
        assert_eq!(values(&mean, "m"), vec![0.25, 1.0, 0.5, 1.25, 0.75, 1.5]);
    }

    /// Saves `p` to a file in `dir` and returns its path.
    fn saved(dir: &tempfile::TempDir, file: &str, p: &ParamSet) -> std::path::PathBuf {
        let path = dir.path().join(file);
        p.save(&path).unwrap();
        path
    }

    fn sums_of(acc: &FedAvgAccumulator) -> (Vec<Vec<u64>>, f64, usize) {
        let bits = acc
            .sums
            .iter()
            .map(|s| s.iter().map(|x| x.to_bits()).collect())
            .collect();
        (bits, acc.total_weight, acc.count)
    }

    #[test]
    fn streaming_a_file_equals_adding_the_parsed_set() {
        let dir = tempfile::tempdir().unwrap();
        let deltas = reference_deltas();
        let mut in_memory = FedAvgAccumulator::new(&deltas[0].spec()).unwrap();
        let mut streamed = FedAvgAccumulator::new(&deltas[0].spec()).unwrap();
        for (i, (d, w)) in deltas.iter().zip(REFERENCE_WEIGHTS).enumerate() {
            in_memory.add(d, w).unwrap();
            let path = saved(&dir, &format!("d{i}.safetensors"), d);
            streamed.add_safetensors_file(&path, w).unwrap();
        }
        assert_eq!(sums_of(&streamed), sums_of(&in_memory));
        assert_eq!(
            streamed.finish().unwrap().to_safetensors_bytes().unwrap(),
            in_memory.finish().unwrap().to_safetensors_bytes().unwrap()
        );
    }

    #[test]
    fn streaming_handles_tensors_larger_than_the_read_block() {
        let dir = tempfile::tempdir().unwrap();
        let n = READ_BLOCK / 4 * 2 + 77; // f32 values spanning three blocks
        let big: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3 - 0.5).collect();
        let small = Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu).unwrap();
        let d = set(vec![("big", t(&big, &[n])), ("small", small)]);
        let mut in_memory = FedAvgAccumulator::new(&d.spec()).unwrap();
        let mut streamed = FedAvgAccumulator::new(&d.spec()).unwrap();
        in_memory.add(&d, 3.0).unwrap();
        streamed
            .add_safetensors_file(&saved(&dir, "d.safetensors", &d), 3.0)
            .unwrap();
        assert_eq!(sums_of(&streamed), sums_of(&in_memory));
    }

    #[test]
    fn a_rejected_file_leaves_the_accumulator_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let deltas = reference_deltas();
        let mut acc = FedAvgAccumulator::new(&deltas[0].spec()).unwrap();
        acc.add_safetensors_file(&saved(&dir, "good.safetensors", &deltas[0]), 2.0)
            .unwrap();
        let before = sums_of(&acc);

        // NaN in the second tensor (by name): the first pass finds it before adding anything.
        let nan = set(vec![
            ("a.w", t(&[0.1, 0.2, 0.3, 0.4], &[2, 2])),
            ("b", t(&[1.0, f32::NAN, f32::INFINITY], &[3])),
        ]);
        let err = acc
            .add_safetensors_file(&saved(&dir, "nan.safetensors", &nan), 1.0)
            .unwrap_err();
        assert!(
            matches!(&err, Error::NonFinite { name, count: 2 } if name == "b"),
            "{err}"
        );

        let wrong_shape = set(vec![
            ("a.w", t(&[0.1, 0.2, 0.3, 0.4], &[4])),
            ("b", t(&[1.0, 2.0, 3.0], &[3])),
        ]);
        let err = acc
            .add_safetensors_file(&saved(&dir, "shape.safetensors", &wrong_shape), 1.0)
            .unwrap_err();
        assert!(matches!(err, Error::ParamMismatch(_)), "{err}");

        let extra = set(vec![
            ("a.w", t(&[0.1, 0.2, 0.3, 0.4], &[2, 2])),
            ("b", t(&[1.0, 2.0, 3.0], &[3])),
            ("c", t(&[1.0], &[1])),
        ]);
        let err = acc
            .add_safetensors_file(&saved(&dir, "extra.safetensors", &extra), 1.0)
            .unwrap_err();
        assert!(matches!(err, Error::ParamMismatch(_)), "{err}");

        // Truncated, padded and garbage files.
        let bytes = deltas[1].to_safetensors_bytes().unwrap();
        let truncated = dir.path().join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 1]).unwrap();
        let padded = dir.path().join("padded.safetensors");
        std::fs::write(&padded, [&bytes[..], &[0u8]].concat()).unwrap();
        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
        for bad in [&truncated, &padded, &garbage] {
            let err = acc.add_safetensors_file(bad, 1.0).unwrap_err();
            assert!(
                matches!(err, Error::Safetensors(_)),
                "{}: {err}",
                bad.display()
            );
        }

        let good = saved(&dir, "good2.safetensors", &deltas[1]);
        assert!(matches!(
            acc.add_safetensors_file(&good, f64::NAN),
            Err(Error::Aggregation(_))
        ));
        assert!(matches!(
            acc.add_safetensors_file(&dir.path().join("missing"), 1.0),
            Err(Error::Io { .. })
        ));
        assert_eq!(sums_of(&acc), before, "rejected files must change nothing");
    }

    #[test]
    fn a_norm_bound_rejects_unclipped_updates_in_both_paths_without_a_trace() {
        let dir = tempfile::tempdir().unwrap();
        let deltas = reference_deltas();
        let norms: Vec<f64> = deltas.iter().map(|d| d.l2_norm().unwrap()).collect();
        // A bound between the norms of delta 0 and delta 1 (and exactly delta 0's norm).
        assert!(norms[0] < norms[1]);
        let bound = norms[0];
        let mut acc = FedAvgAccumulator::new(&deltas[0].spec())
            .unwrap()
            .with_norm_bound(bound);
        acc.add(&deltas[0], 1.0).unwrap();
        acc.add_safetensors_file(&saved(&dir, "d0.safetensors", &deltas[0]), 1.0)
            .unwrap();
        let before = sums_of(&acc);
        let err = acc.add(&deltas[1], 1.0).unwrap_err();
        assert!(err.to_string().contains("exceeds the bound"), "{err}");
        let err = acc
            .add_safetensors_file(&saved(&dir, "d1.safetensors", &deltas[1]), 1.0)
            .unwrap_err();
        assert!(err.to_string().contains("exceeds the bound"), "{err}");
        assert_eq!(sums_of(&acc), before);
    }

    #[test]
    fn the_dp_release_divides_by_the_fixed_denominator_and_adds_the_noise_once() {
        use rand::SeedableRng;
        let deltas = reference_deltas();
        // Without noise: the sum over the denominator, not over the weights.
        let mut acc = FedAvgAccumulator::new(&deltas[0].spec()).unwrap();
        for d in &deltas {
            acc.add(d, 1.0).unwrap();
        }
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let mean = acc.finish_dp(4.0, 0.0, &mut rng).unwrap();
        let b: Vec<f32> = (0..3)
            .map(|i| {
                let sum: f64 = deltas.iter().map(|d| f64::from(values(d, "b")[i])).sum();
                (sum / 4.0) as f32
            })
            .collect();
        assert_eq!(values(&mean, "b"), b);
        // Noise alone on an empty round: N(0, std²) / denominator per coordinate.
        let n = 200_000;
        let zeros = set(vec![("w", t(&vec![0.0; n], &[n]))]);
        let acc = FedAvgAccumulator::new(&zeros.spec()).unwrap();
        let out = acc.finish_dp(10.0, 3.0, &mut rng).unwrap();
        let v = values(&out, "w");
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let sd = (v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / (n as f64 - 1.0))
            .sqrt();
        assert!(mean.abs() < 4.0 * 0.3 / (n as f64).sqrt(), "{mean}");
        assert!(
            (sd / 0.3 - 1.0).abs() < 4.0 / (2.0 * n as f64).sqrt(),
            "{sd}"
        );
        let acc = FedAvgAccumulator::new(&zeros.spec()).unwrap();
        assert!(acc.finish_dp(0.0, 1.0, &mut rng).is_err());
    }
}
