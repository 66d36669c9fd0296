//! RobustAccumulator tests: hand-checked values, a brute-force reference over random sets
//! (odd and even counts, ties, blocks of every size), outliers, all-or-nothing in both paths,
//! and the spill files' lifetime.

use super::*;
use crate::fedavg::{Added, FedAvgAccumulator, NormBound};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

fn t(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
}

fn set(entries: Vec<(&str, Tensor)>) -> ParamSet {
    ParamSet::from_tensors(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<BTreeMap<_, _>>(),
    )
    .unwrap()
}

/// Every value of every tensor, widened to f64, in the spec's (name) order.
fn flat(p: &ParamSet) -> Vec<f64> {
    p.iter()
        .flat_map(|(_, t)| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect()
}

fn bits(p: &ParamSet) -> Vec<u8> {
    p.to_safetensors_bytes().unwrap()
}

/// How many files the spill directory holds.
fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

const MEDIAN: RobustRule = RobustRule::Median;

fn trimmed(trim_fraction: f64) -> RobustRule {
    RobustRule::TrimmedMean { trim_fraction }
}

/// Aggregates `deltas` (weight 1) in memory with `block` coordinates per block.
fn aggregate(rule: RobustRule, deltas: &[ParamSet], block: usize) -> ParamSet {
    let dir = tempfile::tempdir().unwrap();
    let mut acc = RobustAccumulator::new(&deltas[0].spec(), rule, dir.path()).unwrap();
    acc.block = block;
    for d in deltas {
        acc.add(d, 1.0).unwrap();
    }
    assert_eq!(files_in(dir.path()), deltas.len());
    let out = acc.finish().unwrap();
    assert_eq!(files_in(dir.path()), 0, "finish removes the spill files");
    out
}

/// The brute-force reference for one coordinate: sort, drop `k` at each end, average the
/// rest in sorted order (the median: the middle value, or the mean of the middle two).
fn reference(rule: RobustRule, column: &[f64]) -> f64 {
    let n = column.len();
    let mut sorted = column.to_vec();
    sorted.sort_by(f64::total_cmp);
    match rule {
        RobustRule::Median if n % 2 == 1 => sorted[n / 2],
        RobustRule::Median => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        RobustRule::TrimmedMean { trim_fraction } => {
            let k = (trim_fraction * n as f64) as usize; // Python's int(beta * n)
            let kept = &sorted[k..n - k];
            kept.iter().sum::<f64>() / kept.len() as f64
        }
    }
}

/// Checks `got` against [`reference`] over `deltas`, coordinate by coordinate, after the
/// rounding to f32 (f64 tensors: to f64); the median must agree exactly, the trimmed mean
/// within one ulp of its dtype (the kept values are summed in another order).
fn check_against_reference(rule: RobustRule, deltas: &[ParamSet], got: &ParamSet) {
    assert_eq!(got.spec(), deltas[0].spec());
    for (name, tensor) in got.iter() {
        let got = flat(&set(vec![(name, tensor.clone())]));
        let columns: Vec<Vec<f64>> = deltas
            .iter()
            .map(|d| flat(&set(vec![(name, d.get(name).unwrap().clone())])))
            .collect();
        for (j, &g) in got.iter().enumerate() {
            let column: Vec<f64> = columns.iter().map(|c| c[j]).collect();
            let want = reference(rule, &column);
            let (want, tol) = if tensor.dtype() == DType::F32 {
                let w = want as f32;
                (f64::from(w), f64::from((w.next_up() - w).abs()))
            } else {
                // The kept values' f64 sums differ in order only: a few ulps of values in (-1, 1).
                (want, 1e-15)
            };
            let tol = if rule == MEDIAN { 0.0 } else { tol };
            assert!(
                (g - want).abs() <= tol,
                "{rule}, n = {}, `{name}`[{j}]: got {g}, want {want} from {column:?}",
                deltas.len()
            );
        }
    }
}

/// A random delta with tensors of 0, 1, 5, 7 and 13 values (one of them f64), so that every
/// small block size both splits tensors and ends inside them. With `ties`, values come from a
/// handful of quarters, so most coordinates hold equal values.
fn random_delta(rng: &mut ChaCha8Rng, ties: bool) -> ParamSet {
    let mut draw = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                if ties {
                    rng.random_range(-2i32..=2) as f32 * 0.25
                } else {
                    rng.random_range(-1.0f32..1.0)
                }
            })
            .collect()
    };
    let a = draw(7);
    let b = draw(5);
    let c = draw(1);
    let w = draw(13);
    let d: Vec<f64> = draw(3).iter().map(|&x| f64::from(x) / 3.0).collect();
    set(vec![
        ("a", t(&a, &[7])),
        ("b.bias", t(&b, &[5])),
        ("c", t(&c, &[])),
        ("d64", Tensor::from_vec(d, &[3], &Device::Cpu).unwrap()),
        ("empty", t(&[], &[0, 4])),
        ("w", t(&w, &[13])),
    ])
}

