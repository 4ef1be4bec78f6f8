//! Directory source: a watched directory of multi-document Kubernetes YAML, the
//! embedded default when no cluster runs. The directory is polled (stat, then
//! re-read and hash only what changed); no inotify, so it works on any
//! filesystem, including mounted ConfigMaps and network shares.
//!
//! Bad input never loses config, and neither does a file caught mid-write (a
//! change is read once two polls agree on its stat): the rules are in
//! `dir/state.rs`.

mod parse;
mod state;
mod walk;
mod yaml;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::drain::DrainWatcher;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::model::{Object, Report, SourceEvent};
use state::{Delta, DirState};

/// Scans [`load_dir`] makes at most (back to back) for every file to settle.
const LOAD_SCANS: usize = 8;

/// The poll interval callers use unless told otherwise.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);

/// Why a file or directory could not be read as a whole.
#[derive(Debug, thiserror::Error)]
enum DirError {
    #[error("cannot read directory: {0}")]
    ListDir(std::io::Error),
    #[error("cannot stat: {0}; the objects read from it before are kept")]
    Stat(std::io::Error),
    #[error("cannot read file: {0}")]
    Read(std::io::Error),
    #[error("file is larger than {limit} bytes; the objects read from it before are kept")]
    TooLarge { limit: u64 },
    #[error("file is not UTF-8 text; the objects read from it before are kept")]
    NotUtf8,
    #[error("YAML syntax error: {0}; the objects read from this file before are kept")]
    Syntax(serde_yaml_ng::Error),
    #[error(
        "the document expands to more than {limit} nodes through its aliases (an alias bomb?); the objects read from this file before are kept"
    )]
    Expanded { limit: u64 },
}

/// Polls the first view waits at most for files still being written (5 s at the
/// default 250 ms): a file rewritten at every poll cannot keep the mesh unsynced.
pub const FIRST_VIEW_MAX_POLLS: u32 = 20;

/// Watched directories of Kubernetes YAML, read as one.
#[derive(Debug)]
pub struct DirSource {
    dirs: Vec<PathBuf>,
    poll: Duration,
}

impl DirSource {
    /// Watches `dir` (recursively), looking every `poll`.
    pub fn new(dir: PathBuf, poll: Duration) -> Self {
        Self::with_dirs(vec![dir], poll)
    }

    /// Watches every one of `dirs` (recursively) as one source: an object may be
    /// defined in one file of one of them; another definition is reported and
    /// ignored, as within one directory.
    pub fn with_dirs(dirs: Vec<PathBuf>, poll: Duration) -> Self {
        Self { dirs, poll }
    }

    /// Sends the directory's objects, then its changes, until drained (or until
    /// the receiver is gone). The first complete view (the first scans, until no
    /// file is still settling: a poll or two, at most [`FIRST_VIEW_MAX_POLLS`], after
    /// which a file still changing is left out until it settles) arrives as one
    /// [`SourceEvent::Changes`], then every origin's reports, then
    /// [`SourceEvent::Synced`]; after that only differences are sent.
    pub async fn run(self, tx: mpsc::Sender<SourceEvent>, drain: DrainWatcher) {
        let dirs: Vec<_> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        let span = tracing::info_span!("dir_source", dirs = %dirs.join(","));
        self.watch(tx, drain).instrument(span).await
    }

    async fn watch(self, tx: mpsc::Sender<SourceEvent>, drain: DrainWatcher) {
        let mut state = Some(DirState::with_roots(self.dirs.clone()));
        let mut ticker = tokio::time::interval(self.poll.max(Duration::from_millis(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Until synced: what the scans so far found, sent as one view.
        let mut first = true;
        let mut initial = Delta::default();
        let mut unsettled_polls = 0u32;
        loop {
            tokio::select! {
                biased;
                _ = drain.signaled() => return,
                _ = ticker.tick() => {}
            }
            let Some(mut current) = state.take() else {
                return;
            };
            // Reading and parsing files blocks: keep it off the runtime's workers.
            let scanned = tokio::task::spawn_blocking(move || {
                let delta = current.scan();
                (current, delta)
            })
            .await;
            let (current, delta) = match scanned {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(error = %e, "directory scan failed; the source stops");
                    return;
                }
            };
            state = Some(current);
            let delta = if first {
                initial.absorb(delta);
                if !initial.pending.is_empty() {
                    unsettled_polls += 1;
                    if unsettled_polls < FIRST_VIEW_MAX_POLLS {
                        continue;
                    }
                    // A file that changes at every poll must not hold up the
                    // whole mesh: its objects follow once it settles.
                    tracing::warn!(files = ?initial.pending, polls = unsettled_polls, "still being written; synced without them, they apply once they stop changing");
                }
                std::mem::take(&mut initial)
            } else {
                delta
            };
            if !delta.pending.is_empty() {
                tracing::debug!(files = ?delta.pending, "changing; read once settled");
            }

            let mut events = Vec::new();
            if first || !delta.changes.is_empty() {
                log_changes(&delta.changes);
                events.push(SourceEvent::Changes(delta.changes));
            }
            for (origin, reports) in delta.reports {
                for report in &reports {
                    tracing::warn!(%report, "config refused");
                }
                if reports.is_empty() {
                    tracing::info!(%origin, "problems cleared");
                }
                events.push(SourceEvent::Reports { origin, reports });
            }
            if first {
                events.push(SourceEvent::Synced);
                first = false;
            }
            for event in events {
                tokio::select! {
                    biased;
                    _ = drain.signaled() => return,
                    sent = tx.send(event) => if sent.is_err() { return },
                }
            }
        }
    }
}

fn log_changes(changes: &[crate::model::ObjectChange]) {
    use crate::model::ObjectChange;
    for change in changes {
        match change {
            ObjectChange::Upsert(o) => tracing::debug!(key = %o.key(), "upsert"),
            ObjectChange::Delete(k) => tracing::debug!(key = %k, "delete"),
        }
    }
}

/// Reads `dir` once, as the first scan of [`DirSource`] would: the objects
/// (namespaces first) and every problem found. For tests and `meshctl analyze`.
pub fn load_dir(dir: &Path) -> (Vec<Object>, Vec<Report>) {
    let mut state = DirState::new(dir.to_owned());
    // A file is read once two scans agree on its stat; a few more scans give
    // one being rewritten right now a chance to settle.
    for _ in 0..LOAD_SCANS {
        if state.scan().pending.is_empty() {
            break;
        }
    }
    (state.objects(), state.reports())
}
