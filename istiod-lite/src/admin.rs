//! istiod-lite's HTTP endpoints: the debug view on a loopback address (connected
//! clients with their ACKed versions and NACKs, the model's objects, every config
//! problem, the effective settings) and Prometheus metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use mesh_core::admin::{Reply, serve};
use mesh_core::drain::DrainWatcher;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::app::ModelState;
use crate::config::Config;
use crate::model::Object;
use crate::xds::XdsServer;

const INDEX: &str = "/debug/clients  connected proxies: subscriptions, ACKed versions, NACKs\n\
/debug/model    the objects read, by kind\n\
/debug/errors   config problems: file or source, kind, name, field\n\
/debug/config   the effective settings\n\
/healthz/ready  200 once the config source has synced\n";

/// What the endpoints read.
#[derive(Debug, Clone)]
pub struct Admin {
    pub config: Arc<Config>,
    pub model: Arc<ModelState>,
    pub xds: XdsServer,
    pub registry: Arc<Registry>,
}

impl Admin {
    /// Starts the debug and the metrics endpoints; returns their addresses.
    pub async fn serve(self, drain: DrainWatcher) -> anyhow::Result<(SocketAddr, SocketAddr)> {
        use anyhow::Context;
        let debug = self.clone();
        let admin = serve(
            self.config.admin_addr,
            "debug",
            move |req| debug.debug(req.uri().path()),
            drain.clone(),
        )
        .await
        .with_context(|| format!("--admin-addr {}", self.config.admin_addr))?;
        let registry = self.registry.clone();
        let model = self.model.clone();
        let metrics = serve(
            self.config.metrics_addr,
            "metrics",
            move |req| match req.uri().path() {
                "/metrics" | "/stats/prometheus" => {
                    Reply::metrics(mesh_core::metrics::encode(&registry))
                }
                "/healthz/ready" => ready(&model),
                _ => Reply::not_found(),
            },
            drain,
        )
        .await
        .with_context(|| format!("--metrics-addr {}", self.config.metrics_addr))?;
        Ok((admin, metrics))
    }

    fn debug(&self, path: &str) -> Reply {
        match path {
            "/" | "/debug" => Reply::text(StatusCode::OK, INDEX),
            "/debug/clients" => Reply::json(&self.xds.debug_snapshot()),
            "/debug/model" => Reply::json(&self.model_view()),
            "/debug/errors" => Reply::json(&self.model.all_reports()),
            "/debug/config" => Reply::json(&*self.config),
            "/healthz/ready" => ready(&self.model),
            _ => Reply::not_found(),
        }
    }

    fn model_view(&self) -> serde_json::Value {
        let t = self
            .model
            .translator
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut by_kind: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
            Default::default();
        for o in t.objects() {
            by_kind
                .entry(o.kind().to_string())
                .or_default()
                .push(object_json(o));
        }
        for list in by_kind.values_mut() {
            list.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
        }
        let (workloads, services, authorizations) = t.counts();
        json!({
            "synced": self.model.is_synced(),
            "resources": {
                "workloads": workloads,
                "services": services,
                "authorizations": authorizations,
            },
            "objects": by_kind,
        })
    }
}

fn object_json(o: &Object) -> serde_json::Value {
    let value = match o {
        Object::Namespace(x) => serde_json::to_value(x),
        Object::Pod(x) => serde_json::to_value(x),
        Object::Service(x) => serde_json::to_value(x),
        Object::ServiceAccount(x) => serde_json::to_value(x),
        Object::EndpointSlice(x) => serde_json::to_value(x),
        Object::Gateway(x) => serde_json::to_value(x),
        Object::HttpRoute(x) => serde_json::to_value(x),
        Object::AuthorizationPolicy(x) => serde_json::to_value(x),
        Object::PeerAuthentication(x) => serde_json::to_value(x),
        Object::DestinationRule(x) => serde_json::to_value(x),
    };
    json!({ "key": o.key().to_string(), "object": value.unwrap_or_default() })
}

fn ready(model: &ModelState) -> Reply {
    if model.is_synced() {
        Reply::text(StatusCode::OK, "ready\n")
    } else {
        Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "config source not synced\n",
        )
    }
}
