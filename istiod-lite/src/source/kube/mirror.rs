//! What the Kubernetes source knows of one kind: the resource version of every
//! object it has seen, which of them were bad, and the relist in progress. It
//! turns watcher events into model changes and the kind's current problem list.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::model::{self, Kind, ObjectChange, ObjectKey, Report};

/// One object as read from the API server.
#[derive(Debug)]
pub(super) struct Listed {
    pub namespace: String,
    pub name: String,
    /// `metadata.resourceVersion`: unchanged means the object is unchanged.
    pub resource_version: String,
    /// The whole object, with `apiVersion` and `kind` set.
    pub json: serde_json::Value,
}

/// What one event produced for the model.
#[derive(Debug, Default)]
pub(super) struct Output {
    pub changes: Vec<ObjectChange>,
    /// The kind's whole current problem list, when it changed.
    pub reports: Option<Vec<Report>>,
}

/// Resource versions of what the model holds (good) or refused (bad) for one kind.
#[derive(Debug)]
pub(super) struct KindMirror {
    kind: Kind,
    origin: String,
    /// Every object of the kind the API server last showed us, good or bad.
    versions: HashMap<ObjectKey, String>,
    /// The objects the model holds (a subset of `versions`); an object whose
    /// current version is bad may still be here with its last good version.
    good: HashSet<ObjectKey>,
    bad: BTreeMap<ObjectKey, Report>,
    relist: Option<Relist>,
}

/// A list in progress: changes wait for its end so the model sees one batch.
#[derive(Debug, Default)]
struct Relist {
    seen: HashSet<ObjectKey>,
    changes: Vec<ObjectChange>,
    reports_changed: bool,
}

impl KindMirror {
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            origin: format!("kube:{kind}"),
            versions: HashMap::new(),
            good: HashSet::new(),
            bad: BTreeMap::new(),
            relist: None,
        }
    }

    /// A (re)list starts. Changes already buffered by an interrupted list stay:
    /// they describe newer states than the model has.
    pub fn init(&mut self) {
        let relist = self.relist.get_or_insert_with(Relist::default);
        relist.seen.clear();
    }

    /// An object was listed, added or modified.
    pub fn apply(&mut self, listed: Listed) -> Output {
        let key = ObjectKey::new(self.kind, listed.namespace, listed.name);
        if let Some(relist) = &mut self.relist {
            relist.seen.insert(key.clone());
        }
        if self.versions.get(&key) == Some(&listed.resource_version) {
            return Output::default();
        }
        self.versions.insert(key.clone(), listed.resource_version);
        let (change, reports_changed) = match model::from_json(listed.json) {
            Ok(object) => {
                self.good.insert(key.clone());
                (
                    Some(ObjectChange::Upsert(object)),
                    self.bad.remove(&key).is_some(),
                )
            }
            Err(mut error) => {
                if error.name.is_empty() {
                    error.name.clone_from(&key.name);
                    error.namespace.clone_from(&key.namespace);
                }
                if error.kind == "?" {
                    error.kind = self.kind.to_string();
                }
                tracing::warn!(origin = %self.origin, %error, "object refused");
                let report = Report {
                    origin: self.origin.clone(),
                    document: None,
                    error,
                };
                let changed = self.bad.get(&key) != Some(&report);
                self.bad.insert(key, report);
                // Bad input loses nothing: the model keeps the last good version
                // (as the directory source does) until the object is fixed or
                // deleted.
                (None, changed)
            }
        };
        self.emit(change.into_iter().collect(), reports_changed)
    }

    /// An object was deleted.
    pub fn delete(&mut self, namespace: String, name: String) -> Output {
        let key = ObjectKey::new(self.kind, namespace, name);
        self.versions.remove(&key);
        let reports_changed = self.bad.remove(&key).is_some();
        let changes = if self.good.remove(&key) {
            vec![ObjectChange::Delete(key)]
        } else {
            Vec::new()
        };
        self.emit(changes, reports_changed)
    }

    /// The list is complete: what was known but not listed is gone.
    pub fn init_done(&mut self) -> Output {
        let Some(relist) = self.relist.take() else {
            return Output::default();
        };
        let Relist {
            seen,
            mut changes,
            mut reports_changed,
        } = relist;
        let gone: Vec<ObjectKey> = self
            .versions
            .keys()
            .filter(|key| !seen.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            self.versions.remove(&key);
            reports_changed |= self.bad.remove(&key).is_some();
            if self.good.remove(&key) {
                changes.push(ObjectChange::Delete(key));
            }
        }
        Output {
            changes,
            reports: reports_changed.then(|| self.reports()),
        }
    }

    fn emit(&mut self, changes: Vec<ObjectChange>, reports_changed: bool) -> Output {
        if let Some(relist) = &mut self.relist {
            relist.changes.extend(changes);
            relist.reports_changed |= reports_changed;
            return Output::default();
        }
        Output {
            changes,
            reports: reports_changed.then(|| self.reports()),
        }
    }

    fn reports(&self) -> Vec<Report> {
        self.bad.values().cloned().collect()
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(name: &str, rv: &str, json: serde_json::Value) -> Listed {
        Listed {
            namespace: "shop".into(),
            name: name.into(),
            resource_version: rv.into(),
            json,
        }
    }

    // Not an object of any kind, and nameless: the mirror names it.
    fn garbage() -> serde_json::Value {
        serde_json::json!({"apiVersion": 7})
    }

    #[test]
    fn bad_objects_are_reported_with_their_name_and_cleared_on_delete() {
        let mut mirror = KindMirror::new(Kind::AuthorizationPolicy);
        let out = mirror.apply(listed("p1", "1", garbage()));
        assert!(out.changes.is_empty());
        let reports = out.reports.unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].origin, "kube:AuthorizationPolicy");
        assert_eq!(reports[0].error.name, "p1");
        assert_eq!(reports[0].error.namespace, "shop");

        // The same version again changes nothing.
        let out = mirror.apply(listed("p1", "1", garbage()));
        assert!(out.changes.is_empty() && out.reports.is_none());

        let out = mirror.delete("shop".into(), "p1".into());
        assert!(out.changes.is_empty());
        assert_eq!(out.reports.unwrap(), Vec::new());
    }

    #[test]
    fn a_relist_holds_reports_until_done_and_drops_what_was_not_listed() {
        let mut mirror = KindMirror::new(Kind::Pod);
        mirror.init();
        assert!(mirror.apply(listed("a", "1", garbage())).reports.is_none());
        assert!(mirror.apply(listed("b", "2", garbage())).reports.is_none());
        let out = mirror.init_done();
        assert_eq!(out.reports.unwrap().len(), 2);

        // Relist without `b`: its report goes.
        mirror.init();
        mirror.apply(listed("a", "1", garbage()));
        let out = mirror.init_done();
        let reports = out.reports.unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].error.name, "a");

        // Relist with nothing new: nothing to say.
        mirror.init();
        mirror.apply(listed("a", "1", garbage()));
        let out = mirror.init_done();
        assert!(out.changes.is_empty() && out.reports.is_none());
    }
}
