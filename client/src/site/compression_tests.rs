//! SiteTrainer with compressed updates: what is sent decodes to what the trainer reports,
//! stays within the site-level bound, and error feedback's residual carries over rounds and
//! restarts.

use fedflow_common::compress::{Compression, ValueCodec, decode_bytes};
use fedflow_common::privacy::dpfedavg::{SiteDpTask, TrustMode};

use super::tests::support::*;
use super::*;

fn compressed(f: &Fixture, values: ValueCodec, top_k: Option<f64>, ef: bool) -> TaskSpec {
    TaskSpec {
        compression: Compression {
            values,
            block_size: 32,
            top_k,
            error_feedback: ef,
        },
        ..f.task.clone()
    }
}

fn next(task: &TaskSpec, n: u64) -> TaskSpec {
    TaskSpec {
        task_id: format!("{}-next-{n}", task.task_id),
        round: task.round + n,
        ..task.clone()
    }
}

#[test]
fn what_is_sent_decodes_to_the_reported_delta_and_is_smaller() {
    let f = fixture();
    let plain = f
        .site
        .train_task(&f.task, &f.global_bytes, &mut |_| {})
        .unwrap();
    for (values, top_k, factor) in [
        (ValueCodec::F16, None, 2.0),
        (ValueCodec::Int8, None, 3.5),
        (ValueCodec::Int8, Some(0.05), 8.0),
    ] {
        let task = compressed(&f, values, top_k, false);
        let out = f
            .site
            .train_task(&task, &f.global_bytes, &mut |_| {})
            .unwrap();
        assert_eq!(out.delta_sha256, sha256_hex(&out.delta_bytes));
        let decoded = decode_bytes(&out.delta_bytes, &f.global.spec(), &task.compression).unwrap();
        assert_eq!(
            decoded.to_safetensors_bytes().unwrap(),
            out.delta.to_safetensors_bytes().unwrap(),
            "{}",
            task.compression.name()
        );
        // Exactly the size the coordinator expects; the payload (this tiny model's header
        // is a large part of its bytes) shrinks by the codec's factor.
        let spec = f.global.spec();
        let c = &task.compression;
        assert_eq!(out.delta_bytes.len() as u64, c.update_bytes(&spec).unwrap());
        assert!(out.delta_bytes.len() < plain.delta_bytes.len());
        let ratio = Compression::NONE.payload_bytes(&spec).unwrap() as f64
            / c.payload_bytes(&spec).unwrap() as f64;
        assert!(ratio >= factor, "{}: {ratio}", c.name());
        // Close to the uncompressed delta where it sent values (training is deterministic).
        let err = ParamSet::delta(&out.delta, &plain.delta)
            .unwrap()
            .l2_norm()
            .unwrap();
        let norm = plain.delta.l2_norm().unwrap();
        let limit = if top_k.is_some() { 1.0 } else { 0.05 };
        assert!(
            err < limit * norm,
            "{}: {err} vs {norm}",
            task.compression.name()
        );
    }
}

#[test]
fn under_site_level_dp_the_decoded_update_is_within_what_the_coordinator_accepts() {
    let f = fixture();
    let plain = f
        .site
        .train_task(&f.task, &f.global_bytes, &mut |_| {})
        .unwrap();
    let clip = plain.delta.l2_norm().unwrap() / 3.0;
    let dim = f.global.num_elements();
    for (mode, noise_std) in [(TrustMode::Central, 0.0), (TrustMode::Local, 1e-3)] {
        for values in [ValueCodec::F16, ValueCodec::Bf16, ValueCodec::Int8] {
            let dp = SiteDpTask {
                mode,
                clip_norm: clip,
                noise_std,
            };
            let task = TaskSpec {
                site_dp: Some(dp),
                ..compressed(&f, values, None, true)
            };
            let out = f
                .site
                .train_task(&task, &f.global_bytes, &mut |_| {})
                .unwrap();
            let norm = decode_bytes(&out.delta_bytes, &f.global.spec(), &task.compression)
                .unwrap()
                .l2_norm()
                .unwrap();
            assert!(
                norm <= dp.accepted_norm(dim),
                "{mode} {}: {norm}",
                values.as_str()
            );
            if mode == TrustMode::Central {
                // Clipped onto the bound, not far inside it.
                assert!(norm > clip * 0.99, "{norm} vs {clip}");
            }
        }
    }
}

