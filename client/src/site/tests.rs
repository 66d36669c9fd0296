//! SiteTrainer tests: the plain path, and the DP path (policies, the ledger protocol,
//! withheld metrics).

pub(super) mod support {
    use super::super::*;
    use fedflow_common::synth::{SynthConfig, generate};

    pub(in crate::site) struct Fixture {
        pub(in crate::site) site: SiteTrainer,
        pub(in crate::site) task: TaskSpec,
        pub(in crate::site) global: ParamSet,
        pub(in crate::site) global_bytes: Vec<u8>,
        pub(in crate::site) vocab: Vocab,
    }

    pub(in crate::site) fn model_config(vocab_size: usize) -> ModelConfig {
        ModelConfig {
            vocab_size,
            embed_dim: 8,
            hidden_size: 16,
            num_layers: 1,
            dropout: 0.1,
            max_seq_len: 24,
            ..ModelConfig::default()
        }
    }

    pub(in crate::site) fn fixture() -> Fixture {
        let fed = generate(&SynthConfig {
            sites: 1,
            total_sessions: 300,
            min_site_sessions: 300,
            max_len: 20,
            with_user_ids: false,
            with_timestamps: false,
            seed: 11,
            ..SynthConfig::default()
        })
        .unwrap();
        let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
        let dataset = SiteDataset::from_records(&fed.sites[0].records, &vocab, 0.2).unwrap();
        let cfg = model_config(vocab.len());
        let global_model = AttentionFlowModel::new(&cfg, &Device::Cpu, 5).unwrap();
        let global = ParamSet::from_varmap(global_model.varmap()).unwrap();
        let global_bytes = global.to_safetensors_bytes().unwrap();
        let task = TaskSpec {
            task_id: "task-1".into(),
            record_dp: None,
            site_dp: None,
            compression: Default::default(),
            run_id: "run-test".into(),
            round: 3,
            model: cfg,
            vocab_sha256: vocab_sha256(&vocab),
            expected_model_sha256: sha256_hex(&global_bytes),
            train: TrainConfig {
                epochs: 2,
                batch_size: 32,
                patience: 1,
                seed: 9,
                ..TrainConfig::default()
            },
        };
        Fixture {
            site: SiteTrainer::new(dataset, &vocab, Device::Cpu),
            task,
            global,
            global_bytes,
            vocab,
        }
    }
}

mod plain {
    use super::super::*;
    use super::support::*;
    use fedflow_common::train::OptimizerKind;

    fn run(f: &Fixture, task: &TaskSpec) -> Result<TaskOutcome> {
        f.site.train_task(task, &f.global_bytes, &mut |_| {})
    }

