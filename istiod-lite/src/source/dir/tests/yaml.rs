//! Property tests of YAML to JSON: what is built from the parser's events equals
//! what `serde_yaml_ng::Value` (merge keys applied) converts to, and no text makes
//! the parser panic.

use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use serde_yaml_ng::Value as Yaml;

use crate::source::dir::parse::parse_documents;
use crate::source::dir::yaml::{Budget, to_json};

/// The conversion through a whole `serde_yaml_ng::Value`, as it was done before
/// the budget: the reference (`None`: refused, for whatever reason).
fn reference(text: &str) -> Option<Value> {
    let mut yaml: Yaml = serde_yaml_ng::from_str(text).ok()?;
    yaml.apply_merge().ok()?;
    convert(yaml)
}

fn convert(yaml: Yaml) -> Option<Value> {
    Some(match yaml {
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
            Value::Array(items.into_iter().map(convert).collect::<Option<_>>()?)
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
                        _ => return None,
                    },
                    Yaml::Sequence(_) | Yaml::Mapping(_) => return None,
                };
                out.insert(key, convert(value)?);
            }
            Value::Object(out)
        }
        Yaml::Tagged(tagged) => convert(tagged.value)?,
    })
}

fn yaml() -> impl Strategy<Value = Yaml> {
    let leaf = prop_oneof![
        Just(Yaml::Null),
        any::<bool>().prop_map(Yaml::Bool),
        any::<i64>().prop_map(|i| Yaml::Number(i.into())),
        any::<u64>().prop_map(|u| Yaml::Number(u.into())),
        any::<f64>().prop_map(|f| Yaml::Number(f.into())),
        "\\PC{0,12}".prop_map(Yaml::String),
        prop_oneof![
            Just("<<"),
            Just("~"),
            Just("null"),
            Just("1e3"),
            Just("0x1F"),
            Just("*a")
        ]
        .prop_map(|s| Yaml::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Yaml::Sequence),
            prop::collection::vec(("[a-z]{0,3}", inner), 0..6).prop_map(|entries| {
                Yaml::Mapping(
                    entries
                        .into_iter()
                        .map(|(k, v)| (Yaml::String(k), v))
                        .collect(),
                )
            }),
        ]
    })
}

/// Text made of YAML's structural pieces, anchors, aliases and merge keys among
/// them, so the odd corners of the parser are reached.
fn yamlish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("a"),
        Just("b: "),
        Just("- "),
        Just("\n"),
        Just("  "),
        Just("["),
        Just("]"),
        Just("{"),
        Just("}"),
        Just(", "),
        Just(": "),
        Just("&x "),
        Just("*x"),
        Just("&y "),
        Just("*y"),
        Just("<<: "),
        Just("? "),
        Just("!t "),
        Just("'q'"),
        Just("\"\\u00e9\""),
        Just("---\n"),
        Just("|\n  "),
        Just("1.5"),
        Just("~"),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

proptest! {
    // No regression files written into the source tree: a failure prints its input.
    #![proptest_config(ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn builds_what_a_yaml_value_converts_to(value in yaml()) {
        let text = serde_yaml_ng::to_string(&value).unwrap();
        let built = to_json(
            serde_yaml_ng::Deserializer::from_str(&text),
            &mut Budget::for_text(text.len()),
        );
        prop_assert_eq!(built.ok(), reference(&text), "{}", text);
    }

    #[test]
    fn never_panics(text in yamlish()) {
        let _ = parse_documents(&text);
        // A single document reads as the reference does (or both refuse it).
        if !text.contains("---") {
            let built = to_json(
                serde_yaml_ng::Deserializer::from_str(&text),
                &mut Budget::for_text(text.len()),
            );
            prop_assert_eq!(built.ok(), reference(&text), "{:?}", text);
        }
    }
}
