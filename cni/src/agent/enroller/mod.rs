//! The agent's pods and what happens to them: enroll (redirect, then hand to
//! ztunnel), un-enroll (tell ztunnel, then un-redirect), check, and the snapshot a
//! (re)connecting ztunnel gets. A lock per pod orders the requests for that pod,
//! and the tools run under it alone, so a slow or hung tool (killed at its
//! deadline) holds up only its own pod. The lock of the pod table orders what
//! ztunnel hears: a message to ztunnel is queued on its connection under it
//! ([`ztunnel`]), so a pod is either in a ztunnel's snapshot or queued after it,
//! never lost in between, and one pod's messages keep their order. Nothing waits
//! for ztunnel under it: answers are awaited once it is released, so a slow
//! ztunnel holds up only the requests that need its answer, never the table.

mod ztunnel;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::os::NetNs;
use tokio::sync::{Mutex, Notify};

use super::handoff::Handoff;
use super::pod_locks::PodLocks;
use super::pod_store::PodStore;
use super::ztunnel_conn::{self, ZtunnelHandle};
use crate::api::{AgentReply, AgentRequest, FailureKind, Pod};
use crate::redirect::{RedirectError, Redirector};
use crate::zds;
use ztunnel::{Delivery, delivered};

/// Why a plugin request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnrollError {
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("cannot open the network namespace {}: {source}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is the agent's own network namespace; refusing to redirect it", path.display())]
    HostNetns { path: PathBuf },
    #[error("redirection for pod {uid}: {source}")]
    Rules {
        uid: String,
        #[source]
        source: RedirectError,
    },
    #[error("ztunnel refused pod {uid}: {reason}")]
    Refused { uid: String, reason: String },
    #[error("pod {uid} is not enrolled")]
    UnknownPod { uid: String },
    #[error("pod {uid} is enrolled but its redirection is incomplete")]
    RulesMissing { uid: String },
    #[error("pod {uid} is redirected but not served: {why}")]
    NotServed { uid: String, why: String },
    #[error("pod {uid} could not be saved to {}, so an agent restart would lose it: {reason}", path.display())]
    NotSaved {
        uid: String,
        path: PathBuf,
        reason: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl EnrollError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::BadRequest(_) => FailureKind::BadRequest,
            Self::Netns { .. } | Self::HostNetns { .. } => FailureKind::Netns,
            Self::Rules { .. } | Self::RulesMissing { .. } => FailureKind::Rules,
            Self::Refused { .. } | Self::NotServed { .. } => FailureKind::Ztunnel,
            Self::UnknownPod { .. } => FailureKind::UnknownPod,
            Self::Internal(_) | Self::NotSaved { .. } => FailureKind::Internal,
        }
    }
}

/// A pod the agent has enrolled; its namespace stays open while it is enrolled.
#[derive(Debug)]
struct EnrolledPod {
    pod: Pod,
    netns: Arc<NetNs>,
    handoff: Handoff,
    /// Tells this enrollment apart from an earlier or later one of the same uid.
    generation: u64,
}

#[derive(Debug, Default)]
struct State {
    pods: BTreeMap<String, EnrolledPod>,
    /// The active ztunnel connection.
    ztunnel: Option<ZtunnelHandle>,
    /// The connection that attached last: only its answers count.
    latest_conn: u64,
    next_generation: u64,
}

impl State {
    /// Adds (or replaces) the pod, not yet with ztunnel; its generation.
    fn enroll(&mut self, pod: Pod, netns: Arc<NetNs>) -> u64 {
        self.next_generation += 1;
        let generation = self.next_generation;
        let enrolled = EnrolledPod {
            pod,
            netns,
            handoff: Handoff::Waiting,
            generation,
        };
        self.pods.insert(enrolled.pod.uid.clone(), enrolled);
        generation
    }
}

