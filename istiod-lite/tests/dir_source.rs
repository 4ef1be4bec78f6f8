#![allow(clippy::unwrap_used)]
//! The directory source, watched: initial load, edits, deletions, bad input
//! reported without losing config, and duplicates. No fixed sleeps: every test
//! waits on the event channel with a timeout.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use istiod_lite::model::{Kind, ObjectChange, ObjectKey, Report, SourceEvent};
use istiod_lite::source::dir::DirSource;
use mesh_core::drain::{self, DrainTrigger};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

struct Watched {
    dir: tempfile::TempDir,
    rx: mpsc::Receiver<SourceEvent>,
    trigger: DrainTrigger,
    task: JoinHandle<()>,
}

impl Watched {
    /// Starts a source on a directory holding `files`, and returns once the first
    /// scan is in: its changes and reports.
    async fn start(
        files: &[(&str, &str)],
    ) -> (Self, Vec<ObjectChange>, Vec<(String, Vec<Report>)>) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            write(dir.path(), name, text);
        }
        Self::start_in(dir).await
    }

    /// [`Watched::start`] on a directory already prepared.
    async fn start_in(
        dir: tempfile::TempDir,
    ) -> (Self, Vec<ObjectChange>, Vec<(String, Vec<Report>)>) {
        let (tx, rx) = mpsc::channel(16);
        let (trigger, watcher) = drain::channel();
        let source = DirSource::new(dir.path().to_owned(), Duration::from_millis(20));
        let task = tokio::spawn(source.run(tx, watcher));
        let mut watched = Self {
            dir,
            rx,
            trigger,
            task,
        };
        let mut changes = None;
        let mut reports = Vec::new();
        loop {
            match watched.next().await {
                SourceEvent::Changes(c) => {
                    assert!(changes.is_none(), "one Changes before Synced");
                    changes = Some(c);
                }
                SourceEvent::Reports { origin, reports: r } => reports.push((origin, r)),
                SourceEvent::Synced => break,
            }
        }
        (
            watched,
            changes.expect("the first scan sends Changes"),
            reports,
        )
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        write(self.dir.path(), name, text);
    }

    async fn next(&mut self) -> SourceEvent {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("no event in time")
            .expect("source stopped")
    }

    async fn changes(&mut self) -> Vec<ObjectChange> {
        match self.next().await {
            SourceEvent::Changes(c) => c,
            other => panic!("expected changes, got {other:?}"),
        }
    }

    /// The next report of `origin`; asserts that no change came before it.
    async fn reports_without_changes(&mut self, origin: &Path) -> Vec<Report> {
        match self.next().await {
            SourceEvent::Reports { origin: o, reports } => {
                assert_eq!(o, origin.display().to_string());
                reports
            }
            other => panic!("expected reports of {}, got {other:?}", origin.display()),
        }
    }

    async fn stop(self) {
        drop(self.rx);
        self.trigger.drain(WAIT).await;
        self.task.await.unwrap();
    }
}

/// Writes atomically (a hidden temporary file renamed over the target), as a
/// careful editor or `kubectl`-style tool does, so no poll sees half a file.
fn write(dir: &Path, name: &str, text: &str) {
    let target = dir.join(name);
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    let tmp = dir.join(format!(".{}.tmp", name.replace('/', "_")));
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, &target).unwrap();
}

fn sa(name: &str, label: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: shop, labels: {{v: '{label}'}}}}\n"
    )
}

fn policy(name: &str, ip_block: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  rules:\n  - from:\n    - source: {{ipBlocks: [198.18.0.0/16, '{ip_block}']}}\n"
    )
}

fn key(kind: Kind, name: &str) -> ObjectKey {
    ObjectKey::new(kind, "shop", name)
}

fn upserted(changes: &[ObjectChange]) -> Vec<String> {
    changes
        .iter()
        .filter_map(|c| match c {
            ObjectChange::Upsert(o) => Some(o.key().to_string()),
            ObjectChange::Delete(_) => None,
        })
        .collect()
}

