//! SPIFFE identities of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
//!
//! Parsing sits at a trust boundary (certificate SANs, CSRs, config), so every
//! malformed form gets its own error and nothing is guessed or normalised.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
/// SPIFFE caps a SPIFFE ID at 2048 bytes and a trust domain at 255.
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The default trust domain, as in Istio.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity: trust domain, Kubernetes namespace and service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a mesh SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {0} bytes long, over the limit of 2048")]
    TooLong(usize),
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    MissingScheme,
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    #[error("trust domain is {0} bytes long, over the limit of 255")]
    TrustDomainTooLong(usize),
    #[error(
        "trust domain holds {0:?}: only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    InvalidTrustDomainChar(char),
    #[error("SPIFFE ID has no path: expected /ns/<namespace>/sa/<service-account>")]
    MissingPath,
    #[error("SPIFFE ID path {0:?} is not /ns/<namespace>/sa/<service-account>")]
    WrongPathShape(String),
    #[error("SPIFFE ID has an empty {0} segment")]
    EmptySegment(&'static str),
    #[error("SPIFFE ID {segment} segment {value:?} is a relative path segment")]
    DotSegment {
        segment: &'static str,
        value: String,
    },
    #[error(
        "SPIFFE ID {segment} segment holds {found:?}: only letters, digits, '.', '-' and '_' are allowed"
    )]
    InvalidSegmentChar { segment: &'static str, found: char },
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each as `parse` would.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let id = Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        validate_trust_domain(&id.trust_domain)?;
        validate_segment("namespace", &id.namespace)?;
        validate_segment("service account", &id.service_account)?;
        let len = id.to_string().len();
        if len > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(len));
        }
        Ok(id)
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::MissingScheme)?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain)?;
        if path.is_empty() {
            return Err(SpiffeIdError::MissingPath);
        }
        let mut parts = path[1..].split('/');
        let shape = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        );
        let (namespace, service_account) = match shape {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => (ns, sa),
            _ => return Err(SpiffeIdError::WrongPathShape(path.to_string())),
        };
        validate_segment("namespace", namespace)?;
        validate_segment("service account", service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    // Ports, user info, upper case and percent-encoding are all refused here.
    match td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(SpiffeIdError::InvalidTrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_segment(segment: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    if value.is_empty() {
        return Err(SpiffeIdError::EmptySegment(segment));
    }
    if value == "." || value == ".." {
        return Err(SpiffeIdError::DotSegment {
            segment,
            value: value.to_string(),
        });
    }
    match value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        Some(found) => Err(SpiffeIdError::InvalidSegmentChar { segment, found }),
        None => Ok(()),
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn valid_forms() {
        let cases = [
            (
                "spiffe://cluster.local/ns/default/sa/default",
                "cluster.local",
                "default",
                "default",
            ),
            ("spiffe://td/ns/shop/sa/cart-v2", "td", "shop", "cart-v2"),
            (
                "spiffe://a_b-c.d/ns/N_s.1/sa/A.b_c",
                "a_b-c.d",
                "N_s.1",
                "A.b_c",
            ),
        ];
        for (s, td, ns, sa) in cases {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(
                (id.trust_domain(), id.namespace(), id.service_account()),
                (td, ns, sa)
            );
            assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn every_malformed_form_has_its_own_error() {
        use SpiffeIdError::*;
        let long_td = format!("spiffe://{}/ns/a/sa/b", "a".repeat(256));
        let long_id = format!("spiffe://td/ns/a/sa/{}", "b".repeat(2100));
        let cases: Vec<(&str, SpiffeIdError)> = vec![
            ("", Empty),
            (&long_id, TooLong(long_id.len())),
            ("http://td/ns/a/sa/b", MissingScheme),
            ("SPIFFE://td/ns/a/sa/b", MissingScheme),
            ("spiffe:/td/ns/a/sa/b", MissingScheme),
            ("spiffe:///ns/a/sa/b", EmptyTrustDomain),
            (&long_td, TrustDomainTooLong(256)),
            ("spiffe://TD/ns/a/sa/b", InvalidTrustDomainChar('T')),
            ("spiffe://td:443/ns/a/sa/b", InvalidTrustDomainChar(':')),
            ("spiffe://user@td/ns/a/sa/b", InvalidTrustDomainChar('@')),
            ("spiffe://td", MissingPath),
            ("spiffe://td/", WrongPathShape("/".into())),
            ("spiffe://td/ns/a", WrongPathShape("/ns/a".into())),
            ("spiffe://td/ns/a/sa", WrongPathShape("/ns/a/sa".into())),
            ("spiffe://td/sa/b/ns/a", WrongPathShape("/sa/b/ns/a".into())),
            (
                "spiffe://td/ns/a/sa/b/",
                WrongPathShape("/ns/a/sa/b/".into()),
            ),
            (
                "spiffe://td/ns/a/sa/b/extra",
                WrongPathShape("/ns/a/sa/b/extra".into()),
            ),
            ("spiffe://td/ns//sa/b", EmptySegment("namespace")),
            ("spiffe://td/ns/a/sa/", EmptySegment("service account")),
            (
                "spiffe://td/ns/../sa/b",
                DotSegment {
                    segment: "namespace",
                    value: "..".into(),
                },
            ),
            (
                "spiffe://td/ns/a/sa/.",
                DotSegment {
                    segment: "service account",
                    value: ".".into(),
                },
            ),
            (
                "spiffe://td/ns/a%20/sa/b",
                InvalidSegmentChar {
                    segment: "namespace",
                    found: '%',
                },
            ),
            (
                "spiffe://td/ns/a/sa/b?x=1",
                InvalidSegmentChar {
                    segment: "service account",
                    found: '?',
                },
            ),
            (
                "spiffe://td/ns/a/sa/b#frag",
                InvalidSegmentChar {
                    segment: "service account",
                    found: '#',
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn new_validates_its_parts() {
        assert!(SpiffeId::new("cluster.local", "ns", "sa").is_ok());
        assert_eq!(
            SpiffeId::new("cluster.local", "a/b", "sa"),
            Err(SpiffeIdError::InvalidSegmentChar {
                segment: "namespace",
                found: '/'
            })
        );
        assert_eq!(
            SpiffeId::new("", "a", "b"),
            Err(SpiffeIdError::EmptyTrustDomain)
        );
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,40}"
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(
            td in "[a-z0-9._-]{1,60}",
            ns in segment(),
            sa in segment(),
        ) {
            let id = SpiffeId::new(td, ns, sa).unwrap();
            prop_assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        }

        #[test]
        fn arbitrary_input_never_panics_and_valid_output_reformats(s in "\\PC{0,80}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn a_forbidden_char_anywhere_in_a_segment_is_refused(
            ns in segment(),
            bad in "[/?#%@: ]",
            pos in 0usize..40,
        ) {
            let mut chars: Vec<char> = ns.chars().collect();
            let at = pos.min(chars.len());
            chars.insert(at, bad.chars().next().unwrap());
            let ns: String = chars.into_iter().collect();
            let s = format!("spiffe://td/ns/{ns}/sa/x");
            prop_assert!(SpiffeId::parse(&s).is_err());
        }
    }
}