    fn max_abs_diff(a: &ParamSet, b: &ParamSet) -> f32 {
        a.iter()
            .map(|(name, t)| {
                let u = b.get(name).unwrap();
                t.sub(u)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .fold(0.0, f32::max)
    }

    #[test]
    fn delta_reproduces_local_weights_and_hash_matches_bytes() {
        let f = fixture();
        let mut epochs = 0;
        let out = f
            .site
            .train_task(&f.task, &f.global_bytes, &mut |_| epochs += 1)
            .unwrap();
        assert_eq!(epochs, out.metrics.epochs_run);

        // The same training done by hand gives the local weights.
        let model = AttentionFlowModel::new(&f.task.model, &Device::Cpu, 123).unwrap();
        f.global.load_into_varmap(model.varmap()).unwrap();
        let ds = f.site.dataset();
        train(
            &model,
            &ds.train,
            &ds.validation,
            &f.task.train,
            &mut |_| {},
        )
        .unwrap();
        let local = ParamSet::from_varmap(model.varmap()).unwrap();

        let rebuilt = ParamSet::apply_delta(&f.global, &out.delta, 1.0).unwrap();
        let diff = max_abs_diff(&rebuilt, &local);
        assert!(diff <= 1e-6, "global + delta differs from local by {diff}");
        assert!(out.delta.l2_norm().unwrap() > 0.0);

        assert_eq!(out.delta_sha256, sha256_hex(&out.delta_bytes));
        assert_eq!(out.delta_sha256, out.delta.sha256_hex().unwrap());
        let parsed = ParamSet::from_safetensors_bytes(&out.delta_bytes).unwrap();
        assert_eq!(max_abs_diff(&parsed, &out.delta), 0.0);
    }

    #[test]
    fn metrics_count_the_site_splits() {
        let f = fixture();
        let out = run(&f, &f.task).unwrap();
        let m = &out.metrics;
        let ds = f.site.dataset();
        assert_eq!(m.train_examples, ds.train.len());
        assert_eq!(m.validation_examples, ds.validation.len());
        assert_eq!(m.train_examples + m.validation_examples, 300);
        assert!(m.epochs_run >= 1 && m.epochs_run <= f.task.train.epochs);
        assert!((1..=m.epochs_run).contains(&m.best_epoch));
        assert!(m.train_loss.unwrap().is_finite());
        assert!((0.0..=1.0).contains(&m.validation_accuracy.unwrap()));
        assert!(m.validation_loss.unwrap().is_finite());
        assert!(m.validation_macro_f1.is_some());
        serde_json::to_string(m).unwrap();

        let eval = f.site.evaluate_task(&f.task, &f.global_bytes).unwrap();
        assert_eq!(eval.train_examples, ds.train.len());
        assert_eq!(eval.validation_examples, ds.validation.len());
        assert_eq!((eval.epochs_run, eval.train_loss), (0, None));
        // Evaluation-only metrics are those of the untouched global model.
        let model = AttentionFlowModel::new(&f.task.model, &Device::Cpu, 0).unwrap();
        f.global.load_into_varmap(model.varmap()).unwrap();
        let expected = evaluate(&model, &ds.validation, EVAL_BATCH).unwrap();
        assert_eq!(eval.validation_loss, Some(expected.loss));
        assert_eq!(eval.validation_accuracy, Some(expected.accuracy));
    }

    #[test]
    fn wrong_global_hash_is_refused() {
        let f = fixture();
        let mut task = f.task.clone();
        task.expected_model_sha256 = "ab".repeat(32);
        let err = run(&f, &task).unwrap_err();
        assert!(matches!(err, Error::HashMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&"ab".repeat(32)) && msg.contains(&f.task.expected_model_sha256),
            "{msg}"
        );

        // Bytes altered in transit are caught the same way.
        let mut bytes = f.global_bytes.clone();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let err = f.site.evaluate_task(&f.task, &bytes).unwrap_err();
        assert!(matches!(err, Error::HashMismatch { .. }), "{err}");
    }

    #[test]
    fn wrong_vocabulary_hash_is_refused() {
        let f = fixture();
        let mut task = f.task.clone();
        task.vocab_sha256 = "0".repeat(64);
        let msg = run(&f, &task).unwrap_err().to_string();
        assert!(
            msg.contains("vocabulary")
                && msg.contains(&"0".repeat(64))
                && msg.contains(f.site.vocab_sha256())
                && msg.contains("re-encode"),
            "{msg}"
        );
        let msg = f
            .site
            .evaluate_task(&task, &f.global_bytes)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("vocabulary sha256"), "{msg}");
    }

    #[test]
    fn wrong_vocab_size_is_refused() {
        let f = fixture();
        let mut task = f.task.clone();
        task.model.vocab_size += 7;
        let msg = run(&f, &task).unwrap_err().to_string();
        let (theirs, ours) = (task.model.vocab_size, f.site.vocab_size());
        assert!(
            msg.contains(&format!("vocab_size {theirs}"))
                && msg.contains(&format!("{ours} ids"))
                && msg.contains("fix the run configuration"),
            "{msg}"
        );
    }

    #[test]
    fn parameters_of_another_architecture_are_refused() {
        let f = fixture();
        let mut task = f.task.clone();
        task.model.hidden_size = 12;
        let err = run(&f, &task).unwrap_err();
        assert!(
            matches!(err, Error::Common(fedflow_common::Error::ParamMismatch(_))),
            "{err}"
        );
    }

    #[test]
    fn empty_training_split_is_refused() {
        let f = fixture();
        let mut dataset = (*f.site.dataset()).clone();
        dataset.train.clear();
        let site = SiteTrainer::new(dataset, &f.vocab, Device::Cpu);
        let msg = site
            .train_task(&f.task, &f.global_bytes, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no training sessions"), "{msg}");
    }

    #[test]
    fn same_task_gives_identical_delta_bytes() {
        let f = fixture();
        let a = run(&f, &f.task).unwrap();
        let b = run(&f, &f.task).unwrap();
        assert_eq!(a.delta_sha256, b.delta_sha256);
        assert!(a.delta_bytes == b.delta_bytes);
        let mut other = f.task.clone();
        other.train.seed += 1;
        assert_ne!(run(&f, &other).unwrap().delta_sha256, a.delta_sha256);
    }

    #[test]
    fn fedprox_shrinks_the_update() {
        let f = fixture();
        let mut task = f.task.clone();
        task.train = TrainConfig {
            optimizer: OptimizerKind::Sgd,
            learning_rate: 0.05,
            momentum: 0.0,
            patience: 0,
            ..task.train
        };
        let plain = run(&f, &task).unwrap().delta.l2_norm().unwrap();
        task.train.fedprox_mu = 10.0;
        let prox = run(&f, &task).unwrap().delta.l2_norm().unwrap();
        assert!(
            prox < 0.5 * plain,
            "fedprox delta norm {prox} is not well below plain {plain}"
        );
    }
}

mod private {
    //! The DP path of a task at the site: policies, the ledger protocol, withheld metrics.
    use super::super::*;
    use super::support::*;
    use crate::ledger::Ledger;
    use crate::privacy::RecordDp;
    use fedflow_common::train::DpSgdConfig;

    fn private_site(dir: &std::path::Path, max: f64, release: bool) -> (SiteTrainer, Fixture) {
        let mut f = fixture();
        let privacy = SitePrivacy::open(dir, max, 1e-5, release).unwrap();
        let site = std::mem::replace(
            &mut f.site,
            SiteTrainer::new(SiteDataset::default(), &f.vocab, Device::Cpu),
        );
        (site.with_privacy(Arc::new(privacy)), f)
    }

    fn dp_task(t: &TaskSpec) -> TaskSpec {
        TaskSpec {
            record_dp: Some(RecordDp {
                sgd: DpSgdConfig {
                    expected_batch_size: 16,
                    ..DpSgdConfig::default()
                },
                target_epsilon: 50.0,
                target_delta: 1e-5,
                count_noise_multiplier: 0.0,
            }),
            ..t.clone()
        }
    }

    #[test]
    fn a_private_site_refuses_non_private_training_and_withholds_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let (site, f) = private_site(dir.path(), 50.0, false);
        let plain = site.train_task(&f.task, &f.global_bytes, &mut |_| {});
        assert!(matches!(plain, Err(Error::Policy(_))), "{plain:?}");
        let eval = site.evaluate_task(&dp_task(&f.task), &f.global_bytes);
        assert!(matches!(eval, Err(Error::Policy(_))), "{eval:?}");
        assert!(
            Ledger::open(dir.path())
                .unwrap()
                .entries()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_dp_task_is_recorded_once_and_a_retry_resends_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (site, f) = private_site(dir.path(), 50.0, false);
        let task = dp_task(&f.task);
        let first = site
            .train_task(&task, &f.global_bytes, &mut |_| {})
            .unwrap();
        assert_eq!(first.delta_sha256, sha256_hex(&first.delta_bytes));
        assert!(first.metrics.validation_accuracy.is_none() && first.metrics.train_loss.is_none());
        assert!(first.metrics.train_examples > 0);
        let entries = Ledger::open(dir.path()).unwrap().entries().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].update_sha256, first.delta_sha256);
        assert_eq!(entries[0].units, site.dataset().train.len() as u64);
        // The same task again (a retry after a crash or a network error): the recorded bytes,
        // no second entry, no fresh noise.
        let again = site
            .train_task(&task, &f.global_bytes, &mut |_| {})
            .unwrap();
        assert_eq!(again.delta_bytes, first.delta_bytes);
        assert_eq!(
            Ledger::open(dir.path()).unwrap().entries().unwrap().len(),
            1
        );
        // Once delivered, the bytes are dropped; the same task cannot be answered again.
        site.privacy().unwrap().delivered(&task).unwrap();
        let third = site.train_task(&task, &f.global_bytes, &mut |_| {});
        assert!(matches!(third, Err(Error::Budget(_))), "{third:?}");
        // A new round trains afresh (different noise) and is recorded.
        let next = TaskSpec {
            round: 4,
            task_id: "task-2".into(),
            ..task
        };
        let fresh = site
            .train_task(&next, &f.global_bytes, &mut |_| {})
            .unwrap();
        assert_ne!(fresh.delta_sha256, first.delta_sha256);
        assert_eq!(
            Ledger::open(dir.path()).unwrap().entries().unwrap().len(),
            2
        );
    }

