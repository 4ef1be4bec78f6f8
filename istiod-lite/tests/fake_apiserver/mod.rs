//! A fake Kubernetes API server for tests: plain HTTP/1.1 on 127.0.0.1 speaking
//! the real list/watch protocol (lists with a resourceVersion, chunked watches of
//! newline-delimited events replayed from a version, 410 Gone as an ERROR event)
//! for the kinds istiod-lite reads, plus TokenReview. The test drives it.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

type Body = BoxBody<Bytes, std::io::Error>;
type WatchTx = mpsc::UnboundedSender<Result<Frame<Bytes>, std::io::Error>>;

/// `(apiVersion, kind, plural)` of every kind served.
const RESOURCES: [(&str, &str, &str); 10] = [
    ("v1", "Namespace", "namespaces"),
    ("v1", "Pod", "pods"),
    ("v1", "Service", "services"),
    ("v1", "ServiceAccount", "serviceaccounts"),
    ("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
    ("gateway.networking.k8s.io/v1", "Gateway", "gateways"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
    (
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "security.istio.io/v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "networking.istio.io/v1",
        "DestinationRule",
        "destinationrules",
    ),
];

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// What a token stands for, as the API server would say.
#[derive(Clone, Debug)]
pub struct TokenAnswer {
    pub username: String,
    /// Put in `user.extra["authentication.kubernetes.io/node-name"]`.
    pub node: Option<String>,
    /// Put in `user.extra["authentication.kubernetes.io/pod-name"]`: a token
    /// bound to a pod has it, one bound to a Node object only `node`.
    pub pod: Option<String>,
    /// The audiences the token was issued for.
    pub audiences: Vec<String>,
}

struct Collection {
    api_version: String,
    kind: String,
    path: String,
    /// False answers 404, as for a CRD that is not installed.
    served: bool,
    objects: BTreeMap<(String, String), Value>,
    /// Every event, for watches that resume from a resource version.
    history: Vec<(u64, &'static str, Value)>,
    watchers: Vec<WatchTx>,
    gone_next_watch: bool,
    lists: usize,
    watches: usize,
}

#[derive(Default)]
struct State {
    rv: u64,
    collections: Vec<Collection>,
    tokens: HashMap<String, TokenAnswer>,
    refuse_reviews: bool,
    /// Every TokenReview received, as sent.
    reviews: Vec<Value>,
    /// While true, TokenReviews are held unanswered.
    hold_reviews: tokio::sync::watch::Sender<bool>,
    reviews_in_flight: usize,
    most_reviews_in_flight: usize,
}

impl State {
    fn collection(&mut self, kind: &str) -> &mut Collection {
        self.collections
            .iter_mut()
            .find(|c| c.kind == kind)
            .unwrap_or_else(|| panic!("the fake API server does not serve {kind}"))
    }
}

/// The server; stops accepting when dropped.
pub struct FakeApiServer {
    url: String,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeApiServer {
    pub async fn start() -> Self {
        let mut state = State::default();
        for (api_version, kind, plural) in RESOURCES {
            let path = if api_version.contains('/') {
                format!("/apis/{api_version}/{plural}")
            } else {
                format!("/api/{api_version}/{plural}")
            };
            state.collections.push(Collection {
                api_version: api_version.into(),
                kind: kind.into(),
                path,
                served: true,
                objects: BTreeMap::new(),
                history: Vec::new(),
                watchers: Vec::new(),
                gone_next_watch: false,
                lists: 0,
                watches: 0,
            });
        }
        let state = Arc::new(Mutex::new(state));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    // Errors here are dropped watches and closed clients.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { url, state, accept }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Creates or replaces an object (ADDED or MODIFIED to watchers).
    pub fn apply(&self, object: Value) {
        let kind = object["kind"].as_str().unwrap().to_owned();
        let mut state = self.state();
        let key = key_of(&object);
        let exists = state.collection(&kind).objects.contains_key(&key);
        let event = if exists { "MODIFIED" } else { "ADDED" };
        record(&mut state, &kind, event, object);
    }

    /// Deletes an object (DELETED to watchers).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let mut state = self.state();
        let key = (namespace.to_owned(), name.to_owned());
        let object = state.collection(kind).objects.get(&key).cloned();
        record(&mut state, kind, "DELETED", object.unwrap());
    }

    /// Deletes an object without telling anyone, as if the event had been
    /// compacted away while no watch was open: only a relist shows it.
    pub fn delete_quietly(&self, kind: &str, namespace: &str, name: &str) {
        let mut state = self.state();
        state.rv += 1;
        let key = (namespace.to_owned(), name.to_owned());
        state.collection(kind).objects.remove(&key).unwrap();
    }

    /// The next watch of `kind` is answered with 410 Gone (an ERROR event).
    pub fn expire_next_watch(&self, kind: &str) {
        self.state().collection(kind).gone_next_watch = true;
    }

    /// Breaks every open watch connection of `kind` mid-stream.
    pub fn drop_watches(&self, kind: &str) {
        let mut state = self.state();
        for watcher in state.collection(kind).watchers.drain(..) {
            let _ = watcher.send(Err(std::io::Error::other("connection dropped by the test")));
        }
    }

    /// Serves `kind` at `api_version` only (a CRD of an older release); its
    /// objects stay.
    pub fn serve_at(&self, kind: &str, api_version: &str) {
        let mut state = self.state();
        let collection = state.collection(kind);
        let plural = collection.path.rsplit('/').next().unwrap().to_owned();
        collection.path = format!("/apis/{api_version}/{plural}");
        collection.api_version = api_version.into();
    }

    /// Whether `kind` is served (false: 404, as for a CRD not installed).
    pub fn set_served(&self, kind: &str, served: bool) {
        self.state().collection(kind).served = served;
    }

    /// How many lists of `kind` were answered.
    pub fn lists(&self, kind: &str) -> usize {
        self.state().collection(kind).lists
    }

    /// How many watches of `kind` were started.
    pub fn watches(&self, kind: &str) -> usize {
        self.state().collection(kind).watches
    }

    pub fn add_token(&self, token: &str, answer: TokenAnswer) {
        self.state().tokens.insert(token.to_owned(), answer);
    }

    /// The TokenReviews received so far, as sent (`spec.token`, `spec.audiences`).
    pub fn token_reviews(&self) -> Vec<Value> {
        self.state().reviews.clone()
    }

    /// While `hold` is true, TokenReviews are received but not answered.
    pub fn hold_token_reviews(&self, hold: bool) {
        self.state().hold_reviews.send_replace(hold);
    }

    /// TokenReviews received and not answered yet, and the most there were at once.
    pub fn token_reviews_in_flight(&self) -> (usize, usize) {
        let state = self.state();
        (state.reviews_in_flight, state.most_reviews_in_flight)
    }

    /// TokenReviews get 403 Forbidden, as without the RBAC to create them.
    pub fn refuse_token_reviews(&self) {
        self.state().refuse_reviews = true;
    }
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    let namespace = meta["namespace"].as_str().unwrap_or_default().to_owned();
    (namespace, meta["name"].as_str().unwrap().to_owned())
}

/// Stores one change with a new resource version and tells the watchers.
fn record(state: &mut State, kind: &str, event: &'static str, mut object: Value) {
    state.rv += 1;
    let rv = state.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    if object["metadata"]["uid"].is_null() {
        object["metadata"]["uid"] = json!(format!("uid-{rv}"));
    }
    let collection = state.collection(kind);
    let key = key_of(&object);
    if event == "DELETED" {
        collection.objects.remove(&key);
    } else {
        collection.objects.insert(key, object.clone());
    }
    let line = event_line(event, &object);
    collection
        .watchers
        .retain(|w| w.send(Ok(Frame::data(line.clone()))).is_ok());
    collection.history.push((rv, event, object));
}

fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap());
    let body = Full::new(bytes).map_err(|never| match never {}).boxed();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

fn not_found() -> Response<Body> {
    let status = status_object(
        404,
        "NotFound",
        "the server could not find the requested resource",
    );
    full(StatusCode::NOT_FOUND, &status)
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if req.method() == Method::POST && path == TOKEN_REVIEWS {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let review: Value = serde_json::from_slice(&body).unwrap();
        let mut held = {
            let mut state = state.lock().unwrap();
            state.reviews.push(review.clone());
            state.reviews_in_flight += 1;
            state.most_reviews_in_flight =
                state.most_reviews_in_flight.max(state.reviews_in_flight);
            state.hold_reviews.subscribe()
        };
        let _ = held.wait_for(|hold| !hold).await;
        let mut state = state.lock().unwrap();
        state.reviews_in_flight -= 1;
        return Ok(token_review(&state, review));
    }
    if req.method() != Method::GET {
        return Ok(not_found());
    }
    let mut state = state.lock().unwrap();
    let rv = state.rv;
    let Some(collection) = state
        .collections
        .iter_mut()
        .find(|c| c.path == path && c.served)
    else {
        return Ok(not_found());
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        collection.lists += 1;
        let items: Vec<Value> = collection.objects.values().cloned().collect();
        let list = json!({
            "kind": format!("{}List", collection.kind),
            "apiVersion": collection.api_version,
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        });
        return Ok(full(StatusCode::OK, &list));
    }
    collection.watches += 1;
    let (tx, rx) = mpsc::unbounded_channel();
    if std::mem::take(&mut collection.gone_next_watch) {
        let since = query.get("resourceVersion").cloned().unwrap_or_default();
        let message = format!("too old resource version: {since} ({rv})");
        let _ = tx.send(Ok(Frame::data(event_line(
            "ERROR",
            &status_object(410, "Expired", &message),
        ))));
        // The real server closes the watch after the error.
        drop(tx);
    } else {
        let since: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        for (version, event, object) in &collection.history {
            if *version > since {
                let _ = tx.send(Ok(Frame::data(event_line(event, object))));
            }
        }
        collection.watchers.push(tx);
    }
    let body = StreamBody::new(UnboundedReceiverStream::new(rx)).boxed();
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    Ok(response)
}

fn token_review(state: &State, review: Value) -> Response<Body> {
    if state.refuse_reviews {
        let message = "tokenreviews.authentication.k8s.io is forbidden: User \
                       \"system:serviceaccount:istio-system:istiod-lite\" cannot create resource";
        return full(
            StatusCode::FORBIDDEN,
            &status_object(403, "Forbidden", message),
        );
    }
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let status = match state.tokens.get(token) {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(answer) => {
            let granted: Vec<&String> = if wanted.is_empty() {
                answer.audiences.iter().collect()
            } else {
                wanted
                    .iter()
                    .filter(|a| answer.audiences.contains(a))
                    .collect()
            };
            if granted.is_empty() {
                json!({
                    "authenticated": false,
                    "error": format!("token audiences {:?} is invalid for the target audiences {wanted:?}", answer.audiences),
                })
            } else {
                let mut extra = serde_json::Map::new();
                if let Some(node) = &answer.node {
                    extra.insert(
                        "authentication.kubernetes.io/node-name".into(),
                        json!([node]),
                    );
                }
                if let Some(pod) = &answer.pod {
                    extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
                }
                json!({
                    "authenticated": true,
                    "audiences": granted,
                    "user": {
                        "username": answer.username,
                        "uid": "0f0e0d0c",
                        "groups": ["system:serviceaccounts", "system:authenticated"],
                        "extra": extra,
                    },
                })
            }
        }
    };
    let answer = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": status,
    });
    full(StatusCode::CREATED, &answer)
}
