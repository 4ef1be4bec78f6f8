//! What an HBONE server counts, and a bounded record of its last refusals: the raw
//! material of metrics and of the admin "why" view.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use crate::SpiffeId;

/// How many refusals the server remembers.
pub const RECENT_REFUSALS: usize = 64;

/// Why a connection or a CONNECT was refused, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The bytes were not a TLS handshake (e.g. plaintext).
    NotTls,
    /// The client cannot speak TLS 1.3.
    TlsVersion,
    /// The client's chain does not verify to the mesh roots.
    UnknownIssuer,
    /// The client's certificate has expired (or is not valid yet).
    Expired,
    /// The client's certificate identity is wrong (missing SAN, other trust domain).
    BadIdentity,
    /// The client sent no certificate.
    NoClientCert,
    /// The client gave up on the handshake (e.g. it refused our identity).
    PeerAborted,
    /// Any other TLS failure.
    Tls,
    HandshakeTimeout,
    NoAlpn,
    Http2,
    BadMethod,
    BadAuthority,
    /// The handler refused: policy.
    Denied,
    /// The handler refused: the target is not served here.
    Unknown,
    /// The handler could not reach the upstream.
    Unavailable,
    /// The server is draining and takes no new tunnels.
    Draining,
}

impl RefusalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::TlsVersion => "tls_version",
            Self::UnknownIssuer => "unknown_issuer",
            Self::Expired => "expired_certificate",
            Self::BadIdentity => "bad_identity",
            Self::NoClientCert => "no_client_certificate",
            Self::PeerAborted => "peer_aborted",
            Self::Tls => "tls",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::NoAlpn => "no_alpn",
            Self::Http2 => "http2",
            Self::BadMethod => "bad_method",
            Self::BadAuthority => "bad_authority",
            Self::Denied => "denied",
            Self::Unknown => "unknown_target",
            Self::Unavailable => "unavailable",
            Self::Draining => "draining",
        }
    }

    /// Classifies a failed TLS accept by the rustls error inside it.
    pub fn of_tls_io_error(e: &std::io::Error) -> Self {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return Self::Tls;
        };
        use rustls::{CertificateError as C, Error as E};
        match tls {
            E::InvalidMessage(_) => Self::NotTls,
            E::PeerIncompatible(_) => Self::TlsVersion,
            E::NoCertificatesPresented => Self::NoClientCert,
            E::AlertReceived(_) => Self::PeerAborted,
            E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => Self::UnknownIssuer,
            E::InvalidCertificate(
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. },
            ) => Self::Expired,
            E::InvalidCertificate(C::Other(_)) if crate::tls::identity_error_of(tls).is_some() => {
                Self::BadIdentity
            }
            _ => Self::Tls,
        }
    }
}

/// One refusal, as the admin view shows it.
#[derive(Clone, Debug)]
pub struct RefusalRecord {
    pub kind: RefusalKind,
    pub peer_addr: SocketAddr,
    pub peer_identity: Option<SpiffeId>,
    pub target: Option<SocketAddr>,
    pub reason: String,
    pub at: SystemTime,
    /// The handler refused ([`super::InboundConnect::refuse`]), and has its own
    /// record of it; else the server decided (including a CONNECT its handler
    /// dropped unanswered, which the handler never saw through).
    pub by_handler: bool,
}

impl RefusalRecord {
    pub fn new(
        kind: RefusalKind,
        peer_addr: SocketAddr,
        peer_identity: Option<SpiffeId>,
        target: Option<SocketAddr>,
        reason: String,
    ) -> Self {
        Self {
            kind,
            peer_addr,
            peer_identity,
            target,
            reason,
            at: SystemTime::now(),
            by_handler: false,
        }
    }
}

/// Told of each refusal the server decides itself, by kind: a failed handshake,
/// a malformed CONNECT, a stream refused while draining, a CONNECT its handler
/// dropped unanswered. The handler's own refusals ([`super::InboundConnect::refuse`])
/// are not passed on: the handler counts those with its own reasons.
pub type RefusalObserver = Box<dyn Fn(RefusalKind) + Send + Sync>;

/// Counters of one server.
#[derive(Debug, Default)]
pub struct ServerStats {
    handshakes: AtomicU64,
    tunnels: AtomicU64,
    refusals: AtomicU64,
    recent: Mutex<VecDeque<RefusalRecord>>,
    observer: OnceLock<Observer>,
}

struct Observer(RefusalObserver);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefusalObserver")
    }
}

impl ServerStats {
    /// Completed mTLS handshakes (= accepted connections).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Tunnels answered 200.
    pub fn tunnels(&self) -> u64 {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// Connections and CONNECTs refused.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// The last refusals, oldest first.
    pub fn recent_refusals(&self) -> Vec<RefusalRecord> {
        self.lock().iter().cloned().collect()
    }

    /// Sets the observer of the server's own refusals (e.g. a metric); set it
    /// before the server runs, or refusals before it are not seen. Only the
    /// first call sets one; it returns false for later ones.
    pub fn on_refusal(&self, observer: RefusalObserver) -> bool {
        self.observer.set(Observer(observer)).is_ok()
    }

    pub(crate) fn record_handshake(&self) {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_tunnel(&self) {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a refusal the server decided itself, and tells the observer.
    pub(crate) fn record_own_refusal(&self, mut record: RefusalRecord) {
        if let Some(Observer(observe)) = self.observer.get() {
            observe(record.kind);
        }
        record.by_handler = false;
        self.push_refusal(record);
    }

    /// Records a refusal its handler decided.
    pub(crate) fn record_refusal(&self, mut record: RefusalRecord) {
        record.by_handler = true;
        self.push_refusal(record);
    }

    fn push_refusal(&self, record: RefusalRecord) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        let mut recent = self.lock();
        if recent.len() == RECENT_REFUSALS {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<RefusalRecord>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }
}
