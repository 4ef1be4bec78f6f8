//! The plugin's side of the agent protocol ([`crate::api`]): blocking, one request
//! per connection, the whole exchange bounded by a deadline.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::api::{AgentReply, AgentRequest, MAX_MESSAGE};

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the ambit node agent at {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the ambit node agent at {} failed: {source}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the ambit node agent at {} did not answer within {timeout:?}", socket.display())]
    TimedOut { socket: PathBuf, timeout: Duration },
    #[error("the ambit node agent at {} sent a bad reply: {reason}", socket.display())]
    BadReply { socket: PathBuf, reason: String },
}

/// Asks the agent at one socket.
#[derive(Clone, Debug)]
pub struct AgentClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` and waits for the reply, at most the client's timeout.
    pub fn request(&self, request: &AgentRequest) -> Result<AgentReply, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let body = serde_json::to_vec(request).map_err(|e| self.bad(e.to_string()))?;
        self.arm(&stream, deadline)?;
        stream
            .write_all(&body)
            .and_then(|()| stream.shutdown(Shutdown::Write))
            .map_err(|e| self.io(e))?;

        let mut reply = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            self.arm(&stream, deadline)?;
            let n = stream.read(&mut chunk).map_err(|e| self.io(e))?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&chunk[..n]);
            if reply.len() > MAX_MESSAGE {
                return Err(self.bad(format!("reply over {MAX_MESSAGE} bytes")));
            }
        }
        serde_json::from_slice(&reply).map_err(|e| self.bad(e.to_string()))
    }

    /// Sets the socket timeouts to what is left before `deadline`.
    fn arm(&self, stream: &UnixStream, deadline: Instant) -> Result<(), ClientError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        stream
            .set_read_timeout(Some(left))
            .and_then(|()| stream.set_write_timeout(Some(left)))
            .map_err(|e| self.io(e))
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        if matches!(
            source.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            return self.timed_out();
        }
        ClientError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn timed_out(&self) -> ClientError {
        ClientError::TimedOut {
            socket: self.socket.clone(),
            timeout: self.timeout,
        }
    }

    fn bad(&self, reason: String) -> ClientError {
        ClientError::BadReply {
            socket: self.socket.clone(),
            reason,
        }
    }
}
