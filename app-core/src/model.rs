//! The item domain: identifiers, the stored item, and validation of what clients send.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The longest name an item may have, in characters (not bytes).
pub const MAX_NAME_CHARS: usize = 200;

/// A positive item id, parsed once from the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(i64);

impl ItemId {
    /// Parses a path segment: ASCII digits only, `1..=i64::MAX`.
    ///
    /// # Errors
    /// A message fit for the client when the segment is not such a number.
    pub fn parse(segment: &str) -> Result<Self, String> {
        if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "item id must be a positive integer, got {:?}",
                truncate(segment)
            ));
        }
        match segment.parse::<i64>() {
            Ok(id) if id >= 1 => Ok(Self(id)),
            _ => Err(format!("item id must be between 1 and {}", i64::MAX)),
        }
    }

    /// The id as stored in PostgreSQL.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl From<i64> for ItemId {
    fn from(id: i64) -> Self {
        Self(id)
    }
}

impl std::fmt::Display for ItemId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An item as stored. `version` starts at 1 and grows by one on every update, in the
/// same statement as the change; it is the item's ETag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub id: i64,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
}

/// The body of `POST /items` and `PUT /items/{id}`. Unknown fields are refused so a
/// typo (`"nmae"`) is an error rather than a silently ignored field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemInput {
    name: String,
}

impl ItemInput {
    /// Checks the name and returns it trimmed.
    ///
    /// # Errors
    /// A message fit for the client when the name is empty after trimming or too long.
    pub fn into_name(self) -> Result<String, String> {
        let name = self.name.trim();
        if name.is_empty() {
            return Err("name must not be empty".to_owned());
        }
        if name.chars().count() > MAX_NAME_CHARS {
            return Err(format!("name must be at most {MAX_NAME_CHARS} characters"));
        }
        Ok(name.to_owned())
    }
}

/// Keeps client-supplied text short when echoed in an error message.
fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_id_accepts_positive_integers_only() {
        assert_eq!(ItemId::parse("42").unwrap().get(), 42);
        assert_eq!(
            ItemId::parse(&i64::MAX.to_string()).unwrap().get(),
            i64::MAX
        );
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            "1.0",
            "abc",
            "1e3",
            " 1",
            "9223372036854775808",
        ] {
            assert!(ItemId::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        let input = |n: &str| ItemInput { name: n.to_owned() };
        assert_eq!(input("  hat ").into_name().unwrap(), "hat");
        assert!(input("   ").into_name().is_err());
        assert!(input(&"é".repeat(MAX_NAME_CHARS)).into_name().is_ok());
        assert!(input(&"é".repeat(MAX_NAME_CHARS + 1)).into_name().is_err());
    }
}
