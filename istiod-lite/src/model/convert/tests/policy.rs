//! AuthorizationPolicy: what is accepted, and each refusal with its field path.

use super::{err, ok};
use crate::model::{Object, PolicyAction};

const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n";

fn spec_err(spec: &str) -> (String, String) {
    let e = err(&format!("{HEAD}spec: {spec}"));
    assert_eq!(
        (e.kind.as_str(), e.namespace.as_str(), e.name.as_str()),
        ("AuthorizationPolicy", "shop", "p")
    );
    (e.field, e.problem)
}

#[test]
fn l4_policy_is_read() {
    let Object::AuthorizationPolicy(p) = ok(&format!(
        "{HEAD}spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/client]
        notNamespaces: [other]
        ipBlocks: [198.18.0.0/16, 198.19.0.1]
    to:
    - operation: {{ports: ['8080'], notPorts: ['9090']}}
    when:
    - {{key: source.ip, values: [198.18.0.0/15]}}
    - {{key: 'request.headers[x-user]', notValues: [bob]}}
    - {{key: destination.port, values: ['8080']}}
"
    )) else {
        panic!()
    };
    assert_eq!(p.spec.action, PolicyAction::Deny);
    assert_eq!(p.spec.selector.as_ref().unwrap().match_labels["app"], "web");
    let source = &p.spec.rules[0].from.as_ref().unwrap()[0].source;
    assert_eq!(source.ip_blocks.len(), 2);
    assert_eq!(source.ip_blocks[1].0.to_string(), "198.19.0.1/32");
    assert_eq!(
        p.spec.rules[0].to.as_ref().unwrap()[0].operation.ports,
        vec!["8080"]
    );
    assert_eq!(p.spec.rules[0].when.len(), 3);
}

#[test]
fn l7_policy_with_target_refs_and_older_version() {
    let Object::AuthorizationPolicy(p) = ok("
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p}
spec:
  targetRefs: [{kind: Service, group: '', name: web}]
  rules:
  - to: [{operation: {methods: [GET], paths: ['/api/*']}}]
    when: [{key: 'request.auth.claims[iss]', values: [me]}, {key: experimental.envoy.filters.x, values: [y]}]
") else {
        panic!()
    };
    assert_eq!(p.meta.namespace, "default");
    assert_eq!(p.spec.target_refs[0].name, "web");
    assert_eq!(
        p.spec.rules[0].to.as_ref().unwrap()[0].operation.methods,
        vec!["GET"]
    );
}

#[test]
fn bad_ip_block_names_its_index() {
    let (field, problem) =
        spec_err("{rules: [{from: [{source: {ipBlocks: [198.18.0.0/16, not-an-ip]}}]}]}");
    assert_eq!(field, "spec.rules[0].from[0].source.ipBlocks[1]");
    assert!(problem.contains("not-an-ip"), "{problem}");
}

#[test]
fn unknown_fields_are_named() {
    let (field, problem) = spec_err("{rules: [{from: [{source: {ipBlock: [198.18.0.0/16]}}]}]}");
    assert_eq!(field, "spec.rules[0].from[0].source.ipBlock");
    assert!(problem.contains("unknown field"), "{problem}");
    let (field, _) = spec_err("{rules: [{to: [{operation: {}}], from: [{}]}]}");
    assert_eq!(field, "spec.rules[0].from[0].source");
}

#[test]
fn custom_and_provider_are_refused() {
    let (field, _) = spec_err("{action: CUSTOM, provider: {name: ext}}");
    assert_eq!(field, "spec.action");
    let (field, _) = spec_err("{provider: {name: ext}}");
    assert_eq!(field, "spec.provider");
    let (field, problem) = spec_err("{action: MAYBE}");
    assert_eq!(field, "spec.action");
    assert!(problem.contains("MAYBE"), "{problem}");
}

#[test]
fn selector_with_target_refs_is_refused() {
    let (field, problem) =
        spec_err("{selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: web}]}");
    assert_eq!(field, "spec.targetRefs");
    assert!(problem.contains("exclusive"), "{problem}");
    let (field, _) =
        spec_err("{selector: {matchLabels: {app: web}}, targetRef: {kind: Service, name: web}}");
    assert_eq!(field, "spec.targetRef");
    let (field, _) = spec_err("{targetRefs: [{kind: Service, name: ''}]}");
    assert_eq!(field, "spec.targetRefs[0].name");
}

