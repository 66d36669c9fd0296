//! `fedflow-coordinator pki ...` and `fedflow-coordinator audit-log verify`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use fedflow_coordinator::security::pki::{Ca, Validity};
use fedflow_coordinator::security::{Role, audit_log};

/// Longest validity accepted, in days (a hundred years).
const MAX_DAYS: u32 = 36_500;

/// `--days`: 1 to [`MAX_DAYS`]. Zero would write a certificate that has already expired.
fn days() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(MAX_DAYS))
}

/// The federation's certificate authority.
#[derive(Debug, Subcommand)]
pub(crate) enum Pki {
    /// Create the federation's CA in DIR (ca.pem, ca.key, issued.jsonl). Keep ca.key offline.
    Init {
        /// The PKI directory (created, mode 0700).
        #[arg(long)]
        dir: PathBuf,
        /// Validity of the CA certificate, in days (1 to 36500).
        #[arg(long, default_value_t = 3650, value_parser = days())]
        days: u32,
    },
    /// Issue the coordinator's server certificate for the names sites connect to.
    Server {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// A DNS name or IP address of the coordinator (repeat for several).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Validity in days (1 to 36500).
        #[arg(long, default_value_t = 825, value_parser = days())]
        days: u32,
        /// The bundle directory to write (default: DIR/coordinator).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Issue a site's or an operator's certificate bundle (cert.pem, key.pem, ca.pem).
    /// Issuing again for the same name (to another --out) rotates the certificate: the
    /// identity and its history stay, the serial is new.
    Issue {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// site, viewer or admin.
        #[arg(long)]
        role: String,
        /// The site id or operator name.
        #[arg(long)]
        name: String,
        /// Validity in days (1 to 36500).
        #[arg(long, default_value_t = 365, value_parser = days())]
        days: u32,
        /// The bundle directory to write (default: DIR/<role>s/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Sign a certificate request a site (or operator) made with its own key
    /// (`fedflow-client enrol-request`): writes cert.pem and ca.pem, and no key, to --out;
    /// send both back, to go beside the requester's key.pem. The request's name must be
    /// --name; the role, validity and usages are decided here.
    Sign {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// The request (PEM).
        #[arg(long)]
        request: PathBuf,
        /// site, viewer or admin.
        #[arg(long)]
        role: String,
        /// The site id or operator name the request must be for.
        #[arg(long)]
        name: String,
        /// Validity in days (1 to 36500).
        #[arg(long, default_value_t = 365, value_parser = days())]
        days: u32,
        /// The directory to write cert.pem and ca.pem to (default: DIR/<role>s/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Also trust another federation CA (its ca.pem) in every bundle issued from now on,
    /// for a CA rollover: run it on the new CA's directory with the old CA's certificate and
    /// on the old one's with the new CA's (see deploy/README.md, "Rolling over the CA").
    Trust {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// The other CA's certificate (PEM).
        #[arg(long)]
        add: PathBuf,
    },
}

/// Runs a `pki` command.
pub(crate) fn pki(cmd: Pki) -> anyhow::Result<()> {
    match cmd {
        Pki::Init { dir, days } => {
            Ca::init(&dir, Validity::days(days))?;
            println!(
                "created the federation CA in {} (keep {} offline; give sites and operators only their bundles)",
                dir.display(),
                dir.join(fedflow_coordinator::security::pki::CA_KEY)
                    .display()
            );
        }
        Pki::Server {
            dir,
            names,
            days,
            out,
        } => {
            let ca = Ca::load(&dir)?;
            let out = out.unwrap_or_else(|| dir.join("coordinator"));
            let issued = ca.issue_server(&names, Validity::days(days), &out)?;
            println!(
                "issued the coordinator's certificate for {} (serial {}) into {}: serve with --tls {}",
                names.join(", "),
                issued.serial,
                out.display(),
                out.display()
            );
        }
        Pki::Issue {
            dir,
            role,
            name,
            days,
            out,
        } => {
            let Some(role) = Role::parse(&role) else {
                bail!("--role {role:?}: use site, viewer or admin");
            };
            let ca = Ca::load(&dir)?;
            let out = out.unwrap_or_else(|| dir.join(format!("{role}s")).join(&name));
            let issued = ca.issue(role, &name, Validity::days(days), &out)?;
            println!(
                "issued {} (serial {}) into {}",
                issued.uri,
                issued.serial,
                out.display()
            );
        }
        Pki::Sign {
            dir,
            request,
            role,
            name,
            days,
            out,
        } => {
            let Some(role) = Role::parse(&role) else {
                bail!("--role {role:?}: use site, viewer or admin");
            };
            let pem = std::fs::read_to_string(&request)
                .with_context(|| format!("reading {}", request.display()))?;
            let ca = Ca::load(&dir)?;
            let out = out.unwrap_or_else(|| dir.join(format!("{role}s")).join(&name));
            let issued = ca
                .sign_request(&pem, role, &name, Validity::days(days), &out)
                .with_context(|| format!("signing {}", request.display()))?;
            println!(
                "signed {} (serial {}) into {}: send cert.pem and ca.pem to the requester, to \
                 go beside its key.pem (its key never came here)",
                issued.uri,
                issued.serial,
                out.display()
            );
        }
        Pki::Trust { dir, add } => {
            let pem = std::fs::read_to_string(&add)
                .with_context(|| format!("reading {}", add.display()))?;
            let ca = Ca::load(&dir)?;
            let added = ca.trust(&pem, &add)?;
            println!(
                "{} now trusts {added} more CA certificate(s) ({} in all): bundles issued from \
                 it from now on carry them in ca.pem",
                dir.display(),
                ca.trust_pem()?
                    .matches("-----BEGIN CERTIFICATE-----")
                    .count()
            );
        }
    }
    Ok(())
}

/// `audit-log verify FILE`: exit status 0 when the chain verifies, an error naming the
/// first bad line otherwise.
pub(crate) fn verify_audit_log(file: &Path) -> anyhow::Result<()> {
    match audit_log::verify(file)? {
        Ok(v) => {
            println!(
                "{}: {} event(s), chain intact; last hash {}",
                file.display(),
                v.lines,
                v.head
            );
            Ok(())
        }
        Err(b) => bail!("{}: tampered or damaged at {b}", file.display()),
    }
}
