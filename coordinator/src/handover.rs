//! The hand-over package for a new partner site: what it needs from the organisation,
//! besides its own key and signed certificate, to join a run — the federation's CA
//! certificate, the coordinator's address, the vocabulary, a `site.toml` to start from, and
//! the run's terms in plain words (`TERMS.md`: what leaves the site, and the privacy the
//! run promises, with the ε it costs sites of a few sizes computed by the same accountant
//! the sites' ledgers use).

use std::fmt::Write as _;
use std::path::Path;

use fedflow_common::privacy::dpfedavg::TrustMode;
use fedflow_common::train::PrivacyUnit;

use crate::config::{RunConfig, ScheduleMode};
use crate::{Error, Result};

/// The terms file's name in the package.
pub const TERMS_FILE: &str = "TERMS.md";

/// Writes the package for `cfg` into the new directory `out`: `ca.pem` (copied from
/// `ca_pem`), `vocab.json`, `site.toml` (pointing at `address`) and [`TERMS_FILE`].
pub fn write(cfg: &RunConfig, ca_pem: &Path, address: &str, out: &Path) -> Result<()> {
    if out.exists() {
        return Err(Error::Store(format!(
            "{} exists: the package goes to a new directory",
            out.display()
        )));
    }
    if !address.starts_with("https://") {
        return Err(Error::BadRequest(format!(
            "--address {address:?}: sites join over mutual TLS, give https://HOST:PORT"
        )));
    }
    let ca =
        std::fs::read(ca_pem).map_err(|e| Error::Store(format!("{}: {e}", ca_pem.display())))?;
    let io = |p: &Path, e: std::io::Error| Error::Store(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    fedflow_common::fsio::write_atomic(&out.join("ca.pem"), &ca)?;
    let vocab = fedflow_common::data::Vocab::load(&cfg.model.vocab)?;
    vocab.save(out.join("vocab.json"))?;
    fedflow_common::fsio::write_atomic(&out.join("site.toml"), site_toml(cfg, address).as_bytes())?;
    fedflow_common::fsio::write_atomic(&out.join(TERMS_FILE), terms(cfg, address)?.as_bytes())?;
    Ok(())
}

fn site_toml(cfg: &RunConfig, address: &str) -> String {
    let mut s = format!(
        "# A site's agent for run `{}` (every key: client/examples/site.toml).\n\
         # Make the key here: fedflow-client enrol-request --name YOUR-SITE --out bundle\n\
         # and put the cert.pem you get back into bundle/, with this package's ca.pem.\n\
         [site]\ndata_dir = \"site-data\"\nvocab = \"vocab.json\"\n\n\
         [coordinator]\nurl = \"{address}\"\nidentity = \"bundle\"\n\n\
         [http]\nlisten = \"127.0.0.1:8088\"\n",
        cfg.run.name
    );
    if let Some(dp) = &cfg.record_dp {
        let _ = write!(
            s,
            "\n# The run trains with record-level DP: the site's ledger and its own limit (at\n\
             # most the run's target; lower is allowed).\n\
             [privacy]\ndir = \"ledger\"\nmax_epsilon = {:?}\ndelta = {:e}\n",
            dp.target_epsilon, dp.target_delta
        );
    }
    s
}

fn terms(cfg: &RunConfig, address: &str) -> Result<String> {
    let mut t = String::new();
    let rounds = match cfg.schedule.mode {
        ScheduleMode::Continuous => format!(
            "continuous (a round at least every {} s until the organisation stops it or the \
             privacy budget ends it)",
            cfg.schedule.interval_secs
        ),
        _ => format!("{} rounds", cfg.run.rounds),
    };
    let _ = writeln!(t, "# Joining run `{}`\n", cfg.run.name);
    let _ = writeln!(
        t,
        "- Coordinator: `{address}`, mutual TLS; your certificate names your site.\n\
         - Schedule: {rounds}; each round your site trains {} local epoch(s) from the \
         federation's model on the sessions it holds when the round starts.\n\
         - Model: {} encoder, {} layer(s) of {} units, on the events of `vocab.json` \
         (its SHA-256 is checked at enrolment).\n",
        cfg.train.epochs,
        format!("{:?}", cfg.model.encoder).to_lowercase(),
        cfg.model.num_layers,
        cfg.model.hidden_size
    );
    let _ = writeln!(t, "## What leaves your site\n");
    let _ = writeln!(
        t,
        "Never a session, an event name outside the vocabulary, or a user id. Each round: \
         the change your training made to the model's weights (the *update*), and the \
         number of sessions it trained on; also training and validation metrics unless the \
         run is private or your site withholds them (`join --withhold-metrics`).\n"
    );
    let _ = writeln!(t, "## Privacy\n");
    match &cfg.record_dp {
        None => {
            let _ = writeln!(
                t,
                "**Record level: none.** Updates are not differentially private with respect \
                 to your sessions: the organisation's coordinator sees your site's update."
            );
        }
        Some(dp) => {
            let unit = match dp.unit {
                PrivacyUnit::Session => "session".to_string(),
                PrivacyUnit::User => format!(
                    "user (all of a user's sessions together, at most {} of them used)",
                    dp.max_sessions_per_user
                ),
            };
            let _ = writeln!(
                t,
                "**Record level: DP-SGD at your site** (Abadi et al. 2016), protecting each \
                 {unit} against everyone who sees your updates, the organisation included. \
                 Each {}'s gradient is clipped to L2 norm {}, and Gaussian noise with standard \
                 deviation {} x {} is added to every batch's sum; batches are drawn by \
                 Poisson sampling ({}). Your site's ledger records every release before it \
                 is sent and declines a round that would take your site past the run's \
                 target, epsilon {} at delta {:e}; you may set a lower limit of your own.\n",
                if dp.unit == PrivacyUnit::User {
                    "user"
                } else {
                    "session"
                },
                dp.clip_norm,
                dp.noise_multiplier,
                dp.clip_norm,
                match (dp.expected_batch_size, dp.sampling_rate) {
                    (Some(b), _) => format!("expected batch {b}, so smaller sites spend more"),
                    (_, Some(q)) => format!("rate {q} at every site"),
                    _ => "as configured".to_string(),
                },
                dp.target_epsilon,
                dp.target_delta
            );
            let _ = writeln!(
                t,
                "What a site of a given size spends over the whole run if it takes part in \
                 every round (the smaller of the RDP and PLD bounds, the same computation as the site's \
                 ledger):\n\n\
                 | privacy units at the site | epsilon at delta {:e} |\n|---:|---:|",
                dp.target_delta
            );
            let rounds = match cfg.schedule.mode {
                ScheduleMode::Continuous => None,
                _ => Some(cfg.run.rounds),
            };
            for n in [500usize, 2_000, 10_000] {
                let cell = match rounds {
                    Some(r) => format!("{:.3}", dp.site_epsilon(n, cfg.train.epochs, r)?),
                    None => "until the target stops it".to_string(),
                };
                let _ = writeln!(t, "| {n} | {cell} |");
            }
            let _ = writeln!(t);
        }
    }
    match &cfg.site_dp {
        None => {
            let _ = writeln!(
                t,
                "**Site level: none.** The released models are not differentially private with respect to whole sites."
            );
        }
        Some(s) => {
            let who = match s.mode {
                TrustMode::Central => {
                    "the coordinator adds all the noise (it sees clipped updates)"
                }
                TrustMode::Distributed => {
                    "each site adds its share of the noise (the coordinator sees each update with that share only)"
                }
                TrustMode::Local => "each site adds all of the noise to its own update",
            };
            let _ = writeln!(
                t,
                "**Site level: DP-FedAvg** (McMahan et al. 2018), protecting each site's whole \
                 contribution in the models the run releases: every update is clipped to L2 \
                 norm {}; {who}; noise standard deviation {} x {} on the sum. The run stops \
                 before its site-level epsilon passes {} at delta {:e}; the coordinator's \
                 privacy-audit report states what was spent.",
                s.clip_norm, s.noise_multiplier, s.clip_norm, s.target_epsilon, s.target_delta
            );
        }
    }
    Ok(t)
}
