//! The agent's configuration file (`site.toml`): every field documented here and in
//! `client/examples/site.toml`, unknown fields refused, every value checked with the field
//! named. Relative paths are relative to the file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedflow_common::device::DeviceChoice;
use serde::Deserialize;

use super::http::ApiLimits;
use crate::personalise::PersonaliseConfig;
use crate::{Error, Result};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `[site]`: who the site is and where it keeps its state.
    pub site: SiteSection,
    /// `[coordinator]`: the federation to join.
    pub coordinator: CoordinatorSection,
    /// `[http]`: the local API.
    #[serde(default)]
    pub http: HttpSection,
    /// `[training]`: how the site trains on its feedback.
    #[serde(default)]
    pub training: TrainingSection,
    /// `[retention]`: how long feedback is kept.
    #[serde(default)]
    pub retention: RetentionSection,
    /// `[privacy]`: the site's record-level privacy ledger and limit (needed for runs with
    /// DP-SGD).
    #[serde(default)]
    pub privacy: Option<PrivacySection>,
    /// `[personalisation]`: fine-tune each published version on the site's data and serve
    /// the result when it predicts the site better (off without the section).
    #[serde(default)]
    pub personalisation: Option<PersonaliseConfig>,
}

/// `[site]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// The site's id; under mutual TLS the certificate's, and may be left out.
    #[serde(default)]
    pub id: Option<String>,
    /// The site's state: `feedback/` (the store), `published/` (the served versions) and
    /// `state/` (the trainer's: error feedback's residual of compressed updates).
    pub data_dir: PathBuf,
    /// The federation's event vocabulary.
    pub vocab: PathBuf,
}

/// `[coordinator]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    /// `https://HOST:PORT` (with `identity`) or `http://HOST:PORT` (with
    /// `insecure_plaintext`).
    pub url: String,
    /// The site's certificate bundle (cert.pem, key.pem, ca.pem).
    #[serde(default)]
    pub identity: Option<PathBuf>,
    /// Talk to a coordinator serving plaintext.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// What the agent does with event names the vocabulary does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownEvents {
    /// Store them (encoded as unknown, or into the vocabulary's buckets).
    #[default]
    Accept,
    /// Refuse the request (422).
    Refuse,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Where the API listens; default 127.0.0.1:8088. Any other than a loopback address
    /// needs TLS (`tls_cert`, `tls_key`) and a way to authenticate callers (`token_file`
    /// or `tls_client_ca`).
    pub listen: SocketAddr,
    /// A file holding the bearer token every request must carry.
    pub token_file: Option<PathBuf>,
    /// The API's certificate chain (PEM): serve HTTPS instead of HTTP.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// Callers must present a certificate chained to this CA (PEM): mutual TLS.
    pub tls_client_ca: Option<PathBuf>,
    /// Largest request body, bytes (default 1 MiB).
    pub max_body_bytes: usize,
    /// Most sessions in one request (default 1000).
    pub max_sessions: usize,
    /// Most events in one session (default 1000).
    pub max_events: usize,
    /// `"accept"` (default) or `"refuse"` feedback with unknown event names.
    pub unknown_events: UnknownEvents,
    /// Feedback and predict requests per second, sustained (unset: unlimited).
    pub rate_per_second: Option<f64>,
    /// Requests at once above that rate (default 100).
    pub burst: u32,
}

impl Default for HttpSection {
    fn default() -> Self {
        let d = ApiLimits::default();
        HttpSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8088)),
            token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            max_body_bytes: d.max_body_bytes,
            max_sessions: d.max_sessions,
            max_events: d.max_events,
            unknown_events: UnknownEvents::Accept,
            rate_per_second: d.rate_per_second,
            burst: d.burst,
        }
    }
}

/// `[training]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSection {
    /// Fraction of sessions held out for validation, by hashed session id (default 0.2).
    pub val_fraction: f64,
    /// `auto`, `cpu`, `cuda[:N]` or `metal` (default `cpu`).
    pub device: DeviceChoice,
}

impl Default for TrainingSection {
    fn default() -> Self {
        TrainingSection {
            val_fraction: crate::local::DEFAULT_VAL_FRACTION,
            device: DeviceChoice::Cpu,
        }
    }
}

/// `[retention]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSection {
    /// Delete feedback older than this many days (unset: keep).
    pub max_age_days: Option<f64>,
    /// Keep at most this many sessions, the newest (unset: all).
    pub max_sessions: Option<u64>,
}

/// `[privacy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    /// The ledger's folder; keep it for the site's whole life.
    pub dir: PathBuf,
    /// The most record-level epsilon the ledger may ever reach, at `delta`.
    pub max_epsilon: f64,
    /// delta of the limit (default 1e-5).
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// Release metrics computed on the site's data with DP updates (outside the guarantee).
    #[serde(default)]
    pub release_metrics: bool,
}

