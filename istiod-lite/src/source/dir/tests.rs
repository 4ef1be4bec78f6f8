//! Unit tests of parsing and of the scan state (the watch loop is tested in
//! `tests/dir_source.rs`).

use std::fs;

use super::load_dir;
use super::parse::parse_documents;
use super::state::{Delta, DirState};
use crate::model::{Kind, Object, ObjectChange};

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

fn sa(name: &str) -> String {
    format!("apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: shop}}\n")
}

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

#[test]
fn load_dir_reads_everything_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("b.yaml"), format!("{}---\n{NS}", sa("web"))).unwrap();
    fs::write(
        dir.path().join("a.yaml"),
        format!("{}---\nkind: Pod\n", sa("web")),
    )
    .unwrap();
    let (objects, reports) = load_dir(dir.path());
    // Namespaces first.
    let kinds: Vec<Kind> = objects.iter().map(Object::kind).collect();
    assert_eq!(kinds, [Kind::Namespace, Kind::ServiceAccount]);
    assert_eq!(reports.len(), 2, "{reports:?}");
    let missing_version = reports
        .iter()
        .find(|r| r.origin.ends_with("a.yaml"))
        .unwrap();
    assert_eq!(missing_version.document, Some(2));
    assert_eq!(missing_version.error.field, "apiVersion");
    let duplicate = reports
        .iter()
        .find(|r| r.origin.ends_with("b.yaml"))
        .unwrap();
    assert_eq!(duplicate.document, Some(1));
    assert!(duplicate.error.problem.contains("a.yaml"), "{duplicate:?}");
}

/// Two scans: the first sees the new stats, the second reads what kept them.
fn settle(state: &mut DirState) -> Delta {
    let first = state.scan();
    assert!(first.changes.is_empty(), "read before settling: {first:?}");
    let second = state.scan();
    assert!(second.pending.is_empty(), "{second:?}");
    second
}

#[test]
fn scan_reports_only_differences() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.yaml");
    fs::write(&file, format!("{NS}---\n{}", sa("a"))).unwrap();
    let mut state = DirState::new(dir.path().to_owned());
    let first = settle(&mut state);
    assert_eq!(first.changes.len(), 2);
    assert!(first.reports.is_empty());
    let again = state.scan();
    assert!(again.changes.is_empty() && again.reports.is_empty());

    // Same content rewritten: the stat changes, the hash does not.
    fs::write(&file, format!("{NS}---\n{}", sa("a"))).unwrap();
    assert!(settle(&mut state).changes.is_empty());

    fs::write(&file, format!("{NS}---\n{}", sa("b"))).unwrap();
    let delta = settle(&mut state);
    assert_eq!(delta.changes.len(), 2);
    assert!(matches!(&delta.changes[0], ObjectChange::Upsert(o) if o.meta().name == "b"));
    assert!(matches!(&delta.changes[1], ObjectChange::Delete(k) if k.name == "a"));
}

#[test]
fn unreadable_directory_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("x.yaml"), sa("a")).unwrap();
    let mut state = DirState::new(sub.clone());
    assert_eq!(settle(&mut state).changes.len(), 1);
    fs::rename(&sub, dir.path().join("moved")).unwrap();
    let delta = state.scan();
    assert!(delta.changes.is_empty(), "{:?}", delta.changes);
    assert_eq!(delta.reports.len(), 1);
    assert!(
        delta.reports[0].1[0]
            .error
            .problem
            .contains("cannot read directory")
    );
    fs::rename(dir.path().join("moved"), &sub).unwrap();
    let delta = state.scan();
    assert!(delta.changes.is_empty());
    assert_eq!(delta.reports.len(), 1);
    assert!(delta.reports[0].1.is_empty(), "cleared");
}

