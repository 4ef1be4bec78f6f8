//! String tests for principals and namespaces, written in Istio's wildcard form:
//! `"*"` is presence, `"foo*"` a prefix, `"*foo"` a suffix, anything else exact.
//!
//! Values are matched as a list of parts (a principal is `td`, `/ns/`, `ns`,
//! `/sa/`, `sa`) so that checking a connection's identity allocates nothing.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SPIFFE_SCHEME: &str = "spiffe://";

/// One string test.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// Parses Istio's wildcard form. A `*` anywhere but alone, first or last is
    /// refused: Istio has no infix wildcard and guessing would widen the match.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parsed = if s == "*" {
            StringMatch::Presence
        } else if let Some(rest) = s.strip_prefix('*') {
            StringMatch::Suffix(rest.to_string())
        } else if let Some(rest) = s.strip_suffix('*') {
            StringMatch::Prefix(rest.to_string())
        } else {
            StringMatch::Exact(s.to_string())
        };
        if parsed.value().is_some_and(|v| v.contains('*')) {
            return Err(format!(
                "{s:?}: '*' is only allowed alone, as the first or as the last character"
            ));
        }
        Ok(parsed)
    }

    /// Matches one plain value.
    pub fn matches(&self, value: &str) -> bool {
        self.matches_parts(&[value])
    }

    /// Matches the concatenation of `parts`, without building it.
    pub fn matches_parts(&self, parts: &[&str]) -> bool {
        match self {
            StringMatch::Exact(s) => total_len(parts) == s.len() && starts_with(parts, s),
            StringMatch::Prefix(s) => starts_with(parts, s),
            StringMatch::Suffix(s) => ends_with(parts, s),
            StringMatch::Presence => total_len(parts) > 0,
        }
    }

    /// True for an exact match, whose text says everything about the value.
    pub fn is_exact(&self) -> bool {
        matches!(self, StringMatch::Exact(_))
    }

    /// A principal pattern that starts with `spiffe://` can never match: Istio
    /// principals are written without the scheme.
    pub(super) fn has_spiffe_scheme(&self) -> bool {
        match self {
            StringMatch::Exact(s) | StringMatch::Prefix(s) => s.starts_with(SPIFFE_SCHEME),
            StringMatch::Suffix(_) | StringMatch::Presence => false,
        }
    }

    fn value(&self) -> Option<&str> {
        match self {
            StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) => Some(s),
            StringMatch::Presence => None,
        }
    }

    /// Whether the wildcard form reads back as this same match.
    fn has_wildcard_form(&self) -> bool {
        match self {
            StringMatch::Presence => true,
            StringMatch::Exact(s) => !s.contains('*'),
            // "" as a prefix or suffix would print as "*", which reads back as presence.
            StringMatch::Prefix(s) | StringMatch::Suffix(s) => !s.is_empty() && !s.contains('*'),
        }
    }
}

fn total_len(parts: &[&str]) -> usize {
    parts.iter().map(|p| p.len()).sum()
}

fn starts_with(parts: &[&str], prefix: &str) -> bool {
    let mut rest = prefix.as_bytes();
    for part in parts {
        let n = part.len().min(rest.len());
        let (head, tail) = rest.split_at(n);
        if part.as_bytes().get(..n) != Some(head) {
            return false;
        }
        rest = tail;
        if rest.is_empty() {
            return true;
        }
    }
    rest.is_empty()
}

fn ends_with(parts: &[&str], suffix: &str) -> bool {
    let mut rest = suffix.as_bytes();
    for part in parts.iter().rev() {
        let part = part.as_bytes();
        let n = part.len().min(rest.len());
        let (head, tail) = rest.split_at(rest.len() - n);
        if part.get(part.len() - n..) != Some(tail) {
            return false;
        }
        rest = head;
        if rest.is_empty() {
            return true;
        }
    }
    rest.is_empty()
}

/// The wildcard form, as a user would write it in YAML.
impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => write!(f, "{s}"),
            StringMatch::Prefix(s) => write!(f, "{s}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Presence => f.write_str("*"),
        }
    }
}

/// The wildcard string when it reads back the same, else the explicit
/// one-key map (`{exact: "a*"}`) that [`Deserialize`] also accepts.
impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if self.has_wildcard_form() {
            return serializer.collect_str(self);
        }
        let mut map = serializer.serialize_map(Some(1))?;
        match self {
            StringMatch::Exact(s) => map.serialize_entry("exact", s)?,
            StringMatch::Prefix(s) => map.serialize_entry("prefix", s)?,
            StringMatch::Suffix(s) => map.serialize_entry("suffix", s)?,
            StringMatch::Presence => map.serialize_entry("presence", &true)?,
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StringMatchVisitor)
    }
}

struct StringMatchVisitor;

impl<'de> Visitor<'de> for StringMatchVisitor {
    type Value = StringMatch;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a string (\"*\", \"prefix*\", \"*suffix\" or an exact value) \
             or one of {exact|prefix|suffix: string} / {presence: true}",
        )
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<StringMatch, E> {
        StringMatch::parse(s).map_err(E::custom)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMatch, A::Error> {
        let key: String = map
            .next_key()?
            .ok_or_else(|| de::Error::custom("empty string match"))?;
        let parsed = match key.as_str() {
            "exact" => StringMatch::Exact(map.next_value()?),
            "prefix" => StringMatch::Prefix(map.next_value()?),
            "suffix" => StringMatch::Suffix(map.next_value()?),
            "presence" => {
                if !map.next_value::<bool>()? {
                    return Err(de::Error::custom("presence: false is not supported"));
                }
                StringMatch::Presence
            }
            other => {
                return Err(de::Error::unknown_field(
                    other,
                    &["exact", "prefix", "suffix", "presence"],
                ));
            }
        };
        if map.next_key::<String>()?.is_some() {
            return Err(de::Error::custom("a string match takes exactly one key"));
        }
        Ok(parsed)
    }
}