fn default_delta() -> f64 {
    1e-5
}

impl AgentConfig {
    /// Reads and checks `path`; errors name the file and the field.
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|reason| Error::ConfigFile {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses and checks `text`, resolving relative paths against `base`.
    pub fn parse(text: &str, base: &Path) -> std::result::Result<AgentConfig, String> {
        let mut c: AgentConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut c.site.data_dir);
        resolve(&mut c.site.vocab);
        if let Some(p) = &mut c.coordinator.identity {
            resolve(p);
        }
        for p in [
            &mut c.http.token_file,
            &mut c.http.tls_cert,
            &mut c.http.tls_key,
            &mut c.http.tls_client_ca,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        if let Some(p) = &mut c.privacy {
            resolve(&mut p.dir);
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the values, naming the first bad field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let h = &self.http;
        match (&h.tls_cert, &h.tls_key) {
            (Some(_), None) => return Err("http.tls_key: tls_cert is set, its key is not".into()),
            (None, Some(_)) => {
                return Err("http.tls_cert: tls_key is set, its certificate is not".into());
            }
            _ => {}
        }
        if h.tls_client_ca.is_some() && h.tls_cert.is_none() {
            return Err(
                "http.tls_client_ca: needs tls_cert and tls_key (mutual TLS is TLS)".into(),
            );
        }
        if !h.listen.ip().is_loopback() {
            if h.tls_cert.is_none() {
                return Err(format!(
                    "http.listen: {} is not a loopback address; set http.tls_cert and \
                     http.tls_key so that other hosts talk to the API over TLS",
                    h.listen
                ));
            }
            if h.token_file.is_none() && h.tls_client_ca.is_none() {
                return Err(format!(
                    "http.listen: {} is not a loopback address; set http.token_file or \
                     http.tls_client_ca so that other hosts must authenticate",
                    h.listen
                ));
            }
        }
        for (field, v) in [
            ("http.max_body_bytes", self.http.max_body_bytes),
            ("http.max_sessions", self.http.max_sessions),
            ("http.max_events", self.http.max_events),
        ] {
            if v == 0 {
                return Err(format!("{field}: must be at least 1"));
            }
        }
        if let Some(r) = self.http.rate_per_second
            && !(r.is_finite() && r > 0.0)
        {
            return Err(format!(
                "http.rate_per_second: {r} is not a positive number"
            ));
        }
        if self.http.burst == 0 {
            return Err("http.burst: must be at least 1".into());
        }
        let f = self.training.val_fraction;
        if !(f > 0.0 && f < 1.0) {
            return Err(format!("training.val_fraction: {f} is not in (0, 1)"));
        }
        if let Some(d) = self.retention.max_age_days
            && !(d.is_finite() && d > 0.0)
        {
            return Err(format!(
                "retention.max_age_days: {d} is not a positive number"
            ));
        }
        if self.retention.max_sessions == Some(0) {
            return Err(
                "retention.max_sessions: must be at least 1 (leave it out to keep all)".into(),
            );
        }
        if let Some(p) = &self.personalisation {
            p.validate("personalisation.")?;
        }
        if let Some(p) = &self.privacy {
            if !(p.max_epsilon.is_finite() && p.max_epsilon > 0.0) {
                return Err(format!(
                    "privacy.max_epsilon: {} is not a positive number",
                    p.max_epsilon
                ));
            }
            if !(p.delta > 0.0 && p.delta < 1.0) {
                return Err(format!("privacy.delta: {} is not in (0, 1)", p.delta));
            }
        }
        Ok(())
    }

    /// The API's limits, with the token read from `http.token_file`.
    pub fn api_limits(&self) -> Result<ApiLimits> {
        let token = match &self.http.token_file {
            None => None,
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| Error::ConfigFile {
                        path: p.clone(),
                        reason: format!("http.token_file: {e}"),
                    })?
                    .trim()
                    .to_string();
                if t.len() < 16 {
                    return Err(Error::ConfigFile {
                        path: p.clone(),
                        reason: "http.token_file: the token must have at least 16 characters"
                            .into(),
                    });
                }
                Some(t)
            }
        };
        Ok(ApiLimits {
            max_body_bytes: self.http.max_body_bytes,
            max_sessions: self.http.max_sessions,
            max_events: self.http.max_events,
            refuse_unknown_events: self.http.unknown_events == UnknownEvents::Refuse,
            token,
            rate_per_second: self.http.rate_per_second,
            burst: self.http.burst,
        })
    }
}
