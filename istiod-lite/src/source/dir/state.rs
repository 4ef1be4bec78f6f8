//! What the directory source remembers between polls (each file's stat, hash,
//! objects and problems) and how one poll turns into changes and reports.
//!
//! Nothing is lost to bad input: a file that cannot be read or parsed keeps the
//! objects last read from it; a document that fails validation keeps the last
//! good version of its object (found by its key, or by its place in the file when
//! even the key cannot be read); a key defined twice (in one directory or in two
//! of the watched ones) is taken from the first file in path order and the later
//! definition is reported.
//!
//! Nor to a file caught while it is written in place: a changed file is read only
//! once two consecutive polls saw the same stat (size, mtime, inode), and the read
//! is discarded if the stat moved while it ran. A file that held objects and is
//! now empty (truncated, perhaps about to be rewritten) also waits until it has
//! been empty for [`RACY_WINDOW`]: deleting its policies early would fail open.
//!
//! Nor to a rename: the new name is read only once it settles, a poll or two after
//! the old name vanished, so a vanished file's objects stay published while another
//! file is still settling (at most [`RENAME_GRACE`]). A file deleted for good loses
//! its objects as soon as no file is settling.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use super::DirError;
use super::parse::{Document, parse_documents};
use super::walk::{self, Stat};
use crate::model::{Kind, Object, ObjectChange, ObjectError, ObjectKey, Report};

/// Larger files are refused (and what was read from them before is kept).
const MAX_FILE_BYTES: u64 = 32 << 20;

/// Writes this close together may share a modification time (filesystem
/// timestamps are coarse, down to seconds on some network filesystems).
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// How long a vanished file's objects may wait for a file still settling (perhaps
/// the same file under a new name) before they are deleted.
const RENAME_GRACE: Duration = Duration::from_secs(2);

/// The directory source's memory.
#[derive(Debug)]
pub(super) struct DirState {
    /// The watched directories: one namespace of files, so a key defined in two
    /// of them is a duplicate like one defined twice in one.
    roots: Vec<PathBuf>,
    files: BTreeMap<PathBuf, FileState>,
    /// What the model has been told: the winning definition of every key.
    published: BTreeMap<ObjectKey, Object>,
    /// Each file's current reports (parse problems and duplicates), non-empty only.
    file_reports: BTreeMap<String, Vec<Report>>,
    /// Every origin's reports as last sent, non-empty only.
    sent: BTreeMap<String, Vec<Report>>,
}

#[derive(Debug, Default)]
struct FileState {
    /// `None` until read successfully: a failed read is retried every poll.
    stat: Option<Stat>,
    /// The stat the last poll saw, read or not: a change is read once a poll
    /// sees the same stat again.
    seen: Option<Stat>,
    hash: Option<[u8; 32]>,
    entries: Vec<Entry>,
    /// Problems found reading the file (not duplicates: those depend on others).
    problems: Vec<Report>,
    /// When the file was first found missing: until it is dropped, what it
    /// published stays, unless a present file defines the key (it may have been
    /// renamed).
    vanished: Option<Instant>,
}

#[derive(Clone, Debug)]
struct Entry {
    document: usize,
    key: ObjectKey,
    object: Object,
}

/// What one poll found.
#[derive(Debug, Default)]
pub(super) struct Delta {
    pub changes: Vec<ObjectChange>,
    /// Origins whose reports changed, with their new reports (empty clears).
    pub reports: Vec<(String, Vec<Report>)>,
    /// Files seen changing and not read yet (they may be mid-write): what they
    /// held before stays published until they settle.
    pub pending: Vec<PathBuf>,
}

impl Delta {
    /// Adds a later scan's delta to this one: changes in order, the latest
    /// reports of each origin, the latest pending files.
    pub fn absorb(&mut self, later: Delta) {
        self.changes.extend(later.changes);
        for (origin, reports) in later.reports {
            self.reports.retain(|(o, _)| *o != origin);
            self.reports.push((origin, reports));
        }
        self.pending = later.pending;
    }
}

impl DirState {
    pub fn new(root: PathBuf) -> Self {
        Self::with_roots(vec![root])
    }

