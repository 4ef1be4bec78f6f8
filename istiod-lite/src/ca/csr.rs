//! CSR verification at the CA's trust boundary: a PEM PKCS#10 request is parsed, its
//! self-signature checked with the workspace's crypto provider (aws-lc-rs, through
//! rustls), and its one SAN required to be a SPIFFE URI of the CA's trust domain.
//!
//! Nothing else in the request is honoured: the CA writes the certificate's
//! extensions itself, so only the public key and the verified identity leave here.

use mesh_core::tls::provider;
use mesh_core::{SpiffeId, SpiffeIdError};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::asn1_rs::{Any, FromDer as _};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};

/// A CSR larger than this is refused before parsing (a P-256 request is ~500 bytes).
pub const MAX_CSR_PEM_BYTES: usize = 16 * 1024;

/// Why a CSR is refused; the text goes back to the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is malformed: {0}")]
    Malformed(String),
    #[error("the CSR uses an unsupported key or signature algorithm")]
    UnsupportedAlgorithm,
    #[error("the CSR's signature does not verify with its own public key")]
    BadSignature,
    #[error("the CSR has no subject alternative name; exactly one SPIFFE URI is required")]
    NoSan,
    #[error("the CSR has {0} subject alternative names; exactly one SPIFFE URI is required")]
    MultipleSans(usize),
    #[error("the CSR's subject alternative name is a {0}, not a URI; a SPIFFE URI is required")]
    NotUri(&'static str),
    #[error("the CSR's URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(#[from] SpiffeIdError),
    #[error("the CSR asks for {got}, outside this CA's trust domain {expected}")]
    OtherTrustDomain { expected: String, got: SpiffeId },
}

impl CsrError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "csr_malformed",
            Self::UnsupportedAlgorithm => "csr_unsupported_algorithm",
            Self::BadSignature => "csr_bad_signature",
            Self::NoSan => "csr_no_san",
            Self::MultipleSans(_) => "csr_multiple_sans",
            Self::NotUri(_) => "csr_non_uri_san",
            Self::NotSpiffe(_) => "csr_not_spiffe",
            Self::OtherTrustDomain { .. } => "csr_other_trust_domain",
        }
    }
}

/// A CSR whose signature verified: the identity it asks for and its public key.
#[derive(Clone, Debug)]
pub struct VerifiedCsr {
    identity: SpiffeId,
    public_key: rcgen::SubjectPublicKeyInfo,
}

impl VerifiedCsr {
    /// The SPIFFE ID of the request's one URI SAN.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The requester's public key, to be certified.
    pub fn public_key(&self) -> &rcgen::SubjectPublicKeyInfo {
        &self.public_key
    }
}

/// Parses and verifies a PEM CSR for an identity of `trust_domain`.
pub fn verify_csr(pem: &str, trust_domain: &str) -> Result<VerifiedCsr, CsrError> {
    if pem.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::Malformed(format!(
            "{} bytes, over the limit of {MAX_CSR_PEM_BYTES}",
            pem.len()
        )));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::Malformed(format!("not a PEM CERTIFICATE REQUEST: {e}")))?;
    verify_csr_der(der.as_ref(), trust_domain)
}

/// [`verify_csr`] on DER bytes.
pub fn verify_csr_der(der: &[u8], trust_domain: &str) -> Result<VerifiedCsr, CsrError> {
    let malformed = |e: &dyn std::fmt::Display| CsrError::Malformed(e.to_string());
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| malformed(&e))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(
            "trailing bytes after the request".into(),
        ));
    }
    check_signature(der, &csr)?;
    let identity = requested_identity(&csr)?;
    if identity.trust_domain() != trust_domain {
        return Err(CsrError::OtherTrustDomain {
            expected: trust_domain.to_owned(),
            got: identity,
        });
    }
    let spki = csr.certification_request_info.subject_pki.raw;
    let public_key =
        rcgen::SubjectPublicKeyInfo::from_der(spki).map_err(|_| CsrError::UnsupportedAlgorithm)?;
    Ok(VerifiedCsr {
        identity,
        public_key,
    })
}

/// Verifies the request's self-signature: the algorithm pair (key, signature) is
/// looked up among the provider's verification algorithms by their DER identifiers.
fn check_signature(der: &[u8], csr: &X509CertificationRequest<'_>) -> Result<(), CsrError> {
    let info = &csr.certification_request_info;
    let key_alg = first_element(info.subject_pki.raw)?;
    let sig_alg = signature_algorithm_contents(der)?;
    let algorithm = provider()
        .signature_verification_algorithms
        .all
        .iter()
        .find(|a| {
            a.public_key_alg_id().as_ref() == key_alg && a.signature_alg_id().as_ref() == sig_alg
        })
        .copied()
        .ok_or(CsrError::UnsupportedAlgorithm)?;
    // A BIT STRING with unused bits cannot hold a key or a signature.
    if csr.signature_value.unused_bits != 0 || info.subject_pki.subject_public_key.unused_bits != 0
    {
        return Err(CsrError::Malformed(
            "key or signature is not whole bytes".into(),
        ));
    }
    algorithm
        .verify_signature(
            &info.subject_pki.subject_public_key.data,
            info.raw,
            &csr.signature_value.data,
        )
        .map_err(|_| CsrError::BadSignature)
}

/// The contents of the first element of a DER SEQUENCE (an AlgorithmIdentifier's
/// contents, as webpki names algorithms).
fn first_element(sequence: &[u8]) -> Result<&[u8], CsrError> {
    let (_, outer) = Any::from_der(sequence).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let (_, first) = Any::from_der(outer.data).map_err(|e| CsrError::Malformed(e.to_string()))?;
    Ok(first.data)
}

/// The contents of the request's signatureAlgorithm (its second element).
fn signature_algorithm_contents(der: &[u8]) -> Result<&[u8], CsrError> {
    let bad = |e: x509_parser::asn1_rs::Err<x509_parser::asn1_rs::Error>| {
        CsrError::Malformed(e.to_string())
    };
    let (_, outer) = Any::from_der(der).map_err(bad)?;
    let (rest, _info) = Any::from_der(outer.data).map_err(bad)?;
    let (_, alg) = Any::from_der(rest).map_err(bad)?;
    Ok(alg.data)
}

/// The SPIFFE ID of the request's one SAN, which must be a URI.
fn requested_identity(csr: &X509CertificationRequest<'_>) -> Result<SpiffeId, CsrError> {
    let mut names: Vec<&GeneralName<'_>> = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => names.extend(&san.general_names),
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::Malformed(format!("requested extension: {error}")));
            }
            _ => {}
        }
    }
    match names.as_slice() {
        [] => Err(CsrError::NoSan),
        [GeneralName::URI(uri)] => Ok(SpiffeId::parse(uri)?),
        [other] => Err(CsrError::NotUri(general_name_kind(other))),
        many => Err(CsrError::MultipleSans(many.len())),
    }
}

fn general_name_kind(name: &GeneralName<'_>) -> &'static str {
    match name {
        GeneralName::OtherName(..) => "other name",
        GeneralName::RFC822Name(_) => "email address",
        GeneralName::DNSName(_) => "DNS name",
        GeneralName::X400Address(_) => "X.400 address",
        GeneralName::DirectoryName(_) => "directory name",
        GeneralName::EDIPartyName(_) => "EDI party name",
        GeneralName::URI(_) => "URI",
        GeneralName::IPAddress(_) => "IP address",
        GeneralName::RegisteredID(_) => "registered ID",
        GeneralName::Invalid(..) => "invalid name",
    }
}

#[cfg(test)]
#[path = "csr_tests.rs"]
mod tests;