/// Truncates `file` in place (same inode), as `>` in a shell or an editor that
/// rewrites without renaming does.
fn rewrite_in_place(file: &std::path::Path, text: &str) {
    use std::io::Write as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(file)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[test]
fn a_file_truncated_in_place_keeps_its_objects_until_it_settles() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deny.yaml");
    fs::write(&file, format!("{NS}---\n{}", sa("a"))).unwrap();
    let mut state = DirState::new(dir.path().to_owned());
    assert_eq!(settle(&mut state).changes.len(), 2);

    // Caught between truncation and rewrite: nothing is deleted, however often
    // the directory is looked at while the file is freshly empty.
    rewrite_in_place(&file, "");
    for _ in 0..3 {
        let delta = state.scan();
        assert!(delta.changes.is_empty(), "{:?}", delta.changes);
        assert_eq!(delta.pending, std::slice::from_ref(&file));
    }
    assert_eq!(state.objects().len(), 2);

    // The rewrite lands: only its difference is published.
    rewrite_in_place(&file, &format!("{NS}---\n{}---\n{}", sa("a"), sa("b")));
    let delta = settle(&mut state);
    assert_eq!(delta.changes.len(), 1, "{:?}", delta.changes);
    assert!(matches!(&delta.changes[0], ObjectChange::Upsert(o) if o.meta().name == "b"));

    // Emptied for good (older than the racy window): then its objects go.
    rewrite_in_place(&file, "");
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(10);
    fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let delta = settle(&mut state);
    assert_eq!(delta.changes.len(), 3, "{:?}", delta.changes);
    assert!(state.objects().is_empty());
}

#[test]
fn a_half_written_document_is_never_published() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.yaml");
    fs::write(&file, NS).unwrap();
    let mut state = DirState::new(dir.path().to_owned());
    assert_eq!(settle(&mut state).changes.len(), 1);

    // The writer has appended half a ServiceAccount when a poll looks...
    let whole = sa("web");
    let half = &whole[..whole.find("metadata").unwrap()];
    rewrite_in_place(&file, &format!("{NS}---\n{half}"));
    let delta = state.scan();
    assert!(
        delta.changes.is_empty() && delta.reports.is_empty(),
        "{delta:?}"
    );
    // ...and finishes before the next: only the whole document is read.
    rewrite_in_place(&file, &format!("{NS}---\n{whole}"));
    let delta = state.scan();
    assert!(delta.changes.is_empty(), "{delta:?}");
    let delta = state.scan();
    assert!(delta.reports.is_empty(), "{delta:?}");
    assert_eq!(delta.changes.len(), 1);
    assert!(matches!(&delta.changes[0], ObjectChange::Upsert(o) if o.meta().name == "web"));
}

/// A file rewritten in place while a poll reads it: that read (old bytes, new
/// bytes or a mix) is discarded, and only the file as it settles is published.
#[test]
fn a_file_changed_while_it_is_read_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.yaml");
    fs::write(&file, sa("old")).unwrap();
    let mut state = DirState::new(dir.path().to_owned());
    assert!(
        state.scan().changes.is_empty(),
        "first sight: not settled yet"
    );
    let mut rewrites = 0;
    let delta = state.scan_reading(&mut |path, stat| {
        let bytes = super::state::read(path, stat)?;
        rewrite_in_place(path, &sa("newer-name"));
        rewrites += 1;
        Ok(bytes)
    });
    assert_eq!(rewrites, 1);
    assert!(delta.changes.is_empty(), "{:?}", delta.changes);
    assert_eq!(delta.pending, std::slice::from_ref(&file));
    assert!(state.objects().is_empty());

    // The stat seen after the read counts as this poll's sighting: the next poll
    // reads the file if it has not moved again.
    let delta = state.scan();
    assert_eq!(delta.changes.len(), 1, "{:?}", delta.changes);
    assert!(
        matches!(&delta.changes[0], ObjectChange::Upsert(o) if o.meta().name == "newer-name"),
        "{:?}",
        delta.changes
    );
}

#[test]
fn a_key_in_two_directories_is_reported_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (team_a, team_b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir(&team_a).unwrap();
    fs::create_dir(&team_b).unwrap();
    let a = team_a.join("sa.yaml");
    let b = team_b.join("sa.yaml");
    fs::write(&a, sa("web")).unwrap();
    fs::write(
        &b,
        format!(
            "{NS}---\n{}",
            sa("web").replace("{name: web", "{name: web, labels: {team: b}")
        ),
    )
    .unwrap();
    let mut state = DirState::with_roots(vec![team_a.clone(), team_b.clone()]);
    let delta = settle(&mut state);
    assert_eq!(delta.changes.len(), 2, "{:?}", delta.changes);
    let web = state
        .objects()
        .into_iter()
        .find(|o| o.meta().name == "web")
        .unwrap();
    assert!(
        web.meta().labels.is_empty(),
        "the first directory's definition wins"
    );
    let (origin, reports) = &delta.reports[0];
    assert_eq!(origin, &b.display().to_string());
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].error.name, "web");
    assert!(
        reports[0].error.problem.contains(&a.display().to_string()),
        "{reports:?}"
    );

    // The first definition goes: the other one takes over (not a delete).
    fs::remove_file(&a).unwrap();
    let delta = state.scan();
    assert_eq!(delta.changes.len(), 1, "{:?}", delta.changes);
    assert!(matches!(&delta.changes[0], ObjectChange::Upsert(o) if o.meta().labels["team"] == "b"));
    assert_eq!(delta.reports, [(b.display().to_string(), Vec::new())]);
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
    use super::DirError;
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

