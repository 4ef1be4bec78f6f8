//! Opening one HBONE connection (TCP, mTLS, HTTP/2) and one CONNECT on it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::client::{Connection, SendRequest};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{HboneConfig, PoolKey, REASON_HEADER, SourceMetadata, TRACEPARENT, TraceParent};
use crate::tls::{ALPN_H2, TlsError, client_config};
use crate::{CertStore, SpiffeId};

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TLS config for {source_id}: {error}")]
    Config {
        source_id: SpiffeId,
        error: TlsError,
    },
    #[error("TCP connect to {addr}: {error}")]
    Dial { addr: SocketAddr, error: io::Error },
    #[error("TLS handshake with {addr}: {}", crate::tls::describe_io_error(error))]
    Tls { addr: SocketAddr, error: io::Error },
    #[error("{addr} did not negotiate ALPN h2")]
    NoAlpn { addr: SocketAddr },
    #[error("{step} with {addr} timed out")]
    Timeout {
        step: &'static str,
        addr: SocketAddr,
    },
    #[error("HTTP/2 with {addr}: {error}")]
    Http2 { addr: SocketAddr, error: h2::Error },
    /// The CONNECT went out but no answer came within the connect timeout: the
    /// peer or the path to it is gone, or its own dial of the target hangs.
    #[error("no answer to the CONNECT from {addr} within {waited:?}")]
    Unanswered {
        addr: SocketAddr,
        waited: std::time::Duration,
        /// Whether early data went with it (then it is never sent again).
        early_data: bool,
    },
    /// The CONNECT and its early data were sent, then the stream failed without an
    /// answer: the server may have delivered the data, so it is not sent again.
    #[error("HTTP/2 with {addr} failed after the CONNECT and its early data were sent: {error}")]
    AfterEarlyData { addr: SocketAddr, error: h2::Error },
    #[error("CONNECT {target} refused by {addr}: {status} {reason}")]
    Refused {
        addr: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
        reason: String,
    },
    /// A connection that failed to open, for every tunnel that waited on it (and
    /// the one that opened it). Match on [`ConnectError::root`].
    #[error(transparent)]
    Shared(Arc<ConnectError>),
}

impl ConnectError {
    /// The error itself, seen through [`Self::Shared`]: what to match variants on.
    pub fn root(&self) -> &ConnectError {
        match self {
            Self::Shared(e) => e.root(),
            other => other,
        }
    }

    /// The rustls error behind a failed handshake, to tell why a peer was refused.
    pub fn tls_error(&self) -> Option<&rustls::Error> {
        match self {
            Self::Tls { error, .. } => error.get_ref()?.downcast_ref::<rustls::Error>(),
            Self::Shared(e) => e.tls_error(),
            _ => None,
        }
    }

    /// Whether trying again (on a fresh connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Http2 { error, .. } => {
                error.is_go_away()
                    || error.is_io()
                    || error.reason() == Some(h2::Reason::REFUSED_STREAM)
            }
            // Sent again only when the server provably processed none of it.
            Self::AfterEarlyData { .. } => self.is_drain_refusal(),
            Self::Dial { .. } | Self::Timeout { .. } => true,
            Self::Unanswered { early_data, .. } => !early_data,
            Self::Shared(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// Whether the server refused the tunnel because it is going away
    /// (REFUSED_STREAM, or its graceful GOAWAY): a connection opened now may reach
    /// the listener that replaces it, so even a fresh connection's refusal is
    /// worth one more try.
    pub fn is_drain_refusal(&self) -> bool {
        match self {
            Self::Http2 { error, .. } | Self::AfterEarlyData { error, .. } => {
                retry_after_early_data(error.is_go_away() && error.is_remote(), error.reason())
            }
            Self::Shared(e) => e.is_drain_refusal(),
            _ => false,
        }
    }
}

