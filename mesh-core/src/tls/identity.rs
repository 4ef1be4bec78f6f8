//! Reads the SPIFFE identity out of an X.509 certificate's URI SAN.

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use crate::{SpiffeId, SpiffeIdError};

/// Why a certificate does not carry an acceptable identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate does not parse: {0}")]
    Malformed(String),
    #[error("certificate has no URI SAN")]
    MissingSan,
    #[error("certificate has {0} URI SANs; exactly one SPIFFE ID is required")]
    MultipleSans(usize),
    #[error("certificate URI SAN is not a SPIFFE ID: {0}")]
    BadSpiffeId(#[from] SpiffeIdError),
    #[error("peer {got} is in trust domain {}, expected {expected}", got.trust_domain())]
    WrongTrustDomain { expected: String, got: SpiffeId },
    #[error("peer identity {got} is not the expected {}", expected_list(expected))]
    UnexpectedIdentity {
        expected: Vec<SpiffeId>,
        got: SpiffeId,
    },
}

fn expected_list(ids: &[SpiffeId]) -> String {
    match ids {
        [one] => one.to_string(),
        many => {
            let names: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("one of [{}]", names.join(", "))
        }
    }
}

/// The one SPIFFE ID in the certificate's URI SANs.
pub fn identity_of_cert(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(IdentityError::MissingSan),
        [uri] => Ok(SpiffeId::parse(uri)?),
        many => Err(IdentityError::MultipleSans(many.len())),
    }
}
