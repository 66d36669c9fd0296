//! FedAvgAccumulator tests: the NumPy reference, order independence, all-or-nothing,
//! streaming, the DP release.

use super::*;
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

fn values(p: &ParamSet, name: &str) -> Vec<f32> {
    p.get(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// The three client deltas of the NumPy reference below.
fn reference_deltas() -> Vec<ParamSet> {
    vec![
        set(vec![
            ("a.w", t(&[0.1, -0.2, 0.3, 1e-3], &[2, 2])),
            ("b", t(&[1.5, -0.75, 0.01], &[3])),
        ]),
        set(vec![
            ("a.w", t(&[-0.05, 0.25, 0.7, -2e-3], &[2, 2])),
            ("b", t(&[-2.0, 0.6, 0.02], &[3])),
        ]),
        set(vec![
            ("a.w", t(&[0.3333, -0.125, -1.1, 5e-4], &[2, 2])),
            ("b", t(&[0.2, 0.1, -0.07], &[3])),
        ]),
    ]
}

const REFERENCE_WEIGHTS: [f64; 3] = [10.0, 25.0, 7.0];

fn run(deltas: &[(ParamSet, f64)]) -> ParamSet {
    let mut acc = FedAvgAccumulator::new(&deltas[0].0.spec()).unwrap();
    for (d, w) in deltas {
        acc.add(d, *w).unwrap();
    }
    acc.finish().unwrap()
}

/// Expected values from NumPy 2.4 (`python3 fedavg_ref.py`), which prints
/// `a.w 0.049597617, 0.08035714, 0.3047619, -0.00086904765`
/// and `b -0.8, 0.19523811, 0.0026190472`:
///
/// ```python
/// import numpy as np
/// w = np.array([10.0, 25.0, 7.0])  # float64 weights (e.g. example counts)
/// deltas = {
///     "a.w": np.array([[[0.1, -0.2], [0.3, 1e-3]],
///                      [[-0.05, 0.25], [0.7, -2e-3]],
///                      [[0.3333, -0.125], [-1.1, 5e-4]]], dtype=np.float32),
///     "b": np.array([[1.5, -0.75, 0.01],
///                    [-2.0, 0.6, 0.02],
///                    [0.2, 0.1, -0.07]], dtype=np.float32),
/// }
/// for name, d in deltas.items():
///     d64 = d.astype(np.float64)  # exact widening, as in Rust
///     avg = (w.reshape(-1, *([1] * (d.ndim - 1))) * d64).sum(axis=0) / w.sum()
///     print(name, ", ".join(str(x) for x in avg.astype(np.float32).ravel()))
/// ```
///
/// NumPy sums the three products in the same order and rounds to f32 once, as we do, so
/// the results agree bit for bit.
#[test]
fn matches_numpy_reference() {
    let inputs: Vec<_> = reference_deltas()
        .into_iter()
        .zip(REFERENCE_WEIGHTS)
        .collect();
    let mut acc = FedAvgAccumulator::new(&inputs[0].0.spec()).unwrap();
    for (d, w) in &inputs {
        acc.add(d, *w).unwrap();
    }
    assert_eq!(acc.count(), 3);
    assert_eq!(acc.total_weight(), 42.0);
    let mean = acc.finish().unwrap();
    assert_eq!(mean.get("a.w").unwrap().dims(), &[2, 2]);
    assert_eq!(
        values(&mean, "a.w"),
        vec![0.049597617, 0.08035714, 0.3047619, -0.00086904765]
    );
    assert_eq!(values(&mean, "b"), vec![-0.8, 0.19523811, 0.0026190472]);
}

#[test]
fn single_update_with_any_accepted_weight_is_returned_exactly() {
    let d = &reference_deltas()[2];
    for w in [1e-300, 0.3, 1.0, 7.0, MAX_WEIGHT] {
        let mean = run(&[(d.clone(), w)]);
        assert_eq!(
            mean.to_safetensors_bytes().unwrap(),
            d.to_safetensors_bytes().unwrap(),
            "weight {w}"
        );
    }
}

/// Distance in units in the last place between two finite f32 of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{a} vs {b}");
    a.to_bits().abs_diff(b.to_bits())
}

fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, first);
            out.push(p);
        }
    }
    out
}

