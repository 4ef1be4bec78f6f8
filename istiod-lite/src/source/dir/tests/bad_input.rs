//! Bad input never loses config: a document whose key cannot even be read keeps
//! what its place in the file held.

use std::fs;

use super::{NS, deletes, sa, settle};
use crate::model::{Kind, ObjectKey};
use crate::source::dir::state::DirState;

const DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                    metadata: {name: deny-scanners, namespace: shop}\n\
                    spec:\n  action: DENY\n  rules:\n  - from:\n    - source: {ipBlocks: [198.18.0.0/16]}\n";

fn deny_key() -> ObjectKey {
    ObjectKey::new(Kind::AuthorizationPolicy, "shop", "deny-scanners")
}

#[test]
fn a_kind_typo_keeps_the_policy_that_was_there() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    fs::write(&file, format!("{NS}---\n{DENY}")).unwrap();
    let mut state = DirState::new(dir.path().to_owned());
    assert_eq!(settle(&mut state).changes.len(), 2);

    let typo = DENY.replace("kind: AuthorizationPolicy", "kind: AuthorizationPolicies");
    fs::write(&file, format!("{NS}---\n{typo}")).unwrap();
    let delta = settle(&mut state);
    assert!(delta.changes.is_empty(), "{:?}", delta.changes);
    let (origin, reports) = &delta.reports[0];
    assert_eq!(origin, &file.display().to_string());
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].document, Some(2));
    assert!(
        reports[0].error.problem.contains("AuthorizationPolicies")
            || reports[0].error.kind == "AuthorizationPolicies",
        "{reports:?}"
    );
    assert!(state.objects().iter().any(|o| o.key() == deny_key()));

    // Nameless, in a file that now defines the policy in another document: that
    // definition is taken, the old one is not kept twice.
    let nameless = DENY.replace("name: deny-scanners, ", "");
    fs::write(&file, format!("{nameless}---\n{DENY}---\n{NS}")).unwrap();
    let delta = settle(&mut state);
    assert!(delta.changes.is_empty(), "{:?}", delta.changes);
    let (_, reports) = &delta.reports[0];
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].document, Some(1));

    // Fixed: the report clears; removed: the policy goes.
    fs::write(&file, format!("{NS}---\n{DENY}")).unwrap();
    let delta = settle(&mut state);
    assert!(delta.changes.is_empty(), "{:?}", delta.changes);
    assert_eq!(delta.reports[0].1, []);
    fs::write(&file, format!("{NS}---\n{}", sa("web"))).unwrap();
    let delta = settle(&mut state);
    assert_eq!(deletes(&delta), [&deny_key()]);
}

/// A file whose metadata cannot be read (here a link loop where it was; as
/// well a permission on a link's target, an I/O error) is not a deleted file.
#[test]
fn a_file_that_cannot_be_stated_keeps_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    fs::write(&file, DENY).unwrap();
    let mut state = DirState::new(dir.path().to_owned());
    assert_eq!(settle(&mut state).changes.len(), 1);

    fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink("policy.yaml", &file).unwrap();
    let delta = state.scan();
    assert!(delta.changes.is_empty(), "{:?}", delta.changes);
    let (origin, reports) = &delta.reports[0];
    assert_eq!(origin, &file.display().to_string());
    assert!(
        reports[0].error.problem.contains("cannot stat"),
        "{reports:?}"
    );
    assert_eq!(state.objects().len(), 1);

    // Removed for good: the policy goes, the report clears.
    fs::remove_file(&file).unwrap();
    let delta = state.scan();
    assert_eq!(deletes(&delta), [&deny_key()]);
    assert_eq!(delta.reports, [(file.display().to_string(), Vec::new())]);
}