    #[test]
    fn a_noisy_count_is_the_weight_sent_recorded_charged_and_resent_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let (site, f) = private_site(dir.path(), 50.0, false);
        let plain = dp_task(&f.task);
        let mut task = plain.clone();
        task.record_dp.as_mut().unwrap().count_noise_multiplier = 3.0;
        let n = site.dataset().train.len() as u64;
        let mut sent = Vec::new();
        for round in 1..=8 {
            let t = TaskSpec {
                round,
                task_id: format!("count-{round}"),
                ..task.clone()
            };
            let out = site.train_task(&t, &f.global_bytes, &mut |_| {}).unwrap();
            let entry = Ledger::open(dir.path())
                .unwrap()
                .entries()
                .unwrap()
                .pop()
                .unwrap();
            let count = entry.count.expect("the noisy count is recorded");
            assert_eq!(count.noise_multiplier, 3.0);
            // What goes out as the FedAvg weight is the recorded noisy count.
            assert_eq!(out.metrics.train_examples as u64, count.released);
            // A retry sends the same count, never a fresh draw.
            let again = site.train_task(&t, &f.global_bytes, &mut |_| {}).unwrap();
            assert_eq!(again.metrics.train_examples, out.metrics.train_examples);
            site.privacy().unwrap().delivered(&t).unwrap();
            sent.push(count.released);
        }
        // Noise was drawn: not every count is the true one, and all are near it.
        assert!(sent.iter().any(|&c| c != n), "{sent:?} vs {n}");
        assert!(sent.iter().all(|&c| c.abs_diff(n) <= 30), "{sent:?} vs {n}");
        // The ledger charges the counts: 8 DP-SGD rounds and 8 counts.
        let spend = Ledger::open(dir.path()).unwrap().spend().unwrap();
        let entries = Ledger::open(dir.path()).unwrap().entries().unwrap();
        let mut without = crate::ledger::Spend::of(
            &entries
                .iter()
                .map(|e| crate::ledger::LedgerEntry {
                    count: None,
                    ..e.clone()
                })
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(spend.epsilon(1e-5).unwrap() > without.epsilon(1e-5).unwrap());
        for e in &entries {
            without.compose(&e.count.unwrap().event()).unwrap();
        }
        assert!((spend.epsilon(1e-5).unwrap() - without.epsilon(1e-5).unwrap()).abs() < 1e-6);
    }

