//! The delta ADS stream: subscribe, apply each response through the handler,
//! ACK or NACK it, record the versions accepted, reconnect with backoff.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use ambit_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambit_proto::google::rpc;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::status::{Nack, XdsStatus};
use super::{Handler, MAX_MESSAGE_SIZE, Node, Refusal, Resource};
use crate::backoff::{Backoff, BackoffConfig};
use crate::control::{BearerToken, ControlError, ControlPlane};
use crate::drain::DrainWatcher;

/// Requests waiting to be sent on the stream (subscriptions, ACKs, NACKs).
const REQUEST_QUEUE: usize = 16;

/// A NACK message longer than this is cut: the server logs and shows it.
const MAX_NACK_MESSAGE: usize = 8 * 1024;

/// The wildcard resource name: every resource of the type.
const WILDCARD: &str = "*";

/// `google.rpc.Code::INVALID_ARGUMENT`, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

/// Why a stream ended; every one is retried.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("opening the stream: {code:?}: {message}")]
    Open { code: tonic::Code, message: String },
    #[error("stream failed: {code:?}: {message}")]
    Stream { code: tonic::Code, message: String },
    #[error("the control plane closed the stream")]
    Closed,
    #[error("the request stream closed")]
    RequestsClosed,
}

impl XdsError {
    fn open(s: tonic::Status) -> Self {
        Self::Open {
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    fn stream(s: tonic::Status) -> Self {
        Self::Stream {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// Type URL -> resource name -> version accepted.
type Held = HashMap<&'static str, HashMap<String, String>>;

/// A delta xDS client; [`XdsClient::run`] drives it until drained.
#[derive(Debug)]
pub struct XdsClient<H> {
    channel: Channel,
    auth: BearerToken,
    node: Node,
    types: Vec<&'static str>,
    handler: H,
    backoff: BackoffConfig,
    status: XdsStatus,
    synced: watch::Sender<bool>,
}

impl<H: Handler> XdsClient<H> {
    /// A client of the control plane `control` that subscribes to every type of
    /// `types` (type URLs) as `node`.
    pub fn new(
        control: &ControlPlane,
        node: Node,
        types: Vec<&'static str>,
        handler: H,
    ) -> Result<Self, ControlError> {
        Ok(Self::with_channel(
            control.channel()?,
            control.auth(),
            control.address.clone(),
            node,
            types,
            handler,
        ))
    }

    /// A client over an existing channel; `address` is only shown in the status.
    pub fn with_channel(
        channel: Channel,
        auth: BearerToken,
        address: String,
        node: Node,
        types: Vec<&'static str>,
        handler: H,
    ) -> Self {
        Self {
            channel,
            auth,
            node,
            status: XdsStatus::new(address, &types),
            types,
            handler,
            backoff: BackoffConfig::default(),
            synced: watch::channel(false).0,
        }
    }

    /// Replaces the reconnect delays.
    pub fn with_backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = backoff;
        self
    }

    /// The client's status, for admin pages.
    pub fn status(&self) -> XdsStatus {
        self.status.clone()
    }

    /// Becomes true once every type has had its first response; stays true
    /// across reconnects (the state held is still the last good one).
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Streams until `drain` signals; never gives up on the control plane.
    pub async fn run(self, drain: DrainWatcher) {
        let mut held = Held::new();
        let mut seen = HashSet::new();
        let mut backoff = Backoff::new(self.backoff);
        let address = self.status.snapshot().address;
        loop {
            let opened = Instant::now();
            let error = tokio::select! {
                () = drain.signaled() => break,
                e = self.stream(&mut held, &mut seen) => e,
            };
            let delay = backoff.after_session(opened.elapsed());
            let failures = backoff.failures();
            tracing::warn!(%address, %error, failures, retry_in = ?delay, "xDS stream failed; reconnecting");
            self.status.update(|s| {
                s.connected = false;
                s.last_error = Some(error.to_string());
                s.failures = failures;
                s.retry_in = Some(delay);
            });
            tokio::select! {
                () = drain.signaled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.status.update(|s| s.connected = false);
    }

    /// One stream, from subscription to failure.
    async fn stream(&self, held: &mut Held, seen: &mut HashSet<&'static str>) -> XdsError {
        let (tx, mut rx) = mpsc::channel(REQUEST_QUEUE.max(self.types.len() + 1));
        for type_url in &self.types {
            let initial = DeltaDiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: type_url.to_string(),
                resource_names_subscribe: vec![WILDCARD.to_string()],
                initial_resource_versions: held.get(type_url).cloned().unwrap_or_default(),
                ..Default::default()
            };
            if tx.try_send(initial).is_err() {
                return XdsError::RequestsClosed;
            }
        }
        let requests = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
        .max_decoding_message_size(MAX_MESSAGE_SIZE);
        let mut responses = match client.delta_aggregated_resources(requests).await {
            Ok(r) => r.into_inner(),
            Err(s) => return XdsError::open(s),
        };
        self.status.update(|s| {
            s.connected = true;
            s.streams += 1;
        });
        tracing::info!(address = %self.status.snapshot().address, types = ?self.types, "xDS stream open");
        loop {
            let response = match responses.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return XdsError::Closed,
                Err(s) => return XdsError::stream(s),
            };
            let reply = self.handle(response, held, seen);
            if tx.send(reply).await.is_err() {
                return XdsError::RequestsClosed;
            }
        }
    }

    /// Applies one response and returns its ACK or NACK.
    fn handle(
        &self,
        response: DeltaDiscoveryResponse,
        held: &mut Held,
        seen: &mut HashSet<&'static str>,
    ) -> DeltaDiscoveryRequest {
        let nonce = response.nonce;
        let more_to_come = response.system_version_info.ends_with(super::MORE_TO_COME);
        let Some(type_url) = self.types.iter().copied().find(|t| *t == response.type_url) else {
            let message = format!("type {:?} was not subscribed", response.type_url);
            tracing::warn!(%message, %nonce, "xDS response refused");
            return nack(response.type_url, nonce, message);
        };
        let total = response.resources.len() + response.removed_resources.len();
        let mut refused: Vec<Refusal> = Vec::new();
        let mut updated = Vec::with_capacity(response.resources.len());
        for r in response.resources {
            match r.resource {
                _ if r.name.is_empty() => refused.push((r.name, "the resource has no name".into())),
                None => refused.push((r.name, "the resource has no body".into())),
                Some(any) if !any.type_url.is_empty() && any.type_url != type_url => {
                    let problem = format!(
                        "a resource of type {} in a {type_url} response",
                        any.type_url
                    );
                    refused.push((r.name, problem));
                }
                Some(any) => updated.push(Resource {
                    name: r.name,
                    version: r.version,
                    body: any.value,
                }),
            }
        }
        let versions: Vec<(String, String)> = updated
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        let removed = response.removed_resources;
        let by_handler = self
            .handler
            .apply(type_url, updated, removed.clone())
            .err()
            .unwrap_or_default();
        let refused_names: HashSet<&str> = by_handler.iter().map(|(n, _)| n.as_str()).collect();
        // Refused resources keep their old version: the map says what is applied,
        // or held back by the handler to apply later.
        let map = held.entry(type_url).or_default();
        for (name, version) in versions {
            if !refused_names.contains(name.as_str()) || self.handler.holds_back(type_url, &name) {
                map.insert(name, version);
            }
        }
        for name in &removed {
            if !refused_names.contains(name.as_str()) {
                map.remove(name);
            }
        }
        refused.extend(by_handler);
        let held_now = map.len();
        // The first sync of the type is over at its last part.
        let first = !more_to_come && seen.insert(type_url);
        let now = SystemTime::now();
        let reply = if refused.is_empty() {
            tracing::debug!(type_url, %nonce, resources = held_now, "xDS response ACKed");
            self.status.update_type(type_url, |t| {
                t.last_ack = Some((nonce.clone(), now));
            });
            ack(type_url, nonce.clone())
        } else {
            let message = nack_message(&refused, total);
            tracing::warn!(type_url, %nonce, %message, "xDS response NACKed; keeping the last good version of what was refused");
            self.status.update_type(type_url, |t| {
                t.last_nack = Some(Nack {
                    at: now,
                    nonce: nonce.clone(),
                    message: message.clone(),
                });
            });
            nack(type_url.to_string(), nonce, message)
        };
        self.status.update_type(type_url, |t| {
            t.resources = held_now;
            t.responses += 1;
        });
        if first && seen.len() == self.types.len() {
            tracing::info!("xDS synced: every type has had a response");
            self.status.update(|s| s.synced = true);
            self.synced.send_replace(true);
        }
        reply
    }
}

fn ack(type_url: &str, nonce: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_string(),
        response_nonce: nonce,
        ..Default::default()
    }
}

fn nack(type_url: String, nonce: String, message: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url,
        response_nonce: nonce,
        error_detail: Some(rpc::Status {
            code: INVALID_ARGUMENT,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

/// `refused 1 of 3 resources: a: why; b: why`, cut at a bound.
fn nack_message(refused: &[Refusal], total: usize) -> String {
    let mut message = format!("refused {} of {total} resources: ", refused.len());
    for (i, (name, error)) in refused.iter().enumerate() {
        if i > 0 {
            message.push_str("; ");
        }
        message.push_str(name);
        message.push_str(": ");
        message.push_str(error);
        if message.len() > MAX_NACK_MESSAGE {
            let mut cut = MAX_NACK_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" ...");
            break;
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nack_message_names_each_refusal_and_stays_bounded() {
        let refused = vec![
            ("a".to_string(), "bad".to_string()),
            ("b".into(), "worse".into()),
        ];
        assert_eq!(
            nack_message(&refused, 5),
            "refused 2 of 5 resources: a: bad; b: worse"
        );
        let many: Vec<Refusal> = (0..10_000)
            .map(|i| (format!("w{i}"), "é".repeat(10)))
            .collect();
        let m = nack_message(&many, 10_000);
        assert!(
            m.len() <= MAX_NACK_MESSAGE + 4 && m.ends_with(" ..."),
            "{}",
            m.len()
        );
    }
}
