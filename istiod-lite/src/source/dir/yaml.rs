//! One YAML document to JSON, built straight from the parser's events with its
//! expanded size counted against the file's budget. An alias repeats all it names,
//! so a few kilobytes can stand for gigabytes (an alias bomb): such a document is
//! refused as soon as it outgrows the budget, never built whole. Merge keys
//! (`<<`) are applied as the mapping is read.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The least a file may expand to, however small: room for a few aliases.
const MIN_BUDGET: u64 = 100_000;

/// A file may expand to this many times its size (an alias-free document costs
/// about its size).
const BUDGET_PER_BYTE: u64 = 16;

/// The most any file may expand to: a few times what the largest file read
/// (32 MiB) can hold without aliases, and a few gigabytes of memory at most.
const MAX_BUDGET: u64 = 128 << 20;

/// A string costs one node, plus one per this many bytes.
const STRING_BYTES_PER_NODE: u64 = 16;

/// What the documents of one file may still expand to, in nodes (a scalar, a
/// list, a mapping, a key; long strings count more).
#[derive(Debug)]
pub(super) struct Budget {
    limit: u64,
    left: u64,
    /// Set when a document ran out of budget.
    exceeded: bool,
    /// Why the current document, though YAML, cannot be an object.
    shape: Option<String>,
}

impl Budget {
    /// The budget of a file of `len` bytes.
    pub fn for_text(len: usize) -> Self {
        let limit = (len as u64)
            .saturating_mul(BUDGET_PER_BYTE)
            .clamp(MIN_BUDGET, MAX_BUDGET);
        Self {
            limit,
            left: limit,
            exceeded: false,
            shape: None,
        }
    }

    fn charge<E: de::Error>(&mut self, nodes: u64) -> Result<(), E> {
        match self.left.checked_sub(nodes) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => {
                self.exceeded = true;
                Err(E::custom(format_args!(
                    "expands to more than {} nodes",
                    self.limit
                )))
            }
        }
    }

    fn charge_str<E: de::Error>(&mut self, s: &str) -> Result<(), E> {
        self.charge(1 + s.len() as u64 / STRING_BYTES_PER_NODE)
    }
}

/// Why a document did not become JSON.
#[derive(Debug)]
pub(super) enum Failure {
    /// Not YAML, or YAML JSON cannot hold (a duplicate key, a bad merge): the
    /// whole file is refused.
    Syntax(serde_yaml_ng::Error),
    /// Expanded past the file's budget: the whole file is refused.
    TooLarge { limit: u64 },
    /// YAML, but no object can come of it (a list as a mapping key): only the
    /// document is refused.
    Shape(String),
}

/// Reads one document as JSON: scalar mapping keys become strings (as `kubectl`
/// does), tags are dropped, merge keys applied, and non-finite floats (which
/// JSON cannot hold) become null so the decoder reports a type error at their
/// field.
pub(super) fn to_json<'de, D>(document: D, budget: &mut Budget) -> Result<Value, Failure>
where
    D: Deserializer<'de, Error = serde_yaml_ng::Error>,
{
    budget.shape = None;
    match (Node {
        budget: &mut *budget,
    })
    .deserialize(document)
    {
        Ok(value) => match budget.shape.take() {
            Some(problem) => Err(Failure::Shape(problem)),
            None => Ok(value),
        },
        Err(_) if budget.exceeded => Err(Failure::TooLarge {
            limit: budget.limit,
        }),
        Err(error) => Err(Failure::Syntax(error)),
    }
}