/// What one tunnel asks for.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The address the tunnel reaches (`:authority`).
    pub target: SocketAddr,
    /// Carried in `forwarded` and `baggage`.
    pub source: SourceMetadata,
    /// Carried in `traceparent`.
    pub trace: TraceParent,
    /// Bytes the caller already holds for the target (e.g. what a captured client
    /// sent before its connection was accepted): queued as a DATA frame right
    /// behind the CONNECT (usually written with it, flow control permitting)
    /// instead of a round trip later. The server
    /// decides on the CONNECT before it reads any of it; a refused CONNECT's early
    /// data is dropped unread. Empty: nothing is sent before the answer.
    pub early_data: Bytes,
}

impl ConnectRequest {
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            source: SourceMetadata::default(),
            trace: TraceParent::new_root(),
            early_data: Bytes::new(),
        }
    }
}

/// Whether a CONNECT whose early data was sent may be sent again, given how its
/// stream failed: only when the server provably processed none of it. REFUSED_STREAM
/// says so (RFC 9113, 8.7), and so does a graceful GOAWAY (NO_ERROR) from the
/// server: the streams it processes before closing complete, so one that fails
/// with it was above its last stream id. An I/O error or an error GOAWAY says
/// nothing: the data may have reached the destination, and is not sent twice (the
/// client's connection fails instead, as any connection a crash cuts).
fn retry_after_early_data(remote_go_away: bool, reason: Option<h2::Reason>) -> bool {
    match reason {
        Some(h2::Reason::REFUSED_STREAM) => true,
        Some(h2::Reason::NO_ERROR) => remote_go_away,
        _ => false,
    }
}

/// Makes the TCP connection under HBONE; ztunnel's dials from inside the source pod.
pub trait TcpDialer: Send + Sync + 'static {
    fn dial(&self, addr: SocketAddr) -> impl Future<Output = io::Result<TcpStream>> + Send;
}

/// Dials from the current network namespace.
#[derive(Clone, Copy, Debug, Default)]
pub struct DirectDialer;

impl TcpDialer for DirectDialer {
    async fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

pub(crate) type ClientConnection = Connection<TlsStream<TcpStream>, Bytes>;

/// TCP, then TLS as `key.source` expecting one of `key.destinations`, then HTTP/2.
pub(crate) async fn open_connection<D: TcpDialer>(
    store: &Arc<CertStore>,
    key: &PoolKey,
    config: &HboneConfig,
    dialer: &D,
) -> Result<(SendRequest<Bytes>, ClientConnection), ConnectError> {
    let addr = key.next_hop;
    let timeout = |step| ConnectError::Timeout { step, addr };
    let tls =
        client_config(store.clone(), &key.source, key.destinations.clone()).map_err(|error| {
            ConnectError::Config {
                source_id: key.source.clone(),
                error,
            }
        })?;
    let tcp = tokio::time::timeout(config.connect_timeout, dialer.dial(addr))
        .await
        .map_err(|_| timeout("TCP connect"))?
        .map_err(|error| ConnectError::Dial { addr, error })?;
    super::keep_alive(&tcp);
    let server_name = ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio::time::timeout(
        config.connect_timeout,
        TlsConnector::from(Arc::new(tls)).connect(server_name, tcp),
    )
    .await
    .map_err(|_| timeout("TLS handshake"))?
    .map_err(|error| ConnectError::Tls { addr, error })?;
    if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
        return Err(ConnectError::NoAlpn { addr });
    }
    tls.get_mut()
        .1
        .set_buffer_limit(Some(super::TLS_SEND_BUFFER));
    let handshake = h2::client::Builder::new()
        .initial_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        .max_frame_size(config.max_frame_size)
        .max_header_list_size(super::MAX_HEADER_LIST)
        .max_send_buffer_size(config.max_send_buffer)
        .enable_push(false)
        .handshake(tls);
    tokio::time::timeout(config.connect_timeout, handshake)
        .await
        .map_err(|_| timeout("HTTP/2 handshake"))?
        .map_err(|error| ConnectError::Http2 { addr, error })
}

