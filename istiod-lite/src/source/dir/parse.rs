//! One file's text to its documents: multi-document YAML, each document read
//! with [`crate::model::from_json`], `kind: List` documents expanded, empty
//! documents skipped. A YAML syntax error fails the whole file.

use serde::Deserialize;
use serde_json::{Map, Number, Value};
use serde_yaml_ng::Value as Yaml;

use crate::model::{Object, ObjectError, from_json};

/// One object read from a file, or why it could not be read.
#[derive(Debug)]
pub(super) struct Document {
    /// 1-based index of the YAML document in the file.
    pub index: usize,
    pub outcome: Result<Object, ObjectError>,
}

/// The file is not valid YAML: nothing of it can be trusted.
#[derive(Debug)]
pub(super) struct SyntaxError {
    pub document: usize,
    pub error: serde_yaml_ng::Error,
}

/// Reads every document of `text`.
pub(super) fn parse_documents(text: &str) -> Result<Vec<Document>, SyntaxError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let yaml = Yaml::deserialize(de).map_err(|error| SyntaxError {
            document: index,
            error,
        })?;
        let json = match to_json(yaml) {
            Ok(json) => json,
            Err(problem) => {
                out.push(Document {
                    index,
                    outcome: Err(shape_error(problem)),
                });
                continue;
            }
        };
        match json {
            Value::Null => {}
            Value::Object(fields) if is_list(&fields) => expand_list(index, fields, &mut out),
            other => out.push(Document {
                index,
                outcome: from_json(other),
            }),
        }
    }
    Ok(out)
}

fn is_list(fields: &Map<String, Value>) -> bool {
    fields.get("kind").and_then(Value::as_str) == Some("List")
}

/// `kind: List` (what `kubectl get -o yaml` writes): each item is an object of
/// its own, reported under the List's document index with an `items[i]` path.
fn expand_list(index: usize, mut fields: Map<String, Value>, out: &mut Vec<Document>) {
    let items = match fields.remove("items") {
        None | Some(Value::Null) => return,
        Some(Value::Array(items)) => items,
        Some(_) => {
            out.push(Document {
                index,
                outcome: Err(ObjectError {
                    kind: "List".into(),
                    namespace: String::new(),
                    name: String::new(),
                    field: "items".into(),
                    problem: "expected a list of objects".into(),
                }),
            });
            return;
        }
    };
    for (i, item) in items.into_iter().enumerate() {
        let outcome = from_json(item).map_err(|mut e| {
            e.field = if e.field == "." {
                format!("items[{i}]")
            } else {
                format!("items[{i}].{}", e.field)
            };
            e
        });
        out.push(Document { index, outcome });
    }
}

fn shape_error(problem: String) -> ObjectError {
    ObjectError {
        kind: "?".into(),
        namespace: String::new(),
        name: String::new(),
        field: ".".into(),
        problem,
    }
}

/// YAML to JSON: scalar mapping keys become strings (as `kubectl` does), tags
/// are dropped, and non-finite floats (which JSON cannot hold) become null so the
/// decoder reports a type error at their field.
fn to_json(yaml: Yaml) -> Result<Value, String> {
    Ok(match yaml {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64()
                    .and_then(Number::from_f64)
                    .map_or(Value::Null, Value::Number)
            }
        }
        Yaml::String(s) => Value::String(s),
        Yaml::Sequence(items) => {
            Value::Array(items.into_iter().map(to_json).collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(mapping) => {
            let mut out = Map::new();
            for (key, value) in mapping {
                let key = match key {
                    Yaml::String(s) => s,
                    Yaml::Bool(b) => b.to_string(),
                    Yaml::Number(n) => n.to_string(),
                    Yaml::Null => "null".into(),
                    Yaml::Tagged(t) => match t.value {
                        Yaml::String(s) => s,
                        _ => return Err("a mapping key must be a string".into()),
                    },
                    Yaml::Sequence(_) | Yaml::Mapping(_) => {
                        return Err(
                            "a mapping key must be a string, not a list or a mapping".into()
                        );
                    }
                };
                out.insert(key, to_json(value)?);
            }
            Value::Object(out)
        }
        Yaml::Tagged(tagged) => to_json(tagged.value)?,
    })
}
