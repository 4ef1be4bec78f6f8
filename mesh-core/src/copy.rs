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
//! transfers move large chunks per syscall and per HTTP/2 frame.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// First buffer of a direction.
pub const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest buffer a direction grows to.
pub const MAX_BUFFER: usize = 256 * 1024;
/// Full reads in a row before the buffer doubles.
const FULL_READS_TO_GROW: u8 = 2;
/// Loop turns without a pending read or write before yielding to other tasks.
const TURNS_BEFORE_YIELD: u32 = 32;

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

/// Which way the failing direction was copying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    AToB,
    BToA,
}

/// A splice that ended on an I/O error, with the direction that failed.
#[derive(Debug, thiserror::Error)]
#[error("copy {direction:?} failed: {source}")]
pub struct CopyError {
    pub direction: Direction,
    #[source]
    pub source: io::Error,
}

/// Copies `a` to `b` and `b` to `a` until both sides have reached EOF; the end of one
/// direction shuts down the write side of its destination (half-close). Returns the
/// bytes moved `(a_to_b, b_to_a)`; `stats` counts the same while it runs.
///
/// A failure aborts both streams ([`SpliceIo::abort`]), so a reset or a broken
/// tunnel reaches the other peer as a reset, as it would on a direct connection,
/// never as an orderly end that would make a cut-off transfer look complete. A
/// failed read ends the splice at once. A failed write ends only its direction:
/// the other goes on until its own end, so what the failed side sent before it
/// went away (a server's "413" before the reset that refuses the rest of an upload)
/// still arrives, then both are aborted. Meanwhile the failed direction reads on
/// and drops what comes (its peer may be blocked on an upload it finishes before
/// it reads the answer), and the other does not pass its end on as a FIN, which
/// would let the peer take the reset that follows for an orderly end. The splice
/// dropped before its end (a forced drain) aborts both too.
pub async fn copy_bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    stats: &CopyStats,
) -> Result<(u64, u64), CopyError>
where
    A: SpliceIo + ?Sized,
    B: SpliceIo + ?Sized,
{
    let mut ends = AbortUnlessDone { a, b, done: false };
    let (mut ab, mut ba) = (HalfCopy::new(), HalfCopy::new());
    let (mut ab_end, mut ba_end) = (None, None);
    let failed = |end: &Option<Result<u64, HalfError>>| matches!(end, Some(Err(_)));
    let result = poll_fn(|cx| {
        let (a, b) = (&mut *ends.a, &mut *ends.b);
        if ab_end.is_none()
            && let Poll::Ready(end) = ab.poll(cx, a, b, &stats.a_to_b, failed(&ba_end))
        {
            ab_end = Some(end);
        }
        if ba_end.is_none()
            && let Poll::Ready(end) = ba.poll(cx, b, a, &stats.b_to_a, failed(&ab_end))
        {
            ba_end = Some(end);
        }
        // A direction whose write failed reads on and drops what comes while the
        // other runs: its source may be blocked writing (an upload) until then.
        if failed(&ab_end) && ba_end.is_none() {
            ab.poll_discard(cx, a);
        }
        if failed(&ba_end) && ab_end.is_none() {
            ba.poll_discard(cx, b);
        }
        outcome(&mut ab_end, &mut ba_end)
    })
    .await;
    ends.done = result.is_ok();
    result
}

/// The splice's result once it is known, from each direction's end so far.
fn outcome(
    ab: &mut Option<Result<u64, HalfError>>,
    ba: &mut Option<Result<u64, HalfError>>,
) -> Poll<Result<(u64, u64), CopyError>> {
    let failed = |end: &Option<Result<u64, HalfError>>, other_ended: bool| match end {
        Some(Err(e)) => !e.on_write || other_ended,
        _ => false,
    };
    let error = |end: &mut Option<Result<u64, HalfError>>, direction| match end.take() {
        Some(Err(e)) => CopyError {
            direction,
            source: e.source,
        },
        _ => unreachable!("only a failed direction is taken"),
    };
    if failed(ab, ba.is_some()) {
        return Poll::Ready(Err(error(ab, Direction::AToB)));
    }
    if failed(ba, ab.is_some()) {
        return Poll::Ready(Err(error(ba, Direction::BToA)));
    }
    match (&*ab, &*ba) {
        (Some(Ok(x)), Some(Ok(y))) => Poll::Ready(Ok((*x, *y))),
        _ => Poll::Pending,
    }
}