/// Sends one CONNECT (and the request's early data behind it) and waits for the
/// answer; 2xx gives the stream halves.
pub(crate) async fn send_connect(
    send: &SendRequest<Bytes>,
    next_hop: SocketAddr,
    req: &ConnectRequest,
) -> Result<(h2::SendStream<Bytes>, RecvStream), ConnectError> {
    let h2_err = |error| ConnectError::Http2 {
        addr: next_hop,
        error,
    };
    let uri: Uri =
        super::format_authority(req.target)
            .parse()
            .map_err(|_| ConnectError::Refused {
                addr: next_hop,
                target: req.target,
                status: StatusCode::BAD_REQUEST,
                reason: "target does not form an authority".into(),
            })?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .body(())
        .map_err(|_| ConnectError::Refused {
            addr: next_hop,
            target: req.target,
            status: StatusCode::BAD_REQUEST,
            reason: "request does not build".into(),
        })?;
    req.source.write_headers(request.headers_mut());
    if let Ok(v) = HeaderValue::from_str(&req.trace.to_string()) {
        request.headers_mut().insert(TRACEPARENT, v);
    }
    let mut send = send.clone().ready().await.map_err(h2_err)?;
    let (response, mut stream) = send.send_request(request, false).map_err(h2_err)?;
    // Queued behind the HEADERS frame: the connection task writes both at once. It
    // fails when the stream already ended, e.g. the server refused the CONNECT at
    // once: then the answer says why.
    let early = if req.early_data.is_empty() {
        Ok(false)
    } else {
        stream
            .send_data(req.early_data.clone(), false)
            .map(|()| true)
    };
    let response = response.await.map_err(|error| {
        if early.as_ref().is_ok_and(|sent| *sent) {
            ConnectError::AfterEarlyData {
                addr: next_hop,
                error,
            }
        } else {
            h2_err(error)
        }
    })?;
    if response.status().is_success() {
        // An accepted tunnel that lost its first bytes must not carry the rest.
        early.map_err(h2_err)?;
    } else {
        let reason = response
            .headers()
            .get(REASON_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        return Err(ConnectError::Refused {
            addr: next_hop,
            target: req.target,
            status: response.status(),
            reason,
        });
    }
    Ok((stream, response.into_body()))
}

#[cfg(test)]
mod tests {
    use h2::Reason;

    use super::*;

    #[test]
    fn a_connect_whose_early_data_was_sent_is_retried_only_when_provably_unprocessed() {
        assert!(retry_after_early_data(false, Some(Reason::REFUSED_STREAM)));
        assert!(retry_after_early_data(true, Some(Reason::REFUSED_STREAM)));
        // A graceful GOAWAY from the server: the stream was above its last id.
        assert!(retry_after_early_data(true, Some(Reason::NO_ERROR)));
        // NO_ERROR without a GOAWAY from the server (e.g. a reset of our own).
        assert!(!retry_after_early_data(false, Some(Reason::NO_ERROR)));
        // An I/O error (no reason) or an error GOAWAY: maybe delivered.
        assert!(!retry_after_early_data(false, None));
        assert!(!retry_after_early_data(true, Some(Reason::INTERNAL_ERROR)));
        assert!(!retry_after_early_data(true, Some(Reason::PROTOCOL_ERROR)));
        assert!(!retry_after_early_data(false, Some(Reason::CANCEL)));
        // The error variants use it: a stream error with a reason goes through it.
        let addr: SocketAddr = "198.18.0.1:15008"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        assert!(
            ConnectError::AfterEarlyData {
                addr,
                error: h2::Error::from(Reason::REFUSED_STREAM)
            }
            .is_retryable()
        );
        assert!(
            !ConnectError::AfterEarlyData {
                addr,
                error: h2::Error::from(Reason::CANCEL)
            }
            .is_retryable()
        );
    }

    #[test]
    fn a_refusal_by_a_draining_server_is_told_apart() {
        let addr: SocketAddr = "198.18.0.1:15008"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let http2 = |reason| ConnectError::Http2 {
            addr,
            error: h2::Error::from(reason),
        };
        assert!(http2(Reason::REFUSED_STREAM).is_drain_refusal());
        assert!(!http2(Reason::CANCEL).is_drain_refusal());
        // A stream reset with NO_ERROR is not a GOAWAY.
        assert!(!http2(Reason::NO_ERROR).is_drain_refusal());
        assert!(
            !ConnectError::Timeout {
                step: "TCP connect",
                addr
            }
            .is_drain_refusal()
        );
    }
}
