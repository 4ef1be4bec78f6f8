use std::path::Path;

use mesh_core::testing::{TestCa, spiffe};

use super::*;
use crate::state::LocalState;

/// A state with `batch` (if `with_batch`) and `cart` workloads on node-1.
fn state(with_batch: bool) -> crate::state::ProxyState {
    let mut yaml = String::from(
        "workloads:\n  - {uid: cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: node-1, addresses: [\"198.18.0.3\"]}\n",
    );
    if with_batch {
        yaml.push_str("  - {uid: batch-1, name: batch-1, namespace: shop, serviceAccount: batch, node: node-1, addresses: [\"198.18.0.5\"]}\n");
    }
    LocalState::parse(Path::new("test.yaml"), &yaml)
        .unwrap()
        .into_state()
}

struct Fixture {
    certs: Arc<CertStore>,
    state: Arc<StateStore>,
    pods: watch::Sender<HashMap<String, SpiffeId>>,
    _drain: mesh_core::drain::DrainTrigger,
}

const GRACE: Duration = Duration::from_secs(30);

fn start() -> Fixture {
    start_with(false)
}

fn start_with(prefetch: bool) -> Fixture {
    start_with_ca(prefetch, Arc::new(TestCa::new()))
}

/// The fixture with `ca` asked for the missing certificates.
fn start_with_ca<S: CertificateSource>(prefetch: bool, ca: Arc<S>) -> Fixture {
    let issuer = TestCa::new();
    let certs = issuer.store_for(&[&spiffe("shop", "cart"), &spiffe("shop", "batch")]);
    let state = Arc::new(StateStore::new(state(true)));
    let pods = watch::Sender::new(HashMap::new());
    let (trigger, watcher) = mesh_core::drain::channel();
    tokio::spawn(keep_node_certificates(
        NodeCertificates {
            certs: certs.clone(),
            ca,
            state: state.clone(),
            node: "node-1".into(),
            pods: pods.subscribe(),
            prefetch,
            grace: GRACE,
        },
        watcher,
    ));
    Fixture {
        certs,
        state,
        pods,
        _drain: trigger,
    }
}

fn held(certs: &CertStore) -> Vec<String> {
    let mut ids: Vec<String> = certs
        .all()
        .iter()
        .map(|c| c.identity().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(start_paused = true)]
async fn a_certificate_goes_a_grace_after_the_last_workload_of_its_identity() {
    let f = start();
    tokio::time::sleep(GRACE * 2).await;
    assert_eq!(held(&f.certs).len(), 2, "both have a workload here");
    let mut events = f.certs.subscribe();
    let left = Instant::now();
    f.state.replace(state(false));
    assert_eq!(
        events.recv().await.unwrap(),
        mesh_core::CertEvent::Removed(spiffe("shop", "batch"))
    );
    assert!(left.elapsed() >= GRACE);
    assert!(left.elapsed() < GRACE + Duration::from_secs(1));
    assert_eq!(held(&f.certs), ["spiffe://cluster.local/ns/shop/sa/cart"]);
}

#[tokio::test(start_paused = true)]
async fn a_pod_of_the_identity_keeps_it_and_its_removal_releases_it() {
    let f = start();
    f.pods.send_modify(|p| {
        p.insert("batch-2".into(), spiffe("shop", "batch"));
    });
    f.state.replace(state(false));
    tokio::time::sleep(GRACE * 2).await;
    assert_eq!(held(&f.certs).len(), 2, "the pod still runs");
    f.pods.send_replace(HashMap::new());
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    assert_eq!(held(&f.certs), ["spiffe://cluster.local/ns/shop/sa/cart"]);
}

#[tokio::test(start_paused = true)]
async fn an_identity_back_within_the_grace_keeps_its_certificate() {
    let f = start();
    f.state.replace(state(false));
    tokio::time::sleep(GRACE / 2).await;
    // The pod restarts with the same identity.
    f.pods.send_modify(|p| {
        p.insert("batch-2".into(), spiffe("shop", "batch"));
    });
    tokio::time::sleep(GRACE * 2).await;
    assert_eq!(held(&f.certs).len(), 2);
    // A certificate fetched for an identity with no workload here goes too.
    let ca = TestCa::new();
    f.certs.insert(ca.issue_cert(&spiffe("shop", "stray")));
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    assert_eq!(held(&f.certs).len(), 2);
    assert!(f.certs.get(&spiffe("shop", "stray")).is_none());
}

/// A running pod's certificate that goes missing (dropped at expiry after its
/// renewals failed, or released in a race with the pod's start) is fetched again
/// at once, without waiting for any other change.
#[tokio::test(start_paused = true)]
async fn a_pods_certificate_that_goes_missing_is_fetched_again() {
    let f = start();
    f.pods.send_modify(|p| {
        p.insert("web-1".into(), spiffe("shop", "web"));
    });
    let mut events = f.certs.subscribe();
    // Not held yet: fetched for the pod.
    assert_eq!(
        events.recv().await.unwrap(),
        mesh_core::CertEvent::Updated(spiffe("shop", "web"))
    );
    f.certs.remove(&spiffe("shop", "web"));
    assert_eq!(
        events.recv().await.unwrap(),
        mesh_core::CertEvent::Removed(spiffe("shop", "web"))
    );
    assert_eq!(
        events.recv().await.unwrap(),
        mesh_core::CertEvent::Updated(spiffe("shop", "web"))
    );
    assert!(f.certs.get(&spiffe("shop", "web")).is_some());
}

/// With a control plane, the state's workloads on this node get theirs before
/// their pods come; without, only pods do.
#[tokio::test(start_paused = true)]
async fn the_states_workloads_are_fetched_ahead_only_with_prefetch() {
    for prefetch in [false, true] {
        let f = start_with(prefetch);
        f.certs.remove(&spiffe("shop", "cart"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            f.certs.get(&spiffe("shop", "cart")).is_some(),
            prefetch,
            "prefetch {prefetch}"
        );
    }
}

/// A CA that refuses its first `refusals` requests (as istiod-lite does before
/// it has seen a new pod), then issues; it notes when each request came.
struct RefusingCa {
    ca: TestCa,
    refusals: std::sync::atomic::AtomicU32,
    asked: std::sync::Mutex<Vec<Instant>>,
}

impl CertificateSource for RefusingCa {
    async fn issue(
        &self,
        identity: &SpiffeId,
    ) -> Result<mesh_core::WorkloadCertificate, CertError> {
        self.asked.lock().unwrap().push(Instant::now());
        let left = self.refusals.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.refusals
                .store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(CertError::Refused("pod not seen yet".into()));
        }
        self.ca.issue(identity).await
    }
}

/// A new pod whose first asks are refused gets its certificate within a second
/// of the refusals ending (100 ms doubling), not after seconds of backoff, and
/// the asks still back off (no tight loop).
#[tokio::test(start_paused = true)]
async fn a_new_pods_refused_certificate_is_asked_again_quickly_with_backoff() {
    let ca = Arc::new(RefusingCa {
        ca: TestCa::new(),
        refusals: 4.into(),
        asked: Default::default(),
    });
    let f = start_with_ca(false, ca.clone());
    let mut events = f.certs.subscribe();
    let added = Instant::now();
    f.pods.send_modify(|p| {
        p.insert("web-1".into(), spiffe("shop", "web"));
    });
    assert_eq!(
        events.recv().await.unwrap(),
        mesh_core::CertEvent::Updated(spiffe("shop", "web"))
    );
    // Asked at 0, then after 100, 200, 400 and 800 ms: issued at 1.5 s.
    assert!(
        added.elapsed() < Duration::from_secs(2),
        "{:?}",
        added.elapsed()
    );
    let asked = ca.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 5, "{asked:?}");
    for (i, pair) in asked.windows(2).enumerate() {
        let want = Duration::from_millis(100) * (1 << i);
        let gap = pair[1] - pair[0];
        assert!(
            gap >= want && gap < want + Duration::from_millis(50),
            "gap {i}: {gap:?}"
        );
    }
}

