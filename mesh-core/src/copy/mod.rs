//! The splice between two byte streams: both directions at once, with backpressure,
//! half-close, live byte counts, and buffers that grow with the flow.
//!
//! Bytes move as owned chunks ([`Bytes`]): a socket is read into the direction's
//! buffer and the filled part handed on, an HBONE tunnel hands over its HTTP/2
//! frames' bytes and takes chunks as frames, so a tunnel end copies nothing in user
//! space ([`SpliceIo`]).
//!
//! A direction starts with a small buffer (cheap for the many idle connections of a
//! node) and doubles it each time a few reads in a row fill it, up to a cap, so bulk
//! transfers move large chunks per syscall and per HTTP/2 frame. A grown buffer is
//! let go whenever its source runs dry (the size stays), so an idle connection
//! holds none.
//!
//! This module adapts streams to the splice ([`SpliceIo`]) and counts its bytes;
//! `splice` is the two-way copy itself ([`copy_bidirectional`]).

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

mod splice;
#[cfg(test)]
mod tests;

pub use splice::{CopyError, Direction, copy_bidirectional};

/// First buffer of a direction.
pub const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest buffer a direction grows to.
pub const MAX_BUFFER: usize = 256 * 1024;

/// One end of a splice: reads give owned chunks, writes take them.
///
/// Sockets and pipes copy through the direction's buffer (the `by_copy` impls); an
/// HBONE tunnel passes chunks through as HTTP/2 DATA frames.
pub trait SpliceIo {
    /// Reads the next chunk; an empty chunk is the end of the stream. A reader that
    /// copies reads into `buf`'s spare capacity (the splice reserves what this
    /// direction may take) and returns the filled part split off `buf`.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<Bytes>>;

    /// Writes from the front of `chunk` and advances it past what was written: at
    /// least one byte when ready with `Ok`.
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes)
    -> Poll<io::Result<()>>;

    /// Pushes out what was written.
    fn poll_flush_chunks(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Ends the write side (FIN, or END_STREAM on a tunnel).
    fn poll_shutdown_chunks(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Whether reads fill the direction's buffer (sockets, pipes). A reader that
    /// hands over chunks of its own (an HBONE tunnel's DATA frames) says no, and
    /// the splice reserves nothing for it.
    fn reads_into_buffer(&self) -> bool {
        true
    }

    /// Abandons the stream, so that its peer sees an abort rather than an orderly
    /// end: a TCP reset when the socket closes, an HTTP/2 RST_STREAM. Streams that
    /// have no abort (pipes) just close.
    fn abort(&mut self);
}

/// Reads into `buf`'s spare capacity and splits off what arrived.
fn poll_read_by_copy<R>(
    reader: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<Bytes>>
where
    R: AsyncRead + Unpin + ?Sized,
{
    ready!(pin!(reader.read_buf(buf)).poll(cx))?;
    Poll::Ready(Ok(buf.split().freeze()))
}

/// Writes from the front of `chunk`, advancing it.
fn poll_write_by_copy<W>(
    writer: &mut W,
    cx: &mut Context<'_>,
    chunk: &mut Bytes,
) -> Poll<io::Result<()>>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let n = ready!(Pin::new(writer).poll_write(cx, chunk))?;
    if n == 0 && !chunk.is_empty() {
        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
    }
    chunk.advance(n);
    Poll::Ready(Ok(()))
}

macro_rules! by_copy {
    ($($t:ty => $abort:expr),* $(,)?) => {$(
        impl SpliceIo for $t {
            fn poll_read_chunk(
                &mut self,
                cx: &mut Context<'_>,
                buf: &mut BytesMut,
            ) -> Poll<io::Result<Bytes>> {
                poll_read_by_copy(self, cx, buf)
            }

            fn poll_write_chunk(
                &mut self,
                cx: &mut Context<'_>,
                chunk: &mut Bytes,
            ) -> Poll<io::Result<()>> {
                poll_write_by_copy(self, cx, chunk)
            }

            fn poll_flush_chunks(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(self).poll_flush(cx)
            }

            fn poll_shutdown_chunks(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(self).poll_shutdown(cx)
            }

            fn abort(&mut self) {
                let abort: fn(&mut $t) = $abort;
                abort(self);
            }
        }
    )*};
}

by_copy!(
    tokio::net::TcpStream => |s| {
        if let Err(e) = reset_on_close(s) {
            tracing::debug!(error = %e, "SO_LINGER on an aborted connection");
        }
    },
    tokio::net::UnixStream => |_| {},
    tokio::io::DuplexStream => |_| {},
);

/// Makes closing `stream` send a TCP reset instead of a FIN (`SO_LINGER` 0), so its
/// peer cannot take an aborted or refused connection for a complete one.
pub fn reset_on_close(stream: &tokio::net::TcpStream) -> io::Result<()> {
    socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO))
}

/// Most bytes [`take_ready`] takes.
pub const EARLY_DATA_MAX: usize = 4096;

/// What `stream` already holds, up to [`EARLY_DATA_MAX`] bytes, without waiting
/// (`MSG_DONTWAIT`): a captured client's first bytes, to send with the CONNECT
/// rather than a round trip after it. Empty when nothing has arrived yet, or at
/// EOF (the splice sees the EOF again); an error means the peer is gone.
pub fn take_ready(stream: &tokio::net::TcpStream) -> io::Result<Bytes> {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; EARLY_DATA_MAX];
    match nix::sys::socket::recv(
        stream.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Ok(Bytes::new()),
        Err(e) => Err(e.into()),
    }
}

/// Live byte counts of a splice, readable while it runs (metrics, admin view).
#[derive(Debug, Default)]
pub struct CopyStats {
    a_to_b: AtomicU64,
    b_to_a: AtomicU64,
}

impl CopyStats {
    /// Counts `n` bytes moved from `a` to `b` outside the splice (e.g. early data
    /// sent with a CONNECT before the splice started).
    pub fn count_a_to_b(&self, n: u64) {
        self.a_to_b.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes read from `a` and written to `b` so far.
    pub fn a_to_b(&self) -> u64 {
        self.a_to_b.load(Ordering::Relaxed)
    }

    /// Bytes read from `b` and written to `a` so far.
    pub fn b_to_a(&self) -> u64 {
        self.b_to_a.load(Ordering::Relaxed)
    }
}