/// A targetRef names a kind a policy can attach to, in that kind's group: a
/// typo or a wrong group is an error on the field, not a policy silently
/// attached to nothing.
#[test]
fn target_refs_name_a_known_kind_in_its_group() {
    for spec in [
        "{targetRefs: [{kind: Service, name: web}]}",
        "{targetRefs: [{kind: Service, group: '', name: web}]}",
        "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]}",
        "{targetRef: {kind: ServiceEntry, group: networking.istio.io, name: ext}}",
    ] {
        let Object::AuthorizationPolicy(_) = ok(&format!("{HEAD}spec: {spec}")) else {
            panic!("{spec}")
        };
    }
    let (field, problem) = spec_err("{targetRefs: [{kind: Servce, name: web}]}");
    assert_eq!(field, "spec.targetRefs[0].kind");
    assert!(
        problem.contains("Servce") && problem.contains("Gateway"),
        "{problem}"
    );
    let (field, problem) = spec_err("{targetRefs: [{name: web}]}");
    assert_eq!(field, "spec.targetRefs[0].kind");
    assert!(problem.contains("required"), "{problem}");
    let (field, problem) = spec_err(
        "{targetRefs: [{kind: Service, name: a}, {kind: Service, group: networking.istio.io, name: b}]}",
    );
    assert_eq!(field, "spec.targetRefs[1].group");
    assert!(problem.contains("core"), "{problem}");
    let (field, _) = spec_err("{targetRef: {kind: Gateway, group: '', name: w}}");
    assert_eq!(field, "spec.targetRef.group");
}

#[test]
fn ports_must_be_numbers_in_range() {
    let (field, _) = spec_err("{rules: [{to: [{operation: {ports: ['80', http]}}]}]}");
    assert_eq!(field, "spec.rules[0].to[0].operation.ports[1]");
    let (field, problem) = spec_err("{rules: [{}, {to: [{operation: {notPorts: ['70000']}}]}]}");
    assert_eq!(field, "spec.rules[1].to[0].operation.notPorts[0]");
    assert!(problem.contains("1-65535"), "{problem}");
    let (field, _) = spec_err("{rules: [{to: [{operation: {ports: ['0']}}]}]}");
    assert_eq!(field, "spec.rules[0].to[0].operation.ports[0]");
}

#[test]
fn when_keys_must_be_known() {
    let (field, problem) = spec_err(
        "{rules: [{when: [{key: source.ip, values: [198.18.0.1]}, {key: source.colour, values: [red]}]}]}",
    );
    assert_eq!(field, "spec.rules[0].when[1].key");
    assert!(problem.contains("source.colour"), "{problem}");
    for key in [
        "request.headers[]",
        "request.headers[x",
        "request.auth.",
        "experimental.",
    ] {
        let (field, _) = spec_err(&format!(
            "{{rules: [{{when: [{{key: '{key}', values: [v]}}]}}]}}"
        ));
        assert_eq!(field, "spec.rules[0].when[0].key", "{key}");
    }
    let (field, _) = spec_err("{rules: [{when: [{key: destination.port, values: [http]}]}]}");
    assert_eq!(field, "spec.rules[0].when[0].values[0]");
    let (field, _) = spec_err("{rules: [{when: [{key: remote.ip, notValues: [198.18.0.1, x]}]}]}");
    assert_eq!(field, "spec.rules[0].when[0].notValues[1]");
    let (field, _) = spec_err("{rules: [{when: [{key: source.namespace}]}]}");
    assert_eq!(field, "spec.rules[0].when[0]");
}

#[test]
fn principals_and_namespaces_must_be_non_empty() {
    let (field, _) = spec_err("{rules: [{from: [{source: {principals: [a, '']}}]}]}");
    assert_eq!(field, "spec.rules[0].from[0].source.principals[1]");
    let (field, _) = spec_err(
        "{rules: [{from: [{source: {namespaces: [shop]}}, {source: {notNamespaces: ['  ']}}]}]}",
    );
    assert_eq!(field, "spec.rules[0].from[1].source.notNamespaces[0]");
    let (field, problem) = spec_err("{rules: [{from: [{source: {principals: [null]}}]}]}");
    assert_eq!(field, "spec.rules[0].from[0].source.principals[0]");
    assert!(problem.contains("null"), "{problem}");
}

