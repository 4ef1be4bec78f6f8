//! Where a proxy keeps the certificates of the identities it serves.
//!
//! Identity -> current chain and key, with expiry and a rotation hook. Keys live only
//! in memory, inside rustls's signing key. Whoever issues certificates (a local root,
//! [`crate::ca::LocalCa`], or istiod-lite's CA through [`crate::ca_client::RemoteCa`])
//! implements [`CertificateSource`]; TLS configs read the store at every handshake, so
//! a rotated certificate is used by the next connection without rebuilding anything.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{broadcast, watch};

use crate::SpiffeId;
use crate::tls::{IdentityError, identity_of_cert, provider};

/// Why a certificate could not be stored or obtained.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("no trusted roots came with the certificate")]
    NoRoots,
    #[error("PEM does not parse: {0}")]
    Pem(String),
    #[error("private key refused: {0}")]
    Key(rustls::Error),
    #[error("leaf certificate: {0}")]
    Identity(#[from] IdentityError),
    #[error("leaf certificate is for {got}, requested {want}")]
    WrongIdentity {
        want: Box<SpiffeId>,
        got: Box<SpiffeId>,
    },
    #[error("certificate authority: {0}")]
    Ca(String),
    /// The CA will not issue this identity to us (e.g. its pod is not on this
    /// node): asking again, unchanged, will not help.
    #[error("certificate authority refused: {0}")]
    Refused(String),
}

impl CertError {
    /// Whether a retry cannot help until something changes (the CA said no, as
    /// opposed to could not answer).
    pub fn is_permanent(&self) -> bool {
        matches!(self, CertError::Refused(_))
    }
}

/// One identity's certificate: chain (leaf first), trusted roots, and signing key.
#[derive(Clone)]
pub struct WorkloadCertificate {
    identity: SpiffeId,
    certified: Arc<CertifiedKey>,
    roots: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl WorkloadCertificate {
    /// Builds from DER parts; the leaf must carry exactly one SPIFFE URI SAN and
    /// certify `key`.
    pub fn new(
        key: PrivateKeyDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or(CertError::EmptyChain)?;
        if roots.is_empty() {
            return Err(CertError::NoRoots);
        }
        let identity = identity_of_cert(leaf)?;
        let (not_before, not_after) = validity_of(leaf)?;
        // Checks that the leaf certifies the key: a mismatch would only show at
        // the first handshake, as a peer's signature error.
        let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(CertError::Key)?;
        Ok(Self {
            identity,
            certified: Arc::new(certified),
            roots,
            not_before,
            not_after,
        })
    }

    /// Builds from PEM: a PKCS#8 key, a chain (leaf first) and a bundle of roots.
    pub fn from_pem(key: &str, chain: &str, roots: &str) -> Result<Self, CertError> {
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| CertError::Pem(format!("private key: {e}")))?;
        let certs = |pem: &str, what: &str| {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CertError::Pem(format!("{what}: {e}")))
        };
        Self::new(key, certs(chain, "chain")?, certs(roots, "roots")?)
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The chain the peer is shown, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The roots peers are verified against.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When to renew: half way through the certificate's life.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

impl fmt::Debug for WorkloadCertificate {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.certified.cert.len())
            .field("roots", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

fn validity_of(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    Ok((
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    ))
}

/// Issues certificates for identities: a local root or istiod-lite's CA client.
pub trait CertificateSource: Send + Sync + 'static {
    fn issue(
        &self,
        identity: &SpiffeId,
    ) -> impl Future<Output = Result<WorkloadCertificate, CertError>> + Send;
}

/// A change to the store, for whoever must react to rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertEvent {
    Updated(SpiffeId),
    Removed(SpiffeId),
}

/// The outcome of a CA request, shared with whoever asked for the same identity
/// meanwhile; `None` while it runs.
type Shared = Option<Result<Arc<WorkloadCertificate>, CertError>>;

/// Identity -> current certificate, shared by every listener and the pool.
#[derive(Debug)]
pub struct CertStore {
    certs: RwLock<HashMap<SpiffeId, Arc<WorkloadCertificate>>>,
    events: broadcast::Sender<CertEvent>,
    // One CA request per identity at a time: a pod's first fetch, the prefetch and
    // a renewal that overlap share it. One entry per identity being fetched.
    in_flight: Mutex<HashMap<SpiffeId, watch::Sender<Shared>>>,
}