    pub fn with_roots(roots: Vec<PathBuf>) -> Self {
        Self {
            roots,
            files: BTreeMap::new(),
            published: BTreeMap::new(),
            file_reports: BTreeMap::new(),
            sent: BTreeMap::new(),
        }
    }

    /// The objects the model has been told about, namespaces first.
    pub fn objects(&self) -> Vec<Object> {
        let mut objects: Vec<Object> = self.published.values().cloned().collect();
        objects.sort_by_key(|o| (rank(o.kind()), o.key()));
        objects
    }

    /// Every current report.
    pub fn reports(&self) -> Vec<Report> {
        self.sent.values().flatten().cloned().collect()
    }

    /// Looks at the directory once: re-reads the files whose stat changed and
    /// has settled (see the module doc) and returns what changed since the last
    /// scan, with the files still settling.
    pub fn scan(&mut self) -> Delta {
        self.scan_reading(&mut read)
    }

    /// [`DirState::scan`] with the file reader given (tests: a file that changes
    /// while it is read).
    pub(super) fn scan_reading(&mut self, read: &mut FileReader<'_>) -> Delta {
        let listing = walk::list_all(&self.roots);
        let now = Instant::now();
        let mut dirty = false;
        let mut pending = Vec::new();

        for (path, state) in &mut self.files {
            if !listing.files.contains_key(path) && !listing.hides(path) {
                dirty |= state.vanish(now);
            }
        }
        for (path, stat) in &listing.files {
            let state = self.files.entry(path.clone()).or_default();
            // Back (renamed back, or a flicker): its entries count again as they are.
            dirty |= state.vanished.take().is_some();
            if state.stat == Some(*stat) {
                continue;
            }
            if !state.settled(*stat) {
                pending.push(path.clone());
                continue;
            }
            match refresh(path, *stat, state, read) {
                Refresh::Unchanged => {}
                Refresh::Changed => dirty = true,
                Refresh::Moved => pending.push(path.clone()),
                Refresh::Gone => dirty |= state.vanish(now),
            }
        }
        // A vanished file waits for the files still settling, within bounds.
        self.files.retain(|_, state| {
            let keep = state.vanished.is_none_or(|since| {
                !pending.is_empty() && now.saturating_duration_since(since) < RENAME_GRACE
            });
            dirty |= !keep;
            keep
        });

        let mut delta = Delta {
            pending,
            ..Delta::default()
        };
        if dirty {
            delta.changes = self.merge();
        }
        let mut current = self.file_reports.clone();
        let unreadable = listing
            .unreadable
            .into_iter()
            .map(|(dir, e)| (dir, DirError::ListDir(e)));
        let unknown = listing
            .unknown
            .into_iter()
            .map(|(path, e)| (path, DirError::Stat(e)));
        for (path, error) in unreadable.chain(unknown) {
            let origin = path.display().to_string();
            current
                .entry(origin.clone())
                .or_default()
                .push(dir_report(&origin, None, &error));
        }
        let origins: BTreeSet<String> = current.keys().chain(self.sent.keys()).cloned().collect();
        for origin in origins {
            let now = current.remove(&origin).unwrap_or_default();
            let before = self
                .sent
                .get(&origin)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if now.as_slice() != before {
                delta.reports.push((origin.clone(), now.clone()));
                if now.is_empty() {
                    self.sent.remove(&origin);
                } else {
                    self.sent.insert(origin, now);
                }
            }
        }
        delta
    }

    /// Tests: makes the vanished files look gone `by` longer than they are.
    #[cfg(test)]
    pub(super) fn backdate_vanished(&mut self, by: Duration) {
        for state in self.files.values_mut() {
            if let Some(since) = &mut state.vanished {
                *since = since.checked_sub(by).expect("an instant that far back");
            }
        }
    }