#[test]
fn hand_checked_values() {
    // (rule, the values of one coordinate over the updates, expected result)
    let cases: &[(RobustRule, &[f32], f32)] = &[
        (MEDIAN, &[5.0], 5.0),
        (MEDIAN, &[3.0, 1.0, 2.0], 2.0),
        // Even count: the mean of the two middle values, as np.median.
        (MEDIAN, &[4.0, 1.0, 3.0, 2.0], 2.5),
        (MEDIAN, &[100.0, 1.0, -7.0, 2.0], 1.5),
        (MEDIAN, &[1.0, 1.0, 1.0, 9.0], 1.0),
        (MEDIAN, &[-1.0, 0.5], -0.25),
        // floor(0.2 · 5) = 1 dropped at each end: mean of 2, 3, 4.
        (trimmed(0.2), &[5.0, 1.0, 4.0, 3.0, 2.0], 3.0),
        // floor(0.2 · 4) = 0: the plain mean.
        (trimmed(0.2), &[5.0, 1.0, 4.0, 2.0], 3.0),
        // floor(0.25 · 4) = 1: mean of 2 and 4.
        (trimmed(0.25), &[5.0, 1.0, 4.0, 2.0], 3.0),
        // floor(0.49 · 9) = 4: the median.
        (
            trimmed(0.49),
            &[9.0, 8.0, 7.0, 1.0, 2.0, 3.0, 6.0, 5.0, 4.0],
            5.0,
        ),
        (
            trimmed(0.1),
            &[1e30, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, -1e30],
            1.75,
        ),
    ];
    for &(rule, column, want) in cases {
        let deltas: Vec<ParamSet> = column
            .iter()
            .map(|&x| set(vec![("x", t(&[x, -x], &[2]))]))
            .collect();
        let got = flat(&aggregate(rule, &deltas, BLOCK));
        assert_eq!(
            got,
            [f64::from(want), -f64::from(want)],
            "{rule} of {column:?}"
        );
    }
}

#[test]
fn median_and_trimmed_mean_match_a_brute_force_reference() {
    let rules = [
        MEDIAN,
        trimmed(0.0),
        trimmed(0.1),
        trimmed(0.2),
        trimmed(0.25),
        trimmed(1.0 / 3.0),
        trimmed(0.45),
        trimmed(0.4999),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for n in 1..=9 {
        for ties in [false, true] {
            let deltas: Vec<ParamSet> = (0..n).map(|_| random_delta(&mut rng, ties)).collect();
            for rule in rules {
                // Blocks of 1 to 4 values end inside and across every tensor; BLOCK holds each
                // tensor whole.
                let whole = aggregate(rule, &deltas, BLOCK);
                check_against_reference(rule, &deltas, &whole);
                for block in 1..=4 {
                    let got = aggregate(rule, &deltas, block);
                    assert_eq!(bits(&got), bits(&whole), "{rule}, n = {n}, block {block}");
                }
            }
        }
    }
}

#[test]
fn tensors_larger_than_a_block_are_aggregated_block_by_block() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let len = 2 * BLOCK + 77;
    let deltas: Vec<ParamSet> = (0..4)
        .map(|_| {
            let big: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let big64: Vec<f64> = (0..BLOCK + 1)
                .map(|_| rng.random_range(-1.0f64..1.0))
                .collect();
            set(vec![
                ("big", t(&big, &[len])),
                (
                    "big64",
                    Tensor::from_vec(big64, &[BLOCK + 1], &Device::Cpu).unwrap(),
                ),
                ("small", t(&[rng.random_range(-1.0f32..1.0)], &[1])),
            ])
        })
        .collect();
    for rule in [MEDIAN, trimmed(0.25)] {
        let got = aggregate(rule, &deltas, BLOCK);
        check_against_reference(rule, &deltas, &got);
        assert_eq!(bits(&aggregate(rule, &deltas, 1000)), bits(&got), "{rule}");
    }
}

