//! The one naming rule for runs, sites and operators.
//!
//! Names become directory names, database keys and the path of a certificate's identity
//! URI (`spiffe://fedflow/<role>/<name>`), so they use a small alphabet and never start
//! with a dot (no hidden directories, never `.` or `..`, which SPIFFE IDs forbid).

/// Longest name accepted, in bytes (all accepted characters are one byte).
pub const MAX_NAME_LEN: usize = 128;

/// Checks `name` against the rule: 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9._-]`,
/// not starting with `.`. The error says what is wrong, quoting the name; callers prefix
/// the field or file it came from.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{:?} must be 1 to {MAX_NAME_LEN} characters long",
            truncated(name)
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{:?} contains {c:?}; use only A-Z a-z 0-9 . _ -",
            truncated(name)
        ));
    }
    if name.starts_with('.') {
        return Err(format!("{name:?} must not start with '.'"));
    }
    Ok(())
}

/// Whether `name` follows the rule of [`check_name`].
pub fn valid_name(name: &str) -> bool {
    check_name(name).is_ok()
}

/// At most 140 characters of `name`, so an error about a huge name stays readable.
fn truncated(name: &str) -> String {
    name.chars().take(140).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_alphabet_and_refuses_everything_else() {
        for ok in ["a", "site-01", "pilot_2.b", &"x".repeat(MAX_NAME_LEN)] {
            assert!(valid_name(ok), "{ok}");
        }
        for (bad, why) in [
            ("", "characters long"),
            (&"x".repeat(MAX_NAME_LEN + 1) as &str, "characters long"),
            (".pilot", "must not start with '.'"),
            (".", "must not start with '.'"),
            ("..", "must not start with '.'"),
            ("a/b", "contains '/'"),
            ("é", "contains 'é'"),
            ("a b", "contains ' '"),
        ] {
            let e = check_name(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