#[test]
fn result_does_not_depend_on_arrival_order() {
    // Five clients, values spread over many magnitudes, uneven weights.
    let n = 1000;
    let inputs: Vec<(ParamSet, f64)> = (0..5u32)
        .map(|c| {
            let v: Vec<f32> = (0..n as u32)
                .map(|i| {
                    let x = (i.wrapping_mul(2_654_435_761).wrapping_add(c * 97) % 10_007) as f32;
                    (x / 10_007.0 - 0.5) * 10f32.powi((i % 7) as i32 - 3)
                })
                .collect();
            let w = [3.0, 117.0, 0.25, 42.5, 1e4][c as usize];
            (set(vec![("w", t(&v, &[n]))]), w)
        })
        .collect();
    let first = values(&run(&inputs), "w");
    let mut worst = 0;
    for order in permutations(&[0, 1, 2, 3, 4]) {
        let permuted: Vec<_> = order.iter().map(|&i| inputs[i].clone()).collect();
        let got = values(&run(&permuted), "w");
        for (a, b) in first.iter().zip(&got) {
            if *a != 0.0 || *b != 0.0 {
                worst = worst.max(ulps(*a, *b));
            }
        }
    }
    assert!(worst <= 1, "arrival order changed a result by {worst} ulp");
}

/// Adds a good update, then `bad` (which must be rejected), then the good one again, and
/// checks the result equals adding the good update twice.
fn check_rejected(bad: &ParamSet, weight: f64) -> Error {
    let good = &reference_deltas()[0];
    let mut acc = FedAvgAccumulator::new(&good.spec()).unwrap();
    acc.add(good, 2.0).unwrap();
    let err = acc.add(bad, weight).unwrap_err();
    assert_eq!(acc.count(), 1);
    assert_eq!(acc.total_weight(), 2.0);
    acc.add(good, 3.0).unwrap();
    let got = acc.finish().unwrap();
    let want = run(&[(good.clone(), 2.0), (good.clone(), 3.0)]);
    assert_eq!(
        got.to_safetensors_bytes().unwrap(),
        want.to_safetensors_bytes().unwrap()
    );
    err
}

#[test]
fn rejected_updates_leave_the_accumulator_unchanged() {
    let good = reference_deltas()[1].clone();
    let b = t(&[1.0, 1.0, 1.0], &[3]);
    let aw = t(&[1.0; 4], &[2, 2]);

    // Non-finite values, after other tensors that are fine (`a.w` sorts before `b`).
    for (bad, count) in [
        (vec![f32::NAN, 0.0, 1.0], 1),
        (vec![f32::INFINITY, f32::NEG_INFINITY, 1.0], 2),
    ] {
        let d = set(vec![("a.w", aw.clone()), ("b", t(&bad, &[3]))]);
        match check_rejected(&d, 1.0) {
            Error::NonFinite { name, count: got } => {
                assert_eq!(name, "b");
                assert_eq!(got, count);
            }
            other => panic!("expected non-finite, got {other:?}"),
        }
    }

    let structural = [
        (
            "wrong shape",
            set(vec![("a.w", t(&[1.0; 4], &[4])), ("b", b.clone())]),
        ),
        ("missing name", set(vec![("a.w", aw.clone())])),
        (
            "extra name",
            set(vec![
                ("a.w", aw.clone()),
                ("b", b.clone()),
                ("c", t(&[0.0], &[1])),
            ]),
        ),
        (
            "wrong dtype",
            set(vec![
                ("a.w", aw.to_dtype(DType::F64).unwrap()),
                ("b", b.clone()),
            ]),
        ),
    ];
    for (what, bad) in structural {
        assert!(
            matches!(check_rejected(&bad, 1.0), Error::ParamMismatch(_)),
            "{what}"
        );
    }

    for w in [
        0.0,
        -0.0,
        -1.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e300,
        MAX_WEIGHT * 2.0,
    ] {
        match check_rejected(&good, w) {
            Error::Aggregation(msg) => assert!(msg.contains("weight"), "{msg}"),
            other => panic!("weight {w}: expected an aggregation error, got {other:?}"),
        }
    }
}

