//! The control plane's own serving TLS: TLS 1.3, ALPN `h2`, a certificate from the
//! mesh root with the control plane's SPIFFE ID and its Service DNS name, re-issued
//! at half its life by the resolver itself. No client certificate is asked for:
//! callers authenticate with a bearer token.

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use mesh_core::SpiffeId;
use mesh_core::tls::{ALPN_H2, provider};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

use super::root::{CaRoot, RootError};

/// The DNS name of the control plane's Service, for clients that dial it by name.
pub const SERVING_DNS_NAME: &str = "istiod-lite.istio-system.svc";

impl CaRoot {
    /// A server config for the xDS and CA endpoints, holding a certificate for
    /// `identity` (and [`SERVING_DNS_NAME`]) that renews itself.
    pub fn serving_config(
        self: &Arc<Self>,
        identity: &SpiffeId,
    ) -> Result<rustls::ServerConfig, RootError> {
        let resolver = ServingCert::new(
            self.clone(),
            identity.clone(),
            vec![SERVING_DNS_NAME.to_owned()],
        )?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| mesh_core::CertError::Ca(format!("TLS config: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }
}

/// The serving certificate, re-issued from the root at half its life.
pub struct ServingCert {
    root: Arc<CaRoot>,
    identity: SpiffeId,
    dns_names: Vec<String>,
    current: RwLock<Current>,
    /// Held while re-issuing, so concurrent handshakes renew once.
    renewing: Mutex<()>,
}

#[derive(Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    refresh_at: SystemTime,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("identity", &self.identity.to_string())
            .field("dns_names", &self.dns_names)
            .field("refresh_at", &self.read().refresh_at)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Issues the first certificate now.
    pub fn new(
        root: Arc<CaRoot>,
        identity: SpiffeId,
        dns_names: Vec<String>,
    ) -> Result<Self, RootError> {
        let current = issue(&root, &identity, &dns_names)?;
        Ok(Self {
            root,
            identity,
            dns_names,
            current: RwLock::new(current),
            renewing: Mutex::new(()),
        })
    }

    /// The certificate to present at `now`, re-issued first when due. A failed
    /// re-issue keeps the current certificate (logged) and is retried next time.
    pub fn certified_key_at(&self, now: SystemTime) -> Arc<CertifiedKey> {
        let current = self.read();
        if now < current.refresh_at {
            return current.key;
        }
        let Ok(_renewing) = self.renewing.try_lock() else {
            return current.key;
        };
        // Another handshake may have renewed while this one waited for the lock.
        let current = self.read();
        if now < current.refresh_at {
            return current.key;
        }
        match issue(&self.root, &self.identity, &self.dns_names) {
            Ok(fresh) => {
                tracing::info!(identity = %self.identity, "serving certificate renewed");
                let key = fresh.key.clone();
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
                key
            }
            Err(error) => {
                tracing::warn!(identity = %self.identity, %error, "serving certificate renewal failed; keeping the current one");
                current.key
            }
        }
    }

    fn read(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key_at(SystemTime::now()))
    }
}

fn issue(root: &CaRoot, identity: &SpiffeId, dns_names: &[String]) -> Result<Current, RootError> {
    let (key, cert) = root.sign_serving(identity, dns_names)?;
    let key = Zeroizing::new(key);
    let (not_before, not_after) = validity_of(&cert)?;
    // Loaded from a borrowed, wiped copy: the provider's load_private_key takes
    // the DER by value and drops it unwiped. The workspace provider is aws-lc-rs.
    let der = Zeroizing::new(key.serialize_der());
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(der.as_slice()),
    ))
    .map_err(mesh_core::CertError::Key)?;
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    Ok(Current {
        key: Arc::new(CertifiedKey::new(vec![cert], signing)),
        refresh_at: not_before + life / 2,
    })
}

fn validity_of(
    cert: &rustls_pki_types::CertificateDer<'_>,
) -> Result<(SystemTime, SystemTime), RootError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| mesh_core::CertError::Ca(format!("serving certificate: {e}")))?;
    let at = |t: x509_parser::time::ASN1Time| SystemTime::from(t.to_datetime());
    Ok((
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::root::CertTtl;

    fn serving() -> ServingCert {
        let root = Arc::new(CaRoot::generate("cluster.local", CertTtl::default()).unwrap());
        let id = SpiffeId::new("cluster.local", "istio-system", "istiod-lite").unwrap();
        ServingCert::new(root, id, vec![SERVING_DNS_NAME.to_owned()]).unwrap()
    }

    #[test]
    fn the_certificate_carries_the_identity_and_the_service_name() {
        let cert = serving().certified_key_at(SystemTime::now());
        let leaf = &cert.cert[0];
        assert_eq!(
            mesh_core::tls::identity_of_cert(leaf).unwrap().to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/istiod-lite"
        );
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert!(san.value.general_names.iter().any(|n| matches!(
            n,
            x509_parser::extensions::GeneralName::DNSName(SERVING_DNS_NAME)
        )));
    }

    #[test]
    fn renewed_at_half_life_and_kept_before() {
        let serving = serving();
        let now = SystemTime::now();
        let first = serving.certified_key_at(now);
        assert!(Arc::ptr_eq(
            &first,
            &serving.certified_key_at(now + Duration::from_secs(3600))
        ));
        let later = now + Duration::from_secs(13 * 3600);
        let renewed = serving.certified_key_at(later);
        assert_ne!(first.cert, renewed.cert);
        // The renewed certificate is current until its own half life.
        assert!(Arc::ptr_eq(&renewed, &serving.certified_key_at(now)));
    }
}
