//! istiod-lite's settings: each has a flag, an environment variable, a default and
//! a line of doc, in this one place. A bad value stops start-up naming the setting;
//! the effective settings are logged at start and served on the debug endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_core::settings::{duration_as_text, parse_duration, parse_loopback, parse_size};
use serde::Serialize;

/// istiod-lite: the control plane of the Ambit mesh.
#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "istiod-lite", version)]
pub struct Config {
    /// Directories of Kubernetes YAML to serve (the embedded mode), watched; repeat
    /// the flag (or separate with commas) for several. They are read as one: an
    /// object defined in two files (of one directory or of two) is taken from the
    /// first in path order and the other definition is reported on /debug/errors.
    #[arg(
        long,
        env = "AMBIT_CONFIG_DIR",
        value_delimiter = ',',
        required_unless_present = "kube",
        conflicts_with = "kube"
    )]
    pub config_dir: Vec<PathBuf>,

    /// Read the cluster from the Kubernetes API (in-cluster or kubeconfig) instead.
    #[arg(long, env = "AMBIT_KUBE", default_value_t = false)]
    pub kube: bool,

    /// How often the config directory is checked for changes.
    #[arg(long, env = "AMBIT_CONFIG_POLL", default_value = "250ms", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub config_poll: Duration,

    /// Directory of the CA root (generated at first start; the key is written 0600).
    #[arg(long, env = "AMBIT_CA_DIR", default_value = "/var/lib/ambit/ca")]
    pub ca_dir: PathBuf,

    /// Trust domain of the mesh's SPIFFE identities.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// The mesh's root namespace: policies there apply to the whole mesh, and
    /// istiod-lite's own identity lives there.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,

    /// Default lifetime of the workload certificates the CA signs.
    #[arg(long, env = "AMBIT_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub cert_ttl: Duration,

    /// Longest lifetime a CSR may ask for.
    #[arg(long, env = "AMBIT_MAX_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub max_cert_ttl: Duration,

    /// gRPC over TLS: delta xDS and the CA, for every proxy.
    #[arg(long, env = "AMBIT_GRPC_ADDR", default_value = "0.0.0.0:15012")]
    pub grpc_addr: SocketAddr,

    /// Debug endpoint (clients, model, errors); must be a loopback address.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:8080", value_parser = parse_loopback)]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics endpoint.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    pub metrics_addr: SocketAddr,

    /// Embedded mode: file of `<node> <token>` lines that authenticate node proxies.
    #[arg(long, env = "AMBIT_NODE_TOKENS", required_unless_present = "kube")]
    pub node_tokens: Option<PathBuf>,

    /// Kubernetes mode: service accounts (`<ns>/<sa>`) whose tokens may act as node
    /// proxies. In both modes the CA never issues these identities.
    #[arg(
        long,
        env = "AMBIT_PROXY_ACCOUNTS",
        value_delimiter = ',',
        default_value = "istio-system/ztunnel"
    )]
    pub proxy_accounts: Vec<String>,

    /// Kubernetes mode: a proxy's token must be issued for one of these audiences
    /// (checked by the TokenReview), as Istio's `istio-ca`: a token minted for
    /// another service (the API server's own, a vault's) is refused.
    #[arg(
        long,
        env = "AMBIT_TOKEN_AUDIENCES",
        value_delimiter = ',',
        default_value = "istio-ca"
    )]
    pub token_audiences: Vec<String>,

    /// A push waits for this much quiet after the last change...
    #[arg(long, env = "AMBIT_DEBOUNCE_QUIET", default_value = "100ms", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub debounce_quiet: Duration,

    /// ...but never longer than this after the first.
    #[arg(long, env = "AMBIT_DEBOUNCE_MAX", default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub debounce_max: Duration,

    /// An xDS response stops taking resources at this size; the rest follows in
    /// the next one. Each stream keeps an encode buffer of its largest response.
    #[arg(long, env = "AMBIT_XDS_MAX_RESPONSE", default_value = "32KiB", value_parser = parse_size)]
    pub xds_max_response: usize,

    /// Bytes of xDS responses sent and not yet answered by their client, across
    /// all clients: bounds memory when every proxy syncs at once.
    #[arg(long, env = "AMBIT_XDS_PUSH_BUDGET", default_value = "8MiB", value_parser = parse_size)]
    pub xds_push_budget: usize,

    /// A stream whose oldest response has gone unanswered (no ACK, no NACK) this
    /// long is closed; its proxy reconnects and gets only what changed.
    #[arg(long, env = "AMBIT_XDS_ANSWER_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub xds_answer_timeout: Duration,

    /// xDS streams one node's credential may hold open at once (a ztunnel holds
    /// one, two while it restarts); more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "AMBIT_XDS_MAX_STREAMS_PER_NODE", default_value_t = 4)]
    pub xds_max_streams_per_node: usize,

    /// Resource names of one type a stream may subscribe to by name, or claim to
    /// hold when it reconnects; a request that would hold more is refused.
    #[arg(long, env = "AMBIT_XDS_MAX_NAMES_PER_TYPE", default_value_t = 65536)]
    pub xds_max_names_per_type: usize,

    /// On shutdown, streams get this long to finish before they are closed.
    #[arg(long, env = "AMBIT_DRAIN_DEADLINE", default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub drain_deadline: Duration,
}

