//! ztunnel's HTTP endpoints: admin on 127.0.0.1:15000 (config dump, "why" view),
//! metrics on 15020, readiness on 15021. Small plain HTTP/1.1 servers, each tied to
//! the process drain. With xDS configured, readiness waits for the first full sync
//! and the config dump shows the xDS client's status.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_core::drain::DrainWatcher;
use mesh_core::xds::{XdsSnapshot, XdsStatus};
use serde_json::json;
use tokio::net::TcpListener;

use crate::proxy::ProxyInputs;

/// What the endpoints read.
#[derive(Debug)]
pub struct AdminState {
    pub inputs: Arc<ProxyInputs>,
    /// The local state file's current error, if it is bad.
    pub local_state_error: Arc<Mutex<Option<String>>>,
    /// The xDS client's status, when state comes from the control plane.
    pub xds: Option<XdsStatus>,
    pub ready: AtomicBool,
}

impl AdminState {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Ready once started and, with xDS, once every resource type has synced.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.xds.as_ref().is_none_or(|x| x.snapshot().synced)
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

fn respond(
    state: &AdminState,
    endpoint: Endpoint,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let (status, ctype, body) = match (endpoint, path) {
        (Endpoint::Admin, "/config_dump") => (
            StatusCode::OK,
            "application/json",
            pretty(&state.config_dump()),
        ),
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
                (StatusCode::OK, "text/plain; charset=utf-8", text)
            } else {
                (StatusCode::OK, "application/json", pretty(&json!(entries)))
            }
        }
        (Endpoint::Admin, "/") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "/config_dump\n/debug/why\n/debug/why?format=text\n".into(),
        ),
        (Endpoint::Metrics, "/metrics" | "/stats/prometheus") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.inputs.metrics.encode(),
        ),
        (Endpoint::Readiness, "/healthz/ready") => {
            if state.is_ready() {
                (StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".into(),
                )
            }
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// Binds `addr` and serves `endpoint` until drained.
pub async fn serve(
    addr: SocketAddr,
    endpoint: Endpoint,
    state: Arc<AdminState>,
    drain: DrainWatcher,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = drain.signaled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, ?endpoint, "admin accept failed");
                        continue;
                    }
                },
            };
            let state = state.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = respond(&state, endpoint, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    () = drain.signaled() => {}
                    r = conn => if let Err(e) = r {
                        tracing::debug!(error = %e, "admin connection error");
                    },
                }
            });
        }
    });
    Ok(bound)
}
