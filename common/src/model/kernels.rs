//! CPU kernels for the fused recurrent cells (LSTM and GRU): their thread pool, a safe
//! wrapper over the `gemm` crate, a register-blocked small matmul and vectorisable
//! `sigmoid`/`tanh`.
//!
//! candle evaluates `sigmoid`/`tanh` with scalar `libm` calls and allocates a tensor per
//! element-wise op, which dominates the cost of a small LSTM on CPU.
//! These kernels work on slices in place; the exponential is the Cephes `expf` polynomial
//! (relative error about 2e-7 on the clamped range), written so the compiler vectorises it.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Tensor, bail};

/// The kernels' own thread pool, one thread per available core.
///
/// It is separate from rayon's global pool on purpose: candle runs its small element-wise ops
/// and matmuls on the global pool, and sharing that pool with the recurrence measured about
/// 2x slower on 2 cores than giving the recurrence (most of the work, split cleanly by batch
/// rows) a pool of its own (see BENCHMARKS.md).
pub(crate) fn kernel_pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("FEDFLOW_KERNEL_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("fedflow-kernel-{i}"))
            .build()
            .expect("cannot start the kernel thread pool")
    })
}

/// Number of threads the fused kernels use (`FEDFLOW_KERNEL_THREADS`, default: all cores).
pub fn kernel_threads() -> usize {
    kernel_pool().current_num_threads()
}

/// Batch rows per parallel work item. Fixed, not derived from the thread count: the matmul
/// kernels sum in an order that depends on the number of rows they get, so a fixed chunking
/// keeps results bit-identical on machines with different core counts.
pub(crate) const ROWS_PER_CHUNK: usize = 16;

/// The contiguous f32 data of a CPU tensor argument of a fused op.
pub(crate) fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("fused op: {what} must be f32")
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("fused op: {what} must be contiguous"),
    }
}

/// Runs `$body` compiled for AVX2+FMA when the CPU has them (the element-wise loops then
/// vectorise 8-wide), or for the baseline target otherwise.
macro_rules! multiversion {
    ($name:ident, $generic:ident, ($($arg:ident: $ty:ty),* $(,)?)) => {
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) {
                    $generic::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the running CPU supports the enabled features.
                    unsafe { avx2($($arg),*) };
                    return;
                }
            }
            $generic::<false>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Runs a fused recurrent op (`x` or its projection, `w_all`, `mask`) on contiguous f32
/// arguments.
pub(crate) fn apply_fused(
    x: &Tensor,
    w_all: &Tensor,
    mask: &Tensor,
    op: impl CustomOp3 + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::F32 {
        bail!("{} runs in f32 only, got {:?}", op.name(), x.dtype());
    }
    x.contiguous()?
        .apply_op3(&w_all.contiguous()?, &mask.contiguous()?, op)
}

/// `dst = beta_dst * dst + lhs · rhs` for row-major strided matrices of `f32`.
///
/// `lhs` is `m × k` with row stride `lhs_rs` (elements), `rhs` is `k × n` given by its row and
/// column strides, `dst` is `m × n` with row stride `dst_rs` and unit column stride.
/// When `accumulate` is false `dst` is overwritten.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major matrix.
    pub(crate) fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub(crate) fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `dst (m×n, row stride dst_rs) = [dst +] lhs · rhs`, on `threads` threads of the current
/// rayon pool (1 = the calling thread only). gemm splits the output, never the inner
/// dimension, so the result does not depend on `threads`.
///
/// Panics if a view reaches outside its slice: the callers build views from shapes they
/// have checked, so an out-of-bounds view is a bug, never bad input.
pub(crate) fn matmul_into(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "inner dimensions differ");
    lhs.check();
    rhs.check();
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "destination view out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every view was bounds-checked above against its slice; `dst` is borrowed
    // mutably and cannot alias `lhs`/`rhs`, which are shared borrows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// Columns per register block of [`small_matmul`]: 4 AVX vectors.
const NB: usize = 32;

/// `dst[r][..n] (+)= Σ_k a[r][k] · b[k][..n]` for `m` rows, with `a` rows `a_rs` apart, `dst`
/// rows `dst_rs` apart and `b` packed row-major (k × n).
///
/// Written for the LSTM's per-step products (16 rows × 64 × 256): a general gemm packs its
/// operands on every call, which costs as much as the arithmetic at this size, while here
/// the weight matrix is packed once per pass and each 2-row × 32-column block of the result
/// stays in registers for the whole k loop. `FMA` selects fused multiply-adds, for callers
/// compiled with the `fma` target feature (without it `mul_add` is a slow library call).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn small_matmul<const FMA: bool>(
    dst: &mut [f32],
    dst_rs: usize,
    a: &[f32],
    a_rs: usize,
    m: usize,
    k: usize,
    b: &[f32],
    n: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(b.len() >= k * n, "packed matrix too short");
    assert!((m - 1) * a_rs + k <= a.len(), "lhs view out of bounds");
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "destination view out of bounds"
    );
    #[inline(always)]
    fn madd<const FMA: bool>(x: f32, w: f32, acc: f32) -> f32 {
        if FMA { x.mul_add(w, acc) } else { x * w + acc }
    }
    #[inline(always)]
    fn store(dst: &mut [f32], acc: &[f32], accumulate: bool) {
        if accumulate {
            for (d, v) in dst.iter_mut().zip(acc) {
                *d += v;
            }
        } else {
            dst.copy_from_slice(acc);
        }
    }
    let mut r = 0;
    while r < m {
        let two = r + 1 < m;
        let a0 = &a[r * a_rs..r * a_rs + k];
        let a1 = if two {
            &a[(r + 1) * a_rs..(r + 1) * a_rs + k]
        } else {
            a0
        };
        let mut c = 0;
        while c + NB <= n {
            let mut acc0 = [0f32; NB];
            let mut acc1 = [0f32; NB];
            for kk in 0..k {
                let w: &[f32; NB] = b[kk * n + c..kk * n + c + NB]
                    .try_into()
                    .expect("block of NB");
                let (x0, x1) = (a0[kk], a1[kk]);
                for j in 0..NB {
                    acc0[j] = madd::<FMA>(x0, w[j], acc0[j]);
                    acc1[j] = madd::<FMA>(x1, w[j], acc1[j]);
                }
            }
            store(
                &mut dst[r * dst_rs + c..r * dst_rs + c + NB],
                &acc0,
                accumulate,
            );
            if two {
                store(
                    &mut dst[(r + 1) * dst_rs + c..(r + 1) * dst_rs + c + NB],
                    &acc1,
                    accumulate,
                );
            }
            c += NB;
        }
        // Columns past the last full block (hidden sizes that are not multiples of 8).
        for cc in c..n {
            for (row, x) in [(r, a0), (r + 1, a1)]
                .into_iter()
                .take(if two { 2 } else { 1 })
            {
                let mut acc = 0f32;
                for kk in 0..k {
                    acc = madd::<FMA>(x[kk], b[kk * n + cc], acc);
                }
                let d = &mut dst[row * dst_rs + cc];
                *d = if accumulate { *d + acc } else { acc };
            }
        }
        r += 2;
    }
}