/// Any node, read as JSON.
struct Node<'b> {
    budget: &'b mut Budget,
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.budget.charge(1)?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        self.budget.charge(1)?;
        Ok(Value::from(i))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        self.budget.charge(1)?;
        Ok(Value::from(u))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        self.budget.charge(1)?;
        Ok(Number::from_f64(f).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.budget.charge_str(s)?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.budget.charge_str(&s)?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.budget.charge(1)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.budget.charge(1)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Node {
            budget: &mut *self.budget,
        })? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.budget.charge(1)?;
        let mut out = Map::new();
        let mut merged: Option<Vec<Map<String, Value>>> = None;
        while let Some(key) = map.next_key_seed(Key {
            budget: &mut *self.budget,
            tagged: false,
        })? {
            let value = map.next_value_seed(Node {
                budget: &mut *self.budget,
            })?;
            let key = match key {
                Some(KeyName::Plain(key)) if key == "<<" => {
                    if merged.is_some() {
                        return Err(de::Error::custom("duplicate merge key `<<`"));
                    }
                    merged = Some(merge_sources(value)?);
                    continue;
                }
                Some(KeyName::Plain(key) | KeyName::Tagged(key)) => key,
                // Noted in the budget's shape: the document is refused.
                None => continue,
            };
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate entry with key {key:?}"
                )));
            }
            out.insert(key, value);
        }
        // The mapping's own keys win, then the merged mappings in order.
        for source in merged.into_iter().flatten() {
            for (key, value) in source {
                out.entry(key).or_insert(value);
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        // A tagged node (`!foo x`): the tag is dropped.
        let (_tag, contents) = data.variant::<de::IgnoredAny>()?;
        de::VariantAccess::newtype_variant_seed(contents, self)
    }
}

/// What a merge key (`<<`) names: a mapping or a list of mappings.
fn merge_sources<E: de::Error>(value: Value) -> Result<Vec<Map<String, Value>>, E> {
    let refuse = || E::custom("a merge key `<<` must name a mapping or a list of mappings");
    match value {
        Value::Object(source) => Ok(vec![source]),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Object(source) => Ok(source),
                _ => Err(refuse()),
            })
            .collect(),
        _ => Err(refuse()),
    }
}

/// A mapping key read as a string.
enum KeyName {
    /// `<<` among these is a merge key.
    Plain(String),
    /// Tagged (`!t name`): never a merge key.
    Tagged(String),
}

/// A mapping key: a scalar as a string (`None`: a list or a mapping, or a tagged
/// scalar that is not a string, which JSON cannot have as a key).
struct Key<'b> {
    budget: &'b mut Budget,
    tagged: bool,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Option<KeyName>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = Option<KeyName>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
        self.visit_scalar(b.to_string())
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Self::Value, E> {
        self.visit_scalar(i.to_string())
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Self::Value, E> {
        self.visit_scalar(u.to_string())
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Self::Value, E> {
        self.visit_scalar(serde_yaml_ng::Number::from(f).to_string())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        self.visit_string(s.to_owned())
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
        self.budget.charge_str(&s)?;
        Ok(Some(if self.tagged {
            KeyName::Tagged(s)
        } else {
            KeyName::Plain(s)
        }))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_scalar("null".into())
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Node {
            budget: &mut *self.budget,
        }
        .visit_seq(seq)?;
        self.refuse()
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Node {
            budget: &mut *self.budget,
        }
        .visit_map(map)?;
        self.refuse()
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        let (_tag, contents) = data.variant::<de::IgnoredAny>()?;
        let key = Key {
            budget: self.budget,
            tagged: true,
        };
        de::VariantAccess::newtype_variant_seed(contents, key)
    }
}

impl Key<'_> {
    /// A scalar other than a string: written as `kubectl` does, unless tagged.
    fn visit_scalar<E: de::Error>(self, s: String) -> Result<Option<KeyName>, E> {
        if self.tagged {
            self.budget.charge(1)?;
            return self.refuse();
        }
        self.visit_string(s)
    }

    fn refuse<E>(self) -> Result<Option<KeyName>, E> {
        self.budget.shape.get_or_insert_with(|| {
            "a mapping key must be a string, not a list or a mapping".into()
        });
        Ok(None)
    }
}
