//! Enrolment that keeps the site's private key at the site: the site makes its own key
//! (ECDSA P-256) and a certificate request naming it; the federation's CA signs the request
//! (`fedflow-coordinator pki sign`) and sends back `cert.pem` and `ca.pem`, which go beside
//! the key and make the directory a certificate bundle (`join --identity DIR`,
//! `coordinator.identity` of `site.toml`). The key is written once, mode 0600 in a 0700
//! directory, and never read again by this module.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::{Error, Result};

/// The request's file name in the bundle directory.
pub const REQUEST_FILE: &str = "request.pem";
/// The private key's file name (the bundle's `key.pem`).
pub const KEY_FILE: &str = "key.pem";

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Usage(format!("{}: {e}", path.display()))
}

/// Writes `bytes` to the new file `path` with `mode`, synced; refuses an existing file.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

/// Makes `name`'s key and certificate request in `dir` (created, mode 0700): `key.pem` and
/// `request.pem`. Refuses a directory that holds a key already (a second key would orphan
/// the first one's certificate). Returns the request's path.
pub fn make_request(name: &str, dir: &Path) -> Result<PathBuf> {
    fedflow_common::names::check_name(name).map_err(|e| Error::Usage(format!("--name: {e}")))?;
    if dir.join(KEY_FILE).exists() {
        return Err(Error::Usage(format!(
            "{} holds a key already: use another directory (or the request made with it, {})",
            dir.display(),
            dir.join(REQUEST_FILE).display()
        )));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))?;
    let key = KeyPair::generate().map_err(|e| Error::Usage(format!("cannot make a key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedflow");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let request = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| Error::Usage(format!("cannot make the certificate request: {e}")))?;
    write_new(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    let path = dir.join(REQUEST_FILE);
    write_new(&path, request.as_bytes(), 0o644)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))?;
    Ok(path)
}
