//! The Kubernetes source and the TokenReview authenticator against a fake API
//! server that speaks the real list/watch protocol.

#![allow(clippy::unwrap_used)]

mod fake_apiserver;

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser as _;
use fake_apiserver::{FakeApiServer, TokenAnswer};
use istiod_lite::app::App;
use istiod_lite::auth::review::TokenReviewer;
use istiod_lite::auth::{AuthError, Authenticator};
use istiod_lite::config::Config;
use istiod_lite::model::{Kind, Object, ObjectChange, ObjectKey, Report, SourceEvent};
use istiod_lite::source::kube::{KubeSource, client_for};
use mesh_core::drain::{self, DrainOutcome, DrainTrigger};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}},
    })
}

fn pod(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
        "spec": {
            "nodeName": "node-1",
            "serviceAccountName": "shop",
            "containers": [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

fn policy(name: &str, ip_block: &str) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "a"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"ipBlocks": [ip_block]}}]}],
        },
    })
}

fn key(kind: Kind, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(kind, namespace, name)
}

/// What the model would hold, rebuilt from the source's events.
#[derive(Default)]
struct Seen {
    objects: BTreeMap<ObjectKey, Object>,
    reports: BTreeMap<String, Vec<Report>>,
    /// How many objects were known when `Synced` arrived.
    synced_with: Option<usize>,
    deletes: Vec<ObjectKey>,
}

/// A running source and what it has said so far.
struct Harness {
    server: FakeApiServer,
    rx: mpsc::Receiver<SourceEvent>,
    seen: Seen,
    trigger: Option<DrainTrigger>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(server: FakeApiServer) -> Self {
        let client = client_for(server.url()).unwrap();
        let source = KubeSource::new(client)
            .with_retry(Duration::from_millis(20), Duration::from_millis(200));
        let (tx, rx) = mpsc::channel(64);
        let (trigger, watcher) = drain::channel();
        let task = tokio::spawn(source.run(tx, watcher));
        Self {
            server,
            rx,
            seen: Seen::default(),
            trigger: Some(trigger),
            task,
        }
    }

