//! The small plain HTTP/1.1 servers of admin, debug, metrics and readiness
//! endpoints: one accept loop for every Ambit process, each tied to the drain.
//! The caller answers each request with a [`Reply`]; nothing here knows routes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::drain::DrainWatcher;

/// One answer: status, content type and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// Pretty JSON, newline-terminated.
    pub fn json(value: &impl serde::Serialize) -> Self {
        Self {
            status: StatusCode::OK,
            content_type: "application/json",
            body: serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
        }
    }

    /// Prometheus text exposition.
    pub fn metrics(body: String) -> Self {
        Self {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body,
        }
    }

    pub fn not_found() -> Self {
        Self::text(StatusCode::NOT_FOUND, "not found\n")
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(self.body)));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(self.content_type),
        );
        resp
    }
}

/// Binds `addr` and answers every request with `handler` until drained; returns
/// the bound address (port 0 picks one).
pub async fn serve<H>(
    addr: SocketAddr,
    name: &'static str,
    handler: H,
    drain: DrainWatcher,
) -> std::io::Result<SocketAddr>
where
    H: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = drain.signaled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, endpoint = name, "accept failed");
                        continue;
                    }
                },
            };
            let handler = handler.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = handler(&req).into_response();
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    () = drain.signaled() => {}
                    r = conn => if let Err(e) = r {
                        tracing::debug!(error = %e, endpoint = name, "connection error");
                    },
                }
            });
        }
    });
    Ok(bound)
}