fn deletes(delta: &Delta) -> Vec<&crate::model::ObjectKey> {
    delta
        .changes
        .iter()
        .filter_map(|c| match c {
            ObjectChange::Delete(k) => Some(k),
            ObjectChange::Upsert(_) => None,
        })
        .collect()
}

/// `mv a.yaml b.yaml`: the new name is read a poll or two after the old one
/// vanished; meanwhile nothing is deleted (a DENY policy would fail open).
#[test]
fn a_renamed_file_keeps_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    fs::write(&a, format!("{NS}---\n{}", sa("web"))).unwrap();
    let mut state = DirState::new(dir.path().to_owned());
    assert_eq!(settle(&mut state).changes.len(), 2);

    fs::rename(&a, &b).unwrap();
    for scan in 0.. {
        assert!(scan < 4, "the new name never settled");
        let delta = state.scan();
        assert!(delta.changes.is_empty(), "scan {scan}: {:?}", delta.changes);
        assert!(delta.reports.is_empty(), "scan {scan}: {:?}", delta.reports);
        assert_eq!(state.objects().len(), 2);
        if delta.pending.is_empty() {
            break;
        }
    }

    // Deleted for good: its objects go at the next scan.
    fs::remove_file(&b).unwrap();
    let delta = state.scan();
    assert_eq!(deletes(&delta).len(), 2, "{:?}", delta.changes);
    assert!(state.objects().is_empty());
}

/// While another file keeps changing, a vanished file's objects wait, at most
/// the grace period; they never shadow or duplicate the renamed file's.
#[test]
fn a_vanished_file_waits_for_settling_files_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, busy) = (
        dir.path().join("a.yaml"),
        dir.path().join("b.yaml"),
        dir.path().join("busy.yaml"),
    );
    fs::write(&a, sa("web")).unwrap();
    fs::write(&busy, NS).unwrap();
    let mut state = DirState::new(dir.path().to_owned());
    assert_eq!(settle(&mut state).changes.len(), 2);
    let mut writes = 0;
    let mut scan_while_busy = |state: &mut DirState| {
        writes += 1;
        rewrite_in_place(&busy, &format!("{NS}{}", "#\n".repeat(writes)));
        let delta = state.scan();
        assert!(delta.pending.contains(&busy), "{delta:?}");
        delta
    };

    // Renamed, and the new name edited: its version wins, and no duplicate.
    fs::rename(&a, &b).unwrap();
    fs::write(
        &b,
        sa("web").replace("{name: web", "{name: web, labels: {v: b}"),
    )
    .unwrap();
    let mut upserted = false;
    for _ in 0..3 {
        let delta = scan_while_busy(&mut state);
        assert!(deletes(&delta).is_empty(), "{:?}", delta.changes);
        assert!(delta.reports.is_empty(), "{:?}", delta.reports);
        upserted |= !delta.changes.is_empty();
    }
    assert!(upserted);
    let web = state.objects().into_iter().find(|o| o.meta().name == "web");
    assert_eq!(web.unwrap().meta().labels["v"], "b");

    // Deleted for good while the other file is still changing: kept at first,
    // deleted once the grace period has passed.
    fs::remove_file(&b).unwrap();
    let delta = scan_while_busy(&mut state);
    assert!(delta.changes.is_empty(), "{:?}", delta.changes);
    state.backdate_vanished(std::time::Duration::from_secs(3));
    let delta = scan_while_busy(&mut state);
    assert_eq!(deletes(&delta).len(), 1, "{:?}", delta.changes);
    assert_eq!(state.objects().len(), 1);
}