impl Config {
    /// The identity istiod-lite serves under; clients expect it.
    pub fn identity(&self) -> Result<mesh_core::SpiffeId, mesh_core::SpiffeIdError> {
        mesh_core::SpiffeId::new(&self.trust_domain, &self.root_namespace, "istiod-lite")
    }

    /// `--cert-ttl` and `--max-cert-ttl`, checked: the default lifetime may not
    /// exceed the longest one (it would be cut silently).
    pub fn checked_cert_ttls(&self) -> Result<(Duration, Duration), String> {
        if self.cert_ttl > self.max_cert_ttl {
            return Err(format!(
                "--cert-ttl {:?} is longer than --max-cert-ttl {:?}: raise --max-cert-ttl or lower --cert-ttl",
                self.cert_ttl, self.max_cert_ttl
            ));
        }
        Ok((self.cert_ttl, self.max_cert_ttl))
    }

    /// `--token-audiences`, checked: at least one, none empty.
    pub fn checked_token_audiences(&self) -> Result<Vec<String>, String> {
        let audiences: Vec<String> = self
            .token_audiences
            .iter()
            .map(|a| a.trim().to_owned())
            .collect();
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            return Err(format!(
                "--token-audiences {:?}: want one or more non-empty audiences (Istio's is istio-ca)",
                self.token_audiences.join(",")
            ));
        }
        Ok(audiences)
    }

    /// `--proxy-accounts` as `(namespace, service account)` pairs.
    pub fn proxy_account_pairs(&self) -> Result<Vec<(String, String)>, String> {
        self.proxy_accounts
            .iter()
            .map(|a| match a.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                    Ok((ns.to_owned(), sa.to_owned()))
                }
                _ => Err(format!(
                    "--proxy-accounts {a:?}: want <namespace>/<account>"
                )),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("istiod-lite").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_istiod() {
        let c = parse(&["--config-dir", "/x,/y", "--node-tokens", "/t"]).unwrap();
        assert_eq!(c.config_dir.len(), 2);
        assert_eq!(c.grpc_addr.port(), 15012);
        assert_eq!(c.metrics_addr.port(), 15014);
        assert!(c.admin_addr.ip().is_loopback());
        assert_eq!(c.debounce_quiet, Duration::from_millis(100));
        assert_eq!(c.debounce_max, Duration::from_secs(1));
        assert_eq!(
            c.identity().unwrap().to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/istiod-lite"
        );
        assert_eq!(
            c.proxy_account_pairs().unwrap(),
            vec![("istio-system".to_owned(), "ztunnel".to_owned())]
        );
        assert_eq!(c.checked_token_audiences().unwrap(), ["istio-ca"]);
        // The xDS bounds' defaults are the server's own.
        let xds = crate::xds::XdsSettings::default();
        assert_eq!(c.xds_answer_timeout, xds.answer_timeout);
        assert_eq!(c.xds_max_streams_per_node, xds.max_streams_per_node);
        assert_eq!(c.xds_max_names_per_type, xds.max_names_per_type);
        assert_eq!(c.xds_max_response, xds.max_response_bytes);
        assert_eq!(c.xds_push_budget, xds.push_budget_bytes);
    }

    #[test]
    fn a_bad_value_names_its_setting() {
        let err = parse(&[
            "--config-dir",
            "/x",
            "--node-tokens",
            "/t",
            "--admin-addr",
            "0.0.0.0:1",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--admin-addr") && err.contains("loopback"),
            "{err}"
        );
        let c = parse(&[
            "--config-dir",
            "/x",
            "--node-tokens",
            "/t",
            "--proxy-accounts",
            "istio-system/ztunnel,ztunnel",
        ])
        .unwrap();
        let err = c.proxy_account_pairs().unwrap_err();
        assert!(
            err.contains("--proxy-accounts") && err.contains("\"ztunnel\""),
            "{err}"
        );
        let c = parse(&["--kube", "--cert-ttl", "48h"]).unwrap();
        let err = c.checked_cert_ttls().unwrap_err();
        assert!(
            err.contains("--cert-ttl") && err.contains("--max-cert-ttl"),
            "{err}"
        );
        let c = parse(&["--kube", "--cert-ttl", "1h", "--max-cert-ttl", "2h"]).unwrap();
        assert_eq!(
            c.checked_cert_ttls(),
            Ok((Duration::from_secs(3600), Duration::from_secs(7200)))
        );
        let c = parse(&["--kube", "--token-audiences", "istio-ca,,x"]).unwrap();
        let err = c.checked_token_audiences().unwrap_err();
        assert!(err.contains("--token-audiences"), "{err}");
        let err = parse(&["--node-tokens", "/t"]).unwrap_err().to_string();
        assert!(err.contains("--config-dir"), "{err}");
        let err = parse(&["--config-dir", "/x", "--kube"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--kube") || err.contains("--config-dir"),
            "{err}"
        );
    }
}
