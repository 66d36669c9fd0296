//! DP-FedAvg noise: the scale each mode adds where, checked statistically with seeded RNGs,
//! including the noise in a sum after dropouts, and the multipliers the accountant charges.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::*;

const N: usize = 200_000;

fn cfg(mode: TrustMode) -> SiteDp {
    SiteDp {
        mode,
        clip_norm: 0.5,
        noise_multiplier: 1.2,
        expected_sites: 16.0,
        adaptive: None,
    }
}

/// Sample standard deviation of `k` sites' noise summed, each site adding `std`.
fn summed_std(k: usize, site_std: f64, server_std: f64, seed: u64) -> f64 {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut sum = vec![0f64; N];
    for _ in 0..k {
        let mut one = vec![0f32; N];
        add_gaussian(&mut one, site_std, &mut rng);
        for (s, v) in sum.iter_mut().zip(&one) {
            *s += f64::from(*v);
        }
    }
    let mut server = vec![0f32; N];
    add_gaussian(&mut server, server_std, &mut rng);
    for (s, v) in sum.iter_mut().zip(&server) {
        *s += f64::from(*v);
    }
    let mean = sum.iter().sum::<f64>() / N as f64;
    (sum.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (N as f64 - 1.0)).sqrt()
}

/// Within 4 standard errors of a sample std (relative se ≈ 1/√(2N)).
fn assert_std(got: f64, want: f64, what: &str) {
    let tol = 4.0 / (2.0 * N as f64).sqrt();
    assert!(
        (got / want - 1.0).abs() < tol,
        "{what}: std {got} vs {want}"
    );
}

/// The std of the released sum's noise for `k` contributors: each site's share plus the
/// coordinator's top-up, drawn and measured.
fn released_std(c: &SiteDp, k: u64, seed: u64) -> f64 {
    let clip = c.clip_norm;
    summed_std(
        k as usize,
        c.site_noise_std(clip).unwrap(),
        c.server_noise_std(clip, k).unwrap(),
        seed,
    )
}

#[test]
fn central_noise_is_added_once_by_the_coordinator() {
    let c = cfg(TrustMode::Central);
    assert_eq!(c.site_noise_std(0.5).unwrap(), 0.0);
    for k in [0, 1, 16, 40] {
        assert!((c.server_noise_std(0.5, k).unwrap() - 0.6).abs() < 1e-15);
    }
    // On the average: z·C / expected_sites, as the issue states.
    assert_std(released_std(&c, 16, 1) / 16.0, 1.2 * 0.5 / 16.0, "central");
    // Add/remove: amplification with Poisson sampling, none when all are selected, and
    // sensitivity 2C (z/2) for a fixed-size sample, where a site can displace another.
    assert_eq!(c.relation(), Relation::AddRemove);
    let e = c.downstream_event(SiteSampling::Poisson(0.05));
    assert_eq!((e.q, e.z, e.steps), (0.05, 1.2, 1));
    let e = c.downstream_event(SiteSampling::All);
    assert_eq!((e.q, e.z), (1.0, 1.2));
    let e = c.downstream_event(SiteSampling::FixedSize);
    assert_eq!((e.q, e.z), (1.0, 0.6));
    assert!(c.coordinator_event().unwrap().is_none());
    assert_eq!(c.norm_bound(0.5, 1000).unwrap(), 0.5);
}

#[test]
fn distributed_shares_add_up_to_the_central_noise_and_dropouts_are_topped_up() {
    let c = cfg(TrustMode::Distributed);
    let share = c.site_noise_std(0.5).unwrap();
    assert!((share - 1.2 * 0.5 / 4.0).abs() < 1e-15);
    // Sixteen shares carry exactly the central noise and need no top-up ...
    assert_eq!(c.server_noise_std(0.5, 16).unwrap(), 0.0);
    assert_std(released_std(&c, 16, 2), 1.2 * 0.5, "distributed, all sites");
    // ... after dropouts the coordinator adds what is missing, so the sum still carries it;
    for (k, seed) in [(8, 3), (1, 4), (0, 5)] {
        let top = c.server_noise_std(0.5, k).unwrap();
        let want = (0.36 - k as f64 * share * share).sqrt();
        assert!((top - want).abs() < 1e-12, "k={k}: {top} vs {want}");
        assert_std(
            released_std(&c, k, seed),
            1.2 * 0.5,
            "distributed, dropouts",
        );
    }
    // ... and more contributors than expected carry more.
    assert_eq!(c.server_noise_std(0.5, 25).unwrap(), 0.0);
    assert_std(
        released_std(&c, 25, 6),
        1.2 * 0.5 * 1.25,
        "distributed, extra sites",
    );
    // Downstream: zero-out, no amplification claimed, whatever the number of contributors.
    assert_eq!(c.relation(), Relation::ZeroOut);
    let e = c.downstream_event(SiteSampling::Poisson(0.1));
    assert_eq!((e.q, e.z), (1.0, 1.2));
    // Against the coordinator: only the site's own share.
    let e = c.coordinator_event().unwrap().unwrap();
    assert_eq!((e.q, e.steps), (1.0, 1));
    assert!((e.z - 1.2 / 4.0).abs() < 1e-12);
}

