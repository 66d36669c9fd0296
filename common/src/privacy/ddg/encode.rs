//! The distributed discrete Gaussian's encoding of an update onto the integer ring that
//! secure aggregation sums over (KLS21, Algorithm 1 and §4): clip to L2 norm `C`, rotate
//! with a randomised Hadamard transform (so no coordinate carries much of the norm and the
//! ring's range is used evenly), scale by `1/γ`, round at random to the grid (conditioned
//! on the rounded norm, so the sensitivity bound always holds), add the site's discrete
//! Gaussian share, and reduce modulo `2^b`. Decoding the sum undoes the scale and the
//! rotation.
//!
//! The rotation's signs come from a public seed every site of the round shares; it is not
//! a secret (the privacy comes from the noise), only a way to spread each update's mass.

use rand::{CryptoRng, Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use super::{DiscreteGaussian, rounded_l2_bound};
use crate::{Error, Result};

/// Redraws of the randomised rounding before giving up (each fails with probability at
/// most `β`; 200 failures in a row have probability below `β^200`).
const MAX_ROUNDING_TRIES: usize = 200;

/// How one round's updates go onto the ring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Encoding {
    /// L2 clip of an update, in model units.
    pub clip: f64,
    /// Grid step `γ` in model units: a value `x` is encoded as about `x / γ`.
    pub granularity: f64,
    /// Conditional rounding's `β` in `[0, 1)` (0: plain randomised rounding).
    pub beta: f64,
    /// The ring is the integers modulo `2^modulus_bits` (2 to 64).
    pub modulus_bits: u32,
    /// Length of an update.
    pub dimension: usize,
    /// Public seed of the rotation's signs, the same at every site of the round.
    pub rotation_seed: [u8; 32],
}