#[test]
fn the_median_ignores_a_minority_of_arbitrary_outliers() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for n in 1..=9usize {
        let bad = (n - 1) / 2;
        let honest: Vec<ParamSet> = (0..n - bad)
            .map(|_| random_delta(&mut rng, false))
            .collect();
        // Huge values of either sign, all on one side or scattered, at every coordinate.
        let outliers: Vec<ParamSet> = (0..bad)
            .map(|i| {
                let d = random_delta(&mut rng, false);
                let tensors = d
                    .iter()
                    .map(|(name, t)| {
                        let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                        let huge = (t.abs().unwrap() + 1.0).unwrap() * (sign * 1e30);
                        (name.to_string(), huge.unwrap().to_dtype(t.dtype()).unwrap())
                    })
                    .collect();
                ParamSet::from_tensors(tensors).unwrap()
            })
            .collect();
        // Outliers arrive first, last and interleaved.
        let mut orders = vec![
            [outliers.clone(), honest.clone()].concat(),
            [honest.clone(), outliers.clone()].concat(),
        ];
        let mut mixed = honest.clone();
        for (i, o) in outliers.iter().enumerate() {
            mixed.insert((2 * i + 1).min(mixed.len()), o.clone());
        }
        orders.push(mixed);
        let honest_flat: Vec<Vec<f64>> = honest.iter().map(flat).collect();
        for all in orders {
            // The trimmed mean drops floor(beta · n) >= bad values at each end here.
            let beta = if n == 1 { 0.0 } else { 0.499 };
            for rule in [MEDIAN, trimmed(beta)] {
                assert!(rule.trimmed_per_side(n) >= bad);
                let got = flat(&aggregate(rule, &all, 3));
                for (j, &g) in got.iter().enumerate() {
                    let lo = honest_flat
                        .iter()
                        .map(|h| h[j])
                        .fold(f64::INFINITY, f64::min);
                    let hi = honest_flat
                        .iter()
                        .map(|h| h[j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    assert!(
                        lo <= g && g <= hi,
                        "{rule}, n = {n}, {bad} outlier(s): {g} outside [{lo}, {hi}]"
                    );
                }
            }
        }
    }
}

#[test]
fn a_clipping_bound_aggregates_large_updates_as_if_scaled_to_it_in_both_paths() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut deltas: Vec<ParamSet> = (0..5).map(|_| random_delta(&mut rng, false)).collect();
    // Two far outside the bound, one in the file path.
    deltas[1] = deltas[1].scale(40.0).unwrap();
    deltas[3] = deltas[3].scale(7.0).unwrap();
    let bound = 2.0;
    let scaled: Vec<ParamSet> = deltas
        .iter()
        .map(|d| {
            let norm = d.l2_norm().unwrap();
            if norm > bound {
                d.scale((bound / norm) as f32).unwrap()
            } else {
                d.clone()
            }
        })
        .collect();
    let spill = tempfile::tempdir().unwrap();
    let incoming = tempfile::tempdir().unwrap();
    for rule in [MEDIAN, trimmed(0.2)] {
        let mut acc = RobustAccumulator::new(&deltas[0].spec(), rule, spill.path())
            .unwrap()
            .with_norm_bound(NormBound::Clip(bound));
        for (i, d) in deltas.iter().enumerate() {
            let added = if i % 2 == 1 {
                let path = incoming.path().join(format!("{i}.safetensors"));
                d.save(&path).unwrap();
                acc.add_safetensors_file(&path, 1.0).unwrap()
            } else {
                acc.add(d, 1.0).unwrap()
            };
            let norm = d.l2_norm().unwrap();
            assert_eq!(added.norm, norm);
            assert_eq!(added.clipped(), norm > bound, "{added:?}");
            if !added.clipped() {
                assert_eq!(added, Added { norm, scale: 1.0 });
            }
        }
        let got = flat(&acc.finish().unwrap());
        let want = flat(&aggregate(rule, &scaled, BLOCK));
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6, "{rule}: {a} vs {b}");
        }
    }
}