/// Aborts both streams when dropped before the splice ended cleanly: on an error,
/// or when the splice's future is dropped.
struct AbortUnlessDone<'s, A: SpliceIo + ?Sized, B: SpliceIo + ?Sized> {
    a: &'s mut A,
    b: &'s mut B,
    done: bool,
}

impl<A: SpliceIo + ?Sized, B: SpliceIo + ?Sized> Drop for AbortUnlessDone<'_, A, B> {
    fn drop(&mut self) {
        if !self.done {
            self.a.abort();
            self.b.abort();
        }
    }
}

/// How one direction failed.
struct HalfError {
    source: io::Error,
    // Writing to the destination failed (else reading from the source did).
    on_write: bool,
}

/// One direction's state.
struct HalfCopy {
    // Where a copying reader puts its bytes. Its spare capacity is never zeroed (a
    // connection that moves 64 bytes touches one page, not 16 KiB), and once the
    // chunks split off it are written and dropped, it reuses the same allocation.
    buf: BytesMut,
    // What a read may take now: `INITIAL_BUFFER`, doubling up to `MAX_BUFFER`.
    size: usize,
    // Read and not yet all written.
    chunk: Bytes,
    full_reads: u8,
    read_done: bool,
    need_flush: bool,
    done: bool,
    total: u64,
}

