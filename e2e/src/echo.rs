//! Drives `e2e-tool` (this crate's binary) inside pods: an echo server that reports
//! each connection's source address, and a one-shot client. The library cannot name
//! the binary itself; integration tests pass `env!("CARGO_BIN_EXE_e2e-tool")`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pod::Pod;
use crate::process::{NsProcess, ProcessError, WAIT_TIMEOUT, run_output};

/// A message that makes `e2e-tool serve` abort its connection (a TCP reset)
/// instead of echoing: how tests check that a reset crosses the mesh as a reset.
pub const RESET_REQUEST: &str = "reset-me";

/// Where `e2e-tool` is.
#[derive(Debug, Clone)]
pub struct EchoTool {
    path: PathBuf,
}

impl EchoTool {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts an echo server in `pod` on `port` and returns once it is listening.
    pub async fn serve(&self, pod: &Pod, port: u16) -> Result<EchoServer, ProcessError> {
        let mut cmd = pod.command(&self.path);
        cmd.arg("serve").arg(port.to_string());
        let mut process = NsProcess::spawn(format!("echo server in pod {}", pod.name()), cmd)?;
        process
            .wait_for_line("`listening`", WAIT_TIMEOUT, |l| l.starts_with("listening "))
            .await?;
        Ok(EchoServer {
            process,
            addr: SocketAddr::from((pod.ip(), port)),
        })
    }

    /// From `pod`, sends `message` to `addr` and returns the reply.
    pub async fn connect(
        &self,
        pod: &Pod,
        addr: SocketAddr,
        message: &str,
    ) -> Result<String, ProcessError> {
        let mut cmd = pod.command(&self.path);
        cmd.arg("connect").arg(addr.to_string()).arg(message);
        let label = format!("echo client in pod {} to {addr}", pod.name());
        run_output(&label, cmd, WAIT_TIMEOUT).await
    }
}

/// A running echo server.
#[derive(Debug)]
pub struct EchoServer {
    process: NsProcess,
    addr: SocketAddr,
}

impl EchoServer {
    /// The pod IP and port clients dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The source address of the next accepted connection, as the server saw it.
    pub async fn next_peer(&mut self, timeout: Duration) -> Result<SocketAddr, ProcessError> {
        let line = self
            .process
            .wait_for_line("`peer` line", timeout, |l| l.starts_with("peer "))
            .await?;
        let text = line.trim_start_matches("peer ").trim();
        text.parse().map_err(|e| ProcessError::Io {
            label: self.process.label().to_owned(),
            source: std::io::Error::other(format!("bad peer line {line:?}: {e}")),
        })
    }

    /// The server's pid, while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn process(&mut self) -> &mut NsProcess {
        &mut self.process
    }
}
