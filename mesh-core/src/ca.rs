//! A certificate authority held in memory: a root that signs P-256 workload
//! certificates carrying one SPIFFE URI SAN.
//!
//! ztunnel's local CA mode and the test CA use it; istiod-lite's CA signs CSRs with
//! the same root handling. Only the root may be written to disk (key mode 0600).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::{CertError, CertificateSource, SpiffeId, WorkloadCertificate};

/// Default lifetime of a workload certificate.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// A signing root and the lifetime of what it signs.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
    /// The root's own end of validity: nothing it signs outlives it.
    not_after: OffsetDateTime,
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
        params.serial_number = Some(random_serial()?);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let root = params
            .self_signed(&key)
            .map_err(|e| ca_err("self-sign root", e))?;
        // As encoded (whole seconds), so leaves clamped to it end exactly with it.
        let not_after = validity_of(root.der())?.1;
        Ok(Self {
            root_pem: root.pem(),
            root: root.der().clone(),
            not_after,
            issuer: Issuer::new(params, key),
            ttl,
        })
    }

    /// A root from PEM: its certificate and its PKCS#8 private key. Refuses a key
    /// that is not the certificate's, a certificate that is not a CA, and one that
    /// has expired: what ztunnel's `--ca-cert/--ca-key` and istiod-lite's CA
    /// directory both load.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ttl: Duration) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| ca_err("root key: not a PKCS#8 private key", e))?;
        let root = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e: rustls_pki_types::pem::Error| ca_err("root certificate", e))?;
        let not_after = check_root(&root, &key)?;
        let issuer =
            Issuer::from_ca_cert_der(&root, key).map_err(|e| ca_err("root certificate", e))?;
        // What is handed out is the certificate alone, encoded anew: never the
        // file's other blocks (a private key kept in the same file included).
        let root_pem = pem::encode_config(
            &pem::Pem::new("CERTIFICATE", root.to_vec()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        let ca = Self {
            issuer,
            root,
            root_pem,
            not_after,
            ttl,
        };
        ca.check_signs_verifiable_leaves()?;
        Ok(ca)
    }

    /// Signs a throwaway leaf and verifies it against the root, as a peer would.
    /// A root that loads but cannot issue a certificate its own roots accept
    /// (rcgen keeps one value per attribute type of the issuer's name, so a
    /// subject with two `OU`s or `DC`s becomes another name in every leaf; a key
    /// usage without keyCertSign) would otherwise break every connection of the
    /// mesh with "unknown issuer", long after a start that looked fine.
    fn check_signs_verifiable_leaves(&self) -> Result<(), CertError> {
        let now = OffsetDateTime::now_utc();
        let probe = "spiffe://root.check/ns/root-check/sa/root-check".to_string();
        let (_, chain) = self.sign(
            &[probe],
            now - time::Duration::minutes(1),
            now + time::Duration::minutes(5),
        )?;
        let leaf = rustls::server::ParsedCertificate::try_from(&chain[0])
            .map_err(|e| ca_err("root check: leaf", e))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.root.clone())
            .map_err(|e| ca_err("root certificate: not usable as a trust anchor", e))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &roots,
            &[],
            rustls_pki_types::UnixTime::now(),
            crate::tls::provider().signature_verification_algorithms.all,
        )
        .map_err(|e| {
            CertError::Ca(format!(
                "root certificate: a certificate it signs does not verify against it ({e}); \
                 a subject that repeats an attribute (two OU or DC values) is not supported"
            ))
        })
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root's private key as PKCS#8 PEM: only for writing the root to disk.
    /// Wiped when dropped.
    pub fn root_key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// When the root expires; every leaf it signs ends by then.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// A certificate for `id`, valid for the CA's TTL from now, backdated as
    /// [`validity_for`] says.
    pub fn issue_for(&self, id: &SpiffeId) -> Result<WorkloadCertificate, CertError> {
        let (not_before, not_after) = validity_for(self.ttl);
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
        // Wiped when dropped; the caller's copy is the DER returned.
        let key = Zeroizing::new(KeyPair::generate().map_err(|e| ca_err("generate leaf key", e))?);
        let cert = self.sign_public_key(&*key, uris, &[], not_before, not_after)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((key, vec![cert.der().clone()]))
    }

    /// Signs a leaf for a key held elsewhere (a CSR's public key) with exactly these
    /// URI and DNS SANs and validity (cut at the root's own end): digital-signature
    /// use, server and client auth, a random serial. [`LocalCa::sign`] goes through
    /// here too: one signing implementation.
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
        // Random, not rcgen's default (a hash of the public key): one key certified
        // twice (a renewal reusing its key, two identities) must still get two
        // serials, as issuer and serial name one certificate (RFC 5280 4.1.2.2).
        params.serial_number = Some(random_serial()?);
        let not_after = not_after.min(self.not_after);
        if not_after <= not_before {
            return Err(CertError::Ca(format!(
                "the root expired at {}: it can sign nothing more",
                self.not_after
            )));
        }
        params.not_before = not_before;
        params.not_after = not_after;
        params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| ca_err("sign leaf", e))
    }
}

