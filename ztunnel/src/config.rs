//! ztunnel's settings: each has a flag, an environment variable, a default and a line
//! of doc, in this one place. A bad value stops start-up naming the setting; the
//! effective settings are logged at start and served on the admin endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_core::SpiffeId;
use mesh_core::settings::{
    duration_as_text, parse_duration, parse_loopback, parse_mark, parse_size,
};
use serde::Serialize;

/// ztunnel: the per-node L4 proxy of the Ambit mesh.
#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "ztunnel", version)]
pub struct Config {
    /// Name of the node this ztunnel serves; only its pods are proxied.
    #[arg(long, env = "AMBIT_NODE_NAME", default_value = "node-1")]
    pub node_name: String,

    /// Trust domain of the mesh's SPIFFE identities.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local", value_parser = parse_trust_domain)]
    pub trust_domain: String,

    /// The mesh's root namespace (istiod-lite's `--root-namespace`): its policies
    /// without a selector apply to the whole mesh, those with one to matching
    /// workloads of every namespace; the control plane's identity lives there.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = "istio-system", value_parser = parse_namespace)]
    pub root_namespace: String,

    /// Local state mode: YAML file of workloads, services and policies, watched.
    #[arg(long, env = "AMBIT_LOCAL_STATE")]
    pub local_state: Option<PathBuf>,

    /// How often the local state file is checked for changes.
    #[arg(long, env = "AMBIT_LOCAL_STATE_POLL", default_value = "250ms", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub local_state_poll: Duration,

    /// Local CA mode: PEM root certificate that signs local identities.
    #[arg(long, env = "AMBIT_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// Local CA mode: PEM private key of the root certificate (no access for group or others: 0600 or 0400).
    #[arg(long, env = "AMBIT_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// Control plane mode: `host:port` of istiod-lite's delta xDS (workloads,
    /// services, policies); excludes --local-state.
    #[arg(long, env = "AMBIT_XDS_ADDRESS", value_parser = parse_host_port,
          conflicts_with = "local_state", requires = "root_cert")]
    pub xds_address: Option<String>,

    /// Control plane mode: `host:port` of istiod-lite's CA, which then issues every
    /// certificate; excludes --ca-cert/--ca-key.
    #[arg(long, env = "AMBIT_CA_ADDRESS", value_parser = parse_host_port,
          conflicts_with_all = ["ca_cert", "ca_key"], requires = "root_cert")]
    pub ca_address: Option<String>,

    /// Identity the control plane must prove; default
    /// `spiffe://<trust-domain>/ns/<root-namespace>/sa/istiod-lite`.
    #[arg(long, env = "AMBIT_CONTROL_PLANE_IDENTITY", value_parser = parse_spiffe_id)]
    pub control_plane_identity: Option<String>,

    /// PEM file of the mesh roots the control plane's certificate chains to
    /// (required with --xds-address or --ca-address).
    #[arg(long, env = "AMBIT_ROOT_CERT")]
    pub root_cert: Option<PathBuf>,

    /// File of the bearer token sent to the control plane, read at every call
    /// (so a rotated token is used); none is sent without it.
    #[arg(long, env = "AMBIT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Workload certificate lifetime: requested from istiod-lite or signed by the local CA.
    #[arg(long, env = "AMBIT_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub cert_ttl: Duration,

    /// How long the certificate of an identity is kept once no workload of it is
    /// left on this node (a pod restarting meanwhile finds it ready).
    #[arg(long, env = "AMBIT_CERT_RELEASE_GRACE", default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub cert_release_grace: Duration,

    /// Unix socket (SOCK_SEQPACKET) of the node agent that hands over pods; at
    /// most 107 bytes (a Unix socket address's limit).
    #[arg(
        long,
        env = "AMBIT_NODE_AGENT_SOCKET",
        default_value = "/var/run/ambit/ztunnel.sock",
        value_parser = parse_socket_path
    )]
    pub node_agent_socket: PathBuf,

    /// Admin endpoint (config dump, "why" view); must be a loopback address.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000", value_parser = parse_loopback)]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics endpoint.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Serve SOCKS5 for explicit (non-captured) use.
    #[arg(long, env = "AMBIT_SOCKS5", default_value_t = false)]
    pub socks5: bool,

    /// SOCKS5 listen address; must be a loopback address.
    #[arg(long, env = "AMBIT_SOCKS5_ADDR", default_value = "127.0.0.1:15080", value_parser = parse_loopback)]
    pub socks5_addr: SocketAddr,

    /// Packet mark on ztunnel's own sockets, which the redirection rules skip.
    /// Hex (`0x539`) or decimal, as the node agent's `--proxy-mark`.
    #[arg(long, env = "AMBIT_PACKET_MARK", default_value = "0x539", value_parser = parse_mark)]
    pub packet_mark: u32,

    /// HBONE tunnels per pooled connection before another opens.
    #[arg(long, env = "AMBIT_POOL_MAX_STREAMS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub pool_max_streams: u32,

    /// HTTP/2 flow-control window of an HBONE tunnel (its connection's is four
    /// times it): what a receiving ztunnel holds per tunnel at most, and what
    /// bounds one tunnel to this much per round trip (2 MiB: 32 Gbit/s at 0.5 ms,
    /// 3.4 at 5 ms; raise it for long links). 64KiB to 256MiB.
    #[arg(long, env = "AMBIT_HBONE_WINDOW", default_value = "2MiB", value_parser = parse_window)]
    pub hbone_window: u32,

    /// A pooled HBONE connection idle this long is closed.
    #[arg(long, env = "AMBIT_POOL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub pool_idle_timeout: Duration,

    /// On shutdown, open connections get this long to finish before they are closed.
    #[arg(long, env = "AMBIT_DRAIN_DEADLINE", default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "duration_as_text")]
    pub drain_deadline: Duration,

    /// Most connections a pod's listener handles at once.
    #[arg(long, env = "AMBIT_MAX_CONNECTIONS", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Threads that run the proxies (Istio's ZTUNNEL_WORKER_THREADS). Each adds a
    /// core's worth of capacity; on a small node one costs less CPU per connection,
    /// as the workers no longer wake each other (docs/benchmarks.md).
    #[arg(long, env = "AMBIT_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: u16,
}

