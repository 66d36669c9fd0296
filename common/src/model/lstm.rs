//! LSTM layers: a fused CPU recurrence (custom candle op with a hand-written backward) and a
//! reference implementation composed of ordinary candle ops (used on GPUs and as the
//! numerical reference in tests).
//!
//! Both follow PyTorch's `nn.LSTM` exactly: gate order `i, f, g, o`, two biases, parameter
//! names `weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`, zero initial
//! state. Padding is handled with a mask: at a padded step the state is carried unchanged,
//! so a left-padded sequence ends in exactly the state of its real events.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, bail};
use rayon::prelude::*;

use super::kernels::{
    MatRef, ROWS_PER_CHUNK, apply_fused, cpu_f32, kernel_pool, matmul_into, multiversion, sigmoid,
    small_matmul, tanh,
};

/// Fused LSTM recurrence over a whole (left-padded) batch.
///
/// Arguments: `x` (B, T, I) — the layer's input — or, when `input == 0`, `xproj` (B, T, 4H),
/// the input already projected (the first layer gathers it from a folded embedding table);
/// `w_all` (4H, I+H+1) = `[W_ih | W_hh | b_ih + b_hh]`, one matrix so that the gradients of
/// all three come out of a single matmul (instead of separate products and a slow strided
/// reduction for the bias in candle's backward); `mask` (B, T) with 1 for real steps and 0
/// for padding. Output: hidden states (B, T, H).
///
/// The forward pass caches gate activations and cell states inside the op, so the backward
/// pass is one reverse sweep plus one large matmul for ∂w_all. Work is split by batch rows
/// (independent in the recurrence) into fixed chunks run on the kernel pool; each chunk does
/// its own input projection, recurrence and input gradient with single-threaded matmuls.
#[derive(Debug)]
pub(crate) struct FusedLstm {
    hidden: usize,
    input: usize,
    cache: Mutex<Option<Cache>>,
}

#[derive(Debug)]
struct Cache {
    /// Activated gates (B, T, 4H): i, f, g, o.
    gates: Vec<f32>,
    /// Cell states (B, T, H).
    cells: Vec<f32>,
    /// tanh of the cell states (B, T, H), so the backward pass need not recompute it.
    tanh_cells: Vec<f32>,
}

impl FusedLstm {
    fn new(hidden: usize, input: usize) -> Self {
        FusedLstm {
            hidden,
            input,
            cache: Mutex::new(None),
        }
    }

    /// Row width of `w_all`.
    fn width(&self) -> usize {
        self.input + self.hidden + 1
    }

    /// Width of the first argument's rows.
    fn arg_width(&self) -> usize {
        if self.input == 0 {
            4 * self.hidden
        } else {
            self.input
        }
    }
}

