//! Istio's `AuthorizationPolicy`: the spec is read into the model's serde types
//! (unknown fields refused), then checked the way Istio's validation does for
//! what the mesh enforces.

use serde_json::Value;

use super::{
    Checked, Envelope, Fault, TARGET_KINDS, check_parent_ref, check_port_text, deserialize,
    reduce_meta,
};
use crate::model::{
    AuthorizationPolicy, AuthorizationPolicySpec, Cidr, Condition, Kind, Operation, PolicyAction,
    Source,
};

pub(super) fn authorization_policy(value: Value) -> Checked<AuthorizationPolicy> {
    let envelope: Envelope<AuthorizationPolicySpec> = deserialize(value, "")?;
    let meta = reduce_meta(Kind::AuthorizationPolicy, envelope.metadata)?;
    let spec = envelope.spec.unwrap_or_default();
    check_spec(&spec)?;
    let policy = AuthorizationPolicy { meta, spec };
    // Refused rather than enforced: a value Istio refuses may well have been
    // meant as a dry run.
    if let Err(value) = policy.dry_run() {
        return Err(Fault::new(
            format!(
                "metadata.annotations[{}]",
                AuthorizationPolicy::DRY_RUN_ANNOTATION
            ),
            format!(
                "{value:?} is not a boolean; write \"true\" or \"false\" (also 1, t, T, TRUE, \
                 True, 0, f, F, FALSE, False)"
            ),
        ));
    }
    Ok(policy)
}

fn check_spec(spec: &AuthorizationPolicySpec) -> Checked<()> {
    if spec.action == PolicyAction::Custom {
        return Err(Fault::new(
            "spec.action",
            "CUSTOM is not supported: there is no external authorizer in this mesh",
        ));
    }
    if spec.provider.is_some() {
        return Err(Fault::new(
            "spec.provider",
            "not supported: a provider only applies to the CUSTOM action",
        ));
    }
    if spec.target_ref.is_some() && !spec.target_refs.is_empty() {
        return Err(Fault::new(
            "spec.targetRefs",
            "targetRef and targetRefs are exclusive: use targetRefs",
        ));
    }
    if spec.selector.is_some() {
        let field = if spec.target_ref.is_some() {
            Some("spec.targetRef")
        } else if !spec.target_refs.is_empty() {
            Some("spec.targetRefs")
        } else {
            None
        };
        if let Some(field) = field {
            return Err(Fault::new(
                field,
                "selector and targetRef(s) are exclusive: a policy is enforced either by ztunnel (selector) or by a waypoint (targetRefs)",
            ));
        }
    }
    if let Some(target) = &spec.target_ref {
        check_parent_ref("spec.targetRef", target, &TARGET_KINDS)?;
    }
    for (i, target) in spec.target_refs.iter().enumerate() {
        check_parent_ref(&format!("spec.targetRefs[{i}]"), target, &TARGET_KINDS)?;
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        let base = format!("spec.rules[{r}]");
        // Istio refuses an empty `from` or `to`: read as "no condition" it would
        // match every connection, the opposite of what a list of none says.
        for (name, empty) in [
            ("from", rule.from.as_ref().is_some_and(Vec::is_empty)),
            ("to", rule.to.as_ref().is_some_and(Vec::is_empty)),
        ] {
            if empty {
                return Err(Fault::new(
                    format!("{base}.{name}"),
                    format!("`{name}` must not be empty: remove it to set no condition"),
                ));
            }
        }
        for (f, from) in rule.from.iter().flatten().enumerate() {
            check_source(&format!("{base}.from[{f}].source"), &from.source)?;
        }
        for (t, to) in rule.to.iter().flatten().enumerate() {
            check_operation(&format!("{base}.to[{t}].operation"), &to.operation)?;
        }
        for (w, condition) in rule.when.iter().enumerate() {
            check_condition(&format!("{base}.when[{w}]"), condition)?;
        }
    }
    Ok(())
}

/// Every string of a list must say something: an empty principal or namespace
/// would match nothing or, worse, be read as a wildcard by someone.
fn check_strings(field: &str, values: &[String]) -> Checked<()> {
    for (i, value) in values.iter().enumerate() {
        if value.trim().is_empty() {
            return Err(Fault::new(
                format!("{field}[{i}]"),
                "must be a non-empty string",
            ));
        }
    }
    Ok(())
}

