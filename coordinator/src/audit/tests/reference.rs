//! The distributed mode's guarantee against colluding sites, checked against Google's
//! `dp_accounting` through fixtures written by `tests/python/make_audit_fixtures.py` (the
//! mechanism's noise computed there from first principles; regenerate with the commands at
//! the top of that script), and against the closed form z·√(1 − t/m).

use fedflow_common::privacy::dpfedavg::{SiteDp, TrustMode};
use fedflow_common::privacy::{RdpAccountant, SampledGaussian};

use super::close;
use crate::audit::site::{against_sites, colluding_multiplier};
use crate::store::SiteDpRound;

/// The reference figures (see `tests/python/make_audit_fixtures.py` for how to regenerate).
const FIXTURES: &str = include_str!("against_sites_fixtures.json");

/// A distributed-mode ledger row for `k` contributions, its noise from the mechanism.
fn distributed_row(round: u64, z: f64, clip: f64, expected: f64, k: u64) -> SiteDpRound {
    let mech = SiteDp {
        mode: TrustMode::Distributed,
        clip_norm: clip,
        noise_multiplier: z,
        expected_sites: expected,
        adaptive: None,
    };
    SiteDpRound {
        round,
        mode: "distributed".into(),
        sampling: "poisson".into(),
        sampling_rate: 1.0,
        noise_multiplier: z,
        update_noise_multiplier: z,
        clip_norm: clip,
        expected_sites: expected,
        site_noise_std: mech.site_noise_std(clip).unwrap(),
        server_noise_std: mech.server_noise_std(clip, k).unwrap(),
        bit_noise_std: None,
        selected: k,
        contributions: k,
        clipped_fraction: None,
        noisy_unclipped_fraction: None,
        next_clip_norm: clip,
        epsilon: 0.0,
        epsilon_pld: None,
        target_delta: 1e-5,
        rdp: Vec::new(),
        seeded_randomness: false,
        recorded_at_ms: 0,
    }
}

#[test]
fn the_guarantee_against_colluding_sites_matches_dp_accounting() {
    let fixtures: serde_json::Value = serde_json::from_str(FIXTURES).unwrap();
    let scenarios = fixtures["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 4);
    let (mut worst, mut compared) = (0.0f64, 0);
    for sc in scenarios {
        let name = sc["name"].as_str().unwrap();
        let f = |k: &str| sc[k].as_f64().unwrap();
        let (z, clip, expected, delta) = (
            f("noise_multiplier"),
            f("clip_norm"),
            f("expected_sites"),
            f("target_delta"),
        );
        let rows: Vec<SiteDpRound> = sc["contributions"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, k)| distributed_row(i as u64 + 1, z, clip, expected, k.as_u64().unwrap()))
            .collect();
        let got = against_sites(&rows, delta).unwrap();
        let want = sc["coalitions"].as_array().unwrap();
        // The same coalition sizes, in the same order: t = 1 first, everyone else last.
        let sizes: Vec<Option<u64>> = got.coalitions.iter().map(|c| c.colluding_sites).collect();
        let want_sizes: Vec<Option<u64>> =
            want.iter().map(|c| c["colluding_sites"].as_u64()).collect();
        assert_eq!(sizes, want_sizes, "{name}");
        let deltas: Vec<f64> = sc["deltas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_f64().unwrap())
            .collect();
        for (c, w) in got.coalitions.iter().zip(want) {
            let zs = w["round_multipliers"].as_array().unwrap();
            for (row, wz) in rows.iter().zip(zs) {
                let z_r = colluding_multiplier(row, c.colluding_sites);
                assert!(
                    close(z_r, wz.as_f64().unwrap(), 1e-12),
                    "{name}: {z_r} vs {wz}"
                );
            }
            let wants = w["epsilons"].as_array().unwrap();
            assert_eq!(c.cumulative.len(), deltas.len());
            for ((e, wd), we) in c.cumulative.iter().zip(&deltas).zip(wants) {
                assert_eq!(e.delta, *wd);
                let (g, we) = (e.epsilon.unwrap(), we.as_f64().unwrap());
                worst = worst.max((g - we).abs() / we);
                compared += 1;
                assert!(
                    close(g, we, 1e-6),
                    "{name} t={:?} δ={wd}: {g} vs {we}",
                    c.colluding_sites
                );
            }
        }
        // Knowing noise shares only ever helps the coalition: ε grows with t and is never
        // below the guarantee downstream (which the fixture states too).
        let down = sc["downstream_epsilons"][0].as_f64().unwrap();
        let mut acc = RdpAccountant::default();
        for row in &rows {
            acc.compose(&SampledGaussian {
                q: 1.0,
                z: row.noise_multiplier,
                steps: 1,
            })
            .unwrap();
        }
        assert!(close(acc.epsilon(delta).unwrap().0, down, 1e-6), "{name}");
        let eps: Vec<f64> = got
            .coalitions
            .iter()
            .map(|c| c.cumulative[0].epsilon.unwrap())
            .collect();
        assert!(
            eps[0] > down,
            "{name}: one colluding site learns more than outsiders"
        );
        assert!(eps.windows(2).all(|w| w[0] < w[1]), "{name}: {eps:?}");
    }
    assert!(compared > 60, "{compared} figures compared");
    println!(
        "against colluding sites: {compared} figures, largest relative difference {worst:.2e}"
    );
}

#[test]
fn with_the_expected_number_of_contributions_the_multiplier_is_z_sqrt_one_minus_t_over_m() {
    for (z, m) in [(1.0, 10u64), (0.7, 4), (2.5, 100)] {
        let row = distributed_row(1, z, 0.3, m as f64, m);
        assert!(
            row.server_noise_std < 1e-6,
            "no top-up with every expected site"
        );
        for t in 1..m {
            let want = z * (1.0 - t as f64 / m as f64).sqrt();
            let got = colluding_multiplier(&row, Some(t));
            assert!(
                close(got, want, 1e-12),
                "z {z} m {m} t {t}: {got} vs {want}"
            );
        }
        // Every other site together: only the protected site's own share is left.
        let alone = z / (m as f64).sqrt();
        assert!(close(colluding_multiplier(&row, None), alone, 1e-12));
    }
    // Fewer contributions than expected: the coordinator's top-up is unknown to the sites
    // and still protects; more than expected: never above the downstream charge.
    let few = distributed_row(1, 1.0, 1.0, 10.0, 4);
    assert!(close(
        colluding_multiplier(&few, Some(1)),
        (0.9f64).sqrt(),
        1e-12
    ));
    let many = distributed_row(1, 1.0, 1.0, 10.0, 40);
    assert_eq!(colluding_multiplier(&many, Some(1)), 1.0);
    // Nobody else contributed: nobody else knows anything.
    let one = distributed_row(1, 1.0, 1.0, 10.0, 1);
    assert!(close(colluding_multiplier(&one, None), 1.0, 1e-12));
}