impl CustomOp3 for FusedLstm {
    fn name(&self) -> &'static str {
        "fused-lstm"
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
        if d_got != d || l2.shape().dims() != [4 * h, wd] || l3.shape().dims() != [b, t] {
            bail!(
                "fused lstm: shapes input {:?}, w_all {:?}, mask {:?} do not fit input {input}, hidden {h}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let x = cpu_f32(s1, l1, "input")?;
        let w = cpu_f32(s2, l2, "w_all")?;
        let mask = cpu_f32(s3, l3, "mask")?;
        let bias: Vec<f32> = (0..4 * h).map(|k| w[k * wd + input + h]).collect();
        // W_hhᵀ packed (H × 4H) once for all steps' products.
        let mut w_hh_t = vec![0f32; h * 4 * h];
        for g in 0..4 * h {
            for j in 0..h {
                w_hh_t[j * 4 * h + g] = w[g * wd + input + j];
            }
        }

        let mut gates = if input == 0 {
            x.to_vec()
        } else {
            vec![0f32; b * t * 4 * h]
        };
        let mut cells = vec![0f32; b * t * h];
        let mut tanh_cells = vec![0f32; b * t * h];
        let mut hs = vec![0f32; b * t * h];
        let rows = ROWS_PER_CHUNK;
        kernel_pool().install(|| {
            gates
                .par_chunks_mut(rows * t * 4 * h)
                .zip(x.par_chunks(rows * t * d))
                .zip(cells.par_chunks_mut(rows * t * h))
                .zip(tanh_cells.par_chunks_mut(rows * t * h))
                .zip(hs.par_chunks_mut(rows * t * h))
                .zip(mask.par_chunks(rows * t))
                .for_each(|(((((gates, x), cells), tanh_cells), hs), mask)| {
                    if input > 0 {
                        // gates = x · W_ihᵀ for every (row, step) of the chunk at once.
                        let xm = MatRef::dense(x, mask.len(), input);
                        matmul_into(gates, 4 * h, xm, w_ih_view(w, input, h).t(), false, 1);
                    }
                    for row in gates.chunks_exact_mut(4 * h) {
                        for (g, b) in row.iter_mut().zip(&bias) {
                            *g += b;
                        }
                    }
                    forward_rows(gates, cells, tanh_cells, hs, mask, &w_hh_t, t, h);
                })
        });
        *self.cache.lock().expect("fused lstm cache poisoned") = Some(Cache {
            gates,
            cells,
            tanh_cells,
        });
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
        let cache = self.cache.lock().expect("fused lstm cache poisoned");
        let Some(cache) = cache.as_ref() else {
            bail!("fused lstm: backward called before forward")
        };
        let w = w_all.flatten_all()?.to_vec1::<f32>()?;
        let mask_v = mask.flatten_all()?.to_vec1::<f32>()?;
        let hs = res.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // W_hh packed (4H × H) once for all steps' products.
        let w_hh: Vec<f32> = (0..4 * h)
            .flat_map(|g| w[g * wd + input..g * wd + input + h].iter().copied())
            .collect();

        let mut dgates = vec![0f32; b * t * 4 * h];
        // With input == 0 there is no ∂x to compute, but `dx` still needs one chunk per row
        // chunk (a zipped iterator stops at its shortest part), so it gets one unused float
        // per (row, step).
        let dx_width = input.max(1);
        let mut dx = vec![0f32; b * t * dx_width];
        let rows = ROWS_PER_CHUNK;
        kernel_pool().install(|| {
            dgates
                .par_chunks_mut(rows * t * 4 * h)
                .zip(dx.par_chunks_mut(rows * t * dx_width))
                .zip(cache.gates.par_chunks(rows * t * 4 * h))
                .zip(cache.cells.par_chunks(rows * t * h))
                .zip(cache.tanh_cells.par_chunks(rows * t * h))
                .zip(grad.par_chunks(rows * t * h))
                .zip(mask_v.par_chunks(rows * t))
                .for_each(
                    |((((((dgates, dx), gates), cells), tanh_cells), grad), mask)| {
                        backward_rows(dgates, gates, cells, tanh_cells, grad, mask, &w_hh, t, h);
                        if input > 0 {
                            // ∂x = ∂gates · W_ih for the chunk's (row, step) pairs at once.
                            let dg = MatRef::dense(dgates, mask.len(), 4 * h);
                            matmul_into(dx, input, dg, w_ih_view(&w, input, h), false, 1);
                        }
                    },
                )
        });

        // ∂w_all = Σ_{b,t} dgates[b,t]ᵀ · [x[b,t] | h[b,t-1] | 1]: one matmul over all (b, t)
        // pairs, with the hidden states shifted by one step (zero before the first step) and
        // a column of ones that turns the bias gradient into part of the same product.
        let xs = if input > 0 {
            x.flatten_all()?.to_vec1::<f32>()?
        } else {
            Vec::new()
        };
        let mut z = vec![0f32; b * t * wd];
        for r in 0..b {
            for s in 0..t {
                let at = r * t + s;
                let row = &mut z[at * wd..(at + 1) * wd];
                row[..input].copy_from_slice(&xs[at * input..(at + 1) * input]);
                if s > 0 {
                    row[input..input + h].copy_from_slice(&hs[(at - 1) * h..at * h]);
                }
                row[input + h] = 1.0;
            }
        }
        let mut dw = vec![0f32; 4 * h * wd];
        let dg = MatRef::dense(&dgates, b * t, 4 * h);
        let zm = MatRef::dense(&z, b * t, wd);
        let pool = kernel_pool();
        pool.install(|| matmul_into(&mut dw, wd, dg.t(), zm, false, pool.current_num_threads()));

        let dev = res.device();
        let dinput = if input > 0 {
            Tensor::from_vec(dx, (b, t, d), dev)?
        } else {
            Tensor::from_vec(dgates, (b, t, d), dev)?
        };
        let dw = Tensor::from_vec(dw, (4 * h, wd), dev)?;
        Ok((Some(dinput), Some(dw), None))
    }
}

multiversion!(forward_rows, forward_rows_generic, (
    gates: &mut [f32], cells: &mut [f32], tanh_cells: &mut [f32], hs: &mut [f32],
    mask: &[f32], w_hh_t: &[f32], t: usize, h: usize,
));
multiversion!(backward_rows, backward_rows_generic, (
    dgates: &mut [f32], gates: &[f32], cells: &[f32], tanh_cells: &[f32], grad: &[f32],
    mask: &[f32], w_hh: &[f32], t: usize, h: usize,
));

/// The (4H, I) W_ih part of the (4H, I+H+1) `[W_ih | W_hh | bias]` matrix.
fn w_ih_view(w_all: &[f32], input: usize, h: usize) -> MatRef<'_> {
    MatRef {
        data: w_all,
        rows: 4 * h,
        cols: input,
        row_stride: input + h + 1,
        col_stride: 1,
    }
}