#[test]
fn finish_without_updates_is_an_error() {
    let acc = FedAvgAccumulator::new(&reference_deltas()[0].spec()).unwrap();
    match acc.finish() {
        Err(Error::Aggregation(msg)) => assert!(msg.contains("no updates"), "{msg}"),
        other => panic!("expected an aggregation error, got {other:?}"),
    }
}

#[test]
fn integer_specs_are_refused() {
    let ints = set(vec![(
        "steps",
        Tensor::new(&[1i64, 2], &Device::Cpu).unwrap(),
    )]);
    assert!(matches!(
        FedAvgAccumulator::new(&ints.spec()),
        Err(Error::Aggregation(_))
    ));
}

#[test]
fn f64_and_non_contiguous_inputs_are_averaged() {
    let spec_src = set(vec![
        ("d", Tensor::new(&[0.0f64, 0.0], &Device::Cpu).unwrap()),
        ("m", t(&[0.0; 6], &[3, 2])),
    ]);
    let mut acc = FedAvgAccumulator::new(&spec_src.spec()).unwrap();
    let transposed = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).t().unwrap();
    let a = set(vec![
        ("d", Tensor::new(&[1.0f64, -1.0], &Device::Cpu).unwrap()),
        ("m", transposed),
    ]);
    let b = set(vec![
        ("d", Tensor::new(&[4.0f64, 2.0], &Device::Cpu).unwrap()),
        ("m", t(&[0.0; 6], &[3, 2])),
    ]);
    acc.add(&a, 1.0).unwrap();
    acc.add(&b, 3.0).unwrap();
    let mean = acc.finish().unwrap();
    assert_eq!(
        mean.get("d").unwrap().to_vec1::<f64>().unwrap(),
        vec![3.25, 1.25]
    );
    assert_eq!(values(&mean, "m"), vec![0.25, 1.0, 0.5, 1.25, 0.75, 1.5]);
}

/// Saves `p` to a file in `dir` and returns its path.
fn saved(dir: &tempfile::TempDir, file: &str, p: &ParamSet) -> std::path::PathBuf {
    let path = dir.path().join(file);
    p.save(&path).unwrap();
    path
}

fn sums_of(acc: &FedAvgAccumulator) -> (Vec<Vec<u64>>, f64, usize) {
    let bits = acc
        .sums
        .iter()
        .map(|s| s.iter().map(|x| x.to_bits()).collect())
        .collect();
    (bits, acc.total_weight, acc.count)
}

#[test]
fn streaming_a_file_equals_adding_the_parsed_set() {
    let dir = tempfile::tempdir().unwrap();
    let deltas = reference_deltas();
    let mut in_memory = FedAvgAccumulator::new(&deltas[0].spec()).unwrap();
    let mut streamed = FedAvgAccumulator::new(&deltas[0].spec()).unwrap();
    for (i, (d, w)) in deltas.iter().zip(REFERENCE_WEIGHTS).enumerate() {
        in_memory.add(d, w).unwrap();
        let path = saved(&dir, &format!("d{i}.safetensors"), d);
        streamed.add_safetensors_file(&path, w).unwrap();
    }
    assert_eq!(sums_of(&streamed), sums_of(&in_memory));
    assert_eq!(
        streamed.finish().unwrap().to_safetensors_bytes().unwrap(),
        in_memory.finish().unwrap().to_safetensors_bytes().unwrap()
    );
}

#[test]
fn streaming_handles_tensors_larger_than_the_read_block() {
    let dir = tempfile::tempdir().unwrap();
    let n = READ_BLOCK / 4 * 2 + 77; // f32 values spanning three blocks
    let big: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3 - 0.5).collect();
    let small = Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu).unwrap();
    let d = set(vec![("big", t(&big, &[n])), ("small", small)]);
    let mut in_memory = FedAvgAccumulator::new(&d.spec()).unwrap();
    let mut streamed = FedAvgAccumulator::new(&d.spec()).unwrap();
    in_memory.add(&d, 3.0).unwrap();
    streamed
        .add_safetensors_file(&saved(&dir, "d.safetensors", &d), 3.0)
        .unwrap();
    assert_eq!(sums_of(&streamed), sums_of(&in_memory));
}

