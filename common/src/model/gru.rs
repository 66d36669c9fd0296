//! GRU layers following PyTorch's `nn.GRU` (gate order `r, z, n`, names `weight_ih_l{k}`
//! ...): a fused CPU recurrence (custom candle op with a hand-written backward) and a
//! composition of candle ops (used on GPUs, for gradients in every input, and as the
//! numerical reference in tests). candle's own `GRU` concatenates its outputs on the wrong
//! axis and hard-codes `_l0` names (candle 0.11), so fedflow has its own.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, bail};
use rayon::prelude::*;

use super::kernels::{
    MatRef, ROWS_PER_CHUNK, apply_fused, cpu_f32, kernel_pool, matmul_into, multiversion, sigmoid,
    small_matmul, tanh,
};

/// One GRU recurrence over pre-projected inputs.
///
/// `xproj_steps[t]` is (B, 3H) = x·W_ihᵀ + b_ih, `w_hh` is (3H, H), `b_hh` is (3H),
/// `mask_steps[t]` is (B, 1). Padded steps carry the state unchanged. Returns every step's
/// hidden state, each (B, H).
pub(crate) fn gru_steps(
    xproj_steps: &[Tensor],
    w_hh: &Tensor,
    b_hh: &Tensor,
    mask_steps: &[Tensor],
) -> candle_core::Result<Vec<Tensor>> {
    let h = w_hh.dim(1)?;
    let b = xproj_steps
        .first()
        .map(|x| x.dim(0))
        .transpose()?
        .unwrap_or(0);
    let mut hs = Tensor::zeros((b, h), w_hh.dtype(), w_hh.device())?;
    let w_t = w_hh.t()?;
    let mut out = Vec::with_capacity(xproj_steps.len());
    for (x, m) in xproj_steps.iter().zip(mask_steps) {
        let hp = hs.matmul(&w_t)?.broadcast_add(b_hh)?;
        let r = candle_nn::ops::sigmoid(&(x.narrow(1, 0, h)? + hp.narrow(1, 0, h)?)?)?;
        let z = candle_nn::ops::sigmoid(&(x.narrow(1, h, h)? + hp.narrow(1, h, h)?)?)?;
        let n = (x.narrow(1, 2 * h, h)? + (r * hp.narrow(1, 2 * h, h)?)?)?.tanh()?;
        let h_new = ((&n - (&z * &n)?)? + (&z * &hs)?)?;
        let keep = (1.0 - m)?;
        hs = (h_new.broadcast_mul(m)? + hs.broadcast_mul(&keep)?)?;
        out.push(hs.clone());
    }
    Ok(out)
}

/// Fused GRU recurrence over a whole (left-padded) batch, the GRU counterpart of
/// [`super::lstm::FusedLstm`]: one custom op with a hand-written backward instead of a
/// dozen candle ops (and their tensors) per step.
///
/// Arguments: `x` (B, T, I) — the layer's input — or, when `input == 0`, `xproj` (B, T, 3H),
/// the input already projected without bias (the first layer gathers it from the
/// embedding); `w_all` (3H, I+1+H+1) = `[W_ih | b_ih | W_hh | b_hh]`; `mask` (B, T).
/// Output: hidden states (B, T, H). PyTorch's cell: `r = σ(x_r + h·W_hrᵀ + b_hr)`,
/// `z = σ(x_z + h·W_hzᵀ + b_hz)`, `n = tanh(x_n + r ⊙ (h·W_hnᵀ + b_hn))`,
/// `h' = (1 - z) ⊙ n + z ⊙ h`, where `x_*` include `b_i*`.
///
/// The forward pass caches the activated gates and `h·W_hnᵀ + b_hn`; the backward pass is
/// one reverse sweep, then two matmuls for the input and recurrent halves of `∂w_all`.
#[derive(Debug)]
pub(crate) struct FusedGru {
    hidden: usize,
    input: usize,
    cache: Mutex<Option<GruCache>>,
}

#[derive(Debug)]
struct GruCache {
    /// Activated gates (B, T, 3H): r, z, n.
    gates: Vec<f32>,
    /// `h_{t-1}·W_hnᵀ + b_hn` (B, T, H).
    hn: Vec<f32>,
}

impl FusedGru {
    fn new(hidden: usize, input: usize) -> Self {
        FusedGru {
            hidden,
            input,
            cache: Mutex::new(None),
        }
    }

    /// Row width of `w_all`.
    fn width(&self) -> usize {
        self.input + self.hidden + 2
    }

    /// Width of the first argument's rows.
    fn arg_width(&self) -> usize {
        if self.input == 0 {
            3 * self.hidden
        } else {
            self.input
        }
    }
}