    /// Recomputes the winning definition of every key and each file's reports,
    /// and returns the changes against what was published.
    fn merge(&mut self) -> Vec<ObjectChange> {
        let mut winners: BTreeMap<&ObjectKey, (&Entry, &Path)> = BTreeMap::new();
        let mut file_reports = BTreeMap::new();
        let (present, vanished): (Vec<_>, Vec<_>) =
            self.files.iter().partition(|(_, s)| s.vanished.is_none());
        for (path, state) in present {
            let origin = path.display().to_string();
            let mut reports = state.problems.clone();
            for entry in &state.entries {
                if let Some((first, first_path)) = winners.get(&entry.key) {
                    reports.push(duplicate_report(&origin, entry, first, first_path));
                } else {
                    winners.insert(&entry.key, (entry, path));
                }
            }
            if !reports.is_empty() {
                reports.sort_by_key(|r| r.document);
                file_reports.insert(origin, reports);
            }
        }
        // A vanished file only holds on to what it published and no present file
        // defines, silently: it never brings back an older version.
        for (path, state) in vanished {
            for entry in &state.entries {
                if self.published.get(&entry.key) == Some(&entry.object) {
                    winners.entry(&entry.key).or_insert((entry, path));
                }
            }
        }
        let mut upserts = Vec::new();
        for (key, (entry, _)) in &winners {
            if self.published.get(*key) != Some(&entry.object) {
                upserts.push(entry.object.clone());
            }
        }
        let mut deletes: Vec<ObjectKey> = self
            .published
            .keys()
            .filter(|k| !winners.contains_key(k))
            .cloned()
            .collect();
        let published = winners
            .into_iter()
            .map(|(k, (e, _))| (k.clone(), e.object.clone()))
            .collect();
        self.published = published;
        self.file_reports = file_reports;

        // Namespaces first on the way in, last on the way out.
        upserts.sort_by_key(|o| (rank(o.kind()), o.key()));
        deletes.sort_by_key(|k| (std::cmp::Reverse(rank(k.kind)), k.clone()));
        upserts
            .into_iter()
            .map(ObjectChange::Upsert)
            .chain(deletes.into_iter().map(ObjectChange::Delete))
            .collect()
    }
}

impl FileState {
    /// Notes that the file is missing (since `now`, unless known before); true
    /// the first time.
    fn vanish(&mut self, now: Instant) -> bool {
        if self.vanished.is_some() {
            return false;
        }
        self.vanished = Some(now);
        // Should it come back, it is read afresh.
        self.stat = None;
        self.seen = None;
        true
    }

    /// Notes this poll's `stat`; true when the file may be read: the previous
    /// poll saw the same stat, and it is not a freshly emptied file that held
    /// objects.
    fn settled(&mut self, stat: Stat) -> bool {
        if self.seen.replace(stat) != Some(stat) {
            return false;
        }
        stat.len > 0 || self.entries.is_empty() || !recently_modified(stat)
    }
}

/// Modified within [`RACY_WINDOW`] (or at an unknown or future time).
fn recently_modified(stat: Stat) -> bool {
    stat.modified
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_none_or(|age| age <= RACY_WINDOW)
}

enum Refresh {
    Unchanged,
    Changed,
    /// The file changed while it was read: the read is discarded.
    Moved,
    Gone,
}

/// Reads a file whose stat was `Stat` (the contents, or why not).
pub(super) type FileReader<'a> = dyn FnMut(&Path, Stat) -> Result<Vec<u8>, DirError> + 'a;

/// Re-reads one file whose stat changed and settled.
fn refresh(path: &Path, stat: Stat, state: &mut FileState, read: &mut FileReader<'_>) -> Refresh {
    let origin = path.display().to_string();
    let read = read(path, stat).and_then(|bytes| {
        // What was read is the file at `stat` only if nothing moved meanwhile.
        let after = Stat::read(path).map_err(DirError::Read)?;
        Ok((bytes, after))
    });
    let bytes = match read {
        Ok((bytes, after)) if after == stat => bytes,
        Ok((_, after)) => {
            state.seen = Some(after);
            return Refresh::Moved;
        }
        Err(DirError::Read(e)) if e.kind() == std::io::ErrorKind::NotFound => return Refresh::Gone,
        Err(error) => {
            // Keep the objects, report, and read again on the next poll.
            let report = vec![dir_report(&origin, None, &error)];
            state.stat = None;
            state.hash = None;
            if state.problems == report {
                return Refresh::Unchanged;
            }
            state.problems = report;
            return Refresh::Changed;
        }
    };
    // A stat taken within the racy window of the last write may not change on
    // the next write (coarse timestamps, same length): read such a file again on
    // the next poll; the hash keeps that from producing events.
    state.stat = (!recently_modified(stat)).then_some(stat);
    let hash: [u8; 32] = Sha256::digest(&bytes).into();
    if state.hash == Some(hash) {
        return Refresh::Unchanged;
    }
    state.hash = Some(hash);
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(_) => {
            state.problems = vec![dir_report(&origin, None, &DirError::NotUtf8)];
            return Refresh::Changed;
        }
    };
    match parse_documents(&text) {
        Err(syntax) => {
            // Nothing of the file can be trusted: its objects stay as they were.
            state.problems = vec![dir_report(&origin, Some(syntax.document), &syntax.error)];
        }
        Ok(documents) => {
            let (entries, problems) = apply_documents(&origin, documents, &state.entries);
            state.entries = entries;
            state.problems = problems;
        }
    }
    Refresh::Changed
}