#[derive(Debug)]
pub(crate) struct Enroller {
    /// Taken before `state` (never the other way), for a whole request.
    pod_locks: PodLocks,
    state: Mutex<State>,
    redirector: Redirector,
    /// Inode of the agent's own network namespace, never to be redirected.
    own_netns: u64,
    store: PodStore,
    /// First delay before a refused pod is offered to ztunnel again.
    retry_first: Duration,
    /// Wakes the re-offer task when a pod is refused.
    refused: Notify,
}

impl Enroller {
    /// An enroller knowing the pods `saved` in `store`.
    pub(crate) fn new(
        redirector: Redirector,
        own_netns: u64,
        store: PodStore,
        saved: Vec<(Pod, NetNs)>,
        retry_first: Duration,
    ) -> Self {
        let mut state = State::default();
        for (pod, netns) in saved {
            // An older agent may have enrolled it with IPv6 on, around the mesh;
            // the rules themselves are left alone (reinstalling them would open
            // a gap while the pod runs).
            if let Err(e) = redirector.disable_ipv6(&netns) {
                tracing::error!(pod = %pod.uid, "cannot turn IPv6 off in a saved pod: {e}");
            }
            state.enroll(pod, Arc::new(netns));
        }
        Self {
            pod_locks: PodLocks::default(),
            state: Mutex::new(state),
            redirector,
            own_netns,
            store,
            retry_first,
            refused: Notify::new(),
        }
    }

    /// Saves the pods after a change. A failure is logged and returned; after a
    /// removal it is only logged (a removed pod's namespace is gone by the next
    /// start, and the load forgets it), an ADD fails on it (see `add`).
    async fn persist(&self, state: &State) -> Result<(), String> {
        let pods = state.pods.values().map(|p| (&p.pod, &*p.netns));
        self.store.save(pods).await.map_err(|e| {
            tracing::error!(path = %self.store.path().display(), "cannot save the pods: {e}");
            e.to_string()
        })
    }

    /// Answers one plugin request.
    pub(crate) async fn handle(&self, request: AgentRequest) -> AgentReply {
        let result = match request {
            AgentRequest::Add { pod } => self.add(pod).await,
            AgentRequest::Del {
                uid,
                container_id,
                netns,
            } => {
                self.del(&uid, container_id.as_deref(), netns.as_deref())
                    .await
            }
            AgentRequest::Check { uid } => self.check(&uid).await.map(|()| None),
            AgentRequest::List => {
                let state = self.state.lock().await;
                let pods = state.pods.values().map(|p| p.pod.clone()).collect();
                return AgentReply::Ok { detail: None, pods };
            }
        };
        match result {
            Ok(None) => AgentReply::ok(),
            Ok(Some(detail)) => AgentReply::ok_with(detail),
            Err(e) => {
                tracing::warn!("{e}");
                AgentReply::failed(e.kind(), e.to_string())
            }
        }
    }

