//! The istiod-lite process a scenario measures: its release binary (built on
//! demand), the process itself (killed when dropped, however the run ends), its
//! addresses (taken from its "serving" log line, so every port can be 0), its
//! debug and metrics endpoints, and its memory and CPU from `/proc`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep};

/// Why istiod-lite could not be run or read.
#[derive(Debug, thiserror::Error)]
pub enum IstiodError {
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cargo build --release -p istiod-lite: {0}")]
    Build(String),
    #[error("istiod-lite exited; its log ends with:\n{0}")]
    Exited(String),
    #[error("istiod-lite: {0}")]
    Unexpected(String),
}

fn io_err(step: &'static str) -> impl FnOnce(io::Error) -> IstiodError {
    move |source| IstiodError::Io { step, source }
}

/// The release binary: `AMBIT_BENCH_ISTIOD` if set, else built now (`cargo build
/// --release -p istiod-lite`) into the target directory of the running benchmark.
pub fn release_binary() -> Result<PathBuf, IstiodError> {
    if let Some(path) = std::env::var_os("AMBIT_BENCH_ISTIOD") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(io_err("current exe"))?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| IstiodError::Build("no target directory".into()))?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", "istiod-lite"])
        .args(["--bin", "istiod-lite"])
        .status()
        .map_err(io_err("cargo build"))?;
    if !status.success() {
        return Err(IstiodError::Build(status.to_string()));
    }
    Ok(dir.join("istiod-lite"))
}

/// What istiod-lite serves on.
#[derive(Clone, Debug)]
pub struct Addrs {
    pub grpc: String,
    pub admin: String,
    pub metrics: String,
}

/// A running istiod-lite on 127.0.0.1; killed when dropped.
#[derive(Debug)]
pub struct Istiod {
    child: Child,
    pub pid: u32,
    log: PathBuf,
}

impl Istiod {
    /// Starts `binary` with `args` (its config flags), every listener on
    /// 127.0.0.1 port 0, its output in `log`.
    pub fn start(binary: &Path, args: &[String], log: &Path) -> Result<Self, IstiodError> {
        let out = std::fs::File::create(log).map_err(io_err("istiod-lite log"))?;
        let err = out.try_clone().map_err(io_err("istiod-lite log"))?;
        let child = Command::new(binary)
            .args(args)
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err("starting istiod-lite"))?;
        let pid = child.id();
        Ok(Self {
            child,
            pid,
            log: log.to_path_buf(),
        })
    }

    /// Waits for the "istiod-lite serving" line and takes the addresses from it.
    pub async fn wait_serving(&self, timeout: Duration) -> Result<Addrs, IstiodError> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("istiod-lite serving")) {
                let field = |key: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(key))
                        .map(str::to_string)
                        .ok_or_else(|| IstiodError::Unexpected(format!("no {key} in {line:?}")))
                };
                return Ok(Addrs {
                    grpc: field("grpc_addr=")?,
                    admin: field("admin_addr=")?,
                    metrics: field("metrics_addr=")?,
                });
            }
            self.check_alive()?;
            sleep(Duration::from_millis(50)).await;
        }
        Err(IstiodError::Unexpected(format!(
            "not serving after {timeout:?}"
        )))
    }

    /// Waits until the config is synced and the xDS store holds `expected`
    /// resources of each type URL.
    pub async fn wait_loaded(
        &self,
        addrs: &Addrs,
        expected: &[(&str, usize)],
        timeout: Duration,
    ) -> Result<(), IstiodError> {
        let start = Instant::now();
        let mut held = Value::Null;
        while start.elapsed() < timeout {
            let (status, _) = http_get(&addrs.admin, "/healthz/ready").await?;
            if status == 200 {
                held = debug_clients(addrs).await?["resources"].take();
                if expected
                    .iter()
                    .all(|(t, n)| held[*t].as_u64() == Some(*n as u64))
                {
                    return Ok(());
                }
            }
            self.check_alive()?;
            sleep(Duration::from_millis(100)).await;
        }
        let (_, errors) = http_get(&addrs.admin, "/debug/errors").await?;
        Err(IstiodError::Unexpected(format!(
            "holds {held} after {timeout:?}, want {expected:?}; config errors: {}",
            errors.chars().take(1000).collect::<String>()
        )))
    }

    fn check_alive(&self) -> Result<(), IstiodError> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid));
        // A zombie (`Z`) has exited and waits to be reaped.
        let alive = stat.is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        });
        if alive {
            return Ok(());
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        Err(IstiodError::Exited(
            lines[lines.len().saturating_sub(20)..].join("\n"),
        ))
    }

    /// A field of its `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
    pub fn status_kib(&self, field: &str) -> u64 {
        crate::procfs::status_kib(self.pid, field).unwrap_or(0)
    }

    /// CPU seconds used so far (user + system).
    pub fn cpu_secs(&self) -> f64 {
        crate::procfs::cpu_secs(self.pid).unwrap_or(0.0)
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The debug view of connected clients (`/debug/clients`).
pub async fn debug_clients(addrs: &Addrs) -> Result<Value, IstiodError> {
    let (_, body) = http_get(&addrs.admin, "/debug/clients").await?;
    serde_json::from_str(&body).map_err(|e| IstiodError::Unexpected(format!("/debug/clients: {e}")))
}

/// Waits until the debug view shows `clients` clients, each with everything it
/// holds ACKed and nothing pending or in flight; returns how many were not.
pub async fn wait_all_acked(
    addrs: &Addrs,
    clients: usize,
    timeout: Duration,
) -> Result<usize, IstiodError> {
    let start = Instant::now();
    loop {
        let view = debug_clients(addrs).await?;
        let list = view["clients"].as_array().map_or(&[][..], Vec::as_slice);
        let settled = list
            .iter()
            .filter(|c| {
                c["types"].as_array().is_some_and(|types| {
                    types.iter().all(|t| {
                        t["acked"] == t["held"] && t["pending"] == 0 && t["in_flight"] == 0
                    })
                })
            })
            .count();
        let missing = clients.saturating_sub(settled);
        if missing == 0 || start.elapsed() >= timeout {
            return Ok(missing);
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of a Prometheus metric's samples over all its label sets.
pub async fn metric_sum(addrs: &Addrs, name: &str) -> Result<f64, IstiodError> {
    let (_, text) = http_get(&addrs.metrics, "/metrics").await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// A plain HTTP/1.1 GET; returns the status and the body.
async fn http_get(addr: &str, path: &str) -> Result<(u16, String), IstiodError> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(io_err("connecting to istiod-lite's HTTP endpoint"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(io_err("HTTP request"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .map_err(io_err("HTTP response"))?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || IstiodError::Unexpected(format!("GET {path}: not an HTTP response"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}
