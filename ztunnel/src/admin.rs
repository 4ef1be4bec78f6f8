//! ztunnel's HTTP endpoints: admin on 127.0.0.1:15000 (config dump, "why" view),
//! metrics on 15020, readiness on 15021. Small plain HTTP/1.1 servers, each tied to
//! the process drain. Readiness waits for the state source's first sync (xDS:
//! every type's first response; local mode: the file applied once), and the
//! config dump shows the xDS client's status.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use hyper::body::Incoming;
use mesh_core::admin::Reply;
use mesh_core::drain::DrainWatcher;
use mesh_core::xds::{XdsSnapshot, XdsStatus};
use serde_json::json;
use tokio::sync::watch;

use crate::proxy::ProxyInputs;

/// What the endpoints read.
#[derive(Debug)]
pub struct AdminState {
    pub inputs: Arc<ProxyInputs>,
    /// The local state file's current error, if it is bad.
    pub local_state_error: Arc<Mutex<Option<String>>>,
    /// The xDS client's status, when state comes from the control plane.
    pub xds: Option<XdsStatus>,
    /// True once the state source has synced (see [`crate::app::App::state_synced`]).
    pub synced: watch::Receiver<bool>,
    pub ready: AtomicBool,
}

impl AdminState {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Ready once started and once the state source has synced: with xDS,
    /// every resource type has had a response; in local mode, the file has
    /// been applied once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && *self.synced.borrow()
    }

    fn config_dump(&self) -> serde_json::Value {
        let i = &self.inputs;
        let state = i.state.snapshot();
        let mut workloads: Vec<_> = state.workloads().map(|w| w.as_ref()).collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<_> = state.services().map(|s| s.as_ref()).collect();
        services.sort_by_key(|s| s.key());
        let mut certs: Vec<_> = i
            .certs
            .all()
            .iter()
            .map(|c| {
                json!({
                    "identity": c.identity().to_string(),
                    "notBefore": unix(c.not_before()),
                    "notAfter": unix(c.not_after()),
                    "chainLength": c.chain().len(),
                })
            })
            .collect();
        certs.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        json!({
            "config": &*i.config,
            "workloads": workloads,
            "services": services,
            "policies": state.policies(),
            "certificates": certs,
            "connections": i.conns.snapshot(),
            "localStateError": *self.local_state_error.lock().unwrap_or_else(|e| e.into_inner()),
            "xds": self.xds.as_ref().map(|x| xds_dump(&x.snapshot())),
        })
    }
}

/// The xDS client's status as JSON: connection, then per type counts, last ACK
/// and last NACK (with the refused resources and why).
fn xds_dump(s: &XdsSnapshot) -> serde_json::Value {
    let types: serde_json::Map<String, serde_json::Value> = s
        .types
        .iter()
        .map(|(type_url, t)| {
            let value = json!({
                "resources": t.resources,
                "responses": t.responses,
                "lastAck": t.last_ack.as_ref().map(|(nonce, at)| json!({"nonce": nonce, "at": unix(*at)})),
                "lastNack": t.last_nack.as_ref().map(|n| json!({"nonce": n.nonce, "at": unix(n.at), "message": n.message})),
            });
            (type_url.clone(), value)
        })
        .collect();
    json!({
        "address": s.address,
        "connected": s.connected,
        "synced": s.synced,
        "streams": s.streams,
        "lastError": s.last_error,
        "failures": s.failures,
        "retryIn": s.retry_in.map(|d| format!("{d:?}")),
        "types": types,
    })
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

fn respond(state: &AdminState, endpoint: Endpoint, req: &Request<Incoming>) -> Reply {
    let path = req.uri().path();
    match (endpoint, path) {
        (Endpoint::Admin, "/config_dump") => Reply::json(&state.config_dump()),
        (Endpoint::Admin, "/debug/why") => {
            let entries = state.inputs.why.entries();
            if req.uri().query() == Some("format=text") {
                let text: String = entries
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {} {} -> {}: {}\n",
                            r.at,
                            r.direction,
                            r.source_identity.as_deref().unwrap_or(&r.source),
                            r.destination,
                            r.explanation
                        )
                    })
                    .collect();
                Reply::text(StatusCode::OK, text)
            } else {
                Reply::json(&entries)
            }
        }
        (Endpoint::Admin, "/") => Reply::text(
            StatusCode::OK,
            "/config_dump\n/debug/why\n/debug/why?format=text\n",
        ),
        (Endpoint::Metrics, "/metrics" | "/stats/prometheus") => {
            state.inputs.conns.report_bytes(&state.inputs.metrics);
            Reply::metrics(state.inputs.metrics.encode())
        }
        (Endpoint::Readiness, "/healthz/ready") => {
            if state.is_ready() {
                Reply::text(StatusCode::OK, "ready\n")
            } else {
                Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        _ => Reply::not_found(),
    }
}

/// Binds `addr` and serves `endpoint` until drained.
pub async fn serve(
    addr: SocketAddr,
    endpoint: Endpoint,
    state: Arc<AdminState>,
    drain: DrainWatcher,
) -> std::io::Result<SocketAddr> {
    let name = match endpoint {
        Endpoint::Admin => "admin",
        Endpoint::Metrics => "metrics",
        Endpoint::Readiness => "readiness",
    };
    mesh_core::admin::serve(addr, name, move |req| respond(&state, endpoint, req), drain).await
}