    #[test]
    fn a_dp_update_carries_no_timing_validation_count_or_epoch_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (site, f) = private_site(dir.path(), 50.0, false);
        let task = dp_task(&f.task);
        let out = site
            .train_task(&task, &f.global_bytes, &mut |_| {})
            .unwrap();
        assert_eq!(out.metrics.train_seconds, 0.0);
        assert_eq!(out.metrics.validation_examples, 0);
        assert_eq!(out.metrics.train_examples, site.dataset().train.len());
        assert!(!crate::work::SiteWork::reports_progress(&site, &task));
        assert!(crate::work::SiteWork::reports_progress(&f.site, &f.task));
    }

    #[test]
    fn a_decline_names_the_limit_without_epsilon_figures() {
        let dir = tempfile::tempdir().unwrap();
        let (site, f) = private_site(dir.path(), 1e-3, false);
        let task = dp_task(&f.task);
        let declined = site.train_task(&task, &f.global_bytes, &mut |_| {});
        let Err(e @ Error::Budget(_)) = declined else {
            panic!("{declined:?}");
        };
        assert_eq!(
            e.to_string(),
            format!(
                "privacy budget: run {} round {}: training would take this site's \
                 record-level epsilon above this site's own limit; declining",
                task.run_id, task.round
            )
        );
    }

    #[test]
    fn a_ledger_of_one_unit_declines_tasks_of_another_before_training() {
        let dir = tempfile::tempdir().unwrap();
        let (site, f) = private_site(dir.path(), 50.0, false);
        let session = dp_task(&f.task);
        site.train_task(&session, &f.global_bytes, &mut |_| {})
            .unwrap();
        let mut user = dp_task(&f.task);
        user.round = 4;
        user.task_id = "task-2".into();
        user.record_dp.as_mut().unwrap().sgd.unit = fedflow_common::train::PrivacyUnit::User;
        let mut epochs = 0;
        let declined = site.train_task(&user, &f.global_bytes, &mut |_| epochs += 1);
        let Err(Error::Policy(why)) = declined else {
            panic!("{declined:?}");
        };
        assert!(why.contains("session-level releases") && why.contains("one privacy unit"));
        assert_eq!(epochs, 0, "declined before training");
        assert_eq!(
            Ledger::open(dir.path()).unwrap().entries().unwrap().len(),
            1
        );
    }

    #[test]
    fn released_metrics_are_sent_and_marked_in_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let (site, f) = private_site(dir.path(), 50.0, true);
        let task = dp_task(&f.task);
        let out = site
            .train_task(&task, &f.global_bytes, &mut |_| {})
            .unwrap();
        assert!(out.metrics.validation_accuracy.is_some() && out.metrics.train_loss.is_some());
        assert!(Ledger::open(dir.path()).unwrap().entries().unwrap()[0].metrics_released);
        assert!(site.evaluate_task(&task, &f.global_bytes).is_ok());
    }
}

