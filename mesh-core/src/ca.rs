//! A certificate authority held in memory: a root that signs P-256 workload
//! certificates carrying one SPIFFE URI SAN.
//!
//! ztunnel's local CA mode and the test CA use it; istiod-lite's CA signs CSRs with
//! the same root handling. Only the root may be written to disk (key mode 0600).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::{CertError, CertificateSource, SpiffeId, WorkloadCertificate};

/// Default lifetime of a workload certificate.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// A signing root and the lifetime of what it signs.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
    ttl: Duration,
}

impl std::fmt::Debug for LocalCa {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn ca_err(what: &str, e: impl std::fmt::Display) -> CertError {
    CertError::Ca(format!("{what}: {e}"))
}

impl LocalCa {
    /// A new self-signed root, valid ten years, named `common_name`.
    pub fn generate(common_name: &str, ttl: Duration) -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(|e| ca_err("generate root key", e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Ambit");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let root = params
            .self_signed(&key)
            .map_err(|e| ca_err("self-sign root", e))?;
        Ok(Self {
            root_pem: root.pem(),
            root: root.der().clone(),
            issuer: Issuer::new(params, key),
            ttl,
        })
    }

    /// A root from PEM: its certificate and its PKCS#8 private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ttl: Duration) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| ca_err("root key", e))?;
        let root = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e: rustls_pki_types::pem::Error| ca_err("root certificate", e))?;
        let issuer =
            Issuer::from_ca_cert_der(&root, key).map_err(|e| ca_err("root certificate", e))?;
        Ok(Self {
            issuer,
            root,
            root_pem: cert_pem.to_string(),
            ttl,
        })
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root's private key as PKCS#8 PEM: only for writing the root to disk.
    pub fn root_key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A certificate for `id`, valid for the CA's TTL from now, backdated as
    /// [`validity_for`] says.
    pub fn issue_for(&self, id: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        let (not_before, not_after) = validity_for(self.ttl)?;
        let (key, chain) = self.sign(&[id.to_string()], not_before, not_after)?;
        WorkloadCertificate::new(key, chain, vec![self.root()])
    }

    /// Signs a leaf with exactly these URI SANs and validity: a fresh P-256 key,
    /// digital-signature use, server and client auth.
    pub fn sign(
        &self,
        uris: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<(PrivateKeyDer<'static>, Vec<CertificateDer<'static>>), CertError> {
        let key = KeyPair::generate().map_err(|e| ca_err("generate leaf key", e))?;
        let cert = self.sign_public_key(&key, uris, &[], not_before, not_after)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((key, vec![cert.der().clone()]))
    }

    /// Signs a leaf for a key held elsewhere (a CSR's public key) with exactly these
    /// URI and DNS SANs and validity: digital-signature use, server and client auth.
    /// [`LocalCa::sign`] goes through here too: one signing implementation.
    pub fn sign_public_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        uris: &[String],
        dns_names: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<rcgen::Certificate, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uris = uris.iter().map(|u| {
            u.clone()
                .try_into()
                .map(SanType::URI)
                .map_err(|e| ca_err("URI SAN", e))
        });
        let dns = dns_names.iter().map(|d| {
            d.clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| ca_err("DNS SAN", e))
        });
        params.subject_alt_names = uris.chain(dns).collect::<Result<_, _>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| ca_err("sign leaf", e))
    }
}

/// The validity of a leaf living `ttl` from now, backdated a little (a tenth of the
/// TTL, at most a minute) for peers whose clocks run behind.
pub fn validity_for(ttl: Duration) -> Result<(OffsetDateTime, OffsetDateTime), CertError> {
    let now = OffsetDateTime::now_utc();
    let life = time::Duration::try_from(ttl).map_err(|e| ca_err("ttl", e))?;
    let skew = time::Duration::try_from((ttl / 10).min(Duration::from_secs(60)))
        .map_err(|e| ca_err("ttl", e))?;
    Ok((now - skew, now + life))
}

impl CertificateSource for LocalCa {
    async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        self.issue_for(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_survives_pem_and_its_leaves_verify_as_identities() {
        let ca = LocalCa::generate("ambit-root", Duration::from_secs(3600)).unwrap();
        let again =
            LocalCa::from_pem(ca.root_pem(), &ca.root_key_pem(), Duration::from_secs(60)).unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "cart").unwrap();
        let cert = again.issue_for(&id).unwrap();
        assert_eq!(cert.identity(), &id);
        assert_eq!(cert.roots(), &[ca.root()]);
        let life = cert.not_after().duration_since(cert.not_before()).unwrap();
        assert_eq!(life, Duration::from_secs(60 + 6));
        assert!(format!("{again:?}").find("PRIVATE").is_none());
    }

    #[test]
    fn bad_pem_is_refused_with_what_was_wrong() {
        let err = LocalCa::from_pem("nope", "nope", DEFAULT_CERT_TTL).unwrap_err();
        assert!(err.to_string().contains("root key"), "{err}");
    }
}
