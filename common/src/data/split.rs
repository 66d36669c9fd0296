//! Deterministic train/validation split and hashed identifiers, both keyed on session ids.
//!
//! A session's side of the split depends only on its id, so it is the same on every run, on
//! every platform, whatever the order or content of the rest of the file, and a session never
//! moves from validation into training when data is appended.

use sha2::{Digest, Sha256};

/// Domain separator for the split hash, so it cannot be confused with other uses of SHA-256.
const SPLIT_DOMAIN: &[u8] = b"fedflow-split/1\0";
/// Domain separator for [`hashed_id`].
const ID_DOMAIN: &[u8] = b"fedflow-id/1\0";

/// Which side of the train/validation split a session is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Used to train the local model.
    Train,
    /// Held out to evaluate it.
    Validation,
}

/// The session's position in `[0, 1)`: the first 8 bytes of
/// `SHA-256(b"fedflow-split/1\0" || session_id)` as a big-endian `u64`, divided by 2^64.
pub fn split_unit(session_id: &str) -> f64 {
    // u64 -> f64 rounds to 53 bits, which can round up to exactly 2^64; clamp so the value
    // stays below 1 as documented.
    (split_hash(session_id) as f64 / 18_446_744_073_709_551_616.0).min(1.0 - f64::EPSILON / 2.0)
}

fn split_hash(session_id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(SPLIT_DOMAIN)
        .chain_update(session_id.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The side of the split a session falls on: [`Split::Validation`] when
/// [`split_unit`]`(session_id) < val_fraction`, else [`Split::Train`].
///
/// So a fraction of 0 (or less, or NaN) puts everything in training, and 1 (or more)
/// everything in validation.
pub fn split_of(session_id: &str, val_fraction: f64) -> Split {
    if split_unit(session_id) < val_fraction {
        Split::Validation
    } else {
        Split::Train
    }
}

/// A short pseudonym for a session or user id, for logs: the first 8 bytes (16 hex digits) of
/// `SHA-256(b"fedflow-id/1\0" || id)`.
///
/// It lets log lines about the same id be matched without printing the id. It is unsalted, so
/// it does not protect ids that are easy to guess (small counters, e-mail addresses of known
/// people); it must stay on the partner site like the id itself.
pub fn hashed_id(id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(ID_DOMAIN)
        .chain_update(id.as_bytes())
        .finalize();
    crate::hash::hex(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values, computed independently with Python:
    // python3 -c "import hashlib; s=b'session-42'; \
    //   h=int.from_bytes(hashlib.sha256(b'fedflow-split/1\0'+s).digest()[:8],'big'); \
    //   print(h, h/2**64, hashlib.sha256(b'fedflow-id/1\0'+s).hexdigest()[:16])"
    // session-42 -> 3829904013937464364 0.20761951261609762 3012699d68ed7af8
    // s-0001     -> 14884293448811998994 0.8068791646556865 d027ea4b1fccdd92
    // ""         -> 17100821990539220950 0.9270374176715256 0678783a048d1227

    #[test]
    fn pinned_split_hash() {
        assert_eq!(split_hash("session-42"), 3_829_904_013_937_464_364);
        assert_eq!(split_hash("s-0001"), 14_884_293_448_811_998_994);
        assert_eq!(split_hash(""), 17_100_821_990_539_220_950);
        assert_eq!(split_unit("session-42"), 0.20761951261609762);
        assert_eq!(split_unit("s-0001"), 0.8068791646556865);
    }

    #[test]
    fn pinned_split_decisions() {
        assert_eq!(split_of("session-42", 0.2), Split::Train);
        assert_eq!(split_of("session-42", 0.21), Split::Validation);
        assert_eq!(split_of("s-0001", 0.8), Split::Train);
        assert_eq!(split_of("s-0001", 0.81), Split::Validation);
    }

    #[test]
    fn pinned_hashed_id() {
        assert_eq!(hashed_id("session-42"), "3012699d68ed7af8");
        assert_eq!(hashed_id("s-0001"), "d027ea4b1fccdd92");
        assert_eq!(hashed_id(""), "0678783a048d1227");
    }

    #[test]
    fn hashed_id_differs_from_split_hash() {
        // Domain separation: the pseudonym reveals nothing about the split position.
        let split_hex = format!("{:016x}", split_hash("session-42"));
        assert_ne!(hashed_id("session-42"), split_hex);
    }

    #[test]
    fn extreme_fractions() {
        for i in 0..1000 {
            let id = format!("id-{i}");
            assert_eq!(split_of(&id, 0.0), Split::Train);
            assert_eq!(split_of(&id, -1.0), Split::Train);
            assert_eq!(split_of(&id, f64::NAN), Split::Train);
            assert_eq!(split_of(&id, 1.0), Split::Validation);
            let u = split_unit(&id);
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }

    #[test]
    fn fraction_is_roughly_respected_and_deterministic() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("session-{i:05}")).collect();
        for fraction in [0.1, 0.2, 0.5] {
            let val = ids
                .iter()
                .filter(|id| split_of(id, fraction) == Split::Validation)
                .count();
            let expected = fraction * ids.len() as f64;
            // Binomial standard deviation is at most 50 here; allow about 4 of them.
            assert!(
                (val as f64 - expected).abs() < 200.0,
                "fraction {fraction}: {val} of {}",
                ids.len()
            );
        }
        let first: Vec<Split> = ids.iter().map(|id| split_of(id, 0.2)).collect();
        let second: Vec<Split> = ids.iter().map(|id| split_of(id, 0.2)).collect();
        assert_eq!(first, second);
    }

    #[test]
    fn growing_the_fraction_only_moves_sessions_into_validation() {
        for i in 0..2000 {
            let id = format!("u{i}");
            if split_of(&id, 0.1) == Split::Validation {
                assert_eq!(split_of(&id, 0.3), Split::Validation);
            }
        }
    }
}
