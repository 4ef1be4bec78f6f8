use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;

use super::*;

/// A one-shot agent on a thread: records the request, answers `reply`.
fn fake_agent(socket: &Path, reply: AgentReply) -> std::thread::JoinHandle<AgentRequest> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut body = Vec::new();
        stream.read_to_end(&mut body).unwrap();
        stream
            .write_all(&serde_json::to_vec(&reply).unwrap())
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    })
}

fn config(socket: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "ambit-net",
        "type": "ambit-cni",
        "nodeAgentSocket": socket,
        "timeoutSeconds": 5,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/netns/p1"}],
            "ips": [{"address": "198.18.0.5/24", "interface": 0}]
        }
    })
    .to_string()
}

fn invoke(command: &str, cni_args: &str, stdin: &str) -> PluginOutput {
    let vars: HashMap<&str, String> = HashMap::from([
        ("CNI_COMMAND", command.to_owned()),
        ("CNI_CONTAINERID", "c0ffee".to_owned()),
        ("CNI_NETNS", "/run/netns/p1".to_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_ARGS", cni_args.to_owned()),
    ]);
    run(|k| vars.get(k).cloned(), stdin.as_bytes())
}

fn error_of(out: &PluginOutput) -> serde_json::Value {
    assert_ne!(out.exit_code, 0, "expected a failure, got {}", out.stdout);
    serde_json::from_str(&out.stdout).unwrap()
}

const K8S_ARGS: &str =
    "K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop;K8S_POD_UID=u-1;K8S_POD_SERVICE_ACCOUNT=web";

#[test]
fn version_lists_the_supported_versions() {
    let out = invoke("VERSION", "", r#"{"cniVersion":"0.4.0"}"#);
    assert_eq!(out.exit_code, 0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(
        v["supportedVersions"].as_array().unwrap().len(),
        SUPPORTED_VERSIONS.len()
    );
}

#[test]
fn add_hands_the_pod_to_the_agent_and_passes_the_result_through() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let agent = fake_agent(&socket, AgentReply::ok_with("ztunnel not connected yet"));
    let stdin = config(&socket);
    let out = invoke("ADD", K8S_ARGS, &stdin);
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    let printed: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let sent: serde_json::Value = serde_json::from_str(&stdin).unwrap();
    assert_eq!(printed, sent["prevResult"]);
    let AgentRequest::Add { pod } = agent.join().unwrap() else {
        panic!("expected an add");
    };
    assert_eq!(
        pod,
        Pod {
            uid: "u-1".into(),
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            container_id: "c0ffee".into(),
            netns: "/run/netns/p1".into(),
            ips: vec!["198.18.0.5".parse().unwrap()],
        }
    );
}

#[test]
fn agent_failures_become_cni_errors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let agent = fake_agent(
        &socket,
        AgentReply::failed(FailureKind::Rules, "iptables-restore failed"),
    );
    let v = error_of(&invoke("ADD", K8S_ARGS, &config(&socket)));
    agent.join().unwrap();
    assert_eq!(v["code"], 999);
    assert!(
        v["msg"]
            .as_str()
            .unwrap()
            .contains("iptables-restore failed")
    );

    std::fs::remove_file(&socket).unwrap();
    let agent = fake_agent(
        &socket,
        AgentReply::failed(FailureKind::UnknownPod, "no pod u-1"),
    );
    let v = error_of(&invoke("CHECK", K8S_ARGS, &config(&socket)));
    assert_eq!(
        agent.join().unwrap(),
        AgentRequest::Check { uid: "u-1".into() }
    );
    assert_eq!(v["code"], 3);
}

#[test]
fn agent_down_fails_add_and_check_but_not_del() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let stdin = config(&socket);
    for command in ["ADD", "CHECK"] {
        let v = error_of(&invoke(command, K8S_ARGS, &stdin));
        assert_eq!(v["code"], 11);
        assert!(
            v["msg"]
                .as_str()
                .unwrap()
                .contains(socket.to_str().unwrap()),
            "{v}"
        );
    }
    let out = invoke("DEL", K8S_ARGS, &stdin);
    assert_eq!(
        out,
        PluginOutput {
            stdout: String::new(),
            exit_code: 0
        }
    );
}

#[test]
fn bad_cni_args_fail_add_and_check_but_not_del() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let bad = format!("{K8S_ARGS};AMBIT_ENROLL=maybe;JUNK");
    for command in ["ADD", "CHECK"] {
        let v = error_of(&invoke(command, &bad, &config(&socket)));
        assert_eq!(v["code"], 4, "{command}: {v}");
        assert!(v["msg"].as_str().unwrap().contains("maybe"), "{v}");
    }
    // DEL goes through, for the pod the good entries name.
    let agent = fake_agent(&socket, AgentReply::ok());
    let out = invoke("DEL", &bad, &config(&socket));
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    assert!(matches!(
        agent.join().unwrap(),
        AgentRequest::Del { uid, .. } if uid == "u-1"
    ));
}

#[test]
fn opted_out_pods_never_reach_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let stdin = config(&socket);
    let out = invoke("ADD", &format!("{K8S_ARGS};AMBIT_ENROLL=false"), &stdin);
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    let out = invoke("CHECK", "AMBIT_ENROLL=false", &stdin);
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
}

#[test]
fn config_problems_are_reported_with_the_configs_version() {
    let v = error_of(&invoke("ADD", "", "{oops"));
    assert_eq!(
        (v["code"].as_u64(), v["cniVersion"].as_str()),
        (Some(6), Some("1.0.0"))
    );
    let v = error_of(&invoke(
        "ADD",
        "",
        r#"{"cniVersion":"0.4.0","name":"n","type":"ambit-cni"}"#,
    ));
    assert_eq!(
        (v["code"].as_u64(), v["cniVersion"].as_str()),
        (Some(7), Some("0.4.0"))
    );
    let v = error_of(&invoke("NOPE", "", "{}"));
    assert_eq!(v["code"], 4);
}

#[test]
fn a_pod_without_kubernetes_args_is_named_by_its_container() {
    let env = CniEnv::from_vars(|k| match k {
        "CNI_COMMAND" => Some("ADD".into()),
        "CNI_CONTAINERID" => Some("c1".into()),
        "CNI_NETNS" => Some("/run/netns/x".into()),
        _ => None,
    })
    .unwrap();
    let pod = pod_of(&env, vec![]);
    assert_eq!(
        (
            pod.uid.as_str(),
            pod.name.as_str(),
            pod.namespace.as_str(),
            pod.service_account.as_str()
        ),
        ("c1", "c1", "default", "default")
    );
}

#[test]
fn a_pod_with_an_ipv6_address_is_refused_before_the_agent_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    // Nobody listens: had the plugin asked the agent, the error would be code 11.
    let socket = dir.path().join("nobody.sock");
    let mut conf: serde_json::Value = serde_json::from_str(&config(&socket)).unwrap();
    conf["prevResult"]["ips"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"address": "2001:db8::5/64", "interface": 0}));
    let v = error_of(&invoke("ADD", K8S_ARGS, &conf.to_string()));
    assert_eq!(v["code"], 7, "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(
        msg.contains("IPv6 is not supported") && msg.contains("2001:db8::5"),
        "{msg}"
    );
    // Opted out, the same pod starts (out of the mesh).
    let out = invoke(
        "ADD",
        &format!("{K8S_ARGS};AMBIT_ENROLL=false"),
        &conf.to_string(),
    );
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
}
