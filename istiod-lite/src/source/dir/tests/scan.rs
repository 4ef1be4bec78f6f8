//! Scans of the directory: differences, unreadable directories, files caught
//! mid-write, duplicates.

use std::fs;

use super::{NS, rewrite_in_place, sa, settle};
use crate::model::{Kind, Object, ObjectChange};
use crate::source::dir::load_dir;
use crate::source::dir::state::DirState;

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
        let bytes = crate::source::dir::state::read(path, stat)?;
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

/// A ConfigMap with the item path `sub/a.yaml`, mounted by the kubelet: read
/// once through its `sub -> ..data/sub` link, and again when the kubelet swaps
/// `..data` to a new version.
#[test]
fn a_mounted_config_map_with_nested_items_is_read() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let version = |name: &str, sa_name: &str| {
        fs::create_dir_all(root.join(name).join("sub")).unwrap();
        fs::write(root.join(name).join("sub/a.yaml"), sa(sa_name)).unwrap();
    };
    version("..2026_01_01_00_00_00.1", "web");
    symlink("..2026_01_01_00_00_00.1", root.join("..data")).unwrap();
    symlink("..data/sub", root.join("sub")).unwrap();
    // A cycle as well: walked once all the same.
    symlink(".", root.join("again")).unwrap();
    let mut state = DirState::new(root.to_owned());
    let delta = settle(&mut state);
    assert!(delta.reports.is_empty(), "{:?}", delta.reports);
    assert_eq!(delta.changes.len(), 1, "{:?}", delta.changes);
    assert!(matches!(&delta.changes[0], ObjectChange::Upsert(o) if o.meta().name == "web"));

    // The kubelet's update: a new version, then `..data` renamed over.
    version("..2026_01_01_00_00_00.2", "api");
    symlink("..2026_01_01_00_00_00.2", root.join("..data_tmp")).unwrap();
    fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    fs::remove_dir_all(root.join("..2026_01_01_00_00_00.1")).unwrap();
    let delta = settle(&mut state);
    assert_eq!(delta.changes.len(), 2, "{:?}", delta.changes);
    assert!(matches!(&delta.changes[0], ObjectChange::Upsert(o) if o.meta().name == "api"));
}
