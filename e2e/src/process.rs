//! Processes run inside a pod's or node's namespace (`ip netns exec`): spawn, wait for
//! a line on stdout (readiness, events) with a bound instead of a fixed sleep, collect
//! stderr for error messages, kill. The cluster's teardown also kills anything left
//! in its namespaces, so a handle that outlives its test leaks nothing.
//!
//! Every process starts in a process group of its own: a terminal's Ctrl-C reaches
//! only the test process or `meshctl demo`, which then tears the mesh down in order
//! (processes, then namespaces) instead of every child dying at once under it.

use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

/// How long helpers wait for a process to get ready or answer: generous, since CI
/// machines are small and a bound is only hit when something is broken.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Keep at most this much of a process's stderr (the tail) for error messages.
const STDERR_KEEP: usize = 16 * 1024;

/// A process that did not do what the test waited for.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {label}: {source}")]
    Spawn {
        label: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{label}: I/O error: {source}")]
    Io {
        label: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{label}: no {waited_for} within {timeout:?}; stderr: {stderr}")]
    Timeout {
        label: String,
        waited_for: String,
        timeout: Duration,
        stderr: String,
    },
    #[error("{label} ended ({status}) before {waited_for}; stderr: {stderr}")]
    Exited {
        label: String,
        waited_for: String,
        status: String,
        stderr: String,
    },
    #[error("{label} failed ({status}); stdout: {stdout}; stderr: {stderr}")]
    Failed {
        label: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
}

/// Forwards every stdout line until EOF or a read error.
async fn read_lines(
    mut lines: Lines<BufReader<ChildStdout>>,
    tx: tokio::sync::mpsc::UnboundedSender<std::io::Result<String>>,
) {
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                if tx.send(Ok(line)).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// Whether the processes started from now on get process groups of their own.
static OWN_GROUPS: AtomicBool = AtomicBool::new(false);

/// From now on, every process started here runs in a process group of its own,
/// so a terminal's Ctrl-C reaches the caller alone, which then tears the mesh
/// down in order (`meshctl demo`, which handles the signals). Tests leave their
/// processes in their own group, so a Ctrl-C of `cargo test`, which runs no
/// teardown, still stops them all.
pub fn use_own_process_groups() {
    OWN_GROUPS.store(true, Ordering::SeqCst);
}

/// Puts `cmd` in a group of its own if [`use_own_process_groups`] was called.
fn maybe_own_group(cmd: &mut Command) {
    if OWN_GROUPS.load(Ordering::SeqCst) {
        cmd.process_group(0);
    }
}

/// A running process with its stdout read line by line.
#[derive(Debug)]
pub struct NsProcess {
    label: String,
    child: Child,
    // Filled by a task that reads stdout all the time: a process is never blocked
    // writing its log because the test is not waiting for a line just then.
    stdout: tokio::sync::mpsc::UnboundedReceiver<std::io::Result<String>>,
    stderr: Arc<Mutex<String>>,
    stderr_task: Option<JoinHandle<()>>,
}

impl NsProcess {
    /// Starts `cmd` (usually from [`crate::Pod::command`]) with stdout and stderr
    /// piped, kill-on-drop set (in a process group of its own after
    /// [`use_own_process_groups`]). Needs a tokio runtime.
    pub fn spawn(label: impl Into<String>, mut cmd: Command) -> Result<Self, ProcessError> {
        let label = label.into();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        maybe_own_group(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            label: label.clone(),
            source,
        })?;
        let stdout = child.stdout.take().ok_or_else(|| ProcessError::Spawn {
            label: label.clone(),
            source: std::io::Error::other("stdout was not piped"),
        })?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_task = child
            .stderr
            .take()
            .map(|pipe| tokio::spawn(collect_tail(pipe, Arc::clone(&stderr))));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(read_lines(BufReader::new(stdout).lines(), tx));
        Ok(Self {
            label,
            child,
            stdout: rx,
            stderr,
            stderr_task,
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The pid, while the process has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process has ended (reaped, gone, or a zombie not yet reaped),
    /// without waiting and without needing `&mut`: for checks inside a poll loop.
    pub fn has_exited(&self) -> bool {
        let Some(pid) = self.pid() else {
            return true;
        };
        // The state is the first field after the command name's closing parenthesis.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rfind(')')
                .is_some_and(|i| stat[i + 1..].trim_start().starts_with(['Z', 'X']))
        })
    }

    /// What the process wrote to stderr so far (its tail).
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The next stdout line, waiting at most `timeout`.
    pub async fn next_line(&mut self, timeout: Duration) -> Result<String, ProcessError> {
        self.wait_for_line("a line on stdout", timeout, |_| true)
            .await
    }

    /// The stdout lines read so far and not yet taken, without waiting: what a test
    /// drops to tell the lines printed from now on from the earlier ones.
    pub fn take_buffered_lines(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(Ok(line)) = self.stdout.try_recv() {
            lines.push(line);
        }
        lines
    }

    /// Reads stdout until a line matches `wanted` (lines before it are dropped) and
    /// returns that line. `waited_for` names the event in errors.
    pub async fn wait_for_line(
        &mut self,
        waited_for: &str,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<String, ProcessError> {
        let read = async {
            loop {
                match self.stdout.recv().await {
                    Some(Ok(line)) if wanted(&line) => return Ok(Some(line)),
                    Some(Ok(_)) => continue,
                    None => return Ok(None),
                    Some(Err(e)) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => {
                let status = self.finish().await;
                Err(ProcessError::Exited {
                    label: self.label.clone(),
                    waited_for: waited_for.to_owned(),
                    status,
                    stderr: self.stderr(),
                })
            }
            Ok(Err(source)) => Err(ProcessError::Io {
                label: self.label.clone(),
                source,
            }),
            Err(_elapsed) => Err(ProcessError::Timeout {
                label: self.label.clone(),
                waited_for: waited_for.to_owned(),
                timeout,
                stderr: self.stderr(),
            }),
        }
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(source)) => Err(ProcessError::Io {
                label: self.label.clone(),
                source,
            }),
            Err(_elapsed) => Err(ProcessError::Timeout {
                label: self.label.clone(),
                waited_for: "exit".to_owned(),
                timeout,
                stderr: self.stderr(),
            }),
        }
    }

    /// Stops the process as an orchestrator would (SIGTERM) and waits until it
    /// exited.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        let io = |source| ProcessError::Io {
            label: self.label.clone(),
            source,
        };
        let pid = self
            .pid()
            .ok_or_else(|| io(std::io::Error::other("already exited")))?;
        let pid = i32::try_from(pid).map_err(|e| io(std::io::Error::other(e)))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| io(e.into()))?;
        self.wait(timeout).await
    }

    /// SIGKILLs the process and reaps it.
    pub async fn kill(&mut self) -> Result<(), ProcessError> {
        self.child.kill().await.map_err(|source| ProcessError::Io {
            label: self.label.clone(),
            source,
        })
    }

    /// Ends the process if it still runs (SIGKILL) and reaps it. One that already
    /// exited is not an error: this is teardown, not a check.
    pub async fn stop(&mut self) -> Result<(), ProcessError> {
        match self.child.try_wait() {
            Ok(Some(_exited)) => Ok(()),
            Ok(None) => self.kill().await,
            Err(source) => Err(ProcessError::Io {
                label: self.label.clone(),
                source,
            }),
        }
    }

    /// After stdout closed: the exit status (if it comes soon) and the rest of stderr.
    async fn finish(&mut self) -> String {
        let status = match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => "still running, stdout closed".to_owned(),
        };
        if let Some(task) = self.stderr_task.take() {
            let _drained = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        status
    }
}

/// Appends lines of `pipe` to `sink`, keeping the last [`STDERR_KEEP`] bytes.
async fn collect_tail(pipe: impl AsyncRead + Unpin, sink: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut text = sink.lock().unwrap_or_else(|e| e.into_inner());
        text.push_str(&line);
        text.push('\n');
        if text.len() > STDERR_KEEP {
            let mut cut = text.len() - STDERR_KEEP;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text.drain(..cut);
        }
    }
}

/// Runs `cmd` to completion within `timeout` and returns its stdout; a non-zero exit
/// is an error carrying both outputs. The process runs in a group of its own (see
/// [`NsProcess::spawn`]).
pub async fn run_output(
    label: &str,
    mut cmd: Command,
    timeout: Duration,
) -> Result<String, ProcessError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    maybe_own_group(&mut cmd);
    let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        label: label.to_owned(),
        source,
    })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => {
            return Err(ProcessError::Io {
                label: label.to_owned(),
                source,
            });
        }
        Err(_elapsed) => {
            return Err(ProcessError::Timeout {
                label: label.to_owned(),
                waited_for: "exit".to_owned(),
                timeout,
                stderr: String::new(),
            });
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(ProcessError::Failed {
            label: label.to_owned(),
            status: out.status,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(stdout)
}