/// Istio refuses `from: []` and `to: []`; read as "no condition" they would
/// match every connection. Absent (or null) stays "no condition".
#[test]
fn empty_from_or_to_is_refused() {
    let (field, problem) = spec_err("{rules: [{to: [{operation: {ports: ['80']}}]}, {from: []}]}");
    assert_eq!(field, "spec.rules[1].from");
    assert!(problem.contains("must not be empty"), "{problem}");
    let (field, _) = spec_err("{rules: [{from: [{source: {namespaces: [a]}}], to: []}]}");
    assert_eq!(field, "spec.rules[0].to");
    let Object::AuthorizationPolicy(p) =
        ok(&format!("{HEAD}spec: {{rules: [{{from: null}}, {{}}]}}"))
    else {
        panic!()
    };
    assert!(
        p.spec
            .rules
            .iter()
            .all(|r| r.from.is_none() && r.to.is_none())
    );
}

/// `serviceAccounts` / `notServiceAccounts` (istio/api#3340): `ns/sa` or a bare
/// `sa`, at most 16, no wildcard, not beside principals or namespaces.
#[test]
fn service_accounts_are_read_and_checked() {
    let Object::AuthorizationPolicy(p) = ok(&format!(
        "{HEAD}spec: {{rules: [{{from: [{{source: {{serviceAccounts: [shop/api, web], notServiceAccounts: [other/x]}}}}]}}]}}"
    )) else {
        panic!()
    };
    let source = &p.spec.rules[0].from.as_ref().unwrap()[0].source;
    assert_eq!(source.service_accounts, ["shop/api", "web"]);
    assert_eq!(source.not_service_accounts, ["other/x"]);

    for (accounts, field, says) in [
        ("[shop/*]", "serviceAccounts[0]", "wildcards"),
        ("[a, '*']", "serviceAccounts[1]", "wildcards"),
        ("[a/b/c]", "serviceAccounts[0]", "namespace/account"),
        ("['/api']", "serviceAccounts[0]", "namespace/account"),
        ("['shop/']", "serviceAccounts[0]", "namespace/account"),
    ] {
        let (f, problem) = spec_err(&format!(
            "{{rules: [{{from: [{{source: {{serviceAccounts: {accounts}}}}}]}}]}}"
        ));
        assert_eq!(
            f,
            format!("spec.rules[0].from[0].source.{field}"),
            "{accounts}"
        );
        assert!(problem.contains(says), "{problem}");
    }
    let seventeen: Vec<String> = (0..17).map(|i| format!("sa{i}")).collect();
    let (f, problem) = spec_err(&format!(
        "{{rules: [{{from: [{{source: {{notServiceAccounts: [{}]}}}}]}}]}}",
        seventeen.join(", ")
    ));
    assert_eq!(f, "spec.rules[0].from[0].source.notServiceAccounts");
    assert!(problem.contains("16"), "{problem}");
    let (f, problem) =
        spec_err("{rules: [{from: [{source: {serviceAccounts: [api], notNamespaces: [x]}}]}]}");
    assert_eq!(f, "spec.rules[0].from[0].source.notNamespaces");
    assert!(problem.contains("serviceAccounts"), "{problem}");
}

/// `istio.io/dry-run` is read as Go's `strconv.ParseBool`, as Istio does; any
/// other value refuses the policy (it may have been meant as a dry run).
#[test]
fn dry_run_annotation_is_a_go_boolean() {
    let with = |value: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop, annotations: {{istio.io/dry-run: '{value}'}}}}\nspec: {{}}\n"
        )
    };
    for (value, want) in [
        ("1", true),
        ("t", true),
        ("T", true),
        ("TRUE", true),
        ("true", true),
        ("True", true),
        ("0", false),
        ("f", false),
        ("F", false),
        ("FALSE", false),
        ("false", false),
        ("False", false),
    ] {
        let Object::AuthorizationPolicy(p) = ok(&with(value)) else {
            panic!()
        };
        assert_eq!(p.dry_run(), Ok(want), "{value}");
    }
    for value in ["yes", "tRUE", "", " true", "on"] {
        let e = err(&with(value));
        assert_eq!(
            (e.name.as_str(), e.field.as_str()),
            ("p", "metadata.annotations[istio.io/dry-run]"),
            "{value:?}"
        );
        assert!(e.problem.contains("not a boolean"), "{}", e.problem);
    }
}
