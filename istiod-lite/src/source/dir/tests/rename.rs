//! Files that vanish: renamed (their objects carry over without a deletion) or
//! deleted for good.

use std::fs;

use super::{NS, deletes, rewrite_in_place, sa, settle};
use crate::source::dir::state::DirState;

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