/// The (3H, I) W_ih part of `w_all`.
fn w_ih_view(w_all: &[f32], input: usize, h: usize) -> MatRef<'_> {
    MatRef {
        data: w_all,
        rows: 3 * h,
        cols: input,
        row_stride: input + h + 2,
        col_stride: 1,
    }
}

impl CustomOp3 for FusedGru {
    fn name(&self) -> &'static str {
        "fused-gru"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, input, wd, d) = (self.hidden, self.input, self.width(), self.arg_width());
        let (b, t, d_got) = l1.shape().dims3()?;
        if d_got != d || l2.shape().dims() != [3 * h, wd] || l3.shape().dims() != [b, t] {
            bail!(
                "fused gru: shapes input {:?}, w_all {:?}, mask {:?} do not fit input {input}, hidden {h}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let x = cpu_f32(s1, l1, "input")?;
        let w = cpu_f32(s2, l2, "w_all")?;
        let mask = cpu_f32(s3, l3, "mask")?;
        let b_ih: Vec<f32> = (0..3 * h).map(|k| w[k * wd + input]).collect();
        let b_hh: Vec<f32> = (0..3 * h).map(|k| w[k * wd + input + 1 + h]).collect();
        // W_hhᵀ packed (H × 3H) once for all steps' products.
        let mut w_hh_t = vec![0f32; h * 3 * h];
        for g in 0..3 * h {
            for j in 0..h {
                w_hh_t[j * 3 * h + g] = w[g * wd + input + 1 + j];
            }
        }
        let mut gates = if input == 0 {
            x.to_vec()
        } else {
            vec![0f32; b * t * 3 * h]
        };
        let mut hn = vec![0f32; b * t * h];
        let mut hs = vec![0f32; b * t * h];
        let rows = ROWS_PER_CHUNK;
        kernel_pool().install(|| {
            gates
                .par_chunks_mut(rows * t * 3 * h)
                .zip(x.par_chunks(rows * t * d))
                .zip(hn.par_chunks_mut(rows * t * h))
                .zip(hs.par_chunks_mut(rows * t * h))
                .zip(mask.par_chunks(rows * t))
                .for_each(|((((gates, x), hn), hs), mask)| {
                    if input > 0 {
                        let xm = MatRef::dense(x, mask.len(), input);
                        matmul_into(gates, 3 * h, xm, w_ih_view(w, input, h).t(), false, 1);
                    }
                    for row in gates.chunks_exact_mut(3 * h) {
                        for (g, b) in row.iter_mut().zip(&b_ih) {
                            *g += b;
                        }
                    }
                    gru_forward_rows(gates, hn, hs, mask, &w_hh_t, &b_hh, t, h);
                })
        });
        *self.cache.lock().expect("fused gru cache poisoned") = Some(GruCache { gates, hn });
        Ok((CpuStorage::F32(hs), Shape::from((b, t, h))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w_all: &Tensor,
        mask: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (h, input, wd, d) = (self.hidden, self.input, self.width(), self.arg_width());
        let (b, t, _) = res.dims3()?;
        let cache = self.cache.lock().expect("fused gru cache poisoned");
        let Some(cache) = cache.as_ref() else {
            bail!("fused gru: backward called before forward")
        };
        let w = w_all.flatten_all()?.to_vec1::<f32>()?;
        let mask_v = mask.flatten_all()?.to_vec1::<f32>()?;
        let hs = res.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // W_hh packed (3H × H) once for all steps' products.
        let w_hh: Vec<f32> = (0..3 * h)
            .flat_map(|g| {
                w[g * wd + input + 1..g * wd + input + 1 + h]
                    .iter()
                    .copied()
            })
            .collect();
        // ∂ of the input-side pre-activations (also ∂xproj) and of the recurrent ones.
        let mut dx_gates = vec![0f32; b * t * 3 * h];
        let mut dh_gates = vec![0f32; b * t * 3 * h];
        let dx_width = input.max(1);
        let mut dx = vec![0f32; b * t * dx_width];
        let rows = ROWS_PER_CHUNK;
        kernel_pool().install(|| {
            dx_gates
                .par_chunks_mut(rows * t * 3 * h)
                .zip(dh_gates.par_chunks_mut(rows * t * 3 * h))
                .zip(dx.par_chunks_mut(rows * t * dx_width))
                .zip(cache.gates.par_chunks(rows * t * 3 * h))
                .zip(cache.hn.par_chunks(rows * t * h))
                .zip(hs.par_chunks(rows * t * h))
                .zip(grad.par_chunks(rows * t * h))
                .zip(mask_v.par_chunks(rows * t))
                .for_each(|(((((((dxg, dhg), dx), gates), hn), hs), grad), mask)| {
                    gru_backward_rows(dxg, dhg, gates, hn, hs, grad, mask, &w_hh, t, h);
                    if input > 0 {
                        let dg = MatRef::dense(dxg, mask.len(), 3 * h);
                        matmul_into(dx, input, dg, w_ih_view(&w, input, h), false, 1);
                    }
                })
        });

        // ∂[W_ih | b_ih] = Σ dx_gatesᵀ · [x | 1]; ∂[W_hh | b_hh] = Σ dh_gatesᵀ · [h_prev | 1].
        let xs = if input > 0 {
            x.flatten_all()?.to_vec1::<f32>()?
        } else {
            Vec::new()
        };
        let (wi, wh) = (input + 1, h + 1);
        let mut zx = vec![0f32; b * t * wi];
        let mut zh = vec![0f32; b * t * wh];
        for r in 0..b {
            for s in 0..t {
                let at = r * t + s;
                zx[at * wi..at * wi + input].copy_from_slice(&xs[at * input..(at + 1) * input]);
                zx[at * wi + input] = 1.0;
                if s > 0 {
                    zh[at * wh..at * wh + h].copy_from_slice(&hs[(at - 1) * h..at * h]);
                }
                zh[at * wh + h] = 1.0;
            }
        }
        let mut dw = vec![0f32; 3 * h * wd];
        let pool = kernel_pool();
        let threads = pool.current_num_threads();
        pool.install(|| {
            let dg = MatRef::dense(&dx_gates, b * t, 3 * h);
            matmul_into(
                &mut dw,
                wd,
                dg.t(),
                MatRef::dense(&zx, b * t, wi),
                false,
                threads,
            );
            let dg = MatRef::dense(&dh_gates, b * t, 3 * h);
            matmul_into(
                &mut dw[wi..],
                wd,
                dg.t(),
                MatRef::dense(&zh, b * t, wh),
                false,
                threads,
            );
        });
        let dev = res.device();
        let dinput = if input > 0 {
            Tensor::from_vec(dx, (b, t, d), dev)?
        } else {
            Tensor::from_vec(dx_gates, (b, t, d), dev)?
        };
        let dw = Tensor::from_vec(dw, (3 * h, wd), dev)?;
        Ok((Some(dinput), Some(dw), None))
    }
}

multiversion!(gru_forward_rows, gru_forward_rows_generic, (
    gates: &mut [f32], hn: &mut [f32], hs: &mut [f32], mask: &[f32], w_hh_t: &[f32],
    b_hh: &[f32], t: usize, h: usize,
));
multiversion!(gru_backward_rows, gru_backward_rows_generic, (
    dx_gates: &mut [f32], dh_gates: &mut [f32], gates: &[f32], hn: &[f32], hs: &[f32],
    grad: &[f32], mask: &[f32], w_hh: &[f32], t: usize, h: usize,
));

/// Forward recurrence for a block of rows: `gates` holds the input projections (with
/// `b_ih`) on entry and the activated `r, z, n` on exit.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gru_forward_rows_generic<const FMA: bool>(
    gates: &mut [f32],
    hn: &mut [f32],
    hs: &mut [f32],
    mask: &[f32],
    w_hh_t: &[f32],
    b_hh: &[f32],
    t: usize,
    h: usize,
) {
    let rows = mask.len() / t;
    let mut hp = vec![0f32; rows * 3 * h];
    let zeros = vec![0f32; h];
    for step in 0..t {
        for row in hp.chunks_exact_mut(3 * h) {
            row.copy_from_slice(b_hh);
        }
        if step > 0 {
            // hp = h[:, step-1] · W_hhᵀ + b_hh
            small_matmul::<FMA>(
                &mut hp,
                3 * h,
                &hs[(step - 1) * h..],
                t * h,
                rows,
                h,
                w_hh_t,
                3 * h,
                true,
            );
        }
        for r in 0..rows {
            let at = r * t + step;
            let idx = at * h;
            let g = &mut gates[at * 3 * h..(at + 1) * 3 * h];
            if mask[at] == 0.0 {
                // Padding: carry the state, record zero gates (they get no gradient).
                g.fill(0.0);
                if step > 0 {
                    hs.copy_within(idx - h..idx, idx);
                }
                continue;
            }
            let p = &hp[r * 3 * h..(r + 1) * 3 * h];
            let (gr, rest) = g.split_at_mut(h);
            let (gz, gn) = rest.split_at_mut(h);
            let (pr, rest) = p.split_at(h);
            let (pz, pn) = rest.split_at(h);
            hn[idx..idx + h].copy_from_slice(pn);
            for (v, &q) in gr.iter_mut().zip(pr) {
                *v = sigmoid(*v + q);
            }
            for (v, &q) in gz.iter_mut().zip(pz) {
                *v = sigmoid(*v + q);
            }
            for ((v, &q), &rv) in gn.iter_mut().zip(pn).zip(gr.iter()) {
                *v = tanh(*v + rv * q);
            }
            let (before, now) = hs.split_at_mut(idx);
            let prev = if step > 0 {
                &before[idx - h..]
            } else {
                &zeros[..]
            };
            for (((hv, &n), &z), &hp) in now[..h].iter_mut().zip(gn.iter()).zip(gz.iter()).zip(prev)
            {
                *hv = n + z * (hp - n);
            }
        }
    }
}

/// Backward sweep for a block of rows: fills `dx_gates` with ∂loss/∂(input-side
/// pre-activations) and `dh_gates` with ∂loss/∂(h·W_hhᵀ + b_hh).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gru_backward_rows_generic<const FMA: bool>(
    dx_gates: &mut [f32],
    dh_gates: &mut [f32],
    gates: &[f32],
    hn: &[f32],
    hs: &[f32],
    grad: &[f32],
    mask: &[f32],
    w_hh: &[f32],
    t: usize,
    h: usize,
) {
    let rows = mask.len() / t;
    let mut dh_next = vec![0f32; rows * h];
    let mut dh = vec![0f32; rows * h];
    let mut direct = vec![0f32; rows * h];
    let zeros = vec![0f32; h];
    for step in (0..t).rev() {
        for r in 0..rows {
            let at = r * t + step;
            let idx = at * h;
            let dh_r = &mut dh[r * h..(r + 1) * h];
            for ((d, &g), &n) in dh_r
                .iter_mut()
                .zip(&grad[idx..idx + h])
                .zip(&dh_next[r * h..(r + 1) * h])
            {
                *d = g + n;
            }
            if mask[at] == 0.0 {
                continue;
            }
            let g = &gates[at * 3 * h..(at + 1) * 3 * h];
            let (gr, rest) = g.split_at(h);
            let (gz, gn) = rest.split_at(h);
            let gn = &gn[..h];
            let q = &hn[idx..idx + h];
            let prev = if step > 0 {
                &hs[idx - h..idx]
            } else {
                &zeros[..h]
            };
            let dxg = &mut dx_gates[at * 3 * h..(at + 1) * 3 * h];
            let (dxr, rest) = dxg.split_at_mut(h);
            let (dxz, dxn) = rest.split_at_mut(h);
            let dhg = &mut dh_gates[at * 3 * h..(at + 1) * 3 * h];
            let (dhr, rest) = dhg.split_at_mut(h);
            let (dhz, dhn) = rest.split_at_mut(h);
            let dir = &mut direct[r * h..(r + 1) * h];
            let dh_r = &dh_r[..h];
            for j in 0..h {
                let (rv, z, n) = (gr[j], gz[j], gn[j]);
                let d = dh_r[j];
                let dpn = d * (1.0 - z) * (1.0 - n * n);
                let dpz = d * (prev[j] - n) * z * (1.0 - z);
                let dpr = dpn * q[j] * rv * (1.0 - rv);
                dxr[j] = dpr;
                dxz[j] = dpz;
                dxn[j] = dpn;
                dhr[j] = dpr;
                dhz[j] = dpz;
                dhn[j] = dpn * rv;
                dir[j] = d * z;
            }
        }
        // dh_next = dh_gates[:, step] · W_hh + z ⊙ dh for real rows; padded rows pass dh.
        small_matmul::<FMA>(
            &mut dh_next,
            h,
            &dh_gates[step * 3 * h..],
            t * 3 * h,
            rows,
            3 * h,
            w_hh,
            h,
            false,
        );
        for r in 0..rows {
            let span = r * h..(r + 1) * h;
            if mask[r * t + step] == 0.0 {
                dh_next[span.clone()].copy_from_slice(&dh[span]);
            } else {
                for (n, &v) in dh_next[span.clone()].iter_mut().zip(&direct[span]) {
                    *n += v;
                }
            }
        }
    }
}

/// Runs the fused GRU on an already projected input: `xproj` (B, T, 3H) without bias,
/// `w_hh` (3H, H), `b_ih`, `b_hh` (3H), `mask` (B, T) → hidden states (B, T, H).
pub(crate) fn fused_gru_projected(
    xproj: &Tensor,
    w_hh: &Tensor,
    b_ih: &Tensor,
    b_hh: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let h = w_hh.dim(1)?;
    let w_all = Tensor::cat(&[&b_ih.unsqueeze(1)?, w_hh, &b_hh.unsqueeze(1)?], 1)?;
    apply_fused(xproj, &w_all, mask, FusedGru::new(h, 0))
}

/// Runs the fused GRU on a layer input `x` (B, T, I), projecting it inside the op.
pub(crate) fn fused_gru(
    x: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    b_ih: &Tensor,
    b_hh: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let h = w_hh.dim(1)?;
    let w_all = Tensor::cat(&[w_ih, &b_ih.unsqueeze(1)?, w_hh, &b_hh.unsqueeze(1)?], 1)?;
    apply_fused(x, &w_all, mask, FusedGru::new(h, w_ih.dim(1)?))
}
