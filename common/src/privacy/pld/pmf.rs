//! The discretised privacy loss distribution (`dp_accounting`'s `DensePLDPmf`) and the FFT
//! arithmetic that composes it: connect-the-dots construction, convolution and FFT-power
//! self-composition with pessimistic tail truncation, and the ε/δ queries.

use realfft::RealFftPlanner;
use realfft::num_complex::Complex;

use super::{DELTA_DIFF_TOLERANCE, MAX_POINTS, privacy_err, too_wide};
use crate::Result;

/// A discrete privacy loss distribution on the grid `d·(lower + i)` with a mass at +∞
/// (`DensePLDPmf`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Pmf {
    pub(super) d: f64,
    pub(super) lower: i64,
    pub(super) probs: Vec<f64>,
    pub(super) infinity_mass: f64,
}

impl Pmf {
    /// No loss at all.
    pub(super) fn identity(d: f64) -> Pmf {
        Pmf {
            d,
            lower: 0,
            probs: vec![1.0],
            infinity_mass: 0.0,
        }
    }

    /// `create_pmf_pessimistic_connect_dots_fixed_gap`: the distribution on the losses
    /// `d·lower ..= d·upper` whose hockey-stick divergences at those points are `deltas`.
    pub(super) fn connect_dots_fixed_gap(
        d: f64,
        lower: i64,
        upper: i64,
        deltas: Vec<f64>,
    ) -> Result<Pmf> {
        if upper < lower || deltas.len() as i64 != upper - lower + 1 {
            return Err(privacy_err(format!(
                "connect-the-dots: {} deltas for the losses {lower}..={upper}",
                deltas.len()
            )));
        }
        if upper == lower {
            return Ok(Pmf {
                d,
                lower,
                probs: vec![1.0 - deltas[0]],
                infinity_mass: deltas[0],
            });
        }
        if deltas
            .windows(2)
            .any(|w| w[1] - w[0] > DELTA_DIFF_TOLERANCE)
        {
            return Err(privacy_err(
                "connect-the-dots: the hockey-stick divergences are not non-increasing",
            ));
        }
        let mut m = deltas;
        for i in 1..m.len() {
            m[i] = m[i].min(m[i - 1]);
        }
        let diffs: Vec<f64> = m.windows(2).map(|w| w[1] - w[0]).collect();
        let n = m.len();
        let mut probs = vec![0.0; n];
        probs[0] = 1.0 - m[0] + diffs[0] / d.exp_m1();
        for i in 1..n - 1 {
            probs[i] = (diffs[i] - diffs[i - 1] * d.exp()) / d.exp_m1();
        }
        probs[n - 1] = diffs[n - 2] / (-d).exp_m1();
        for p in &mut probs {
            *p = p.max(0.0);
        }
        Ok(Pmf {
            d,
            lower,
            probs,
            infinity_mass: m[n - 1],
        })
    }

    /// `DensePLDPmf.compose`: the convolution, tails truncated pessimistically.
    pub(super) fn compose(&self, other: &Pmf, tail_mass_truncation: f64) -> Result<Pmf> {
        if self.probs.len() + other.probs.len() > MAX_POINTS {
            return Err(too_wide());
        }
        let probs = convolve(&self.probs, &other.probs);
        let infinity_mass =
            self.infinity_mass + other.infinity_mass - self.infinity_mass * other.infinity_mass;
        let (offset, probs, right) = truncate_tails(probs, tail_mass_truncation);
        Ok(Pmf {
            d: self.d,
            lower: self.lower + other.lower + offset as i64,
            probs,
            infinity_mass: infinity_mass + right,
        })
    }