impl Encoding {
    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Privacy(format!("encoding: {m}")));
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!("clip {} must be positive", self.clip));
        }
        if !(self.granularity.is_finite() && self.granularity > 0.0) {
            return bad(format!("granularity {} must be positive", self.granularity));
        }
        if !(0.0..1.0).contains(&self.beta) {
            return bad(format!("beta {} must be in [0, 1)", self.beta));
        }
        if !(2..=64).contains(&self.modulus_bits) {
            return bad(format!(
                "modulus_bits {} must be 2 to 64",
                self.modulus_bits
            ));
        }
        if self.dimension == 0 || self.dimension > 1 << 40 {
            return bad(format!("dimension {} must be 1 to 2^40", self.dimension));
        }
        if self.l2_sensitivity()? >= 2f64.powi(self.modulus_bits as i32 - 1) {
            return bad(format!(
                "clip / granularity = {} grid steps does not fit a {}-bit ring",
                self.clip / self.granularity,
                self.modulus_bits
            ));
        }
        Ok(())
    }

    /// The length on the ring: the dimension rounded up to a power of two (the Hadamard
    /// transform's size).
    pub fn padded_dimension(&self) -> usize {
        self.dimension.next_power_of_two()
    }

    /// The L2 sensitivity on the grid: the bound on one site's rounded, scaled update,
    /// which every encoding enforces.
    pub fn l2_sensitivity(&self) -> Result<f64> {
        rounded_l2_bound(
            self.clip / self.granularity,
            self.beta,
            self.padded_dimension(),
        )
    }

    fn mask(&self) -> u64 {
        if self.modulus_bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.modulus_bits) - 1
        }
    }

    /// The rotation's signs.
    fn signs(&self) -> Vec<f64> {
        let mut rng = ChaCha20Rng::from_seed(self.rotation_seed);
        (0..self.padded_dimension())
            .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
            .collect()
    }

    /// Encodes `update` with `noise` (the site's share; `None` only in tests of the
    /// encoding itself), drawing the rounding and the noise from `rng`.
    pub fn encode<R: Rng + CryptoRng>(
        &self,
        update: &[f32],
        noise: Option<&DiscreteGaussian>,
        rng: &mut R,
    ) -> Result<Vec<u64>> {
        self.validate()?;
        if update.len() != self.dimension {
            return Err(Error::Privacy(format!(
                "encoding: the update has {} values where the round has {}",
                update.len(),
                self.dimension
            )));
        }
        if let Some(i) = update.iter().position(|v| !v.is_finite()) {
            return Err(Error::Privacy(format!(
                "encoding: value {i} of the update is not finite"
            )));
        }
        let norm = update
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let shrink = if norm > self.clip {
            self.clip / norm
        } else {
            1.0
        };
        let signs = self.signs();
        let mut x: Vec<f64> = vec![0.0; self.padded_dimension()];
        for (i, &v) in update.iter().enumerate() {
            x[i] = v as f64 * shrink * signs[i];
        }
        hadamard(&mut x);
        let scale = 1.0 / (self.granularity * (x.len() as f64).sqrt());
        for v in &mut x {
            *v *= scale;
        }
        let bound = self.l2_sensitivity()?;
        let rounded = (0..MAX_ROUNDING_TRIES)
            .find_map(|_| {
                let r: Vec<i64> = x
                    .iter()
                    .map(|&v| {
                        let low = v.floor();
                        (low + f64::from(u8::from(rng.random::<f64>() < v - low))) as i64
                    })
                    .collect();
                let n2: f64 = r.iter().map(|&v| (v as f64).powi(2)).sum();
                (n2.sqrt() <= bound).then_some(r)
            })
            .ok_or_else(|| {
                Error::Privacy(format!(
                    "encoding: no rounding within the norm bound in {MAX_ROUNDING_TRIES} tries"
                ))
            })?;
        let mask = self.mask();
        Ok(rounded
            .into_iter()
            .map(|v| {
                let noisy = v.wrapping_add(noise.map_or(0, |n| n.sample(rng)));
                (noisy as u64) & mask
            })
            .collect())
    }

    /// Decodes a sum of encodings (modulo `2^b`, each value read as a signed integer in
    /// `[-2^(b-1), 2^(b-1))`) back to model units: the sum of the clipped updates plus the
    /// noise, rotated back.
    pub fn decode_sum(&self, sum: &[u64]) -> Result<Vec<f64>> {
        self.validate()?;
        if sum.len() != self.padded_dimension() {
            return Err(Error::Privacy(format!(
                "decoding: {} values where the ring has {}",
                sum.len(),
                self.padded_dimension()
            )));
        }
        let bits = self.modulus_bits;
        let mask = self.mask();
        let mut x: Vec<f64> = sum
            .iter()
            .map(|&v| {
                let v = v & mask;
                let signed = if bits == 64 {
                    v as i64
                } else if v >> (bits - 1) == 1 {
                    (v as i64) - (1i64 << (bits - 1)) - (1i64 << (bits - 1))
                } else {
                    v as i64
                };
                signed as f64
            })
            .collect();
        hadamard(&mut x);
        let scale = self.granularity / (x.len() as f64).sqrt();
        let signs = self.signs();
        Ok(x.iter()
            .zip(&signs)
            .take(self.dimension)
            .map(|(&v, &s)| v * scale * s)
            .collect())
    }
}

