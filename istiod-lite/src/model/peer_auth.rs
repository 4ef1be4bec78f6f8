//! Istio's `PeerAuthentication` (security.istio.io/v1): which inbound connections
//! must be mutual TLS. Reduced to what decides a workload's mode: the scope
//! (selector or none), the mode, the per-port modes, and the age that breaks ties.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Meta;

/// A PeerAuthentication, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    pub meta: Meta,
    /// `metadata.creationTimestamp` in seconds since the epoch; `None` when the
    /// writer did not set it (the directory source), which counts as oldest.
    pub created: Option<i64>,
    /// `spec.selector.matchLabels`; `None` when absent or empty: the policy is
    /// then the namespace's (or, in the root namespace, the mesh's).
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.mtls.mode`; [`MtlsMode::Unset`] when absent.
    pub mode: MtlsMode,
    /// `spec.portLevelMtls`: workload (container) port to mode. Only allowed
    /// with a selector, as in Istio.
    pub port_level: BTreeMap<u16, MtlsMode>,
}

/// Istio's `PeerAuthentication.MutualTLS.Mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the broader scope (workload, then namespace, then mesh).
    #[default]
    Unset,
    /// Plaintext is accepted besides mutual TLS.
    Permissive,
    /// Only mutual TLS: plaintext inbound connections are refused.
    Strict,
    /// Mutual TLS off; in ambient it means the same as PERMISSIVE.
    Disable,
}

impl MtlsMode {
    /// `self`, or `parent` when `self` is [`MtlsMode::Unset`].
    pub fn or(self, parent: MtlsMode) -> MtlsMode {
        if self == MtlsMode::Unset {
            parent
        } else {
            self
        }
    }

    /// Whether plaintext is refused.
    pub fn is_strict(self) -> bool {
        self == MtlsMode::Strict
    }
}