/// `host:port`, the port 1-65535.
fn parse_host_port(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!("{s:?} has no host; use host:port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_string()),
        _ => Err(format!("{s:?}: port {port:?} is not 1-65535")),
    }
}

/// An HTTP/2 stream window: 64 KiB to 256 MiB (its connection's, four times
/// it, must stay under HTTP/2's 2^31 - 1).
fn parse_window(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s)?;
    if !(64 << 10..=256 << 20).contains(&bytes) {
        return Err(format!("{s:?}: a window is 64KiB to 256MiB"));
    }
    u32::try_from(bytes).map_err(|e| e.to_string())
}

/// A Kubernetes namespace name, as SPIFFE identities hold it.
fn parse_namespace(s: &str) -> Result<String, String> {
    SpiffeId::new("cluster.local", s, "default")
        .map(|_| s.to_string())
        .map_err(|e| format!("not a namespace name: {e}"))
}

/// A SPIFFE trust domain: lowercase letters, digits, `.`, `-` and `_`.
fn parse_trust_domain(s: &str) -> Result<String, String> {
    SpiffeId::new(s, "default", "default")
        .map(|_| s.to_string())
        .map_err(|e| format!("{s:?} is not a trust domain: {e}"))
}

/// The longest path a Unix socket address holds (`sun_path`, 108 bytes with
/// its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A Unix socket path that fits a socket address: a longer one would fail
/// every connect.
fn parse_socket_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the path is empty".into());
    }
    if s.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "{s:?} is {} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}",
            s.len()
        ));
    }
    Ok(PathBuf::from(s))
}

fn parse_spiffe_id(s: &str) -> Result<String, String> {
    SpiffeId::parse(s)
        .map(|id| id.to_string())
        .map_err(|e| e.to_string())
}

impl Config {
    /// Whether state comes from the control plane (otherwise the local file).
    pub fn uses_xds(&self) -> bool {
        self.xds_address.is_some()
    }

    /// The identity the control plane must prove.
    pub fn control_plane_identity(&self) -> Result<SpiffeId, mesh_core::SpiffeIdError> {
        match &self.control_plane_identity {
            Some(id) => SpiffeId::parse(id),
            None => SpiffeId::new(&self.trust_domain, &self.root_namespace, "istiod-lite"),
        }
    }

