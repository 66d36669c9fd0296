//! `fedflow-ctl`: the operators' command line. Talks to a running coordinator over its
//! `Admin` gRPC service (with the operator's certificate bundle under mutual TLS), from any
//! machine that can reach it.
//!
//! Exit codes scripts can rely on: 0 done; 1 any other error; 2 bad command line; 3 the
//! coordinator cannot be reached; 4 refused: no or wrong certificate, revoked, or the role
//! does not allow it; 5 the coordinator refused the request as it stands (e.g. resuming a
//! finished run, an unknown run, a malformed reason or serial, revoking the caller's own
//! identity without `--force`).
//!
//! Everything printed that came from the coordinator is escaped (`fedflow_common::text`):
//! text chosen by sites and operators never sends a control sequence to the terminal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fedflow_proto::tls::{Bundle, check_endpoint, connect, error_chain, is_certificate_error};
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::{
    GetStatusRequest, IssueEnrolmentTokenRequest, ListModelsRequest, ListRevocationsRequest,
    ListRoundsRequest, ListRunsRequest, ListSitesRequest, PublishRequest, RevokeRequest,
    RunActionRequest, RunPhase,
};
use tonic::transport::Channel;

mod json;
mod table;

/// fedflow's operator CLI: status, history and actions on a running coordinator.
#[derive(Debug, Parser)]
#[command(name = "fedflow-ctl", version)]
struct Cli {
    /// The coordinator's address: https://HOST:PORT (with --identity) or http://HOST:PORT
    /// (with --insecure-plaintext).
    #[arg(
        long,
        env = "FEDFLOW_COORDINATOR",
        default_value = "https://127.0.0.1:50051"
    )]
    coordinator: String,
    /// The operator's certificate bundle (cert.pem, key.pem, ca.pem from `fedflow-coordinator
    /// pki issue --role viewer|admin`).
    #[arg(long, env = "FEDFLOW_IDENTITY")]
    identity: Option<PathBuf>,
    /// Talk to a coordinator serving plaintext.
    #[arg(long)]
    insecure_plaintext: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Where the run stands: round, phase, deadline, every site's state, metrics, privacy.
    Status {
        /// Print JSON (schema `fedflow.status/1`, see `json.rs`) instead of a table.
        #[arg(long)]
        json: bool,
        /// Redraw until the run ends (with --json: one JSON document per line).
        #[arg(long)]
        watch: bool,
        /// Seconds between redraws with --watch.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
    },
    /// Every run the coordinator knows.
    Runs {
        /// Print JSON (schema `fedflow.runs/1`).
        #[arg(long)]
        json: bool,
    },
    /// A run's rounds: metrics, participation, timing (default: the current run).
    Rounds {
        /// The run.
        run: Option<String>,
        /// Print JSON (schema `fedflow.rounds/1`).
        #[arg(long)]
        json: bool,
    },
    /// Every site the coordinator has heard from.
    Sites {
        /// Print JSON (schema `fedflow.sites/1`).
        #[arg(long)]
        json: bool,
    },
    /// Revocations in force.
    Revocations {
        /// Print JSON (schema `fedflow.revocations/1`).
        #[arg(long)]
        json: bool,
    },
    /// The run's model versions: evaluation, the publish gate's decision, which is
    /// published and since when, which checkpoints are kept.
    Models {
        /// Print JSON (schema `fedflow.models/1`).
        #[arg(long)]
        json: bool,
    },
    /// Ask a coordinator's plaintext health endpoint (`serve --health-listen`) whether it
    /// is ready: exit 0 when SERVING, 1 when not, 3 when unreachable (container health
    /// checks, scripts). Needs no identity.
    Health {
        /// The health endpoint, HOST:PORT.
        #[arg(long, default_value = "127.0.0.1:50052")]
        address: String,
    },
    /// Publish a committed version (admin): the sites serve it from their next poll.
    Publish {
        /// The version (its round).
        round: u64,
        /// Why (recorded).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Publish again the version published before the current one (admin).
    Rollback {
        /// Why (recorded).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Pause the run (admin): the open round completes, no new one starts.
    Pause {
        /// Why (recorded).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume a paused run (admin).
    Resume {
        /// Why (recorded).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Stop the run for good (admin): the open round is discarded.
    Stop {
        /// Why (recorded).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Revoke a site's or operator's identity, or one certificate (admin).
    Revoke {
        /// A site id: every certificate of the site.
        #[arg(long, group = "what")]
        site: Option<String>,
        /// A viewer's name.
        #[arg(long, group = "what")]
        viewer: Option<String>,
        /// An admin's name.
        #[arg(long, group = "what")]
        admin: Option<String>,
        /// One certificate's serial (hex, as `pki issue` printed it).
        #[arg(long, group = "what")]
        serial: Option<String>,
        /// Why (recorded).
        #[arg(long, default_value = "")]
        reason: String,
        /// Revoke it even if it is the identity or certificate of --identity (which locks
        /// you out); refused without.
        #[arg(long)]
        force: bool,
    },
    /// Issue a one-time enrolment token for a new site (admin): the site redeems it once,
    /// before it expires, with `fedflow-client enrol --token` on the coordinator's enrolment
    /// port. Prints the token alone on stdout; give it to the site over a channel you trust.
    EnrolToken {
        /// The site the token enrols (and no other).
        #[arg(long)]
        site: String,
        /// How long it can be redeemed, in seconds (at most a week).
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// Why (recorded).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// Maps a gRPC status to an exit code and a message that says what to do.
fn from_status(s: tonic::Status, coordinator: &str) -> Failure {
    use tonic::Code;
    let msg = s.message().to_string();
    // Under TLS 1.3 a refused client certificate shows up on the first call.
    if is_certificate_error(&s) {
        return Failure::new(
            4,
            format!(
                "refused by TLS: {}. Is --identity a valid, unrevoked certificate of this \
                 federation?",
                error_chain(&s)
            ),
        );
    }
    match s.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
            Failure::new(
                3,
                format!(
                    "cannot reach the coordinator at {coordinator}: {msg}. Is it running? Is the \
                 address right, and is --identity's ca.pem the federation's CA?"
                ),
            )
        }
        Code::Unauthenticated | Code::PermissionDenied => {
            Failure::new(4, format!("refused: {msg}"))
        }
        Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument | Code::AlreadyExists => {
            Failure::new(5, msg)
        }
        _ => Failure::new(1, format!("{:?}: {msg}", s.code())),
    }
}

async fn client(cli: &Cli) -> Result<AdminClient<Channel>, Failure> {
    let bundle = match &cli.identity {
        Some(dir) => Some(Bundle::load(dir).map_err(|e| Failure::new(4, e.0))?),
        None => None,
    };
    check_endpoint(&cli.coordinator, bundle.as_ref(), cli.insecure_plaintext)
        .map_err(|e| Failure::new(2, e.0))?;
    let channel = connect(&cli.coordinator, bundle.as_ref())
        .await
        .map_err(|e| {
            if is_certificate_error(&e) {
                Failure::new(
                    4,
                    format!(
                        "TLS with {} failed: {}. Check that --identity's ca.pem is the \
                         federation's CA and that the address is a name in the coordinator's \
                         certificate",
                        cli.coordinator,
                        error_chain(&e)
                    ),
                )
            } else {
                Failure::new(
                    3,
                    format!(
                        "cannot reach the coordinator at {}: {}. Is it running, and is the address right?",
                        cli.coordinator,
                        error_chain(&e)
                    ),
                )
            }
        })?;
    Ok(AdminClient::new(channel).max_decoding_message_size(64 << 20))
}

/// `health`: the plaintext gRPC health check.
async fn health(address: &str) -> Result<(), Failure> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| Failure::new(2, format!("--address {address}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| Failure::new(3, format!("cannot reach {address}: {e}")))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map_err(|s| Failure::new(3, format!("{address}: {}", s.message())))?
        .into_inner();
    if reply.status == ServingStatus::Serving as i32 {
        println!("SERVING");
        Ok(())
    } else {
        Err(Failure::new(
            1,
            format!(
                "{address}: {}",
                ServingStatus::try_from(reply.status).map_or("unknown status".to_string(), |s| s
                    .as_str_name()
                    .to_string())
            ),
        ))
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Health { address } = &cli.command {
        return health(address).await;
    }
    let mut admin = client(&cli).await?;
    let at = cli.coordinator.as_str();
    let st = |s| from_status(s, at);
    match cli.command {
        Command::Status {
            json,
            watch,
            interval,
        } => loop {
            let s = admin
                .get_status(GetStatusRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let finished = s.phase == RunPhase::Finished as i32;
            if json {
                println!("{}", json::print(&json::status(&s)));
            } else {
                if watch {
                    // Clear the screen and go home, then draw.
                    print!("\x1b[H\x1b[2J");
                }
                print!("{}", table::status(&s));
            }
            if !watch || finished {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs_f64(interval.max(0.1))).await;
        },
        Command::Runs { json } => {
            let r = admin
                .list_runs(ListRunsRequest {})
                .await
                .map_err(st)?
                .into_inner();
            if json {
                println!("{}", json::print(&json::runs(&r)));
            } else {
                print!("{}", table::runs(&r));
            }
        }
        Command::Rounds { run, json } => {
            let r = admin
                .list_rounds(ListRoundsRequest {
                    run_id: run.unwrap_or_default(),
                })
                .await
                .map_err(st)?
                .into_inner();
            if json {
                println!("{}", json::print(&json::rounds(&r)));
            } else {
                print!("{}", table::rounds(&r));
            }
        }
        Command::Sites { json } => {
            let r = admin
                .list_sites(ListSitesRequest {})
                .await
                .map_err(st)?
                .into_inner();
            if json {
                println!("{}", json::print(&json::sites(&r)));
            } else {
                print!("{}", table::sites(&r));
            }
        }
        Command::Revocations { json } => {
            let r = admin
                .list_revocations(ListRevocationsRequest {})
                .await
                .map_err(st)?
                .into_inner();
            if json {
                println!("{}", json::print(&json::revocations(&r)));
            } else {
                print!("{}", table::revocations(&r));
            }
        }
        Command::Models { json } => {
            let r = admin
                .list_models(ListModelsRequest {})
                .await
                .map_err(st)?
                .into_inner();
            if json {
                println!("{}", json::print(&json::models(&r)));
            } else {
                print!("{}", table::models(&r, fedflow_common::clock::now_ms()));
            }
        }
        Command::Health { .. } => unreachable!("answered before connecting"),
        Command::Publish { round, reason } => {
            let r = admin
                .publish(PublishRequest { round, reason })
                .await
                .map_err(st)?
                .into_inner();
            let round = r.published.map(|p| p.round).unwrap_or(round);
            println!("version {round} published");
        }
        Command::Rollback { reason } => {
            let r = admin
                .rollback(RunActionRequest { reason })
                .await
                .map_err(st)?
                .into_inner();
            match r.published {
                Some(p) => println!("version {} published again", p.round),
                None => println!("rolled back"),
            }
        }
        Command::Pause { reason } => {
            let r = admin
                .pause_run(RunActionRequest { reason })
                .await
                .map_err(st)?;
            println!(
                "run {}",
                fedflow_common::text::escape(&r.into_inner().status)
            );
        }
        Command::Resume { reason } => {
            let r = admin
                .resume_run(RunActionRequest { reason })
                .await
                .map_err(st)?;
            println!(
                "run {}",
                fedflow_common::text::escape(&r.into_inner().status)
            );
        }
        Command::Stop { reason } => {
            let r = admin
                .stop_run(RunActionRequest { reason })
                .await
                .map_err(st)?;
            println!(
                "run {}",
                fedflow_common::text::escape(&r.into_inner().status)
            );
        }
        Command::Revoke {
            site,
            viewer,
            admin: admin_name,
            serial,
            reason,
            force,
        } => {
            let req = match (site, viewer, admin_name, serial) {
                (Some(n), ..) => ("site", n, String::new()),
                (_, Some(n), ..) => ("viewer", n, String::new()),
                (_, _, Some(n), _) => ("admin", n, String::new()),
                (_, _, _, Some(s)) => ("", String::new(), s),
                _ => {
                    return Err(Failure::new(
                        2,
                        "revoke needs one of --site, --viewer, --admin or --serial",
                    ));
                }
            };
            let r = admin
                .revoke(RevokeRequest {
                    role: req.0.into(),
                    name: req.1,
                    serial: req.2,
                    reason,
                    force,
                })
                .await
                .map_err(st)?
                .into_inner();
            println!(
                "{}",
                if r.already_revoked {
                    "already revoked"
                } else {
                    "revoked"
                }
            );
        }
        Command::EnrolToken {
            site,
            ttl_secs,
            reason,
        } => {
            let r = admin
                .issue_enrolment_token(IssueEnrolmentTokenRequest {
                    site: site.clone(),
                    ttl_seconds: ttl_secs,
                    reason,
                })
                .await
                .map_err(st)?
                .into_inner();
            eprintln!(
                "token {} enrols site {site} once, within {}s (until Unix ms {})",
                r.token_id,
                (r.expires_unix_ms - fedflow_common::clock::now_ms()).max(0) / 1000,
                r.expires_unix_ms
            );
            println!("{}", r.token);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // The message may quote the coordinator's answer: text a site or an operator
            // chose, printed escaped.
            eprintln!("error: {}", fedflow_common::text::escape(&f.message));
            ExitCode::from(f.code)
        }
    }
}
