//! The network configuration on stdin: the standard fields, `prevResult` from the
//! plugin before us (passed through unchanged, and read for the pod's IPs), and
//! Ambit's own fields.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::error::{CniError, ErrorCode};
use crate::api::DEFAULT_AGENT_SOCKET;

/// The spec versions this plugin speaks: every one with plugin chaining.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The version used when the config gives none we can read.
pub const PREFERRED_VERSION: &str = "1.0.0";

/// How long the plugin waits for the agent by default. An ADD may wait for other
/// pods ahead of it and for ztunnel's ack, each bounded on the agent's side.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The parsed configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// Path of the node agent's plugin socket.
    #[serde(default)]
    pub node_agent_socket: Option<PathBuf>,
    /// How long to wait for the node agent, in seconds (1..=300).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

impl NetConf {
    /// Parses stdin; refuses versions outside [`SUPPORTED_VERSIONS`].
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: Self = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(ErrorCode::Decode, "cannot decode the network configuration")
                .with_details(e.to_string())
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "cniVersion {} is not supported (supported: {})",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if let Some(t) = conf.timeout_seconds
            && !(1..=300).contains(&t)
        {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!("timeoutSeconds {t} is out of range (1..=300)"),
            ));
        }
        Ok(conf)
    }

    /// The `cniVersion` of stdin if it can be read at all, for error output.
    pub fn version_of(stdin: &[u8]) -> String {
        serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| PREFERRED_VERSION.to_owned())
    }

    pub fn agent_socket(&self) -> &Path {
        self.node_agent_socket
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_AGENT_SOCKET))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout_seconds
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
    }

    /// CHECK exists from spec 0.4.0 on.
    pub fn supports_check(&self) -> bool {
        !self.cni_version.starts_with("0.3.")
    }

    /// The previous plugin's result; a chained plugin cannot ADD without one.
    pub fn require_prev_result(&self) -> Result<&Value, CniError> {
        self.prev_result.as_ref().filter(|v| v.is_object()).ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "ambit-cni is a chained plugin and got no prevResult: list it after the plugin that creates the pod's interface",
            )
        })
    }

    /// The pod's addresses: `prevResult.ips[].address` without the prefix length.
    pub fn pod_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(ips) = self.require_prev_result()?.get("ips") else {
            return Ok(Vec::new());
        };
        let bad = |what: String| CniError::new(ErrorCode::InvalidConfig, what);
        let list = ips
            .as_array()
            .ok_or_else(|| bad("prevResult.ips is not a list".into()))?;
        list.iter()
            .enumerate()
            .map(|(i, entry)| {
                let cidr = entry
                    .get("address")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("prevResult.ips[{i}].address is missing")))?;
                let addr = cidr.split_once('/').map_or(cidr, |(a, _)| a);
                addr.parse().map_err(|_| {
                    bad(format!(
                        "prevResult.ips[{i}].address `{cidr}` is not an IP address with prefix"
                    ))
                })
            })
            .collect()
    }

    /// What ADD prints: `prevResult` unchanged, with `cniVersion` filled in when
    /// the previous plugin left it out (the result must carry the config's version).
    pub fn passthrough_result(&self) -> Result<String, CniError> {
        let mut result = self.require_prev_result()?.clone();
        if let Some(obj) = result.as_object_mut() {
            obj.entry("cniVersion")
                .or_insert_with(|| self.cni_version.clone().into());
        }
        Ok(result.to_string())
    }
}

/// What VERSION prints.
pub fn version_output(requested: &str) -> String {
    serde_json::json!({
        "cniVersion": requested,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAINED: &str = r#"{
        "cniVersion": "1.0.0",
        "name": "ambit-net",
        "type": "ambit-cni",
        "nodeAgentSocket": "/tmp/agent.sock",
        "timeoutSeconds": 7,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/netns/p1"}],
            "ips": [
                {"address": "198.18.0.5/24", "gateway": "198.18.0.1", "interface": 0},
                {"address": "2001:db8::5/64", "interface": 0}
            ],
            "dns": {}
        }
    }"#;

    #[test]
    fn a_chained_config_yields_socket_timeout_and_pod_ips() {
        let conf = NetConf::parse(CHAINED.as_bytes()).unwrap();
        assert_eq!(conf.agent_socket(), Path::new("/tmp/agent.sock"));
        assert_eq!(conf.timeout(), Duration::from_secs(7));
        assert_eq!(
            conf.pod_ips().unwrap(),
            vec![
                "198.18.0.5".parse::<IpAddr>().unwrap(),
                "2001:db8::5".parse().unwrap()
            ]
        );
        // The result is prevResult, unchanged.
        let printed: Value = serde_json::from_str(&conf.passthrough_result().unwrap()).unwrap();
        let original: Value = serde_json::from_str(CHAINED).unwrap();
        assert_eq!(printed, original["prevResult"]);
    }

    #[test]
    fn defaults_and_missing_pieces() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"ambit-cni","prevResult":{"interfaces":[]}}"#,
        )
        .unwrap();
        assert_eq!(conf.agent_socket(), Path::new(DEFAULT_AGENT_SOCKET));
        assert_eq!(conf.timeout(), DEFAULT_TIMEOUT);
        assert!(conf.pod_ips().unwrap().is_empty());
        let printed: Value = serde_json::from_str(&conf.passthrough_result().unwrap()).unwrap();
        assert_eq!(printed["cniVersion"], "0.4.0");

        let first =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"ambit-cni"}"#).unwrap();
        let err = first.passthrough_result().unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        assert!(err.msg.contains("prevResult"));
        assert!(
            !NetConf::parse(br#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#)
                .unwrap()
                .supports_check()
        );
    }

    #[test]
    fn bad_configs_get_the_right_codes() {
        let err = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(err.code, ErrorCode::Decode);
        let err = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::IncompatibleVersion);
        assert!(err.msg.contains("0.2.0"));
        let err =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","timeoutSeconds":0}"#)
                .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{"ips":[{"address":"nope/24"}]}}"#,
        )
        .unwrap();
        let err = conf.pod_ips().unwrap_err();
        assert!(
            err.msg.contains("ips[0]") && err.msg.contains("nope/24"),
            "{}",
            err.msg
        );
    }

    #[test]
    fn version_output_and_error_version() {
        let v: Value = serde_json::from_str(&version_output("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["supportedVersions"][3], "1.0.0");
        assert_eq!(NetConf::version_of(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(NetConf::version_of(b"garbage"), PREFERRED_VERSION);
        assert_eq!(
            NetConf::version_of(br#"{"cniVersion":"9.9.9"}"#),
            PREFERRED_VERSION
        );
    }
}
