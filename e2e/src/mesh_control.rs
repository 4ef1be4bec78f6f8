//! What control-plane tests do to a meshed cluster: start it with extra
//! istiod-lite flags, stop and restart istiod-lite in place, read what the
//! control plane and every ztunnel report (debug views, metrics, config dumps),
//! and watch traffic through it all (a long-lived echo session, a wire capture).

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::control_plane::{CONTROL_NODE, DEBUG_ADDR, METRICS_ADDR};
use crate::echo::EchoTool;
use crate::mesh::{MESH_WAIT, MeshCluster, MeshError};
use crate::pod::Pod;
use crate::process::{NsProcess, WAIT_TIMEOUT};

/// ztunnel's admin endpoint, on each node's loopback.
const ZTUNNEL_ADMIN: &str = "127.0.0.1:15000";

/// How a control-plane test wants its cluster.
#[derive(Debug, Clone, Default)]
pub struct MeshOptions {
    /// Flags appended to istiod-lite's command line (`--cert-ttl 30s`, ...).
    pub istiod_args: Vec<OsString>,
}

impl MeshOptions {
    /// Appends flags to istiod-lite's command line.
    pub fn istiod_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.istiod_args.extend(args.into_iter().map(Into::into));
        self
    }
}

impl MeshCluster {
    /// As [`MeshCluster::start`], with `options` applied (istiod-lite's extra
    /// flags are on its command line from the start).
    pub async fn start_with(nodes: u8, options: MeshOptions) -> Result<Self, MeshError> {
        Self::start_mode(nodes, Some((None, options.istiod_args))).await
    }

    /// Stops istiod-lite (SIGTERM) and waits until it exited.
    pub async fn stop_control_plane(&mut self) -> Result<(), MeshError> {
        self.control
            .as_mut()
            .ok_or_else(|| MeshError::Setup("no control plane".into()))?
            .stop()
            .await
    }

    /// Starts istiod-lite again in place and waits until it serves (not until
    /// the ztunnels reconnected: see [`MeshCluster::wait_for_xds`]).
    pub async fn restart_control_plane(&mut self) -> Result<(), MeshError> {
        self.control
            .as_mut()
            .ok_or_else(|| MeshError::Setup("no control plane".into()))?
            .restart(&self.cluster)
            .await
    }

    /// Waits until every ztunnel's xDS stream is `connected` (or is not).
    pub async fn wait_for_xds(&self, connected: bool) -> Result<(), MeshError> {
        let what = if connected {
            "an xDS stream"
        } else {
            "the xDS stream's end"
        };
        self.wait_for_dump(what, |d| d["xds"]["connected"] == connected)
            .await
    }

    /// Node `node`'s ztunnel config dump.
    pub fn config_dump(&self, node: u8) -> Result<serde_json::Value, MeshError> {
        let body = self.fetch(node, ZTUNNEL_ADMIN, "/config_dump")?;
        serde_json::from_str(&body)
            .map_err(|e| MeshError::Setup(format!("node {node}'s config dump: {e}: {body}")))
    }

    /// Every node's ztunnel config dump, node 1 first.
    pub fn config_dumps(&self) -> Result<Vec<serde_json::Value>, MeshError> {
        (1..=self.nodes.len() as u8)
            .map(|n| self.config_dump(n))
            .collect()
    }

    /// istiod-lite's debug view at `path` (`/debug/clients`, `/debug/errors`,
    /// `/debug/model`), as JSON.
    pub fn control_debug(&self, path: &str) -> Result<serde_json::Value, MeshError> {
        let body = self.fetch(CONTROL_NODE, DEBUG_ADDR, path)?;
        serde_json::from_str(&body)
            .map_err(|e| MeshError::Setup(format!("istiod-lite {path}: {e}: {body}")))
    }

    /// istiod-lite's Prometheus text.
    pub fn control_metrics(&self) -> Result<String, MeshError> {
        self.fetch(CONTROL_NODE, METRICS_ADDR, "/metrics")
    }

