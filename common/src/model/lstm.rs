//! LSTM layers: a fused CPU recurrence (custom candle op with a hand-written backward) and a
//! reference implementation composed of ordinary candle ops (used on GPUs and as the
//! numerical reference in tests).
//!
//! Both follow PyTorch's `nn.LSTM` exactly: gate order `i, f, g, o`, two biases, parameter
//! names `weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`, zero initial
//! state. Padding is handled with a mask: at a padded step the state is carried unchanged,
//! so a left-padded sequence ends in exactly the state of its real events.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, bail};
use rayon::prelude::*;

use super::kernels::{MatRef, matmul_into, sigmoid, tanh};

/// Fused LSTM recurrence over a whole (left-padded) batch.
///
/// Inputs: `xproj` (B, T, 4H) = x·W_ihᵀ + b_ih + b_hh precomputed for every step, `w_hh`
/// (4H, H), `mask` (B, T) with 1 for real steps and 0 for padding. Output: hidden states
/// (B, T, H). The forward pass caches gate activations and cell states inside the op, so the
/// backward pass is one reverse sweep plus one large matmul for ∂W_hh.
///
/// Work is split across rayon threads by batch rows (rows are independent in the
/// recurrence); each thread runs single-threaded matmuls on its rows.
#[derive(Debug)]
pub(crate) struct FusedLstm {
    hidden: usize,
    cache: Mutex<Option<Cache>>,
}

#[derive(Debug)]
struct Cache {
    /// Activated gates (B, T, 4H): i, f, g, o.
    gates: Vec<f32>,
    /// Cell states (B, T, H).
    cells: Vec<f32>,
}

impl FusedLstm {
    pub(crate) fn new(hidden: usize) -> Self {
        FusedLstm {
            hidden,
            cache: Mutex::new(None),
        }
    }
}

fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("fused lstm: {what} must be f32")
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("fused lstm: {what} must be contiguous"),
    }
}

