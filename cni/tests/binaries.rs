//! The `ambit-cni` binary in both roles, as a runtime and an operator run it.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::*;

#[test]
fn version_lists_the_supported_spec_versions() {
    let out = run_plugin("VERSION", Path::new(""), "", r#"{"cniVersion":"1.0.0"}"#);
    let v: serde_json::Value = serde_json::from_str(&success(&out)).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
    );
}

#[test]
fn add_with_the_agent_down_fails_with_a_cni_error_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody-listens.sock");
    let out = run_plugin(
        "ADD",
        Path::new("/run/netns/whatever"),
        &pod_args("web-0", "uid-1"),
        &net_conf(&socket, "198.18.0.5"),
    );
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["cniVersion"], "1.0.0");
    assert_eq!(err["code"], 11);
    let msg = err["msg"].as_str().unwrap();
    assert!(msg.contains(socket.to_str().unwrap()), "{err}");

    // DEL with the agent down succeeds and prints nothing.
    let out = run_plugin(
        "DEL",
        Path::new(""),
        &pod_args("web-0", "uid-1"),
        &net_conf(&socket, "198.18.0.5"),
    );
    assert_eq!(success(&out), "");
}

#[test]
fn a_corrupt_state_file_stops_the_agent_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("pods.json");
    // What a crash in the middle of a plain write would have left.
    std::fs::write(&state, r#"{"pods":[{"pod":{"uid":"u-1","na"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ambit-cni"))
        .arg("agent")
        .arg("--plugin-socket")
        .arg(dir.path().join("agent.sock"))
        .arg("--zds-socket")
        .arg(dir.path().join("ztunnel.sock"))
        .arg("--state-file")
        .arg(&state)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the agent started on a corrupt state"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(state.to_str().unwrap()) && stderr.contains("corrupt"),
        "{stderr}"
    );
    // The file is left for the operator to look at.
    assert!(
        std::fs::read_to_string(&state)
            .unwrap()
            .starts_with("{\"pods\"")
    );
}

/// The agent binary, killed on drop.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_agent_refuses_to_redirect_its_own_namespace() {
    if !have_root("the_agent_refuses_to_redirect_its_own_namespace") {
        return;
    }
    // The agent runs inside a test namespace, so even a broken guard could only
    // touch that namespace.
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let plugin_socket = dir.path().join("agent.sock");
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_ambit-cni"),
            "agent",
        ])
        .arg("--plugin-socket")
        .arg(&plugin_socket)
        .arg("--zds-socket")
        .arg(dir.path().join("ztunnel.sock"))
        .arg("--state-file")
        .arg(dir.path().join("pods.json"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _agent = AgentProcess(child);
    // Wait for the agent's own word that it listens.
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .expect("agent exited before listening")
            .unwrap();
        if line.contains("node agent listening") {
            break;
        }
    }
    let out = run_plugin(
        "ADD",
        &ns.path(),
        &pod_args("host", "uid-host"),
        &net_conf(&plugin_socket, "198.18.0.30"),
    );
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("own network namespace"),
        "{err}"
    );
    assert!(!ns.exec(&["iptables-save"]).contains("AMBIT"));
}
