//! Kubernetes source: one `kube` watcher per kind the model reads. Each list or
//! relist (after a 410 Gone, say) is delivered as one batch, and what the relist
//! no longer shows is deleted; bad objects are reported per kind as `kube:<Kind>`.

mod mirror;

use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::{Api, Client};
use mesh_core::drain::DrainWatcher;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::model::{Kind, ObjectError, Report, SourceEvent};
use mirror::{KindMirror, Listed, Output};

/// Why a Kubernetes client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no Kubernetes configuration (in-cluster or kubeconfig): {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("bad API server address {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// The client production uses: in-cluster config, else the kubeconfig.
pub async fn infer_client() -> Result<Client, KubeError> {
    let config = kube::Config::infer().await?;
    Ok(Client::try_from(config)?)
}

/// A client for an API server at `url` with no credentials (tests, `kubectl proxy`).
pub fn client_for(url: &str) -> Result<Client, KubeError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| KubeError::Url {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(Client::try_from(kube::Config::new(uri))?)
}

/// The API resource of a kind: group, version and plural as the server names them.
pub fn api_resource(kind: Kind) -> ApiResource {
    api_resource_at(kind, kind.api().0)
}

/// The versions a kind is watched at, in order of preference: an
/// AuthorizationPolicy or PeerAuthentication falls back to `v1beta1`, the only
/// one Istio before 1.22 serves (same schema).
fn watched_versions(kind: Kind) -> Vec<&'static str> {
    match kind {
        Kind::AuthorizationPolicy | Kind::PeerAuthentication => {
            vec!["security.istio.io/v1", "security.istio.io/v1beta1"]
        }
        _ => vec![kind.api().0],
    }
}

/// A kind that must be listed before the source reports synced, even when the
/// API server does not serve it: without AuthorizationPolicies, the proxies
/// would allow what the policies deny; without PeerAuthentications, they would
/// accept plaintext that a STRICT policy refuses.
fn required_when_missing(kind: Kind) -> bool {
    matches!(kind, Kind::AuthorizationPolicy | Kind::PeerAuthentication)
}

/// The API resource of a kind at one of its versions.
fn api_resource_at(kind: Kind, api_version: &str) -> ApiResource {
    let kind_name = kind.api().1;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = match kind {
        Kind::Namespace => "namespaces",
        Kind::Pod => "pods",
        Kind::Service => "services",
        Kind::ServiceAccount => "serviceaccounts",
        Kind::EndpointSlice => "endpointslices",
        Kind::Gateway => "gateways",
        Kind::HttpRoute => "httproutes",
        Kind::AuthorizationPolicy => "authorizationpolicies",
        Kind::PeerAuthentication => "peerauthentications",
        Kind::DestinationRule => "destinationrules",
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind_name), plural)
}

/// How long to wait before retrying after an error.
#[derive(Clone, Copy, Debug)]
enum RetryPolicy {
    /// kube's default (client-go's): 0.8 s doubling to 30 s, with jitter.
    Default,
    /// Doubling from `initial` up to `max`, no jitter (tests).
    Exponential { initial: Duration, max: Duration },
}

impl RetryPolicy {
    fn backoff(self) -> Box<dyn Backoff> {
        match self {
            RetryPolicy::Default => Box::new(DefaultBackoff::default()),
            RetryPolicy::Exponential { initial, max } => Box::new(Doubling {
                initial,
                max,
                next: initial,
            }),
        }
    }
}

/// A plain doubling backoff.
struct Doubling {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Iterator for Doubling {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (now * 2).min(self.max);
        Some(now)
    }
}