/// Counts the requests per identity and issues them all.
#[derive(Default)]
struct CountingCa {
    ca: TestCa,
    asked: std::sync::Mutex<HashMap<String, usize>>,
}

impl CertificateSource for CountingCa {
    async fn issue(
        &self,
        identity: &SpiffeId,
    ) -> Result<mesh_core::WorkloadCertificate, CertError> {
        *self
            .asked
            .lock()
            .unwrap()
            .entry(identity.to_string())
            .or_default() += 1;
        self.ca.issue(identity).await
    }
}

/// Prefetch asks only for mesh workloads: never for a hostNetwork pod (the CA
/// refuses those for good) nor for one outside the mesh.
#[tokio::test(start_paused = true)]
async fn prefetch_skips_host_network_pods_and_pods_outside_the_mesh() {
    let yaml = "workloads:
  - {uid: cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: node-1, addresses: [\"198.18.0.3\"]}
  - {uid: proxy-1, name: kube-proxy-1, namespace: kube-system, serviceAccount: kube-proxy, node: node-1, hostNetwork: true, addresses: [\"198.18.0.1\"]}
  - {uid: legacy-1, name: legacy-1, namespace: legacy, serviceAccount: app, node: node-1, protocol: NONE, addresses: [\"198.18.0.7\"]}
";
    let state = LocalState::parse(Path::new("test.yaml"), yaml)
        .unwrap()
        .into_state();
    let ca = Arc::new(CountingCa::default());
    let certs = Arc::new(CertStore::new());
    let (_drain, watcher) = mesh_core::drain::channel();
    let (_pods, pods) = watch::channel(HashMap::new());
    tokio::spawn(keep_node_certificates(
        NodeCertificates {
            certs: certs.clone(),
            ca: ca.clone(),
            state: Arc::new(StateStore::new(state)),
            node: "node-1".into(),
            pods,
            prefetch: true,
            grace: GRACE,
        },
        watcher,
    ));
    tokio::time::sleep(Duration::from_secs(600)).await;
    let asked = ca.asked.lock().unwrap().clone();
    assert_eq!(
        asked,
        HashMap::from([(spiffe("shop", "cart").to_string(), 1)]),
        "asked for {asked:?}"
    );
    assert_eq!(held(&certs), [spiffe("shop", "cart").to_string()]);
}