#[test]
fn trimmed_mean_with_beta_zero_is_the_unweighted_mean_and_weights_are_ignored() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let deltas: Vec<ParamSet> = (0..6).map(|_| random_delta(&mut rng, false)).collect();
    let spec = deltas[0].spec();
    let mut fedavg = FedAvgAccumulator::new(&spec).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut robust = RobustAccumulator::new(&spec, trimmed(0.0), dir.path()).unwrap();
    let mut median_weighted = RobustAccumulator::new(&spec, MEDIAN, dir.path()).unwrap();
    for (i, d) in deltas.iter().enumerate() {
        fedavg.add(d, 1.0).unwrap();
        // Wildly different weights change nothing.
        let weight = [1.0, 1e9, 0.5, 3.0, 1e-6, 42.0][i];
        robust.add(d, weight).unwrap();
        median_weighted.add(d, weight).unwrap();
    }
    // Same f64 sum in the same order, same division: the same values.
    assert_eq!(
        flat(&robust.finish().unwrap()),
        flat(&fedavg.finish().unwrap())
    );
    assert_eq!(
        bits(&median_weighted.finish().unwrap()),
        bits(&aggregate(MEDIAN, &deltas, BLOCK))
    );
}

#[test]
fn the_file_and_in_memory_paths_agree() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let deltas: Vec<ParamSet> = (0..5).map(|_| random_delta(&mut rng, true)).collect();
    let incoming = tempfile::tempdir().unwrap();
    for rule in [MEDIAN, trimmed(0.2)] {
        let spill = tempfile::tempdir().unwrap();
        let mut acc = RobustAccumulator::new(&deltas[0].spec(), rule, spill.path()).unwrap();
        acc.block = 4;
        for (i, d) in deltas.iter().enumerate() {
            let path = incoming.path().join(format!("update-{i}.safetensors"));
            d.save(&path).unwrap();
            acc.add_safetensors_file(&path, 1.0 + i as f64).unwrap();
            // The caller deletes its file right away; the accumulator kept a copy.
            std::fs::remove_file(&path).unwrap();
            assert_eq!(acc.count(), i + 1);
            assert_eq!(files_in(spill.path()), i + 1);
        }
        let got = acc.finish().unwrap();
        assert_eq!(files_in(spill.path()), 0);
        assert_eq!(bits(&got), bits(&aggregate(rule, &deltas, 4)), "{rule}");
    }
}

