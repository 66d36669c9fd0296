//! Site-level DP in the round engine, with explicit times and seeded randomness: the noise
//! the released model carries in every mode (with dropouts), the norm bound, Poisson
//! sampling, adaptive clipping across a restart, the ledger, and the budget stop.

use candle_core::Device;
use fedflow_common::data::Vocab;
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::privacy::dpfedavg::{TrustMode, privatize};
use fedflow_common::privacy::{SampledGaussian, planner};
use rand::SeedableRng;

use super::*;
use crate::config::SamplingConfig;
use crate::metrics::SiteReport;

const T0: i64 = 1_000_000;

struct Fixture {
    dir: tempfile::TempDir,
    cfg: RunConfig,
    initial: ParamSet,
}

/// A run whose model has ~14k coordinates (enough to measure a noise std to ~2%).
fn fixture(rounds: u64, site_dp: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Vocab::from_events(["a", "b", "c"])
        .unwrap()
        .save(dir.path().join("vocab.json"))
        .unwrap();
    let text = format!(
        "[run]\nname = \"t\"\nseed = 1\nrounds = {rounds}\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 16\nhidden_size = 48\nnum_layers = 1\n\
         [sampling]\nfraction = 1.0\nmin_selected = 1\nmin_available = 1\n\
         [rounds]\ndeadline_secs = 60\nmin_completed = 1\nheartbeat_timeout_secs = 30\n\
         [evaluation]\nevery = 0\nfinal_round = false\n\
         [site_dp]\n{site_dp}"
    );
    let cfg = RunConfig::from_toml_str(&text, dir.path()).unwrap();
    let model = AttentionFlowModel::new(&cfg.model_config().unwrap(), &Device::Cpu, 0).unwrap();
    let initial = ParamSet::from_varmap(model.varmap()).unwrap();
    Fixture { dir, cfg, initial }
}

fn engine(f: &Fixture, seed: u64) -> RoundEngine {
    let store = Store::open(f.dir.path().join("data")).unwrap();
    let mut e = RoundEngine::open(store, f.cfg.clone(), f.initial.clone()).unwrap();
    e.seed_site_dp_randomness(seed);
    e
}

fn sites(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("site-{i:03}")).collect()
}

/// Every site polls; returns the tickets of those selected.
fn start(e: &mut RoundEngine, sites: &[String], now: i64) -> Vec<(String, TaskTicket)> {
    for s in sites {
        e.site_seen(s, now).unwrap();
    }
    sites
        .iter()
        .filter_map(|s| e.poll_task(s, now).unwrap().map(|t| (s.clone(), t)))
        .collect()
}

/// What an honest site sends for `delta`: clipped and noised as its ticket says.
fn send(
    e: &mut RoundEngine,
    site: &str,
    t: &TaskTicket,
    delta: &ParamSet,
    now: i64,
    rng: &mut rand_chacha::ChaCha20Rng,
) -> std::result::Result<Accepted, Rejection> {
    let dp = t.site_dp.expect("a site-level DP task");
    let out = privatize(delta, dp.clip_norm, dp.noise_std, rng).unwrap();
    submit_raw(e, site, t, &out.delta, out.unclipped, now)
}

fn submit_raw(
    e: &mut RoundEngine,
    site: &str,
    t: &TaskTicket,
    delta: &ParamSet,
    unclipped: bool,
    now: i64,
) -> std::result::Result<Accepted, Rejection> {
    let base = e.global().1.to_string();
    let sha = delta.sha256_hex().unwrap();
    e.submit(
        Submission {
            site_id: site.to_owned(),
            round: t.round,
            task_id: t.task_id.clone(),
            nonce: t.nonce.clone(),
            base_model_sha256: base.clone(),
            delta: delta.clone().into(),
            delta_sha256: sha.clone(),
            report: UpdateReport {
                train_examples: 10,
                claimed_weight: 1e6,
            },
            metrics: SiteReport::default(),
            unclipped,
        },
        now,
    )
    .unwrap()
}

/// Every coordinate of `after - before`, in f64.
fn change(before: &ParamSet, after: &ParamSet) -> Vec<f64> {
    let d = ParamSet::delta(after, before).unwrap();
    let mut out = Vec::new();
    for (_, t) in d.iter() {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        out.extend(v.into_iter().map(f64::from));
    }
    out
}

