//! ParamSet tests: safetensors round trips, hashing, deltas, clipping, validation.

use super::*;
use anyhow::Result;
use candle_nn::Init;

fn t(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
}

fn set(entries: &[(&str, Tensor)]) -> ParamSet {
    ParamSet::from_tensors(
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
    .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn sample() -> ParamSet {
    set(&[
        (
            "encoder.lstm.weight_ih_l0",
            t(&[1.0, -2.0, 3.5, 0.25, -0.0, 7.0], &[2, 3]),
        ),
        ("head.bias", t(&[0.5, -1.5], &[2])),
    ])
}

fn mismatch_message(r: crate::Result<()>) -> String {
    match r {
        Err(Error::ParamMismatch(msg)) => msg,
        other => panic!("expected a parameter mismatch, got {other:?}"),
    }
}

#[test]
fn safetensors_round_trip_is_bitwise() -> Result<()> {
    // Awkward values on purpose: signed zero, subnormal, extremes, a NaN with a payload.
    let awkward = [
        -0.0,
        f32::from_bits(1),
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::from_bits(0x7fc0_1234),
        0.1,
    ];
    let p = set(&[
        ("a", t(&awkward, &[2, 2, 2])),
        ("b", Tensor::new(&[1.5f64, -2.25], &Device::Cpu)?),
        ("c", Tensor::new(3.0f32, &Device::Cpu)?),
    ]);
    let bytes = p.to_safetensors_bytes()?;
    let q = ParamSet::from_safetensors_bytes(&bytes)?;
    assert_eq!(q.spec(), p.spec());
    assert_eq!(bits(q.get("a").unwrap()), bits(p.get("a").unwrap()));
    assert_eq!(q.get("b").unwrap().to_vec1::<f64>()?, vec![1.5f64, -2.25]);
    assert_eq!(q.get("c").unwrap().dims(), &[] as &[usize]);
    assert_eq!(q.to_safetensors_bytes()?, bytes);
    Ok(())
}

#[test]
fn serialisation_is_deterministic() -> Result<()> {
    let p = sample();
    // Same content built in a different insertion order, from fresh tensors.
    let q = set(&[
        ("head.bias", t(&[0.5, -1.5], &[2])),
        (
            "encoder.lstm.weight_ih_l0",
            t(&[1.0, -2.0, 3.5, 0.25, -0.0, 7.0], &[2, 3]),
        ),
    ]);
    assert_eq!(p.to_safetensors_bytes()?, q.to_safetensors_bytes()?);
    assert_eq!(p.sha256_hex()?, q.sha256_hex()?);
    let h = p.sha256_hex()?;
    assert_eq!(h.len(), 64);
    assert!(
        h.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    let r = set(&[
        ("head.bias", t(&[0.5, -1.5], &[2])),
        (
            "encoder.lstm.weight_ih_l0",
            t(&[1.0, -2.0, 3.5, 0.25, 0.0, 7.0], &[2, 3]),
        ),
    ]);
    assert_ne!(
        p.sha256_hex()?,
        r.sha256_hex()?,
        "-0.0 and 0.0 differ in bits"
    );
    Ok(())
}

#[test]
fn streamed_serialisation_matches_the_safetensors_crate_byte_for_byte() -> Result<()> {
    // Mixed dtypes (the file orders them by dtype, then name), a non-contiguous view, a
    // narrowed view with an offset, a scalar, an empty tensor and more values than one
    // write block.
    let big: Vec<f32> = (0..40_000).map(|i| (i as f32).sin() * 1e3).collect();
    let wide = Tensor::from_vec(
        (0..12).map(|i| i as f64 * 0.5).collect::<Vec<_>>(),
        (3, 4),
        &Device::Cpu,
    )?;
    let p = set(&[
        ("a.big", t(&big, &[200, 200])),
        (
            "b.transposed",
            t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).t()?,
        ),
        ("c.narrowed", wide.narrow(1, 1, 2)?),
        ("d.f64", wide.clone()),
        ("e.half", t(&[0.5, -2.0, 3.0], &[3]).to_dtype(DType::F16)?),
        ("f.ints", Tensor::new(&[3i64, -4, 5], &Device::Cpu)?),
        ("g.scalar", Tensor::new(2.5f32, &Device::Cpu)?),
        ("h.empty", Tensor::zeros((0, 3), DType::F32, &Device::Cpu)?),
        ("i.bytes", Tensor::new(&[1u8, 2, 255], &Device::Cpu)?),
    ]);
    let mut streamed = Vec::new();
    let n = p.write_safetensors(&mut streamed)?;
    let whole = p.to_safetensors_bytes()?;
    assert_eq!(n, whole.len() as u64);
    assert!(streamed == whole, "streamed bytes differ from the crate's");
    assert_eq!(p.sha256_hex()?, crate::hash::sha256_hex(&whole));
    // `save` writes the same bytes and reports their size and hash.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    let (size, sha) = p.save(&path)?;
    assert_eq!(std::fs::read(&path).unwrap(), whole);
    assert_eq!((size, sha.clone()), (n, crate::hash::sha256_hex(&whole)));
    // `load_hashed` reads it back bit for bit, with the same size and hash.
    let (q, qsize, qsha) = ParamSet::load_hashed(&path)?;
    assert_eq!((qsize, qsha), (size, sha));
    assert!(q.to_safetensors_bytes()? == whole);
    // Trailing bytes are hashed too; a truncated file is an error.
    let mut longer = whole.clone();
    longer.extend_from_slice(b"tail");
    std::fs::write(&path, &longer).unwrap();
    let (_, lsize, lsha) = ParamSet::load_hashed(&path)?;
    assert_eq!(
        (lsize, lsha),
        (longer.len() as u64, crate::hash::sha256_hex(&longer))
    );
    std::fs::write(&path, &whole[..whole.len() - 3]).unwrap();
    assert!(ParamSet::load_hashed(&path).is_err());
    Ok(())
}

#[test]
fn non_contiguous_tensors_serialise_in_logical_order() -> Result<()> {
    let m = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).t()?;
    assert!(!m.is_contiguous());
    let p = set(&[("m", m)]);
    let q = ParamSet::from_safetensors_bytes(&p.to_safetensors_bytes()?)?;
    assert_eq!(q.get("m").unwrap().dims(), &[3, 2]);
    assert_eq!(
        values(q.get("m").unwrap()),
        vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
    );
    assert_eq!(p.l2_norm()?, 91f64.sqrt());
    Ok(())
}

#[test]
fn garbage_and_truncated_bytes_are_errors() -> Result<()> {
    let good = sample().to_safetensors_bytes()?;
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![1, 2, 3],
        b"definitely not safetensors at all".to_vec(),
        u64::MAX.to_le_bytes().to_vec(),
        good[..good.len() - 1].to_vec(),
        good[..good.len() / 2].to_vec(),
        good[..8].to_vec(),
        [good.as_slice(), &[0]].concat(),
    ];
    // A header claiming more data than there is.
    let header = br#"{"x":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}"#;
    let mut lying = (header.len() as u64).to_le_bytes().to_vec();
    lying.extend_from_slice(header);
    lying.extend_from_slice(&[0; 16]);
    cases.push(lying);
    for bytes in cases {
        match ParamSet::from_safetensors_bytes(&bytes) {
            Err(Error::Safetensors(msg)) => {
                assert!(msg.contains("not a valid safetensors file"), "{msg}")
            }
            other => panic!(
                "{} bytes: expected a safetensors error, got {other:?}",
                bytes.len()
            ),
        }
    }
    Ok(())
}

fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn unsupported_names_and_dtypes_are_rejected_without_panic() {
    let sub_byte = raw_safetensors(
        r#"{"x":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#,
        &[0x12],
    );
    assert!(ParamSet::from_safetensors_bytes(&sub_byte).is_err());
    let empty_name = raw_safetensors(
        r#"{"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    let msg = mismatch_message(ParamSet::from_safetensors_bytes(&empty_name).map(|_| ()));
    assert!(msg.contains("invalid tensor name"), "{msg}");
    let reserved = BTreeMap::from([(METADATA_KEY.to_string(), t(&[1.0], &[1]))]);
    assert!(ParamSet::from_tensors(reserved).is_err());
}

#[test]
fn save_and_load_round_trip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("global.safetensors");
    let p = sample();
    p.save(&path)?;
    // Overwriting goes through a fresh temporary file and leaves none behind.
    p.scale(2.0)?.save(&path)?;
    p.save(&path)?;
    let q = ParamSet::load(&path)?;
    assert_eq!(q.to_safetensors_bytes()?, p.to_safetensors_bytes()?);
    let names: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["global.safetensors"]);

    let missing = dir.path().join("nope.safetensors");
    assert!(matches!(ParamSet::load(&missing), Err(Error::Io { .. })));
    std::fs::write(&missing, b"junk")?;
    match ParamSet::load(&missing) {
        Err(Error::Safetensors(msg)) => assert!(msg.contains("nope.safetensors"), "{msg}"),
        other => panic!("expected a safetensors error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn varmap_round_trip_copies_and_checks_names() -> Result<()> {
    let mut vm = VarMap::new();
    let dev = Device::Cpu;
    vm.get((2, 3), "enc.w", Init::Const(1.0), DType::F32, &dev)?;
    vm.get(2, "enc.b", Init::Const(0.0), DType::F32, &dev)?;
    let p = ParamSet::from_varmap(&vm)?;
    assert_eq!(p.names().collect::<Vec<_>>(), vec!["enc.b", "enc.w"]);
    assert_eq!(p.num_elements(), 8);

    // Changing the model afterwards must not change the snapshot.
    vm.set_one("enc.w", Tensor::zeros((2, 3), DType::F32, &dev)?)?;
    assert_eq!(values(p.get("enc.w").unwrap()), vec![1.0; 6]);

    p.load_into_varmap(&vm)?;
    assert_eq!(
        ParamSet::from_varmap(&vm)?.to_safetensors_bytes()?,
        p.to_safetensors_bytes()?
    );

    // Missing, extra and reshaped tensors are all listed, and nothing is changed.
    let before = ParamSet::from_varmap(&vm)?.to_safetensors_bytes()?;
    let wrong = set(&[("enc.w", t(&[9.0; 6], &[3, 2])), ("dec.w", t(&[9.0], &[1]))]);
    let msg = mismatch_message(wrong.load_into_varmap(&vm));
    assert!(msg.contains("missing: `enc.b`"), "{msg}");
    assert!(msg.contains("unexpected tensor(s): `dec.w`"), "{msg}");
    assert!(
        msg.contains("`enc.w` is f32[3, 2], expected f32[2, 3]"),
        "{msg}"
    );
    assert_eq!(ParamSet::from_varmap(&vm)?.to_safetensors_bytes()?, before);

    let wrong_dtype = set(&[
        ("enc.w", Tensor::ones((2, 3), DType::F64, &dev)?),
        ("enc.b", t(&[0.0; 2], &[2])),
    ]);
    let msg = mismatch_message(wrong_dtype.load_into_varmap(&vm));
    assert!(
        msg.contains("`enc.w` is f64[2, 3], expected f32[2, 3]"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn validate_reports_structure_then_non_finite() {
    let p = sample();
    let spec = p.spec();
    assert!(p.validate_against(&spec).is_ok());
    assert_eq!(spec.num_elements(), 8);

    let bad = set(&[
        (
            "encoder.lstm.weight_ih_l0",
            t(
                &[1.0, f32::NAN, 3.5, f32::INFINITY, 0.0, f32::NEG_INFINITY],
                &[2, 3],
            ),
        ),
        ("head.bias", t(&[f32::NAN, 0.0], &[2])),
    ]);
    match bad.validate_against(&spec) {
        Err(Error::NonFinite { name, count }) => {
            assert_eq!(name, "encoder.lstm.weight_ih_l0");
            assert_eq!(count, 3);
        }
        other => panic!("expected non-finite, got {other:?}"),
    }

    // Structure problems are reported before values are read.
    let wrong = set(&[("head.bias", t(&[f32::NAN, 0.0], &[2]))]);
    let msg = mismatch_message(wrong.validate_against(&spec));
    assert!(
        msg.contains("1 tensor(s) missing: `encoder.lstm.weight_ih_l0`"),
        "{msg}"
    );
}

#[test]
fn long_mismatch_lists_are_summarised() {
    let spec = ParamSpec::new(
        (0..25)
            .map(|i| {
                let s = TensorSpec {
                    shape: vec![1],
                    dtype: DType::F32,
                };
                (format!("p{i:02}"), s)
            })
            .collect(),
    );
    let msg = mismatch_message(spec.check_structure(&ParamSet::default()));
    assert!(
        msg.starts_with("25 tensor(s) missing: `p00`, `p01`"),
        "{msg}"
    );
    assert!(msg.ends_with("`p09` and 15 more"), "{msg}");
}

#[test]
fn delta_and_apply_delta_invert_each_other() -> Result<()> {
    let global = sample();
    let local = set(&[
        (
            "encoder.lstm.weight_ih_l0",
            t(&[1.5, -2.0, 3.0, 0.75, 1.0, 7.0], &[2, 3]),
        ),
        ("head.bias", t(&[0.0, -1.0], &[2])),
    ]);
    let d = ParamSet::delta(&local, &global)?;
    assert_eq!(
        values(d.get("encoder.lstm.weight_ih_l0").unwrap()),
        vec![0.5, 0.0, -0.5, 0.5, 1.0, 0.0]
    );
    assert_eq!(values(d.get("head.bias").unwrap()), vec![-0.5, 0.5]);
    // These values are exact in f32, so the round trip is too.
    let back = ParamSet::apply_delta(&global, &d, 1.0)?;
    assert_eq!(back.to_safetensors_bytes()?, local.to_safetensors_bytes()?);
    let half = ParamSet::apply_delta(&global, &d, 0.5)?;
    assert_eq!(values(half.get("head.bias").unwrap()), vec![0.25, -1.25]);

    let other = set(&[("head.bias", t(&[0.0, 0.0], &[2]))]);
    let msg = mismatch_message(ParamSet::delta(&other, &global).map(|_| ()));
    assert!(
        msg.contains("missing: `encoder.lstm.weight_ih_l0`"),
        "{msg}"
    );
    let msg = mismatch_message(ParamSet::apply_delta(&global, &other, 1.0).map(|_| ()));
    assert!(
        msg.contains("missing: `encoder.lstm.weight_ih_l0`"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn l2_norm_scale_and_clip() -> Result<()> {
    let p = set(&[("a", t(&[3.0, 0.0], &[2])), ("b", t(&[4.0], &[1]))]);
    assert_eq!(p.l2_norm()?, 5.0);
    assert_eq!(values(p.scale(2.0)?.get("a").unwrap()), vec![6.0, 0.0]);

    // Within the bound: unchanged, bit for bit.
    let (same, norm) = p.clip_to_norm(5.0)?;
    assert_eq!(norm, 5.0);
    assert_eq!(same.to_safetensors_bytes()?, p.to_safetensors_bytes()?);

    let (clipped, norm) = p.clip_to_norm(1.0)?;
    assert_eq!(norm, 5.0);
    assert!(clipped.l2_norm()? <= 1.0);
    assert!((clipped.l2_norm()? - 1.0).abs() < 1e-6);
    assert!((values(clipped.get("a").unwrap())[0] - 0.6).abs() < 1e-7);

    // The zero update has norm 0 and must not divide by it.
    let zero = set(&[("a", t(&[0.0, -0.0], &[2]))]);
    let (z, n) = zero.clip_to_norm(1.0)?;
    assert_eq!(n, 0.0);
    assert_eq!(z.to_safetensors_bytes()?, zero.to_safetensors_bytes()?);

    // Bad bounds and non-finite values.
    for c in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(p.clip_to_norm(c), Err(Error::Aggregation(_))),
            "c = {c}"
        );
    }
    let nan = set(&[("a", t(&[1.0, f32::NAN], &[2]))]);
    assert!(matches!(
        nan.clip_to_norm(1.0),
        Err(Error::NonFinite { count: 1, .. })
    ));
    Ok(())
}

#[test]
fn clip_bound_holds_after_rounding() -> Result<()> {
    // Many awkward values and bounds: the clipped norm must never exceed the bound.
    let vals: Vec<f32> = (0..997)
        .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
        .collect();
    let p = set(&[("w", t(&vals, &[997]))]);
    for c in [0.1, 0.3, 1.0 / 3.0, 1.7, 2.9, 10.0, 99.9] {
        let (clipped, norm) = p.clip_to_norm(c)?;
        assert!(norm > c);
        let n = clipped.l2_norm()?;
        assert!(
            n <= c && n > c * (1.0 - 1e-6),
            "c = {c}, clipped norm = {n}"
        );
    }
    Ok(())
}

#[test]
fn debug_lists_specs_not_values() {
    let s = format!("{:?}", sample());
    assert!(s.contains("\"head.bias\": f32[2]"), "{s}");
    assert!(!s.contains("0.5"), "{s}");
}
