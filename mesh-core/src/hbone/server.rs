//! The HBONE server: mTLS + HTTP/2, each CONNECT validated and handed to a handler.
//!
//! A connection whose handshake fails, and a CONNECT that is malformed, is refused with
//! a recorded reason; the listener keeps serving. A connection with no tunnel for
//! `server_idle_timeout` gets GOAWAY and closes. On drain the listener closes, open
//! connections get GOAWAY (no new tunnels, open ones finish), and on force every task
//! is dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{H2Stream, HboneConfig, REASON_HEADER, parse_authority};
use crate::SpiffeId;
use crate::accept::accept_loop;
use crate::drain::DrainWatcher;
use crate::tls::{ALPN_H2, identity_of_cert};

mod idle;
mod stats;
use idle::{IdleClock, IdleStep};
pub use stats::{RefusalKind, RefusalObserver, RefusalRecord, ServerStats};

/// A refusal to send back: a 4xx/5xx status and the reason, in `ambit-reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// Decides what to do with each valid CONNECT.
pub trait ConnectHandler: Send + Sync + 'static {
    /// Answers with [`InboundConnect::accept`] once the upstream is ready, or
    /// [`InboundConnect::refuse`]; dropping it unanswered sends 503.
    ///
    /// The client may have sent data behind the CONNECT before any answer (early
    /// data, `ConnectRequest::early_data`); it becomes readable only through the
    /// stream `accept` returns, so a handler decides on the CONNECT before any of
    /// it can reach an upstream, and a refusal drops it unread.
    fn handle(&self, connect: InboundConnect) -> impl Future<Output = ()> + Send;

    /// Runs for each accepted TCP connection before its TLS handshake, within the
    /// handshake timeout: a handler whose certificate may still be on its way (a
    /// pod that just started) waits for it here rather than fail the handshake.
    fn before_handshake(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// One validated CONNECT, waiting for its answer.
#[derive(Debug)]
pub struct InboundConnect {
    peer: SpiffeId,
    peer_addr: SocketAddr,
    target: SocketAddr,
    headers: HeaderMap,
    respond: Option<SendResponse<Bytes>>,
    body: Option<RecvStream>,
    stats: Arc<ServerStats>,
}

impl InboundConnect {
    /// The client's identity, from its verified certificate.
    pub fn peer(&self) -> &SpiffeId {
        &self.peer
    }

    /// The TCP address the HBONE connection came from.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Where the tunnel should lead (`:authority`).
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The request headers (`forwarded`, `baggage`, `traceparent`, ...).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Answers 200 and returns the tunnel.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let (Some(mut respond), Some(body)) = (self.respond.take(), self.body.take()) else {
            unreachable!("an InboundConnect is answered once, by value");
        };
        let send = respond.send_response(Response::new(()), false)?;
        self.stats.record_tunnel();
        Ok(H2Stream::new(send, body, None))
    }

    /// Answers with `refusal` and records it (the handler counts it itself: it
    /// is not passed to the stats' observer).
    pub fn refuse(mut self, kind: RefusalKind, refusal: Refusal) {
        self.answer(kind, refusal, false);
    }

    fn answer(&mut self, kind: RefusalKind, refusal: Refusal, own: bool) {
        if let Some(respond) = self.respond.take() {
            let record = RefusalRecord::new(
                kind,
                self.peer_addr,
                Some(self.peer.clone()),
                Some(self.target),
                refusal.reason.clone(),
            );
            if own {
                self.stats.record_own_refusal(record);
            } else {
                self.stats.record_refusal(record);
            }
            send_refusal(respond, &refusal);
        }
    }
}

impl Drop for InboundConnect {
    fn drop(&mut self) {
        self.answer(
            RefusalKind::Unavailable,
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "handler did not answer"),
            true,
        );
    }
}

fn send_refusal(mut respond: SendResponse<Bytes>, refusal: &Refusal) {
    let mut resp = Response::new(());
    *resp.status_mut() = refusal.status;
    // A reason that is not a valid header value is still refused, just unexplained.
    if let Ok(v) = HeaderValue::from_str(&refusal.reason) {
        resp.headers_mut().insert(REASON_HEADER, v);
    }
    let _ = respond.send_response(resp, true);
}