impl Backoff for Doubling {
    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Watches every [`Kind`] through the Kubernetes API and feeds the model.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    retry: RetryPolicy,
    watch_timeout: Option<u32>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("retry", &self.retry)
            .field("watch_timeout", &self.watch_timeout)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            retry: RetryPolicy::Default,
            watch_timeout: None,
        }
    }

    /// Retries after errors from `initial`, doubling up to `max`, instead of
    /// kube's default (0.8 s to 30 s with jitter). For tests.
    #[must_use]
    pub fn with_retry(mut self, initial: Duration, max: Duration) -> Self {
        self.retry = RetryPolicy::Exponential { initial, max };
        self
    }

    /// Asks the server to end each watch after `secs` (kube's default is 290 s);
    /// the watcher then resumes from the last resource version.
    #[must_use]
    pub fn with_watch_timeout(mut self, secs: u32) -> Self {
        self.watch_timeout = Some(secs);
        self
    }

    /// Runs until the drain starts (or the model goes away). Sends
    /// [`SourceEvent::Synced`] once every kind has finished its first list; a
    /// kind whose resource does not exist (CRD not installed) counts as listed
    /// and empty, and is retried with backoff until it appears. Except
    /// AuthorizationPolicy and PeerAuthentication: read at `v1`, else `v1beta1`;
    /// served at neither, it is reported (origin `kube:<Kind>:api`) and the
    /// source does not sync until it is, since proxies without their policies
    /// would fail open.
    pub async fn run(self, tx: mpsc::Sender<SourceEvent>, drain: DrainWatcher) {
        let (listed_tx, mut listed_rx) = mpsc::channel::<Kind>(Kind::ALL.len());
        let mut tasks = JoinSet::new();
        for kind in Kind::ALL {
            let mut config = watcher::Config::default();
            if let Some(secs) = self.watch_timeout {
                config = config.timeout(secs);
            }
            let watch = KindWatch {
                kind,
                client: self.client.clone(),
                versions: watched_versions(kind),
                version: 0,
                config,
                backoff: self.retry.backoff(),
                tx: tx.clone(),
                listed: Some(listed_tx.clone()),
                drain: drain.clone(),
            };
            tasks.spawn(watch.run());
        }
        drop(listed_tx);

        let mut pending: std::collections::BTreeSet<Kind> = Kind::ALL.into_iter().collect();
        while !pending.is_empty() {
            tokio::select! {
                _ = drain.signaled() => break,
                kind = listed_rx.recv() => match kind {
                    Some(kind) => { pending.remove(&kind); }
                    None => break,
                },
            }
        }
        if pending.is_empty() {
            tracing::info!("kubernetes source synced");
            tokio::select! {
                _ = drain.signaled() => {}
                _ = tx.send(SourceEvent::Synced) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// The watch of one kind.
struct KindWatch {
    kind: Kind,
    client: Client,
    /// [`watched_versions`], and the one watched now.
    versions: Vec<&'static str>,
    version: usize,
    config: watcher::Config,
    backoff: Box<dyn Backoff>,
    tx: mpsc::Sender<SourceEvent>,
    /// Told once, when the first list is done.
    listed: Option<mpsc::Sender<Kind>>,
    drain: DrainWatcher,
}

impl KindWatch {
    /// A watcher of the current version.
    fn watch(
        &self,
    ) -> futures_util::stream::BoxStream<'static, watcher::Result<Event<DynamicObject>>> {
        let resource = api_resource_at(self.kind, self.versions[self.version]);
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
        watcher::watcher(api, self.config.clone()).boxed()
    }

    async fn run(mut self) {
        let kind = self.kind;
        let mut mirror = KindMirror::new(kind);
        let mut stream = self.watch();
        // Errors are logged at warn once per failure streak, then at debug.
        let mut failing = false;
        // Set while a required kind is served at none of its versions.
        let mut missing_reported = false;
        loop {
            let item = tokio::select! {
                _ = self.drain.signaled() => return,
                item = stream.next() => item,
            };
            let Some(item) = item else { return };
            let event = match item {
                Ok(event) => event,
                Err(error) if is_not_found(&error) && self.version + 1 < self.versions.len() => {
                    tracing::info!(
                        %kind,
                        missing = self.versions[self.version],
                        next = self.versions[self.version + 1],
                        "the API server does not serve this version; watching the next"
                    );
                    self.version += 1;
                    stream = self.watch();
                    continue;
                }
                Err(error) => {
                    let missing = is_not_found(&error);
                    failing |= self.on_error(&error, failing);
                    if missing && required_when_missing(kind) && !missing_reported {
                        missing_reported = true;
                        if !self
                            .deliver(self.missing_report(vec![self.missing_kind()]))
                            .await
                        {
                            return;
                        }
                    }
                    let delay = self.backoff.next().unwrap_or(Duration::from_secs(30));
                    tokio::select! {
                        _ = self.drain.signaled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    if missing && self.version > 0 {
                        // Start again from the preferred version.
                        self.version = 0;
                        stream = self.watch();
                    }
                    continue;
                }
            };
            let progress = !matches!(event, Event::Init | Event::InitApply(_));
            if progress {
                if failing {
                    tracing::info!(%kind, "kubernetes watch recovered");
                }
                failing = false;
                self.backoff.reset();
            }
            if missing_reported && matches!(event, Event::InitDone) {
                missing_reported = false;
                if !self.deliver(self.missing_report(Vec::new())).await {
                    return;
                }
            }
            let output = match event {
                Event::Init => {
                    mirror.init();
                    Output::default()
                }
                Event::InitApply(object) | Event::Apply(object) => match listed(kind, object) {
                    Some(listed) => mirror.apply(listed),
                    None => Output::default(),
                },
                Event::Delete(object) => {
                    let namespace = object.metadata.namespace.unwrap_or_default();
                    match object.metadata.name {
                        Some(name) => mirror.delete(namespace, name),
                        None => Output::default(),
                    }
                }
                Event::InitDone => {
                    let output = mirror.init_done();
                    if !self.send(mirror.origin(), output).await {
                        return;
                    }
                    self.first_list_done().await;
                    continue;
                }
            };
            if !self.send(mirror.origin(), output).await {
                return;
            }
        }
    }

    /// Logs an error; false when it is part of normal operation (410 Gone).
    fn on_error(&mut self, error: &watcher::Error, failing: bool) -> bool {
        let kind = self.kind;
        match status_code(error) {
            // The normal end of a watch whose resource version expired: relist.
            Some(410) => {
                tracing::debug!(%kind, "watch expired (410 Gone), relisting");
                return false;
            }
            Some(404) if required_when_missing(kind) => {
                if !failing {
                    tracing::error!(
                        %kind,
                        versions = ?self.versions,
                        "the API server does not serve this kind (CRD not installed?); \
                         not synced until it does, retrying"
                    );
                }
            }
            Some(404) => {
                if !failing {
                    tracing::warn!(
                        %kind,
                        resource = %api_resource(kind).plural,
                        "the API server does not serve this kind (CRD not installed?); \
                         treating it as empty and retrying"
                    );
                }
                // Nothing of this kind exists: that is a complete first list.
                if let Some(listed) = self.listed.take() {
                    let _ = listed.try_send(kind);
                }
            }
            _ if failing => tracing::debug!(%kind, %error, "kubernetes watch still failing"),
            _ => tracing::warn!(%kind, %error, "kubernetes watch failed, retrying"),
        }
        true
    }

    /// `kube:<Kind>:api`: the origin of reports on the kind's API, as opposed to
    /// its objects (`kube:<Kind>`).
    fn api_origin(&self) -> String {
        format!("kube:{}:api", self.kind.api().1)
    }

    /// The reports of origin [`Self::api_origin`].
    fn missing_report(&self, reports: Vec<Report>) -> SourceEvent {
        SourceEvent::Reports {
            origin: self.api_origin(),
            reports,
        }
    }

    /// The problem of a required kind served at none of its versions.
    fn missing_kind(&self) -> Report {
        let plural = api_resource(self.kind).plural;
        let versions = self
            .versions
            .iter()
            .map(|v| format!("{v} {plural}"))
            .collect::<Vec<_>>()
            .join(" nor ");
        Report {
            origin: self.api_origin(),
            document: None,
            error: ObjectError {
                kind: self.kind.api().1.into(),
                namespace: String::new(),
                name: String::new(),
                field: "apiVersion".into(),
                problem: format!(
                    "the API server serves neither {versions} (404; is the CRD installed?): \
                     the source does not report synced until it does, as proxies given no \
                     policies would allow what the policies deny"
                ),
            },
        }
    }

    async fn first_list_done(&mut self) {
        if let Some(listed) = self.listed.take() {
            let _ = listed.send(self.kind).await;
        }
    }

    /// Sends what an event produced; false once the model is gone or draining.
    async fn send(&self, origin: &str, output: Output) -> bool {
        let Output { changes, reports } = output;
        if !changes.is_empty() && !self.deliver(SourceEvent::Changes(changes)).await {
            return false;
        }
        if let Some(reports) = reports {
            let event = SourceEvent::Reports {
                origin: origin.to_owned(),
                reports,
            };
            return self.deliver(event).await;
        }
        true
    }

    async fn deliver(&self, event: SourceEvent) -> bool {
        tokio::select! {
            _ = self.drain.signaled() => false,
            sent = self.tx.send(event) => sent.is_ok(),
        }
    }
}

/// Whether the error is a 404: the API server does not serve the resource.
fn is_not_found(error: &watcher::Error) -> bool {
    status_code(error) == Some(404)
}

/// The HTTP status the API server answered a failed list or watch with.
fn status_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    }
}

/// The object as the model reads it: JSON with `apiVersion` and `kind` set (list
/// items come without them; an older served version with the same schema, such
/// as AuthorizationPolicy `v1beta1`, is read as the current one), minus
/// `managedFields`, which nothing reads.
fn listed(kind: Kind, object: DynamicObject) -> Option<Listed> {
    let DynamicObject {
        types: _,
        mut metadata,
        data,
    } = object;
    let Some(name) = metadata.name.clone() else {
        tracing::warn!(%kind, "object without a name ignored");
        return None;
    };
    metadata.managed_fields = None;
    let namespace = metadata.namespace.clone().unwrap_or_default();
    let resource_version = metadata.resource_version.clone().unwrap_or_default();
    let mut json = match data {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    let (api_version, kind_name) = kind.api();
    json.insert("apiVersion".into(), api_version.into());
    json.insert("kind".into(), kind_name.into());
    match serde_json::to_value(&metadata) {
        Ok(meta) => {
            json.insert("metadata".into(), meta);
        }
        Err(error) => {
            tracing::warn!(%kind, %name, %error, "cannot re-encode metadata");
            return None;
        }
    }
    Some(Listed {
        namespace,
        name,
        resource_version,
        json: serde_json::Value::Object(json),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_resources_name_the_real_paths() {
        let pods = api_resource(Kind::Pod);
        assert_eq!((pods.group.as_str(), pods.version.as_str()), ("", "v1"));
        assert_eq!(pods.plural, "pods");
        let ap = api_resource(Kind::AuthorizationPolicy);
        assert_eq!(ap.api_version, "security.istio.io/v1");
        assert_eq!(ap.plural, "authorizationpolicies");
        let pa = api_resource_at(Kind::PeerAuthentication, "security.istio.io/v1beta1");
        assert_eq!(pa.api_version, "security.istio.io/v1beta1");
        assert_eq!(pa.plural, "peerauthentications");
        // Without PeerAuthentications, ztunnel would accept plaintext STRICT refuses.
        assert!(required_when_missing(Kind::PeerAuthentication));
        assert_eq!(watched_versions(Kind::PeerAuthentication).len(), 2);
        let route = api_resource(Kind::HttpRoute);
        assert_eq!(route.group, "gateway.networking.k8s.io");
        assert_eq!(route.kind, "HTTPRoute");
    }

    #[test]
    fn doubling_backoff_caps_and_resets() {
        let mut b = RetryPolicy::Exponential {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(25),
        }
        .backoff();
        let got: Vec<_> = (&mut b).take(3).collect();
        assert_eq!(got, [10, 20, 25].map(Duration::from_millis));
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(10)));
    }
}
