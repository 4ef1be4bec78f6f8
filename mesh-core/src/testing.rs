//! A test certificate authority (rcgen) so tests of any crate can mint identities.
//!
//! Behind the `testing` feature: production certificates come from istiod-lite's CA.
//! Also the root gate of tests that need root, and their network namespaces.

pub mod netns;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::ca::LocalCa;
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

/// A CA for tests: a [`LocalCa`] with a unique name and leaves on demand.
pub struct TestCa {
    ca: LocalCa,
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
        // Each test CA has its own name, as distinct real CAs would.
        let mut tag = [0u8; 8];
        let _ = crate::tls::provider().secure_random.fill(&mut tag);
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let ca = LocalCa::generate(
            &format!("ambit-test-root-{tag}"),
            Duration::from_secs(24 * 3600),
        )
        .expect("generate test CA");
        Self { ca }
    }

    /// The CA itself, e.g. to write its root to disk.
    pub fn local_ca(&self) -> &LocalCa {
        &self.ca
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.ca.root()
    }

    /// A valid 24 h certificate for `id`.
    pub fn issue_cert(&self, id: &SpiffeId) -> WorkloadCertificate {
        self.ca.issue_for(id).expect("valid test certificate")
    }

    /// A leaf as raw DER, for tests that need certificates the store would refuse.
    pub fn issue_raw(
        &self,
        id: &SpiffeId,
        opts: &LeafOptions,
    ) -> (PrivateKeyDer<'static>, Vec<CertificateDer<'static>>) {
        let uris = opts.uris.clone().unwrap_or_else(|| vec![id.to_string()]);
        self.ca
            .sign(&uris, opts.not_before, opts.not_after)
            .expect("sign test leaf")
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

/// Whether a test that needs root can run. Without root: panics when `CI=true`
/// (CI must run these tests, not skip them), otherwise prints a loud SKIPPED line
/// and returns false so the test can return early. The line goes straight to
/// fd 2: `eprintln!` is captured by the test harness, which would hide it.
pub fn require_root(test_name: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test_name} needs root, and CI=true: tests that need root must run in CI");
    }
    say_skipped(&format!("(needs root): {test_name}"));
    false
}

/// Prints `SKIPPED <what>` straight to fd 2, where a passing test's output shows:
/// `eprintln!` is captured by the test harness, which would hide it.
pub fn say_skipped(what: &str) {
    let line = format!("SKIPPED {what}\n");
    let _best_effort = std::io::stderr().lock().write_all(line.as_bytes());
}
