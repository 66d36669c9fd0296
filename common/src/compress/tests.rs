use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use proptest::prelude::*;

use super::*;
use crate::fedavg::{FedAvgAccumulator, NormBound};
use crate::params::ParamSet;
use crate::robust::{RobustAccumulator, RobustRule};

/// A two-tensor update with the given values (a 2-d and a 1-d tensor).
fn update(a: Vec<f32>, b: Vec<f32>) -> ParamSet {
    let cols = 4;
    let rows = a.len() / cols;
    let mut t = BTreeMap::new();
    t.insert(
        "layer.weight".to_string(),
        Tensor::from_vec(a[..rows * cols].to_vec(), (rows, cols), &Device::Cpu).unwrap(),
    );
    t.insert(
        "layer.bias".to_string(),
        Tensor::from_vec(b.clone(), b.len(), &Device::Cpu).unwrap(),
    );
    ParamSet::from_tensors(t).unwrap()
}

fn values(p: &ParamSet, name: &str) -> Vec<f32> {
    p.get(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn wave(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.731 + seed).sin() * (1.0 + (i % 7) as f32)) * 0.01)
        .collect()
}

fn modes() -> Vec<Compression> {
    let c = |values, top_k, error_feedback| Compression {
        values,
        block_size: 16,
        top_k,
        error_feedback,
    };
    vec![
        c(ValueCodec::F16, None, false),
        c(ValueCodec::Bf16, None, false),
        c(ValueCodec::Int8, None, false),
        c(ValueCodec::F32, Some(0.1), true),
        c(ValueCodec::Int8, Some(0.1), true),
        c(ValueCodec::F16, Some(0.3), false),
    ]
}

#[test]
fn names_are_canonical() {
    let mut c = Compression::NONE;
    assert_eq!(c.name(), "f32");
    assert!(c.is_none());
    c.values = ValueCodec::Int8;
    assert_eq!(c.name(), "int8/256");
    c.top_k = Some(0.01);
    c.error_feedback = true;
    assert_eq!(c.name(), "top0.01+int8/256+ef");
    assert!(c.is_lossy());
}

#[test]
fn settings_are_checked_naming_the_field() {
    let bad = [
        Compression {
            top_k: Some(0.0),
            ..Compression::NONE
        },
        Compression {
            top_k: Some(1.5),
            ..Compression::NONE
        },
        Compression {
            values: ValueCodec::Int8,
            block_size: 0,
            ..Compression::NONE
        },
        Compression {
            error_feedback: true,
            ..Compression::NONE
        },
    ];
    for (c, field) in bad
        .iter()
        .zip(["top_k", "top_k", "block_size", "error_feedback"])
    {
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains(&format!("compression.{field}")), "{e}");
    }
}

#[test]
fn each_codec_decodes_within_its_resolution() {
    let u = update(wave(64, 0.3), wave(5, 1.1));
    for c in modes() {
        let enc = encode(&u, &c, None).unwrap();
        let dec = decode_bytes(&enc.bytes, &u.spec(), &c).unwrap();
        assert_eq!(dec.l2_norm().unwrap(), enc.norm, "{}", c.name());
        for name in ["layer.weight", "layer.bias"] {
            let x = values(&u, name);
            let y = values(&dec, name);
            let k = c.kept(x.len());
            let sent = y.iter().filter(|v| **v != 0.0).count();
            assert!(sent <= k, "{}: {sent} values sent, at most {k}", c.name());
            let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in x.iter().zip(&y) {
                if *b == 0.0 && c.top_k.is_some() {
                    continue;
                }
                let tol = match c.values {
                    ValueCodec::F32 => 0.0,
                    ValueCodec::F16 => a.abs() * 2f32.powi(-11) + 6e-8,
                    ValueCodec::Bf16 => a.abs() * 2f32.powi(-8),
                    // Half a step of the largest block scale.
                    ValueCodec::Int8 => max / 127.0 / 2.0 * 1.0001,
                };
                assert!((a - b).abs() <= tol, "{}: {a} decoded as {b}", c.name());
            }
            if c.top_k.is_some() {
                // What was kept are the largest magnitudes.
                let smallest_kept = x
                    .iter()
                    .zip(&y)
                    .filter(|(_, b)| **b != 0.0)
                    .fold(f32::INFINITY, |m, (a, _)| m.min(a.abs()));
                let dropped_above = x
                    .iter()
                    .zip(&y)
                    .filter(|(a, b)| **b == 0.0 && a.abs() > smallest_kept)
                    .count();
                assert_eq!(dropped_above, 0, "{}", c.name());
            }
        }
        // Error feedback's residual is exactly what was not decoded.
        let r = enc.residual().unwrap();
        let back = ParamSet::apply_delta(&enc.decoded, &r, 1.0).unwrap();
        for name in ["layer.weight", "layer.bias"] {
            for (a, b) in values(&back, name).iter().zip(values(&enc.input, name)) {
                assert!((a - b).abs() <= b.abs() * 1e-6 + 1e-12);
            }
        }
    }
}

