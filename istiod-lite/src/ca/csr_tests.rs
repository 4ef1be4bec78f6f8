//! CSR verification: each refusal has its own error, and no input panics.

use proptest::prelude::*;
use rcgen::{CertificateParams, KeyPair, SanType};

use super::*;

const TD: &str = "cluster.local";

fn csr_with(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

#[test]
fn a_good_csr_yields_its_identity_and_key() {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri("spiffe://cluster.local/ns/shop/sa/cart")];
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let csr = verify_csr(&pem, TD).unwrap();
    assert_eq!(
        csr.identity().to_string(),
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(csr.public_key()),
        rcgen::PublicKeyData::subject_public_key_info(&key)
    );
}

#[test]
fn other_key_algorithms_verify_too() {
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri("spiffe://cluster.local/ns/a/sa/b")];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        verify_csr(&pem, TD).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
    }
}

#[test]
fn every_refusal_is_precise() {
    let cases: Vec<(String, CsrError)> = vec![
        (csr_with(vec![]), CsrError::NoSan),
        (
            csr_with(vec![
                uri("spiffe://cluster.local/ns/a/sa/b"),
                uri("spiffe://cluster.local/ns/a/sa/c"),
            ]),
            CsrError::MultipleSans(2),
        ),
        (
            csr_with(vec![SanType::DnsName("cart.shop.svc".try_into().unwrap())]),
            CsrError::NotUri("DNS name"),
        ),
        (
            csr_with(vec![SanType::IpAddress([10, 0, 0, 1].into())]),
            CsrError::NotUri("IP address"),
        ),
        (
            csr_with(vec![uri("https://cluster.local/ns/a/sa/b")]),
            CsrError::NotSpiffe(mesh_core::SpiffeIdError::MissingScheme),
        ),
        (
            csr_with(vec![uri("spiffe://evil.example/ns/a/sa/b")]),
            CsrError::OtherTrustDomain {
                expected: TD.into(),
                got: SpiffeId::new("evil.example", "a", "b").unwrap(),
            },
        ),
    ];
    for (pem, want) in cases {
        assert_eq!(verify_csr(&pem, TD).unwrap_err(), want);
    }
    let err = verify_csr("hello", TD).unwrap_err();
    assert!(matches!(err, CsrError::Malformed(_)), "{err}");
    let huge = "A".repeat(MAX_CSR_PEM_BYTES + 1);
    assert!(
        verify_csr(&huge, TD)
            .unwrap_err()
            .to_string()
            .contains("over the limit")
    );
}

#[test]
fn a_tampered_csr_fails_its_signature() {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri("spiffe://cluster.local/ns/shop/sa/cart")];
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    // Swap one letter of the SAN inside the signed part: "cart" -> "cars".
    let at = der.windows(4).position(|w| w == b"cart").unwrap();
    let mut tampered = der.clone();
    tampered[at + 3] = b's';
    assert_eq!(
        verify_csr_der(&tampered, TD).unwrap_err(),
        CsrError::BadSignature
    );
    // And one bit of the signature itself.
    let mut tampered = der;
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(
        verify_csr_der(&tampered, TD).unwrap_err(),
        CsrError::BadSignature
    );
}

fn good_der() -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri("spiffe://cluster.local/ns/shop/sa/cart")];
    params.serialize_request(&key).unwrap().der().to_vec()
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = verify_csr_der(&bytes, TD);
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = verify_csr(&text, TD);
        let pem = format!("-----BEGIN CERTIFICATE REQUEST-----\n{text}\n-----END CERTIFICATE REQUEST-----\n");
        let _ = verify_csr(&pem, TD);
    }

    #[test]
    fn a_mutated_good_csr_never_panics_and_never_passes_changed(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let der = good_der();
        let mut bad = der.clone();
        for (at, mask) in flips {
            let i = at.index(bad.len());
            bad[i] ^= mask;
        }
        if let Ok(csr) = verify_csr_der(&bad, TD) {
            // Only a change outside the signed content and signature (none exists in
            // DER) could pass; an accepted CSR must still name the original identity.
            prop_assert_eq!(csr.identity().to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        }
        let truncated = &der[..cut.index(der.len())];
        prop_assert!(verify_csr_der(truncated, TD).is_err());
    }
}
