//! Async Unix SOCK_SEQPACKET sockets: message boundaries kept, with at most one file
//! descriptor passed alongside a message (SCM_RIGHTS). The node agent and ztunnel
//! speak over this.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Largest message either side sends; a longer one is refused as truncated.
pub const MAX_PACKET: usize = 64 * 1024;

/// Registers a socket with tokio's reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that stays open, and its
    // as_raw_fd() stays the same, for as long as the AsyncFd owns it.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

fn new_socket() -> io::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// A listening SOCK_SEQPACKET socket.
#[derive(Debug)]
pub struct SeqPacketListener {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacketListener {
    /// Binds `path` (removing a stale socket file first) and listens.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let fd = new_socket()?;
        let addr = UnixAddr::new(path).map_err(io::Error::from)?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
        socket::listen(&fd, Backlog::new(16).map_err(io::Error::from)?).map_err(io::Error::from)?;
        Ok(Self { fd: register(fd)? })
    }

    pub async fn accept(&self) -> io::Result<SeqPacket> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                socket::accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(io::Error::from)
            }) {
                Ok(res) => {
                    let raw = res?;
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    return SeqPacket::from_fd(fd);
                }
                Err(_would_block) => continue,
            }
        }
    }
}

/// A connected SOCK_SEQPACKET socket.
#[derive(Debug)]
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacket {
    pub async fn connect(path: &Path) -> io::Result<Self> {
        let fd = new_socket()?;
        let addr = UnixAddr::new(path).map_err(io::Error::from)?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        let sock = Self::from_fd(fd)?;
        // Completes (or fails) the non-blocking connect.
        let _ = sock.fd.writable().await?;
        if let Ok(err) = socket::getsockopt(&sock.fd, socket::sockopt::SocketError)
            && err != 0
        {
            return Err(io::Error::from_raw_os_error(err));
        }
        Ok(sock)
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self { fd: register(fd)? })
    }

    /// A connected pair, for tests.
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        Ok((Self::from_fd(a)?, Self::from_fd(b)?))
    }

    /// Sends one message, with `fd` attached when given.
    pub async fn send(&self, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if msg.len() > MAX_PACKET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "message over MAX_PACKET",
            ));
        }
        let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        self.fd
            .async_io(Interest::WRITABLE, |sock| {
                let iov = [IoSlice::new(msg)];
                let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
                    vec![]
                } else {
                    vec![ControlMessage::ScmRights(&fds)]
                };
                socket::sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            })
            .await?;
        Ok(())
    }

    /// Receives one message and the descriptor that came with it. An empty message
    /// with no descriptor means the peer closed. A truncated message, or more than one
    /// descriptor, is an `InvalidData` error (the descriptors are closed).
    pub async fn recv(&self) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
        let mut buf = vec![0u8; MAX_PACKET];
        let (n, mut fds, truncated) = self
            .fd
            .async_io(Interest::READABLE, |sock| {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let mut space = nix::cmsg_space!([RawFd; 4]);
                let msg = socket::recvmsg::<()>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        for r in raw {
                            // SAFETY: the kernel installed this descriptor in our table
                            // for this message; we are its only owner.
                            fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                        }
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                Ok((msg.bytes, fds, truncated))
            })
            .await?;
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "message truncated",
            ));
        }
        if fds.len() > 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} descriptors with one message, at most 1 allowed",
                    fds.len()
                ),
            ));
        }
        buf.truncate(n);
        Ok((buf, fds.pop()))
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[tokio::test]
    async fn messages_keep_their_boundaries_and_carry_a_descriptor() {
        let (a, b) = SeqPacket::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"passed along").unwrap();
        a.send(b"first", None).await.unwrap();
        a.send(b"second", Some(file.as_fd())).await.unwrap();
        let (m1, fd1) = b.recv().await.unwrap();
        assert_eq!((m1.as_slice(), fd1.is_none()), (&b"first"[..], true));
        let (m2, fd2) = b.recv().await.unwrap();
        assert_eq!(m2, b"second");
        // The received descriptor is the same open file.
        let mut got = std::fs::File::from(fd2.unwrap());
        got.rewind().unwrap();
        let mut text = String::new();
        got.read_to_string(&mut text).unwrap();
        assert_eq!(text, "passed along");
        drop(a);
        let (end, fd) = b.recv().await.unwrap();
        assert!(end.is_empty() && fd.is_none());
    }

    #[tokio::test]
    async fn listener_accepts_and_a_closed_peer_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = SeqPacketListener::bind(&path).unwrap();
        let (client, server) = tokio::join!(SeqPacket::connect(&path), listener.accept());
        let (client, server) = (client.unwrap(), server.unwrap());
        client.send(b"hello", None).await.unwrap();
        assert_eq!(server.recv().await.unwrap().0, b"hello");
        server.send(b"ack", None).await.unwrap();
        assert_eq!(client.recv().await.unwrap().0, b"ack");
        assert!(
            SeqPacket::connect(&dir.path().join("nobody.sock"))
                .await
                .is_err()
        );
    }
}
