//! xDS conversion: a good resource becomes the expected model, and every bad
//! value is refused with the policy and the field named.

use std::collections::{BTreeMap, HashMap};

use ambit_proto::security as proto;
use ambit_proto::security::string_match::MatchType;

use super::yaml;
use crate::policy::{Authorization, PolicyError, Problem, StringMatch};

fn sm(t: MatchType) -> proto::StringMatch {
    proto::StringMatch {
        match_type: Some(t),
    }
}

fn block(address: &[u8], length: u32) -> proto::IpBlock {
    proto::IpBlock {
        address: address.to_vec(),
        length,
    }
}

fn with_match(m: proto::Match) -> proto::Authorization {
    proto::Authorization {
        name: "p".into(),
        namespace: "shop".into(),
        scope: proto::Scope::Namespace as i32,
        action: proto::Action::Deny as i32,
        rules: vec![proto::Rule {
            clauses: vec![
                proto::Clause { matches: vec![] },
                proto::Clause {
                    matches: vec![proto::Match::default(), m],
                },
            ],
        }],
        dry_run: false,
        selector: HashMap::new(),
    }
}

fn convert(p: proto::Authorization) -> Result<Authorization, PolicyError> {
    Authorization::try_from(p)
}

#[test]
fn full_policy_converts() {
    let m = proto::Match {
        principals: vec![sm(MatchType::Exact("cluster.local/ns/shop/sa/fe".into()))],
        not_principals: vec![sm(MatchType::Suffix("/sa/bot".into()))],
        namespaces: vec![sm(MatchType::Prefix("sh".into()))],
        not_namespaces: vec![sm(MatchType::Presence(true))],
        source_ips: vec![block(&[198, 18, 0, 0], 15)],
        not_source_ips: vec![block(
            &[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            8,
        )],
        destination_ips: vec![block(&[198, 18, 0, 10], 32)],
        not_destination_ips: vec![block(&[198, 19, 0, 0], 16)],
        destination_ports: vec![8080, 65535],
        not_destination_ports: vec![1],
        service_accounts: vec![proto::ServiceAccountMatch {
            namespace: "shop".into(),
            service_account: "api".into(),
        }],
        not_service_accounts: vec![proto::ServiceAccountMatch {
            namespace: "other".into(),
            service_account: "x".into(),
        }],
    };
    let mut p = with_match(m);
    p.scope = proto::Scope::WorkloadSelector as i32;
    p.dry_run = true;
    p.selector = HashMap::from([("app".to_string(), "db".to_string())]);
    let got = convert(p).unwrap();
    let want = yaml(
        r#"
name: p
namespace: shop
scope: WORKLOAD_SELECTOR
action: DENY
dryRun: true
selector: {app: db}
rules:
- clauses:
  - matches: []
  - matches:
    - {}
    - principals: ["cluster.local/ns/shop/sa/fe"]
      notPrincipals: ["*/sa/bot"]
      namespaces: ["sh*"]
      notNamespaces: ["*"]
      sourceIps: ["198.18.0.0/15"]
      notSourceIps: ["fd00::/8"]
      destinationIps: ["198.18.0.10/32"]
      notDestinationIps: ["198.19.0.0/16"]
      destinationPorts: [8080, 65535]
      notDestinationPorts: [1]
      serviceAccounts: [{namespace: shop, serviceAccount: api}]
      notServiceAccounts: [{namespace: other, serviceAccount: x}]
"#,
    );
    assert_eq!(got, want);
}

#[test]
fn selector_is_dropped_outside_selector_scope() {
    let mut p = with_match(proto::Match::default());
    p.selector = HashMap::from([("app".to_string(), "db".to_string())]);
    assert_eq!(convert(p.clone()).unwrap().selector, BTreeMap::new());
    p.scope = proto::Scope::Global as i32;
    assert_eq!(convert(p).unwrap().selector, BTreeMap::new());
}

const MATCH_PATH: &str = "rules[0].clauses[1].matches[1]";

#[test]
fn bad_values_name_policy_and_field() {
    let v6 = [0u8; 16];
    let cases: Vec<(proto::Match, &str, Problem)> = vec![
        (
            proto::Match {
                source_ips: vec![block(&[198, 18, 0, 0], 15), block(&[198, 18, 0], 15)],
                ..Default::default()
            },
            "source_ips[1]",
            Problem::AddressLength(3),
        ),
        (
            proto::Match {
                not_source_ips: vec![block(&[], 0)],
                ..Default::default()
            },
            "not_source_ips[0]",
            Problem::AddressLength(0),
        ),
        (
            proto::Match {
                destination_ips: vec![block(&[1, 2, 3, 4], 33)],
                ..Default::default()
            },
            "destination_ips[0]",
            Problem::PrefixLength {
                length: 33,
                max: 32,
            },
        ),
        (
            proto::Match {
                not_destination_ips: vec![block(&v6, 129)],
                ..Default::default()
            },
            "not_destination_ips[0]",
            Problem::PrefixLength {
                length: 129,
                max: 128,
            },
        ),
        (
            proto::Match {
                source_ips: vec![block(&v6, 4096)],
                ..Default::default()
            },
            "source_ips[0]",
            Problem::PrefixLength {
                length: 4096,
                max: 128,
            },
        ),
        (
            proto::Match {
                destination_ports: vec![80, 0],
                ..Default::default()
            },
            "destination_ports[1]",
            Problem::Port(0),
        ),
        (
            proto::Match {
                not_destination_ports: vec![65536],
                ..Default::default()
            },
            "not_destination_ports[0]",
            Problem::Port(65536),
        ),
        (
            proto::Match {
                principals: vec![proto::StringMatch { match_type: None }],
                ..Default::default()
            },
            "principals[0]",
            Problem::MissingMatchType,
        ),
        (
            proto::Match {
                not_namespaces: vec![sm(MatchType::Presence(false))],
                ..Default::default()
            },
            "not_namespaces[0]",
            Problem::PresenceFalse,
        ),
        (
            proto::Match {
                not_service_accounts: vec![proto::ServiceAccountMatch {
                    namespace: "shop".into(),
                    service_account: String::new(),
                }],
                ..Default::default()
            },
            "not_service_accounts[0].service_account",
            Problem::Empty,
        ),
        (
            proto::Match {
                not_principals: vec![sm(MatchType::Prefix("spiffe://cluster.local/".into()))],
                ..Default::default()
            },
            "not_principals[0]",
            Problem::PrincipalWithScheme,
        ),
    ];
    for (m, field, problem) in cases {
        let err = convert(with_match(m)).unwrap_err();
        let want = PolicyError::new("shop/p", format!("{MATCH_PATH}.{field}"), problem);
        assert_eq!(err, want);
    }
}

#[test]
fn bad_top_level_fields() {
    let base = with_match(proto::Match::default());
    let cases = [
        (
            proto::Authorization {
                scope: 7,
                ..base.clone()
            },
            "scope",
            Problem::UnknownEnum {
                kind: "Scope",
                value: 7,
            },
        ),
        (
            proto::Authorization {
                action: -1,
                ..base.clone()
            },
            "action",
            Problem::UnknownEnum {
                kind: "Action",
                value: -1,
            },
        ),
        (
            proto::Authorization {
                name: String::new(),
                ..base.clone()
            },
            "name",
            Problem::Empty,
        ),
        (
            proto::Authorization {
                namespace: String::new(),
                ..base.clone()
            },
            "namespace",
            Problem::Empty,
        ),
    ];
    for (p, field, problem) in cases {
        let policy = format!("{}/{}", p.namespace, p.name);
        let err = convert(p).unwrap_err();
        assert_eq!(err, PolicyError::new(policy, field, problem));
    }
}

#[test]
fn error_message_reads_well() {
    let m = proto::Match {
        source_ips: vec![block(&[198, 18, 0, 0, 0], 15)],
        ..Default::default()
    };
    let err = convert(with_match(m)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "authorization policy shop/p: rules[0].clauses[1].matches[1].source_ips[0]: \
         address is 5 bytes long; expected 4 (IPv4) or 16 (IPv6)"
    );
}

#[test]
fn nested_conversions_stand_alone() {
    assert_eq!(
        StringMatch::try_from(sm(MatchType::Suffix(".local".into()))),
        Ok(StringMatch::Suffix(".local".into()))
    );
    assert_eq!(
        StringMatch::try_from(proto::StringMatch { match_type: None }),
        Err(Problem::MissingMatchType)
    );
    let rule = proto::Rule {
        clauses: vec![proto::Clause {
            matches: vec![proto::Match {
                destination_ports: vec![70000],
                ..Default::default()
            }],
        }],
    };
    let err = crate::policy::Rule::try_from(rule).unwrap_err();
    assert_eq!(err.field, "clauses[0].matches[0].destination_ports[0]");
    assert_eq!(err.problem, Problem::Port(70000));
}
