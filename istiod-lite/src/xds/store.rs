//! The current resources per type URL, each versioned by a hash of its bytes, and
//! the set of changes waiting for the debouncer.
//!
//! Identical bytes give the same version, so re-applying an unchanged resource is
//! not a change and nobody is pushed.

use std::collections::{HashMap, HashSet, VecDeque};
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

pub(crate) use super::entries::TypeEntries;

/// How many releases the store remembers for push latency (older ones count as
/// the oldest remembered).
const RELEASES_KEPT: usize = 256;

/// Every resource by type URL, the generation counters, and when the released
/// generations' changes were first applied. Behind the store's lock.
#[derive(Debug, Default)]
pub(crate) struct Resources {
    types: HashMap<String, TypeEntries>,
    /// Bumped by every apply that changed something.
    generation: u64,
    /// The newest generation the debouncer let out: clients push changes up to it.
    released: u64,
    /// (generation, first change of its batch) of recent releases, oldest first.
    releases: VecDeque<(u64, Instant)>,
}

impl Resources {
    pub(crate) fn get(&self, type_url: &str) -> Option<&TypeEntries> {
        self.types.get(type_url)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn released(&self) -> u64 {
        self.released
    }

    /// When the oldest change released after generation `after` was applied.
    pub(crate) fn first_change_after(&self, after: u64) -> Option<Instant> {
        self.releases
            .iter()
            .find(|(g, _)| *g > after)
            .or(self.releases.front())
            .map(|(_, first)| *first)
    }

    fn release(&mut self, generation: u64, first_change: Instant) {
        if generation <= self.released {
            return;
        }
        self.released = generation;
        if self.releases.len() == RELEASES_KEPT {
            self.releases.pop_front();
        }
        self.releases.push_back((generation, first_change));
    }
}

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
    /// The generation of the newest pending change.
    generation: u64,
}

/// The current resources and the changes not yet pushed.
#[derive(Debug, Default)]
pub struct ResourceStore {
    resources: RwLock<Resources>,
    pending: Mutex<PendingChanges>,
    changed: Notify,
    /// Mirrors of `Resources::generation` and `released`, readable without the
    /// lock (`released` also awaitable).
    generation: AtomicU64,
    released: tokio::sync::watch::Sender<u64>,
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
        let mut resources = self
            .resources
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let generation = resources.generation + 1;
        let mut changed: Vec<(&'static str, Arc<str>)> = Vec::new();
        for update in updates {
            let entries = resources
                .types
                .entry(update.type_url.to_string())
                .or_default();
            let name = match update.body {
                Some(body) => {
                    let version = version_of(&body);
                    entries.put(&update.name, body, version, generation)
                }
                None => entries.remove(&update.name, generation),
            };
            if let Some(name) = name {
                changed.push((update.type_url, name));
            }
        }
        let count = changed.len();
        if count == 0 {
            return 0;
        }
        resources.generation = generation;
        self.generation.store(generation, Ordering::Release);
        // Recorded before the write lock goes, so a batch taken later covers every
        // change up to its generation.
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
        pending.generation = generation;
        drop(pending);
        drop(resources);
        self.changed.notify_one();
        count
    }

    /// Applies `updates` like [`Self::apply`], but every removal one generation
    /// after every put; returns how many changed. A client walks the log in
    /// (generation, name) order, cut into responses, so a removal in the same
    /// generation as the puts replacing it (a mesh-wide STRICT policy giving way
    /// to one per namespace) could reach it responses before some of them and
    /// loosen what it enforces in between. The last update of a name wins, as in
    /// one apply.
    pub fn apply_removals_last(&self, updates: Vec<ResourceUpdate>) -> usize {
        let mut seen = HashSet::new();
        let (mut puts, mut removals) = (Vec::new(), Vec::new());
        for update in updates.into_iter().rev() {
            if !seen.insert((update.type_url, update.name.clone())) {
                continue;
            }
            match update.body {
                Some(_) => puts.push(update),
                None => removals.push(update),
            }
        }
        puts.reverse();
        removals.reverse();
        self.apply(puts) + self.apply(removals)
    }

    /// The version and bytes of one resource.
    pub fn get(&self, type_url: &str, name: &str) -> Option<(Version, Bytes)> {
        let resources = self.read();
        let entry = resources.get(type_url)?.get(name)?;
        Some((entry.version, entry.body.clone()))
    }

    /// How many resources of `type_url` exist.
    pub fn len(&self, type_url: &str) -> usize {
        self.read().get(type_url).map_or(0, TypeEntries::len)
    }

    /// Resource counts per type URL.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.read()
            .types
            .iter()
            .map(|(t, e)| (t.clone(), e.len()))
            .collect()
    }

    /// Bumped by every apply that changed something; sent as `system_version_info`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The newest generation the debouncer released to the clients.
    pub fn released(&self) -> u64 {
        *self.released.borrow()
    }

    /// Resolves once the debouncer has released `generation` to the clients.
    pub async fn wait_released(&self, generation: u64) {
        let mut released = self.released.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = released.wait_for(|r| *r >= generation).await;
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

    /// Takes every pending change as one batch and releases its generation:
    /// clients push changes up to it.
    pub(crate) fn take_pending(&self) -> Option<ChangeBatch> {
        let batch = {
            let mut pending = lock(&self.pending);
            let first_change = pending.first.take()?;
            pending.last = None;
            let changes = std::mem::take(&mut pending.changes)
                .into_iter()
                .map(|(t, names)| (t, names.into_iter().collect()))
                .collect();
            ChangeBatch {
                changes,
                first_change,
                generation: pending.generation,
            }
        };
        // The pending lock is gone: `apply` takes the two locks in the other order.
        let mut resources = self
            .resources
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        resources.release(batch.generation, batch.first_change);
        self.released.send_replace(resources.released);
        Some(batch)
    }

    /// Forgets removals older than `generation` (every client is past them) and
    /// returns how many tombstones are left.
    pub(crate) fn drop_tombstones_before(&self, generation: u64) -> usize {
        let mut resources = self
            .resources
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let limit = generation.min(resources.released + 1);
        resources
            .types
            .values_mut()
            .map(|entries| {
                entries.drop_tombstones_before(limit);
                entries.tombstones()
            })
            .sum()
    }

    /// Resolves after the next apply that changed something (or at once if one
    /// happened since the last call).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await
    }
}
