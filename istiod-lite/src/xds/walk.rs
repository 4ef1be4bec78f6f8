//! A wildcard subscriber's place in one type's change log.
//!
//! Instead of a version per resource, a wildcard client keeps a position in the
//! log ([`super::entries`]): everything at or before it has been sent (or was
//! already held), everything after it is owed once the debouncer releases its
//! generation. Its state is a few keys and counters whatever the store's size;
//! the only per-name state is transient (versions claimed on reconnect, until
//! the walk passes them) or exceptional (resources the client refused).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;

use super::entries::{Entry, LogKey, Logged, TypeEntries};
use super::store::Version;

/// A resource to send: name, version, encoded body.
pub(crate) type Outbound = (Arc<str>, Version, Bytes);

/// What one step of a walk (or of a named subscription) puts in a response.
#[derive(Debug, Default)]
pub(crate) struct Step {
    pub(crate) sent: Vec<Outbound>,
    pub(crate) removed: Vec<Arc<str>>,
    /// Resource bodies and names, as the byte budget counts them.
    pub(crate) bytes: usize,
    /// Where the walk stood after this step (wildcard only).
    pub(crate) end: Option<LogKey>,
    /// Set when the step reached the end of what was released, except at the end
    /// of the initial sync: the release the walk had reached before (for push
    /// latency, measured from the first change released after it).
    pub(crate) completed_after: Option<u64>,
}

impl Step {
    pub(crate) fn is_empty(&self) -> bool {
        self.sent.is_empty() && self.removed.is_empty()
    }
}

/// One wildcard subscription's progress through the log.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    /// The last log key handled.
    pos: Option<LogKey>,
    /// The end of the newest acknowledged (or refused) response.
    acked: Option<LogKey>,
    /// The store generation when the subscription began: it gets everything up
    /// to here at once, and no removal from before it.
    start: u64,
    /// The generation the walk last reached the end of; `None` until the first
    /// walk through the whole log is done.
    caught_up: Option<u64>,
    /// Versions the client said it holds (reconnect), until the walk passes them.
    claimed: HashMap<Arc<str>, Option<Version>>,
    /// Claimed names the store does not have: removals owed at once.
    owed_removals: BTreeSet<Arc<str>>,
    /// Resources whose latest version sent was refused (NACK), with that version.
    nacked: HashMap<Arc<str>, Version>,
}

impl Walk {
    /// Starts at the beginning of the log at store generation `generation`; the
    /// client already holds `claimed`.
    pub(crate) fn begin(
        generation: u64,
        claimed: HashMap<Arc<str>, Option<Version>>,
        entries: Option<&TypeEntries>,
    ) -> Self {
        let (claimed, owed_removals) =
            claimed
                .into_iter()
                .partition::<HashMap<_, _>, _>(|(name, _)| {
                    entries.is_some_and(|e| e.get(name).is_some())
                });
        Self {
            start: generation,
            claimed,
            owed_removals: owed_removals.into_keys().collect(),
            ..Self::default()
        }
    }

    fn limit(&self, released: u64) -> u64 {
        released.max(self.start)
    }

    /// Whether the first walk through the whole log (the initial sync) is done.
    pub(crate) fn initial_sync_done(&self) -> bool {
        self.caught_up.is_some()
    }

    /// Whether a step may have something to send.
    pub(crate) fn has_work(&self, released: u64) -> bool {
        !self.owed_removals.is_empty()
            || self
                .caught_up
                .is_none_or(|caught_up| self.limit(released) > caught_up)
    }

    /// Tombstones of removals before this generation are no use to this walk.
    pub(crate) fn needs_removals_from(&self) -> u64 {
        let at = self.pos.as_ref().map_or(0, |p| p.0);
        at.max(self.start + 1)
    }

    /// Takes what is owed, up to `budget` bytes (at least one item).
    pub(crate) fn step(
        &mut self,
        entries: Option<&TypeEntries>,
        released: u64,
        budget: usize,
    ) -> Step {
        let limit = self.limit(released);
        let mut step = Step::default();
        while step.bytes < budget {
            let Some(name) = self.owed_removals.pop_first() else {
                break;
            };
            // Created again since the claim: the log sends it (owed removals go
            // before the log moves, so it is still ahead); removing it in the same
            // response would make the client drop what it was just sent.
            if entries.is_some_and(|e| e.get(&name).is_some()) {
                continue;
            }
            step.bytes += name.len();
            step.removed.push(name);
        }
        let mut completed = true;
        if let Some(entries) = entries {
            let mut last = None;
            for (key, logged) in entries.after(self.pos.as_ref()) {
                if key.0 > limit {
                    break;
                }
                if step.bytes >= budget {
                    completed = false;
                    break;
                }
                let claimed = self.claimed.remove(&key.1);
                match logged {
                    Logged::Live(entry) => {
                        if claimed != Some(Some(entry.version)) {
                            step.bytes += entry.body.len() + key.1.len();
                            step.sent
                                .push((key.1.clone(), entry.version, entry.body.clone()));
                        }
                    }
                    Logged::Removed => {
                        if key.0 > self.start || claimed.is_some() {
                            step.bytes += key.1.len();
                            step.removed.push(key.1.clone());
                        }
                    }
                }
                last = Some(key);
            }
            if let Some(last) = last {
                self.pos = Some(last.clone());
            }
        }
        if self.claimed.is_empty() && self.claimed.capacity() > 0 {
            self.claimed = HashMap::new();
        }
        completed &= self.owed_removals.is_empty();
        if completed && self.caught_up.is_none_or(|c| limit > c) {
            // The first walk is the initial sync, not a push of changes.
            step.completed_after = self.caught_up;
            self.caught_up = Some(limit);
        }
        step.end = self.pos.clone();
        step
    }

