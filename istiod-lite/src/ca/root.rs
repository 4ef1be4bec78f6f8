//! The mesh root, its trust domain and the lifetimes it grants (the directory it
//! lives in is `root_dir`'s: `ca-key.pem` 0600, `ca-cert.pem` and the public
//! `root-cert.pem` 0644). Signing is mesh-core's [`LocalCa`]: one implementation
//! for the local and the remote CA.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::ca::{LocalCa, validity_for};
use mesh_core::{CertError, SpiffeId};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::csr::VerifiedCsr;

/// The root's certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The root's private key (PKCS#8), mode 0600.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The root certificate again, for clients to trust.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Default and maximum lifetime of the certificates the CA signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertTtl {
    /// Granted when a request asks for 0 (the CA's choice).
    pub default: Duration,
    /// No certificate lives longer, whatever the request asks.
    pub max: Duration,
}

impl Default for CertTtl {
    fn default() -> Self {
        Self {
            default: mesh_core::ca::DEFAULT_CERT_TTL,
            max: mesh_core::ca::DEFAULT_CERT_TTL,
        }
    }
}

impl CertTtl {
    /// The lifetime granted for a request of `requested` (zero: the default).
    pub fn grant(&self, requested: Duration) -> Duration {
        if requested.is_zero() {
            self.default
        } else {
            requested.min(self.max)
        }
    }
}

/// Why the root cannot be loaded, generated or used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{} has mode {mode:04o}: the CA key must not be accessible to group or others \
         (chmod 600, or defaultMode 0400 for a Kubernetes secret)",
        path.display()
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error(
        "{} exists but {} does not: restore the missing file, or remove both to generate a new root",
        present.display(), missing.display()
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    #[error("{} with {}: {source}", cert.display(), key.display())]
    Root {
        cert: PathBuf,
        key: PathBuf,
        source: Box<CertError>,
    },
    #[error("CA certificate lifetimes: {0}")]
    Ttl(String),
    #[error("trust domain {0:?}: {1}")]
    TrustDomain(String, mesh_core::SpiffeIdError),
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// The mesh's signing root, its trust domain and the lifetimes it grants.
pub struct CaRoot {
    ca: LocalCa,
    trust_domain: String,
    ttl: CertTtl,
}

impl std::fmt::Debug for CaRoot {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRoot")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .field("root_not_after", &self.ca.not_after())
            .finish_non_exhaustive()
    }
}

impl CaRoot {
    /// A new root held in memory only (tests, tools).
    pub fn generate(trust_domain: &str, ttl: CertTtl) -> Result<Self, RootError> {
        Self::check_settings(trust_domain, ttl)?;
        let ca = LocalCa::generate(&format!("Ambit mesh root ({trust_domain})"), ttl.default)?;
        Ok(Self {
            ca,
            trust_domain: trust_domain.to_owned(),
            ttl,
        })
    }

    pub(super) fn from_local_ca(ca: LocalCa, trust_domain: &str, ttl: CertTtl) -> Self {
        Self {
            ca,
            trust_domain: trust_domain.to_owned(),
            ttl,
        }
    }

    pub(super) fn local_ca(&self) -> &LocalCa {
        &self.ca
    }

    pub(super) fn check_settings(trust_domain: &str, ttl: CertTtl) -> Result<(), RootError> {
        SpiffeId::new(trust_domain, "ns", "sa")
            .map_err(|e| RootError::TrustDomain(trust_domain.to_owned(), e))?;
        if ttl.default.is_zero() || ttl.max.is_zero() {
            return Err(RootError::Ttl(
                "the default and maximum TTL must be above zero".into(),
            ));
        }
        if ttl.default > ttl.max {
            return Err(RootError::Ttl(format!(
                "the default TTL ({:?}) is above the maximum ({:?})",
                ttl.default, ttl.max
            )));
        }
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn ttl(&self) -> CertTtl {
        self.ttl
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.ca.root()
    }

    pub fn root_pem(&self) -> &str {
        self.ca.root_pem()
    }

    /// When the root expires: no certificate it signs outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.ca.not_after()
    }

    /// Signs the CSR's key for its verified identity, valid `ttl` (already granted
    /// by [`CertTtl::grant`]) and never past the root. Returns the PEM chain, leaf
    /// first and root last.
    pub fn sign(&self, csr: &VerifiedCsr, ttl: Duration) -> Result<Vec<String>, RootError> {
        let (not_before, not_after) = validity_for(ttl);
        let leaf = self.ca.sign_public_key(
            csr.public_key(),
            &[csr.identity().to_string()],
            &[],
            not_before,
            not_after,
        )?;
        Ok(vec![leaf.pem(), self.root_pem().to_owned()])
    }

    /// A leaf with a fresh key for the control plane's own serving certificate.
    pub(super) fn sign_serving(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
    ) -> Result<(rcgen::KeyPair, CertificateDer<'static>), RootError> {
        let key =
            rcgen::KeyPair::generate().map_err(|e| CertError::Ca(format!("generate key: {e}")))?;
        let (not_before, not_after) = validity_for(self.ttl.default);
        let cert = self.ca.sign_public_key(
            &key,
            &[identity.to_string()],
            dns_names,
            not_before,
            not_after,
        )?;
        Ok((key, cert.der().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_ttl_is_signed_up_to_the_root_end() {
        let ttl = CertTtl {
            default: mesh_core::ca::DEFAULT_CERT_TTL,
            max: Duration::MAX,
        };
        let root = CaRoot::generate("cluster.local", ttl).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/cart".try_into().unwrap(),
        )];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let csr = super::super::csr::verify_csr(&pem, "cluster.local").unwrap();
        let granted = ttl.grant(Duration::from_secs(i64::MAX as u64));
        let chain = root.sign(&csr, granted).unwrap();
        let leaf: CertificateDer<'_> =
            rustls_pki_types::pem::PemObject::from_pem_slice(chain[0].as_bytes()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        assert_eq!(parsed.validity().not_after.to_datetime(), root.not_after());
    }

    #[test]
    fn ttl_settings_are_checked_and_granted() {
        let hour = Duration::from_secs(3600);
        let ttl = CertTtl {
            default: hour,
            max: 2 * hour,
        };
        assert_eq!(ttl.grant(Duration::ZERO), hour);
        assert_eq!(ttl.grant(Duration::from_secs(60)), Duration::from_secs(60));
        assert_eq!(ttl.grant(10 * hour), 2 * hour);
        let bad = CertTtl {
            default: 3 * hour,
            max: hour,
        };
        let err = CaRoot::generate("cluster.local", bad).unwrap_err();
        assert!(err.to_string().contains("above the maximum"), "{err}");
        let err = CaRoot::generate("Bad:TD", CertTtl::default()).unwrap_err();
        assert!(matches!(err, RootError::TrustDomain(..)), "{err}");
    }
}