/// The validity of a leaf living `ttl` from now, backdated a little (a tenth of the
/// TTL, at most a minute) for peers whose clocks run behind. A TTL past what a date
/// can hold ends at the last date; signing cuts it at the root's end anyway.
pub fn validity_for(ttl: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    let life = time::Duration::try_from(ttl).unwrap_or(time::Duration::MAX);
    let skew = time::Duration::try_from((ttl / 10).min(Duration::from_secs(60)))
        .unwrap_or(time::Duration::ZERO);
    let last = time::PrimitiveDateTime::MAX.assume_utc();
    (now - skew, now.checked_add(life).unwrap_or(last))
}

/// A serial of 16 random bytes, positive and always 16 bytes long (top bits 01):
/// 126 bits of randomness from the TLS provider's generator.
fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    crate::tls::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CertError::Ca("serial number: no randomness available".into()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Checks that `cert` is a CA certificate, still valid, and that `key` is its
/// key; returns when it expires.
fn check_root(cert: &CertificateDer<'_>, key: &KeyPair) -> Result<OffsetDateTime, CertError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| ca_err("root certificate", e))?;
    if !parsed.is_ca() {
        return Err(CertError::Ca(
            "root certificate: not a CA certificate (no basicConstraints CA:true)".into(),
        ));
    }
    if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        return Err(CertError::Ca(
            "root key: not the key of the root certificate".into(),
        ));
    }
    let not_after = parsed.validity().not_after.to_datetime();
    if not_after <= OffsetDateTime::now_utc() {
        return Err(CertError::Ca(format!(
            "root certificate: expired at {not_after}"
        )));
    }
    Ok(not_after)
}

