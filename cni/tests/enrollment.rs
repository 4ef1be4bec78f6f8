//! Enrollment end to end, as root, in namespaces the tests create: the plugin
//! binary against an in-process node agent, with the test playing ztunnel.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;

use ambit_proto::zds::node_agent_message::Payload;
use mesh_core::os::NetNs;
use support::*;

fn iptables(ns: &TestNetns) -> String {
    ns.exec(&["iptables-save"])
}

fn assert_redirected(ns: &TestNetns) {
    let saved = iptables(ns);
    for line in [
        "-A PREROUTING -j AMBIT_PRERT",
        "-A OUTPUT -j AMBIT_OUTPUT",
        "-A AMBIT_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        "-A AMBIT_PRERT -p tcp -j REDIRECT --to-ports 15006",
        "-A AMBIT_OUTPUT -m mark --mark 0x539/0xfff -j RETURN",
        "-A AMBIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(saved.contains(line), "missing `{line}` in\n{saved}");
    }
    let rules = ns.exec(&["ip", "rule"]);
    assert!(
        rules.contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100"),
        "{rules}"
    );
    let routes = ns.exec(&["ip", "route", "show", "table", "100"]);
    assert!(routes.contains("local default dev lo"), "{routes}");
}

fn assert_not_redirected(ns: &TestNetns) {
    let saved = iptables(ns);
    assert!(!saved.contains("AMBIT"), "left over:\n{saved}");
    assert!(!ns.exec(&["ip", "rule"]).contains("fwmark 0x111"));
    assert!(
        ns.exec(&["ip", "route", "show", "table", "100"])
            .trim()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn add_redirects_the_pod_and_hands_its_namespace_to_ztunnel_and_del_undoes_it() {
    if !have_root("add_redirects_the_pod_and_hands_its_namespace_to_ztunnel_and_del_undoes_it") {
        return;
    }
    let ns = TestNetns::new();
    // Somebody else's rule, which must survive our removal.
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "198.18.0.9/32",
        "-j",
        "RETURN",
    ]);
    let agent = TestAgent::start();
    let (zt, snapshot) = FakeZtunnel::attach(&agent.zds_socket).await;
    assert!(snapshot.is_empty());

    let conf = net_conf(&agent.plugin_socket, "198.18.0.5");
    let args = pod_args("web-0", "uid-web-0");
    let plugin = spawn_plugin("ADD", &ns.path(), &args, &conf);
    let (msg, fd) = zt.recv().await;
    let Payload::Add(add) = msg else {
        panic!("expected add, got {msg:?}")
    };
    assert_eq!(add.uid, "uid-web-0");
    let info = add.info.unwrap();
    assert_eq!(
        (
            info.name.as_str(),
            info.namespace.as_str(),
            info.service_account.as_str()
        ),
        ("web-0", "shop", "web")
    );
    let handed = NetNs::from_fd(fd.expect("the add carries the pod's namespace"));
    assert_eq!(handed.inode().unwrap(), ns.inode());
    // The redirection is in place before ztunnel hears of the pod.
    assert_redirected(&ns);
    zt.ack("").await;

    let printed: serde_json::Value =
        serde_json::from_str(&success(&plugin.await.unwrap())).unwrap();
    let sent: serde_json::Value = serde_json::from_str(&conf).unwrap();
    assert_eq!(
        printed, sent["prevResult"],
        "ADD must pass prevResult through"
    );

    success(
        &spawn_plugin("CHECK", &ns.path(), &args, &conf)
            .await
            .unwrap(),
    );
    // A chain emptied behind the agent's back is no redirection: CHECK says so.
    ns.exec(&["iptables", "-t", "nat", "-F", "AMBIT_OUTPUT"]);
    let out = spawn_plugin("CHECK", &ns.path(), &args, &conf)
        .await
        .unwrap();
    assert!(!out.status.success(), "CHECK passed with a flushed chain");
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(err["msg"].as_str().unwrap().contains("incomplete"), "{err}");

    let plugin = spawn_plugin("DEL", &ns.path(), &args, &conf);
    let (msg, fd) = zt.recv().await;
    assert_eq!(
        msg,
        Payload::Del(ambit_proto::zds::DelWorkload {
            uid: "uid-web-0".into()
        })
    );
    assert!(fd.is_none());
    zt.ack("").await;
    assert_eq!(success(&plugin.await.unwrap()), "");
    assert_not_redirected(&ns);
    assert!(iptables(&ns).contains("-A OUTPUT -d 198.18.0.9/32 -j RETURN"));

    // DEL again is fine; CHECK now says the container is unknown.
    assert_eq!(
        success(&spawn_plugin("DEL", &ns.path(), &args, &conf).await.unwrap()),
        ""
    );
    let out = spawn_plugin("CHECK", &ns.path(), &args, &conf)
        .await
        .unwrap();
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], 3, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnecting_ztunnel_gets_every_known_pod_then_snapshot_sent() {
    if !have_root("a_reconnecting_ztunnel_gets_every_known_pod_then_snapshot_sent") {
        return;
    }
    let agent = TestAgent::start();
    let pods: Vec<(TestNetns, String)> = (0..3)
        .map(|i| (TestNetns::new(), format!("uid-{i}")))
        .collect();
    let (first, _) = FakeZtunnel::attach(&agent.zds_socket).await;
    for (ns, uid) in &pods[..2] {
        let conf = net_conf(&agent.plugin_socket, "198.18.0.10");
        let plugin = spawn_plugin("ADD", &ns.path(), &pod_args(uid, uid), &conf);
        assert!(matches!(first.recv().await, (Payload::Add(_), Some(_))));
        first.ack("").await;
        success(&plugin.await.unwrap());
    }
    // ztunnel goes away; a pod added meanwhile is kept for the next one.
    drop(first);
    let (ns, uid) = &pods[2];
    let conf = net_conf(&agent.plugin_socket, "198.18.0.12");
    success(
        &spawn_plugin("ADD", &ns.path(), &pod_args(uid, uid), &conf)
            .await
            .unwrap(),
    );
    assert_redirected(ns);

    let (second, snapshot) = FakeZtunnel::attach(&agent.zds_socket).await;
    let got: BTreeMap<String, u64> = snapshot
        .into_iter()
        .map(|(uid, fd)| (uid, NetNs::from_fd(fd).inode().unwrap()))
        .collect();
    let want: BTreeMap<String, u64> = pods
        .iter()
        .map(|(ns, uid)| (uid.clone(), ns.inode()))
        .collect();
    assert_eq!(got, want);

    // The new connection is the live one: a DEL reaches it.
    let plugin = spawn_plugin("DEL", &ns.path(), &pod_args(uid, uid), &conf);
    assert!(matches!(second.recv().await, (Payload::Del(d), None) if d.uid == *uid));
    second.ack("").await;
    success(&plugin.await.unwrap());
    assert_not_redirected(ns);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_ztunnel_refuses_is_rolled_back_and_the_add_fails() {
    if !have_root("a_pod_ztunnel_refuses_is_rolled_back_and_the_add_fails") {
        return;
    }
    let ns = TestNetns::new();
    let agent = TestAgent::start();
    let (zt, _) = FakeZtunnel::attach(&agent.zds_socket).await;
    let conf = net_conf(&agent.plugin_socket, "198.18.0.20");
    let plugin = spawn_plugin("ADD", &ns.path(), &pod_args("db-0", "uid-db-0"), &conf);
    assert!(matches!(zt.recv().await, (Payload::Add(_), Some(_))));
    zt.ack("no certificate for shop/web").await;
    let out = plugin.await.unwrap();
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("no certificate"),
        "{err}"
    );
    assert_not_redirected(&ns);
}