fn std_of(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

fn zeros(f: &Fixture) -> ParamSet {
    f.initial.scale(0.0).unwrap()
}

#[test]
fn the_released_model_carries_the_calibrated_noise_in_every_mode_after_dropouts() {
    // z = 2, C = 0.5, expected 4 sites: the sum carries N(0, max((z·C)², k·σ_s²)) per
    // coordinate for k contributions each adding σ_s (the coordinator tops it up to the
    // central noise), and the average that over 4: exactly z·C/4 in the central and
    // distributed modes whatever the dropouts, more in local mode.
    for (mode, seed) in [("central", 1), ("distributed", 2), ("local", 3)] {
        let f = fixture(
            3,
            &format!(
                "mode = \"{mode}\"\nclip_norm = 0.5\nnoise_multiplier = 2.0\nexpected_sites = 4\n\
                 target_epsilon = 1000\ntarget_delta = 1e-5\n"
            ),
        );
        let mut e = engine(&f, seed);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed + 100);
        let names = sites(4);
        // Round r: 5 - r sites answer (4, 3, 2 of 4: dropouts in rounds 2 and 3).
        for round in 1..=3u64 {
            let before = e.global().0.clone();
            let tickets = start(&mut e, &names, T0 + round as i64);
            assert_eq!(tickets.len(), 4, "fixed-size sampling selects everyone");
            let answering = 5 - round as usize;
            for (site, t) in &tickets[..answering] {
                let r = send(&mut e, site, t, &zeros(&f), T0 + 10, &mut rng);
                assert_eq!(r, Ok(Accepted::New), "{mode}");
            }
            for (site, t) in &tickets[answering..] {
                e.decline(site, round, &t.task_id, &t.nonce, "dropped out", T0 + 20)
                    .unwrap()
                    .unwrap();
            }
            assert_eq!(
                e.committed_round(),
                round,
                "{mode}: every round is released"
            );
            let noise = change(&before, e.global().0);
            let site_std = match mode {
                "central" => 0.0,
                "distributed" => 2.0 * 0.5 / 2.0,
                _ => 2.0 * 0.5,
            };
            let sum_var = f64::max(1.0, answering as f64 * site_std * site_std);
            let want = sum_var.sqrt() / 4.0;
            let tol = 4.0 / (2.0 * noise.len() as f64).sqrt();
            let got = std_of(&noise);
            assert!(
                (got / want - 1.0).abs() < tol,
                "{mode} round {round}: noise std {got} vs {want} (±{tol})"
            );
            let ledger = e.store().site_dp_rounds("t").unwrap();
            let row = ledger.last().unwrap();
            assert_eq!(row.contributions, answering as u64);
            assert_eq!(row.mode, mode);
            assert_eq!(row.site_noise_std, site_std);
            let shares = answering as f64 * site_std * site_std;
            assert!((shares + row.server_noise_std.powi(2) - sum_var).abs() < 1e-12);
        }
        // The ledger's ε is the accountant's for three unamplified rounds at z = 2.
        let ledger = e.store().site_dp_rounds("t").unwrap();
        let want = planner::epsilon(
            &[SampledGaussian {
                q: 1.0,
                z: 2.0,
                steps: 1,
            }],
            3,
            1e-5,
        )
        .unwrap()
        .epsilon;
        assert!((ledger[2].epsilon - want).abs() < 1e-9);
        assert!(ledger[0].epsilon < ledger[1].epsilon && ledger[1].epsilon < ledger[2].epsilon);
        // Every update the coordinator saw is in the uploads ledger.
        assert_eq!(e.store().site_dp_uploads("t").unwrap().len(), 4 + 3 + 2);
    }
}

#[test]
fn updates_above_the_norm_bound_are_refused_and_change_nothing() {
    let f = fixture(
        1,
        "clip_norm = 0.5\nnoise_multiplier = 0.0001\nexpected_sites = 2\n\
         target_epsilon = 1e300\ntarget_delta = 1e-5\n",
    );
    let mut e = engine(&f, 1);
    let names = sites(2);
    let tickets = start(&mut e, &names, T0);
    let big = f.initial.scale(0.1).unwrap();
    assert!(big.l2_norm().unwrap() > 0.5);
    let refused = submit_raw(&mut e, &tickets[0].0, &tickets[0].1, &big, true, T0 + 1);
    assert!(
        matches!(&refused, Err(Rejection::Invalid(m)) if m.contains("exceeds the bound")),
        "{refused:?}"
    );
    // A clipped update exactly at the bound goes in; weights are uniform whatever is claimed.
    let (clipped, _) = big.clip_to_norm(0.5).unwrap();
    for (site, t) in &tickets {
        assert_eq!(
            submit_raw(&mut e, site, t, &clipped, false, T0 + 2),
            Ok(Accepted::New)
        );
    }
    // The global moved by (2 · clipped) / 2 plus noise of std z·C/2 = 2.5e-5.
    let moved = change(&f.initial, e.global().0);
    let want = change(&zeros(&f), &clipped);
    for (m, w) in moved.iter().zip(&want) {
        assert!((m - w).abs() < 10.0 * 2.5e-5, "{m} vs {w}");
    }
}

