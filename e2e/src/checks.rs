//! Checks the e2e tests share: traffic that must pass or be refused, a ztunnel's
//! access log, and lookups in config dumps.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::process::ProcessError;
use crate::{EchoTool, MeshCluster, Pod};

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// The workload with uid `uid` in a ztunnel config dump.
pub fn workload<'a>(dump: &'a Value, uid: &str) -> Option<&'a Value> {
    dump["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["uid"] == uid)
}

/// Sends one message from `from` to `to` and asserts it came back.
pub async fn assert_echo(tool: &EchoTool, from: &Pod, to: SocketAddr, message: &str) {
    let reply = tool
        .connect(from, to, message)
        .await
        .unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.name()));
    assert_eq!(reply.trim(), message, "{} -> {to}", from.name());
}

/// A connection the destination's ztunnel refused (its policy): ztunnel aborts
/// the captured connection, so the client sees a reset (see [`assert_reset`]).
/// Anything else fails, a reply as much as a client that never ran or timed out.
pub async fn assert_refused(tool: &EchoTool, from: &Pod, to: SocketAddr) {
    assert_reset_sending(tool, from, to, "should-be-refused").await;
}

/// [`assert_refused`], and the refusal was node `node`'s policy decision: that
/// ztunnel's `ambit_connections_denied_total{reason="policy"}` went up. A reset
/// for any other cause (no route, no certificate, a ztunnel gone) fails.
pub async fn assert_denied_by_policy(
    mesh: &MeshCluster,
    node: u8,
    tool: &EchoTool,
    from: &Pod,
    to: SocketAddr,
) {
    let denied = |mesh: &MeshCluster| {
        let text = mesh
            .fetch(node, "127.0.0.1:15020", "/metrics")
            .unwrap_or_else(|e| panic!("node {node}'s metrics: {e}"));
        crate::mesh_control::metric_sum(
            &text,
            "ambit_connections_denied_total",
            &["reason=\"policy\""],
        )
    };
    let before = denied(mesh);
    assert_refused(tool, from, to).await;
    // Counted when refused, before the reset: a short wait covers the scrape race.
    let what = format!("policy denial on node {node} for {} -> {to}", from.name());
    mesh.poll(&what, Duration::from_secs(5), |m| {
        (denied(m) > before).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("the connection was reset, but: {e}"));
}

/// What a client saw of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The connection ended in order with this reply (possibly empty).
    Reply(String),
    /// The connection was reset: how ztunnel refuses a captured connection.
    Reset,
}

/// The errors of a connection that was reset: ECONNRESET, or ENOTCONN / EPIPE when
/// the reset came before the client's half-close or write. None follows a FIN.
const RESET_ERRORS: [&str; 3] = ["os error 104", "os error 107", "os error 32"];

/// Reads [`EchoTool::connect`]'s result: a reply, a reset, or (the `Err`) any other
/// failure: the client did not start, timed out, could not connect, ...
pub fn connect_outcome(result: Result<String, ProcessError>) -> Result<Outcome, String> {
    match result {
        Ok(reply) => Ok(Outcome::Reply(reply)),
        Err(ProcessError::Failed { stderr, .. })
            if RESET_ERRORS.iter().any(|code| stderr.contains(code)) =>
        {
            Ok(Outcome::Reset)
        }
        Err(e) => Err(format!("failed without a reset: {e}")),
    }
}

/// A captured connection its ztunnel refused (the destination's policy, no route):
/// the client sees a reset, never an orderly close that a client could take for an
/// empty reply.
pub async fn assert_reset(tool: &EchoTool, from: &Pod, to: SocketAddr) {
    assert_reset_sending(tool, from, to, "should-be-reset").await;
}

/// Like [`assert_reset`], sending `message`: [`crate::echo::RESET_REQUEST`] has
/// the server itself reset the connection.
pub async fn assert_reset_sending(tool: &EchoTool, from: &Pod, to: SocketAddr, message: &str) {
    match connect_outcome(tool.connect(from, to, message).await) {
        Ok(Outcome::Reset) => {}
        Ok(Outcome::Reply(reply)) => panic!(
            "{} -> {to} was closed in order (reply {reply:?}), not reset",
            from.name()
        ),
        Err(e) => panic!("{} -> {to} {e}", from.name()),
    }
}