#[test]
fn a_rejected_file_leaves_the_accumulator_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let deltas = reference_deltas();
    let mut acc = FedAvgAccumulator::new(&deltas[0].spec()).unwrap();
    acc.add_safetensors_file(&saved(&dir, "good.safetensors", &deltas[0]), 2.0)
        .unwrap();
    let before = sums_of(&acc);

    // NaN in the second tensor (by name): the first pass finds it before adding anything.
    let nan = set(vec![
        ("a.w", t(&[0.1, 0.2, 0.3, 0.4], &[2, 2])),
        ("b", t(&[1.0, f32::NAN, f32::INFINITY], &[3])),
    ]);
    let err = acc
        .add_safetensors_file(&saved(&dir, "nan.safetensors", &nan), 1.0)
        .unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { name, count: 2 } if name == "b"),
        "{err}"
    );

    let wrong_shape = set(vec![
        ("a.w", t(&[0.1, 0.2, 0.3, 0.4], &[4])),
        ("b", t(&[1.0, 2.0, 3.0], &[3])),
    ]);
    let err = acc
        .add_safetensors_file(&saved(&dir, "shape.safetensors", &wrong_shape), 1.0)
        .unwrap_err();
    assert!(matches!(err, Error::ParamMismatch(_)), "{err}");

    let extra = set(vec![
        ("a.w", t(&[0.1, 0.2, 0.3, 0.4], &[2, 2])),
        ("b", t(&[1.0, 2.0, 3.0], &[3])),
        ("c", t(&[1.0], &[1])),
    ]);
    let err = acc
        .add_safetensors_file(&saved(&dir, "extra.safetensors", &extra), 1.0)
        .unwrap_err();
    assert!(matches!(err, Error::ParamMismatch(_)), "{err}");

    // Truncated, padded and garbage files.
    let bytes = deltas[1].to_safetensors_bytes().unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1]).unwrap();
    let padded = dir.path().join("padded.safetensors");
    std::fs::write(&padded, [&bytes[..], &[0u8]].concat()).unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
    for bad in [&truncated, &padded, &garbage] {
        let err = acc.add_safetensors_file(bad, 1.0).unwrap_err();
        assert!(
            matches!(err, Error::Safetensors(_)),
            "{}: {err}",
            bad.display()
        );
    }

    let good = saved(&dir, "good2.safetensors", &deltas[1]);
    assert!(matches!(
        acc.add_safetensors_file(&good, f64::NAN),
        Err(Error::Aggregation(_))
    ));
    assert!(matches!(
        acc.add_safetensors_file(&dir.path().join("missing"), 1.0),
        Err(Error::Io { .. })
    ));
    assert_eq!(sums_of(&acc), before, "rejected files must change nothing");
}

#[test]
fn a_norm_bound_rejects_unclipped_updates_in_both_paths_without_a_trace() {
    let dir = tempfile::tempdir().unwrap();
    let deltas = reference_deltas();
    let norms: Vec<f64> = deltas.iter().map(|d| d.l2_norm().unwrap()).collect();
    // A bound between the norms of delta 0 and delta 1 (and exactly delta 0's norm).
    assert!(norms[0] < norms[1]);
    let bound = norms[0];
    let mut acc = FedAvgAccumulator::new(&deltas[0].spec())
        .unwrap()
        .with_norm_bound(NormBound::Refuse(bound));
    acc.add(&deltas[0], 1.0).unwrap();
    acc.add_safetensors_file(&saved(&dir, "d0.safetensors", &deltas[0]), 1.0)
        .unwrap();
    let before = sums_of(&acc);
    let err = acc.add(&deltas[1], 1.0).unwrap_err();
    assert!(err.to_string().contains("exceeds the bound"), "{err}");
    let err = acc
        .add_safetensors_file(&saved(&dir, "d1.safetensors", &deltas[1]), 1.0)
        .unwrap_err();
    assert!(err.to_string().contains("exceeds the bound"), "{err}");
    assert_eq!(sums_of(&acc), before);
}

