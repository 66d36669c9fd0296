//! The compression study: the demo's federation (the same data, seeds, rounds and
//! configuration) once per update compression, each global model scored on every site's
//! validation split, with the bytes its rounds moved (from the coordinator's round metrics).
//! Only the compression differs between the runs, so the accuracy differences are its cost.

use std::path::Path;

use fedflow_common::compress::{Compression, ValueCodec};
use fedflow_coordinator::config::CompressionSection;
use fedflow_coordinator::metrics::TrainingSummary;
use serde::Serialize;

use crate::demo::{DemoConfig, ProgressLine, Scores, generate_sites, pooled, run_config, score};
use crate::{Error, Result, SimOptions, run_federation};

/// One compression of the study: a short name and the `[compression]` section (`None`: plain
/// f32 updates).
#[derive(Debug, Clone)]
pub struct Mode {
    /// What the table calls it.
    pub name: String,
    /// The run's `[compression]`.
    pub section: Option<CompressionSection>,
}

/// The modes the study runs by default: uncompressed, f16, bf16, int8, and top-k at 1%
/// (f32 values with and without error feedback, and int8 values with it).
pub fn default_modes() -> Vec<Mode> {
    let mode = |name: &str, values, top_k, error_feedback| Mode {
        name: name.to_string(),
        section: Some(CompressionSection {
            values,
            top_k,
            error_feedback,
            ..CompressionSection::default()
        }),
    };
    vec![
        Mode {
            name: "none".into(),
            section: None,
        },
        mode("f16", ValueCodec::F16, None, false),
        mode("bf16", ValueCodec::Bf16, None, false),
        mode("int8", ValueCodec::Int8, None, false),
        mode("top1%", ValueCodec::F32, Some(0.01), false),
        mode("top1%+ef", ValueCodec::F32, Some(0.01), true),
        mode("top1%+int8+ef", ValueCodec::Int8, Some(0.01), true),
    ]
}

/// One run of the study.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// The mode's name.
    pub name: String,
    /// The compression's canonical name (`f32` for none).
    pub compression: String,
    /// The final global model on every site's validation split, pooled.
    pub scores: Scores,
    /// Accuracy minus the uncompressed run's, in points (×100).
    pub accuracy_change_points: f64,
    /// Update bytes the coordinator received per round, on average.
    pub upload_bytes_per_round: f64,
    /// The uncompressed run's upload bytes per round divided by this run's.
    pub upload_reduction: f64,
    /// Model bytes sent per round, on average (every selected site downloads the model).
    pub download_bytes_per_round: f64,
    /// Committed rounds.
    pub rounds: u64,
    /// Wall-clock seconds of the federated run.
    pub seconds: f64,
}