/// A certificate's validity as encoded.
fn validity_of(cert: &CertificateDer<'_>) -> Result<(OffsetDateTime, OffsetDateTime), CertError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| ca_err("certificate", e))?;
    let validity = parsed.validity();
    Ok((
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    ))
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
    fn only_the_root_certificate_is_handed_out_never_the_rest_of_its_file() {
        let ca = LocalCa::generate("ambit-root", Duration::from_secs(3600)).unwrap();
        let key = ca.root_key_pem();
        // An operator's combined file: the key, then the certificate, then notes.
        let combined = format!("{}{}# issued by ops\n", key.as_str(), ca.root_pem());
        let loaded = LocalCa::from_pem(&combined, &key, Duration::from_secs(3600)).unwrap();
        assert!(
            !loaded.root_pem().contains("PRIVATE KEY"),
            "{}",
            loaded.root_pem()
        );
        assert_eq!(loaded.root_pem(), ca.root_pem());
        assert_eq!(loaded.root(), ca.root());
    }

    /// Made with openssl (`-subj "/DC=com/DC=example/CN=Mesh Root"`, 100 years):
    /// rcgen keeps one value per attribute type of an issuer's name.
    const REPEATED_DC_ROOT: &str = include_str!("ca/testdata/repeated-dc-root.pem");
    const REPEATED_DC_KEY: &str = include_str!("ca/testdata/repeated-dc-root.key");

    #[test]
    fn a_root_whose_leaves_would_not_verify_is_refused_at_load() {
        let err = LocalCa::from_pem(REPEATED_DC_ROOT, REPEATED_DC_KEY, Duration::from_secs(3600))
            .expect_err("a root whose leaves name another issuer was loaded");
        assert!(
            err.to_string().contains("does not verify against it"),
            "{err}"
        );
    }

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

    fn serial_of(cert: &rcgen::Certificate) -> Vec<u8> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        parsed.raw_serial().to_vec()
    }

    #[test]
    fn one_key_certified_twice_gets_two_serials() {
        let ca = LocalCa::generate("ambit-root", DEFAULT_CERT_TTL).unwrap();
        let key = KeyPair::generate().unwrap();
        let (nb, na) = validity_for(DEFAULT_CERT_TTL);
        let uri = |sa: &str| {
            vec![
                SpiffeId::new("cluster.local", "shop", sa)
                    .unwrap()
                    .to_string(),
            ]
        };
        let first = ca.sign_public_key(&key, &uri("cart"), &[], nb, na).unwrap();
        let renewed = ca.sign_public_key(&key, &uri("cart"), &[], nb, na).unwrap();
        let other = ca.sign_public_key(&key, &uri("pay"), &[], nb, na).unwrap();
        let serials = [serial_of(&first), serial_of(&renewed), serial_of(&other)];
        assert_ne!(serials[0], serials[1]);
        assert_ne!(serials[0], serials[2]);
        assert_ne!(serials[1], serials[2]);
        for serial in serials {
            // Positive, and 16 bytes: no leading zero byte to drop.
            assert_eq!(serial.len(), 16, "{serial:?}");
            assert_eq!(serial[0] & 0xc0, 0x40, "{serial:?}");
        }
    }

    #[test]
    fn a_ttl_past_any_date_ends_with_the_root() {
        let (_, last) = validity_for(Duration::MAX);
        assert_eq!(last, time::PrimitiveDateTime::MAX.assume_utc());
        let (_, far) = validity_for(Duration::from_secs(i64::MAX as u64));
        assert_eq!(far, last);
        let ca = LocalCa::generate("ambit-root", Duration::MAX).unwrap();
        let cert = ca
            .issue_for(&SpiffeId::new("cluster.local", "shop", "cart").unwrap())
            .unwrap();
        assert_eq!(
            OffsetDateTime::from(cert.not_after()),
            ca.not_after(),
            "a leaf never outlives its root"
        );
    }

    #[test]
    fn a_root_with_another_key_a_leaf_or_an_expired_root_is_refused() {
        let ca = LocalCa::generate("ambit-root", DEFAULT_CERT_TTL).unwrap();
        let other = LocalCa::generate("other-root", DEFAULT_CERT_TTL).unwrap();
        let err =
            LocalCa::from_pem(ca.root_pem(), &other.root_key_pem(), DEFAULT_CERT_TTL).unwrap_err();
        assert!(
            err.to_string()
                .contains("root key: not the key of the root certificate"),
            "{err}"
        );

        let key = KeyPair::generate().unwrap();
        let (nb, na) = validity_for(DEFAULT_CERT_TTL);
        let leaf = ca
            .sign_public_key(
                &key,
                &["spiffe://cluster.local/ns/a/sa/b".into()],
                &[],
                nb,
                na,
            )
            .unwrap();
        let err =
            LocalCa::from_pem(&leaf.pem(), &key.serialize_pem(), DEFAULT_CERT_TTL).unwrap_err();
        assert!(err.to_string().contains("not a CA certificate"), "{err}");

        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(2);
        params.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
        let expired = params.self_signed(&key).unwrap();
        let err =
            LocalCa::from_pem(&expired.pem(), &key.serialize_pem(), DEFAULT_CERT_TTL).unwrap_err();
        assert!(
            err.to_string().contains("root certificate: expired at"),
            "{err}"
        );
    }
}
