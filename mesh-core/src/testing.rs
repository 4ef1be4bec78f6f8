//! A test certificate authority (rcgen) so tests of any crate can mint identities.
//!
//! Behind the `testing` feature: production certificates come from istiod-lite's CA.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::{CertError, CertStore, CertificateSource, SpiffeId, WorkloadCertificate};

/// What a test wants in a leaf; the defaults make a valid 24 h workload certificate.
#[derive(Clone, Debug)]
pub struct LeafOptions {
    /// URI SANs; `None` means the identity's SPIFFE ID alone.
    pub uris: Option<Vec<String>>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafOptions {
    pub fn valid_for(ttl: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            uris: None,
            not_before: now - time::Duration::minutes(1),
            not_after: now + ttl,
        }
    }

    /// A certificate whose validity ended an hour ago.
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            uris: None,
            not_before: now - time::Duration::days(2),
            not_after: now - time::Duration::hours(1),
        }
    }
}

impl Default for LeafOptions {
    fn default() -> Self {
        Self::valid_for(Duration::from_secs(24 * 3600))
    }
}

/// A self-signed root that signs P-256 workload certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Ambit test CA");
        // Each test CA has its own name, as distinct real CAs would.
        let mut tag = [0u8; 8];
        let _ = crate::tls::provider().secure_random.fill(&mut tag);
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ambit-test-root-{tag}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
        let root = params.self_signed(&key).expect("self-sign CA");
        Self {
            root: root.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    /// A valid 24 h certificate for `id`.
    pub fn issue_cert(&self, id: &SpiffeId) -> WorkloadCertificate {
        let (key, chain) = self.issue_raw(id, &LeafOptions::default());
        WorkloadCertificate::new(key, chain, vec![self.root()]).expect("valid test certificate")
    }

    /// A leaf as raw DER, for tests that need certificates the store would refuse.
    pub fn issue_raw(
        &self,
        id: &SpiffeId,
        opts: &LeafOptions,
    ) -> (PrivateKeyDer<'static>, Vec<CertificateDer<'static>>) {
        let key = KeyPair::generate().expect("generate leaf key");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uris = opts.uris.clone().unwrap_or_else(|| vec![id.to_string()]);
        params.subject_alt_names = uris
            .into_iter()
            .map(|u| SanType::URI(u.try_into().expect("ASCII URI")))
            .collect();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = opts.not_before;
        params.not_after = opts.not_after;
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (key, vec![cert.der().clone()])
    }

    /// A store holding a valid certificate for each of `ids`.
    pub fn store_for(&self, ids: &[&SpiffeId]) -> Arc<CertStore> {
        let store = Arc::new(CertStore::new());
        for id in ids {
            store.insert(self.issue_cert(id));
        }
        store
    }
}

impl CertificateSource for TestCa {
    async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        Ok(self.issue_cert(identity))
    }
}

/// A SPIFFE ID in `cluster.local`, for brevity in tests.
pub fn spiffe(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(crate::DEFAULT_TRUST_DOMAIN, ns, sa).expect("valid test identity")
}