#[test]
fn local_noise_is_the_full_noise_at_every_site() {
    let c = cfg(TrustMode::Local);
    let own = c.site_noise_std(0.5).unwrap();
    assert_eq!(own, 1.2 * 0.5);
    assert_std(released_std(&c, 1, 7), 1.2 * 0.5, "local, one site");
    assert_std(released_std(&c, 9, 8), 3.0 * 1.2 * 0.5, "local, nine sites");
    // Nobody contributed: the coordinator still releases the central noise.
    assert!((c.server_noise_std(0.5, 0).unwrap() - 0.6).abs() < 1e-15);
    assert_std(released_std(&c, 0, 9), 1.2 * 0.5, "local, no site");
    assert_eq!(c.server_noise_std(0.5, 1).unwrap(), 0.0);
    assert_eq!(c.coordinator_event().unwrap().unwrap().z, 1.2);
    // A noised update's norm bound leaves room for its noise and nothing like a missing clip.
    let bound = c.norm_bound(0.5, 10_000).unwrap();
    assert!((bound - (0.5 + 0.6 * 110.0)).abs() < 1e-9, "{bound}");
}

#[test]
fn adaptive_clipping_costs_exactly_the_configured_multiplier() {
    let a = AdaptiveClipping {
        target_quantile: 0.5,
        learning_rate: 0.2,
        bit_noise_std: 16.0 / 20.0,
    };
    let c = SiteDp {
        adaptive: Some(a.clone()),
        ..cfg(TrustMode::Central)
    };
    c.validate().unwrap();
    let z_delta = c.update_multiplier().unwrap();
    // (z_Δ⁻² + (2σ_b)⁻²)^(−1/2) = z, and the updates get more noise than z alone would give.
    assert!(z_delta > 1.2);
    assert!(((z_delta.powi(-2) + (2.0 * 0.8f64).powi(-2)).powf(-0.5) - 1.2).abs() < 1e-12);
    assert_eq!(c.downstream_event(SiteSampling::All).z, 1.2);
    assert!((c.server_noise_std(1.0, 16).unwrap() - z_delta).abs() < 1e-12);
    // The clip shrinks when more than the target quantile was unclipped, grows when fewer.
    assert!(a.next_clip(1.0, 0.9) < 1.0 && a.next_clip(1.0, 0.1) > 1.0);
    assert_eq!(a.next_clip(1.0, 0.5), 1.0);
    assert!((a.next_clip(2.0, 0.7) - 2.0 * (-0.2f64 * 0.2).exp()).abs() < 1e-15);
    // Too little bit noise for the requested z is refused.
    let starved = SiteDp {
        adaptive: Some(AdaptiveClipping {
            bit_noise_std: 0.5,
            ..a
        }),
        ..cfg(TrustMode::Central)
    };
    assert!(starved.validate().is_err());
}

#[test]
fn invalid_parameters_are_refused() {
    for bad in [
        SiteDp {
            clip_norm: 0.0,
            ..cfg(TrustMode::Central)
        },
        SiteDp {
            noise_multiplier: -1.0,
            ..cfg(TrustMode::Central)
        },
        SiteDp {
            expected_sites: 0.5,
            ..cfg(TrustMode::Central)
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    cfg(TrustMode::Local).validate().unwrap();
    let adaptive_local = SiteDp {
        adaptive: Some(AdaptiveClipping {
            target_quantile: 0.5,
            learning_rate: 0.2,
            bit_noise_std: 1.0,
        }),
        ..cfg(TrustMode::Local)
    };
    assert!(
        adaptive_local
            .validate()
            .unwrap_err()
            .to_string()
            .contains("mode = central")
    );
}

fn delta(scale: f32) -> crate::params::ParamSet {
    use candle_core::{Device, Tensor};
    let mut t = std::collections::BTreeMap::new();
    let a: Vec<f32> = (0..60_000)
        .map(|i| scale * ((i % 7) as f32 - 3.0))
        .collect();
    t.insert(
        "a".to_string(),
        Tensor::from_vec(a, (300, 200), &Device::Cpu).unwrap(),
    );
    t.insert(
        "b".to_string(),
        Tensor::from_vec(vec![scale; 40_000], 40_000, &Device::Cpu).unwrap(),
    );
    crate::params::ParamSet::from_tensors(t).unwrap()
}

#[test]
fn a_site_clips_then_adds_exactly_its_share() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    // Above the clip: scaled onto it, bit 0; no noise in central mode.
    let big = delta(1.0);
    let out = privatize(&big, 0.5, 0.0, &mut rng).unwrap();
    assert!(out.norm > 0.5 && !out.unclipped);
    let n = out.delta.l2_norm().unwrap();
    assert!(n <= 0.5 && n > 0.5 * (1.0 - 1e-6), "{n}");
    // Below the clip: untouched, bit 1.
    let small = delta(1e-5);
    let out = privatize(&small, 0.5, 0.0, &mut rng).unwrap();
    assert!(out.unclipped);
    assert_eq!(out.delta.sha256_hex().unwrap(), small.sha256_hex().unwrap());
    // With noise: the residual over the clipped delta has the requested std.
    let std = 0.03;
    let out = privatize(&big, 0.5, std, &mut rng).unwrap();
    let (clipped, _) = big.clip_to_norm(0.5).unwrap();
    let mut residual = Vec::new();
    for (name, t) in out.delta.iter() {
        let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = clipped
            .get(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        residual.extend(got.iter().zip(&want).map(|(g, w)| f64::from(g - w)));
    }
    let n = residual.len() as f64;
    let mean = residual.iter().sum::<f64>() / n;
    let sd = (residual.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    assert!(mean.abs() < 4.0 * std / n.sqrt(), "{mean}");
    assert!(
        (sd / std - 1.0).abs() < 4.0 / (2.0 * n).sqrt() + 1e-4,
        "{sd}"
    );
}