fn check_source(field: &str, source: &Source) -> Checked<()> {
    let lists = [
        ("principals", &source.principals),
        ("notPrincipals", &source.not_principals),
        ("requestPrincipals", &source.request_principals),
        ("notRequestPrincipals", &source.not_request_principals),
        ("namespaces", &source.namespaces),
        ("notNamespaces", &source.not_namespaces),
    ];
    for (name, values) in lists {
        check_strings(&format!("{field}.{name}"), values)?;
    }
    let accounts = [
        ("serviceAccounts", &source.service_accounts),
        ("notServiceAccounts", &source.not_service_accounts),
    ];
    for (name, values) in accounts {
        check_service_accounts(&format!("{field}.{name}"), values)?;
    }
    let identity = lists[..2].iter().chain(&lists[4..]);
    if accounts.iter().any(|(_, v)| !v.is_empty())
        && let Some((name, _)) = identity.clone().find(|(_, v)| !v.is_empty())
    {
        return Err(Fault::new(
            format!("{field}.{name}"),
            "cannot be set with serviceAccounts or notServiceAccounts (as in Istio)",
        ));
    }
    let blocks: [&Vec<Cidr>; 4] = [
        &source.ip_blocks,
        &source.not_ip_blocks,
        &source.remote_ip_blocks,
        &source.not_remote_ip_blocks,
    ];
    let empty = lists.iter().all(|(_, v)| v.is_empty())
        && accounts.iter().all(|(_, v)| v.is_empty())
        && blocks.iter().all(|b| b.is_empty());
    if empty {
        return Err(Fault::new(field, "must set at least one field"));
    }
    Ok(())
}

/// Istio's limit on `serviceAccounts` and `notServiceAccounts`.
const MAX_SERVICE_ACCOUNTS: usize = 16;

/// Each entry is `namespace/account` or a bare `account` (in the policy's
/// namespace), both parts non-empty, no wildcard: Istio matches them exactly.
fn check_service_accounts(field: &str, values: &[String]) -> Checked<()> {
    if values.len() > MAX_SERVICE_ACCOUNTS {
        return Err(Fault::new(
            field,
            format!(
                "{} entries; at most {MAX_SERVICE_ACCOUNTS} are allowed",
                values.len()
            ),
        ));
    }
    for (i, value) in values.iter().enumerate() {
        let parts: Vec<&str> = value.split('/').collect();
        let problem = if value.contains('*') {
            "wildcards are not allowed: write `namespace/account` or `account`"
        } else if parts.len() > 2 || parts.iter().any(|p| p.trim().is_empty()) {
            "must be `namespace/account`, or `account` for the policy's namespace"
        } else {
            continue;
        };
        return Err(Fault::new(
            format!("{field}[{i}]"),
            format!("{value:?}: {problem}"),
        ));
    }
    Ok(())
}

fn check_operation(field: &str, operation: &Operation) -> Checked<()> {
    for (name, ports) in [
        ("ports", &operation.ports),
        ("notPorts", &operation.not_ports),
    ] {
        for (i, port) in ports.iter().enumerate() {
            check_port_text(&format!("{field}.{name}[{i}]"), port)?;
        }
    }
    let lists = [
        ("hosts", &operation.hosts),
        ("notHosts", &operation.not_hosts),
        ("methods", &operation.methods),
        ("notMethods", &operation.not_methods),
        ("paths", &operation.paths),
        ("notPaths", &operation.not_paths),
    ];
    for (name, values) in lists {
        check_strings(&format!("{field}.{name}"), values)?;
    }
    let empty = operation.ports.is_empty()
        && operation.not_ports.is_empty()
        && lists.iter().all(|(_, v)| v.is_empty());
    if empty {
        return Err(Fault::new(field, "must set at least one field"));
    }
    Ok(())
}

/// The keys Istio defines for `when` conditions.
fn is_known_key(key: &str) -> bool {
    const EXACT: [&str; 7] = [
        "source.ip",
        "source.namespace",
        "source.principal",
        "remote.ip",
        "destination.ip",
        "destination.port",
        "connection.sni",
    ];
    if EXACT.contains(&key) {
        return true;
    }
    if let Some(rest) = key.strip_prefix("request.headers[") {
        return rest.len() > 1 && rest.ends_with(']') && !rest[..rest.len() - 1].contains(']');
    }
    ["request.auth.", "experimental."].iter().any(|prefix| {
        key.strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty())
    })
}

fn check_condition(field: &str, condition: &Condition) -> Checked<()> {
    let key = condition.key.as_str();
    if !is_known_key(key) {
        return Err(Fault::new(
            format!("{field}.key"),
            format!(
                "unknown key {key:?}; known: source.ip, source.namespace, source.principal, remote.ip, \
                 destination.ip, destination.port, connection.sni, request.auth.*, request.headers[...], experimental.*"
            ),
        ));
    }
    if condition.values.is_empty() && condition.not_values.is_empty() {
        return Err(Fault::new(field, "must set values or notValues"));
    }
    for (name, values) in [
        ("values", &condition.values),
        ("notValues", &condition.not_values),
    ] {
        let list = format!("{field}.{name}");
        check_strings(&list, values)?;
        for (i, value) in values.iter().enumerate() {
            let at = format!("{list}[{i}]");
            match key {
                "destination.port" => {
                    check_port_text(&at, value)?;
                }
                "source.ip" | "remote.ip" | "destination.ip" => {
                    let text = serde_json::Value::String(value.clone());
                    let _: Cidr = deserialize(text, &at)?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}
