//! Why a policy was refused: the policy, the field (a path such as
//! `rules[0].clauses[1].matches[0].source_ips[2]`) and what is wrong with it.

/// A policy that cannot be enforced as written. The rest of the config keeps
/// working; only this policy is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("authorization policy {policy}: {field}: {problem}")]
pub struct PolicyError {
    /// `namespace/name` as far as it is known.
    pub policy: String,
    /// Path to the offending field, in the source's own spelling (protobuf
    /// snake_case for xDS, camelCase for YAML).
    pub field: String,
    pub problem: Problem,
}

/// An offending value inside a policy, before the policy's name is attached.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: Problem,
}

/// What is wrong with one value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("must not be empty")]
    Empty,
    #[error("address is {0} bytes long; expected 4 (IPv4) or 16 (IPv6)")]
    AddressLength(usize),
    #[error("prefix length {length} is longer than the {max} bits of the address")]
    PrefixLength { length: u32, max: u8 },
    #[error("port {0} is outside 1..=65535")]
    Port(u32),
    #[error("unknown {kind} value {value}")]
    UnknownEnum { kind: &'static str, value: i32 },
    #[error("string match has no match type (exact, prefix, suffix or presence)")]
    MissingMatchType,
    #[error("presence: false is not supported; presence matches any non-empty value")]
    PresenceFalse,
    #[error(
        "principals are written without the \"spiffe://\" scheme and this one would never match"
    )]
    PrincipalWithScheme,
    #[error("a selector is only used with scope WORKLOAD_SELECTOR")]
    SelectorWithoutSelectorScope,
}

impl PolicyError {
    pub fn new(policy: impl Into<String>, field: impl Into<String>, problem: Problem) -> Self {
        Self {
            policy: policy.into(),
            field: field.into(),
            problem,
        }
    }
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: Problem) -> Self {
        Self {
            field: field.into(),
            problem,
        }
    }

    /// Prefixes the path with the enclosing field: `matches[0]` + `source_ips[2]`.
    pub fn within(self, outer: impl std::fmt::Display) -> Self {
        Self {
            field: format!("{outer}.{}", self.field),
            problem: self.problem,
        }
    }

    /// Names the policy the field belongs to.
    pub fn in_policy(self, policy: impl Into<String>) -> PolicyError {
        PolicyError::new(policy, self.field, self.problem)
    }
}
