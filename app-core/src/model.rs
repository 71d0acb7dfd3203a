//! The item domain: identifiers, the stored item, and validation of what clients send.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{self, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
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

/// The body of `POST /items` and `PUT /items/{id}`: a JSON object with one field,
/// `"name"`, a string. Unknown fields are refused, so a typo (`"nmae"`) is an error rather
/// than a silently ignored field, and so is a field given twice.
///
/// Deserialized by hand rather than derived: a derived deserializer's errors speak of
/// Rust ("expected struct ItemInput") and of serde's data model ("sequence", "map"), and
/// every message here goes to a client, in JSON's terms.
#[derive(Debug)]
pub struct ItemInput {
    name: String,
}

/// What a body that is not an [`ItemInput`] is told.
const EXPECTED_BODY: &str = r#"the body must be a JSON object like {"name": "a name"}"#;

impl<'de> Deserialize<'de> for ItemInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ItemInputVisitor)
    }
}

/// Accepts an object with exactly one `"name"`; anything else is refused in the API's
/// words (serde would call an array a "sequence").
struct ItemInputVisitor;

impl<'de> Visitor<'de> for ItemInputVisitor {
    type Value = ItemInput;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(EXPECTED_BODY)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut fields: A) -> Result<ItemInput, A::Error> {
        let mut name = None;
        while let Some(field) = fields.next_key::<String>()? {
            if field != "name" {
                return Err(A::Error::custom(format!(
                    r#"unknown field "{}": the only field is "name""#,
                    truncate(&field)
                )));
            }
            if name.is_some() {
                return Err(A::Error::custom(r#"the field "name" is given twice"#));
            }
            name = Some(match fields.next_value::<serde_json::Value>()? {
                serde_json::Value::String(text) => text,
                other => {
                    return Err(A::Error::custom(format!(
                        "name must be a string, not {}",
                        json_kind(&other)
                    )));
                }
            });
        }
        name.map(|name| ItemInput { name })
            .ok_or_else(|| A::Error::custom(r#"the field "name" is missing"#))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<ItemInput, A::Error> {
        Err(A::Error::custom(format!("{EXPECTED_BODY}, not an array")))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<ItemInput, E> {
        Err(E::custom(format!("{EXPECTED_BODY}, not a string")))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<ItemInput, E> {
        Err(E::custom(format!("{EXPECTED_BODY}, not true or false")))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<ItemInput, E> {
        Err(E::custom(format!("{EXPECTED_BODY}, not a number")))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<ItemInput, E> {
        Err(E::custom(format!("{EXPECTED_BODY}, not a number")))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<ItemInput, E> {
        Err(E::custom(format!("{EXPECTED_BODY}, not a number")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<ItemInput, E> {
        Err(E::custom(format!("{EXPECTED_BODY}, not null")))
    }
}

/// How a JSON value's type is named to a client.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "true or false",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl ItemInput {
    /// Checks the name and returns it trimmed.
    ///
    /// # Errors
    /// A message fit for the client when the name is empty after trimming, too long, or
    /// holds a character PostgreSQL cannot store in `text` (NUL, U+0000).
    pub fn into_name(self) -> Result<String, String> {
        let name = self.name.trim();
        if name.is_empty() {
            return Err("name must not be empty".to_owned());
        }
        if name.chars().count() > MAX_NAME_CHARS {
            return Err(format!("name must be at most {MAX_NAME_CHARS} characters"));
        }
        // The one character a Rust string holds and PostgreSQL text cannot. (Unpaired
        // surrogates cannot reach here: JSON parsing refuses them.)
        if name.contains('\0') {
            return Err(r"name must not contain the NUL character (\u0000)".to_owned());
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
        assert!(input("a\0b").into_name().is_err());
    }

    #[test]
    fn bodies_other_than_one_name_are_refused_in_json_terms() {
        let parse = |body: &str| serde_json::from_str::<ItemInput>(body).map(|i| i.name);
        assert_eq!(parse(r#"{"name": "hat"}"#).unwrap(), "hat");
        for (body, says) in [
            ("[]", "not an array"),
            ("42", "not a number"),
            ("null", "not null"),
            ("{}", r#""name" is missing"#),
            (r#"{"name": 1}"#, "name must be a string, not a number"),
            (r#"{"name": {}}"#, "name must be a string, not an object"),
            (r#"{"name": "a", "name": "b"}"#, "given twice"),
            (r#"{"nmae": "a"}"#, r#"unknown field "nmae""#),
        ] {
            let message = parse(body).unwrap_err().to_string();
            assert!(message.contains(says), "{body}: {message}");
        }
    }
}
