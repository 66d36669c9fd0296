//! The protocol run in memory with real keys and signatures: exact sums under dropouts at
//! every phase, a lying coordinator caught by the sites, masked inputs that look uniform.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

/// When a site stops taking part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Drop {
    /// After advertising its keys (it sends no shares).
    AfterAdvertising,
    /// After sending its shares (no masked input).
    AfterSharing,
    /// After its masked input (no signature over the survivors).
    AfterMasking,
    /// After confirming the survivors (it reveals nothing).
    AfterConfirming,
    /// Never.
    Never,
}

fn ctx(nonce: u8) -> Context {
    Context {
        run_id: "run".into(),
        round: 3,
        nonce: [nonce; 32],
    }
}

fn params(_n: usize, bits: u32, dimension: usize, degree: usize) -> Params {
    Params {
        modulus_bits: bits,
        dimension,
        degree,
        threshold: 0.6,
        min_sites: 3,
    }
}

/// `n` sites with real ECDSA keys, and a verifier that knows them all.
fn sites(n: usize) -> (Vec<(String, EcdsaSigner)>, EcdsaVerifier) {
    let mut verifier = EcdsaVerifier::default();
    let sites = (0..n)
        .map(|i| {
            let name = format!("site-{i:03}");
            let (signer, _) = EcdsaSigner::generate().unwrap();
            verifier.insert(name.clone(), signer.public_key());
            (name, signer)
        })
        .collect();
    (sites, verifier)
}

/// Runs one aggregation with honest parties; `drops[i]` says when site `i` leaves.
/// Returns the coordinator's result and the sum it should be (the inputs of the sites
/// whose masked input arrived).
fn run(p: Params, inputs: &[Vec<u64>], drops: &[Drop]) -> (Result<Vec<u64>, Fault>, Vec<u64>) {
    let n = inputs.len();
    let c = ctx(1);
    let (signers, verifier) = sites(n);
    let mut agg = Aggregator::new(c.clone(), p, Box::new(verifier.clone())).unwrap();
    let mut sessions = Vec::new();
    for (name, signer) in signers {
        let (s, ad) = SiteSession::new(c.clone(), p, name, Box::new(signer)).unwrap();
        agg.advertise(ad).unwrap();
        sessions.push(s);
    }
    let result = (|| {
        let roster = agg.roster()?;
        let mut shared = BTreeMap::new();
        for (i, s) in sessions.into_iter().enumerate() {
            let (s, envelopes) = s.share(&roster, &verifier)?;
            if drops[i] > Drop::AfterAdvertising {
                agg.share(&format!("site-{i:03}"), envelopes)?;
                shared.insert(i, s);
            }
        }
        let mut masked = BTreeMap::new();
        for (i, s) in shared {
            let mail = agg.mailbox(&format!("site-{i:03}"))?;
            let (s, m) = s.mask(&mail, &inputs[i])?;
            if drops[i] > Drop::AfterSharing {
                agg.masked_input(m)?;
                masked.insert(i, s);
            }
        }
        let survivors = agg.survivors()?;
        let mut confirmed = BTreeMap::new();
        for (i, s) in masked {
            let (s, sig) = s.confirm(&survivors)?;
            if drops[i] > Drop::AfterMasking {
                agg.confirm(sig)?;
                confirmed.insert(i, s);
            }
        }
        let sigs = agg.signatures();
        for (i, s) in confirmed {
            let u = s.unmask(&sigs, &verifier)?;
            if drops[i] > Drop::AfterConfirming {
                agg.unmasking(u)?;
            }
        }
        agg.finish()
    })();
    let mask = p.modulus_mask();
    let mut want = vec![0u64; p.dimension];
    for (i, x) in inputs.iter().enumerate() {
        if drops[i] > Drop::AfterSharing {
            for (w, v) in want.iter_mut().zip(x) {
                *w = w.wrapping_add(*v) & mask;
            }
        }
    }
    (result, want)
}