/// An HBONE listener.
pub struct HboneServer<H> {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handler: Arc<H>,
    config: HboneConfig,
    stats: Arc<ServerStats>,
}

impl<H> std::fmt::Debug for HboneServer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneServer")
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl<H: ConnectHandler> HboneServer<H> {
    /// A server for `listener` presenting `tls` (see [`crate::tls::server_config`]).
    pub fn new(
        listener: TcpListener,
        tls: rustls::ServerConfig,
        handler: H,
        config: HboneConfig,
    ) -> Self {
        Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            handler: Arc::new(handler),
            config,
            stats: Arc::new(ServerStats::default()),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// Serves until drained. Returns when the listener is closed; connections still
    /// open hold `drain` until they finish or are forced.
    pub async fn run(self, drain: DrainWatcher) {
        let addr = self.listener.local_addr().ok();
        let Self {
            listener,
            acceptor,
            handler,
            config,
            stats,
        } = self;
        let max = config.server_max_connections;
        // Set once here, it holds for every accepted connection.
        super::keep_alive(&listener);
        let watcher = drain.clone();
        accept_loop(listener, max, drain, "HBONE", move |tcp, peer| {
            let conn = Connection {
                acceptor: acceptor.clone(),
                handler: handler.clone(),
                config: config.clone(),
                stats: stats.clone(),
                peer,
            };
            let drain = watcher.clone();
            async move { conn.serve(tcp, &drain).await }
        })
        .await;
        tracing::info!(?addr, "HBONE listener closed for drain");
    }
}

/// One accepted TCP connection.
struct Connection<H> {
    acceptor: TlsAcceptor,
    handler: Arc<H>,
    config: HboneConfig,
    stats: Arc<ServerStats>,
    peer: SocketAddr,
}

impl<H: ConnectHandler> Connection<H> {
    async fn serve(self, tcp: TcpStream, drain: &DrainWatcher) {
        let _ = tcp.set_nodelay(true);
        let refuse = |kind, reason: String, id: Option<SpiffeId>| {
            tracing::info!(peer = %self.peer, kind = kind_str(kind), %reason, "HBONE connection refused");
            self.stats
                .record_own_refusal(RefusalRecord::new(kind, self.peer, id, None, reason));
        };
        let timeout = self.config.handshake_timeout;
        let handshake = async {
            self.handler.before_handshake().await;
            self.acceptor.accept(tcp).await
        };
        let tls = match tokio::time::timeout(timeout, handshake).await {
            Err(_) => {
                return refuse(
                    RefusalKind::HandshakeTimeout,
                    "TLS handshake timed out".into(),
                    None,
                );
            }
            Ok(Err(e)) => {
                let kind = RefusalKind::of_tls_io_error(&e);
                return refuse(
                    kind,
                    format!("TLS handshake: {}", crate::tls::describe_io_error(&e)),
                    None,
                );
            }
            Ok(Ok(mut tls)) => {
                tls.get_mut()
                    .1
                    .set_buffer_limit(Some(super::TLS_SEND_BUFFER));
                tls
            }
        };
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN_H2) {
            return refuse(
                RefusalKind::NoAlpn,
                "client did not negotiate ALPN h2".into(),
                None,
            );
        }
        let identity = match session.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => identity_of_cert(cert),
            None => {
                return refuse(
                    RefusalKind::NoClientCert,
                    "no client certificate".into(),
                    None,
                );
            }
        };
        let peer_id = match identity {
            Ok(id) => id,
            Err(e) => return refuse(RefusalKind::BadIdentity, e.to_string(), None),
        };
        self.stats.record_handshake();
        let handshake = h2::server::Builder::new()
            .initial_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.connection_window)
            .max_frame_size(self.config.max_frame_size)
            .max_header_list_size(super::MAX_HEADER_LIST)
            .max_send_buffer_size(self.config.max_send_buffer)
            .max_concurrent_streams(self.config.server_max_streams)
            .handshake::<_, Bytes>(tls);
        let mut h2 = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(h2)) => h2,
            Ok(Err(e)) => {
                return refuse(
                    RefusalKind::Http2,
                    format!("HTTP/2 handshake: {e}"),
                    Some(peer_id),
                );
            }
            Err(_) => {
                return refuse(
                    RefusalKind::HandshakeTimeout,
                    "HTTP/2 handshake timed out".into(),
                    Some(peer_id),
                );
            }
        };
        let mut draining = false;
        let mut idle = IdleClock::new(self.config.server_idle_timeout);
        loop {
            tokio::select! {
                biased;
                () = drain.signaled(), if !draining => {
                    // GOAWAY: open tunnels finish, new ones are refused.
                    h2.graceful_shutdown();
                    draining = true;
                }
                () = idle.next_check(), if !draining => match idle.check(h2.has_streams()) {
                    IdleStep::Keep => {}
                    // Tunnels that come in GOAWAY's round trip are served.
                    IdleStep::GoAway => {
                        tracing::debug!(peer = %self.peer, src = %peer_id, "closing idle HBONE connection");
                        h2.graceful_shutdown();
                    }
                    IdleStep::Close => {
                        tracing::debug!(peer = %self.peer, src = %peer_id, "idle HBONE connection did not close after GOAWAY");
                        break;
                    }
                },
                next = h2.accept() => match next {
                    Some(Ok((_, mut respond))) if drain.is_draining() => {
                        // h2's graceful GOAWAY still admits streams for one round trip;
                        // refuse them so the client retries elsewhere.
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        self.stats.record_own_refusal(RefusalRecord::new(
                            RefusalKind::Draining,
                            self.peer,
                            Some(peer_id.clone()),
                            None,
                            "server is draining".into(),
                        ));
                    }
                    Some(Ok((req, respond))) => {
                        let stream = Stream {
                            handler: self.handler.clone(),
                            stats: self.stats.clone(),
                            peer_id: peer_id.clone(),
                            peer: self.peer,
                        };
                        let drain = drain.clone();
                        let open = idle.begin();
                        // Boxed: spawning and finishing the task then move a pointer,
                        // not the handler's whole future.
                        let serve = Box::pin(stream.serve(req, respond));
                        tokio::spawn(async move {
                            let _open = open;
                            tokio::select! {
                                biased;
                                () = drain.forced() => {}
                                () = serve => {}
                            }
                        });
                    }
                    Some(Err(e)) => {
                        tracing::debug!(peer = %self.peer, error = %e, "HBONE connection error");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

fn kind_str(kind: RefusalKind) -> &'static str {
    kind.as_str()
}

/// One CONNECT stream.
struct Stream<H> {
    handler: Arc<H>,
    stats: Arc<ServerStats>,
    peer_id: SpiffeId,
    peer: SocketAddr,
}

impl<H: ConnectHandler> Stream<H> {
    async fn serve(self, req: Request<RecvStream>, respond: SendResponse<Bytes>) {
        let (parts, body) = req.into_parts();
        let refuse = |respond, kind: RefusalKind, refusal: Refusal| {
            tracing::info!(peer = %self.peer, src = %self.peer_id, kind = kind.as_str(), reason = %refusal.reason, "CONNECT refused");
            self.stats.record_own_refusal(RefusalRecord::new(
                kind,
                self.peer,
                Some(self.peer_id.clone()),
                None,
                refusal.reason.clone(),
            ));
            send_refusal(respond, &refusal);
        };
        if parts.method != Method::CONNECT {
            let reason = format!("method {} is not CONNECT", parts.method);
            return refuse(
                respond,
                RefusalKind::BadMethod,
                Refusal::new(StatusCode::METHOD_NOT_ALLOWED, reason),
            );
        }
        let target = match parse_authority(parts.uri.authority().map(|a| a.as_str())) {
            Ok(t) => t,
            Err(e) => {
                return refuse(
                    respond,
                    RefusalKind::BadAuthority,
                    Refusal::new(StatusCode::BAD_REQUEST, e.to_string()),
                );
            }
        };
        let connect = InboundConnect {
            peer: self.peer_id.clone(),
            peer_addr: self.peer,
            target,
            headers: parts.headers,
            respond: Some(respond),
            body: Some(body),
            stats: self.stats.clone(),
        };
        self.handler.handle(connect).await;
    }
}