impl HalfCopy {
    fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            size: INITIAL_BUFFER,
            chunk: Bytes::new(),
            full_reads: 0,
            read_done: false,
            need_flush: false,
            done: false,
            total: 0,
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        counter: &AtomicU64,
        other_failed: bool,
    ) -> Poll<Result<u64, HalfError>>
    where
        R: SpliceIo + ?Sized,
        W: SpliceIo + ?Sized,
    {
        let write_err = |source| HalfError {
            source,
            on_write: true,
        };
        if self.done {
            return Poll::Ready(Ok(self.total));
        }
        let mut turns = 0;
        loop {
            if self.chunk.is_empty() && !self.read_done {
                self.grow_if_saturated();
                self.buf.reserve(self.size);
                match reader.poll_read_chunk(cx, &mut self.buf) {
                    Poll::Ready(Ok(chunk)) if chunk.is_empty() => self.read_done = true,
                    Poll::Ready(Ok(chunk)) => {
                        self.full_reads = if chunk.len() >= self.size {
                            self.full_reads.saturating_add(1)
                        } else {
                            0
                        };
                        self.chunk = chunk;
                    }
                    Poll::Ready(Err(source)) => {
                        return Poll::Ready(Err(HalfError {
                            source,
                            on_write: false,
                        }));
                    }
                    Poll::Pending => {
                        // Nothing more to read now: push out what was written.
                        if self.need_flush {
                            ready!(writer.poll_flush_chunks(cx)).map_err(write_err)?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while !self.chunk.is_empty() {
                let before = self.chunk.len();
                ready!(writer.poll_write_chunk(cx, &mut self.chunk)).map_err(write_err)?;
                let n = (before - self.chunk.len()) as u64;
                self.total += n;
                counter.fetch_add(n, Ordering::Relaxed);
                self.need_flush = true;
            }
            if self.read_done {
                ready!(writer.poll_flush_chunks(cx)).map_err(write_err)?;
                // Once the other direction failed, both streams are aborted next:
                // a FIN (END_STREAM) now would let the peer take the reset that
                // follows for an orderly end.
                if !other_failed {
                    ready!(writer.poll_shutdown_chunks(cx)).map_err(write_err)?;
                }
                self.done = true;
                return Poll::Ready(Ok(self.total));
            }
            turns += 1;
            if turns == TURNS_BEFORE_YIELD {
                // Always-ready streams must not starve the other direction or task.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    /// After this direction's write failed: reads on from its source and drops
    /// what comes, until the source ends. Its peer may be blocked writing (an
    /// upload it finishes before it reads the answer the other direction still
    /// carries); a tunnel's flow-control window reopens the same way.
    fn poll_discard<R>(&mut self, cx: &mut Context<'_>, reader: &mut R)
    where
        R: SpliceIo + ?Sized,
    {
        self.chunk = Bytes::new();
        if self.read_done {
            return;
        }
        for _ in 0..TURNS_BEFORE_YIELD {
            self.buf.reserve(self.size);
            match reader.poll_read_chunk(cx, &mut self.buf) {
                Poll::Ready(Ok(chunk)) if !chunk.is_empty() => drop(chunk),
                Poll::Ready(_) => {
                    self.read_done = true;
                    return;
                }
                Poll::Pending => return,
            }
        }
        cx.waker().wake_by_ref();
    }

    fn grow_if_saturated(&mut self) {
        if self.full_reads >= FULL_READS_TO_GROW && self.size < MAX_BUFFER {
            self.size = (self.size * 2).min(MAX_BUFFER);
            self.full_reads = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        // client <-> (a  splice  b) <-> server, over in-memory pipes.
        let (mut client, mut a) = duplex(64 * 1024);
        let (mut b, mut server) = duplex(64 * 1024);
        let stats = std::sync::Arc::new(CopyStats::default());
        let st = stats.clone();
        let splice = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b, &st).await });

        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let up2 = up.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&up2).await.unwrap();
            client.shutdown().await.unwrap();
            // Half-closed: the reply still arrives.
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, up);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();

        assert_eq!(writer.await.unwrap(), b"done");
        let (ab, ba) = splice.await.unwrap().unwrap();
        assert_eq!((ab, ba), (up.len() as u64, 4));
        assert_eq!((stats.a_to_b(), stats.b_to_a()), (ab, ba));
    }

    /// A connected pair of loopback TCP sockets: (client end, server end).
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn a_reset_on_one_side_reaches_the_other_as_a_reset() {
        // client <-> (a  splice  b) <-> server, over real TCP on loopback.
        let (mut client, mut a) = tcp_pair().await;
        let (mut b, mut server) = tcp_pair().await;
        let splice = tokio::spawn(async move {
            let stats = CopyStats::default();
            copy_bidirectional(&mut a, &mut b, &stats).await
        });

        // The server takes the request, sends part of a reply, then aborts.
        client.write_all(b"request").await.unwrap();
        let mut request = [0u8; 7];
        server.read_exact(&mut request).await.unwrap();
        server.write_all(b"partial").await.unwrap();
        let mut reply = [0u8; 7];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"partial");
        reset_on_close(&server).unwrap();
        drop(server);

        let err = splice.await.unwrap().unwrap_err();
        assert_eq!(err.direction, Direction::BToA);
        // The client must not take the cut-off reply for a complete one.
        let mut rest = Vec::new();
        let end = client.read_to_end(&mut rest).await;
        assert_eq!(
            end.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the client saw an orderly end after {} more bytes",
            rest.len()
        );
    }

    /// A peer that refuses everything written to it (a reset), and whose last
    /// words arrive only when the test sends them.
    struct RefusingPeer {
        last_words: tokio::sync::mpsc::Receiver<Bytes>,
        aborted: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl SpliceIo for RefusingPeer {
        fn poll_read_chunk(
            &mut self,
            cx: &mut Context<'_>,
            _: &mut BytesMut,
        ) -> Poll<io::Result<Bytes>> {
            // The channel's end is this peer's EOF.
            Poll::Ready(Ok(ready!(self.last_words.poll_recv(cx)).unwrap_or_default()))
        }

        fn poll_write_chunk(&mut self, _: &mut Context<'_>, _: &mut Bytes) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }

        fn poll_flush_chunks(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown_chunks(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn abort(&mut self) {
            self.aborted.store(true, Ordering::SeqCst);
        }
    }

    fn refusing_peer() -> (
        RefusingPeer,
        tokio::sync::mpsc::Sender<Bytes>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        let (words, last_words) = tokio::sync::mpsc::channel(1);
        let aborted = std::sync::Arc::default();
        let peer = RefusingPeer {
            last_words,
            aborted: std::sync::Arc::clone(&aborted),
        };
        (peer, words, aborted)
    }

    #[tokio::test]
    async fn a_failed_write_still_lets_the_other_way_deliver_what_came_before() {
        let (mut client, mut a) = tcp_pair().await;
        let (mut peer, words, aborted) = refusing_peer();
        let splice = tokio::spawn(async move {
            let stats = CopyStats::default();
            copy_bidirectional(&mut a, &mut peer, &stats).await
        });
        // The upload fails at the peer at once; its answer comes after that.
        client.write_all(b"a large upload").await.unwrap();
        tokio::task::yield_now().await;
        words
            .send(Bytes::from_static(b"413 too large"))
            .await
            .unwrap();
        drop(words);
        let err = splice.await.unwrap().unwrap_err();
        assert_eq!(err.direction, Direction::AToB);
        assert_eq!(err.source.kind(), io::ErrorKind::ConnectionReset);
        assert!(
            aborted.load(Ordering::SeqCst),
            "the failed peer was not aborted"
        );
        // The answer, then a reset: no FIN between them that would make the
        // client take the end for an orderly one.
        let mut answer = Vec::new();
        let mut buf = [0u8; 64];
        let end = loop {
            match client.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e.kind()),
            }
        };
        assert_eq!(answer, b"413 too large");
        assert_eq!(end, Err(io::ErrorKind::ConnectionReset));
    }

    #[tokio::test]
    async fn a_client_that_uploads_all_before_it_reads_gets_the_answer() {
        let (mut client, mut a) = duplex(64 * 1024);
        let (mut peer, words, _aborted) = refusing_peer();
        let splice = tokio::spawn(async move {
            let stats = CopyStats::default();
            copy_bidirectional(&mut a, &mut peer, &stats).await
        });
        // An answer larger than the pipe: it flows only while the client reads.
        tokio::spawn(async move {
            for _ in 0..16 {
                if words
                    .send(Bytes::from(vec![b'a'; 64 * 1024]))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let exchange = async {
            // The whole upload first (far more than the pipe holds), then the answer.
            client.write_all(&vec![b'u'; 1024 * 1024]).await?;
            client.shutdown().await?;
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.map(|_| answer.len())
        };
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
            .await
            .expect("the client and the splice waited on each other");
        assert_eq!(got.unwrap(), 16 * 64 * 1024);
        assert!(splice.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_splice_dropped_midway_resets_both_sides() {
        let (mut client, mut a) = tcp_pair().await;
        let (mut b, mut server) = tcp_pair().await;
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let splice = tokio::spawn(async move {
            let stats = CopyStats::default();
            let copy = copy_bidirectional(&mut a, &mut b, &stats);
            let _ = started_tx.send(());
            copy.await
        });
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        started.await.unwrap();
        // As a forced drain does: the connection's task is dropped.
        splice.abort();
        assert!(splice.await.unwrap_err().is_cancelled());
        for (side, s) in [("client", &mut client), ("server", &mut server)] {
            let mut rest = Vec::new();
            let end = s.read_to_end(&mut rest).await;
            assert_eq!(
                end.map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionReset),
                "the {side} saw an orderly end"
            );
        }
    }

    #[test]
    fn buffer_grows_only_after_full_reads_and_stops_at_the_cap() {
        let mut h = HalfCopy::new();
        h.full_reads = 1;
        h.grow_if_saturated();
        assert_eq!(h.size, INITIAL_BUFFER);
        for _ in 0..20 {
            h.full_reads = FULL_READS_TO_GROW;
            h.grow_if_saturated();
        }
        assert_eq!(h.size, MAX_BUFFER);
    }

    #[tokio::test]
    async fn a_copying_reader_reuses_its_buffer_once_the_chunk_is_gone() {
        let (mut tx, mut rx) = duplex(64 * 1024);
        let mut buf = BytesMut::new();
        tx.write_all(b"first").await.unwrap();
        buf.reserve(INITIAL_BUFFER);
        let first = poll_fn(|cx| poll_read_by_copy(&mut rx, cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(&first[..], b"first");
        let at = first.as_ptr();

        // While the chunk lives (a tunnel still sending it), the next read goes to
        // other memory; once it is dropped, reads land in the first allocation again.
        tx.write_all(b"second").await.unwrap();
        buf.reserve(INITIAL_BUFFER);
        let second = poll_fn(|cx| poll_read_by_copy(&mut rx, cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(&second[..], b"second");
        assert_ne!(second.as_ptr(), at);
        let second_at = second.as_ptr();
        drop((first, second));
        tx.write_all(b"third").await.unwrap();
        buf.reserve(INITIAL_BUFFER);
        let third = poll_fn(|cx| poll_read_by_copy(&mut rx, cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(&third[..], b"third");
        assert_eq!(third.as_ptr(), second_at, "the third read allocated anew");
    }
}
