//! The layers of a secure round together, in memory with real keys: each of 20 sites
//! clips, rotates, rounds and noises its update onto the ring (the distributed discrete
//! Gaussian's encoding), secure aggregation sums the ring vectors while two sites drop at
//! different phases, and the decoded sum is the sum of the clipped updates of the sites
//! that stayed, plus exactly their noise shares.

use std::collections::BTreeMap;

use fedflow_common::privacy::ddg::{DdgRelease, DiscreteGaussian, Encoding, rounded_l1_bound};
use fedflow_common::secagg::{
    Aggregator, Context, EcdsaSigner, EcdsaVerifier, Params, SiteSession,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const SITES: usize = 20;
const DIM: usize = 700;

fn update(site: usize) -> Vec<f32> {
    (0..DIM)
        .map(|i| (((i * 31 + site * 17) % 23) as f32 - 11.0) / 400.0)
        .collect()
}

fn clipped(u: &[f32], clip: f64) -> Vec<f64> {
    let norm = u.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    let s = if norm > clip { clip / norm } else { 1.0 };
    u.iter().map(|&v| v as f64 * s).collect()
}

#[test]
fn twenty_sites_two_dropping_give_the_noisy_sum_of_the_rest() {
    let encoding = Encoding {
        clip: 0.5,
        granularity: 2e-5,
        beta: (-0.5f64).exp(),
        modulus_bits: 32,
        dimension: DIM,
        rotation_seed: [5; 32],
    };
    let noise = DiscreteGaussian::at_least(30.0).unwrap();
    let params = Params {
        modulus_bits: 32,
        dimension: encoding.padded_dimension(),
        degree: 8,
        threshold: 0.6,
        min_sites: 10,
    };
    let ctx = Context {
        run_id: "run-1".into(),
        round: 4,
        nonce: [1; 32],
    };
    let mut verifier = EcdsaVerifier::default();
    let mut sessions = Vec::new();
    let mut ads = Vec::new();
    for i in 0..SITES {
        let name = format!("site-{i:03}");
        let (signer, _) = EcdsaSigner::generate().unwrap();
        verifier.insert(name.clone(), signer.public_key());
        let (s, ad) = SiteSession::new(ctx.clone(), params, name, Box::new(signer)).unwrap();
        sessions.push(s);
        ads.push(ad);
    }
    let mut agg = Aggregator::new(ctx.clone(), params, Box::new(verifier.clone())).unwrap();
    for ad in ads {
        agg.advertise(ad).unwrap();
    }
    let roster = agg.roster().unwrap();
    // site-003 drops after sharing (its input is not in the sum); site-011 after its
    // masked input (its input is in the sum, it signs and reveals nothing).
    let (after_sharing, after_masking) = (3, 11);
    let mut shared = BTreeMap::new();
    for (i, s) in sessions.into_iter().enumerate() {
        let (s, envelopes) = s.share(&roster, &verifier).unwrap();
        agg.share(&format!("site-{i:03}"), envelopes).unwrap();
        shared.insert(i, s);
    }
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let mut masked = BTreeMap::new();
    let mut want = vec![0.0; DIM];
    for (i, s) in shared {
        let mail = agg.mailbox(&format!("site-{i:03}")).unwrap();
        let ring = encoding.encode(&update(i), Some(&noise), &mut rng).unwrap();
        let (s, m) = s.mask(&mail, &ring).unwrap();
        if i != after_sharing {
            agg.masked_input(m).unwrap();
            masked.insert(i, s);
            for (w, v) in want.iter_mut().zip(clipped(&update(i), encoding.clip)) {
                *w += v;
            }
        }
    }
    let survivors = agg.survivors().unwrap();
    assert_eq!(survivors.len(), SITES - 1);
    let mut confirmed = BTreeMap::new();
    for (i, s) in masked {
        let (s, sig) = s.confirm(&survivors).unwrap();
        if i != after_masking {
            agg.confirm(sig).unwrap();
            confirmed.insert(i, s);
        }
    }
    let sigs = agg.signatures();
    for (_, s) in confirmed {
        agg.unmasking(s.unmask(&sigs, &verifier).unwrap()).unwrap();
    }
    let sum = agg.finish().unwrap();
    let got = encoding.decode_sum(&sum).unwrap();

    // The error is the 19 noise shares (σ = 30 grid steps each) plus rounding.
    let sd = ((SITES - 1) as f64).sqrt() * noise.sigma() * encoding.granularity;
    let rms = (got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        / DIM as f64)
        .sqrt();
    assert!(
        rms > 0.7 * sd && rms < 1.3 * sd,
        "rms error {rms}, noise sd {sd}"
    );

    // What that sum's noise is worth against the coordinator: 19 shares of the noise.
    let l2 = encoding.l2_sensitivity().unwrap();
    let release = DdgRelease {
        l2_sensitivity: l2,
        l1_sensitivity: rounded_l1_bound(l2, encoding.padded_dimension()),
        sigma: noise.sigma(),
        sites: survivors.len(),
        dimension: encoding.padded_dimension(),
        sampling_rate: 1.0,
    };
    let (eps19, _) = release.epsilon(1, 1e-5).unwrap();
    let (eps1, _) = DdgRelease {
        sites: 1,
        ..release
    }
    .epsilon(1, 1e-5)
    .unwrap();
    assert!(
        eps19 < eps1,
        "the sum of 19 shares protects more than one share"
    );
}
