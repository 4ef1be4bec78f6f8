//! Async Unix SOCK_SEQPACKET sockets: message boundaries kept, with at most one file
//! descriptor passed alongside a message (SCM_RIGHTS). The node agent and ztunnel
//! speak over this.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
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
        let (n, mut fds, flags) = self
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
                let (bytes, flags) = (msg.bytes, msg.flags);
                // Owned (and so closed on every path below) before anything can fail.
                let fds = take_fds(&space);
                Ok((bytes, fds, flags))
            })
            .await?;
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "more descriptors than fit with one message (control data truncated, {} received and closed)",
                    fds.len()
                ),
            ));
        }
        if flags.contains(MsgFlags::MSG_TRUNC) {
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

/// Takes ownership of every descriptor the kernel installed with one message: those
/// in the SCM_RIGHTS control messages of `control`, the zero-filled buffer recvmsg
/// wrote into. Walked here rather than with nix's `cmsgs()`, which refuses a
/// truncated buffer (MSG_CTRUNC) and so would leak the descriptors that did fit:
/// the kernel writes whole headers only, each giving the length of what follows
/// it, and our zeroes follow the last one.
fn take_fds(control: &[u8]) -> Vec<OwnedFd> {
    use nix::libc::{SCM_RIGHTS, SOL_SOCKET, c_int, cmsghdr};
    // CMSG_ALIGN on Linux (glibc and musl): to the size of a size_t.
    let align = |len: usize| len.next_multiple_of(std::mem::size_of::<usize>());
    // CMSG_LEN(0): where a message's data starts.
    let header = align(std::mem::size_of::<cmsghdr>());
    let mut fds = Vec::new();
    let mut at = 0;
    while let Some(bytes) = control.get(at..at + header) {
        // SAFETY: `bytes` holds at least size_of::<cmsghdr>() bytes;
        // read_unaligned copies them out whatever the buffer's alignment, and a
        // cmsghdr is plain integers, valid for any bit pattern.
        let cmsg: cmsghdr = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        #[allow(clippy::unnecessary_cast)] // usize on glibc, u32 on musl
        let len = cmsg.cmsg_len as usize;
        if len < header {
            break; // the zeroes after the last message
        }
        let end = (at + len).min(control.len());
        if cmsg.cmsg_level == SOL_SOCKET && cmsg.cmsg_type == SCM_RIGHTS {
            for raw in control[at + header..end].chunks_exact(std::mem::size_of::<c_int>()) {
                let Ok(raw) = <[u8; 4]>::try_from(raw) else {
                    continue;
                };
                // SAFETY: the kernel installed this descriptor in our table for
                // this message; we are its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(RawFd::from_ne_bytes(raw)) });
            }
        }
        at += align(len);
    }
    fds
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

    /// How many of this process's descriptors are open on one of `paths`. Other
    /// tests open and close descriptors meanwhile, so the test's own files are
    /// what is counted, not the whole table.
    fn open_on(paths: &[std::path::PathBuf]) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .filter(|target| paths.contains(target))
            .count()
    }

    #[tokio::test]
    async fn extra_descriptors_are_closed_and_the_session_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = (0..8).map(|i| dir.path().join(format!("f{i}"))).collect();
        let files: Vec<std::fs::File> = paths
            .iter()
            .map(|p| std::fs::File::create(p).unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let (a, b) = SeqPacket::pair().unwrap();
        // 2 fit in the control buffer, 8 do not (the kernel installs what fits
        // and flags the rest truncated): both are refused and every received
        // descriptor is closed.
        for count in [2, 8] {
            assert_eq!(open_on(&paths), 8, "the test's own descriptors");
            socket::sendmsg::<()>(
                a.as_fd().as_raw_fd(),
                &[IoSlice::new(b"many")],
                &[ControlMessage::ScmRights(&raw[..count])],
                MsgFlags::empty(),
                None,
            )
            .unwrap();
            let err = b.recv().await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{count}: {err}");
            assert_eq!(open_on(&paths), 8, "{count} sent: received ones leaked");
            // The session goes on.
            a.send(b"next", None).await.unwrap();
            let (next, fd) = b.recv().await.unwrap();
            assert_eq!((next.as_slice(), fd.is_none()), (&b"next"[..], true));
        }
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