#[test]
fn a_clipping_bound_scales_large_updates_to_it_and_keeps_their_weight_in_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let deltas = reference_deltas();
    let norms: Vec<f64> = deltas.iter().map(|d| d.l2_norm().unwrap()).collect();
    let bound = norms[0];
    assert!(norms[1] > bound);
    let clipped = deltas[1].scale((bound / norms[1]) as f32).unwrap();
    for from_file in [false, true] {
        let mut acc = FedAvgAccumulator::new(&deltas[0].spec())
            .unwrap()
            .with_norm_bound(NormBound::Clip(bound));
        let within = acc.add(&deltas[0], 2.0).unwrap();
        assert_eq!(
            within,
            Added {
                norm: norms[0],
                scale: 1.0
            }
        );
        assert!(!within.clipped());
        let added = if from_file {
            acc.add_safetensors_file(&saved(&dir, "d1.safetensors", &deltas[1]), 3.0)
        } else {
            acc.add(&deltas[1], 3.0)
        }
        .unwrap();
        assert!(added.clipped(), "{added:?}");
        assert_eq!(added.norm, norms[1]);
        assert!((added.scale - bound / norms[1]).abs() < 1e-15);
        assert_eq!(
            acc.total_weight(),
            5.0,
            "clipping scales the delta, not the weight"
        );
        let mean = acc.finish().unwrap();
        // The same as the mean of the pre-scaled update (to f32 rounding of the scaling).
        let mut reference = FedAvgAccumulator::new(&deltas[0].spec()).unwrap();
        reference.add(&deltas[0], 2.0).unwrap();
        reference.add(&clipped, 3.0).unwrap();
        let want = reference.finish().unwrap();
        for (name, _) in deltas[0].spec().iter() {
            for (a, b) in values(&mean, name).iter().zip(values(&want, name)) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{name}: {a} vs {b}"
                );
            }
        }
        // Whatever the weights, the mean of clipped updates is within the bound.
        assert!(mean.l2_norm().unwrap() <= bound * (1.0 + 1e-6));
    }
}

#[test]
fn the_dp_release_divides_by_the_fixed_denominator_and_adds_the_noise_once() {
    use rand::SeedableRng;
    let deltas = reference_deltas();
    // Without noise: the sum over the denominator, not over the weights.
    let mut acc = FedAvgAccumulator::new(&deltas[0].spec()).unwrap();
    for d in &deltas {
        acc.add(d, 1.0).unwrap();
    }
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let mean = acc.finish_dp(4.0, 0.0, &mut rng).unwrap();
    let b: Vec<f32> = (0..3)
        .map(|i| {
            let sum: f64 = deltas.iter().map(|d| f64::from(values(d, "b")[i])).sum();
            (sum / 4.0) as f32
        })
        .collect();
    assert_eq!(values(&mean, "b"), b);
    // Noise alone on an empty round: N(0, std²) / denominator per coordinate.
    let n = 200_000;
    let zeros = set(vec![("w", t(&vec![0.0; n], &[n]))]);
    let acc = FedAvgAccumulator::new(&zeros.spec()).unwrap();
    let out = acc.finish_dp(10.0, 3.0, &mut rng).unwrap();
    let v = values(&out, "w");
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
    let sd = (v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / (n as f64 - 1.0))
        .sqrt();
    assert!(mean.abs() < 4.0 * 0.3 / (n as f64).sqrt(), "{mean}");
    assert!(
        (sd / 0.3 - 1.0).abs() < 4.0 / (2.0 * n as f64).sqrt(),
        "{sd}"
    );
    let acc = FedAvgAccumulator::new(&zeros.spec()).unwrap();
    assert!(acc.finish_dp(0.0, 1.0, &mut rng).is_err());
}