#[test]
fn error_feedback_sends_later_what_top_k_left_out_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture();
    let first = compressed(&f, ValueCodec::F32, Some(0.02), true);
    let second = next(&first, 1);
    let site = |f: &Fixture| {
        SiteTrainer::new((*f.site.dataset()).clone(), &f.vocab, Device::Cpu)
            .with_state_dir(dir.path())
            .unwrap()
    };
    let a = site(&f);
    let out1 = a.train_task(&first, &f.global_bytes, &mut |_| {}).unwrap();
    assert!(dir.path().join(feedback::FEEDBACK_FILE).exists());
    // Not accepted yet: the next task starts without the residual, as a fresh site does.
    let no_feedback = compressed(&f, ValueCodec::F32, Some(0.02), false);
    let fresh = f
        .site
        .train_task(&next(&no_feedback, 1), &f.global_bytes, &mut |_| {})
        .unwrap();
    let unaccepted = a.train_task(&second, &f.global_bytes, &mut |_| {}).unwrap();
    assert_eq!(unaccepted.delta_bytes, fresh.delta_bytes);
    // Accepted: the next task adds the residual, so it sends other values.
    a.accepted(&first).unwrap();
    // The same task again after a crash starts from the same residual as before.
    let redo = a.train_task(&first, &f.global_bytes, &mut |_| {}).unwrap();
    assert_eq!(redo.delta_bytes, out1.delta_bytes);
    a.accepted(&first).unwrap();
    let with_residual = a.train_task(&second, &f.global_bytes, &mut |_| {}).unwrap();
    assert_ne!(with_residual.delta_bytes, fresh.delta_bytes);
    // A restarted site (same state directory) sends exactly the same.
    drop(a);
    let b = site(&f);
    let restarted = b.train_task(&second, &f.global_bytes, &mut |_| {}).unwrap();
    assert_eq!(restarted.delta_bytes, with_residual.delta_bytes);
    // What the two rounds sent adds up to more of the uncompressed deltas than without
    // feedback: the residual of round one was sent in round two.
    let plain = f
        .site
        .train_task(&f.task, &f.global_bytes, &mut |_| {})
        .unwrap();
    let total =
        |x: &TaskOutcome, y: &TaskOutcome| ParamSet::apply_delta(&x.delta, &y.delta, 1.0).unwrap();
    let target = ParamSet::apply_delta(&plain.delta, &plain.delta, 1.0).unwrap();
    let miss = |s: &ParamSet| ParamSet::delta(&target, s).unwrap().l2_norm().unwrap();
    assert!(
        miss(&total(&out1, &restarted)) < miss(&total(&out1, &fresh)),
        "{} vs {}",
        miss(&total(&out1, &restarted)),
        miss(&total(&out1, &fresh))
    );
    // Another run starts without a residual.
    let other_run = TaskSpec {
        run_id: "another-run".into(),
        ..second.clone()
    };
    let other = b
        .train_task(&other_run, &f.global_bytes, &mut |_| {})
        .unwrap();
    assert_eq!(other.delta_bytes, fresh.delta_bytes);
}

#[test]
fn a_damaged_residual_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(feedback::FEEDBACK_FILE), b"not safetensors").unwrap();
    let f = fixture();
    let e = SiteTrainer::new((*f.site.dataset()).clone(), &f.vocab, Device::Cpu)
        .with_state_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains(feedback::FEEDBACK_FILE), "{e}");
}

#[test]
fn a_dp_sgd_update_is_recorded_compressed_and_a_retry_resends_it_decoded_alike() {
    use crate::privacy::{RecordDp, SitePrivacy};
    use fedflow_common::train::DpSgdConfig;
    let dir = tempfile::tempdir().unwrap();
    let f = fixture();
    let privacy = SitePrivacy::open(dir.path(), 50.0, 1e-5, false).unwrap();
    let site = SiteTrainer::new((*f.site.dataset()).clone(), &f.vocab, Device::Cpu)
        .with_privacy(std::sync::Arc::new(privacy));
    let task = TaskSpec {
        record_dp: Some(RecordDp {
            sgd: DpSgdConfig {
                expected_batch_size: 16,
                ..DpSgdConfig::default()
            },
            target_epsilon: 50.0,
            target_delta: 1e-5,
            count_noise_multiplier: 0.0,
        }),
        ..compressed(&f, ValueCodec::Int8, Some(0.1), true)
    };
    let first = site
        .train_task(&task, &f.global_bytes, &mut |_| {})
        .unwrap();
    let spec = f.global.spec();
    assert_eq!(
        first.delta_bytes.len() as u64,
        task.compression.update_bytes(&spec).unwrap()
    );
    // The ledger holds what was sent: the compressed bytes.
    let (entry, bytes) = crate::ledger::Ledger::open(dir.path())
        .unwrap()
        .find(&task.run_id, task.round, &task.task_id)
        .unwrap()
        .unwrap();
    assert_eq!(entry.update_sha256, first.delta_sha256);
    assert_eq!(bytes.unwrap(), first.delta_bytes);
    // A retry resends them (no fresh noise) and reports the same decoded update.
    let again = site
        .train_task(&task, &f.global_bytes, &mut |_| {})
        .unwrap();
    assert_eq!(again.delta_bytes, first.delta_bytes);
    assert_eq!(
        again.delta.to_safetensors_bytes().unwrap(),
        first.delta.to_safetensors_bytes().unwrap()
    );
}
