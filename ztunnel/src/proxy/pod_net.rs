//! Sockets of one pod: created inside the pod's network namespace (so the pod's
//! address is theirs) and marked, so the pod's redirection rules let them through.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::hbone::TcpDialer;
use mesh_core::os::NetNs;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Where a pod's sockets are made. Without a namespace (tests on loopback), they
/// are made in ztunnel's own.
#[derive(Clone, Debug)]
pub struct PodNet {
    netns: Option<Arc<PodNs>>,
    mark: u32,
    spoof_source: bool,
}

/// A pod's namespace, and the one to come back to after making a socket there.
#[derive(Debug)]
struct PodNs {
    pod: NetNs,
    home: NetNs,
}

impl PodNet {
    /// Sockets in `netns`, marked with `mark`; inbound delivery keeps the caller's
    /// address. Each socket is made by the calling thread, which enters the pod's
    /// namespace for the few calls that make it and returns to the namespace it is
    /// in now (ztunnel's own) at once: no hand-off to another thread per connection.
    pub fn new(netns: NetNs, mark: u32) -> io::Result<Self> {
        Ok(Self {
            netns: Some(Arc::new(PodNs {
                pod: netns,
                home: NetNs::current()?,
            })),
            mark,
            spoof_source: true,
        })
    }

    /// Sockets in ztunnel's own namespace (SOCKS5, and tests on loopback).
    pub fn local(mark: u32) -> Self {
        Self {
            netns: None,
            mark,
            spoof_source: true,
        }
    }

    /// Inbound delivery from the pod's own address instead of the caller's: for
    /// running without CAP_NET_ADMIN (tests on loopback), where IP_TRANSPARENT is
    /// refused.
    pub fn without_source_spoofing(mut self) -> Self {
        self.spoof_source = false;
        self
    }

    pub fn spoof_source(&self) -> bool {
        self.spoof_source
    }

    /// Runs `f` inside the pod's namespace on this thread; `f` only makes a socket
    /// (no blocking call, no await).
    fn in_ns<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match &self.netns {
            Some(ns) => ns.pod.run_here(&ns.home, f)?,
            None => f(),
        }
    }

    /// A listener on `addr` inside the pod. Its connections are accepted with
    /// `TCP_NODELAY` (Linux copies it from the listener, at no cost per
    /// connection): the app already chose Nagle or not on its own socket, and a
    /// second Nagle in the relay would hold a small write back until the app's
    /// delayed ACK, up to 40 ms.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let mark = self.mark;
        let std = self.in_ns(|| {
            let s = nonblocking_tcp(addr)?;
            s.set_reuse_address(true)?;
            s.set_tcp_nodelay(true)?;
            set_mark(&s, mark)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Ok(std::net::TcpListener::from(s))
        })?;
        TcpListener::from_std(std)
    }

    /// Connects to `dst` from inside the pod. With `source`, the connection leaves
    /// from that address even though it is not the pod's (IP_TRANSPARENT): how
    /// inbound traffic reaches the app with the caller's own address.
    pub async fn connect(&self, dst: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
        let mark = self.mark;
        let std = self.in_ns(|| {
            let s = nonblocking_tcp(dst)?;
            set_mark(&s, mark)?;
            s.set_tcp_nodelay(true)?;
            if let Some(src) = source {
                match src {
                    IpAddr::V4(_) => s.set_ip_transparent_v4(true)?,
                    IpAddr::V6(_) => s.set_ip_transparent_v6(true)?,
                }
                s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
            }
            Ok(std::net::TcpStream::from(s))
        })?;
        TcpSocket::from_std_stream(std).connect(dst).await
    }

    /// [`Self::connect`], given up after `within`: a destination that drops SYNs
    /// would otherwise hold its caller (and the client's connection, already
    /// accepted) through the kernel's two minutes of retries.
    pub async fn connect_within(
        &self,
        dst: SocketAddr,
        source: Option<IpAddr>,
        within: Duration,
    ) -> io::Result<TcpStream> {
        tokio::time::timeout(within, self.connect(dst, source))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {within:?}"),
                ))
            })
    }
}

/// A TCP socket for `addr`'s family, non-blocking from the start (one system call
/// instead of three: the runtime needs it non-blocking).
fn nonblocking_tcp(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
}

fn set_mark(s: &Socket, mark: u32) -> io::Result<()> {
    match s.set_mark(mark) {
        // Without CAP_NET_ADMIN (unprivileged tests on loopback) the mark is moot:
        // there are no redirection rules to skip.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        other => other,
    }
}

/// The destination a captured connection from `peer` was headed for
/// (SO_ORIGINAL_DST). Both ends of a connection have the same address family, so
/// the peer's (from `accept`) picks the option without asking for the local address.
pub fn original_dst(stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match peer {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

/// Where a refused connection without an original destination is recorded as
/// headed: the listener that accepted it (unspecified if even that is unknown).
pub(super) fn listener_addr(stream: &TcpStream) -> SocketAddr {
    stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The why view's explanation of a missing original destination.
pub(super) fn no_original_destination(error: &io::Error) -> String {
    format!(
        "the connection has no original destination ({error}): it was not redirected to this listener, or its conntrack entry is gone"
    )
}

/// Whether a connection accepted on `listener_port`, headed for `dst`, was made to
/// the listener itself instead of being redirected to it (`curl 127.0.0.1:15001`
/// from the pod): proxying it would dial the same listener again, and again, each
/// turn holding two sockets. Only a destination on the listener's own port can be
/// one, so other connections cost no system call.
pub fn is_self_call(stream: &TcpStream, dst: SocketAddr, listener_port: u16) -> bool {
    dst.port() == listener_port && stream.local_addr().map_or(true, |local| local == dst)
}

impl TcpDialer for PodNet {
    async fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.connect(addr, None).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = PodNet::local(0)
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(!client.nodelay().unwrap());
        assert!(accepted.nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_dial_nobody_answers_gives_up_after_its_time() {
        // A listener that never accepts, its queue filled: Linux drops further
        // SYNs, as a firewall that drops them would.
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        s.listen(0).unwrap();
        let addr = s.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(c)) =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
            {
                queued.push(c);
            }
        }
        assert!(!queued.is_empty(), "the queue took no connection at all");
        let net = PodNet::local(0);
        let err = net
            .connect_within(addr, None, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("no answer within"), "{err}");
    }
}