    /// Polls `cond` every 50 ms until it returns `Some`, for at most `timeout`.
    pub async fn poll<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Self) -> Option<T>,
    ) -> Result<T, MeshError> {
        let deadline = poll_deadline(tokio::time::Instant::now(), timeout);
        loop {
            if let Some(v) = cond(self) {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(MeshError::Setup(format!("no {what} within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// When [`MeshCluster::poll`] gives up: exactly `timeout` after `now`, however
/// long (a test asks what it needs, and the error message names that value).
fn poll_deadline(now: tokio::time::Instant, timeout: Duration) -> tokio::time::Instant {
    now + timeout
}

impl MeshCluster {
    /// Waits until every ztunnel's config dump satisfies `ready` (polled; the
    /// dump is read from each node's admin endpoint), for at most [`MESH_WAIT`] in
    /// all. On failure the error says what was last seen: the last dump, or why it
    /// could not be fetched or read; a ztunnel that exited fails at once.
    pub async fn wait_for_dump(
        &self,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(), MeshError> {
        let deadline = std::time::Instant::now() + MESH_WAIT;
        for (i, node) in self.nodes.iter().enumerate() {
            let n = u8::try_from(i + 1).map_err(|e| setup("node number", e))?;
            loop {
                let remaining = deadline.saturating_duration_since(std::time::Instant::now());
                // At least a short try, so a fetch started at the deadline can succeed.
                let bound = remaining.max(Duration::from_millis(200));
                let last = match self.fetch_within(n, ZTUNNEL_ADMIN, "/config_dump", bound) {
                    Ok(body) => match serde_json::from_str::<serde_json::Value>(&body) {
                        Ok(dump) if ready(&dump) => break,
                        Ok(_) => format!("the last dump: {}", shorten(&body)),
                        Err(e) => format!("an unreadable dump ({e}): {}", shorten(&body)),
                    },
                    Err(e) => format!("no dump: {e}"),
                };
                if node.ztunnel.has_exited() {
                    return Err(MeshError::Setup(format!(
                        "node {n}'s ztunnel exited while waiting for {what}; {last}; stderr: {}",
                        node.ztunnel.stderr()
                    )));
                }
                if std::time::Instant::now() >= deadline {
                    return Err(MeshError::Setup(format!(
                        "node {n}'s ztunnel did not get {what} within {MESH_WAIT:?}; {last}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// GETs `path` from `addr` inside node `node`'s namespace (the admin endpoint is
    /// on the node's loopback) and returns the body.
    pub fn fetch(&self, node: u8, addr: &str, path: &str) -> Result<String, MeshError> {
        self.fetch_within(node, addr, path, FETCH_TIMEOUT)
    }

    /// [`MeshCluster::fetch`], giving up after `timeout` in all (connect, request
    /// and the whole response).
    pub fn fetch_within(
        &self,
        node: u8,
        addr: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<String, MeshError> {
        let node = self
            .cluster
            .node(node)
            .ok_or_else(|| MeshError::Setup(format!("no node {node}")))?;
        let ns = mesh_core::os::NetNs::open(format!("/run/netns/{}", node.netns_name()))
            .map_err(|e| setup("open node namespace", e))?;
        let target: SocketAddr = addr.parse().map_err(|e| setup(addr, e))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        let text = ns
            .run(move || http_get(target, &request, timeout))
            .map_err(|e| setup("enter node namespace", e))?
            .map_err(|e| setup(&format!("GET {path} from {addr}"), e))?;
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    }
}

/// How long [`MeshCluster::fetch`] waits for a response.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a config dump an error message shows.
const SHOWN_DUMP: usize = 4096;

/// The first [`SHOWN_DUMP`] bytes of `text`, cut at a character boundary.
fn shorten(text: &str) -> String {
    if text.len() <= SHOWN_DUMP {
        return text.to_string();
    }
    let mut end = SHOWN_DUMP;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

/// Sends `request` to `target` and reads the response until the server closes,
/// all within `timeout`.
fn http_get(target: SocketAddr, request: &str, timeout: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no complete response within {timeout:?}"),
            ))
        } else {
            Ok(left)
        }
    };
    let mut s = std::net::TcpStream::connect_timeout(&target, left()?)?;
    s.set_write_timeout(Some(left()?))?;
    s.write_all(request.as_bytes())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        s.set_read_timeout(Some(left()?))?;
        match s.read(&mut buf)? {
            0 => break,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8(out).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The sum of the samples of metric `name` whose line contains every one of
/// `labels` (`type_url="..."`), in Prometheus text.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter(|l| labels.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn setup(what: &str, e: impl std::fmt::Display) -> MeshError {
    MeshError::Setup(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_waits_as_long_as_asked_even_past_two_minutes() {
        let now = tokio::time::Instant::now();
        for asked in [
            Duration::from_secs(5),
            Duration::from_secs(150),
            MESH_WAIT * 10,
        ] {
            assert_eq!(poll_deadline(now, asked) - now, asked);
        }
    }

    #[test]
    fn a_fetch_gives_up_within_its_bound_when_the_server_never_answers() {
        // A server that accepts (the kernel does, from the backlog) and never writes.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let started = std::time::Instant::now();
        let err =
            http_get(target, "GET / HTTP/1.1\r\n\r\n", Duration::from_millis(300)).unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        assert_eq!(shorten("short"), "short");
        assert!(shorten(&"é".repeat(SHOWN_DUMP)).ends_with(&format!("({} bytes)", 2 * SHOWN_DUMP)));
    }
}

/// `e2e-tool session` in a pod: one connection echoing a ping every 50 ms, for
/// tests that must show an established connection survives something.
#[derive(Debug)]
pub struct EchoSession {
    process: NsProcess,
    stop: PathBuf,
    _dir: tempfile::TempDir,
}

impl EchoSession {
    /// Connects from `from` to `to` and returns after the first echo.
    pub async fn start(tool: &EchoTool, from: &Pod, to: SocketAddr) -> Result<Self, MeshError> {
        let dir = crate::naming::temp_dir("session").map_err(|e| setup("temp dir", e))?;
        let stop = dir.path().join("stop");
        let mut cmd = from.command(tool.path());
        cmd.arg("session").arg(to.to_string()).arg(&stop);
        let process = NsProcess::spawn(format!("session {} -> {to}", from.name()), cmd)?;
        let mut session = Self {
            process,
            stop,
            _dir: dir,
        };
        session.next_pong().await?;
        Ok(session)
    }

    /// The number of the next echo that came back; an error if the connection broke.
    pub async fn next_pong(&mut self) -> Result<u64, MeshError> {
        let line = self
            .process
            .wait_for_line("a pong", WAIT_TIMEOUT, |l| {
                l.starts_with("pong ") || l.starts_with("broken")
            })
            .await?;
        pong(&line)?.ok_or_else(|| MeshError::Setup(format!("no pong in {line:?}")))
    }

    /// The number of the latest echo that came back (waiting for one if none
    /// came since the last call); an error if the connection broke.
    pub async fn latest(&mut self) -> Result<u64, MeshError> {
        let mut latest = self.next_pong().await?;
        // A zero timeout still takes what is buffered.
        while let Ok(line) = self.process.next_line(Duration::ZERO).await {
            latest = pong(&line)?.unwrap_or(latest);
        }
        Ok(latest)
    }

    /// Stops the session and returns the number of echoes; an error if the
    /// connection ever broke or did not end cleanly.
    pub async fn finish(mut self) -> Result<u64, MeshError> {
        let mut last = self.next_pong().await?;
        std::fs::write(&self.stop, "").map_err(|e| setup("session stop file", e))?;
        loop {
            let line = self.process.next_line(WAIT_TIMEOUT).await?;
            last = pong(&line)?.unwrap_or(last);
            if line == "closed cleanly" {
                return Ok(last);
            }
        }
    }
}

/// The echo number of a `pong N` line; an error for a `broken` line.
fn pong(line: &str) -> Result<Option<u64>, MeshError> {
    if line.starts_with("broken") {
        return Err(MeshError::Setup(format!("the session broke: {line}")));
    }
    line.strip_prefix("pong ")
        .map(|n| {
            n.parse()
                .map_err(|e| setup(&format!("pong line {line:?}"), e))
        })
        .transpose()
}

/// tcpdump in a node's namespace: what crosses the wire to or from one host.
#[derive(Debug)]
pub struct WireCapture {
    process: NsProcess,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl WireCapture {
    /// Starts capturing in node `node` and returns once tcpdump listens.
    pub async fn start(mesh: &MeshCluster, node: u8, host: Ipv4Addr) -> Result<Self, MeshError> {
        let dir = crate::naming::temp_dir("capture").map_err(|e| setup("temp dir", e))?;
        let file = dir.path().join("wire.pcap");
        let mut cmd = mesh
            .cluster
            .node(node)
            .ok_or_else(|| MeshError::Setup(format!("no node {node}")))?
            .command("tcpdump");
        // Immediate mode: packets reach the file as they come.
        cmd.args(["-i", "any", "-nn", "-U", "--immediate-mode", "-w"])
            .arg(&file)
            .arg(format!("host {host}"));
        let process = NsProcess::spawn("tcpdump", cmd)?;
        let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
        while !process.stderr().contains("listening on") {
            if tokio::time::Instant::now() > deadline {
                return Err(MeshError::Setup(format!(
                    "tcpdump never started: {}",
                    process.stderr()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            process,
            file,
            _dir: dir,
        })
    }

    /// Stops the capture (SIGINT flushes it); returns the raw capture and the
    /// decoded IP packet lines.
    pub async fn finish(mut self) -> Result<(Vec<u8>, Vec<String>), MeshError> {
        let pid = self.process.pid().ok_or_else(|| {
            MeshError::Setup(format!("tcpdump exited: {}", self.process.stderr()))
        })?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).map_err(|e| setup("pid", e))?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)
            .map_err(|e| setup("SIGINT tcpdump", e))?;
        self.process.wait(WAIT_TIMEOUT).await?;
        let bytes = std::fs::read(&self.file).map_err(|e| setup("capture", e))?;
        let out = std::process::Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .map_err(|e| setup("tcpdump -r", e))?;
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(" IP "))
            .map(str::to_owned)
            .collect();
        Ok((bytes, lines))
    }
}