impl Default for CertStore {
    fn default() -> Self {
        Self::new()
    }
}

impl CertStore {
    pub fn new() -> Self {
        // Subscribers that lag past 64 events see `Lagged` and re-read the store.
        let (events, _) = broadcast::channel(64);
        Self {
            certs: RwLock::new(HashMap::new()),
            events,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Stores (or rotates) the certificate of its identity.
    pub fn insert(&self, cert: WorkloadCertificate) {
        let id = cert.identity().clone();
        self.write().insert(id.clone(), Arc::new(cert));
        let _ = self.events.send(CertEvent::Updated(id));
    }

    /// Asks `source` for a certificate of `identity` and stores it. A request for
    /// `identity` already in flight is joined instead of sending another; if its
    /// caller gives up (is cancelled) before the answer, this one asks itself.
    pub async fn fetch<S: CertificateSource>(
        &self,
        source: &S,
        identity: &SpiffeId,
    ) -> Result<Arc<WorkloadCertificate>, CertError> {
        loop {
            let mut joined = {
                let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                match in_flight.get(identity) {
                    Some(running) => running.subscribe(),
                    None => {
                        in_flight.insert(identity.clone(), watch::channel(None).0);
                        break;
                    }
                }
            };
            if let Ok(outcome) = joined.wait_for(Option::is_some).await
                && let Some(outcome) = outcome.clone()
            {
                return outcome;
            }
        }
        let request = InFlight {
            store: self,
            identity,
        };
        let outcome = self.issue(source, identity).await;
        request.finish(outcome.clone());
        outcome
    }

    async fn issue<S: CertificateSource>(
        &self,
        source: &S,
        identity: &SpiffeId,
    ) -> Result<Arc<WorkloadCertificate>, CertError> {
        let cert = source.issue(identity).await?;
        if cert.identity() != identity {
            return Err(CertError::WrongIdentity {
                want: Box::new(identity.clone()),
                got: Box::new(cert.identity().clone()),
            });
        }
        let cert = Arc::new(cert);
        self.write().insert(identity.clone(), cert.clone());
        let _ = self.events.send(CertEvent::Updated(identity.clone()));
        Ok(cert)
    }

    pub fn get(&self, identity: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        self.read().get(identity).cloned()
    }

    pub fn remove(&self, identity: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        let removed = self.write().remove(identity);
        if removed.is_some() {
            let _ = self.events.send(CertEvent::Removed(identity.clone()));
        }
        removed
    }

    /// Removes `judged` if it is still its identity's certificate: a decision
    /// taken on a snapshot ([`CertStore::all`]) never removes one stored since.
    pub fn remove_if_current(&self, judged: &Arc<WorkloadCertificate>) -> bool {
        let id = judged.identity();
        let mut certs = self.write();
        if !certs.get(id).is_some_and(|held| Arc::ptr_eq(held, judged)) {
            return false;
        }
        certs.remove(id);
        drop(certs);
        let _ = self.events.send(CertEvent::Removed(id.clone()));
        true
    }

    /// Every stored certificate, for the admin view and for renewal scheduling.
    pub fn all(&self) -> Vec<Arc<WorkloadCertificate>> {
        self.read().values().cloned().collect()
    }

    /// The rotation hook: every later insert and removal.
    pub fn subscribe(&self) -> broadcast::Receiver<CertEvent> {
        self.events.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SpiffeId, Arc<WorkloadCertificate>>> {
        // A panic while holding the lock cannot leave the map half-written.
        self.certs.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<SpiffeId, Arc<WorkloadCertificate>>> {
        self.certs.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The request in flight for one identity; dropped, finished or cancelled, it
/// leaves the map, so the next fetch asks the CA again.
struct InFlight<'a> {
    store: &'a CertStore,
    identity: &'a SpiffeId,
}

impl InFlight<'_> {
    /// Hands the outcome to the callers that joined.
    fn finish(self, outcome: Result<Arc<WorkloadCertificate>, CertError>) {
        let in_flight = self
            .store
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(joined) = in_flight.get(self.identity) {
            joined.send_replace(Some(outcome));
        }
        // Unlocked before `self` drops and takes the entry out.
        drop(in_flight);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.store
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.identity);
    }
}

#[cfg(test)]
mod tests;