/// Forward recurrence for a block of rows; `gates` holds x-projections on entry and
/// activated gates on exit.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_rows_generic<const FMA: bool>(
    gates: &mut [f32],
    cells: &mut [f32],
    tanh_cells: &mut [f32],
    hs: &mut [f32],
    mask: &[f32],
    w_hh_t: &[f32],
    t: usize,
    h: usize,
) {
    let rows = mask.len() / t;
    for step in 0..t {
        if step > 0 {
            // gates[:, step] += h[:, step-1] · W_hhᵀ
            small_matmul::<FMA>(
                &mut gates[step * 4 * h..],
                t * 4 * h,
                &hs[(step - 1) * h..],
                t * h,
                rows,
                h,
                w_hh_t,
                4 * h,
                true,
            );
        }
        for r in 0..rows {
            let at = r * t + step;
            let g = &mut gates[at * 4 * h..(at + 1) * 4 * h];
            let idx = at * h;
            if mask[at] == 0.0 {
                // Padding: carry the state, record zero gates (they get no gradient).
                g.fill(0.0);
                if step > 0 {
                    cells.copy_within(idx - h..idx, idx);
                    hs.copy_within(idx - h..idx, idx);
                }
                continue;
            }
            let (ifg, go) = g.split_at_mut(3 * h);
            let (i_f, gg) = ifg.split_at_mut(2 * h);
            for v in i_f.iter_mut() {
                *v = sigmoid(*v);
            }
            for v in go.iter_mut() {
                *v = sigmoid(*v);
            }
            for v in gg.iter_mut() {
                *v = tanh(*v);
            }
            let (gi, gf) = i_f.split_at(h);
            let (cells_before, cells_now) = cells.split_at_mut(idx);
            let c_now = &mut cells_now[..h];
            if step > 0 {
                let c_prev = &cells_before[idx - h..];
                for (((c, &cp), (&f, &i)), &g) in c_now
                    .iter_mut()
                    .zip(c_prev)
                    .zip(gf.iter().zip(gi))
                    .zip(gg.iter())
                {
                    *c = f * cp + i * g;
                }
            } else {
                for ((c, &i), &g) in c_now.iter_mut().zip(gi).zip(gg.iter()) {
                    *c = i * g;
                }
            }
            let tc_now = &mut tanh_cells[idx..idx + h];
            for (tc, &c) in tc_now.iter_mut().zip(c_now.iter()) {
                *tc = tanh(c);
            }
            for ((hv, &tc), &o) in hs[idx..idx + h]
                .iter_mut()
                .zip(tc_now.iter())
                .zip(go.iter())
            {
                *hv = o * tc;
            }
        }
    }
}