#[test]
fn payloads_shrink_as_configured() {
    let u = update(wave(4000, 0.1), wave(100, 0.2));
    let spec = u.spec();
    let plain = Compression::NONE.payload_bytes(&spec).unwrap();
    let ratio = |c: Compression| plain as f64 / c.payload_bytes(&spec).unwrap() as f64;
    let f16 = Compression {
        values: ValueCodec::F16,
        ..Compression::NONE
    };
    assert_eq!(ratio(f16), 2.0);
    let int8 = Compression {
        values: ValueCodec::Int8,
        ..Compression::NONE
    };
    assert!(ratio(int8) > 3.9, "{}", ratio(int8));
    let top = Compression {
        values: ValueCodec::Int8,
        top_k: Some(0.01),
        ..Compression::NONE
    };
    assert!(ratio(top) > 70.0, "{}", ratio(top));
    // The real bytes are the payload plus a header, exactly as sized in advance.
    for c in [Compression::NONE, f16, int8, top] {
        let enc = encode(&u, &c, None).unwrap();
        assert!(enc.bytes.len() as u64 > c.payload_bytes(&spec).unwrap());
        assert_eq!(
            enc.bytes.len() as u64,
            c.update_bytes(&spec).unwrap(),
            "{}",
            c.name()
        );
    }
}

#[test]
fn the_same_update_gives_the_same_bytes() {
    let u = update(wave(64, 0.3), wave(5, 1.1));
    for c in modes() {
        assert_eq!(
            encode(&u, &c, Some(0.05)).unwrap().bytes,
            encode(&u, &c, Some(0.05)).unwrap().bytes
        );
    }
}

#[test]
fn uncompressed_is_plain_safetensors() {
    let u = update(wave(8, 0.3), wave(2, 1.1));
    let enc = encode(&u, &Compression::NONE, None).unwrap();
    assert_eq!(enc.bytes, u.to_safetensors_bytes().unwrap());
}

/// Writes `tensors` as a compressed update (for hand-made, hostile ones).
fn raw(tensors: Vec<(&str, Tensor)>) -> ParamSet {
    ParamSet::from_tensors(
        tensors
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect(),
    )
    .unwrap()
}

fn topk_int8() -> Compression {
    Compression {
        values: ValueCodec::Int8,
        block_size: 4,
        top_k: Some(0.5),
        error_feedback: false,
    }
}