fn drop_strategy() -> impl Strategy<Value = Drop> {
    prop_oneof![
        6 => Just(Drop::Never),
        1 => Just(Drop::AfterAdvertising),
        1 => Just(Drop::AfterSharing),
        1 => Just(Drop::AfterMasking),
        1 => Just(Drop::AfterConfirming),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Over sizes, moduli, graphs and dropouts at every phase, the coordinator gets exactly
    /// the plain sum of the inputs that arrived, or fails for want of shares and unmasks
    /// nothing; with no dropout it always gets the sum.
    #[test]
    fn the_unmasked_sum_is_the_plain_sum(
        (n, bits, dim, degree, inputs, drops) in (3usize..12, prop_oneof![Just(1u32), Just(8), Just(33), Just(64)], 1usize..16, prop_oneof![Just(0usize), Just(2), Just(4)])
            .prop_flat_map(|(n, bits, dim, degree)| {
                let top = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
                (
                    Just(n), Just(bits), Just(dim), Just(degree),
                    prop::collection::vec(prop::collection::vec(0..=top, dim), n),
                    prop::collection::vec(drop_strategy(), n),
                )
            })
    ) {
        let p = params(n, bits, dim, degree);
        let (got, want) = run(p, &inputs, &drops);
        match got {
            Ok(sum) => prop_assert_eq!(sum, want),
            Err(Fault::BelowThreshold { .. }) => {
                prop_assert!(drops.iter().any(|d| *d != Drop::Never), "no one dropped");
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
        let (got, want) = run(p, &inputs, &vec![Drop::Never; n]);
        prop_assert_eq!(got.unwrap(), want);
    }
}

/// One dropout at each phase in a round whose graph leaves every site enough neighbours
/// (10 each, 6 needed, at most 4 gone): the sum of the inputs that arrived, exactly.
#[test]
fn a_dropout_at_each_phase_still_gives_the_exact_sum() {
    let n = 20;
    let p = params(n, 32, 50, 10);
    let inputs: Vec<Vec<u64>> = (0..n as u64)
        .map(|i| (0..50).map(|j| (i * 1_000 + j) % (1 << 32)).collect())
        .collect();
    let mut drops = vec![Drop::Never; n];
    drops[1] = Drop::AfterAdvertising;
    drops[4] = Drop::AfterSharing;
    drops[6] = Drop::AfterMasking;
    drops[9] = Drop::AfterConfirming;
    let (got, want) = run(p, &inputs, &drops);
    assert_eq!(got.unwrap(), want);
    let plain: u64 = (0..n as u64)
        .filter(|i| ![1, 4].contains(i))
        .map(|i| i * 1_000)
        .sum();
    assert_eq!(want[0], plain, "sites 1 and 4 are not in the sum");
}

/// A round's sites and the parts a lying coordinator would play with.
struct Round {
    c: Context,
    p: Params,
    verifier: EcdsaVerifier,
    sessions: Vec<SiteSession>,
    ads: Vec<Advertisement>,
}

fn round(n: usize) -> Round {
    let c = ctx(7);
    let p = params(n, 16, 8, 0);
    let (signers, verifier) = sites(n);
    let mut sessions = Vec::new();
    let mut ads = Vec::new();
    for (name, signer) in signers {
        let (s, ad) = SiteSession::new(c.clone(), p, name, Box::new(signer)).unwrap();
        sessions.push(s);
        ads.push(ad);
    }
    Round {
        c,
        p,
        verifier,
        sessions,
        ads,
    }
}

/// A substituted key (the coordinator's own in place of a site's) breaks that site's
/// signature; a roster without the site's own keys, or with them changed, is refused.
#[test]
fn a_substituted_key_is_caught_by_the_sites() {
    let r = round(4);
    let mut forged = r.ads.clone();
    forged[1].mask_key =
        x25519_dalek::PublicKey::from(&crypto::x25519_secret(&crypto::random_scalar())).to_bytes();
    let mut sessions = r.sessions.into_iter();
    let first = sessions.next().unwrap();
    let err = first
        .share(
            &Roster {
                advertisements: forged,
            },
            &r.verifier,
        )
        .unwrap_err();
    assert_eq!(err, Fault::BadSignature("site-001".into()));

    let second = sessions.next().unwrap();
    let without_me = Roster {
        advertisements: vec![r.ads[0].clone(), r.ads[2].clone(), r.ads[3].clone()],
    };
    assert_eq!(
        second.share(&without_me, &r.verifier).unwrap_err(),
        Fault::KeySubstituted
    );
}

/// A coordinator that calls a live site dropped, to get its pairwise secret from some
/// sites and its self-mask secret from others, is refused: the site itself will not
/// sign, and the others see too few signatures over any one list to reveal anything.
#[test]
fn a_lie_about_the_survivors_is_caught_by_the_sites() {
    let n = 5;
    let r = round(n);
    let roster = Roster {
        advertisements: r.ads.clone(),
    };
    let mut agg = Aggregator::new(r.c.clone(), r.p, Box::new(r.verifier.clone())).unwrap();
    for ad in &r.ads {
        agg.advertise(ad.clone()).unwrap();
    }
    agg.roster().unwrap();
    let mut shared = Vec::new();
    for (i, s) in r.sessions.into_iter().enumerate() {
        let (s, e) = s.share(&roster, &r.verifier).unwrap();
        agg.share(&format!("site-{i:03}"), e).unwrap();
        shared.push(s);
    }
    let mut masked = Vec::new();
    for (i, s) in shared.into_iter().enumerate() {
        let mail = agg.mailbox(&format!("site-{i:03}")).unwrap();
        let (s, m) = s.mask(&mail, &[i as u64; 8]).unwrap();
        agg.masked_input(m).unwrap();
        masked.push(s);
    }
    let all: Vec<String> = (0..n).map(|i| format!("site-{i:03}")).collect();
    let without_victim: Vec<String> = all.iter().filter(|s| *s != "site-004").cloned().collect();
    let mut masked = masked.into_iter();
    // Sites 0 and 1 are told site 4 dropped; sites 2, 3 and 4 are told everyone survived.
    let mut lie = Vec::new();
    let mut truth = Vec::new();
    let mut sig_lie = Vec::new();
    let mut sig_truth = Vec::new();
    for i in 0..n {
        let s = masked.next().unwrap();
        if i < 2 {
            let (s, sig) = s.confirm(&without_victim).unwrap();
            lie.push(s);
            sig_lie.push(sig);
        } else if i == 4 {
            // The victim, shown the lie, refuses at once.
            let err = s.confirm(&without_victim).unwrap_err();
            assert_eq!(err, Fault::DeclaredDropped);
        } else {
            let (s, sig) = s.confirm(&all).unwrap();
            truth.push(s);
            sig_truth.push(sig);
        }
    }
    // 3 of 5 signatures are needed (threshold 0.6); neither group has them, and mixing
    // in signatures over the other list does not verify.
    for s in lie {
        let err = s.unmask(&sig_lie, &r.verifier).unwrap_err();
        assert!(
            matches!(
                err,
                Fault::BelowThreshold {
                    have: 2,
                    need: 3,
                    ..
                }
            ),
            "{err}"
        );
    }
    let mut mixed = sig_truth.clone();
    mixed.extend(sig_lie.iter().cloned());
    let s = truth.pop().unwrap();
    assert!(matches!(
        s.unmask(&mixed, &r.verifier).unwrap_err(),
        Fault::Protocol(_) | Fault::BadSignature(_)
    ));
    let s = truth.pop().unwrap();
    assert!(matches!(
        s.unmask(&sig_truth, &r.verifier).unwrap_err(),
        Fault::BelowThreshold {
            have: 2,
            need: 3,
            ..
        }
    ));
}

/// Shares from another attempt at the round (a replay) do not open, and its signed keys
/// do not verify in this one: the same sites, with the same certificate keys, twice.
#[test]
fn a_replayed_message_from_another_attempt_is_refused() {
    let n = 3;
    let p = params(n, 16, 4, 0);
    let mut verifier = EcdsaVerifier::default();
    let keys: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let (signer, der) = EcdsaSigner::generate().unwrap();
            let name = format!("site-{i:03}");
            verifier.insert(name.clone(), signer.public_key());
            (name, der)
        })
        .collect();
    let attempt = |nonce: u8| -> (Vec<SiteSession>, Roster) {
        let (sessions, ads) = keys
            .iter()
            .map(|(name, der)| {
                let signer = EcdsaSigner::from_pkcs8(der).unwrap();
                SiteSession::new(ctx(nonce), p, name.clone(), Box::new(signer)).unwrap()
            })
            .unzip();
        (
            sessions,
            Roster {
                advertisements: ads,
            },
        )
    };
    let (old, old_roster) = attempt(1);
    let (mut new, new_roster) = attempt(2);

    // An advertisement of attempt 1 in the roster of attempt 2.
    let mut stale = new_roster.clone();
    stale.advertisements[2] = old_roster.advertisements[2].clone();
    let err = new.remove(1).share(&stale, &verifier).unwrap_err();
    assert_eq!(err, Fault::BadSignature("site-002".into()));

    // Envelopes of attempt 1 for site 0, handed to it in attempt 2.
    let mut replayed = Vec::new();
    for s in old.into_iter().skip(1) {
        let (_, e) = s.share(&old_roster, &verifier).unwrap();
        replayed.extend(e.into_iter().filter(|e| e.to == "site-000"));
    }
    assert_eq!(replayed.len(), 2);
    let (s, _) = new.remove(0).share(&new_roster, &verifier).unwrap();
    let err = s.mask(&replayed, &[0; 4]).unwrap_err();
    assert!(matches!(err, Fault::BadEnvelope(_, _)), "{err}");
}

/// A masked input is uniform whatever the input: 40,000 bytes of the mask of an all-zero
/// input pass a chi-square test against the uniform distribution on 256 values (the
/// critical value for 255 degrees of freedom at p = 1e-6 is about 370).
#[test]
fn a_masked_input_looks_uniform() {
    let n = 3;
    let dim = 40_000;
    let p = params(n, 8, dim, 0);
    // One site's masked input, from a round run by hand to that phase.
    let (signers, verifier) = sites(n);
    let mut sessions = Vec::new();
    let mut ads = Vec::new();
    for (name, signer) in signers {
        let (s, ad) = SiteSession::new(ctx(9), p, name, Box::new(signer)).unwrap();
        sessions.push(s);
        ads.push(ad);
    }
    let roster = Roster {
        advertisements: ads,
    };
    let mut agg = Aggregator::new(ctx(9), p, Box::new(verifier.clone())).unwrap();
    for ad in &roster.advertisements {
        agg.advertise(ad.clone()).unwrap();
    }
    agg.roster().unwrap();
    let mut shared = Vec::new();
    for (i, s) in sessions.into_iter().enumerate() {
        let (s, e) = s.share(&roster, &verifier).unwrap();
        agg.share(&format!("site-{i:03}"), e).unwrap();
        shared.push(s);
    }
    let s = shared.remove(0);
    let mail = agg.mailbox("site-000").unwrap();
    let (_, masked) = s.mask(&mail, &vec![0; dim]).unwrap();
    let mut counts = [0f64; 256];
    for v in &masked.values {
        counts[*v as usize] += 1.0;
    }
    let expected = dim as f64 / 256.0;
    let chi2: f64 = counts
        .iter()
        .map(|c| (c - expected).powi(2) / expected)
        .sum();
    assert!(chi2 < 370.0, "chi-square {chi2}");
}

/// A site (or a coordinator holding its key) that advertises a low-order X25519 key, which
/// would make every secret agreed with it predictable, is refused by the coordinator as the
/// advertisement arrives and by the neighbour it would share with.
#[test]
fn a_low_order_key_is_refused_by_the_coordinator_and_the_sites() {
    let n = 3;
    let p = params(n, 16, 4, 0);
    let c = ctx(9);
    let mut verifier = EcdsaVerifier::default();
    let mut sessions = Vec::new();
    let mut ads = Vec::new();
    let mut ders = Vec::new();
    for i in 0..n {
        let (signer, der) = EcdsaSigner::generate().unwrap();
        let name = format!("site-{i:03}");
        verifier.insert(name.clone(), signer.public_key());
        let (s, ad) = SiteSession::new(c.clone(), p, name, Box::new(signer)).unwrap();
        sessions.push(s);
        ads.push(ad);
        ders.push(der);
    }
    // site-002 signs an advertisement whose mask key is the identity point.
    let mut bad = ads[2].clone();
    bad.mask_key = [0; 32];
    bad.signature = EcdsaSigner::from_pkcs8(&ders[2])
        .unwrap()
        .sign(&bad.signed_bytes(&c));
    let mut agg = Aggregator::new(c.clone(), p, Box::new(verifier.clone())).unwrap();
    assert_eq!(
        agg.advertise(bad.clone()).unwrap_err(),
        Fault::BadKey("site-002".into())
    );
    let roster = Roster {
        advertisements: vec![ads[0].clone(), ads[1].clone(), bad],
    };
    let first = sessions.into_iter().next().unwrap();
    assert_eq!(
        first.share(&roster, &verifier).unwrap_err(),
        Fault::BadKey("site-002".into())
    );
}
