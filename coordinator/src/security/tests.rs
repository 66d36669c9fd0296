//! Tests of identities, certificate issuing and the audit log, including property tests of
//! their decoders on arbitrary input.

use proptest::prelude::*;

use super::audit_log::{AuditLog, GENESIS, verify_bytes};
use super::identity::{Role, identity_from_der, identity_uri};
use super::pki::{BUNDLE_CERT, BUNDLE_KEY, CA_KEY, Ca, Validity};
use super::{Revocations, Revoked};

fn der_of(bundle: &std::path::Path) -> Vec<u8> {
    let certs = super::tls::read_certs(&bundle.join(BUNDLE_CERT)).unwrap();
    certs[0].to_vec()
}

/// An issued certificate carries exactly the identity it was issued for, its serial and its
/// expiry; keys are private to their owner; a CA is never overwritten.
#[test]
fn issued_certificates_carry_their_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(&dir.path().join("ca"), Validity::days(10)).unwrap();
    let err = Ca::init(&dir.path().join("ca"), Validity::days(10)).unwrap_err();
    assert!(err.to_string().contains("already holds a CA"), "{err}");
    for (role, name) in [
        (Role::Site, "site-a"),
        (Role::Viewer, "v.1"),
        (Role::Admin, "ops_2"),
    ] {
        let out = dir.path().join(name);
        let issued = ca.issue(role, name, Validity::days(5), &out).unwrap();
        let id = identity_from_der(&der_of(&out)).unwrap();
        assert_eq!((id.role, id.name.as_str()), (role, name));
        assert_eq!(id.serial, issued.serial);
        assert_eq!(id.not_after, issued.not_after);
        assert_eq!(id.uri(), identity_uri(role, name));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&out.join(BUNDLE_KEY)), 0o600);
            assert_eq!(mode(&out), 0o700);
            assert_eq!(mode(&dir.path().join("ca").join(CA_KEY)), 0o600);
        }
        let again = ca.issue(role, name, Validity::days(5), &out).unwrap_err();
        assert!(again.to_string().contains("already holds"), "{again}");
    }
    let bad = ca
        .issue(
            Role::Site,
            "no spaces",
            Validity::days(5),
            &dir.path().join("x"),
        )
        .unwrap_err();
    assert!(bad.to_string().contains("invalid"), "{bad}");
    // The server certificate carries the coordinator's URI, not a participant identity.
    let server = dir.path().join("server");
    ca.issue_server(
        &["127.0.0.1".into(), "coord.example".into()],
        Validity::days(5),
        &server,
    )
    .unwrap();
    let err = identity_from_der(&der_of(&server)).unwrap_err();
    assert!(
        err.contains("unknown role") || err.contains("no role"),
        "{err}"
    );
    // Every issue is in the PKI's log, whose chain verifies.
    let log = std::fs::read(dir.path().join("ca").join(super::pki::ISSUED_LOG)).unwrap();
    assert_eq!(verify_bytes(&log).unwrap().lines, 1 + 3 + 1);
}

/// Revocations by identity cover every certificate of it; by serial only that one.
#[test]
fn revocations_by_identity_and_by_serial() {
    let id = |name: &str, serial: &str| super::Identity {
        role: Role::Site,
        name: name.into(),
        serial: serial.into(),
        not_after: 0,
    };
    let r = Revocations::from_list([
        Revoked::Identity(Role::Site, "a".into()),
        Revoked::Serial("ff".into()),
    ]);
    assert!(r.check(&id("a", "01")).is_some());
    assert!(r.check(&id("b", "ff")).is_some());
    assert!(r.check(&id("b", "01")).is_none());
    assert!(r.site_revoked("a") && !r.site_revoked("b"));
    let viewer_a = super::Identity {
        role: Role::Viewer,
        ..id("a", "02")
    };
    assert!(
        r.check(&viewer_a).is_none(),
        "a site revocation is not a viewer's"
    );
}

fn log_with(events: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path).unwrap();
    for i in 0..events {
        log.append(
            "event",
            serde_json::json!({ "i": i, "text": "a \"quoted\" ,\"hash\":\"x\"}" }),
        )
        .unwrap();
    }
    (dir, path)
}

/// A log reopened after a crash that tore its last line keeps its intact lines and goes on
/// chaining; a log with an edited line is refused.
#[test]
fn audit_log_survives_a_torn_tail_and_refuses_an_edited_one() {
    let (_dir, path) = log_with(3);
    let mut bytes = std::fs::read(&path).unwrap();
    let head = verify_bytes(&bytes).unwrap().head;
    bytes.extend_from_slice(b"{\"detail\":{},\"event\":\"half");
    std::fs::write(&path, &bytes).unwrap();
    let mut log = AuditLog::open(&path).unwrap();
    assert_eq!((log.len(), log.head()), (3, head.as_str()));
    log.append("after", serde_json::json!({})).unwrap();
    assert_eq!(
        verify_bytes(&std::fs::read(&path).unwrap()).unwrap().lines,
        4
    );

    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replacen("\"i\":1", "\"i\":7", 1);
    std::fs::write(&path, text).unwrap();
    let err = AuditLog::open(&path).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    assert_eq!(verify_bytes(b"").unwrap().head, GENESIS);
}