    /// The runtime the proxies run on: `worker_threads` workers.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.worker_threads.into())
            .enable_all()
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("ztunnel").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_istio_ports_and_local_only_admin() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.metrics_addr.port(), 15020);
        assert_eq!(c.readiness_addr.port(), 15021);
        assert_eq!(c.socks5_addr, "127.0.0.1:15080".parse().unwrap());
        assert!(!c.socks5);
        assert_eq!(c.cert_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(c.cert_release_grace, Duration::from_secs(30));
        assert_eq!(c.pool_max_streams, 100);
        assert_eq!(c.worker_threads, 2);
        assert_eq!(c.packet_mark, 0x539);
        // The node agent's `--proxy-mark` is often given in hex: the same text works.
        assert_eq!(parse(&["--packet-mark", "0x10"]).unwrap().packet_mark, 16);
        assert_eq!(parse(&["--packet-mark", "16"]).unwrap().packet_mark, 16);
    }

    #[test]
    fn a_bad_value_names_its_setting() {
        let err = parse(&["--admin-addr", "0.0.0.0:15000"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--admin-addr") && err.contains("not a loopback"),
            "{err}"
        );
        let err = parse(&["--cert-ttl", "ten"]).unwrap_err().to_string();
        assert!(err.contains("--cert-ttl"), "{err}");
        let err = parse(&["--pool-max-streams", "0"]).unwrap_err().to_string();
        assert!(err.contains("--pool-max-streams"), "{err}");
        let err = parse(&["--ca-cert", "/x"]).unwrap_err().to_string();
        assert!(err.contains("--ca-key"), "{err}");
        let err = parse(&["--worker-threads", "0"]).unwrap_err().to_string();
        assert!(err.contains("--worker-threads"), "{err}");
        assert_eq!(parse(&["--worker-threads", "1"]).unwrap().worker_threads, 1);
        let err = parse(&["--hbone-window", "16KiB"]).unwrap_err().to_string();
        assert!(
            err.contains("--hbone-window") && err.contains("64KiB to 256MiB"),
            "{err}"
        );
        assert_eq!(
            parse(&["--hbone-window", "8MiB"]).unwrap().hbone_window,
            8 << 20
        );
        assert_eq!(parse(&[]).unwrap().hbone_window, 2 << 20);
        let err = parse(&["--root-namespace", "Not/A/Namespace"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--root-namespace") && err.contains("not a namespace name"),
            "{err}"
        );
        let mesh_root = parse(&["--root-namespace", "mesh-root"]).unwrap();
        assert_eq!(
            mesh_root.control_plane_identity().unwrap().to_string(),
            "spiffe://cluster.local/ns/mesh-root/sa/istiod-lite"
        );
    }

    #[test]
    fn a_trust_domain_is_checked_at_start() {
        for bad in ["Cluster.Local", "", "td:443", "a/b"] {
            let err = parse(&["--trust-domain", bad]).unwrap_err().to_string();
            assert!(
                err.contains("--trust-domain") && err.contains("is not a trust domain"),
                "{bad:?}: {err}"
            );
        }
        let c = parse(&["--trust-domain", "example.org"]).unwrap();
        assert_eq!(c.trust_domain, "example.org");
    }

    #[test]
    fn a_node_agent_socket_path_must_fit_a_socket_address() {
        let longest = format!("/{}", "s".repeat(MAX_SOCKET_PATH - 1));
        let c = parse(&["--node-agent-socket", &longest]).unwrap();
        assert_eq!(c.node_agent_socket, PathBuf::from(&longest));
        // One byte more: every connect would fail with EINVAL.
        let err = parse(&["--node-agent-socket", &format!("{longest}s")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--node-agent-socket") && err.contains("at most 107"),
            "{err}"
        );
        // The limit is the kernel's: a socket at the longest path binds.
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap().len() + 1;
        let path = dir.path().join("s".repeat(MAX_SOCKET_PATH - base));
        assert_eq!(path.as_os_str().len(), MAX_SOCKET_PATH);
        std::os::unix::net::UnixListener::bind(&path).unwrap();
    }

    #[test]
    fn the_runtime_has_the_configured_workers() {
        for (args, workers) in [(&[][..], 2), (&["--worker-threads", "3"][..], 3)] {
            let rt = parse(args).unwrap().runtime().unwrap();
            assert_eq!(rt.metrics().num_workers(), workers, "{args:?}");
        }
    }

    #[test]
    fn control_plane_mode_excludes_the_local_sources_and_needs_roots() {
        let err = parse(&[
            "--xds-address",
            "istiod:15012",
            "--local-state",
            "/s.yaml",
            "--root-cert",
            "/r",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--xds-address") && err.contains("--local-state"),
            "{err}"
        );
        let err = parse(&[
            "--ca-address",
            "istiod:15012",
            "--ca-cert",
            "/c",
            "--ca-key",
            "/k",
            "--root-cert",
            "/r",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--ca-address") && err.contains("--ca-"),
            "{err}"
        );
        let err = parse(&["--xds-address", "istiod:15012"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--root-cert"), "{err}");
        let err = parse(&["--xds-address", "istiod", "--root-cert", "/r"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--xds-address") && err.contains("host:port"),
            "{err}"
        );
        let err = parse(&["--control-plane-identity", "istiod"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--control-plane-identity"), "{err}");

        let c = parse(&[
            "--xds-address",
            "istiod:15012",
            "--ca-address",
            "istiod:15012",
            "--root-cert",
            "/r",
            "--trust-domain",
            "example.org",
        ])
        .unwrap();
        assert!(c.uses_xds());
        assert_eq!(
            c.control_plane_identity().unwrap().to_string(),
            "spiffe://example.org/ns/istio-system/sa/istiod-lite"
        );
        assert!(!parse(&[]).unwrap().uses_xds());
    }

    #[test]
    fn the_effective_config_serializes_for_the_admin_view() {
        let json = serde_json::to_value(parse(&["--node-name", "n7"]).unwrap()).unwrap();
        assert_eq!(json["node_name"], "n7");
        assert_eq!(json["drain_deadline"], "30s");
    }
}