/// The unnormalised Walsh-Hadamard transform, in place (`x.len()` a power of two):
/// `H·x` with `H·H = n·I`.
fn hadamard(x: &mut [f64]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for block in x.chunks_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*u + *v, *u - *v);
                *u = s;
                *v = d;
            }
        }
        h *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoding(dimension: usize, bits: u32, granularity: f64, beta: f64) -> Encoding {
        Encoding {
            clip: 1.0,
            granularity,
            beta,
            modulus_bits: bits,
            dimension,
            rotation_seed: [9; 32],
        }
    }

    fn clipped(update: &[f32], clip: f64) -> Vec<f64> {
        let norm = update
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let shrink = if norm > clip { clip / norm } else { 1.0 };
        update.iter().map(|&v| v as f64 * shrink).collect()
    }

    fn l2(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    /// The transform twice is `n` times the identity.
    #[test]
    fn hadamard_is_its_own_inverse_up_to_n() {
        let mut x: Vec<f64> = (0..16).map(|i| (i * i) as f64 - 7.5).collect();
        let orig = x.clone();
        hadamard(&mut x);
        hadamard(&mut x);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a / 16.0 - b).abs() < 1e-12);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Without noise, decoding an encoding gives the clipped update back within the
        /// grid's rounding (`γ·√n` in L2), and the encoded integers never exceed the
        /// sensitivity bound, however large the update.
        #[test]
        fn encoding_round_trips_within_the_grid_and_the_bound(
            update in prop::collection::vec(-1e6f32..1e6, 1..300),
            bits in prop_oneof![Just(20u32), Just(32), Just(64)],
            granularity in prop_oneof![Just(1e-2), Just(1e-3), Just(1e-4)],
            beta in prop_oneof![Just(0.0), Just((-0.5f64).exp())],
            seed in any::<u64>(),
        ) {
            let e = encoding(update.len(), bits, granularity, beta);
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let ring = e.encode(&update, None, &mut rng).unwrap();
            prop_assert_eq!(ring.len(), e.padded_dimension());
            let decoded = e.decode_sum(&ring).unwrap();
            let want = clipped(&update, e.clip);
            let err = l2(&decoded, &want);
            let n = e.padded_dimension() as f64;
            prop_assert!(err <= granularity * n.sqrt() + 1e-9, "error {}", err);
            let norm = ring
                .iter()
                .map(|&v| {
                    let signed = if bits < 64 && v >> (bits - 1) == 1 {
                        v as i64 - (1i64 << bits)
                    } else {
                        v as i64
                    };
                    (signed as f64).powi(2)
                })
                .sum::<f64>()
                .sqrt();
            prop_assert!(norm <= e.l2_sensitivity().unwrap(), "norm {} above {}", norm, e.l2_sensitivity().unwrap());
        }
    }

    /// The sum of many encodings, each with its noise share, decodes to the sum of the
    /// clipped updates plus noise of the summed variance.
    #[test]
    fn a_sum_of_noisy_encodings_decodes_to_the_sum() {
        let sites = 20;
        let dim = 1000;
        let e = encoding(dim, 32, 1e-4, (-0.5f64).exp());
        let noise = DiscreteGaussian::new(100).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut want = vec![0.0; dim];
        let mut sum = vec![0u64; e.padded_dimension()];
        for s in 0..sites {
            let update: Vec<f32> = (0..dim)
                .map(|i| ((i * 7 + s * 13) % 17) as f32 / 50.0 - 0.15)
                .collect();
            for (w, v) in want.iter_mut().zip(clipped(&update, e.clip)) {
                *w += v;
            }
            let ring = e.encode(&update, Some(&noise), &mut rng).unwrap();
            for (a, v) in sum.iter_mut().zip(ring) {
                *a = a.wrapping_add(v) & 0xffff_ffff;
            }
        }
        let got = e.decode_sum(&sum).unwrap();
        // Noise per coordinate: about sqrt(sites · σ²) grid steps of γ each.
        let sd = (sites as f64 * 100.0).sqrt() * e.granularity;
        let rms = (l2(&got, &want).powi(2) / dim as f64).sqrt();
        assert!(
            rms > 0.5 * sd && rms < 1.5 * sd,
            "rms error {rms}, noise sd {sd}"
        );
    }

    /// Bad input is refused with the field named.
    #[test]
    fn bad_input_is_refused() {
        let e = encoding(4, 32, 1e-3, 0.0);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let err = e
            .encode(&[0.0, f32::NAN, 0.0, 0.0], None, &mut rng)
            .unwrap_err();
        assert!(err.to_string().contains("value 1"), "{err}");
        assert!(e.encode(&[0.0; 3], None, &mut rng).is_err());
        let tight = encoding(4, 8, 1e-3, 0.0);
        assert!(tight.validate().unwrap_err().to_string().contains("8-bit"));
        assert!(e.decode_sum(&[0; 3]).is_err());
    }
}