#[test]
fn poisson_sampling_draws_each_site_with_the_rate_and_empty_rounds_still_release() {
    let f = fixture(
        40,
        "clip_norm = 1.0\nnoise_multiplier = 1.0\nsampling_rate = 0.25\nexpected_sites = 50\n\
         target_epsilon = 100\ntarget_delta = 1e-5\n",
    );
    let mut e = engine(&f, 9);
    let names = sites(200);
    let tickets = start(&mut e, &names, T0);
    // Binomial(200, 0.25): mean 50, sd ≈ 6.1.
    assert!((25..=75).contains(&tickets.len()), "{}", tickets.len());
    for (site, t) in &tickets {
        e.decline(site, 1, &t.task_id, &t.nonce, "busy", T0 + 1)
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        e.committed_round(),
        1,
        "a round without contributions is released"
    );
    let row = &e.store().site_dp_rounds("t").unwrap()[0];
    assert_eq!(
        (row.sampling.as_str(), row.sampling_rate),
        ("poisson", 0.25)
    );
    assert_eq!(row.contributions, 0);
    assert_eq!(row.selected, tickets.len() as u64);
    // A different seed samples a different set.
    let g = fixture(
        40,
        "clip_norm = 1.0\nnoise_multiplier = 1.0\nsampling_rate = 0.25\nexpected_sites = 50\n\
         target_epsilon = 100\ntarget_delta = 1e-5\n",
    );
    let mut other = engine(&g, 10);
    let other_tickets: Vec<String> = start(&mut other, &names, T0)
        .into_iter()
        .map(|t| t.0)
        .collect();
    let mine: Vec<String> = tickets.into_iter().map(|t| t.0).collect();
    assert_ne!(mine, other_tickets);
}

#[test]
fn adaptive_clipping_moves_the_clip_and_a_restart_keeps_it() {
    let f = fixture(
        3,
        "clip_norm = 1.0\nnoise_multiplier = 1.0\nexpected_sites = 3\n\
         target_epsilon = 100\ntarget_delta = 1e-5\n\
         [site_dp.adaptive_clipping]\ntarget_quantile = 0.5\nlearning_rate = 0.2\n\
         bit_noise_std = 5.0\n",
    );
    let mut e = engine(&f, 4);
    let names = sites(3);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let tickets = start(&mut e, &names, T0);
    assert_eq!(tickets[0].1.site_dp.unwrap().clip_norm, 1.0);
    // Central mode: the sites add no noise, the coordinator all of it.
    assert_eq!(tickets[0].1.site_dp.unwrap().noise_std, 0.0);
    for (site, t) in &tickets {
        send(&mut e, site, t, &zeros(&f), T0 + 1, &mut rng).unwrap();
    }
    let row = e.store().site_dp_rounds("t").unwrap()[0].clone();
    // The updates' noise is calibrated with z_Δ > z so that updates and bits cost z together.
    assert!(row.update_noise_multiplier > 1.0);
    assert!((row.server_noise_std - row.update_noise_multiplier).abs() < 1e-12);
    assert_eq!(row.noise_multiplier, 1.0);
    assert_eq!(row.clipped_fraction, Some(0.0));
    let fraction = row.noisy_unclipped_fraction.unwrap();
    let want = 1.0 * (-0.2 * (fraction - 0.5)).exp();
    assert!((row.next_clip_norm - want).abs() < 1e-12);
    // Restarted, the engine hands out the clip the ledger says.
    drop(e);
    let mut e = engine(&f, 6);
    let tickets = start(&mut e, &names, T0 + 100);
    assert_eq!(tickets[0].1.site_dp.unwrap().clip_norm, row.next_clip_norm);
    assert_eq!(tickets[0].1.site_dp.unwrap().mode, TrustMode::Central);
}