    /// `DensePLDPmf.self_compose`: the `n`-fold composition, by an FFT power.
    pub(super) fn self_compose(&self, n: u64, tail_mass_truncation: f64) -> Result<Pmf> {
        let (lower_bound, upper_bound) = self_convolve_bounds(&self.probs, n, tail_mass_truncation);
        if (upper_bound - lower_bound + 1) as f64 > MAX_POINTS as f64 {
            return Err(too_wide());
        }
        let out_len = (upper_bound - lower_bound + 1) as usize;
        let len = next_fast_len(out_len.max(self.probs.len()));
        let mut planner = RealFftPlanner::<f64>::new();
        let forward = planner.plan_fft_forward(len);
        let inverse = planner.plan_fft_inverse(len);
        let mut input = vec![0.0; len];
        input[..self.probs.len()].copy_from_slice(&self.probs);
        let mut spectrum = forward.make_output_vec();
        forward
            .process(&mut input, &mut spectrum)
            .expect("buffer sizes come from the plan");
        let nf = n as f64;
        for c in &mut spectrum {
            // z^n in polar form (numpy's complex power for large exponents).
            let (r, theta) = c.to_polar();
            *c = Complex::from_polar(r.powf(nf), theta * nf);
        }
        // A real signal's spectrum has real first (and, for even lengths, last) bins.
        spectrum[0].im = 0.0;
        if len.is_multiple_of(2) {
            let last = spectrum.len() - 1;
            spectrum[last].im = 0.0;
        }
        let mut output = inverse.make_output_vec();
        inverse
            .process(&mut spectrum, &mut output)
            .expect("buffer sizes come from the plan");
        let scale = 1.0 / len as f64;
        // The circular result, rolled so that index `lower_bound` comes first.
        let probs: Vec<f64> = (0..out_len)
            .map(|i| output[(i + lower_bound as usize) % len] * scale)
            .collect();
        let infinity_mass = tail_mass_truncation - (nf * (-self.infinity_mass).ln_1p()).exp_m1();
        Ok(Pmf {
            d: self.d,
            lower: self.lower * n as i64 + lower_bound,
            probs,
            infinity_mass,
        })
    }

    /// `_get_delta_for_epsilon`: the hockey-stick divergence at `epsilon`.
    pub(super) fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let mut delta = self.infinity_mass;
        for (i, p) in self.probs.iter().enumerate() {
            let loss = (self.lower + i as i64) as f64 * self.d;
            if loss > epsilon {
                delta += -(epsilon - loss).exp_m1() * p;
            }
        }
        delta
    }

    /// `_get_epsilon_for_delta`: the smallest ε whose hockey-stick divergence is at most
    /// `delta` (+∞ when there is none).
    pub(super) fn epsilon_for_delta(&self, delta: f64) -> f64 {
        if self.infinity_mass > delta {
            return f64::INFINITY;
        }
        let (mut mass_upper, mut mass_lower) = (self.infinity_mass, 0.0f64);
        let top = self.lower + self.probs.len() as i64 - 1;
        for (k, p) in self.probs.iter().rev().enumerate() {
            // The reference counts the losses down from the top in steps of d.
            let loss = top as f64 * self.d - k as f64 * self.d;
            if mass_upper > delta
                && mass_lower > 0.0
                && ((mass_upper - delta) / mass_lower).ln() >= loss
            {
                break;
            }
            mass_upper += p;
            mass_lower += (-loss).exp() * p;
            if mass_upper >= delta && mass_lower == 0.0 {
                return loss.max(0.0);
            }
        }
        if mass_upper <= mass_lower + delta {
            return 0.0;
        }
        ((mass_upper - delta) / mass_lower).ln()
    }
}