    async fn add(&self, pod: Pod) -> Result<Option<String>, EnrollError> {
        if pod.uid.is_empty() || pod.netns.as_os_str().is_empty() {
            return Err(EnrollError::BadRequest(
                "a pod needs a uid and a netns".into(),
            ));
        }
        if let Some(v6) = pod.ips.iter().find(|ip| ip.is_ipv6()) {
            return Err(EnrollError::BadRequest(format!(
                "IPv6 is not supported yet: pod {} has {v6}, whose traffic would bypass the mesh",
                pod.uid
            )));
        }
        let netns = self.open_pod_netns(&pod.netns)?;
        let uid = pod.uid.clone();
        let _pod_lock = self.pod_locks.lock(&uid).await;
        let old = {
            let mut state = self.state.lock().await;
            match state.pods.remove(&uid) {
                Some(old) => {
                    let _ = self.persist(&state).await; // logged there
                    let del = state.queue(zds::encode_del(&uid), None);
                    Some((old, del))
                }
                None => None,
            }
        };
        if let Some((old, del)) = old {
            tracing::info!(%uid, "pod added again: replacing its earlier enrollment");
            self.retire(old, del).await;
        }
        self.redirect(&uid, &netns, Redirector::install).await?;
        let netns = Arc::new(netns);
        tracing::info!(%uid, name = %pod.name, namespace = %pod.namespace, ips = ?pod.ips, "pod redirected");
        let msg = zds::encode_add(&pod);
        let (generation, add) = {
            let mut state = self.state.lock().await;
            let generation = state.enroll(pod, netns.clone());
            // A pod the file does not hold would be forgotten by a restarted agent
            // while its rules stay: its traffic would go to listeners nobody opens.
            // Failing the ADD instead lets the runtime retry it, visibly.
            if let Err(reason) = self.persist(&state).await {
                state.pods.remove(&uid);
                drop(state);
                if let Err(e) = self.redirect(&uid, &netns, Redirector::remove).await {
                    tracing::warn!("{e}");
                }
                return Err(EnrollError::NotSaved {
                    uid,
                    path: self.store.path().to_path_buf(),
                    reason,
                });
            }
            (generation, state.queue(msg, Some(netns.clone())))
        };
        // Awaited with the table free: other pods' requests go on meanwhile.
        let conn = add.as_ref().map(|a| a.conn);
        match delivered(add).await {
            Delivery::Acked => {
                if let Some(conn) = conn {
                    let mut state = self.state.lock().await;
                    state.record(&uid, generation, conn, Handoff::Acked);
                }
                Ok(None)
            }
            Delivery::NotConnected => Ok(Some(
                "ztunnel is not connected; the pod is sent when it connects".into(),
            )),
            Delivery::Broken(reason) => Ok(Some(format!(
                "ztunnel connection dropped ({reason}); the pod is sent when it reconnects"
            ))),
            Delivery::Refused(reason) => {
                let del = {
                    let mut state = self.state.lock().await;
                    if state.pods.get(&uid).map(|p| p.generation) == Some(generation) {
                        state.pods.remove(&uid);
                        let _ = self.persist(&state).await; // logged there
                    }
                    // A newer connection had the pod in its snapshot: it hears
                    // that the pod is gone.
                    let newer = state.ztunnel.as_ref().is_some_and(|z| Some(z.id) != conn);
                    newer
                        .then(|| state.queue(zds::encode_del(&uid), None))
                        .flatten()
                };
                if let Delivery::Refused(why) = delivered(del).await {
                    tracing::debug!(%uid, "ztunnel refused the removal of a refused pod: {why}");
                }
                if let Err(e) = self.redirect(&uid, &netns, Redirector::remove).await {
                    tracing::warn!("{e}");
                }
                Err(EnrollError::Refused { uid, reason })
            }
        }
    }

    async fn del(
        &self,
        uid: &str,
        container_id: Option<&str>,
        netns: Option<&Path>,
    ) -> Result<Option<String>, EnrollError> {
        let _pod_lock = self.pod_locks.lock(uid).await;
        let mut state = self.state.lock().await;
        let stale = state
            .pods
            .get(uid)
            .and_then(|enrolled| stale_del(enrolled, container_id, netns));
        if let Some(why) = &stale {
            tracing::info!(%uid, "DEL of another sandbox than the enrolled one, ignored: {why}");
        } else if let Some(old) = state.pods.remove(uid) {
            let _ = self.persist(&state).await; // logged there
            let del = state.queue(zds::encode_del(uid), None);
            drop(state);
            self.retire(old, del).await;
            tracing::info!(%uid, "pod removed");
            return Ok(None);
        }
        // Unknown (never enrolled, opted out, enrolled before an agent restart, or
        // a sandbox since replaced): clean what may be left in its namespace, unless
        // a pod owns it.
        let unowned = netns
            .and_then(|p| self.open_pod_netns(p).ok())
            .filter(|ns| {
                let inode = ns.inode().ok();
                !state.pods.values().any(|p| p.netns.inode().ok() == inode)
            });
        drop(state);
        if let Some(ns) = unowned
            && let Err(e) = self.redirect(uid, &ns, Redirector::remove).await
        {
            tracing::debug!("cleanup of unknown pod: {e}");
        }
        Ok(Some(match stale {
            Some(why) => format!("pod {uid}: {why}; the enrolled sandbox is left alone"),
            None => format!("pod {uid} was not enrolled"),
        }))
    }