/// A pod the state file cannot hold would be lost by a restarted agent while its
/// rules stay; the ADD fails instead, with the file named, and the rules go.
#[tokio::test(flavor = "multi_thread")]
async fn an_add_that_cannot_be_saved_fails_and_is_rolled_back() {
    if !have_root("an_add_that_cannot_be_saved_fails_and_is_rolled_back") {
        return;
    }
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_in(dir.path());
    let (_zt, _) = FakeZtunnel::attach(&agent.zds_socket).await;
    // The state file's directory vanishes under the running agent.
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let conf = net_conf(&agent.plugin_socket, "198.18.0.21");
    let out = run_plugin("ADD", &ns.path(), &pod_args("db-1", "uid-db-1"), &conf);
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("could not be saved") && msg.contains("pods.json"),
        "{err}"
    );
    assert_not_redirected(&ns);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_still_knows_its_pods_and_resends_them() {
    if !have_root("a_restarted_agent_still_knows_its_pods_and_resends_them") {
        return;
    }
    let pods: Vec<(TestNetns, String)> = (0..2)
        .map(|i| (TestNetns::new(), format!("uid-cart-{i}")))
        .collect();
    let dir = tempfile::tempdir().unwrap();

    // The default settings, with only the paths moved into the test's directory.
    let first = TestAgent::start_in(dir.path());
    let conf = net_conf(&first.plugin_socket, "198.18.0.40");
    for (ns, uid) in &pods {
        success(
            &spawn_plugin("ADD", &ns.path(), &pod_args(uid, uid), &conf)
                .await
                .unwrap(),
        );
    }
    let (zt, _) = FakeZtunnel::attach(&first.zds_socket).await;
    first.stop().await;
    zt.expect_closed().await;
    for (ns, _) in &pods {
        assert_redirected(ns);
    }
    // Enrolled as an older agent did, with IPv6 left on: the next one turns it off.
    pods[1]
        .0
        .exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=0"]);

    let second = TestAgent::start_in(dir.path());
    assert_eq!(pods[1].0.ipv6_disabled("default"), "1");
    let (zt, snapshot) = FakeZtunnel::attach(&second.zds_socket).await;
    let got: BTreeMap<String, u64> = snapshot
        .into_iter()
        .map(|(uid, fd)| (uid, NetNs::from_fd(fd).inode().unwrap()))
        .collect();
    let want: BTreeMap<String, u64> = pods
        .iter()
        .map(|(ns, uid)| (uid.clone(), ns.inode()))
        .collect();
    assert_eq!(got, want, "the restarted agent must re-send every pod");

    let (ns, uid) = &pods[0];
    let plugin = spawn_plugin("DEL", &ns.path(), &pod_args(uid, uid), &conf);
    assert!(matches!(zt.recv().await, (Payload::Del(_), None)));
    zt.ack("").await;
    success(&plugin.await.unwrap());
    assert_not_redirected(ns);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_del_of_a_replaced_sandbox_leaves_the_new_one_alone() {
    if !have_root("a_late_del_of_a_replaced_sandbox_leaves_the_new_one_alone") {
        return;
    }
    let (ns_a, ns_b) = (TestNetns::new(), TestNetns::new());
    let agent = TestAgent::start();
    let (zt, _) = FakeZtunnel::attach(&agent.zds_socket).await;
    let conf = net_conf(&agent.plugin_socket, "198.18.0.50");
    let args = pod_args("api-0", "uid-api-0");

    // Sandbox A, then sandbox B of the same pod replaces it.
    let plugin = spawn_plugin_for("sandbox-a", "ADD", &ns_a.path(), &args, &conf);
    assert!(matches!(zt.recv().await, (Payload::Add(_), Some(_))));
    zt.ack("").await;
    success(&plugin.await.unwrap());
    let plugin = spawn_plugin_for("sandbox-b", "ADD", &ns_b.path(), &args, &conf);
    assert!(matches!(zt.recv().await, (Payload::Del(_), None)));
    zt.ack("").await;
    let (msg, fd) = zt.recv().await;
    assert!(matches!(msg, Payload::Add(_)), "{msg:?}");
    assert_eq!(NetNs::from_fd(fd.unwrap()).inode().unwrap(), ns_b.inode());
    zt.ack("").await;
    success(&plugin.await.unwrap());

    // The runtime's late DEL of sandbox A, with its namespace, and once more
    // without it: both succeed and leave B enrolled. Nothing is acked meanwhile,
    // so a Del sent to ztunnel would hold the DEL until the ack timeout.
    for netns in [ns_a.path(), std::path::PathBuf::new()] {
        success(
            &spawn_plugin_for("sandbox-a", "DEL", &netns, &args, &conf)
                .await
                .unwrap(),
        );
    }
    assert_redirected(&ns_b);
    success(
        &spawn_plugin_for("sandbox-b", "CHECK", &ns_b.path(), &args, &conf)
            .await
            .unwrap(),
    );
    // ztunnel's next message is for another pod: it never heard a Del for this one.
    let other = TestNetns::new();
    let plugin = spawn_plugin("ADD", &other.path(), &pod_args("x", "uid-x"), &conf);
    assert!(matches!(zt.recv().await, (Payload::Add(a), Some(_)) if a.uid == "uid-x"));
    zt.ack("").await;
    success(&plugin.await.unwrap());

    // B's own DEL removes it.
    let plugin = spawn_plugin_for("sandbox-b", "DEL", &ns_b.path(), &args, &conf);
    assert!(matches!(zt.recv().await, (Payload::Del(d), None) if d.uid == "uid-api-0"));
    zt.ack("").await;
    success(&plugin.await.unwrap());
    assert_not_redirected(&ns_b);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_tool_fails_its_own_add_in_time_and_holds_up_no_other_pod() {
    if !have_root("a_hung_tool_fails_its_own_add_in_time_and_holds_up_no_other_pod") {
        return;
    }
    let (fast, slow) = (TestNetns::new(), TestNetns::new());
    let dir = tempfile::tempdir().unwrap();
    // iptables-save that hangs in the slow pod's namespace only, saying so first.
    let hung = dir.path().join("hung");
    let script = dir.path().join("iptables-save");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$(readlink /proc/self/ns/net)\" = \"net:[{}]\" ]; then\n  : > {}\n  exec sleep 60\nfi\nexec iptables-save \"$@\"\n",
            slow.inode(),
            hung.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut config = TestAgent::config_in(dir.path());
    config.iptables_save = script;
    config.tool_timeout_ms = 3000;
    let agent = TestAgent::start_with(config);
    let conf = net_conf(&agent.plugin_socket, "198.18.0.60");
    let fast_args = pod_args("fast", "uid-fast");
    success(
        &spawn_plugin("ADD", &fast.path(), &fast_args, &conf)
            .await
            .unwrap(),
    );

    let started = std::time::Instant::now();
    let slow_add = spawn_plugin("ADD", &slow.path(), &pod_args("slow", "uid-slow"), &conf);
    wait_until("the tool hangs", || hung.exists()).await;
    // While the slow pod's tool hangs, another pod's DEL goes through.
    success(
        &spawn_plugin("DEL", &fast.path(), &fast_args, &conf)
            .await
            .unwrap(),
    );
    assert!(!slow_add.is_finished(), "the DEL waited for the hung tool");
    assert_not_redirected(&fast);

    let out = slow_add.await.unwrap();
    // The install and its clean-up each hit the deadline once: well before the
    // hung tool's 60 s.
    assert!(
        started.elapsed() < EVENT_TIMEOUT,
        "took {:?}",
        started.elapsed()
    );
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let msg = err["msg"].as_str().unwrap();
    assert!(
        msg.contains("iptables-save") && msg.contains("did not finish within 3s"),
        "{err}"
    );
    assert!(!slow.exec(&["iptables-save"]).contains("AMBIT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_ztunnel_refuses_in_a_snapshot_fails_check_until_a_retry_is_taken() {
    if !have_root("a_pod_ztunnel_refuses_in_a_snapshot_fails_check_until_a_retry_is_taken") {
        return;
    }
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = TestAgent::config_in(dir.path());
    // Long enough for the CHECKs below to run before the first retry.
    config.zds_retry_ms = 3000;
    let agent = TestAgent::start_with(config);
    let conf = net_conf(&agent.plugin_socket, "198.18.0.70");
    let args = pod_args("cart-0", "uid-cart-0");
    let check = || async {
        spawn_plugin("CHECK", &ns.path(), &args, &conf)
            .await
            .unwrap()
    };
    let failure = |out: std::process::Output| -> String {
        assert!(!out.status.success(), "CHECK passed");
        let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(err["code"], 11, "{err}");
        err["msg"].as_str().unwrap().to_owned()
    };

    // Enrolled with no ztunnel: redirected, but nobody serves it yet.
    success(&spawn_plugin("ADD", &ns.path(), &args, &conf).await.unwrap());
    assert!(failure(check().await).contains("not acked"));

    // ztunnel refuses it in its snapshot.
    let zt = FakeZtunnel::connect(&agent.zds_socket).await;
    zt.send_raw(&ambit_cni::zds::encode_hello(1)).await;
    assert!(matches!(zt.recv().await, (Payload::Add(a), Some(_)) if a.uid == "uid-cart-0"));
    zt.ack("no certificate for shop/web yet").await;
    assert!(matches!(zt.recv().await, (Payload::SnapshotSent(_), None)));
    zt.ack("").await;
    let msg = failure(check().await);
    assert!(msg.contains("no certificate for shop/web yet"), "{msg}");
    // Fail closed: the pod stays redirected meanwhile.
    assert_redirected(&ns);

    // The agent offers it again (refused once more, then taken).
    let (msg, fd) = zt.recv().await;
    assert!(matches!(msg, Payload::Add(a) if a.uid == "uid-cart-0"));
    assert_eq!(NetNs::from_fd(fd.unwrap()).inode().unwrap(), ns.inode());
    zt.ack("still no certificate").await;
    // The agent takes each answer in after ztunnel sends it, with no lock held
    // meanwhile: CHECK tells the new refusal once it has.
    let out = check_until(&ns, &args, &conf, |out| {
        String::from_utf8_lossy(&out.stdout).contains("still no certificate")
    })
    .await;
    failure(out);
    assert!(matches!(zt.recv().await, (Payload::Add(_), Some(_))));
    zt.ack("").await;
    success(&check_until(&ns, &args, &conf, |out| out.status.success()).await);
}

/// Runs CHECK until `done` holds for its output; fails after [`EVENT_TIMEOUT`].
async fn check_until(
    ns: &TestNetns,
    args: &str,
    conf: &str,
    done: impl Fn(&std::process::Output) -> bool,
) -> std::process::Output {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let out = spawn_plugin("CHECK", &ns.path(), args, conf).await.unwrap();
        if done(&out) {
            return out;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "CHECK never got there: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// An ADD while ztunnel sits on a snapshot's ack waits for its own ack without
/// holding up the agent, and reaches ztunnel after the snapshot, never before.
#[tokio::test(flavor = "multi_thread")]
async fn an_add_during_a_slow_snapshot_is_queued_after_it_and_holds_up_nothing() {
    if !have_root("an_add_during_a_slow_snapshot_is_queued_after_it_and_holds_up_nothing") {
        return;
    }
    let (old, new) = (TestNetns::new(), TestNetns::new());
    let agent = TestAgent::start();
    let conf = net_conf(&agent.plugin_socket, "198.18.0.80");
    // Enrolled while no ztunnel is connected: it goes in the first snapshot.
    success(
        &spawn_plugin("ADD", &old.path(), &pod_args("old", "uid-old"), &conf)
            .await
            .unwrap(),
    );
    let zt = FakeZtunnel::connect(&agent.zds_socket).await;
    zt.send_raw(&ambit_cni::zds::encode_hello(1)).await;
    assert!(matches!(zt.recv().await, (Payload::Add(a), Some(_)) if a.uid == "uid-old"));

    // ztunnel sits on that ack. Another pod's ADD is redirected and queued...
    let add = spawn_plugin("ADD", &new.path(), &pod_args("new", "uid-new"), &conf);
    wait_until("the new pod is redirected", || {
        iptables(&new).contains("AMBIT_OUTPUT")
    })
    .await;
    // ...and the agent answers meanwhile: a CHECK of the pod in the snapshot
    // says it is not served yet, without waiting for ztunnel.
    let started = std::time::Instant::now();
    let out = spawn_plugin("CHECK", &old.path(), &pod_args("old", "uid-old"), &conf)
        .await
        .unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "CHECK took {:?}",
        started.elapsed()
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not acked"));
    assert!(!add.is_finished(), "the ADD did not wait for ztunnel's ack");

    zt.ack("").await;
    assert!(matches!(zt.recv().await, (Payload::SnapshotSent(_), None)));
    zt.ack("").await;
    assert!(matches!(zt.recv().await, (Payload::Add(a), Some(_)) if a.uid == "uid-new"));
    zt.ack("").await;
    success(&add.await.unwrap());
}

/// IPv6, which the redirection does not cover, is turned off in the pod but on
/// loopback: no fe80:: address is left for a neighbour to reach the pod's
/// listeners by. CHECK fails once it is turned on again. No IPv6 is sent.
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_is_turned_off_in_the_pod_and_check_notices_it_back_on() {
    if !have_root("ipv6_is_turned_off_in_the_pod_and_check_notices_it_back_on") {
        return;
    }
    let ns = TestNetns::new();
    ns.add_veth_pair("eth0", "peer0");
    let addrs = || ns.exec(&["ip", "-6", "addr", "show"]);
    assert!(addrs().contains("inet6 fe80"), "{}", addrs());
    let agent = TestAgent::start();
    let (zt, _) = FakeZtunnel::attach(&agent.zds_socket).await;
    let conf = net_conf(&agent.plugin_socket, "198.18.0.90");
    let args = pod_args("v4-0", "uid-v4-0");
    let plugin = spawn_plugin("ADD", &ns.path(), &args, &conf);
    assert!(matches!(zt.recv().await, (Payload::Add(_), Some(_))));
    zt.ack("").await;
    success(&plugin.await.unwrap());

    for iface in ["eth0", "peer0", "default"] {
        assert_eq!(ns.ipv6_disabled(iface), "1", "{iface}");
    }
    assert_eq!(ns.ipv6_disabled("lo"), "0");
    let left = addrs();
    assert!(!left.contains("fe80"), "{left}");
    assert!(left.contains("inet6 ::1"), "{left}");
    let check = || spawn_plugin("CHECK", &ns.path(), &args, &conf);
    success(&check().await.unwrap());

    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0"]);
    let out = check().await.unwrap();
    assert!(!out.status.success(), "CHECK passed with IPv6 back on");
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(err["msg"].as_str().unwrap().contains("incomplete"), "{err}");
}
