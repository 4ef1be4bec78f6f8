//! One HBONE tunnel as a byte stream: an HTTP/2 stream adapted to `AsyncRead` and
//! `AsyncWrite`, with half-close (`shutdown` ends our side with END_STREAM; the
//! peer's END_STREAM reads as EOF) and HTTP/2 flow control as backpressure.
//!
//! The splice ([`crate::copy`]) moves owned chunks through it instead: a received
//! DATA frame's bytes are handed on as they are, a chunk to send becomes DATA frames
//! as it is, so the tunnel's ends copy nothing.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::SpliceIo;

/// Released when the tunnel is dropped, e.g. to return a pooled connection's slot.
pub(crate) type DropGuard = Box<dyn Send + Sync + 'static>;

/// A tunnel's bytes, both ways.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    write_closed: bool,
    _guard: Option<DropGuard>,
}

impl fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id())
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, guard: Option<DropGuard>) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            _guard: guard,
        }
    }

    /// Abandons the tunnel: the peer sees a stream reset, not a clean end.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }

    /// The next received bytes as they arrived (one DATA frame's, or what a partial
    /// read left of it); empty at the end of the stream.
    pub fn poll_recv_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(std::mem::take(&mut self.pending)));
        }
        loop {
            match ready!(self.recv.poll_data(cx)) {
                // An empty DATA frame without END_STREAM is not the end.
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    // The window reopens as soon as a frame is taken; at most one
                    // frame per stream waits unread on our side.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Ok(data));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Ok(Bytes::new())),
            }
        }
    }

    /// Sends from the front of `data` as far as the flow-control window allows,
    /// without copying, and advances `data` past what was sent (at least one byte
    /// when ready with `Ok`).
    pub fn poll_send_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_send_with(cx, data.len(), |n| data.split_to(n)))?;
        Poll::Ready(Ok(()))
    }

    /// Waits for window for up to `len` bytes, then sends the `make(n)` bytes it allows.
    fn poll_send_with(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        make: impl FnOnce(usize) -> Bytes,
    ) -> Poll<io::Result<usize>> {
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let sent = loop {
            self.send.reserve_capacity(len);
            match ready!(self.send.poll_capacity(cx)) {
                // Capacity was taken back before we used it: wait for more.
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(len);
                    break self.send.send_data(make(n), false).ok().map(|()| n);
                }
                Some(Err(_)) | None => break None,
            }
        };
        if let Some(n) = sent {
            return Poll::Ready(Ok(n));
        }
        // The stream is gone; its reset says why.
        let reason = ready!(self.send.poll_reset(cx));
        Poll::Ready(Err(match reason {
            Ok(r) => io::Error::new(io::ErrorKind::ConnectionReset, format!("stream reset: {r}")),
            Err(e) => h2_to_io(e),
        }))
    }

    /// Ends our side with END_STREAM (half-close).
    pub fn close_write(&mut self) -> io::Result<()> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Ok(())
    }

    /// [`Self::close_write`], where a peer that already reset the stream with
    /// NO_ERROR (its side done, it wants no more: RFC 9113 section 8.1) makes
    /// ending ours moot rather than an error.
    fn poll_close_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.close_write() {
            Err(_)
                if matches!(
                    self.send.poll_reset(cx),
                    Poll::Ready(Ok(h2::Reason::NO_ERROR))
                ) =>
            {
                Poll::Ready(Ok(()))
            }
            done => Poll::Ready(done),
        }
    }
}

impl SpliceIo for H2Stream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buf: &mut BytesMut,
    ) -> Poll<io::Result<Bytes>> {
        self.poll_recv_bytes(cx)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        self.poll_send_bytes(cx, chunk)
    }

    fn reads_into_buffer(&self) -> bool {
        false
    }

    fn poll_flush_chunks(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written by the connection task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown_chunks(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_close_write(cx)
    }

    fn abort(&mut self) {
        self.reset();
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::CANCEL) | Some(h2::Reason::STREAM_CLOSED) => {
            io::ErrorKind::ConnectionReset
        }
        Some(h2::Reason::REFUSED_STREAM) => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut data = ready!(self.poll_recv_bytes(cx))?;
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        data.advance(n);
        self.pending = data;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Copies only what the window takes now.
        self.poll_send_with(cx, buf.len(), |n| Bytes::copy_from_slice(&buf[..n]))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written by the connection task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_close_write(cx)
    }
}
