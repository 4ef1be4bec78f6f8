//! The small plain HTTP/1.1 servers of admin, debug, metrics and readiness
//! endpoints: the shared accept loop with [`AdminLimits`] on connections, buffers
//! and time, each tied to the drain. The caller answers each request with a
//! [`Reply`]; nothing here knows routes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::accept::accept_loop;
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

/// How much one admin endpoint may hold. These ports are reachable from the node
/// (15020, 15021 listen on every address), so what a client can make the process keep
/// is bounded: a connection count, a buffer per connection and how long each lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminLimits {
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// How long a request's head may take to arrive. hyper starts the clock again
    /// after each answer, so this is also how long a kept-alive connection may idle.
    pub header_read_timeout: Duration,
    /// hyper's read buffer per connection (a request head larger than this is refused).
    pub max_buf_size: usize,
    /// Past this age a connection takes no new request: an idle one closes, one
    /// that is answering finishes its answer first.
    pub max_connection_age: Duration,
    /// How long an answer under way at [`Self::max_connection_age`] may still take
    /// (a slow reader of a large `/metrics` or `/config_dump`) before it is cut.
    pub close_grace: Duration,
}

/// Connections one admin endpoint serves at once. A scraper, a probe and an
/// operator need a few; the cap keeps a flood of connections from taking the
/// process's file descriptors, which the data plane needs.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            max_connections: MAX_ADMIN_CONNECTIONS,
            header_read_timeout: Duration::from_secs(5),
            max_buf_size: 16 * 1024,
            max_connection_age: Duration::from_secs(60),
            close_grace: Duration::from_secs(30),
        }
    }
}

/// Binds `addr` and answers every request with `handler` until drained, within
/// [`AdminLimits::default`]; returns the bound address (port 0 picks one).
pub async fn serve<H>(
    addr: SocketAddr,
    name: &'static str,
    handler: H,
    drain: DrainWatcher,
) -> std::io::Result<SocketAddr>
where
    H: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
{
    serve_with_limits(addr, name, AdminLimits::default(), handler, drain).await
}

/// [`serve`] with other limits than the defaults.
pub async fn serve_with_limits<H>(
    addr: SocketAddr,
    name: &'static str,
    limits: AdminLimits,
    handler: H,
    drain: DrainWatcher,
) -> std::io::Result<SocketAddr>
where
    H: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let handler = Arc::new(handler);
    let conn_drain = drain.clone();
    tokio::spawn(accept_loop(
        listener,
        limits.max_connections,
        drain,
        name,
        move |stream, _| {
            serve_connection(stream, handler.clone(), limits, conn_drain.clone(), name)
        },
    ));
    Ok(bound)
}

/// One connection, until the client closes it, a limit is reached or a drain starts
/// (an admin answer is not worth waiting for at shutdown).
async fn serve_connection<H>(
    stream: TcpStream,
    handler: Arc<H>,
    limits: AdminLimits,
    drain: DrainWatcher,
    name: &'static str,
) where
    H: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
{
    let svc = service_fn(move |req| {
        let resp = handler(&req).into_response();
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        // Without a timer hyper's header read timeout is silently off.
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_buf_size)
        .serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        () = drain.signaled() => return,
        r = conn.as_mut() => r,
        () = tokio::time::sleep(limits.max_connection_age) => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                () = drain.signaled() => return,
                r = tokio::time::timeout(limits.close_grace, conn) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::debug!(endpoint = name, "answer still unsent past the connection's age, closed");
                        return;
                    }
                },
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, endpoint = name, "connection error");
    }
}
