//! Local state mode: workloads, services and policies from a YAML file, watched.
//!
//! A change applies to new connections within one polling interval; a file that
//! does not parse or validate is reported (path, item, field) and the last good
//! state stays.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::drain::DrainWatcher;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{ModelError, ProxyState, Service, StateStore, Workload};
use crate::policy::Authorization;

/// The file's shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalState {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub policies: Vec<Authorization>,
}

/// Why the file was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LocalStateError {
    #[error("{path}: cannot read: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: does not parse: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {error}")]
    Invalid { path: PathBuf, error: ModelError },
    #[error("{path}: {error}")]
    InvalidPolicy {
        path: PathBuf,
        error: crate::policy::PolicyError,
    },
}

impl LocalState {
    /// Parses and validates the YAML text of the file at `path`; a workload
    /// without a trust domain is in the default one (`cluster.local`).
    pub fn parse(path: &Path, text: &str) -> Result<Self, LocalStateError> {
        Self::parse_in(path, text, mesh_core::DEFAULT_TRUST_DOMAIN)
    }

    /// Parses and validates the YAML text of the file at `path`; a workload
    /// without a trust domain is in `trust_domain` (`--trust-domain`).
    pub fn parse_in(path: &Path, text: &str, trust_domain: &str) -> Result<Self, LocalStateError> {
        let mut state: LocalState = if text.trim().is_empty() {
            LocalState::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| LocalStateError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
        };
        state.workloads = std::mem::take(&mut state.workloads)
            .into_iter()
            .map(|w| w.with_trust_domain(trust_domain))
            .collect();
        state.validate().map_err(|error| LocalStateError::Invalid {
            path: path.to_path_buf(),
            error,
        })?;
        let mut keys = HashSet::new();
        for p in &state.policies {
            p.validate()
                .map_err(|error| LocalStateError::InvalidPolicy {
                    path: path.to_path_buf(),
                    error,
                })?;
            if !keys.insert(p.key()) {
                return Err(LocalStateError::Invalid {
                    path: path.to_path_buf(),
                    error: dup(
                        "authorization policy",
                        &p.key(),
                        "name",
                        "another policy has this name",
                    ),
                });
            }
        }
        Ok(state)
    }

    /// [`LocalState::parse_in`] of the file's bytes, which must be UTF-8 (as
    /// at start, so in the watcher: the same file is never refused at one and
    /// accepted, altered, by the other).
    pub fn parse_bytes(
        path: &Path,
        bytes: Vec<u8>,
        trust_domain: &str,
    ) -> Result<Self, LocalStateError> {
        let text = String::from_utf8(bytes).map_err(|e| LocalStateError::Parse {
            path: path.to_path_buf(),
            message: format!("not UTF-8: {}", e.utf8_error()),
        })?;
        Self::parse_in(path, &text, trust_domain)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let mut uids = HashSet::new();
        let mut ips = HashSet::new();
        for w in &self.workloads {
            w.validate()?;
            if !uids.insert(&w.uid) {
                return Err(dup(
                    "workload",
                    &w.uid,
                    "uid",
                    "another workload has this uid",
                ));
            }
            // A hostNetwork pod's addresses are its node's, shared with the
            // node's other such pods: it claims none (as over xDS).
            let claimed: &[std::net::IpAddr] = if w.host_network { &[] } else { &w.addresses };
            if let Some(ip) = claimed.iter().find(|ip| !ips.insert(**ip)) {
                return Err(dup(
                    "workload",
                    &w.uid,
                    "addresses",
                    &format!("{ip} belongs to another workload"),
                ));
            }
        }
        let mut keys = HashSet::new();
        let mut vips = HashSet::new();
        for s in &self.services {
            s.validate()?;
            let name = format!("{}/{}", s.namespace, s.name);
            if !keys.insert(s.key()) {
                return Err(dup(
                    "service",
                    &name,
                    "hostname",
                    "another service has this hostname",
                ));
            }
            if let Some(vip) = s
                .vips
                .iter()
                .find(|v| !vips.insert(**v) || ips.contains(*v))
            {
                return Err(dup(
                    "service",
                    &name,
                    "vips",
                    &format!("{vip} is already in use"),
                ));
            }
        }
        Ok(())
    }

    pub fn into_state(self) -> ProxyState {
        ProxyState::new(self.workloads, self.services, self.policies)
    }
}

fn dup(kind: &'static str, name: &str, field: &'static str, problem: &str) -> ModelError {
    ModelError {
        kind,
        name: name.to_string(),
        field,
        problem: problem.to_string(),
    }
}

