//! Which partner-site clients a coordinator works with.
//!
//! The policy (also in deploy/README.md): the wire protocol is `fedflow.v1`; within it,
//! fields are only ever added, so any two builds speak it. Behaviour that both sides must
//! agree on (what a task asks, how an update is checked, how privacy is charged) changes
//! only with the version's compatibility part: the major version, or for `0.x` releases the
//! minor one (`0.1.3` works with `0.1.0`, not with `0.2.0`). A coordinator refuses, at
//! enrolment, a fedflow client whose version differs in that part, saying what to install.
//! A client that sends no version, or one that is not `MAJOR.MINOR.PATCH` (another
//! implementation of the protocol), is taken at its word and logged.

/// The protocol package both sides speak.
pub const PROTOCOL: &str = "fedflow.v1";

/// `MAJOR.MINOR.PATCH` of `version` (a pre-release or build suffix is ignored), if it is one.
pub fn parse(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.split(['-', '+']).next()?;
    let mut parts = core.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((major, minor, patch))
}

/// The part of a version that must match: the major version, or `(0, minor)` for `0.x`.
fn compatibility((major, minor, _): (u64, u64, u64)) -> (u64, u64) {
    if major == 0 { (0, minor) } else { (major, 0) }
}

/// What a coordinator of version `coordinator` makes of a client claiming `client`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientVersion {
    /// A fedflow version it works with.
    Compatible,
    /// No version, or not a fedflow one: taken at its word.
    Unversioned,
    /// A fedflow version it does not work with; the message says what to install.
    Incompatible(String),
}

/// Checks `client` against `coordinator` (see the module documentation).
pub fn check_client(client: &str, coordinator: &str) -> ClientVersion {
    let (Some(c), Some(s)) = (parse(client), parse(coordinator)) else {
        return ClientVersion::Unversioned;
    };
    if compatibility(c) == compatibility(s) {
        return ClientVersion::Compatible;
    }
    let want = match compatibility(s) {
        (0, minor) => format!("0.{minor}.x"),
        (major, _) => format!("{major}.x"),
    };
    let which = if c > s {
        "is newer than this coordinator: upgrade the coordinator, or"
    } else {
        "is older than this coordinator:"
    };
    ClientVersion::Incompatible(format!(
        "fedflow-client {client} {which} install fedflow-client {want} at the site \
         (the coordinator is {coordinator}; releases are compatible within {want})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_compatible_within_their_compatibility_part_only() {
        assert_eq!(check_client("0.1.7", "0.1.0"), ClientVersion::Compatible);
        assert_eq!(
            check_client("0.1.0-rc.1", "0.1.2"),
            ClientVersion::Compatible
        );
        assert_eq!(check_client("1.4.0", "1.0.9"), ClientVersion::Compatible);
        let ClientVersion::Incompatible(m) = check_client("0.2.0", "0.1.0") else {
            panic!()
        };
        assert!(
            m.contains("install fedflow-client 0.1.x") && m.contains("upgrade the coordinator"),
            "{m}"
        );
        let ClientVersion::Incompatible(m) = check_client("1.0.0", "2.3.1") else {
            panic!()
        };
        assert!(m.contains("older") && m.contains("2.x"), "{m}");
        for other in ["", "python-interop", "1.2", "1.2.3.4", "v1.2.3"] {
            assert_eq!(
                check_client(other, "0.1.0"),
                ClientVersion::Unversioned,
                "{other}"
            );
        }
    }
}
