//! What Ambit's data plane shares: SPIFFE identities, mutual TLS that verifies them,
//! HBONE tunnels (HTTP/2 CONNECT over mTLS) with a pooled client and a server, the
//! byte splice between two streams, the certificate store and the drain primitive.

pub mod accept;
pub mod admin;
pub mod backoff;
pub mod ca;
pub mod ca_client;
pub mod cert_manager;
pub mod cert_store;
pub mod control;
pub mod copy;
pub mod drain;
pub mod fd_limit;
pub mod hbone;
pub mod identity;
pub mod logging;
pub mod metrics;
#[cfg(target_os = "linux")]
pub mod os;
pub mod settings;
pub mod tls;
pub mod xds;

#[cfg(feature = "testing")]
pub mod testing;

pub use cert_store::{CertError, CertEvent, CertStore, CertificateSource, WorkloadCertificate};
pub use identity::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError};