    /// The client acknowledged (`refused` false) or refused the response that
    /// ended at `end` and carried `carried`.
    pub(crate) fn answered(
        &mut self,
        end: Option<&LogKey>,
        carried: &[(Arc<str>, Version)],
        refused: bool,
    ) {
        if let Some(end) = end
            && self.acked.as_ref().is_none_or(|a| a < end)
        {
            self.acked = Some(end.clone());
        }
        for (name, version) in carried {
            if refused {
                self.nacked.insert(name.clone(), *version);
            } else {
                self.nacked.remove(name);
            }
        }
    }

    /// Resources the client holds (sent, or claimed and still current).
    pub(crate) fn held(&self, entries: Option<&TypeEntries>) -> usize {
        entries.map_or(0, |e| e.live_through(self.pos.as_ref())) + self.claimed.len()
    }

    /// Of those, how many it acknowledged at their current version.
    pub(crate) fn acked(&self, entries: Option<&TypeEntries>) -> usize {
        let Some(entries) = entries else {
            return 0;
        };
        // Live entries up to the acknowledged position, less those refused there.
        let refused = self
            .nacked
            .keys()
            .filter_map(|name| Some((name, entries.get(name)?)))
            .filter(|(name, entry)| {
                self.acked_through(name, entry) && !self.acknowledged(name, entry)
            })
            .count();
        entries.live_through(self.acked.as_ref()) - refused + self.claimed.len()
    }

    /// Changes released but not yet sent.
    pub(crate) fn pending(&self, entries: Option<&TypeEntries>, released: u64) -> usize {
        self.owed_removals.len()
            + entries.map_or(0, |e| {
                e.count_after(self.pos.as_ref(), self.limit(released))
            })
    }

    /// The version the client holds of each resource, and whether it acknowledged it.
    pub(crate) fn holdings(
        &self,
        entries: Option<&TypeEntries>,
    ) -> Vec<(Arc<str>, Option<Version>, bool)> {
        let mut out: Vec<_> = self
            .claimed
            .iter()
            .map(|(name, version)| (name.clone(), *version, true))
            .collect();
        for (name, entry) in entries.into_iter().flat_map(TypeEntries::iter) {
            if self.sent(name, entry) {
                out.push((
                    name.clone(),
                    Some(entry.version),
                    self.acknowledged(name, entry),
                ));
            }
        }
        out
    }

    /// Whether the client holds `name` at its current version, and acknowledged it.
    pub(crate) fn holds(
        &self,
        name: &str,
        entries: Option<&TypeEntries>,
    ) -> Option<(Version, bool)> {
        if let Some(version) = self.claimed.get(name) {
            return version.map(|v| (v, true));
        }
        let entry = entries?.get(name)?;
        self.sent(name, entry)
            .then(|| (entry.version, self.acknowledged(name, entry)))
    }

    /// Whether the client may hold `name`, which the store no longer has: the
    /// walk owes it a removal (claimed on reconnect, or removed after the walk
    /// began and not yet passed).
    pub(crate) fn owes_removal(&self, name: &str, entries: Option<&TypeEntries>) -> bool {
        if self.owed_removals.contains(name) || self.claimed.contains_key(name) {
            return true;
        }
        entries.and_then(|e| e.removed_at(name)).is_some_and(|at| {
            at > self.start && self.pos.as_ref().is_none_or(|p| (at, Arc::from(name)) > *p)
        })
    }

    /// Whether the walk has sent `entry` (it is at or before the position).
    fn sent(&self, name: &str, entry: &Entry) -> bool {
        self.pos
            .as_ref()
            .is_some_and(|p| (entry.generation, Arc::from(name)) <= *p)
    }

    /// Whether `entry` is at or before the newest answered response's end.
    fn acked_through(&self, name: &str, entry: &Entry) -> bool {
        self.acked
            .as_ref()
            .is_some_and(|a| (entry.generation, Arc::from(name)) <= *a)
    }

    /// Whether the client acknowledged `entry` at its current version.
    fn acknowledged(&self, name: &str, entry: &Entry) -> bool {
        self.acked_through(name, entry) && self.nacked.get(name) != Some(&entry.version)
    }
}