#[test]
fn the_run_ends_before_the_round_that_would_pass_the_budget() {
    let event = SampledGaussian {
        q: 1.0,
        z: 3.0,
        steps: 1,
    };
    // A target the PLD bound of 3 rounds meets and RDP's does not, below PLD's of 4: the
    // budget is enforced on the smaller valid bound, so round 3 runs and round 4 does not.
    let pld = |r: u64| planner::epsilon_by(planner::Accounting::Pld, &[event], r, 1e-5).unwrap();
    let rdp = |r: u64| planner::epsilon(&[event], r, 1e-5).unwrap().epsilon;
    let (eps3, eps4) = (pld(3), pld(4));
    let target = (eps3 + eps4.min(rdp(3))) / 2.0;
    assert!(rdp(2) <= target && target < rdp(3) && eps3 <= target && target < eps4);
    let f = fixture(
        10,
        &format!(
            "clip_norm = 1.0\nnoise_multiplier = 3.0\nexpected_sites = 2\n\
             target_epsilon = {target}\ntarget_delta = 1e-5\n"
        ),
    );
    assert_eq!(
        f.cfg
            .site_dp
            .as_ref()
            .unwrap()
            .rounds_within_target(&f.cfg.sampling)
            .unwrap(),
        3
    );
    let mut e = engine(&f, 2);
    let names = sites(2);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
    for round in 1..=3 {
        let tickets = start(&mut e, &names, T0 + round);
        for (site, t) in &tickets {
            send(&mut e, site, t, &zeros(&f), T0 + round, &mut rng).unwrap();
        }
    }
    assert_eq!(e.committed_round(), 3);
    assert!(
        start(&mut e, &names, T0 + 10).is_empty(),
        "round 4 never starts"
    );
    assert_eq!(e.phase(), Phase::Finished);
    let run = e.store().run("t").unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Finished);
    let reason = run.status_reason.unwrap();
    assert!(
        reason.contains("site-level privacy budget: round 4 would take epsilon"),
        "{reason}"
    );
    let ledger = e.store().site_dp_rounds("t").unwrap();
    assert_eq!(ledger.len(), 3);
    // The ledger records both bounds; RDP's is past the target, the PLD one within.
    assert!((ledger[2].epsilon - rdp(3)).abs() < 1e-9 && ledger[2].epsilon > target);
    assert_eq!(ledger[2].epsilon_pld, Some(eps3));
}