/// Rows per parallel chunk: enough rows that each thread's matmuls stay efficient.
fn chunk_rows(batch: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    batch.div_ceil(threads).max(1)
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
        let h = self.hidden;
        let (b, t, g4) = l1.shape().dims3()?;
        if g4 != 4 * h || l2.shape().dims() != [4 * h, h] || l3.shape().dims() != [b, t] {
            bail!(
                "fused lstm: shapes xproj {:?}, w_hh {:?}, mask {:?} do not fit hidden size {h}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let xproj = cpu_f32(s1, l1, "xproj")?;
        let w_hh = cpu_f32(s2, l2, "w_hh")?;
        let mask = cpu_f32(s3, l3, "mask")?;

        let mut gates = xproj.to_vec();
        let mut cells = vec![0f32; b * t * h];
        let mut hs = vec![0f32; b * t * h];
        let rows = chunk_rows(b);
        gates
            .par_chunks_mut(rows * t * 4 * h)
            .zip(cells.par_chunks_mut(rows * t * h))
            .zip(hs.par_chunks_mut(rows * t * h))
            .zip(mask.par_chunks(rows * t))
            .for_each(|(((gates, cells), hs), mask)| {
                forward_rows(gates, cells, hs, mask, w_hh, t, h);
            });
        *self.cache.lock().expect("fused lstm cache poisoned") = Some(Cache { gates, cells });
        Ok((CpuStorage::F32(hs), Shape::from((b, t, h))))
    }

    fn bwd(
        &self,
        _xproj: &Tensor,
        w_hh: &Tensor,
        mask: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = self.hidden;
        let (b, t, _) = res.dims3()?;
        let cache = self.cache.lock().expect("fused lstm cache poisoned");
        let Some(cache) = cache.as_ref() else {
            bail!("fused lstm: backward called before forward")
        };
        let w = w_hh.flatten_all()?.to_vec1::<f32>()?;
        let mask_v = mask.flatten_all()?.to_vec1::<f32>()?;
        let hs = res.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;

        let mut dgates = vec![0f32; b * t * 4 * h];
        let rows = chunk_rows(b);
        dgates
            .par_chunks_mut(rows * t * 4 * h)
            .zip(cache.gates.par_chunks(rows * t * 4 * h))
            .zip(cache.cells.par_chunks(rows * t * h))
            .zip(grad.par_chunks(rows * t * h))
            .zip(mask_v.par_chunks(rows * t))
            .for_each(|((((dgates, gates), cells), grad), mask)| {
                backward_rows(dgates, gates, cells, grad, mask, &w, t, h);
            });

        // ∂W_hh = Σ_{b,t} dgates[b,t]ᵀ · h[b,t-1]: one matmul over all (b, t) pairs with the
        // hidden states shifted by one step (zero before the first step).
        let mut h_prev = vec![0f32; b * t * h];
        for r in 0..b {
            let base = r * t * h;
            h_prev[base + h..base + t * h].copy_from_slice(&hs[base..base + (t - 1) * h]);
        }
        let mut dw = vec![0f32; 4 * h * h];
        let dg = MatRef::dense(&dgates, b * t, 4 * h);
        let hp = MatRef::dense(&h_prev, b * t, h);
        matmul_into(&mut dw, h, dg.t(), hp, false);

        let dev = res.device();
        let dxproj = Tensor::from_vec(dgates, (b, t, 4 * h), dev)?;
        let dw = Tensor::from_vec(dw, (4 * h, h), dev)?;
        Ok((Some(dxproj), Some(dw), None))
    }
}

/// Forward recurrence for a block of rows; `gates` holds x-projections on entry and
/// activated gates on exit.
fn forward_rows(gates: &mut [f32], cells: &mut [f32], hs: &mut [f32], mask: &[f32], w_hh: &[f32], t: usize, h: usize) {
    let rows = mask.len() / t;
    let w_t = MatRef::dense(w_hh, 4 * h, h).t();
    for step in 0..t {
        if step > 0 {
            // gates[:, step] += h[:, step-1] · W_hhᵀ
            let prev = MatRef {
                data: &hs[(step - 1) * h..],
                rows,
                cols: h,
                row_stride: t * h,
                col_stride: 1,
            };
            matmul_into(&mut gates[step * 4 * h..], t * 4 * h, prev, w_t, true);
        }
        for r in 0..rows {
            let g = &mut gates[(r * t + step) * 4 * h..(r * t + step + 1) * 4 * h];
            let idx = (r * t + step) * h;
            if mask[r * t + step] == 0.0 {
                // Padding: carry the state, record zero gates (they get no gradient).
                g.fill(0.0);
                if step > 0 {
                    cells.copy_within(idx - h..idx, idx);
                    hs.copy_within(idx - h..idx, idx);
                }
                continue;
            }
            let (gi, rest) = g.split_at_mut(h);
            let (gf, rest) = rest.split_at_mut(h);
            let (gg, go) = rest.split_at_mut(h);
            for v in gi.iter_mut().chain(gf.iter_mut()).chain(go.iter_mut()) {
                *v = sigmoid(*v);
            }
            for v in gg.iter_mut() {
                *v = tanh(*v);
            }
            let (cells_before, cells_now) = cells.split_at_mut(idx);
            let c_prev: &[f32] = if step > 0 { &cells_before[idx - h..] } else { &[] };
            let c_now = &mut cells_now[..h];
            let h_now = &mut hs[idx..idx + h];
            for j in 0..h {
                let cp = if step > 0 { c_prev[j] } else { 0.0 };
                let c = gf[j] * cp + gi[j] * gg[j];
                c_now[j] = c;
                h_now[j] = go[j] * tanh(c);
            }
        }
    }
}

/// Backward sweep for a block of rows: fills `dgates` with ∂loss/∂(pre-activation gates),
/// which is also ∂loss/∂xproj.
#[allow(clippy::too_many_arguments)]
fn backward_rows(
    dgates: &mut [f32],
    gates: &[f32],
    cells: &[f32],
    grad: &[f32],
    mask: &[f32],
    w_hh: &[f32],
    t: usize,
    h: usize,
) {
    let rows = mask.len() / t;
    let w = MatRef::dense(w_hh, 4 * h, h);
    let mut dh_next = vec![0f32; rows * h];
    let mut dc_next = vec![0f32; rows * h];
    let mut dh = vec![0f32; rows * h];
    for step in (0..t).rev() {
        for r in 0..rows {
            let idx = (r * t + step) * h;
            let dh_r = &mut dh[r * h..(r + 1) * h];
            for j in 0..h {
                dh_r[j] = grad[idx + j] + dh_next[r * h + j];
            }
            if mask[r * t + step] == 0.0 {
                // Carried state: gradients flow straight to the previous step.
                continue;
            }
            let g = &gates[(r * t + step) * 4 * h..(r * t + step + 1) * 4 * h];
            let d = &mut dgates[(r * t + step) * 4 * h..(r * t + step + 1) * 4 * h];
            let dc_r = &mut dc_next[r * h..(r + 1) * h];
            for j in 0..h {
                let (i, f, gg, o) = (g[j], g[h + j], g[2 * h + j], g[3 * h + j]);
                let c = cells[idx + j];
                let c_prev = if step > 0 { cells[idx - h + j] } else { 0.0 };
                let tc = tanh(c);
                let dho = dh_r[j];
                let dc = dc_r[j] + dho * o * (1.0 - tc * tc);
                d[j] = dc * gg * i * (1.0 - i);
                d[h + j] = dc * c_prev * f * (1.0 - f);
                d[2 * h + j] = dc * i * (1.0 - gg * gg);
                d[3 * h + j] = dho * tc * o * (1.0 - o);
                dc_r[j] = dc * f;
            }
        }
        // dh_next = dgates[:, step] · W_hh for real rows; padded rows pass dh through.
        let dg = MatRef {
            data: &dgates[step * 4 * h..],
            rows,
            cols: 4 * h,
            row_stride: t * 4 * h,
            col_stride: 1,
        };
        matmul_into(&mut dh_next, h, dg, w, false);
        for r in 0..rows {
            if mask[r * t + step] == 0.0 {
                dh_next[r * h..(r + 1) * h].copy_from_slice(&dh[r * h..(r + 1) * h]);
            }
        }
    }
}

/// Runs the fused recurrence: `xproj` (B, T, 4H), `w_hh` (4H, H), `mask` (B, T) → (B, T, H).
pub(crate) fn fused_lstm(xproj: &Tensor, w_hh: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let h = w_hh.dim(1)?;
    if xproj.dtype() != DType::F32 {
        bail!("fused lstm runs in f32 only, got {:?}", xproj.dtype());
    }
    xproj
        .contiguous()?
        .apply_op3(&w_hh.contiguous()?, &mask.contiguous()?, FusedLstm::new(h))
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
    let b = xproj_steps.first().map(|x| x.dim(0)).transpose()?.unwrap_or(0);
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
