//! YAML documents to objects: lists, syntax errors, YAML's oddities, aliases.

use std::fs;

use super::{NS, sa, settle};
use crate::model::Object;
use crate::source::dir::parse::parse_documents;
use crate::source::dir::state::DirState;

#[test]
fn documents_lists_and_empty_documents() {
    let text = format!(
        "---\n# only a comment\n---\n{NS}---\n\
         apiVersion: v1\nkind: List\nitems:\n- {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: a}}}}\n\
         - {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: B}}}}\n---\n"
    );
    let docs = parse_documents(&text).unwrap();
    assert_eq!(docs.len(), 3);
    assert_eq!(docs[0].index, 2);
    assert!(matches!(docs[0].outcome, Ok(Object::Namespace(_))));
    assert_eq!(docs[1].index, 3);
    assert!(docs[1].outcome.is_ok());
    let e = docs[2].outcome.as_ref().unwrap_err();
    assert_eq!(docs[2].index, 3);
    assert_eq!(e.field, "items[1].metadata.name");
}

#[test]
fn syntax_errors_carry_the_document_and_line() {
    let text = format!("{NS}---\nkind: [unclosed\n");
    let e = parse_documents(&text).unwrap_err();
    assert_eq!(e.document, 2);
    assert!(e.error.to_string().contains("line"), "{}", e.error);
}

#[test]
fn yaml_oddities_become_json() {
    // A numeric key and a tagged value are read the way kubectl reads them.
    let text =
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: !!str x\n  labels: {1: one}\n";
    let docs = parse_documents(text).unwrap();
    let Ok(Object::ServiceAccount(sa)) = &docs[0].outcome else {
        panic!("{:?}", docs[0].outcome)
    };
    assert_eq!(sa.meta.labels["1"], "one");
    let docs = parse_documents("? [a]\n: b\n").unwrap();
    assert!(docs[0].outcome.is_err());
}

/// `a` is a list of `n` scalars, `b` a list of `n` aliases of it: n * n nodes.
fn alias_bomb(n: usize) -> String {
    format!(
        "a: &a [{}]\nb: [{}]\n",
        vec!["x"; n].join(","),
        vec!["*a"; n].join(",")
    )
}

#[test]
fn an_alias_bomb_is_refused_before_it_is_built() {
    use crate::source::dir::DirError;
    // 15 KB standing for 9 million nodes.
    let text = format!("{NS}---\n{}", alias_bomb(3000));
    let e = parse_documents(&text).unwrap_err();
    assert_eq!(e.document, 2);
    assert!(
        matches!(e.error, DirError::Expanded { limit } if limit == 16 * text.len() as u64),
        "{:?}",
        e.error
    );
    // Nested: a thousand to the power of three.
    let nested = format!(
        "{}c: &c [{}]\nd: [{}]\n",
        alias_bomb(1000).replace("b: [", "b: &b ["),
        vec!["*b"; 1000].join(","),
        vec!["*c"; 1000].join(",")
    );
    let e = parse_documents(&nested).unwrap_err();
    assert!(
        matches!(e.error, DirError::Expanded { limit } if limit == 16 * nested.len() as u64),
        "{:?}",
        e.error
    );
    // A long string repeated: counted by its length too.
    let long = format!(
        "a: &a '{}'\nb: [{}]\n",
        "x".repeat(100_000),
        vec!["*a"; 1000].join(",")
    );
    let e = parse_documents(&long).unwrap_err();
    assert!(
        matches!(e.error, DirError::Expanded { .. }),
        "{:?}",
        e.error
    );
    assert!(e.error.to_string().contains("aliases"), "{}", e.error);

    // A file of ordinary size with aliases reused a few times reads as before.
    let text = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n  namespace: shop\n  \
                labels: &l {app: web, team: shop, tier: front}\n  annotations: *l\n\
                ---\napiVersion: v1\nkind: List\nitems:\n\
                - {apiVersion: v1, kind: ServiceAccount, metadata: &m {name: b, namespace: shop, labels: {team: shop}}}\n\
                - {apiVersion: v1, kind: ServiceAccount, metadata: *m}\n";
    let docs = parse_documents(text).unwrap();
    assert_eq!(docs.len(), 3);
    for doc in &docs {
        let Ok(Object::ServiceAccount(sa)) = &doc.outcome else {
            panic!("{:?}", doc.outcome)
        };
        assert_eq!(sa.meta.labels["team"], "shop");
    }
}

#[test]
fn an_alias_bomb_keeps_what_the_file_held() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.yaml");
    fs::write(&file, sa("a")).unwrap();
    let mut state = DirState::new(dir.path().to_owned());
    assert_eq!(settle(&mut state).changes.len(), 1);
    fs::write(&file, format!("{}---\n{}", sa("a"), alias_bomb(3000))).unwrap();
    let delta = settle(&mut state);
    assert!(delta.changes.is_empty(), "{:?}", delta.changes);
    let (origin, reports) = &delta.reports[0];
    assert_eq!(origin, &file.display().to_string());
    assert_eq!(reports[0].document, Some(2));
    assert!(reports[0].error.problem.contains("expands"), "{reports:?}");
    assert_eq!(state.objects().len(), 1);
}

#[test]
fn merge_keys_are_applied() {
    let text = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: web\n  namespace: shop\n  \
                labels: &base {team: shop, tier: front}\n\
                ---\napiVersion: v1\nkind: List\nitems:\n\
                - apiVersion: v1\n  kind: ServiceAccount\n  metadata: &meta\n    namespace: shop\n    \
                labels: &team {team: shop, tier: back}\n    name: api\n\
                - apiVersion: v1\n  kind: ServiceAccount\n  metadata:\n    <<: *meta\n    name: db\n    \
                labels: {<<: [{tier: data, zone: a}, *team], owner: dba}\n";
    let docs = parse_documents(text).unwrap();
    let labels: Vec<_> = docs
        .iter()
        .map(|d| match &d.outcome {
            Ok(Object::ServiceAccount(sa)) => (sa.meta.name.clone(), sa.meta.labels.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(labels.len(), 3);
    // The mapping's own keys win; then the merged mappings, the first first.
    let (name, db) = &labels[2];
    assert_eq!(name, "db");
    let db: Vec<_> = db.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        db,
        [
            ("owner", "dba"),
            ("team", "shop"),
            ("tier", "data"),
            ("zone", "a")
        ]
    );

    // The metadata of a ServiceAccount merged from an anchor: its labels too.
    let text = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  <<: &base {namespace: shop, labels: {team: shop}}\n  name: web\n";
    let docs = parse_documents(text).unwrap();
    let Ok(Object::ServiceAccount(sa)) = &docs[0].outcome else {
        panic!("{:?}", docs[0].outcome)
    };
    assert_eq!(
        (sa.meta.namespace.as_str(), sa.meta.labels["team"].as_str()),
        ("shop", "shop")
    );

    // A tagged `<<` is an ordinary key, as in `serde_yaml_ng::Value`.
    assert!(parse_documents("metadata: {!t <<: 5}\n").is_ok());
    // A merge key naming a scalar is an error in the file, like a syntax error.
    let e = parse_documents(&format!("{NS}---\nmetadata: {{<<: 5}}\n")).unwrap_err();
    assert_eq!(e.document, 2);
    assert!(e.error.to_string().contains("merge"), "{}", e.error);
}