#[test]
fn the_privacy_audit_states_what_the_ledger_recorded_at_both_levels() {
    let f = fixture(
        5,
        "mode = \"local\"\nclip_norm = 0.5\nnoise_multiplier = 1.5\nsampling_rate = 0.5\n\
         expected_sites = 2\ntarget_epsilon = 50\ntarget_delta = 1e-5\n\
         [record_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nsampling_rate = 0.1\n\
         target_epsilon = 10\ntarget_delta = 1e-5\n",
    );
    let mut e = engine(&f, 21);
    let names = sites(4);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(22);
    for round in 1..=3 {
        for (site, t) in start(&mut e, &names, T0 + round) {
            send(&mut e, &site, &t, &zeros(&f), T0 + round, &mut rng).unwrap();
        }
        assert_eq!(e.committed_round(), round as u64);
    }
    let out = f.dir.path().join("audit");
    let report = crate::audit::write(e.store(), None, &out, &[]).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(crate::audit::JSON_FILE)).unwrap()).unwrap();
    assert_eq!(json["schema"], crate::audit::SCHEMA);
    assert_eq!(json["run"]["committed_rounds"], 3);
    // Site level: local mode is accounted under zero-out without amplification, so the
    // cumulative ε is the accountant's for 3 rounds at q = 1 (not the 0.5 sites were sampled
    // with), z = 1.5; each round's recomputed ε equals what the ledger recorded.
    let site = report.site_level.as_ref().unwrap();
    assert_eq!((site.round_event.q, site.round_event.z), (1.0, 1.5));
    assert!(site.neighbouring_relation.starts_with("zero-out"));
    let want = planner::epsilon(
        &[SampledGaussian {
            q: 1.0,
            z: 1.5,
            steps: 1,
        }],
        3,
        1e-5,
    )
    .unwrap()
    .epsilon;
    // RDP as the planner computes it; PLD of the same rounds, tighter and stated; the
    // ledger recorded both after every round.
    assert!((site.cumulative_rdp[0].epsilon.unwrap() - want).abs() < 1e-9);
    let pld = planner::epsilon_by(
        planner::Accounting::Pld,
        &[SampledGaussian {
            q: 1.0,
            z: 1.5,
            steps: 1,
        }],
        3,
        1e-5,
    )
    .unwrap();
    assert!(pld < want);
    assert_eq!(site.cumulative_pld[0].epsilon, Some(pld));
    assert_eq!(site.cumulative[0].epsilon, Some(pld));
    assert_eq!(site.cumulative[0].delta, 1e-5);
    assert_eq!(site.rounds.len(), 3);
    for r in &site.rounds {
        assert!((r.epsilon_recomputed.unwrap() - r.ledger.epsilon).abs() < 1e-9);
    }
    assert_eq!(site.rounds[2].ledger.epsilon_pld, Some(pld));
    assert_eq!(json["site_level"]["sampling"]["method"], "poisson");
    assert_eq!(json["site_level"]["trust_mode"], "local");
    assert!(site.protects_against.contains("the coordinator included"));
    // Against the coordinator (local mode): every site's updates at z = 1.5, no amplification.
    let ac = site.against_coordinator.as_ref().unwrap();
    assert_eq!(ac.per_update_noise_multiplier, 1.5);
    let uploads = e.store().site_dp_uploads("t").unwrap();
    for s in &ac.sites {
        let n = uploads.iter().filter(|u| u.site_id == s.site_id).count() as u64;
        assert_eq!(s.updates, n);
        let want = planner::epsilon(
            &[SampledGaussian {
                q: 1.0,
                z: 1.5,
                steps: 1,
            }],
            n,
            1e-5,
        )
        .unwrap()
        .epsilon;
        assert!((s.epsilon.unwrap() - want).abs() < 1e-9);
    }
    // Record level: with a shared sampling rate every site's ε follows from its rounds.
    let rec = report.record_level.as_ref().unwrap();
    for s in &rec.sites {
        let cfg = f.cfg.record_dp.as_ref().unwrap();
        let want = cfg
            .site_epsilon(1, f.cfg.train.epochs, s.rounds_contributed)
            .unwrap();
        assert!((s.epsilon.unwrap() - want).abs() < 1e-9, "{s:?}");
    }
    assert_eq!(rec.every_round_epsilon.len(), 3);
    let cfg = f.cfg.record_dp.as_ref().unwrap();
    for (r, e) in rec.every_round_epsilon.iter().enumerate() {
        let want = cfg
            .site_epsilon(1, f.cfg.train.epochs, r as u64 + 1)
            .unwrap();
        assert!((e.unwrap() - want).abs() < 1e-9);
    }
    assert!(report.summary.contains("site level (local mode)"));
    assert!(report.summary.contains("record level"));
    assert!(report.recompute[1].contains("--q 1 --noise-multiplier 1.5 --steps 1 --rounds 3"));
    // The page: summary first, both levels, the per-round table, what is not covered.
    let html = std::fs::read_to_string(out.join(crate::audit::HTML_FILE)).unwrap();
    let summary_at = html.find("class=\"summary\"").unwrap();
    for needle in [
        "Site level (DP-FedAvg)",
        "Each site against the coordinator",
        "Record level (DP-SGD at every site)",
        "Not covered by any guarantee above",
        "fedflow-coordinator privacy-report",
        "<svg",
    ] {
        let at = html
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} missing"));
        assert!(at > summary_at, "{needle} before the summary");
    }
    // Rows: per round (header + 3), ε at the target and 3 other δ (header + 4), sites
    // against the coordinator, sites at record level, the DP-SGD parameters.
    let rows = (1 + 3)
        + (1 + 4)
        + (1 + ac.sites.len())
        + (1 + rec.sites.len())
        + (1 + rec.dp_sgd.as_object().unwrap().len());
    assert_eq!(html.matches("<tr>").count(), rows);
    assert_eq!(
        html.matches("<svg").count(),
        2,
        "ε over rounds at both levels"
    );
}

