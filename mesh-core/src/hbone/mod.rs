//! HBONE: TCP tunnelled in HTTP/2 CONNECT streams over mutual TLS.
//!
//! - [`HbonePool`] opens tunnels, multiplexing them over pooled connections.
//! - [`HboneServer`] accepts connections, validates each CONNECT and hands it to a
//!   [`ConnectHandler`] that answers 200 once it has its upstream.
//! - [`H2Stream`] is one tunnel as a byte stream.

mod authority;
mod client;
mod metadata;
mod pool;
mod server;
mod stream;

use std::time::Duration;

pub use authority::{AuthorityError, format_authority, parse_authority};
pub use client::{ConnectError, ConnectRequest, DirectDialer, TcpDialer};
/// Status codes a handler refuses with.
pub use http::StatusCode;
pub use metadata::{
    MetadataError, SourceMetadata, TraceParent, parse_baggage, parse_forwarded_for,
};
pub use pool::{HbonePool, PoolKey, PoolStats};
pub use server::{
    ConnectHandler, HboneServer, InboundConnect, Refusal, RefusalKind, RefusalObserver,
    RefusalRecord, ServerStats,
};
pub use stream::H2Stream;

/// The port HBONE listens on.
pub const HBONE_PORT: u16 = 15008;

/// Source address of the tunnelled connection (RFC 7239).
pub const FORWARDED: &str = "forwarded";
/// Source workload metadata (W3C baggage).
pub const BAGGAGE: &str = "baggage";
/// Trace context (W3C).
pub const TRACEPARENT: &str = "traceparent";
/// Why the server refused a CONNECT, beside its status code.
pub const REASON_HEADER: &str = "ambit-reason";

/// Plaintext rustls buffers per connection before writes wait (its default is 64
/// KiB): larger batches of records per `writev` (docs/benchmarks.md).
pub const TLS_SEND_BUFFER: usize = 256 * 1024;

/// Idle time before TCP keepalive probes a connection, the time between probes,
/// and how many go unanswered before the kernel drops it: an idle connection whose
/// peer vanished (node lost, path cut) is found dead in two minutes instead of
/// never, so its tunnels end and the pool dials anew.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(60), Duration::from_secs(15), 4);

/// Turns on TCP keepalive ([`KEEPALIVE`]) on a socket whose peer is on another
/// host: HBONE connections, and the connections ztunnel makes to or takes from
/// outside the mesh. On a listener it holds for every connection it accepts (Linux
/// copies it to them), at no cost per connection.
pub fn keep_alive<S: std::os::fd::AsFd>(socket: &S) {
    let (time, interval, retries) = KEEPALIVE;
    let ka = socket2::TcpKeepalive::new()
        .with_time(time)
        .with_interval(interval)
        .with_retries(retries);
    if let Err(error) = socket2::SockRef::from(socket).set_tcp_keepalive(&ka) {
        tracing::debug!(%error, "TCP keepalive");
    }
}

/// Largest header list (HPACK-decoded, as HTTP/2 counts it) either end accepts in
/// one HEADERS block. A CONNECT carries `:authority`, `forwarded`, `baggage` and
/// `traceparent`, an answer less; HEADERS frames are not flow-controlled, so without
/// this bound a peer could park h2's 16 MiB default on every stream. A server
/// answers a larger request with 431, a client resets a larger answer.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// Tuning shared by the HBONE client and server. A stream may have 2 MiB in flight,
/// a connection 8 MiB: a receiving ztunnel holds at most that much of what its
/// pod has not read yet (4 MiB per stream kept a stream's receiver above 20 MB
/// in the e2e benchmark, for no more throughput there; docs/benchmarks.md).
#[derive(Clone, Debug)]
pub struct HboneConfig {
    /// HTTP/2 stream flow-control window, bytes.
    pub stream_window: u32,
    /// HTTP/2 connection flow-control window, bytes.
    pub connection_window: u32,
    /// Largest HTTP/2 frame we accept, bytes.
    pub max_frame_size: u32,
    /// Bytes h2 buffers per stream before writes wait.
    pub max_send_buffer: usize,
    /// Client: tunnels per pooled connection before another connection opens.
    pub max_streams_per_connection: usize,
    /// Client: a pooled connection with no tunnel for this long is closed.
    pub pool_idle_timeout: Duration,
    /// Client: a pooled connection this old takes no new tunnel (nor once the
    /// certificate it presented is due for renewal, if that comes first); its
    /// tunnels carry on and it closes after the last one, so no connection
    /// outlives the certificates or roots it was made with for long.
    pub pool_max_connection_age: Duration,
    /// Client: TCP connect and the TLS and HTTP/2 handshakes, each bounded by
    /// this; the wait for a CONNECT's answer by [`Self::answer_timeout`]. ztunnel's
    /// inbound bounds its dial of the target by it too.
    pub connect_timeout: Duration,
    /// Server: concurrent tunnels allowed on one connection.
    pub server_max_streams: u32,
    /// Server: concurrent connections allowed on one listener.
    pub server_max_connections: usize,
    /// Server: TLS and HTTP/2 handshakes must finish within this.
    pub handshake_timeout: Duration,
    /// Server: a connection that has had no open tunnel for this long gets GOAWAY
    /// and closes, giving its accept slot back (`server_max_connections`). Longer
    /// than the client's `pool_idle_timeout`, so that a client normally closes
    /// its idle connections first.
    pub server_idle_timeout: Duration,
}

impl HboneConfig {
    /// Client: how long a CONNECT waits for its answer, half again
    /// `connect_timeout`: longer than the server's own dial of the target (which
    /// ztunnel bounds by `connect_timeout`), so a target that is slow to answer
    /// comes back as the server's 503, not as a silence that looks like a dead
    /// connection.
    pub fn answer_timeout(&self) -> Duration {
        self.connect_timeout + self.connect_timeout / 2
    }
}

impl Default for HboneConfig {
    fn default() -> Self {
        Self {
            stream_window: 2 * 1024 * 1024,
            connection_window: 8 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_send_buffer: 1024 * 1024,
            max_streams_per_connection: 100,
            pool_idle_timeout: Duration::from_secs(60),
            // The default certificate's refresh time: half its 24 h.
            pool_max_connection_age: Duration::from_secs(12 * 3600),
            connect_timeout: Duration::from_secs(10),
            server_max_streams: 1000,
            server_max_connections: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            server_idle_timeout: Duration::from_secs(300),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn assert_keepalive(sock: socket2::SockRef<'_>) {
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE.0);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE.1);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE.2);
    }

    #[tokio::test]
    async fn keep_alive_sets_the_probes_and_a_listener_passes_them_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        keep_alive(&listener);
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(!socket2::SockRef::from(&tcp).keepalive().unwrap());
        assert_keepalive(socket2::SockRef::from(&accepted));
        keep_alive(&tcp);
        assert_keepalive(socket2::SockRef::from(&tcp));
    }
}