    async fn check(&self, uid: &str) -> Result<(), EnrollError> {
        let _pod_lock = self.pod_locks.lock(uid).await;
        let (netns, handoff) = {
            let state = self.state.lock().await;
            let pod = state.pods.get(uid).ok_or_else(|| EnrollError::UnknownPod {
                uid: uid.to_owned(),
            })?;
            (clone_netns(&pod.netns)?, pod.handoff.clone())
        };
        if !self.redirect(uid, &netns, Redirector::is_installed).await? {
            return Err(EnrollError::RulesMissing {
                uid: uid.to_owned(),
            });
        }
        match handoff.problem() {
            None => Ok(()),
            Some(why) => Err(EnrollError::NotServed {
                uid: uid.to_owned(),
                why,
            }),
        }
    }

    /// Waits for ztunnel's answer to the removal of the pod (already out of the
    /// table, its `DelWorkload` queued as `del`), then removes its redirection.
    /// Called with the pod's lock held and the table's lock free.
    async fn retire(&self, old: EnrolledPod, del: Option<ztunnel_conn::Pending>) {
        let uid = old.pod.uid.as_str();
        if let Delivery::Refused(reason) = delivered(del).await {
            tracing::warn!(%uid, "ztunnel refused the removal: {reason}");
        }
        if let Err(e) = self.redirect(uid, &old.netns, Redirector::remove).await {
            tracing::warn!("{e}");
        }
    }

    /// Runs one [`Redirector`] operation on a blocking thread.
    async fn redirect<T: Send + 'static>(
        &self,
        uid: &str,
        netns: &NetNs,
        op: fn(&Redirector, &NetNs) -> Result<T, RedirectError>,
    ) -> Result<T, EnrollError> {
        let redirector = self.redirector.clone();
        let netns = clone_netns(netns)?;
        tokio::task::spawn_blocking(move || op(&redirector, &netns))
            .await
            .map_err(|e| EnrollError::Internal(format!("redirection task failed: {e}")))?
            .map_err(|source| EnrollError::Rules {
                uid: uid.to_owned(),
                source,
            })
    }

    fn open_pod_netns(&self, path: &Path) -> Result<NetNs, EnrollError> {
        let netns_err = |source| EnrollError::Netns {
            path: path.to_owned(),
            source,
        };
        let netns = NetNs::open(path).map_err(netns_err)?;
        if netns.inode().map_err(netns_err)? == self.own_netns {
            return Err(EnrollError::HostNetns {
                path: path.to_owned(),
            });
        }
        Ok(netns)
    }
}

/// Why a DEL names another sandbox than the enrolled one (a late or repeated DEL
/// of a sandbox the pod's newer one replaced), or `None` when it is this one. What
/// the DEL does not say (an older plugin; a namespace already gone) is no evidence.
fn stale_del(
    enrolled: &EnrolledPod,
    container_id: Option<&str>,
    netns: Option<&Path>,
) -> Option<String> {
    if let Some(id) = container_id
        && id != enrolled.pod.container_id
    {
        return Some(format!(
            "the DEL is for sandbox {id}, the enrolled one is {}",
            enrolled.pod.container_id
        ));
    }
    let named = netns.and_then(|p| NetNs::open(p).ok()?.inode().ok());
    let enrolled_inode = enrolled.netns.inode().ok();
    match (named, enrolled_inode) {
        (Some(named), Some(ours)) if named != ours => Some(format!(
            "the DEL's network namespace {} is not the enrolled one",
            netns
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        )),
        _ => None,
    }
}

fn clone_netns(netns: &NetNs) -> Result<NetNs, EnrollError> {
    netns
        .try_clone()
        .map_err(|e| EnrollError::Internal(format!("cannot duplicate a namespace fd: {e}")))
}