pub(super) fn read(path: &Path, stat: Stat) -> Result<Vec<u8>, DirError> {
    if stat.len > MAX_FILE_BYTES {
        return Err(DirError::TooLarge {
            limit: MAX_FILE_BYTES,
        });
    }
    let file = std::fs::File::open(path).map_err(DirError::Read)?;
    let mut bytes = Vec::new();
    // The file may have grown since its stat: the limit still holds.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(DirError::Read)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(DirError::TooLarge {
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(bytes)
}

/// The file's new entries and problems. A document that fails keeps the entry
/// its key had in this file before, when its key can be read; else (a typo in
/// `kind`, no name) what this file had at the same document index, unless the
/// file now defines that key elsewhere.
fn apply_documents(
    origin: &str,
    documents: Vec<Document>,
    previous: &[Entry],
) -> (Vec<Entry>, Vec<Report>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let mut keyless = Vec::new();
    for Document { index, outcome } in documents {
        match outcome {
            Ok(object) => entries.push(Entry {
                document: index,
                key: object.key(),
                object,
            }),
            Err(error) => {
                match key_of(&error) {
                    Some(key) => {
                        if let Some(old) = previous.iter().find(|e| e.key == key) {
                            entries.push(Entry {
                                document: index,
                                ..old.clone()
                            });
                        }
                    }
                    None => keyless.push(index),
                }
                problems.push(Report {
                    origin: origin.to_owned(),
                    document: Some(index),
                    error,
                });
            }
        }
    }
    let kept: Vec<Entry> = previous
        .iter()
        .filter(|old| keyless.contains(&old.document))
        .filter(|old| !entries.iter().any(|e| e.key == old.key))
        .cloned()
        .collect();
    if !kept.is_empty() {
        entries.extend(kept);
        entries.sort_by_key(|e| e.document);
    }
    (entries, problems)
}

/// The key a refused object would have had, when its kind and name were read.
fn key_of(error: &ObjectError) -> Option<ObjectKey> {
    let kind = Kind::ALL.into_iter().find(|k| k.api().1 == error.kind)?;
    if error.name.is_empty() {
        return None;
    }
    Some(ObjectKey::new(
        kind,
        error.namespace.clone(),
        error.name.clone(),
    ))
}

fn duplicate_report(origin: &str, entry: &Entry, first: &Entry, first_path: &Path) -> Report {
    let key = &entry.key;
    Report {
        origin: origin.to_owned(),
        document: Some(entry.document),
        error: ObjectError {
            kind: key.kind.to_string(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            field: "metadata.name".into(),
            problem: format!(
                "{key} is already defined in {} (document {}); this definition is ignored",
                first_path.display(),
                first.document
            ),
        },
    }
}

/// A problem with a file or directory as a whole.
fn dir_report(origin: &str, document: Option<usize>, error: &DirError) -> Report {
    Report {
        origin: origin.to_owned(),
        document,
        error: ObjectError {
            kind: "?".into(),
            namespace: String::new(),
            name: String::new(),
            field: ".".into(),
            problem: error.to_string(),
        },
    }
}

/// Position in [`Kind::ALL`]: the order a model wants objects in.
fn rank(kind: Kind) -> usize {
    Kind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(usize::MAX)
}