/// The time at the start of a log line of the Ambit binaries (tracing's
/// `2026-11-23T01:04:21.123456Z`, UTC), for measuring when a process did something.
pub fn log_time(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut parts = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (parts.next()??, parts.next()??, parts.next()??);
    let valid = (1..=12).contains(&m) && (1..=31).contains(&d) && hh < 24 && mm < 60 && ss < 61;
    if !valid || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()?;
    let nanos: u32 = format!("{frac:0<9}").parse().ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// `client` reaches `near` (same node) and `far` (node 2) on port 8080 through
/// the mesh with a marker message; each server sees the client pod's own address,
/// and both ztunnels logged both identities (`identity`) for the cross-node
/// connection.
pub async fn assert_talk_with_identities(
    tool: &EchoTool,
    mesh: &mut MeshCluster,
    client: &Pod,
    [near, far]: [&Pod; 2],
    identity: &str,
) {
    const MARKER: &str = "marker-7f3a through the mesh";
    for server in [near, far] {
        let mut srv = tool.serve(server, 8080).await.expect("echo server");
        let addr = SocketAddr::from((server.ip(), 8080));
        assert_echo(tool, client, addr, MARKER).await;
        // A reset by the server reaches the client as a reset, never as an orderly
        // end that would make a cut-off reply look complete.
        assert_reset_sending(tool, client, addr, crate::echo::RESET_REQUEST).await;
        let peer = srv
            .next_peer(Duration::from_secs(10))
            .await
            .expect("the server saw a connection");
        assert_eq!(
            peer.ip(),
            client.ip(),
            "server {} saw {peer}",
            server.name()
        );
    }
    let (src, dst) = (
        format!("src_identity={identity}"),
        format!("dst_identity={identity}"),
    );
    let far_ip = far.ip().to_string();
    for (node, direction) in [(1, "outbound"), (2, "inbound")] {
        let what = format!("node {node} {direction} access log");
        let want = [src.as_str(), dst.as_str(), direction, far_ip.as_str()];
        access_log(mesh, node, &what, &want, Duration::from_secs(10)).await;
    }
}

/// Waits up to `wait` for node `node`'s ztunnel to log a completed connection
/// whose line holds every string of `want`; returns the line.
pub async fn access_log(
    mesh: &mut MeshCluster,
    node: u8,
    what: &str,
    want: &[&str],
    wait: Duration,
) -> String {
    mesh.nodes[usize::from(node) - 1]
        .ztunnel
        .wait_for_line(what, wait, |l| {
            l.contains("connection complete") && want.iter().all(|w| l.contains(w))
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Whether `needle` occurs in `haystack` (a packet capture, a log).
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A Namespace document, enrolled in the mesh or not.
pub fn namespace_yaml(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        "\n  labels:\n    istio.io/dataplane-mode: ambient"
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    fn failed(stderr: &str) -> ProcessError {
        ProcessError::Failed {
            label: "client".into(),
            status: ExitStatus::from_raw(256),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn only_a_reset_counts_as_a_refusal() {
        let reset = "Error: read reply\n\nCaused by:\n    Connection reset by peer (os error 104)";
        assert_eq!(connect_outcome(Err(failed(reset))), Ok(Outcome::Reset));
        assert_eq!(
            connect_outcome(Ok(String::new())),
            Ok(Outcome::Reply(String::new()))
        );
        let not_refusals = [
            failed("Cannot open network namespace: No such file or directory"),
            failed("connect 198.18.1.2:8080: Connection timed out (os error 110)"),
            ProcessError::Spawn {
                label: "client".into(),
                source: std::io::Error::other("no such file"),
            },
            ProcessError::Timeout {
                label: "client".into(),
                waited_for: "exit".into(),
                timeout: Duration::from_secs(20),
                stderr: String::new(),
            },
        ];
        for e in not_refusals {
            let shown = e.to_string();
            assert!(connect_outcome(Err(e)).is_err(), "{shown}");
        }
    }

    #[tokio::test]
    #[should_panic(expected = "failed without a reset")]
    async fn a_client_that_never_ran_is_not_a_refusal() {
        let pod = Pod {
            name: "ghost".into(),
            namespace: "default".into(),
            node: 1,
            netns: "ambit-e2e-no-such-namespace".into(),
            container_id: "ghost".into(),
            ip: std::net::Ipv4Addr::new(198, 18, 1, 2),
            cni_result: crate::cni::CniResult::parse(serde_json::json!({})).unwrap(),
            cni_args: Vec::new(),
            labels: Vec::new(),
        };
        let tool = EchoTool::new("/nonexistent/e2e-tool");
        assert_refused(&tool, &pod, SocketAddr::from(([198, 18, 1, 3], 8080))).await;
    }

    #[test]
    fn log_times_are_read_as_utc() {
        let at = |s: &str| log_time(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap());
        assert_eq!(at("1970-01-01T00:00:00Z INFO x"), Some(Duration::ZERO));
        assert_eq!(
            at("2000-03-01T00:00:01.5Z DEBUG ztunnel::state::xds: xDS state applied"),
            Some(Duration::new(951_868_801, 500_000_000))
        );
        assert_eq!(
            at("2026-11-23T01:04:21.123456Z  INFO y"),
            Some(Duration::new(1_795_395_861, 123_456_000))
        );
        assert_eq!(log_time("INFO no time"), None);
        assert_eq!(log_time("2026-13-01T00:00:00Z x"), None);
    }
}