/// A one-tensor spec of 8 values and a valid top-k int8 update of it.
fn small() -> (ParamSpec, Vec<(&'static str, Tensor)>) {
    let cpu = &Device::Cpu;
    let mut t = BTreeMap::new();
    t.insert(
        "w".to_string(),
        Tensor::zeros(8, candle_core::DType::F32, cpu).unwrap(),
    );
    let spec = ParamSet::from_tensors(t).unwrap().spec();
    let parts = vec![
        (
            "w#index",
            Tensor::from_vec(vec![0u32, 2, 5, 7], 4, cpu).unwrap(),
        ),
        (
            "w#q",
            Tensor::from_vec(vec![1u8, 2, 255, 50], 4, cpu).unwrap(),
        ),
        ("w#scale", Tensor::from_vec(vec![0.01f32], 1, cpu).unwrap()),
    ];
    (spec, parts)
}

#[test]
fn hostile_updates_are_refused_before_anything_is_added() {
    let cpu = &Device::Cpu;
    let (spec, parts) = small();
    let c = topk_int8();
    let acc = || {
        FedAvgAccumulator::new(&spec)
            .unwrap()
            .with_norm_bound(NormBound::Refuse(1.0))
            .with_compression(c)
            .unwrap()
    };
    // The valid one decodes as scale · q at the indices.
    let mut a = acc();
    a.add(&raw(parts.clone()), 1.0).unwrap();
    let mean = a.finish().unwrap();
    let w = values(&mean, "w");
    assert_eq!(
        w,
        vec![0.01, 0.0, 0.02, 0.0, 0.0, -0.01, 0.0, 0.01f32 * 50.0]
    );

    let with = |name: &str, t: Tensor| {
        let mut p = parts.clone();
        for e in p.iter_mut() {
            if e.0 == name {
                e.1 = t.clone();
            }
        }
        raw(p)
    };
    let cases = [
        (
            with(
                "w#index",
                Tensor::from_vec(vec![0u32, 5, 2, 7], 4, cpu).unwrap(),
            ),
            "not above the one before",
        ),
        (
            with(
                "w#index",
                Tensor::from_vec(vec![0u32, 2, 2, 7], 4, cpu).unwrap(),
            ),
            "not above the one before",
        ),
        (
            with(
                "w#index",
                Tensor::from_vec(vec![0u32, 2, 5, 8], 4, cpu).unwrap(),
            ),
            "out of range",
        ),
        (
            with("w#scale", Tensor::from_vec(vec![f32::NAN], 1, cpu).unwrap()),
            "non-finite",
        ),
        // A large scale: the decoded norm is far above the bound.
        (
            with("w#scale", Tensor::from_vec(vec![1e3f32], 1, cpu).unwrap()),
            "exceeds the bound",
        ),
        // Too many values kept.
        (
            with(
                "w#q",
                Tensor::from_vec(vec![1u8, 2, 3, 4, 5], 5, cpu).unwrap(),
            ),
            "w#q",
        ),
        // A plain f32 update where a compressed one is expected.
        (
            raw(vec![(
                "w",
                Tensor::zeros(8, candle_core::DType::F32, cpu).unwrap(),
            )]),
            "top0.5+int8/4",
        ),
    ];
    for (bad, why) in cases {
        let mut a = acc();
        let e = a.add(&bad, 1.0).unwrap_err().to_string();
        assert!(e.contains(why), "{why}: {e}");
        assert_eq!(a.count(), 0);
    }
    // Under a clipping bound the large-scale update is scaled to the bound instead.
    let mut a = FedAvgAccumulator::new(&spec)
        .unwrap()
        .with_norm_bound(NormBound::Clip(1.0))
        .with_compression(c)
        .unwrap();
    let big = with("w#scale", Tensor::from_vec(vec![1e3f32], 1, cpu).unwrap());
    let added = a.add(&big, 1.0).unwrap();
    assert!(added.clipped());
    assert!(a.finish().unwrap().l2_norm().unwrap() <= 1.0 + 1e-6);
}

#[test]
fn a_nan_in_half_precision_is_refused() {
    let cpu = &Device::Cpu;
    let (spec, _) = small();
    let c = Compression {
        values: ValueCodec::F16,
        ..Compression::NONE
    };
    let mut a = FedAvgAccumulator::new(&spec)
        .unwrap()
        .with_compression(c)
        .unwrap();
    let v = vec![
        half::f16::from_f32(0.5),
        half::f16::NAN,
        half::f16::ZERO,
        half::f16::ZERO,
    ];
    let bad = raw(vec![(
        "w",
        Tensor::from_vec([v.clone(), v].concat(), 8, cpu).unwrap(),
    )]);
    let e = a.add(&bad, 1.0).unwrap_err().to_string();
    assert!(e.contains("`w` holds 2 non-finite"), "{e}");
}

#[test]
fn a_file_and_memory_give_the_same_sum_and_robust_rules_decode_too() {
    let dir = tempfile::tempdir().unwrap();
    let u = update(wave(64, 0.3), wave(5, 1.1));
    let spec = u.spec();
    for c in modes() {
        let enc = encode(&u, &c, Some(0.05)).unwrap();
        let path = dir.path().join("update.safetensors");
        std::fs::write(&path, &enc.bytes).unwrap();
        let parsed = ParamSet::from_safetensors_bytes(&enc.bytes).unwrap();
        let mut from_file = FedAvgAccumulator::new(&spec)
            .unwrap()
            .with_compression(c)
            .unwrap();
        let mut from_memory = FedAvgAccumulator::new(&spec)
            .unwrap()
            .with_compression(c)
            .unwrap();
        let a = from_file.add_safetensors_file(&path, 3.0).unwrap();
        let b = from_memory.add(&parsed, 3.0).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.norm, enc.norm);
        let (x, y) = (from_file.finish().unwrap(), from_memory.finish().unwrap());
        assert_eq!(
            x.to_safetensors_bytes().unwrap(),
            y.to_safetensors_bytes().unwrap()
        );
        assert_eq!(
            x.to_safetensors_bytes().unwrap(),
            enc.decoded.to_safetensors_bytes().unwrap(),
            "{}: one update's mean is its decoded self",
            c.name()
        );
        // The median of one decoded update is that update.
        let mut robust = RobustAccumulator::new(&spec, RobustRule::Median, dir.path())
            .unwrap()
            .with_compression(c)
            .unwrap();
        robust.add_safetensors_file(&path, 1.0).unwrap();
        assert_eq!(
            robust.finish().unwrap().to_safetensors_bytes().unwrap(),
            enc.decoded.to_safetensors_bytes().unwrap(),
            "{}",
            c.name()
        );
    }
}