/// Backward sweep for a block of rows: fills `dgates` with ∂loss/∂(pre-activation gates),
/// which is also ∂loss/∂xproj.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_rows_generic<const FMA: bool>(
    dgates: &mut [f32],
    gates: &[f32],
    cells: &[f32],
    tanh_cells: &[f32],
    grad: &[f32],
    mask: &[f32],
    w_hh: &[f32],
    t: usize,
    h: usize,
) {
    let rows = mask.len() / t;
    let mut dh_next = vec![0f32; rows * h];
    let mut dc_next = vec![0f32; rows * h];
    let mut dh = vec![0f32; rows * h];
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
                // Carried state: gradients flow straight to the previous step.
                continue;
            }
            let g = &gates[at * 4 * h..(at + 1) * 4 * h];
            let (gi, rest) = g.split_at(h);
            let (gf, rest) = rest.split_at(h);
            let (gg, go) = rest.split_at(h);
            let go = &go[..h];
            let d = &mut dgates[at * 4 * h..(at + 1) * 4 * h];
            let (di, rest) = d.split_at_mut(h);
            let (df, rest) = rest.split_at_mut(h);
            let (dg, dout) = rest.split_at_mut(h);
            let dout = &mut dout[..h];
            // Every slice below has length exactly h, so the loop runs without bounds checks.
            let tc_now = &tanh_cells[idx..idx + h];
            let c_prev = if step > 0 {
                &cells[idx - h..idx]
            } else {
                &zeros[..h]
            };
            let dc_r = &mut dc_next[r * h..(r + 1) * h];
            let dh_r = &dh_r[..h];
            for j in 0..h {
                let (i, f, g, o) = (gi[j], gf[j], gg[j], go[j]);
                let tc = tc_now[j];
                let dho = dh_r[j];
                let dc = dc_r[j] + dho * o * (1.0 - tc * tc);
                di[j] = dc * g * i * (1.0 - i);
                df[j] = dc * c_prev[j] * f * (1.0 - f);
                dg[j] = dc * i * (1.0 - g * g);
                dout[j] = dho * tc * o * (1.0 - o);
                dc_r[j] = dc * f;
            }
        }
        // dh_next = dgates[:, step] · W_hh for real rows; padded rows pass dh through.
        small_matmul::<FMA>(
            &mut dh_next,
            h,
            &dgates[step * 4 * h..],
            t * 4 * h,
            rows,
            4 * h,
            w_hh,
            h,
            false,
        );
        for r in 0..rows {
            if mask[r * t + step] == 0.0 {
                dh_next[r * h..(r + 1) * h].copy_from_slice(&dh[r * h..(r + 1) * h]);
            }
        }
    }
}

/// Runs the fused LSTM on an already projected input: `xproj` (B, T, 4H) without bias,
/// `w_hh` (4H, H), `bias` (4H) = b_ih + b_hh, `mask` (B, T) → hidden states (B, T, H).
pub(crate) fn fused_lstm_projected(
    xproj: &Tensor,
    w_hh: &Tensor,
    bias: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let h = w_hh.dim(1)?;
    let w_all = Tensor::cat(&[w_hh, &bias.unsqueeze(1)?], 1)?;
    apply_fused(xproj, &w_all, mask, FusedLstm::new(h, 0))
}

/// Runs the fused LSTM on a layer input `x` (B, T, I), projecting it inside the op:
/// `w_ih` (4H, I), `w_hh` (4H, H), `bias` (4H), `mask` (B, T) → hidden states (B, T, H).
pub(crate) fn fused_lstm(
    x: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    bias: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let h = w_hh.dim(1)?;
    let w_all = Tensor::cat(&[w_ih, w_hh, &bias.unsqueeze(1)?], 1)?;
    apply_fused(x, &w_all, mask, FusedLstm::new(h, w_ih.dim(1)?))
}

/// Reference LSTM recurrence from ordinary candle ops, one step at a time.
///
/// `xproj_steps[t]` is (B, 4H), `mask_steps[t]` is (B, 1); returns the hidden state of every
/// step, each (B, H). Works on any device and dtype and differentiates through candle's
/// autograd, which makes it the numerical reference for [`fused_lstm`].
pub(crate) fn reference_lstm(
    xproj_steps: &[Tensor],
    w_hh: &Tensor,
    mask_steps: &[Tensor],
) -> candle_core::Result<Vec<Tensor>> {
    let h = w_hh.dim(1)?;
    let b = xproj_steps
        .first()
        .map(|x| x.dim(0))
        .transpose()?
        .unwrap_or(0);
    let dev = w_hh.device();
    let mut hs = Tensor::zeros((b, h), w_hh.dtype(), dev)?;
    let mut cs = hs.clone();
    let w_t = w_hh.t()?;
    let mut out = Vec::with_capacity(xproj_steps.len());
    for (x, m) in xproj_steps.iter().zip(mask_steps) {
        let g = (x + hs.matmul(&w_t)?)?;
        let i = candle_nn::ops::sigmoid(&g.narrow(1, 0, h)?)?;
        let f = candle_nn::ops::sigmoid(&g.narrow(1, h, h)?)?;
        let gg = g.narrow(1, 2 * h, h)?.tanh()?;
        let o = candle_nn::ops::sigmoid(&g.narrow(1, 3 * h, h)?)?;
        let c_new = ((f * &cs)? + (i * gg)?)?;
        let h_new = (o * c_new.tanh()?)?;
        let keep = (1.0 - m)?;
        cs = (c_new.broadcast_mul(m)? + cs.broadcast_mul(&keep)?)?;
        hs = (h_new.broadcast_mul(m)? + hs.broadcast_mul(&keep)?)?;
        out.push(hs.clone());
    }
    Ok(out)
}