#[test]
fn half_precision_updates_are_aggregated() {
    let deltas: Vec<ParamSet> = [[1.0f32, -2.0], [3.0, 0.5], [2.0, 0.25], [10.0, 8.0]]
        .iter()
        .map(|v| {
            set(vec![
                ("h", t(v, &[2]).to_dtype(DType::F16).unwrap()),
                ("s", t(v, &[2])),
            ])
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let spec = deltas[0].spec();
    let mut acc = RobustAccumulator::new(&spec, MEDIAN, dir.path()).unwrap();
    for (i, d) in deltas.iter().enumerate() {
        if i % 2 == 0 {
            acc.add(d, 1.0).unwrap();
        } else {
            let path = dir.path().join(format!("in-{i}.safetensors"));
            d.save(&path).unwrap();
            acc.add_safetensors_file(&path, 1.0).unwrap();
            std::fs::remove_file(&path).unwrap();
        }
    }
    let got = acc.finish().unwrap();
    assert_eq!(got.get("h").unwrap().dtype(), DType::F16);
    assert_eq!(flat(&got), [2.5, 0.375, 2.5, 0.375]);
    assert_eq!(files_in(dir.path()), 0);
}

/// Adds `good` twice around `bad` (which must be rejected) in both paths, checks that `bad`
/// left no file and no count, and that the result equals the one without it.
fn check_rejected(
    rule: RobustRule,
    bound: Option<NormBound>,
    bad: &ParamSet,
    weight: f64,
) -> Error {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let good: Vec<ParamSet> = (0..3).map(|_| random_delta(&mut rng, false)).collect();
    let spill = tempfile::tempdir().unwrap();
    let incoming = tempfile::tempdir().unwrap();
    let new = || {
        let acc = RobustAccumulator::new(&good[0].spec(), rule, spill.path()).unwrap();
        match bound {
            Some(b) => acc.with_norm_bound(b),
            None => acc,
        }
    };
    let bad_file = incoming.path().join("bad.safetensors");
    bad.save(&bad_file).unwrap();

    let mut errors = Vec::new();
    for from_file in [false, true] {
        let mut acc = new();
        acc.add(&good[0], 1.0).unwrap();
        acc.add(&good[1], 1.0).unwrap();
        let err = if from_file {
            acc.add_safetensors_file(&bad_file, weight).unwrap_err()
        } else {
            acc.add(bad, weight).unwrap_err()
        };
        assert_eq!(acc.count(), 2, "{err}");
        assert_eq!(
            files_in(spill.path()),
            2,
            "a rejected update leaves no file: {err}"
        );
        assert!(bad_file.exists(), "the caller's file is the caller's");
        acc.add(&good[2], 1.0).unwrap();
        assert_eq!(
            bits(&acc.finish().unwrap()),
            bits(&aggregate(rule, &good, BLOCK))
        );
        errors.push(err);
    }
    // Both paths reject for the same reason.
    assert_eq!(
        std::mem::discriminant(&errors[0]),
        std::mem::discriminant(&errors[1]),
        "{} vs {}",
        errors[0],
        errors[1]
    );
    errors.pop().unwrap()
}

/// `random_delta`'s structure with the value of `name` replaced.
fn with_tensor(name: &str, tensor: Tensor) -> ParamSet {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut tensors = random_delta(&mut rng, false).into_tensors();
    tensors.insert(name.to_string(), tensor);
    ParamSet::from_tensors(tensors).unwrap()
}

#[test]
fn rejected_updates_leave_no_trace() {
    for rule in [MEDIAN, trimmed(0.3)] {
        // Non-finite values, in a tensor after others that are fine.
        for (values, count) in [
            (vec![0.0, f32::NAN, 1.0, 0.0, 0.0], 1),
            (vec![f32::INFINITY, 0.0, 0.0, f32::NEG_INFINITY, 0.0], 2),
        ] {
            let bad = with_tensor("b.bias", t(&values, &[5]));
            match check_rejected(rule, None, &bad, 1.0) {
                Error::NonFinite { name, count: got } => {
                    assert_eq!(name, "b.bias");
                    assert_eq!(got, count);
                }
                other => panic!("expected non-finite, got {other:?}"),
            }
        }
        let structural = [
            ("wrong shape", with_tensor("a", t(&[0.0; 7], &[7, 1]))),
            (
                "wrong dtype",
                with_tensor("a", t(&[0.0; 7], &[7]).to_dtype(DType::F64).unwrap()),
            ),
            ("extra name", with_tensor("z", t(&[0.0], &[1]))),
            ("missing name", {
                let mut rng = ChaCha8Rng::seed_from_u64(2);
                let mut tensors = random_delta(&mut rng, false).into_tensors();
                tensors.remove("w");
                ParamSet::from_tensors(tensors).unwrap()
            }),
        ];
        for (what, bad) in structural {
            let err = check_rejected(rule, None, &bad, 1.0);
            assert!(matches!(err, Error::ParamMismatch(_)), "{what}: {err}");
        }
        // Over the norm bound: the good updates have 29 values in (-1, 1), so norms below
        // √29 < 5.39; this one's is above √(13 · 1.5²) > 5.40.
        let big = with_tensor("w", t(&[1.5; 13], &[13]));
        let err = check_rejected(rule, Some(NormBound::Refuse(5.39)), &big, 1.0);
        assert!(err.to_string().contains("exceeds the bound"), "{err}");
        // Bad weights, though the rules ignore weights.
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let fine = random_delta(&mut rng, false);
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            let err = check_rejected(rule, None, &fine, w);
            assert!(
                matches!(&err, Error::Aggregation(m) if m.contains("weight")),
                "{err}"
            );
        }
    }
}

#[test]
fn malformed_or_missing_files_leave_no_trace() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let good = random_delta(&mut rng, false);
    let spill = tempfile::tempdir().unwrap();
    let incoming = tempfile::tempdir().unwrap();
    let mut acc = RobustAccumulator::new(&good.spec(), MEDIAN, spill.path()).unwrap();
    acc.add(&good, 1.0).unwrap();

    let bytes = good.to_safetensors_bytes().unwrap();
    let truncated = incoming.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1]).unwrap();
    let padded = incoming.path().join("padded.safetensors");
    std::fs::write(&padded, [&bytes[..], &[0u8]].concat()).unwrap();
    let garbage = incoming.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
    let empty = incoming.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    for bad in [&truncated, &padded, &garbage, &empty] {
        let err = acc.add_safetensors_file(bad, 1.0).unwrap_err();
        assert!(
            matches!(err, Error::Safetensors(_)),
            "{}: {err}",
            bad.display()
        );
        // Messages name the caller's file, not the copy.
        if bad == &truncated || bad == &padded {
            assert!(err.to_string().contains(&*bad.to_string_lossy()), "{err}");
        }
    }
    let err = acc
        .add_safetensors_file(&incoming.path().join("missing"), 1.0)
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(acc.count(), 1);
    assert_eq!(files_in(spill.path()), 1);
    assert_eq!(bits(&acc.finish().unwrap()), bits(&good));
}

