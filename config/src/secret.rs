//! [`Secret`]: a string that never prints its value.

use std::fmt;

/// What a secret that is not a URL prints as.
const REDACTED: &str = "[redacted]";

/// What replaces a password inside a URL.
const MASK: &str = "***";

/// A secret string, such as a database URL with a password in it.
///
/// `Debug`, `Display` and `Serialize` all write [`Secret::redacted`], so a `Settings` can be
/// logged, put in an error or printed by `tiergate config print` without leaking. Only
/// [`Secret::expose`] returns the value, which keeps every use easy to find with grep.
/// Deserializes from a plain string.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself: pass it to the client that needs it, never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The form that is safe to show.
    ///
    /// A URL keeps its scheme, user, host, port and path (operators need those to see where a
    /// connection goes) with the password replaced by `***`, as do query parameters whose name
    /// looks sensitive (`password=`, `sslpassword=`, `token=` …). Anything else is `[redacted]`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }

    /// Whether the value is a redacted form, as [`Secret::redacted`] writes it in place
    /// of a secret: `[redacted]`, or a URL whose password or credential parameter is
    /// `***`. Such a value was copied from `tiergate config print`, and the secret itself
    /// is still to be supplied.
    pub fn is_redacted(&self) -> bool {
        let value = self.0.as_str();
        if value == REDACTED {
            return true;
        }
        let Some((_scheme, userinfo, location)) = split_url(value) else {
            return false;
        };
        let password_masked = userinfo
            .and_then(|userinfo| userinfo.split_once(':'))
            .is_some_and(|(_user, password)| password == MASK);
        let parameter_masked = location.split_once('?').is_some_and(|(_, query)| {
            query.split('&').any(|pair| {
                pair.split_once('=')
                    .is_some_and(|(key, value)| is_sensitive(key) && value == MASK)
            })
        });
        password_masked || parameter_masked
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Secret").field(&self.redacted()).finish()
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

fn redact(value: &str) -> String {
    let Some((scheme, userinfo, location)) = split_url(value) else {
        return REDACTED.to_owned();
    };
    let mut out = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _password)) => {
                out.push_str(user);
                out.push(':');
                out.push_str(MASK);
            }
            None => out.push_str(userinfo),
        }
        out.push('@');
    }
    match location.split_once('?') {
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            out.push_str(&redact_query(query));
        }
        None => out.push_str(location),
    }
    out
}

/// A URL's scheme, its user info (if any) and what follows, or `None` when `value` is not
/// a URL.
fn split_url(value: &str) -> Option<(&str, Option<&str>, &str)> {
    let (scheme, rest) = value.split_once("://")?;
    if !is_scheme(scheme) {
        return None;
    }
    // The user info ends at the *last* `@`: a password pasted without percent-encoding may
    // itself hold `/`, `?`, `#` or `@`, and splitting any earlier would print its tail. If an
    // `@` sits in the query instead, the cost is a shorter URL shown, never a leak.
    Some(match rest.rfind('@') {
        Some(at) => (scheme, Some(&rest[..at]), &rest[at + 1..]),
        None => (scheme, None, rest),
    })
}

/// `scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )` (RFC 3986).
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Masks the values of query parameters that carry credentials; libpq, for one, accepts
/// `?password=` in a connection URL.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _value)) if is_sensitive(key) => format!("{key}={MASK}"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn is_sensitive(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "secret", "token", "key", "auth", "credential"]
        .iter()
        .any(|word| key.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_masked_and_the_rest_is_kept() {
        let s = Secret::new("postgres://app:hunter2@db.internal:5432/items?sslmode=require");
        assert_eq!(
            s.redacted(),
            "postgres://app:***@db.internal:5432/items?sslmode=require"
        );
    }

    #[test]
    fn url_without_password_is_shown_whole() {
        let s = Secret::new("postgres://postgres@127.0.0.1:5432/tiergate");
        assert_eq!(s.to_string(), "postgres://postgres@127.0.0.1:5432/tiergate");
        let s = Secret::new("redis://127.0.0.1:6379");
        assert_eq!(s.to_string(), "redis://127.0.0.1:6379");
    }

    #[test]
    fn password_only_userinfo_is_masked() {
        let s = Secret::new("rediss://:hunter2@cache.internal:6379/0");
        assert_eq!(s.to_string(), "rediss://:***@cache.internal:6379/0");
    }

    #[test]
    fn unencoded_password_with_url_characters_does_not_leak() {
        let s = Secret::new("postgres://app:pa/ss?w@rd#x@db:5432/items");
        let shown = s.redacted();
        assert_eq!(shown, "postgres://app:***@db:5432/items");
        for fragment in ["pa/ss", "w@rd", "#x"] {
            assert!(!shown.contains(fragment), "{shown}");
        }
    }

    #[test]
    fn sensitive_query_parameters_are_masked() {
        let s = Secret::new("postgres://db/items?user=app&password=hunter2&sslmode=require");
        assert_eq!(
            s.redacted(),
            "postgres://db/items?user=app&password=***&sslmode=require"
        );
    }

    #[test]
    fn non_url_is_fully_redacted() {
        for value in ["hunter2", "", "app:hunter2@db", "1nvalid scheme://a:b@c"] {
            let s = Secret::new(value);
            assert_eq!(s.to_string(), "[redacted]", "{value}");
        }
    }

    /// Mutation: drop the query check from `is_redacted`, or compare the user instead of
    /// the password, and this fails.
    #[test]
    fn a_redacted_form_is_recognised_and_a_real_secret_is_not() {
        for secret in [
            "postgres://app:hunter2@db:5432/items",
            "rediss://:hunter2@cache:6379/0",
            "postgres://db/items?user=app&password=hunter2",
            "hunter2-hunter2-hunter2",
        ] {
            let secret = Secret::new(secret);
            assert!(!secret.is_redacted(), "{secret:?}");
            let printed = Secret::new(secret.redacted());
            assert!(printed.is_redacted(), "{printed:?}");
        }
        for real in [
            "redis://127.0.0.1:6379",
            "postgres://***@db/items",
            "postgres://db/items?application_name=***",
            "***",
        ] {
            assert!(!Secret::new(real).is_redacted(), "{real}");
        }
    }

    #[test]
    fn debug_and_serialize_use_the_redacted_form() {
        let s = Secret::new("postgres://app:hunter2@db/items");
        assert_eq!(format!("{s:?}"), r#"Secret("postgres://app:***@db/items")"#);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#""postgres://app:***@db/items""#
        );
        let back: Secret = serde_json::from_str(r#""postgres://app:hunter2@db/items""#).unwrap();
        assert_eq!(back.expose(), "postgres://app:hunter2@db/items");
    }
}
