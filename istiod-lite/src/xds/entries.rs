//! The resources of one type URL: by name, and in the order they last changed.
//!
//! The change log is what lets a wildcard client's state be O(1): every resource
//! sits in the log at the store generation that last changed it, so "what changed
//! since the client's position" is a range of the log, and a client needs to
//! remember only its position, not a version per resource. A removal leaves a
//! tombstone at its generation until every client has walked past it.

use std::collections::btree_set;
use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;

use super::store::Version;

/// A place in the change log: the generation that last changed a name, then the
/// name. Everything at or before a client's key has been handled for it.
pub(crate) type LogKey = (u64, Arc<str>);

/// One stored resource.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) version: Version,
    pub(crate) body: Bytes,
    /// The store generation that last changed it (its place in the log).
    pub(crate) generation: u64,
}

/// What the log holds at one key.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Logged<'a> {
    Live(&'a Entry),
    Removed,
}

/// Resources of one type, by name and in change order.
#[derive(Debug, Default)]
pub(crate) struct TypeEntries {
    live: HashMap<Arc<str>, Entry>,
    /// Every live name at its generation, and every tombstone.
    log: BTreeSet<LogKey>,
    /// Removed names -> the generation of the removal.
    tombstones: HashMap<Arc<str>, u64>,
}

impl TypeEntries {
    pub(crate) fn get(&self, name: &str) -> Option<&Entry> {
        self.live.get(name)
    }

    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    pub(crate) fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// Sets `name` to `body` at `generation`; returns the name when the version
    /// changed (and `None` for the same bytes again).
    pub(crate) fn put(
        &mut self,
        name: &str,
        body: Bytes,
        version: Version,
        generation: u64,
    ) -> Option<Arc<str>> {
        let name = match self.live.get_key_value(name) {
            Some((_, entry)) if entry.version == version => return None,
            Some((name, entry)) => {
                let name = name.clone();
                self.log.remove(&(entry.generation, name.clone()));
                name
            }
            None => match self.tombstones.remove_entry(name) {
                Some((name, removed_at)) => {
                    self.log.remove(&(removed_at, name.clone()));
                    name
                }
                None => Arc::from(name),
            },
        };
        self.log.insert((generation, name.clone()));
        let entry = Entry {
            version,
            body,
            generation,
        };
        self.live.insert(name.clone(), entry);
        Some(name)
    }

    /// Removes `name` at `generation`, leaving a tombstone; returns the name if it
    /// existed.
    pub(crate) fn remove(&mut self, name: &str, generation: u64) -> Option<Arc<str>> {
        let (name, entry) = self.live.remove_entry(name)?;
        self.log.remove(&(entry.generation, name.clone()));
        self.log.insert((generation, name.clone()));
        self.tombstones.insert(name.clone(), generation);
        Some(name)
    }

    /// The generation that removed `name`, while its tombstone is kept.
    pub(crate) fn removed_at(&self, name: &str) -> Option<u64> {
        self.tombstones.get(name).copied()
    }

    /// The log after `pos` (from the start for `None`), in order.
    pub(crate) fn after<'a>(
        &'a self,
        pos: Option<&LogKey>,
    ) -> impl Iterator<Item = (&'a LogKey, Logged<'a>)> + 'a {
        let range: btree_set::Range<'a, LogKey> = match pos {
            Some(pos) => self
                .log
                .range::<LogKey, _>((Bound::Excluded(pos), Bound::Unbounded)),
            None => self.log.range::<LogKey, _>(..),
        };
        range.map(|key| (key, self.logged(key)))
    }

    fn logged(&self, key: &LogKey) -> Logged<'_> {
        match self.live.get(&key.1) {
            Some(entry) if entry.generation == key.0 => Logged::Live(entry),
            _ => Logged::Removed,
        }
    }

    /// Live resources at or before `pos` in the log.
    pub(crate) fn live_through(&self, pos: Option<&LogKey>) -> usize {
        let Some(pos) = pos else {
            return 0;
        };
        if self.log.last().is_some_and(|last| last <= pos) {
            return self.live.len();
        }
        self.log
            .range::<LogKey, _>(..=pos)
            .filter(|key| matches!(self.logged(key), Logged::Live(_)))
            .count()
    }

    /// Log keys after `pos` up to generation `limit`.
    pub(crate) fn count_after(&self, pos: Option<&LogKey>, limit: u64) -> usize {
        self.after(pos)
            .take_while(|(key, _)| key.0 <= limit)
            .count()
    }

    /// Forgets the tombstones of removals before `generation`: no client can
    /// still need them.
    pub(crate) fn drop_tombstones_before(&mut self, generation: u64) {
        let log = &mut self.log;
        self.tombstones.retain(|name, removed_at| {
            let keep = *removed_at >= generation;
            if !keep {
                log.remove(&(*removed_at, name.clone()));
            }
            keep
        });
    }

    /// Every live resource, by name.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Entry)> {
        self.live.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(entries: &TypeEntries, pos: Option<&LogKey>) -> Vec<(u64, String, bool)> {
        entries
            .after(pos)
            .map(|(k, l)| (k.0, k.1.to_string(), matches!(l, Logged::Live(_))))
            .collect()
    }

    #[test]
    fn the_log_keeps_each_name_once_at_its_last_change() {
        let mut e = TypeEntries::default();
        let body = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert!(e.put("b", body("1"), 1, 1).is_some());
        assert!(e.put("a", body("1"), 1, 1).is_some());
        assert!(e.put("a", body("1"), 1, 2).is_none(), "same version");
        assert!(e.put("a", body("2"), 2, 3).is_some());
        assert!(e.remove("b", 4).is_some());
        assert!(e.remove("b", 5).is_none());
        assert_eq!(
            keys(&e, None),
            [(3, "a".into(), true), (4, "b".into(), false)]
        );
        assert_eq!(
            keys(&e, Some(&(3, Arc::from("a")))),
            [(4, "b".into(), false)]
        );
        assert_eq!(e.live_through(Some(&(3, Arc::from("a")))), 1);
        assert_eq!(e.live_through(Some(&(9, Arc::from("")))), 1);
        assert_eq!(e.count_after(None, 3), 1);

        // Re-adding a removed name replaces its tombstone.
        assert!(e.put("b", body("3"), 3, 6).is_some());
        assert_eq!(e.tombstones(), 0);
        assert_eq!(
            keys(&e, None),
            [(3, "a".into(), true), (6, "b".into(), true)]
        );

        e.remove("a", 7);
        e.drop_tombstones_before(7);
        assert_eq!(e.tombstones(), 1, "a removal at 7 is kept");
        e.drop_tombstones_before(8);
        assert_eq!(keys(&e, None), [(6, "b".into(), true)]);
    }
}