/// Reads and validates the file once; a workload without a trust domain is in
/// `trust_domain`.
pub fn load_local_state(path: &Path, trust_domain: &str) -> Result<ProxyState, LocalStateError> {
    let bytes = std::fs::read(path).map_err(|error| LocalStateError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(LocalState::parse_bytes(path, bytes, trust_domain)?.into_state())
}

/// Polls the file every `interval` and applies each valid change to `store`
/// (a workload without a trust domain is in the store's). The
/// last error (if the current file is bad) is kept in `status` for the admin view;
/// `synced` turns true at the first state applied (and stays true). A change is
/// applied once two reads in a row see the same bytes: a file written in place
/// (`cat >`, an editor that truncates first) may be read half-written, empty or
/// cut at a line, which can parse as a state with fewer workloads and policies.
pub async fn watch_local_state(
    path: PathBuf,
    store: Arc<StateStore>,
    status: Arc<Mutex<Option<String>>>,
    synced: watch::Sender<bool>,
    interval: Duration,
    drain: DrainWatcher,
) {
    let mut reads = Settle::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = drain.signaled() => return,
            _ = ticker.tick() => {}
        }
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(error) => {
                report(
                    &status,
                    Some(
                        LocalStateError::Read {
                            path: path.clone(),
                            error,
                        }
                        .to_string(),
                    ),
                );
                // The file may come back as it was: judged again then, so the
                // error clears (or a refusal is reported again).
                reads.unreadable();
                continue;
            }
        };
        let Some(bytes) = reads.read(bytes) else {
            continue;
        };
        let digest = format!("{:016x}", digest(&bytes));
        match LocalState::parse_bytes(&path, bytes, store.trust_domain()) {
            Ok(state) => {
                let (w, s, p) = (
                    state.workloads.len(),
                    state.services.len(),
                    state.policies.len(),
                );
                store.replace(state.into_state());
                // The status first: whoever reads the log line then sees it.
                report(&status, None);
                tracing::info!(path = %path.display(), workloads = w, services = s, policies = p, %digest, "local state applied");
                synced.send_if_modified(|s| !std::mem::replace(s, true));
            }
            Err(e) => {
                report(&status, Some(e.to_string()));
                tracing::error!(error = %e, "local state refused; keeping the last good state");
            }
        }
    }
}

/// Which reads of the state file are judged: a change, once the next read sees
/// the same bytes (a file written in place may be read half-written).
#[derive(Debug, Default)]
struct Settle {
    /// The bytes judged last (applied or refused).
    last: Option<Vec<u8>>,
    /// A change read once.
    pending: Option<Vec<u8>>,
}

impl Settle {
    /// The bytes to judge now, if any.
    fn read(&mut self, bytes: Vec<u8>) -> Option<Vec<u8>> {
        if self.last.as_deref() == Some(bytes.as_slice()) {
            self.pending = None;
            return None;
        }
        if self.pending.as_deref() != Some(bytes.as_slice()) {
            self.pending = Some(bytes);
            return None;
        }
        self.pending = None;
        self.last = Some(bytes.clone());
        Some(bytes)
    }

    /// The file could not be read: whatever comes next is a change.
    fn unreadable(&mut self) {
        *self = Self::default();
    }
}

/// FNV-1a of the file's bytes, logged with each applied state so whoever wrote the
/// file can tell when exactly that content is in force.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn report(status: &Mutex<Option<String>>, error: Option<String>) {
    *status.lock().unwrap_or_else(|e| e.into_inner()) = error;
}

#[cfg(test)]
mod settle_tests {
    use super::Settle;

    #[test]
    fn a_change_is_judged_once_two_reads_agree() {
        let mut reads = Settle::default();
        let full = b"workloads: [a, b]".to_vec();
        assert_eq!(
            reads.read(full.clone()),
            None,
            "read once: may be half-written"
        );
        assert_eq!(reads.read(full.clone()), Some(full.clone()));
        assert_eq!(reads.read(full.clone()), None, "unchanged");
        // Written in place: read empty, then cut, then whole.
        let cut = b"workloads: [a]".to_vec();
        assert_eq!(reads.read(Vec::new()), None);
        assert_eq!(reads.read(cut.clone()), None);
        let next = b"workloads: [a, c]".to_vec();
        assert_eq!(reads.read(next.clone()), None);
        assert_eq!(reads.read(next.clone()), Some(next.clone()));
        // A write undone before it settled: nothing to judge.
        assert_eq!(reads.read(cut), None);
        assert_eq!(reads.read(next.clone()), None);
        // After a read error, the same file is judged again (its error clears).
        reads.unreadable();
        assert_eq!(reads.read(next.clone()), None);
        assert_eq!(reads.read(next.clone()), Some(next));
    }
}
