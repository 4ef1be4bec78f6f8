//! The current resources per type URL, each versioned by a hash of its bytes, and
//! the set of changes waiting for the debouncer.
//!
//! Identical bytes give the same version, so re-applying an unchanged resource is
//! not a change and nobody is pushed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::ResourceUpdate;

/// A resource version: the first 8 bytes of the SHA-256 of its encoding. On the
/// wire it is 16 lowercase hex digits ([`format_version`]).
pub type Version = u64;

/// The version of a resource encoded as `bytes`.
pub fn version_of(bytes: &[u8]) -> Version {
    let digest = Sha256::digest(bytes);
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(head)
}

/// The wire form of a version.
pub fn format_version(version: Version) -> String {
    format!("{version:016x}")
}

/// A version the client sent back; `None` when it is not one of ours.
pub fn parse_version(text: &str) -> Option<Version> {
    if text.len() != 16 {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

/// One stored resource.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) version: Version,
    pub(crate) body: Bytes,
}

/// Resources of one type, by name.
pub(crate) type TypeEntries = HashMap<Arc<str>, Entry>;

/// Every resource, by type URL.
pub(crate) type Resources = HashMap<String, TypeEntries>;

/// What changed (or was removed) since the last push, per type URL.
#[derive(Debug)]
pub struct ChangeBatch {
    /// Names changed or removed, per type URL; the store says which.
    pub changes: HashMap<String, Vec<Arc<str>>>,
    /// When the oldest change of the batch was applied (push latency origin).
    pub first_change: Instant,
    /// The store generation the batch ends at.
    pub generation: u64,
}

impl ChangeBatch {
    /// How many (type, name) pairs the batch holds.
    pub fn len(&self) -> usize {
        self.changes.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Default)]
struct PendingChanges {
    changes: HashMap<String, HashSet<Arc<str>>>,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// The current resources and the changes not yet pushed.
#[derive(Debug, Default)]
pub struct ResourceStore {
    resources: RwLock<Resources>,
    pending: Mutex<PendingChanges>,
    changed: Notify,
    generation: AtomicU64,
}

/// Locks a mutex, ignoring poisoning: the data stays consistent between calls
/// because no code path panics while holding these locks.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ResourceStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies the translator's updates; returns how many actually changed. An
    /// update whose bytes equal the stored ones, or a removal of a missing
    /// resource, is no change.
    pub fn apply(&self, updates: Vec<ResourceUpdate>) -> usize {
        let mut changed: Vec<(&'static str, Arc<str>)> = Vec::new();
        {
            let mut resources = self
                .resources
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for update in updates {
                let entries = resources.entry(update.type_url.to_string()).or_default();
                match update.body {
                    Some(body) => {
                        let version = version_of(&body);
                        if let Some((name, entry)) = entries.get_key_value(update.name.as_str()) {
                            if entry.version == version {
                                continue;
                            }
                            let name = name.clone();
                            entries.insert(name.clone(), Entry { version, body });
                            changed.push((update.type_url, name));
                        } else {
                            let name: Arc<str> = Arc::from(update.name);
                            entries.insert(name.clone(), Entry { version, body });
                            changed.push((update.type_url, name));
                        }
                    }
                    None => {
                        if let Some((name, _)) = entries.remove_entry(update.name.as_str()) {
                            changed.push((update.type_url, name));
                        }
                    }
                }
            }
            if !changed.is_empty() {
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
        }
        let count = changed.len();
        if count > 0 {
            let now = Instant::now();
            let mut pending = lock(&self.pending);
            for (type_url, name) in changed {
                pending
                    .changes
                    .entry(type_url.to_string())
                    .or_default()
                    .insert(name);
            }
            pending.first.get_or_insert(now);
            pending.last = Some(now);
            drop(pending);
            self.changed.notify_one();
        }
        count
    }

    /// The version and bytes of one resource.
    pub fn get(&self, type_url: &str, name: &str) -> Option<(Version, Bytes)> {
        let resources = self.read();
        let entry = resources.get(type_url)?.get(name)?;
        Some((entry.version, entry.body.clone()))
    }

    /// How many resources of `type_url` exist.
    pub fn len(&self, type_url: &str) -> usize {
        self.read().get(type_url).map_or(0, HashMap::len)
    }

    /// Resource counts per type URL.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.read()
            .iter()
            .map(|(t, e)| (t.clone(), e.len()))
            .collect()
    }

    /// Bumped by every apply that changed something; sent as `system_version_info`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Resources> {
        self.resources
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// When the oldest and the newest pending change were applied.
    pub(crate) fn pending_times(&self) -> Option<(Instant, Instant)> {
        let pending = lock(&self.pending);
        Some((pending.first?, pending.last?))
    }

    /// Takes every pending change as one batch.
    pub(crate) fn take_pending(&self) -> Option<ChangeBatch> {
        let mut pending = lock(&self.pending);
        let first_change = pending.first.take()?;
        pending.last = None;
        let changes = std::mem::take(&mut pending.changes)
            .into_iter()
            .map(|(t, names)| (t, names.into_iter().collect()))
            .collect();
        Some(ChangeBatch {
            changes,
            first_change,
            generation: self.generation(),
        })
    }

    /// Resolves after the next apply that changed something (or at once if one
    /// happened since the last call).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await
    }
}