#[test]
fn a_run_without_dp_is_reported_as_having_no_guarantee() {
    let f = fixture(
        1,
        "clip_norm = 1.0\nnoise_multiplier = 1.0\nexpected_sites = 1\n\
         target_epsilon = 10\ntarget_delta = 1e-5\n",
    );
    let mut cfg = f.cfg.clone();
    cfg.site_dp = None;
    let store = Store::open(f.dir.path().join("plain")).unwrap();
    let e = RoundEngine::open(store, cfg, f.initial.clone()).unwrap();
    let report = crate::audit::build(e.store(), "t", 0).unwrap();
    assert!(report.site_level.is_none() && report.record_level.is_none());
    assert!(
        report.summary.starts_with("no differential privacy"),
        "{}",
        report.summary
    );
    let html = crate::audit::to_html(&report).unwrap();
    assert!(html.contains("no differential privacy"));
}

#[test]
fn a_fixed_size_sample_comes_from_the_csprng_not_the_run_seed() {
    let dp = "clip_norm = 1.0\nnoise_multiplier = 2.0\nexpected_sites = 5\n\
              target_epsilon = 100\ntarget_delta = 1e-5\n";
    let names = sites(40);
    let sample = |seed: u64| -> Vec<String> {
        let mut f = fixture(3, dp);
        f.cfg.sampling.count = Some(5);
        f.cfg.validate().unwrap();
        let mut e = engine(&f, seed);
        start(&mut e, &names, T0).into_iter().map(|t| t.0).collect()
    };
    let (a, b) = (sample(1), sample(2));
    assert_eq!((a.len(), b.len()), (5, 5));
    assert_ne!(a, b, "same run seed, different coordinator randomness");
    let f = fixture(3, dp);
    let charged = f
        .cfg
        .site_dp
        .as_ref()
        .unwrap()
        .round_event(&SamplingConfig {
            count: Some(5),
            ..f.cfg.sampling.clone()
        });
    assert_eq!((charged.q, charged.z), (1.0, 1.0), "sensitivity 2C: z/2");
}

#[test]
fn every_update_the_coordinator_receives_is_counted_even_when_refused() {
    let f = fixture(
        2,
        "mode = \"local\"\nclip_norm = 0.5\nnoise_multiplier = 1.0\nexpected_sites = 2\n\
         target_epsilon = 1000\ntarget_delta = 1e-5\n",
    );
    let mut e = engine(&f, 3);
    let names = sites(2);
    let tickets = start(&mut e, &names, T0);
    let (site, t) = &tickets[0];
    // A forged nonce (as after a restart that abandoned the task) and a stranger: refused,
    // but the coordinator saw the bytes.
    let forged = TaskTicket {
        nonce: vec![0; 16],
        ..t.clone()
    };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
    assert_eq!(
        send(&mut e, site, &forged, &zeros(&f), T0 + 1, &mut rng),
        Err(Rejection::WrongTask)
    );
    assert_eq!(
        send(&mut e, "site-999", t, &zeros(&f), T0 + 1, &mut rng),
        Err(Rejection::NotSelected(1))
    );
    let uploads = e.store().site_dp_uploads("t").unwrap();
    assert_eq!(uploads.len(), 2);
    assert_eq!(uploads[1].site_id, "site-999");
    assert_eq!(e.committed_round(), 0, "nothing else changed");
}

#[test]
fn a_run_cannot_resume_with_other_privacy_settings() {
    let f = fixture(
        3,
        "clip_norm = 1.0\nnoise_multiplier = 2.0\nexpected_sites = 2\n\
         target_epsilon = 100\ntarget_delta = 1e-5\n",
    );
    drop(engine(&f, 1));
    let open = |cfg: RunConfig| {
        let store = Store::open(f.dir.path().join("data")).unwrap();
        RoundEngine::open(store, cfg, f.initial.clone())
    };
    let mut weaker = f.cfg.clone();
    weaker.site_dp.as_mut().unwrap().noise_multiplier = 1.0;
    let err = open(weaker).unwrap_err().to_string();
    assert!(
        err.contains("[site_dp]") && err.contains("new run"),
        "{err}"
    );
    let mut none = f.cfg.clone();
    none.site_dp = None;
    assert!(open(none).unwrap_err().to_string().contains("[site_dp]"));
    let mut resampled = f.cfg.clone();
    resampled.sampling.count = Some(1);
    assert!(
        open(resampled)
            .unwrap_err()
            .to_string()
            .contains("[sampling]")
    );
    // The same settings resume.
    open(f.cfg.clone()).unwrap();
}
