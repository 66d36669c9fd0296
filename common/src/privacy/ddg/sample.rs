//! The exact discrete Gaussian sampler of Canonne, Kamath and Steinke ("The Discrete
//! Gaussian for Differential Privacy", NeurIPS 2020, arXiv:2004.00010, Algorithms 1-3), in
//! integer arithmetic: every probability it draws against is a ratio of integers compared
//! with a uniform integer, so no floating-point rounding shapes the noise (the attacks on
//! floating-point samplers, Mironov 2012, do not apply).
//!
//! The variance parameter `σ²` is an integer, so every ratio is exact in `u128`.

use rand::{CryptoRng, Rng};

/// The largest `σ²` the sampler takes: `2^40` (`σ` about a million), so that every
/// intermediate product fits in 128 bits.
pub const MAX_SIGMA2: u64 = 1 << 40;

/// `Bernoulli(num / den)`, for `num <= den`, `den > 0`.
fn bernoulli<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    rng.random_range(0..den) < num
}

/// `Bernoulli(exp(-num / den))` for `num / den` in `[0, 1]` (Algorithm 1, first case:
/// the parity of the first failure of `Bernoulli(γ / k)`, `k = 1, 2, ...`).
fn bernoulli_exp_neg_unit<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    let mut k: u128 = 1;
    // den <= 2^83 and k stays tiny (P(k > 40) < 1/40!), so den * k cannot overflow.
    while bernoulli(rng, num, den * k) {
        k += 1;
    }
    k % 2 == 1
}

/// `Bernoulli(exp(-num / den))` for any `num / den >= 0` (Algorithm 1): one
/// `Bernoulli(exp(-1))` per whole unit of the exponent, then the fractional part.
fn bernoulli_exp_neg<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    let whole = num / den;
    let mut k = 0;
    while k < whole {
        if !bernoulli_exp_neg_unit(rng, 1, 1) {
            return false;
        }
        k += 1;
    }
    bernoulli_exp_neg_unit(rng, num % den, den)
}

/// The discrete Laplace distribution with integer scale `t >= 1`, `P(x) ∝ exp(-|x| / t)`
/// (Algorithm 2 with `s = 1`).
fn discrete_laplace<R: Rng + ?Sized>(rng: &mut R, t: u128) -> i128 {
    loop {
        let u = rng.random_range(0..t);
        if !bernoulli_exp_neg(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_neg_unit(rng, 1, 1) {
            v += 1;
        }
        let x = (u + t * v) as i128;
        let negative: bool = rng.random();
        if negative && x == 0 {
            continue;
        }
        return if negative { -x } else { x };
    }
}

/// One draw of the discrete Gaussian `N_Z(0, σ²)`, `P(x) ∝ exp(-x² / (2σ²))` over the
/// integers (Algorithm 3): a discrete Laplace draw `Y` of scale `t = ⌊σ⌋ + 1`, kept with
/// probability `exp(-(|Y| - σ²/t)² / (2σ²)) = exp(-(|Y|·t - σ²)² / (2σ²t²))`.
///
/// `sigma2` must be in `1..=MAX_SIGMA2` (checked by [`super::DiscreteGaussian::new`]).
/// A draw with `||Y|·t - σ²| >= 2^63` is refused without the last Bernoulli: its
/// acceptance probability is below `exp(-2^42)`, so the output differs from the exact
/// distribution by less than that in total variation.
pub(crate) fn discrete_gaussian<R: Rng + CryptoRng + ?Sized>(rng: &mut R, sigma2: u64) -> i64 {
    debug_assert!((1..=MAX_SIGMA2).contains(&sigma2));
    let p = sigma2 as u128;
    let t = p.isqrt() + 1;
    loop {
        let y = discrete_laplace(rng, t);
        let a = (y.unsigned_abs() as i128)
            .checked_mul(t as i128)
            .map(|yt| (yt - p as i128).unsigned_abs());
        let Some(a) = a.filter(|&a| a < 1 << 63) else {
            continue;
        };
        if bernoulli_exp_neg(rng, a * a, 2 * p * t * t) {
            return y as i64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// `Bernoulli(exp(-γ))` hits its probability for γ below, at and above 1.
    #[test]
    fn bernoulli_exp_neg_has_its_probability() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        for (num, den) in [(0u128, 1u128), (1, 3), (1, 1), (5, 2), (7, 3)] {
            let n = 200_000;
            let hits = (0..n)
                .filter(|_| bernoulli_exp_neg(&mut rng, num, den))
                .count();
            let p = (-(num as f64) / den as f64).exp();
            let sd = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
            let got = hits as f64 / n as f64;
            assert!(
                (got - p).abs() < 5.0 * sd + 1e-12,
                "γ {num}/{den}: {got} vs {p}"
            );
        }
    }

    /// Draws follow the discrete Gaussian's mass function (chi-square over the bins
    /// within four σ, the tails pooled) for small and large σ².
    #[test]
    fn draws_follow_the_discrete_gaussian() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        for sigma2 in [1u64, 7, 400, 90_000] {
            let sigma = (sigma2 as f64).sqrt();
            // Bins: each integer within 4σ for small σ, else 41 equal-width ranges.
            let reach = (4.0 * sigma).ceil() as i64;
            let width = ((2 * reach + 1 + 40) / 41).max(1);
            let bin = |x: i64| -> usize {
                if x.abs() > reach {
                    0
                } else {
                    1 + ((x + reach) / width) as usize
                }
            };
            let bins = 2 + (2 * reach as usize) / width as usize;
            let mass = |x: i64| (-(x as f64).powi(2) / (2.0 * sigma2 as f64)).exp();
            let norm: f64 = (-(40 * reach)..=(40 * reach)).map(mass).sum();
            let mut want = vec![0.0; bins];
            for x in -(40 * reach)..=(40 * reach) {
                want[bin(x)] += mass(x) / norm;
            }
            let n = 100_000;
            let mut got = vec![0usize; bins];
            let mut sq = 0.0;
            for _ in 0..n {
                let x = discrete_gaussian(&mut rng, sigma2);
                got[bin(x)] += 1;
                sq += (x as f64).powi(2);
            }
            let chi2: f64 = got
                .iter()
                .zip(&want)
                .filter(|(_, w)| **w * n as f64 >= 5.0)
                .map(|(&g, &w)| (g as f64 - w * n as f64).powi(2) / (w * n as f64))
                .sum();
            // At most 43 bins: the 0.999 quantile of chi-square with 42 degrees is 76.
            assert!(chi2 < 80.0, "σ² {sigma2}: chi-square {chi2}");
            let var = sq / n as f64;
            // The discrete Gaussian's variance is at most σ² (CKS20, Corollary 9).
            assert!(
                var < sigma2 as f64 * 1.02 + 0.02,
                "σ² {sigma2}: variance {var}"
            );
            assert!(
                var > sigma2 as f64 * 0.97 - 0.1,
                "σ² {sigma2}: variance {var}"
            );
        }
    }

    /// The largest σ² draws without overflow and keeps its scale.
    #[test]
    fn the_largest_sigma_draws() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let n = 2_000;
        let sq: f64 = (0..n)
            .map(|_| (discrete_gaussian(&mut rng, MAX_SIGMA2) as f64).powi(2))
            .sum();
        let ratio = sq / n as f64 / MAX_SIGMA2 as f64;
        assert!((0.85..1.15).contains(&ratio), "variance ratio {ratio}");
    }
}