fn deleted(changes: &[ObjectChange]) -> Vec<ObjectKey> {
    changes
        .iter()
        .filter_map(|c| match c {
            ObjectChange::Delete(k) => Some(k.clone()),
            ObjectChange::Upsert(_) => None,
        })
        .collect()
}

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

#[tokio::test]
async fn initial_load_then_edits_and_removals() {
    let (mut w, changes, reports) = Watched::start(&[
        ("ns.yaml", NS),
        (
            "sub/sa.yml",
            &format!("{}---\n{}", sa("a", "1"), sa("b", "1")),
        ),
        (".hidden.yaml", &sa("hidden", "1")),
        ("notes.txt", "not yaml"),
    ])
    .await;
    assert!(reports.is_empty(), "{reports:?}");
    assert_eq!(
        upserted(&changes),
        [
            "Namespace shop",
            "ServiceAccount shop/a",
            "ServiceAccount shop/b"
        ]
    );

    // Edit one document: only it is sent.
    w.write(
        "sub/sa.yml",
        &format!("{}---\n{}", sa("a", "1"), sa("b", "2")),
    );
    let changes = w.changes().await;
    assert_eq!(upserted(&changes), ["ServiceAccount shop/b"]);
    assert!(deleted(&changes).is_empty());

    // Remove a document: its key is deleted.
    w.write("sub/sa.yml", &sa("b", "2"));
    let changes = w.changes().await;
    assert_eq!(deleted(&changes), [key(Kind::ServiceAccount, "a")]);
    assert!(upserted(&changes).is_empty());

    // Delete a file: its objects go.
    fs::remove_file(w.path("ns.yaml")).unwrap();
    let changes = w.changes().await;
    assert_eq!(
        deleted(&changes),
        [ObjectKey::new(Kind::Namespace, "", "shop")]
    );

    // A new file in a new directory.
    w.write("more/deeper/x.yaml", &sa("c", "1"));
    assert_eq!(upserted(&w.changes().await), ["ServiceAccount shop/c"]);
    w.stop().await;
}

#[tokio::test]
async fn malformed_document_is_reported_while_the_rest_applies_and_fixing_clears_it() {
    let text = format!(
        "{}---\n{}---\n{}",
        sa("a", "1"),
        policy("bad", "nope"),
        policy("good", "198.19.0.1")
    );
    let (mut w, changes, reports) = Watched::start(&[("shop.yaml", &text)]).await;
    assert_eq!(
        upserted(&changes),
        ["ServiceAccount shop/a", "AuthorizationPolicy shop/good"]
    );
    assert_eq!(reports.len(), 1);
    let (origin, reports) = &reports[0];
    assert_eq!(origin, &w.path("shop.yaml").display().to_string());
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(r.document, Some(2));
    assert_eq!(r.error.kind, "AuthorizationPolicy");
    assert_eq!(
        (r.error.namespace.as_str(), r.error.name.as_str()),
        ("shop", "bad")
    );
    assert_eq!(r.error.field, "spec.rules[0].from[0].source.ipBlocks[1]");
    let shown = r.to_string();
    assert!(
        shown.contains("shop.yaml (document 2)") && shown.contains("nope"),
        "{shown}"
    );

    // Fixing the document applies it and clears the report.
    let fixed = format!(
        "{}---\n{}---\n{}",
        sa("a", "1"),
        policy("bad", "198.18.0.9"),
        policy("good", "198.19.0.1")
    );
    w.write("shop.yaml", &fixed);
    assert_eq!(
        upserted(&w.changes().await),
        ["AuthorizationPolicy shop/bad"]
    );
    let cleared = w.reports_without_changes(&w.path("shop.yaml")).await;
    assert!(cleared.is_empty());

    // Breaking it again keeps the last good version of that key: no delete.
    w.write("shop.yaml", &text);
    let reports = w.reports_without_changes(&w.path("shop.yaml")).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].error.name, "bad");

    // Deleting the file removes its objects and clears its reports.
    fs::remove_file(w.path("shop.yaml")).unwrap();
    let changes = w.changes().await;
    assert_eq!(deleted(&changes).len(), 3, "{changes:?}");
    assert!(
        w.reports_without_changes(&w.path("shop.yaml"))
            .await
            .is_empty()
    );
    w.stop().await;
}

