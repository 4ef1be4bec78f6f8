//! `run_model`: when "synced" opens the gRPC server and readiness.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::model::{Meta, Namespace, Object, ObjectChange, Pod};

/// Refuses everyone: no stream connects here.
struct NoAuth;

impl Authenticator for NoAuth {
    async fn authenticate(&self, _token: &str) -> Result<Caller, AuthError> {
        Err(AuthError::Missing)
    }
}

fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> Meta {
    Meta {
        name: name.into(),
        namespace: ns.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Meta::default()
    }
}

/// An enrolled namespace and a pod in it: one workload to push.
fn shop_with_a_pod() -> Vec<ObjectChange> {
    let ns = Namespace {
        meta: meta("", "shop", &[("istio.io/dataplane-mode", "ambient")]),
    };
    let pod = Pod {
        meta: meta("shop", "web-1", &[]),
        node_name: "node-a".into(),
        service_account: "web".into(),
        ips: vec!["198.18.0.7".parse().unwrap()],
        host_network: false,
        ready: true,
        terminal: false,
        named_ports: BTreeMap::new(),
        controller: None,
    };
    vec![
        ObjectChange::Upsert(Object::Namespace(ns)),
        ObjectChange::Upsert(Object::Pod(pod)),
    ]
}

/// A source's first view and its "synced" usually arrive in one batch: synced
/// must not open before that view is in the model (the CA's check) and released
/// to the xDS clients (their first push), however long the debounce.
#[tokio::test]
async fn synced_opens_only_once_the_first_view_is_applied_and_released() {
    let (_trigger, drain) = drain::channel();
    let store = Arc::new(ResourceStore::new());
    let settings = XdsSettings {
        debounce_quiet: Duration::from_millis(300),
        ..XdsSettings::default()
    };
    let (xds, _service) = XdsServer::new(
        store.clone(),
        settings,
        NoAuth,
        XdsMetrics::unregistered(),
        drain.clone(),
    )
    .unwrap();
    let model = Arc::new(ModelState {
        translator: RwLock::new(Translator::new(TranslateSettings::default())),
        reports: Mutex::default(),
        synced: tokio::sync::watch::Sender::new(false),
    });
    let (tx, rx) = mpsc::channel(16);
    tx.send(SourceEvent::Changes(shop_with_a_pod()))
        .await
        .unwrap();
    tx.send(SourceEvent::Synced).await.unwrap();
    let mut synced = model.synced.subscribe();
    tokio::spawn(run_model(rx, 1, model.clone(), xds, drain));

    synced.wait_for(|s| *s).await.unwrap();
    assert!(
        model.may_issue("node-a", "shop", "web"),
        "the CA sees the pod"
    );
    assert_eq!(store.len(ambit_proto::WORKLOAD_TYPE_URL), 1);
    assert!(store.generation() > 0);
    assert_eq!(store.released(), store.generation(), "released to clients");
}