mod site_level {
    use super::super::*;
    use super::support::*;
    use fedflow_common::privacy::dpfedavg::TrustMode;

    fn with_site_dp(f: &Fixture, mode: TrustMode, clip: f64, noise_std: f64) -> TaskSpec {
        TaskSpec {
            site_dp: Some(SiteDpTask {
                mode,
                clip_norm: clip,
                noise_std,
            }),
            ..f.task.clone()
        }
    }

    /// The fixture's site, rebuilt by `with` (the builders take the trainer by value).
    fn rebuilt(f: &mut Fixture, with: impl FnOnce(SiteTrainer) -> SiteTrainer) -> SiteTrainer {
        let site = std::mem::replace(
            &mut f.site,
            SiteTrainer::new(SiteDataset::default(), &f.vocab, Device::Cpu),
        );
        with(site)
    }

    #[test]
    fn a_site_withholding_metrics_sends_counts_only_and_declines_evaluation() {
        let mut f = fixture();
        let site = rebuilt(&mut f, |s| s.withholding_metrics(true));
        let n = site.dataset().train.len();
        let plain = site
            .train_task(&f.task, &f.global_bytes, &mut |_| {})
            .unwrap();
        // Without site-level DP the training count is the FedAvg weight: it stays.
        assert_eq!(plain.metrics, SiteMetrics::counts_only(n, 0));
        let local = with_site_dp(&f, TrustMode::Local, 1.0, 0.5);
        let out = site
            .train_task(&local, &f.global_bytes, &mut |_| {})
            .unwrap();
        assert_eq!(out.metrics, SiteMetrics::counts_only(0, 0));
        let eval = site.evaluate_task(&local, &f.global_bytes);
        assert!(
            matches!(&eval, Err(Error::Policy(w)) if w.contains("--withhold-metrics")),
            "{eval:?}"
        );
        assert!(!crate::work::SiteWork::reports_progress(&site, &local));
        // The coordinator reads such an update as counts with nothing measured.
        let wire = fedflow_proto::v1::Metrics::from(&out.metrics);
        assert!(wire.validation_loss.is_nan() && wire.train_loss.is_nan());
        assert_eq!((wire.train_seconds, wire.epochs_run), (0.0, 0));
    }