    /// Applies events until `done` holds, failing after [`WAIT`].
    async fn wait_for(&mut self, what: &str, done: impl Fn(&Seen) -> bool) {
        let waited = tokio::time::timeout(WAIT, async {
            while !done(&self.seen) {
                let event = self.rx.recv().await.expect("the source stopped");
                apply(&mut self.seen, event);
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out waiting for {what}");
    }

    async fn synced(&mut self) {
        self.wait_for("Synced", |s| s.synced_with.is_some()).await;
    }

    /// Drains the source; it must stop gracefully and promptly.
    async fn stop(mut self) {
        let trigger = self.trigger.take().unwrap();
        let outcome = trigger.drain(Duration::from_secs(5)).await;
        assert_eq!(outcome, DrainOutcome::Graceful);
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn apply(seen: &mut Seen, event: SourceEvent) {
    match event {
        SourceEvent::Changes(changes) => {
            for change in changes {
                match change {
                    ObjectChange::Upsert(object) => {
                        seen.objects.insert(object.key(), object);
                    }
                    ObjectChange::Delete(key) => {
                        seen.objects.remove(&key);
                        seen.deletes.push(key);
                    }
                }
            }
        }
        SourceEvent::Reports { origin, reports } => {
            seen.reports.insert(origin, reports);
        }
        SourceEvent::Synced => {
            assert!(seen.synced_with.is_none(), "Synced sent twice");
            seen.synced_with = Some(seen.objects.len());
        }
    }
}

fn pod_ready(seen: &Seen, name: &str) -> Option<bool> {
    match seen.objects.get(&key(Kind::Pod, "shop", name)) {
        Some(Object::Pod(pod)) => Some(pod.ready),
        _ => None,
    }
}

#[tokio::test]
async fn lists_then_watches_added_modified_deleted() {
    let server = FakeApiServer::start().await;
    server.apply(namespace("shop"));
    server.apply(pod("a", "198.18.0.10"));
    let mut h = Harness::start(server).await;

    h.synced().await;
    assert_eq!(
        h.seen.synced_with,
        Some(2),
        "Synced comes after the initial list"
    );
    assert!(
        h.seen
            .objects
            .contains_key(&key(Kind::Namespace, "", "shop"))
    );
    assert_eq!(pod_ready(&h.seen, "a"), Some(true));

    // ADDED
    h.server.apply(pod("b", "198.18.0.11"));
    h.wait_for("pod b added", |s| pod_ready(s, "b").is_some())
        .await;

    // MODIFIED: a turns unready.
    let mut a = pod("a", "198.18.0.10");
    a["status"]["conditions"][0]["status"] = json!("False");
    h.server.apply(a);
    h.wait_for("pod a modified", |s| pod_ready(s, "a") == Some(false))
        .await;

    // DELETED
    h.server.delete("Pod", "shop", "b");
    h.wait_for("pod b deleted", |s| pod_ready(s, "b").is_none())
        .await;

    // One list per kind: watches alone carried the changes.
    assert_eq!(h.server.lists("Pod"), 1);
    assert_eq!(h.server.lists("Namespace"), 1);
    h.stop().await;
}

#[tokio::test]
async fn gone_forces_a_relist_that_deletes_what_vanished_meanwhile() {
    let server = FakeApiServer::start().await;
    server.apply(namespace("shop"));
    server.apply(pod("a", "198.18.0.10"));
    server.apply(pod("b", "198.18.0.11"));
    let mut h = Harness::start(server).await;
    h.synced().await;
    assert!(pod_ready(&h.seen, "b").is_some());

    // b goes while the watch is down, and its event is compacted away: the
    // resumed watch is answered with 410 Gone.
    h.server.delete_quietly("Pod", "shop", "b");
    h.server.expire_next_watch("Pod");
    h.server.drop_watches("Pod");
    h.wait_for("b deleted after the relist", |s| {
        pod_ready(s, "b").is_none()
    })
    .await;
    assert_eq!(pod_ready(&h.seen, "a"), Some(true), "a survives the relist");
    assert_eq!(
        h.server.lists("Pod"),
        2,
        "410 Gone forced exactly one relist"
    );
    assert_eq!(h.seen.deletes, vec![key(Kind::Pod, "shop", "b")]);

    // The watch after the relist still delivers.
    h.server.apply(pod("c", "198.18.0.12"));
    h.wait_for("pod c after the relist", |s| pod_ready(s, "c").is_some())
        .await;
    h.stop().await;
}

#[tokio::test]
async fn a_dropped_watch_reconnects_without_relisting() {
    let server = FakeApiServer::start().await;
    server.apply(namespace("shop"));
    let mut h = Harness::start(server).await;
    h.synced().await;
    let watches = h.server.watches("Pod");

    h.server.drop_watches("Pod");
    // Written while the watch may be down: the resumed watch replays it.
    h.server.apply(pod("a", "198.18.0.10"));
    h.wait_for("pod a after the reconnect", |s| pod_ready(s, "a").is_some())
        .await;
    h.server.apply(pod("b", "198.18.0.11"));
    h.wait_for("pod b after the reconnect", |s| pod_ready(s, "b").is_some())
        .await;

    assert!(h.server.watches("Pod") > watches, "the watch was restarted");
    assert_eq!(h.server.lists("Pod"), 1, "resuming needs no relist");
    h.stop().await;
}

#[tokio::test]
async fn a_malformed_object_is_reported_while_the_others_apply() {
    let server = FakeApiServer::start().await;
    server.apply(namespace("shop"));
    server.apply(policy("good", "198.18.0.0/16"));
    server.apply(policy("bad", "not-an-ip"));
    let mut h = Harness::start(server).await;
    h.synced().await;

    let good = key(Kind::AuthorizationPolicy, "shop", "good");
    assert!(h.seen.objects.contains_key(&good));
    assert!(
        !h.seen
            .objects
            .contains_key(&key(Kind::AuthorizationPolicy, "shop", "bad"))
    );
    let reports = &h.seen.reports["kube:AuthorizationPolicy"];
    assert_eq!(reports.len(), 1, "{reports:?}");
    let error = &reports[0].error;
    assert_eq!(
        (error.namespace.as_str(), error.name.as_str()),
        ("shop", "bad")
    );
    assert!(error.field.contains("ipBlocks"), "field: {}", error.field);
    assert_eq!(reports[0].origin, "kube:AuthorizationPolicy");

    // Fixing the object clears the report and applies it.
    h.server.apply(policy("bad", "198.18.1.0/24"));
    h.wait_for("the report cleared", |s| {
        s.reports["kube:AuthorizationPolicy"].is_empty()
    })
    .await;
    h.wait_for("the fixed policy", |s| {
        s.objects
            .contains_key(&key(Kind::AuthorizationPolicy, "shop", "bad"))
    })
    .await;

    // Breaking a good one reports it and keeps its last good version, as the
    // directory source does; deleting it then removes it.
    h.server.apply(policy("good", "300.1.1.1"));
    h.wait_for("good reported", |s| {
        s.reports["kube:AuthorizationPolicy"].len() == 1
    })
    .await;
    assert!(h.seen.objects.contains_key(&good), "last good version kept");
    assert!(h.seen.deletes.is_empty());
    h.server.delete("AuthorizationPolicy", "shop", "good");
    h.wait_for("good deleted and its report cleared", |s| {
        s.reports["kube:AuthorizationPolicy"].is_empty() && !s.objects.contains_key(&good)
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn authorization_policies_are_read_from_v1beta1_when_v1_is_not_served() {
    let server = FakeApiServer::start().await;
    server.serve_at("AuthorizationPolicy", "security.istio.io/v1beta1");
    let mut deny = policy("deny", "198.19.0.1");
    deny["apiVersion"] = json!("security.istio.io/v1beta1");
    deny["spec"]["action"] = json!("DENY");
    server.apply(deny);
    let mut h = Harness::start(server).await;
    h.synced().await;
    assert!(
        h.seen
            .objects
            .contains_key(&key(Kind::AuthorizationPolicy, "shop", "deny")),
        "the v1beta1 policy is in the first view"
    );
    assert!(
        h.seen.reports.values().all(Vec::is_empty),
        "{:?}",
        h.seen.reports.keys()
    );
    h.stop().await;
}

#[tokio::test]
async fn peer_authentications_are_read_from_v1beta1_when_v1_is_not_served() {
    let server = FakeApiServer::start().await;
    server.serve_at("PeerAuthentication", "security.istio.io/v1beta1");
    server.apply(json!({
        "apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }));
    let mut h = Harness::start(server).await;
    h.synced().await;
    let strict = key(Kind::PeerAuthentication, "shop", "strict");
    assert!(h.seen.objects.contains_key(&strict), "in the first view");
    h.stop().await;
}

#[tokio::test]
async fn no_authorization_policy_api_is_an_error_not_an_empty_list() {
    let server = FakeApiServer::start().await;
    server.set_served("AuthorizationPolicy", false);
    server.apply(namespace("shop"));
    let mut h = Harness::start(server).await;
    let origin = "kube:AuthorizationPolicy:api";
    h.wait_for("the missing API reported", |s| {
        s.reports.get(origin).is_some_and(|r| !r.is_empty())
    })
    .await;
    let problem = &h.seen.reports[origin][0].error.problem;
    assert!(
        problem.contains("security.istio.io/v1 authorizationpolicies")
            && problem.contains("security.istio.io/v1beta1"),
        "{problem}"
    );
    // Every other kind has been listed, yet the source is not synced: proxies
    // must not be served a mesh without its policies.
    h.wait_for("the namespace", |s| {
        s.objects.contains_key(&key(Kind::Namespace, "", "shop"))
    })
    .await;
    for kind in ["Namespace", "Pod", "Service", "DestinationRule"] {
        assert!(h.server.lists(kind) >= 1, "{kind} not listed yet");
    }
    assert_eq!(
        h.seen.synced_with, None,
        "synced without AuthorizationPolicies"
    );

    // The CRD gets installed: synced, and the error cleared.
    h.server.set_served("AuthorizationPolicy", true);
    h.synced().await;
    h.wait_for("the error cleared", |s| s.reports[origin].is_empty())
        .await;
    h.stop().await;
}

#[tokio::test]
async fn a_missing_crd_does_not_hold_up_the_other_kinds() {
    let server = FakeApiServer::start().await;
    server.set_served("DestinationRule", false);
    server.apply(namespace("shop"));
    let mut h = Harness::start(server).await;
    h.synced().await;
    assert!(
        h.seen
            .objects
            .contains_key(&key(Kind::Namespace, "", "shop"))
    );

    // The CRD gets installed: the retrying watcher picks it up.
    h.server.set_served("DestinationRule", true);
    h.server.apply(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": {"host": "reviews.shop.svc.cluster.local", "trafficPolicy": {}},
    }));
    h.wait_for("the DestinationRule", |s| {
        s.objects
            .contains_key(&key(Kind::DestinationRule, "shop", "reviews"))
    })
    .await;
    h.stop().await;
}

const ZTUNNEL: &str = "system:serviceaccount:istio-system:ztunnel";

async fn reviewer_server() -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.add_token(
        "ztunnel-token",
        TokenAnswer {
            username: ZTUNNEL.into(),
            node: Some("node-1".into()),
            pod: Some("a-pod-on-node-1".into()),
            audiences: vec!["istio-ca".into()],
        },
    );
    server.add_token(
        "app-token",
        TokenAnswer {
            username: "system:serviceaccount:shop:default".into(),
            node: Some("node-1".into()),
            pod: Some("a-pod-on-node-1".into()),
            audiences: vec!["istio-ca".into()],
        },
    );
    server
}

fn reviewer(server: &FakeApiServer) -> TokenReviewer {
    TokenReviewer::new(client_for(server.url()).unwrap()).with_audiences(["istio-ca".to_owned()])
}

#[tokio::test]
async fn token_review_maps_a_ztunnel_token_to_its_node() {
    let server = reviewer_server().await;
    let caller = reviewer(&server)
        .authenticate("ztunnel-token")
        .await
        .unwrap();
    assert_eq!(caller.node, "node-1");
    assert_eq!(caller.principal, ZTUNNEL);
}

#[tokio::test]
async fn token_reviews_in_flight_are_bounded() {
    use istiod_lite::auth::review::MAX_REVIEWS_AT_ONCE;
    let server = reviewer_server().await;
    server.hold_token_reviews(true);
    let reviewer = reviewer(&server);
    let calls: Vec<_> = (0..MAX_REVIEWS_AT_ONCE + 16)
        .map(|_| {
            let reviewer = reviewer.clone();
            tokio::spawn(async move { reviewer.authenticate("ztunnel-token").await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.token_reviews_in_flight().0 < MAX_REVIEWS_AT_ONCE {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?} reviews arrived",
            server.token_reviews_in_flight()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The rest wait for a slot: none reaches the API server while these are held
    // (watched for a while, as an absence can only be).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.token_reviews_in_flight(),
        (MAX_REVIEWS_AT_ONCE, MAX_REVIEWS_AT_ONCE)
    );
    server.hold_token_reviews(false);
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().node, "node-1");
    }
    assert_eq!(server.token_reviews().len(), MAX_REVIEWS_AT_ONCE + 16);
    assert_eq!(server.token_reviews_in_flight().1, MAX_REVIEWS_AT_ONCE);
}

#[tokio::test]
async fn token_review_refuses_unauthenticated_tokens() {
    let server = reviewer_server().await;
    let refused = reviewer(&server).authenticate("forged").await;
    assert_eq!(
        refused,
        Err(AuthError::Invalid("invalid bearer token".into()))
    );
    // A real token for another audience is not authenticated either.
    let other =
        TokenReviewer::new(client_for(server.url()).unwrap()).with_audiences(["vault".to_owned()]);
    assert!(matches!(
        other.authenticate("ztunnel-token").await,
        Err(AuthError::Invalid(_))
    ));
}

#[tokio::test]
async fn the_configured_reviewer_wants_tokens_for_istio_ca() {
    let server = reviewer_server().await;
    server.add_token(
        "api-token",
        TokenAnswer {
            username: ZTUNNEL.into(),
            node: Some("node-1".into()),
            pod: Some("a-pod-on-node-1".into()),
            audiences: vec!["https://kubernetes.default.svc".into()],
        },
    );
    let config = Config::try_parse_from(["istiod-lite", "--kube"]).unwrap();
    let reviewer = App::token_reviewer(client_for(server.url()).unwrap(), &config).unwrap();
    let caller = reviewer.authenticate("ztunnel-token").await.unwrap();
    assert_eq!(caller.node, "node-1");
    // ztunnel's default token, minted for the API server, is not one for the CA.
    let refused = reviewer.authenticate("api-token").await;
    assert!(matches!(refused, Err(AuthError::Invalid(_))), "{refused:?}");
    let reviews = server.token_reviews();
    assert_eq!(reviews.len(), 2);
    for review in &reviews {
        assert_eq!(review["spec"]["audiences"], json!(["istio-ca"]), "{review}");
    }

    // Other audiences when configured; an empty one stops start-up by name.
    let config =
        Config::try_parse_from(["istiod-lite", "--kube", "--token-audiences", "a,b"]).unwrap();
    let reviewer = App::token_reviewer(client_for(server.url()).unwrap(), &config).unwrap();
    assert!(reviewer.authenticate("ztunnel-token").await.is_err());
    assert_eq!(
        server.token_reviews()[2]["spec"]["audiences"],
        json!(["a", "b"])
    );
    let config =
        Config::try_parse_from(["istiod-lite", "--kube", "--token-audiences", ""]).unwrap();
    let err = App::token_reviewer(client_for(server.url()).unwrap(), &config).unwrap_err();
    assert!(err.to_string().contains("--token-audiences"), "{err}");
}

#[tokio::test]
async fn token_review_refuses_other_service_accounts() {
    let server = reviewer_server().await;
    let refused = reviewer(&server).authenticate("app-token").await;
    let Err(AuthError::Invalid(reason)) = refused else {
        panic!("expected Invalid, got {refused:?}");
    };
    assert!(reason.contains("shop/default"), "{reason}");

    // Unless it is allowed.
    let allowed = reviewer(&server).with_allowed([("shop".to_owned(), "default".to_owned())]);
    assert_eq!(
        allowed.authenticate("app-token").await.unwrap().node,
        "node-1"
    );
}

#[tokio::test]
async fn token_review_errors_are_unavailable() {
    let server = reviewer_server().await;
    server.refuse_token_reviews();
    let refused = reviewer(&server).authenticate("ztunnel-token").await;
    assert!(
        matches!(refused, Err(AuthError::Unavailable(_))),
        "{refused:?}"
    );
}