/// The lines of a log of `events` events, each with its newline.
fn lines_of(events: usize) -> Vec<String> {
    let (_dir, path) = log_with(events);
    std::fs::read_to_string(&path)
        .unwrap()
        .split_inclusive('\n')
        .map(str::to_owned)
        .collect()
}

/// Verifies `lines` joined; the first bad line and its reason.
fn first_break(lines: &[String]) -> (usize, String) {
    let b = verify_bytes(lines.concat().as_bytes()).unwrap_err();
    (b.line, b.reason)
}

/// Deleting any line but the last breaks the chain at the line that took its place.
#[test]
fn a_deleted_line_is_detected_where_it_was() {
    let lines = lines_of(5);
    assert_eq!(verify_bytes(lines.concat().as_bytes()).unwrap().lines, 5);
    for gone in 0..4 {
        let mut edited = lines.clone();
        edited.remove(gone);
        let (line, reason) = first_break(&edited);
        assert_eq!(line, gone + 1, "deleting line {}: {reason}", gone + 1);
        assert!(reason.contains("removed or inserted"), "{reason}");
    }
}

/// A line inserted anywhere, even a valid record copied from elsewhere in the same log, is
/// caught at the inserted line (or, for a copy put just before its original, at the
/// original, which is then the one out of place).
#[test]
fn an_inserted_line_is_detected_where_it_was_put() {
    let lines = lines_of(4);
    for at in 0..=4 {
        for copy in 0..4 {
            let mut edited = lines.clone();
            edited.insert(at, lines[copy].clone());
            let (line, reason) = first_break(&edited);
            let want = if at == copy { at + 2 } else { at + 1 };
            assert_eq!(
                line,
                want,
                "line {} copied to {}: {reason}",
                copy + 1,
                at + 1
            );
        }
    }
    // A record from another, independently valid log does not fit either.
    let other = lines_of(2);
    let mut edited = lines.clone();
    edited.insert(2, other[1].clone());
    assert_eq!(first_break(&edited).0, 3);
}

/// Swapping any two lines breaks the chain at the earlier of them.
#[test]
fn reordered_lines_are_detected_at_the_first_moved_one() {
    let lines = lines_of(5);
    for a in 0..5 {
        for b in a + 1..5 {
            let mut edited = lines.clone();
            edited.swap(a, b);
            let (line, reason) = first_break(&edited);
            assert_eq!(
                line,
                a + 1,
                "swapping lines {} and {}: {reason}",
                a + 1,
                b + 1
            );
            assert!(reason.contains("sequence number"), "{reason}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Arbitrary bytes are never an identity, and never a panic.
    #[test]
    fn identity_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let err = identity_from_der(&bytes).unwrap_err();
        prop_assert!(!err.is_empty());
    }

    /// Arbitrary bytes never make the audit log verifier panic; what it accepts it accepts
    /// with a consistent line count.
    #[test]
    fn audit_verifier_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        match verify_bytes(&bytes) {
            Ok(v) => prop_assert_eq!(v.lines as usize, bytes.iter().filter(|&&b| b == b'\n').count()),
            Err(b) => prop_assert!(b.line >= 1 && !b.reason.is_empty()),
        }
    }

    /// Changing any one byte of a valid log breaks verification exactly at the line that
    /// byte belongs to.
    #[test]
    fn any_edit_is_pinpointed(pos in any::<prop::sample::Index>(), delta in 1u8..=255) {
        let (_dir, path) = log_with(4);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = pos.index(bytes.len());
        let line = bytes[..i].iter().filter(|&&b| b == b'\n').count() + 1;
        bytes[i] = bytes[i].wrapping_add(delta);
        let b = verify_bytes(&bytes).unwrap_err();
        prop_assert_eq!(b.line, line, "{}", b);
    }

    /// Any TOML text gives a configuration or an error naming the problem, never a panic.
    #[test]
    fn config_parser_never_panics(text in "(\\[[a-z_]{1,12}\\]\n|[a-z_]{1,20} = (-?[0-9]{1,6}(\\.[0-9]{1,3})?|\"[a-z ]{0,8}\"|true)\n){0,12}") {
        let dir = tempfile::tempdir().unwrap();
        if let Err(e) = crate::config::RunConfig::from_toml_str(&text, dir.path()) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
