//! The plugin's side of the agent protocol ([`crate::api`]): blocking, one request
//! per connection, the whole exchange, connecting included, bounded by a
//! deadline. An agent serving its most connections stops accepting, and a blocking
//! connect to its full backlog would wait for as long as that lasts.

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
        let mut stream = self.connect(deadline)?;
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

    /// Connects without blocking; while the agent's backlog is full (`EAGAIN`),
    /// tries again, every millisecond up to every 50 ms, until `deadline`.
    fn connect(&self, deadline: Instant) -> Result<UnixStream, ClientError> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let connect_err = |source| ClientError::Connect {
            socket: self.socket.clone(),
            source,
        };
        let addr = SockAddr::unix(&self.socket).map_err(connect_err)?;
        let mut pause = Duration::from_millis(1);
        loop {
            let sock = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(connect_err)?;
            sock.set_nonblocking(true).map_err(connect_err)?;
            match sock.connect(&addr) {
                Ok(()) => {
                    sock.set_nonblocking(false).map_err(connect_err)?;
                    return Ok(UnixStream::from(sock));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.timed_out());
                    }
                    std::thread::sleep(pause.min(left));
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(connect_err(e)),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connecting_to_an_agent_that_accepts_nothing_times_out() {
        use socket2::{Domain, SockAddr, Socket, Type};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        // A listener that never accepts, with the smallest backlog, filled up.
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(0).unwrap();
        let mut queued = Vec::new();
        loop {
            let s = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            match s.connect(&SockAddr::unix(&path).unwrap()) {
                Ok(()) => queued.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the backlog: {e}"),
            }
            assert!(queued.len() < 1000, "the backlog never filled");
        }

        let client = AgentClient::new(&path, Duration::from_millis(300));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(client.request(&AgentRequest::List));
        });
        // A connect without a bound would never return.
        let result = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the request did not give up on a full backlog");
        assert!(
            matches!(result, Err(ClientError::TimedOut { .. })),
            "{result:?}"
        );
        drop(queued);
    }
}
