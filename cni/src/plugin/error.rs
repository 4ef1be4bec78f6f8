//! CNI errors: the spec's well-known codes and the error JSON a plugin prints on
//! stdout before exiting non-zero.

use serde_json::json;

/// The CNI spec's well-known error codes that this plugin uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The config's `cniVersion` is not one this plugin speaks.
    IncompatibleVersion = 1,
    /// Container unknown or does not exist (CHECK of a pod the agent does not know).
    UnknownContainer = 3,
    /// A `CNI_*` variable is missing or malformed.
    InvalidEnvironment = 4,
    /// Reading stdin failed.
    Io = 5,
    /// The config is not JSON of the expected shape.
    Decode = 6,
    /// The config is JSON but wrong (e.g. no `prevResult` for a chained plugin).
    InvalidConfig = 7,
    /// A transient condition (agent unreachable, ztunnel refused): retry later.
    TryAgainLater = 11,
    /// Anything else.
    Internal = 999,
}

/// A failed plugin invocation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error JSON, tagged with the config's `cniVersion`.
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut value = json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            value["details"] = self.details.clone().into();
        }
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_fields() {
        let err = CniError::new(ErrorCode::TryAgainLater, "agent down")
            .with_details("connect /x.sock: No such file");
        let v: serde_json::Value = serde_json::from_str(&err.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "agent down");
        assert_eq!(v["details"], "connect /x.sock: No such file");
        let bare = CniError::new(ErrorCode::Decode, "bad");
        let v: serde_json::Value = serde_json::from_str(&bare.to_json("0.4.0")).unwrap();
        assert_eq!(v["code"], 6);
        assert!(v.get("details").is_none());
    }
}