    #[test]
    fn a_site_noise_floor_declines_tasks_that_would_add_less_noise_at_the_site() {
        let mut f = fixture();
        assert!(matches!(
            SiteTrainer::new(SiteDataset::default(), &f.vocab, Device::Cpu)
                .with_min_site_noise(0.0),
            Err(Error::Usage(_))
        ));
        let site = rebuilt(&mut f, |s| s.with_min_site_noise(0.5).unwrap());
        for (task, what) in [
            (f.task.clone(), "no site-level DP"),
            (
                with_site_dp(&f, TrustMode::Central, 1.0, 0.0),
                "central mode",
            ),
            (
                with_site_dp(&f, TrustMode::Distributed, 2.0, 0.5),
                "distributed mode",
            ),
            (with_site_dp(&f, TrustMode::Local, 1.0, 0.4), "local mode"),
        ] {
            let mut epochs = 0;
            let r = site.train_task(&task, &f.global_bytes, &mut |_| epochs += 1);
            let Err(Error::Policy(why)) = r else {
                panic!("{what}: {r:?}");
            };
            assert!(
                why.contains(what) && why.contains("--min-site-noise"),
                "{why}"
            );
            assert_eq!(epochs, 0, "{what}: declined before training");
        }
        // At or above the floor: trained.
        let ok = with_site_dp(&f, TrustMode::Local, 1.0, 0.5);
        assert!(site.train_task(&ok, &f.global_bytes, &mut |_| {}).is_ok());
    }

    #[test]
    fn the_released_delta_is_clipped_and_carries_exactly_the_task_noise() {
        let f = fixture();
        let plain = f
            .site
            .train_task(&f.task, &f.global_bytes, &mut |_| {})
            .unwrap();
        let norm = plain.delta.l2_norm().unwrap();
        assert!(plain.unclipped);
        // Central mode, clip below the norm: scaled onto the clip, no noise, bit 0; the
        // bytes sent are the clipped delta's.
        let clip = norm / 4.0;
        let out = f
            .site
            .train_task(
                &with_site_dp(&f, TrustMode::Central, clip, 0.0),
                &f.global_bytes,
                &mut |_| {},
            )
            .unwrap();
        assert!(!out.unclipped);
        let n = out.delta.l2_norm().unwrap();
        assert!(n <= clip && n > clip * (1.0 - 1e-5), "{n} vs {clip}");
        assert_eq!(out.delta_sha256, sha256_hex(&out.delta_bytes));
        assert_eq!(
            ParamSet::from_safetensors_bytes(&out.delta_bytes)
                .unwrap()
                .sha256_hex()
                .unwrap(),
            out.delta.sha256_hex().unwrap()
        );
        // Clip above the norm: the delta is the plain one (training is seeded), bit 1.
        let out = f
            .site
            .train_task(
                &with_site_dp(&f, TrustMode::Central, norm * 2.0, 0.0),
                &f.global_bytes,
                &mut |_| {},
            )
            .unwrap();
        assert!(out.unclipped);
        assert_eq!(out.delta_sha256, plain.delta_sha256);
        // Local mode: the residual over the clipped delta has the task's std.
        let std = 0.02;
        let out = f
            .site
            .train_task(
                &with_site_dp(&f, TrustMode::Local, clip, std),
                &f.global_bytes,
                &mut |_| {},
            )
            .unwrap();
        let (clipped, _) = plain.delta.clip_to_norm(clip).unwrap();
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
        let k = residual.len() as f64;
        let mean = residual.iter().sum::<f64>() / k;
        let sd = (residual.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (k - 1.0)).sqrt();
        assert!(
            (sd / std - 1.0).abs() < 4.0 / (2.0 * k).sqrt() + 1e-3,
            "{sd} over {k}"
        );
        assert!(mean.abs() < 4.0 * std / k.sqrt(), "{mean}");
    }
}