#[tokio::test]
async fn syntax_error_keeps_every_object_of_the_file() {
    let good = format!("{}---\n{}", sa("a", "1"), sa("b", "1"));
    let (mut w, changes, _) = Watched::start(&[("sa.yaml", &good)]).await;
    assert_eq!(changes.len(), 2);

    // Half-edited: one document changed, another broken.
    let broken = format!(
        "{}---\n{}---\nmetadata: [unclosed\n",
        sa("a", "2"),
        sa("b", "1")
    );
    w.write("sa.yaml", &broken);
    let reports = w.reports_without_changes(&w.path("sa.yaml")).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].document, Some(3));
    assert!(
        reports[0].error.problem.contains("line"),
        "{:?}",
        reports[0]
    );

    // Fixed: the edit lands and the report clears.
    w.write("sa.yaml", &format!("{}---\n{}", sa("a", "2"), sa("b", "1")));
    assert_eq!(upserted(&w.changes().await), ["ServiceAccount shop/a"]);
    assert!(
        w.reports_without_changes(&w.path("sa.yaml"))
            .await
            .is_empty()
    );
    w.stop().await;
}

#[tokio::test]
async fn a_key_in_two_files_is_taken_from_the_first() {
    let (mut w, changes, reports) = Watched::start(&[
        ("a.yaml", &sa("web", "from-a")),
        ("b.yaml", &sa("web", "from-b")),
    ])
    .await;
    assert_eq!(changes.len(), 1);
    let ObjectChange::Upsert(o) = &changes[0] else {
        panic!()
    };
    assert_eq!(o.meta().labels["v"], "from-a");
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].0, w.path("b.yaml").display().to_string());
    assert!(
        reports[0].1[0].error.problem.contains("a.yaml"),
        "{reports:?}"
    );

    // The first file gone, the second's definition takes over, reported no more.
    fs::remove_file(w.path("a.yaml")).unwrap();
    let changes = w.changes().await;
    let ObjectChange::Upsert(o) = &changes[0] else {
        panic!("{changes:?}")
    };
    assert_eq!(o.meta().labels["v"], "from-b");
    assert!(
        w.reports_without_changes(&w.path("b.yaml"))
            .await
            .is_empty()
    );
    w.stop().await;
}

#[tokio::test]
async fn drain_stops_the_source() {
    let (w, _, _) = Watched::start(&[]).await;
    let Watched {
        rx,
        trigger,
        task,
        dir,
    } = w;
    assert_eq!(trigger.drain(WAIT).await, drain::DrainOutcome::Graceful);
    task.await.unwrap();
    drop((rx, dir));
}

/// A file rewritten at every poll does not keep the source from syncing: the
/// first view comes without it (after `FIRST_VIEW_MAX_POLLS` polls), and its
/// objects follow once it stops changing.
#[tokio::test]
async fn a_file_that_never_settles_does_not_hold_up_the_first_view() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ns.yaml", NS);
    let busy = dir.path().join("busy.yaml");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // Another size each time, so every poll sees it change.
                let text = format!("{}{}", sa("busy", "1"), "#\n".repeat(i % 5 + 1));
                fs::write(&busy, text).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let (mut w, changes, _) = Watched::start_in(dir).await;
    assert_eq!(upserted(&changes), ["Namespace shop"]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(upserted(&w.changes().await), ["ServiceAccount shop/busy"]);
    w.stop().await;
}