/// Cephes-style `exp` for `f32`, vectorisable (no branches, no calls).
///
/// Rounding to the nearest integer uses the 1.5·2²³ trick rather than `floor`, which is a
/// library call on baseline x86-64 and would stop the loop from vectorising.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2E + ROUND;
    let fx = shifted - ROUND;
    // The integer n = fx sits in the low mantissa bits of `shifted`: read it with integer ops
    // (an `as i32` cast is saturating and keeps the loop scalar).
    let n = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = x - fx * C1 - fx * C2;
    let mut y = 1.987_569_1e-4f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5;
    y = y * r * r + r + 1.0;
    let bits = ((n + 127) as u32) << 23;
    y * f32::from_bits(bits)
}

/// Logistic sigmoid.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// Hyperbolic tangent, as `2·sigmoid(2x) − 1` (absolute error below 4e-7).
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    2.0 / (1.0 + exp_approx(-2.0 * x)) - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_match_std_within_tolerance() {
        let mut worst_sig = 0f32;
        let mut worst_tanh = 0f32;
        for i in -20_000..=20_000 {
            let x = i as f32 * 1e-3;
            worst_sig = worst_sig.max((sigmoid(x) - 1.0 / (1.0 + (-x).exp())).abs());
            worst_tanh = worst_tanh.max((tanh(x) - x.tanh()).abs());
        }
        assert!(worst_sig < 2e-7, "sigmoid error {worst_sig}");
        assert!(worst_tanh < 4e-7, "tanh error {worst_tanh}");
        // Saturation without NaN/Inf far outside the clamped range.
        assert!(sigmoid(-1e6) < 1e-37);
        assert_eq!(sigmoid(1e6), 1.0);
        assert_eq!(tanh(1e6), 1.0);
        assert_eq!(tanh(-1e6), -1.0);
    }

    #[test]
    fn small_matmul_matches_naive_for_odd_sizes_and_both_modes() {
        for (m, k, n) in [(1, 3, 5), (3, 7, 40), (16, 64, 256), (5, 2, 33)] {
            let a_rs = k + 2;
            let dst_rs = n + 3;
            let a: Vec<f32> = (0..m * a_rs)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2)
                .collect();
            for accumulate in [false, true] {
                for fma in [false, true] {
                    let mut dst = vec![0.5f32; m * dst_rs];
                    if fma {
                        small_matmul::<true>(&mut dst, dst_rs, &a, a_rs, m, k, &b, n, accumulate);
                    } else {
                        small_matmul::<false>(&mut dst, dst_rs, &a, a_rs, m, k, &b, n, accumulate);
                    }
                    for r in 0..m {
                        for c in 0..n {
                            let dot: f32 = (0..k).map(|j| a[r * a_rs + j] * b[j * n + c]).sum();
                            let want = if accumulate { 0.5 + dot } else { dot };
                            let got = dst[r * dst_rs + c];
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{m}x{k}x{n} [{r},{c}]: {got} vs {want}"
                            );
                        }
                        assert!(
                            dst[r * dst_rs + n..r * dst_rs + dst_rs]
                                .iter()
                                .all(|&v| v == 0.5)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_matches_naive_with_strides_and_transpose() {
        let (m, k, n) = (3, 4, 5);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        // b stored as n×k, used transposed as k×n.
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32).sin()).collect();
        let dst_rs = 7;
        let mut dst = vec![1.0f32; m * dst_rs];
        matmul_into(
            &mut dst,
            dst_rs,
            MatRef::dense(&a, m, k),
            MatRef::dense(&bt, n, k).t(),
            true,
            1,
        );
        for r in 0..m {
            for c in 0..n {
                let want: f32 = 1.0 + (0..k).map(|j| a[r * k + j] * bt[c * k + j]).sum::<f32>();
                assert!((dst[r * dst_rs + c] - want).abs() < 1e-5);
            }
            // Columns past n untouched.
            assert!(
                dst[r * dst_rs + n..r * dst_rs + dst_rs]
                    .iter()
                    .all(|&v| v == 1.0)
            );
        }
    }
}
