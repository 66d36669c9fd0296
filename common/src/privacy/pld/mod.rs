//! Privacy-loss-distribution (PLD) accounting of the Poisson-subsampled Gaussian mechanism,
//! reproducing Google's `dp_accounting` `PLDAccountant` (PyPI `dp-accounting` 0.6.0,
//! `dp_accounting/pld/`) with its defaults, function by function:
//!
//! - the mechanism's privacy loss, its inverse and its hockey-stick divergence for the
//!   *remove* and *add* adjacencies of add-or-remove-one neighbours under Poisson sampling
//!   with probability q (`privacy_loss_mechanism.py`, `AdditiveNoisePrivacyLoss` and
//!   `GaussianPrivacyLoss`; Koskela, Jälkö, Honkela 2020, "Computing Tight Differential
//!   Privacy Guarantees Using FFT", AISTATS, and the supplementary material of Google's
//!   "Privacy Loss Distributions" note), truncating the noise where its log mass is -50;
//! - the distribution discretised by *pessimistic connect-the-dots* on a grid of 1e-4
//!   (`pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap`; Doroshenko, Ghazi, Kamath,
//!   Kumar, Manurangsi 2022, "Connect the Dots: Tighter Discrete Approximations of Privacy
//!   Loss Distributions", PETS, Algorithm 1), which is a valid upper bound: every δ(ε) of the
//!   discrete distribution is at least the mechanism's;
//! - self-composition by an FFT power with Chernoff-bounded truncation of at most 1e-15 of
//!   tail mass, the truncated mass counted as infinite loss (`common.self_convolve`,
//!   `compute_self_convolve_bounds`; `DensePLDPmf.self_compose`), and composition of
//!   different events by FFT convolution, the left tail moved onto the smallest loss and the
//!   right tail onto +∞ (`DensePLDPmf.compose`, `_truncate_tails`), so truncation only ever
//!   makes the bound larger;
//! - the queries `get_epsilon_for_delta` and `get_delta_for_epsilon` of both adjacencies,
//!   the larger of the two (`PrivacyLossDistribution`).
//!
//! The reference keeps small distributions (at most 1000 points) as a dictionary and
//! composes them by a quadratic loop; this port always uses the dense form. The two agree to
//! floating-point rounding except that the dense form truncates once more (at most 1e-15 of
//! mass, moved to +∞, i.e. pessimistically). `common/tests/pld_reference.rs` checks every
//! figure against fixtures written by the reference (`common/tests/privacy/
//! make_pld_fixtures.py`).

use crate::{Error, Result};

mod pmf;

use pmf::Pmf;
#[cfg(test)]
use pmf::{next_fast_len, truncate_tails};

/// The reference's default `value_discretization_interval`.
pub const DEFAULT_DISCRETIZATION: f64 = 1e-4;
/// The reference's `log_mass_truncation_bound` for the Gaussian's tails.
const LOG_MASS_TRUNCATION_BOUND: f64 = -50.0;
/// The reference's default `tail_mass_truncation` of compositions.
const TAIL_MASS_TRUNCATION: f64 = 1e-15;
/// The reference's `_DELTA_DIFF_TOLERANCE`.
const DELTA_DIFF_TOLERANCE: f64 = 1e-12;
/// The most grid points one distribution may take (256 MiB of f64). Very little noise (z
/// below about 0.1) or a very wide composition would need more; such an event gets no PLD
/// bound (ε = ∞, see [`PldAccountant`]) rather than exhausting memory, and the RDP figure
/// stands.
pub const MAX_POINTS: usize = 1 << 25;

fn privacy_err(what: impl std::fmt::Display) -> Error {
    Error::Privacy(what.to_string())
}

/// What [`MAX_POINTS`] refuses (recognised by [`PldAccountant::compose`]).
const TOO_WIDE: &str = "the privacy loss distribution would need more than MAX_POINTS points";

fn too_wide() -> Error {
    privacy_err(TOO_WIDE)
}

/// log(exp(a) + exp(b)).
fn log_add(a: f64, b: f64) -> f64 {
    let (mn, mx) = if a < b { (a, b) } else { (b, a) };
    if mn == f64::NEG_INFINITY {
        return mx;
    }
    mx + (mn - mx).exp().ln_1p()
}

/// log(exp(a) - exp(b)), for b < a.
fn log_sub(a: f64, b: f64) -> f64 {
    a + (-(b - a).exp()).ln_1p()
}

