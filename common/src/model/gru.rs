//! GRU layers composed of candle ops, following PyTorch's `nn.GRU` (gate order `r, z, n`,
//! names `weight_ih_l{k}` ...). candle's own `GRU` concatenates its outputs on the wrong axis
//! and hard-codes `_l0` names (candle 0.11), so fedflow has its own.

use candle_core::Tensor;

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
