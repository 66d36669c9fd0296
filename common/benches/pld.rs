//! How long PLD accounting takes for the compositions fedflow's ledgers hold: one event of
//! 20,000 DP-SGD steps (a site's whole history at a typical q), and a ledger of 50 rounds
//! with different sampling rates. Run with `cargo bench -p fedflow-common --bench pld`.

use std::time::Instant;

use fedflow_common::privacy::SampledGaussian;
use fedflow_common::privacy::pld::PldAccountant;

fn time(what: &str, events: &[SampledGaussian]) {
    let mut best = f64::INFINITY;
    let mut eps = 0.0;
    for _ in 0..5 {
        let t = Instant::now();
        let mut acc = PldAccountant::default();
        for e in events {
            acc.compose(e).expect("valid events");
        }
        eps = acc.epsilon(1e-5);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{what}: {:.3} s (best of 5), epsilon {eps:.4} at delta 1e-5",
        best
    );
}

fn main() {
    for (q, z) in [(0.01, 1.0), (0.001, 0.7), (0.25, 3.0)] {
        time(
            &format!("20,000 steps, q {q}, z {z}"),
            &[SampledGaussian {
                q,
                z,
                steps: 20_000,
            }],
        );
    }
    let rounds: Vec<SampledGaussian> = (0..50)
        .map(|r| SampledGaussian {
            q: 0.01 + 0.0004 * r as f64,
            z: 1.1,
            steps: 100,
        })
        .collect();
    time("50 rounds of 100 steps, q 0.01 to 0.03, z 1.1", &rounds);
}