fn any_mode() -> impl Strategy<Value = Compression> {
    (
        prop_oneof![
            Just(ValueCodec::F32),
            Just(ValueCodec::F16),
            Just(ValueCodec::Bf16),
            Just(ValueCodec::Int8)
        ],
        prop_oneof![Just(None), (0.001f64..1.0).prop_map(Some)],
        1usize..64,
    )
        .prop_filter_map("lossy", |(values, top_k, block_size)| {
            let c = Compression {
                values,
                block_size,
                top_k,
                error_feedback: false,
            };
            c.is_lossy().then_some(c)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Whatever the codec and the update, the coordinator accepts a site's compressed update
    /// under a refusing bound C, and the one update moves the mean by at most C: the
    /// sensitivity site-level DP accounts for holds for what is summed.
    #[test]
    fn a_compressed_update_never_moves_the_model_beyond_the_bound(
        c in any_mode(),
        a in proptest::collection::vec(-1e3f32..1e3, 4..200),
        b in proptest::collection::vec(-1e3f32..1e3, 1..20),
        clip in 1e-3f64..10.0,
    ) {
        let u = update(a, b);
        let enc = encode(&u, &c, Some(clip)).unwrap();
        prop_assert!(enc.norm <= clip);
        let mut acc = FedAvgAccumulator::new(&u.spec())
            .unwrap()
            .with_norm_bound(NormBound::Refuse(clip))
            .with_compression(c)
            .unwrap();
        let parsed = ParamSet::from_safetensors_bytes(&enc.bytes).unwrap();
        let added = acc.add(&parsed, 7.0).unwrap();
        prop_assert_eq!(added.scale, 1.0);
        prop_assert!(added.norm <= clip);
        // The mean of one update is that update, rounded once to f32.
        let moved = acc.finish().unwrap().l2_norm().unwrap();
        prop_assert!(moved <= clip, "{} > {}", moved, clip);
    }
}
