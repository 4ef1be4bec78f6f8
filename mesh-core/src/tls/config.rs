//! Builds the rustls client and server configs of one mesh identity.
//!
//! The certificate is resolved from the [`CertStore`] at each handshake, so rotation
//! needs no new config; the roots are read when the config is built.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use super::{ALPN_H2, SpiffeClientVerifier, SpiffeServerVerifier, TlsError, provider};
use crate::{CertStore, SpiffeId};

/// The server config of `identity`: requires a client certificate of the same trust
/// domain verified to the identity's roots.
pub fn server_config(store: Arc<CertStore>, identity: &SpiffeId) -> Result<ServerConfig, TlsError> {
    let roots = roots_of(&store, identity)?;
    server_config_with_roots(store, identity, roots)
}

/// As [`server_config`], with the mesh roots given rather than read from the
/// identity's certificate, so the config can be built before the certificate
/// arrives: until it does, handshakes fail and are retried by the peer.
pub fn server_config_with_roots(
    store: Arc<CertStore>,
    identity: &SpiffeId,
    roots: Arc<RootCertStore>,
) -> Result<ServerConfig, TlsError> {
    let verifier = SpiffeClientVerifier::new(roots, identity.trust_domain(), provider())?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(StoreResolver {
            store,
            identity: identity.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Resumption would skip the client certificate: every connection shows it anew.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The client config of `source` towards a server expected to be one of `expected`.
pub fn client_config(
    store: Arc<CertStore>,
    source: &SpiffeId,
    expected: Vec<SpiffeId>,
) -> Result<ClientConfig, TlsError> {
    let roots = roots_of(&store, source)?;
    let verifier = SpiffeServerVerifier::new(roots, expected, provider());
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(StoreResolver {
            store,
            identity: source.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    Ok(config)
}

/// A root store of `roots`; an error when there is none.
pub fn root_store(
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).map_err(TlsError::BadRoot)?;
    }
    if store.is_empty() {
        return Err(TlsError::NoRootsGiven);
    }
    Ok(Arc::new(store))
}

fn roots_of(store: &CertStore, identity: &SpiffeId) -> Result<Arc<RootCertStore>, TlsError> {
    let cert = store
        .get(identity)
        .ok_or_else(|| TlsError::NoCertificate(identity.clone()))?;
    let mut roots = RootCertStore::empty();
    for root in cert.roots() {
        roots.add(root.clone()).map_err(TlsError::BadRoot)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots(identity.clone()));
    }
    Ok(Arc::new(roots))
}

/// Hands rustls the current certificate of one identity, on both sides.
#[derive(Debug)]
struct StoreResolver {
    store: Arc<CertStore>,
    identity: SpiffeId,
}

impl StoreResolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let cert = self.store.get(&self.identity);
        if cert.is_none() {
            tracing::warn!(identity = %self.identity, "no certificate to present");
        }
        cert.map(|c| c.certified_key())
    }
}

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::{TestCa, spiffe};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection};

    /// Runs a handshake between two in-memory connections.
    fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) {
        let mut wire = Vec::new();
        for _ in 0..10 {
            wire.clear();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                return;
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn mesh_peers_agree_on_tls13_with_aes_128_gcm() {
        let ca = TestCa::new();
        let (client_id, server_id) = (spiffe("a", "client"), spiffe("b", "server"));
        let store = ca.store_for(&[&client_id, &server_id]);
        let client = client_config(store.clone(), &client_id, vec![server_id.clone()]).unwrap();
        let server = server_config(store, &server_id).unwrap();
        let name = ServerName::try_from("198.18.0.1").unwrap();
        let mut client = ClientConnection::new(Arc::new(client), name).unwrap();
        let mut server = ServerConnection::new(Arc::new(server)).unwrap();
        handshake(&mut client, &mut server);
        for suite in [
            client.negotiated_cipher_suite(),
            server.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
    }
}
