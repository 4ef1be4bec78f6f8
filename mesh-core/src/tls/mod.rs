//! Mutual TLS for the mesh: TLS 1.3 only, ALPN `h2`, client certificates required,
//! and peers verified down to their SPIFFE URI SAN.
//!
//! One crypto provider (aws-lc-rs) serves the whole workspace; every config is built
//! with [`provider`] explicitly, never with a process-wide default.

mod config;
mod identity;
mod verifier;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use config::{client_config, root_store, server_config, server_config_with_roots};
pub use identity::{IdentityError, identity_of_cert};
pub use verifier::{SpiffeClientVerifier, SpiffeServerVerifier};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// The workspace's crypto provider: aws-lc-rs limited to TLS 1.3 cipher suites,
/// AES-128-GCM first (as BoringSSL and Go order them): 10 AES rounds instead of 14,
/// a quarter less CPU per byte for the bulk of every tunnel (docs/benchmarks.md),
/// with a 128-bit security level. AES-256-GCM and ChaCha20-Poly1305 stay accepted.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            p.cipher_suites = TLS13_SUITES.to_vec();
            Arc::new(p)
        })
        .clone()
}

/// The TLS 1.3 suites offered and accepted, in order of preference.
const TLS13_SUITES: [rustls::SupportedCipherSuite; 3] = [
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// Why a TLS config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate for identity {0}")]
    NoCertificate(crate::SpiffeId),
    #[error("no trusted root certificates for identity {0}")]
    NoRoots(crate::SpiffeId),
    #[error("no trusted root certificates given")]
    NoRootsGiven,
    #[error("root certificate rejected: {0}")]
    BadRoot(rustls::Error),
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Wraps an identity failure as the rustls error a verifier returns, keeping its text.
pub(crate) fn refuse(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

/// The identity error inside a rustls error, if that is what refused the peer.
pub fn identity_error_of(e: &rustls::Error) -> Option<&IdentityError> {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<IdentityError>()
        }
        _ => None,
    }
}

/// A failed TLS handshake in words. rustls prints a refused identity with `Debug`, so
/// identity failures are spelled out here.
pub fn describe_io_error(e: &std::io::Error) -> String {
    let identity = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .and_then(identity_error_of);
    match identity {
        Some(id) => format!("invalid peer certificate: {id}"),
        None => e.to_string(),
    }
}