/// Runs the demo's federation once per mode (the first mode is the reference the others
/// are compared with) in `<out>/<name>/`, over plaintext loopback gRPC, and writes
/// `<out>/compression.json`.
pub async fn run(
    cfg: &DemoConfig,
    modes: &[Mode],
    say: &mut dyn FnMut(&str),
) -> Result<Vec<ModeResult>> {
    let out = &cfg.out;
    std::fs::create_dir_all(out)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", out.display())))?;
    let (_, vocab_path, vocab, sites) = generate_sites(
        out,
        cfg.sites,
        cfg.sessions,
        cfg.seed,
        cfg.val_fraction,
        say,
    )?;
    let base = run_config(cfg, &vocab_path, sites.len(), out)?;
    let mut results: Vec<ModeResult> = Vec::with_capacity(modes.len());
    for mode in modes {
        let dir = out.join(safe(&mode.name));
        clear(&dir)?;
        let mut run_cfg = base.clone();
        run_cfg.compression = mode.section;
        run_cfg.run.name = format!("compression-{}", safe(&mode.name));
        run_cfg
            .validate()
            .map_err(|e| Error::Other(format!("mode {}: {e}", mode.name)))?;
        let compression = run_cfg.compression();
        say(&format!(
            "{}: {} rounds, updates {}",
            mode.name,
            run_cfg.run.rounds,
            compression.name()
        ));
        let mut line = ProgressLine::default();
        let opts = SimOptions {
            concurrent_work: cfg.concurrent_work,
            ..SimOptions::default()
        };
        let outcome = run_federation(
            run_cfg.clone(),
            &dir.join("coordinator"),
            sites.clone(),
            &vocab,
            &opts,
            |v| line.show(v),
        )
        .await?;
        let mut metrics = Vec::with_capacity(sites.len());
        for s in &sites {
            metrics.push(score(&outcome.global, &run_cfg, &s.dataset)?);
        }
        let scores = pooled(&metrics)?;
        let summaries: Vec<TrainingSummary> = outcome
            .rounds
            .iter()
            .filter(|r| r.round > 0)
            .filter_map(|r| r.metrics_json.as_deref())
            .map(serde_json::from_str)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Other(format!("round metrics: {e}")))?;
        let per_round = |f: fn(&TrainingSummary) -> u64| {
            summaries.iter().map(f).sum::<u64>() as f64 / summaries.len().max(1) as f64
        };
        let upload = per_round(|s| s.upload_bytes);
        let reference = results.first();
        let result = ModeResult {
            name: mode.name.clone(),
            compression: compression.name(),
            scores,
            accuracy_change_points: reference
                .map_or(0.0, |r| 100.0 * (scores.accuracy - r.scores.accuracy)),
            upload_reduction: reference.map_or(1.0, |r| r.upload_bytes_per_round / upload),
            upload_bytes_per_round: upload,
            download_bytes_per_round: per_round(|s| s.download_bytes),
            rounds: outcome.committed_round,
            seconds: outcome.seconds,
        };
        say(&format!(
            "{}: accuracy {:.4} ({:+.2} points), {:.0} upload bytes per round ({:.1}x fewer)",
            result.name,
            result.scores.accuracy,
            result.accuracy_change_points,
            result.upload_bytes_per_round,
            result.upload_reduction
        ));
        results.push(result);
    }
    let json = serde_json::to_string_pretty(&results).map_err(|e| Error::Other(e.to_string()))?;
    fedflow_common::fsio::write_atomic(&out.join("compression.json"), json.as_bytes())?;
    Ok(results)
}

/// The mode's name as a run and directory name.
fn safe(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Removes an earlier study's run in `dir`.
fn clear(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Other(format!("cannot clear {}: {e}", dir.display()))),
    }
}

/// Parses a mode given on the command line: `none`, or `VALUES[/BLOCK][:topFRACTION][+ef]`
/// (e.g. `f16`, `int8/128`, `f32:top0.01+ef`, `int8:top0.01+ef`).
pub fn parse_mode(s: &str) -> std::result::Result<Mode, String> {
    if s == "none" {
        return Ok(Mode {
            name: s.into(),
            section: None,
        });
    }
    let (rest, ef) = match s.strip_suffix("+ef") {
        Some(r) => (r, true),
        None => (s, false),
    };
    let (values, top_k) = match rest.split_once(":top") {
        Some((v, f)) => (
            v,
            Some(
                f.parse::<f64>()
                    .map_err(|_| format!("{s}: {f} is not a fraction"))?,
            ),
        ),
        None => (rest, None),
    };
    let (values, block) = match values.split_once('/') {
        Some((v, b)) => (
            v,
            b.parse::<usize>()
                .map_err(|_| format!("{s}: {b} is not a block size"))?,
        ),
        None => (values, fedflow_common::compress::DEFAULT_BLOCK),
    };
    let values = ValueCodec::parse(values)
        .ok_or_else(|| format!("{s}: {values} is not f32, f16, bf16 or int8"))?;
    let section = CompressionSection {
        values,
        block_size: block,
        top_k,
        error_feedback: ef,
    };
    let c: Compression = section.compression();
    c.check().map_err(|e| format!("{s}: {e}"))?;
    Ok(Mode {
        name: s.into(),
        section: Some(section),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_from_their_names() {
        assert!(parse_mode("none").unwrap().section.is_none());
        let m = parse_mode("int8/128:top0.01+ef").unwrap();
        assert_eq!(
            m.section.unwrap().compression().name(),
            "top0.01+int8/128+ef"
        );
        assert_eq!(
            parse_mode("bf16").unwrap().section.unwrap().values,
            ValueCodec::Bf16
        );
        for bad in ["int4", "f16:top2", "f32+ef", "int8/x"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
        for m in default_modes() {
            if let Some(s) = m.section {
                s.compression().check().unwrap();
            }
        }
    }
}