/// log(a·exp(b) + c) (`common.log_a_times_exp_b_plus_c`), for a positive result.
fn log_a_times_exp_b_plus_c(a: f64, b: f64, c: f64) -> f64 {
    if a == 0.0 {
        return c.ln();
    }
    if a < 0.0 {
        return log_sub(c.ln(), (-a).ln() + b);
    }
    if b == 0.0 {
        return (a + c).ln();
    }
    let d = b + a.ln();
    if c == 0.0 {
        d
    } else if c < 0.0 {
        log_sub(d, (-c).ln())
    } else {
        log_add(d, c.ln())
    }
}

/// Python's `math.isclose` with its default relative tolerance.
fn is_close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// The standard normal CDF at `x` (scipy's `ndtr`).
fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// log of the standard normal CDF at `x`, accurate far into the lower tail (scipy's
/// `log_ndtr`).
fn normal_log_cdf(x: f64) -> f64 {
    if x < 0.0 {
        0.5f64.ln() + super::rdp::log_erfc(-x / std::f64::consts::SQRT_2)
    } else {
        (-0.5 * libm::erfc(x / std::f64::consts::SQRT_2)).ln_1p()
    }
}

/// The standard normal quantile of a small `p` (below one half), to double precision: by
/// bisection on the log-CDF, which is monotone and accurate in the tail.
fn normal_ppf_lower(p: f64) -> f64 {
    let target = p.ln();
    let (mut lo, mut hi) = (-40.0f64, 0.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if normal_log_cdf(mid) < target {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= f64::EPSILON * hi.abs() {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// The neighbouring direction a distribution is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adjacency {
    /// The neighbour has one record more.
    Add,
    /// The neighbour has one record fewer.
    Remove,
}

/// The privacy loss of the Poisson-subsampled Gaussian mechanism with sensitivity 1
/// (`GaussianPrivacyLoss` with its `AdditiveNoisePrivacyLoss` base).
struct GaussianLoss {
    sigma: f64,
    q: f64,
    adjacency: Adjacency,
}

impl GaussianLoss {
    fn noise_cdf(&self, x: f64) -> f64 {
        normal_cdf(x / self.sigma)
    }

    fn noise_log_cdf(&self, x: f64) -> f64 {
        normal_log_cdf(x / self.sigma)
    }

    fn without_subsampling_remove(&self, x: f64) -> f64 {
        (-0.5 - x) / (self.sigma * self.sigma)
    }

    fn remove(&self, x: f64) -> f64 {
        let l = self.without_subsampling_remove(x);
        if self.q == 1.0 {
            l
        } else {
            log_a_times_exp_b_plus_c(self.q, l, 1.0 - self.q)
        }
    }

    fn privacy_loss(&self, x: f64) -> f64 {
        match self.adjacency {
            Adjacency::Remove => self.remove(x),
            Adjacency::Add => -self.remove(-x),
        }
    }

    fn inverse_without_subsampling_remove(&self, loss: f64) -> f64 {
        -0.5 - loss * self.sigma * self.sigma
    }

    fn inverse_privacy_loss(&self, loss: f64) -> f64 {
        let q = self.q;
        match self.adjacency {
            Adjacency::Remove => {
                if q == 1.0 {
                    return self.inverse_without_subsampling_remove(loss);
                }
                if is_close(loss, (-q).ln_1p()) {
                    return self.inverse_without_subsampling_remove(f64::NEG_INFINITY);
                }
                let l = log_a_times_exp_b_plus_c(1.0 / q, loss, 1.0 - 1.0 / q);
                self.inverse_without_subsampling_remove(l)
            }
            Adjacency::Add => {
                let add = |l: f64| 1.0 + self.inverse_without_subsampling_remove(l);
                if q == 1.0 {
                    return add(loss);
                }
                if is_close(loss, -(-q).ln_1p()) {
                    return add(f64::INFINITY);
                }
                add(-log_a_times_exp_b_plus_c(1.0 / q, -loss, 1.0 - 1.0 / q))
            }
        }
    }

    fn mu_upper_cdf(&self, x: f64) -> f64 {
        match self.adjacency {
            Adjacency::Add => self.noise_cdf(x),
            Adjacency::Remove if self.q == 1.0 => self.noise_cdf(x + 1.0),
            Adjacency::Remove => {
                (1.0 - self.q) * self.noise_cdf(x) + self.q * self.noise_cdf(x + 1.0)
            }
        }
    }

    fn mu_lower_log_cdf(&self, x: f64) -> f64 {
        match self.adjacency {
            Adjacency::Add if self.q == 1.0 => self.noise_log_cdf(x - 1.0),
            Adjacency::Add => log_add(
                (-self.q).ln_1p() + self.noise_log_cdf(x),
                self.q.ln() + self.noise_log_cdf(x - 1.0),
            ),
            Adjacency::Remove => self.noise_log_cdf(x),
        }
    }

    /// The mechanism's δ at `epsilon` (`AdditiveNoisePrivacyLoss.get_delta_for_epsilon`).
    fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let q = self.q;
        let delta = if q == 1.0 {
            None
        } else {
            match self.adjacency {
                Adjacency::Add if epsilon >= -(-q).ln_1p() => Some(0.0),
                Adjacency::Remove if epsilon <= (-q).ln_1p() => Some(-epsilon.exp_m1()),
                _ => None,
            }
        };
        let delta = delta.unwrap_or_else(|| {
            let x = self.inverse_privacy_loss(epsilon);
            self.mu_upper_cdf(x) - (epsilon + self.mu_lower_log_cdf(x)).exp()
        });
        delta.clamp(0.0, 1.0)
    }

    /// The losses at the noise's truncation points (`connect_dots_bounds`): (largest,
    /// smallest).
    fn connect_dots_bounds(&self) -> (f64, f64) {
        let mut lower_x = self.sigma * normal_ppf_lower(0.5 * LOG_MASS_TRUNCATION_BOUND.exp());
        let mut upper_x = -lower_x;
        match self.adjacency {
            Adjacency::Add => upper_x += 1.0,
            Adjacency::Remove => lower_x -= 1.0,
        }
        (self.privacy_loss(lower_x), self.privacy_loss(upper_x))
    }

    /// The pessimistic connect-the-dots distribution on the grid of `d`
    /// (`_create_pld_pmf_from_monotone_privacy_loss` with `use_connect_dots`).
    fn pmf(&self, d: f64) -> Result<Pmf> {
        let (eps_upper, eps_lower) = self.connect_dots_bounds();
        let upper = (eps_upper / d).ceil() as i64;
        let lower = (eps_lower / d).floor() as i64;
        if !(eps_upper.is_finite() && eps_lower.is_finite())
            || (upper - lower) as f64 >= MAX_POINTS as f64
        {
            return Err(too_wide());
        }
        let deltas: Vec<f64> = (lower..=upper)
            .map(|i| self.delta_for_epsilon(i as f64 * d))
            .collect();
        Pmf::connect_dots_fixed_gap(d, lower, upper, deltas)
    }
}

/// A privacy loss distribution for add-or-remove-one neighbours: the *remove* direction and,
/// unless it is the same (sampling probability 1), the *add* direction
/// (`PrivacyLossDistribution`).
#[derive(Debug, Clone, PartialEq)]
pub struct Pld {
    remove: Pmf,
    add: Option<Pmf>,
}

impl Pld {
    /// No privacy loss (`identity`), on the grid of `d`.
    pub fn identity(d: f64) -> Pld {
        Pld {
            remove: Pmf::identity(d),
            add: None,
        }
    }

    /// One step of the Gaussian mechanism with noise multiplier `z` on a batch Poisson-
    /// sampled with probability `q` (`from_gaussian_mechanism(z, sampling_prob=q)`), on the
    /// grid of `d`. Needs 0 < q ≤ 1 and z > 0.
    pub fn poisson_gaussian(q: f64, z: f64, d: f64) -> Result<Pld> {
        let valid = q > 0.0 && q <= 1.0 && z > 0.0 && z.is_finite() && d > 0.0;
        if !valid {
            return Err(privacy_err(format!(
                "a PLD needs 0 < q <= 1, z > 0 and a positive discretisation: q {q}, z {z}, d {d}"
            )));
        }
        let pmf = |adjacency| {
            GaussianLoss {
                sigma: z,
                q,
                adjacency,
            }
            .pmf(d)
        };
        Ok(Pld {
            remove: pmf(Adjacency::Remove)?,
            add: if q == 1.0 {
                None
            } else {
                Some(pmf(Adjacency::Add)?)
            },
        })
    }

    /// The composition of this distribution and `other` (same grid); fails when the result
    /// would need more than [`MAX_POINTS`] points.
    pub fn compose(&self, other: &Pld) -> Result<Pld> {
        let remove = self.remove.compose(&other.remove, TAIL_MASS_TRUNCATION)?;
        let add = match (&self.add, &other.add) {
            (None, None) => None,
            (a, b) => Some(
                a.as_ref()
                    .unwrap_or(&self.remove)
                    .compose(b.as_ref().unwrap_or(&other.remove), TAIL_MASS_TRUNCATION)?,
            ),
        };
        Ok(Pld { remove, add })
    }

    /// The `n`-fold composition of this distribution with itself (`n` ≥ 1); fails when the
    /// result would need more than [`MAX_POINTS`] points.
    pub fn self_compose(&self, n: u64) -> Result<Pld> {
        Ok(Pld {
            remove: self.remove.self_compose(n, TAIL_MASS_TRUNCATION)?,
            add: self
                .add
                .as_ref()
                .map(|a| a.self_compose(n, TAIL_MASS_TRUNCATION))
                .transpose()?,
        })
    }

    /// The smallest ε with δ(ε) at most `delta`, over both directions.
    pub fn epsilon(&self, delta: f64) -> f64 {
        let remove = self.remove.epsilon_for_delta(delta);
        match &self.add {
            None => remove,
            Some(a) => remove.max(a.epsilon_for_delta(delta)),
        }
    }

    /// δ at `epsilon`, over both directions.
    pub fn delta(&self, epsilon: f64) -> f64 {
        let remove = self.remove.delta_for_epsilon(epsilon);
        match &self.add {
            None => remove,
            Some(a) => remove.max(a.delta_for_epsilon(epsilon)),
        }
    }

    /// Points of the discretised distributions (memory is about 8 bytes each).
    pub fn size(&self) -> usize {
        self.remove.probs.len() + self.add.as_ref().map_or(0, |a| a.probs.len())
    }
}

/// A PLD accountant (`PLDAccountant` with add-or-remove-one neighbours and the default
/// discretisation): composes Poisson-subsampled Gaussian events and answers ε for δ and δ
/// for ε. An event without noise (z = 0, q > 0) makes every ε infinite; one with q = 0 or
/// no steps spends nothing. So does an event (or composition) whose distribution would need
/// more than [`MAX_POINTS`] points: ε = ∞ is a valid bound, and the caller's RDP figure,
/// always finite where RDP is, is the one that counts then.
#[derive(Debug, Clone)]
pub struct PldAccountant {
    pld: Pld,
    unbounded: bool,
    d: f64,
}

impl Default for PldAccountant {
    fn default() -> Self {
        PldAccountant::new(DEFAULT_DISCRETIZATION)
    }
}

impl PldAccountant {
    /// An accountant with nothing composed, on the grid of `d`.
    pub fn new(d: f64) -> PldAccountant {
        PldAccountant {
            pld: Pld::identity(d),
            unbounded: false,
            d,
        }
    }

    /// An accountant of every event of `events`, those with the same q and z composed as
    /// one self-composition of their summed steps (composition commutes, and one FFT power
    /// is much cheaper than a convolution per event).
    pub fn of(events: impl IntoIterator<Item = super::SampledGaussian>) -> Result<PldAccountant> {
        let mut groups: Vec<super::SampledGaussian> = Vec::new();
        for e in events {
            match groups
                .iter_mut()
                .find(|g| g.q.to_bits() == e.q.to_bits() && g.z.to_bits() == e.z.to_bits())
            {
                Some(g) => {
                    g.steps = g.steps.checked_add(e.steps).ok_or_else(|| {
                        privacy_err("the total step count of the composed events overflows")
                    })?
                }
                None => groups.push(e),
            }
        }
        let mut acc = PldAccountant::default();
        for g in &groups {
            acc.compose(g)?;
        }
        Ok(acc)
    }

    /// Composes `steps` steps of the Gaussian mechanism with noise multiplier `z` on
    /// batches Poisson-sampled with probability `q`.
    pub fn compose(&mut self, event: &super::SampledGaussian) -> Result<()> {
        let super::SampledGaussian { q, z, steps } = *event;
        if !(0.0..=1.0).contains(&q) || z.is_nan() || z < 0.0 {
            return Err(privacy_err(format!(
                "a sampled Gaussian needs 0 <= q <= 1 and z >= 0: q {q}, z {z}"
            )));
        }
        if q == 0.0 || steps == 0 {
            return Ok(());
        }
        if z == 0.0 {
            self.unbounded = true;
            return Ok(());
        }
        if self.unbounded {
            return Ok(());
        }
        let composed = Pld::poisson_gaussian(q, z, self.d)
            .and_then(|step| step.self_compose(steps))
            .and_then(|e| self.pld.compose(&e));
        match composed {
            Ok(p) => self.pld = p,
            Err(Error::Privacy(why)) if why == TOO_WIDE => {
                tracing::debug!(q, z, steps, "{TOO_WIDE}: no PLD bound");
                self.unbounded = true;
                self.pld = Pld::identity(self.d);
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// The smallest ε such that everything composed is (ε, `delta`)-DP.
    pub fn epsilon(&self, delta: f64) -> f64 {
        if self.unbounded {
            return f64::INFINITY;
        }
        self.pld.epsilon(delta)
    }

    /// The δ at which everything composed is (`epsilon`, δ)-DP.
    pub fn delta(&self, epsilon: f64) -> f64 {
        if self.unbounded {
            return 1.0;
        }
        self.pld.delta(epsilon)
    }
}

#[cfg(test)]
mod tests;