/// The linear convolution of `a` and `b` (scipy's `fftconvolve`, by FFT).
pub(super) fn convolve(a: &[f64], b: &[f64]) -> Vec<f64> {
    let out_len = a.len() + b.len() - 1;
    if a.len().min(b.len()) <= 64 {
        let mut out = vec![0.0; out_len];
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                out[i + j] += x * y;
            }
        }
        return out;
    }
    let len = next_fast_len(out_len);
    let mut planner = RealFftPlanner::<f64>::new();
    let forward = planner.plan_fft_forward(len);
    let inverse = planner.plan_fft_inverse(len);
    let spectrum = |x: &[f64]| {
        let mut input = vec![0.0; len];
        input[..x.len()].copy_from_slice(x);
        let mut s = forward.make_output_vec();
        forward
            .process(&mut input, &mut s)
            .expect("buffer sizes come from the plan");
        s
    };
    let (sa, sb) = (spectrum(a), spectrum(b));
    let mut product: Vec<Complex<f64>> = sa.iter().zip(&sb).map(|(x, y)| x * y).collect();
    product[0].im = 0.0;
    if len.is_multiple_of(2) {
        let last = product.len() - 1;
        product[last].im = 0.0;
    }
    let mut out = inverse.make_output_vec();
    inverse
        .process(&mut product, &mut out)
        .expect("buffer sizes come from the plan");
    let scale = 1.0 / len as f64;
    out.truncate(out_len);
    for x in &mut out {
        *x *= scale;
    }
    out
}

/// `_truncate_tails` (pessimistic): the longest prefix and suffix each holding at most half
/// of `tail_mass_truncation` are cut; the prefix's mass goes onto the first kept loss, the
/// suffix's is returned (it becomes infinite loss). Returns (prefix length, kept, suffix
/// mass).
pub(super) fn truncate_tails(probs: Vec<f64>, tail_mass_truncation: f64) -> (usize, Vec<f64>, f64) {
    if tail_mass_truncation == 0.0 {
        return (0, probs, 0.0);
    }
    let prefix = |it: &mut dyn Iterator<Item = &f64>| {
        let mut s = 0.0;
        let mut n = 0;
        for v in it {
            s += v;
            if s > tail_mass_truncation / 2.0 {
                return n;
            }
            n += 1;
        }
        n
    };
    let left = prefix(&mut probs.iter());
    let right = (probs.len() - prefix(&mut probs.iter().rev())).max(left + 1);
    let left_mass: f64 = probs[..left].iter().sum();
    let right_mass: f64 = probs[right.min(probs.len())..].iter().sum();
    let mut kept = probs[left..right.min(probs.len())].to_vec();
    if kept.is_empty() {
        kept.push(0.0);
    }
    kept[0] += left_mass;
    (left, kept, right_mass)
}

/// `compute_self_convolve_bounds`: indices outside which the `n`-fold self-convolution of
/// `probs` holds at most `tail_mass_truncation`, by Chernoff bounds at the reference's 40
/// orders.
pub(super) fn self_convolve_bounds(probs: &[f64], n: u64, tail_mass_truncation: f64) -> (i64, i64) {
    let mut upper = (probs.len() as i64 - 1) * n as i64;
    let mut lower = 0i64;
    if tail_mass_truncation == 0.0 {
        return (lower, upper);
    }
    let len = probs.len() as f64;
    let orders = (-20..0).chain(1..21).map(|o| o as f64 / len);
    for order in orders {
        // logsumexp(i·order, b = probs)
        let mx = probs
            .iter()
            .enumerate()
            .filter(|(_, p)| **p > 0.0)
            .map(|(i, _)| i as f64 * order)
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = probs
            .iter()
            .enumerate()
            .map(|(i, p)| p * (i as f64 * order - mx).exp())
            .sum();
        let log_mgf = mx + sum.ln();
        let bound = (n as f64 * log_mgf + (2.0 / tail_mass_truncation).ln()) / order;
        if !bound.is_finite() {
            continue;
        }
        if order > 0.0 {
            upper = upper.min(bound.ceil() as i64);
        } else {
            lower = lower.max(bound.floor() as i64);
        }
    }
    (lower, upper)
}

/// The smallest 2-, 3- and 5-smooth number at least `n` (a length the FFT does quickly).
pub(super) fn next_fast_len(n: usize) -> usize {
    let mut best = usize::MAX;
    let mut p5 = 1usize;
    while p5 < 2 * n.max(1) {
        let mut p35 = p5;
        while p35 < 2 * n.max(1) {
            let mut m = p35;
            while m < n {
                m *= 2;
            }
            best = best.min(m);
            p35 *= 3;
        }
        p5 *= 5;
    }
    best
}
