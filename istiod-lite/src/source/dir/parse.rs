//! One file's text to its documents: multi-document YAML, each document read
//! with [`crate::model::from_json`], `kind: List` documents expanded, empty
//! documents skipped. A YAML syntax error fails the whole file, and so does a
//! document that expands (through aliases) past the file's budget.

use serde_json::{Map, Value};

use super::DirError;
use super::yaml::{Budget, Failure, to_json};
use crate::model::{Object, ObjectError, from_json};

/// One object read from a file, or why it could not be read.
#[derive(Debug)]
pub(super) struct Document {
    /// 1-based index of the YAML document in the file.
    pub index: usize,
    pub outcome: Result<Object, ObjectError>,
}

/// The file is not valid YAML, or too large once expanded: nothing of it can be
/// trusted.
#[derive(Debug)]
pub(super) struct SyntaxError {
    pub document: usize,
    pub error: DirError,
}

/// Reads every document of `text`.
pub(super) fn parse_documents(text: &str) -> Result<Vec<Document>, SyntaxError> {
    let mut out = Vec::new();
    // Shared by the file's documents: what they may expand to all together.
    let mut budget = Budget::for_text(text.len());
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let json = match to_json(de, &mut budget) {
            Ok(json) => json,
            Err(Failure::Syntax(error)) => {
                return Err(SyntaxError {
                    document: index,
                    error: DirError::Syntax(error),
                });
            }
            Err(Failure::TooLarge { limit }) => {
                return Err(SyntaxError {
                    document: index,
                    error: DirError::Expanded { limit },
                });
            }
            Err(Failure::Shape(problem)) => {
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