#[test]
fn dropping_an_unfinished_accumulator_removes_its_files_only() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let spill = tempfile::tempdir().unwrap();
    let other = spill.path().join("someone-elses.safetensors");
    std::fs::write(&other, b"keep me").unwrap();
    let d = random_delta(&mut rng, false);
    let mut a = RobustAccumulator::new(&d.spec(), MEDIAN, spill.path()).unwrap();
    // floor(0.4 · 3) = 1: the middle value, exactly.
    let mut b = RobustAccumulator::new(&d.spec(), trimmed(0.4), spill.path()).unwrap();
    for _ in 0..3 {
        a.add(&d, 1.0).unwrap();
        b.add(&d, 1.0).unwrap();
    }
    assert_eq!(files_in(spill.path()), 7);
    drop(a);
    assert_eq!(files_in(spill.path()), 4);
    assert_eq!(bits(&b.finish().unwrap()), bits(&d));
    assert_eq!(files_in(spill.path()), 1);
    assert!(other.exists());
}

#[test]
fn a_missing_spill_directory_is_created() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a/b");
    let d = set(vec![("x", t(&[1.0], &[1]))]);
    let mut acc = RobustAccumulator::new(&d.spec(), MEDIAN, &dir).unwrap();
    acc.add(&d, 1.0).unwrap();
    assert_eq!(files_in(&dir), 1);
    assert_eq!(bits(&acc.finish().unwrap()), bits(&d));
}

#[test]
fn finish_without_updates_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = set(vec![("x", t(&[1.0], &[1]))]);
    for rule in [MEDIAN, trimmed(0.2)] {
        let acc = RobustAccumulator::new(&d.spec(), rule, dir.path()).unwrap();
        match acc.finish() {
            Err(Error::Aggregation(msg)) => assert!(msg.contains("no updates"), "{msg}"),
            other => panic!("expected an aggregation error, got {other:?}"),
        }
    }
}

#[test]
fn invalid_rules_and_integer_specs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = set(vec![("x", t(&[1.0], &[1]))]);
    for beta in [0.5, 0.7, -0.1, -1e-300, f64::NAN, f64::INFINITY] {
        match RobustAccumulator::new(&d.spec(), trimmed(beta), dir.path()) {
            Err(Error::Aggregation(msg)) => assert!(msg.contains("trim fraction"), "{msg}"),
            other => panic!("beta {beta}: expected an aggregation error, got {other:?}"),
        }
    }
    let ints = set(vec![(
        "steps",
        Tensor::new(&[1i64, 2], &Device::Cpu).unwrap(),
    )]);
    match RobustAccumulator::new(&ints.spec(), MEDIAN, dir.path()) {
        Err(Error::Aggregation(msg)) => assert!(msg.contains("the median needs"), "{msg}"),
        other => panic!("expected an aggregation error, got {other:?}"),
    }
    assert_eq!(files_in(dir.path()), 0);
}

#[test]
fn trimmed_per_side_follows_flower() {
    // (rule, n, values dropped at each end)
    let cases = [
        (MEDIAN, 1, 0),
        (MEDIAN, 2, 0),
        (MEDIAN, 3, 1),
        (MEDIAN, 4, 1),
        (MEDIAN, 9, 4),
        (trimmed(0.0), 9, 0),
        (trimmed(0.2), 4, 0),
        (trimmed(0.2), 5, 1),
        (trimmed(0.2), 10, 2),
        (trimmed(0.49), 2, 0),
        (trimmed(0.49), 100, 49),
    ];
    for (rule, n, want) in cases {
        assert_eq!(rule.trimmed_per_side(n), want, "{rule}, n = {n}");
    }
}

#[test]
fn huge_f64_values_do_not_overflow_the_mean() {
    let mut xs = [f64::MAX, f64::MAX / 2.0, f64::MAX];
    let mean = trimmed_mean(&mut xs, 0);
    assert!(
        (mean / (f64::MAX / 6.0 * 5.0) - 1.0).abs() < 1e-15,
        "{mean}"
    );
    let mut xs = [f64::MAX, -1.0, f64::MAX];
    assert_eq!(trimmed_mean(&mut xs, 1), f64::MAX);
    // Median of two: the mean of the two middle values.
    let mut xs = [f64::MAX, f64::MAX];
    assert_eq!(trimmed_mean(&mut xs, 0), f64::MAX);
}
