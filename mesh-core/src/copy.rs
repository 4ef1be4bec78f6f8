//! The splice between two byte streams: both directions at once, with backpressure,
//! half-close, live byte counts, and buffers that grow with the flow.
//!
//! A direction starts with a small buffer (cheap for the many idle connections of a
//! node) and doubles it each time a few reads in a row fill it, up to a cap, so bulk
//! transfers move large chunks per syscall and per HTTP/2 frame.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// First buffer of a direction.
pub const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest buffer a direction grows to.
pub const MAX_BUFFER: usize = 256 * 1024;
/// Full reads in a row before the buffer doubles.
const FULL_READS_TO_GROW: u8 = 2;
/// Loop turns without a pending read or write before yielding to other tasks.
const TURNS_BEFORE_YIELD: u32 = 32;

/// Live byte counts of a splice, readable while it runs (metrics, admin view).
#[derive(Debug, Default)]
pub struct CopyStats {
    a_to_b: AtomicU64,
    b_to_a: AtomicU64,
}

impl CopyStats {
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
pub async fn copy_bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    stats: &CopyStats,
) -> Result<(u64, u64), CopyError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = HalfCopy::new();
    let mut ba = HalfCopy::new();
    poll_fn(|cx| {
        let ab_state = ab.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b), &stats.a_to_b);
        let ba_state = ba.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a), &stats.b_to_a);
        match (ab_state, ba_state) {
            (Poll::Ready(Err(source)), _) => Poll::Ready(Err(CopyError {
                direction: Direction::AToB,
                source,
            })),
            (_, Poll::Ready(Err(source))) => Poll::Ready(Err(CopyError {
                direction: Direction::BToA,
                source,
            })),
            (Poll::Ready(Ok(x)), Poll::Ready(Ok(y))) => Poll::Ready(Ok((x, y))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction's state.
struct HalfCopy {
    // Bytes read and not yet all written; reads fill its spare capacity, which is
    // never zeroed (a connection that moves 64 bytes touches one page, not 16 KiB).
    buf: BytesMut,
    // What `buf` holds now: `INITIAL_BUFFER`, doubling up to `MAX_BUFFER`.
    size: usize,
    pos: usize,
    full_reads: u8,
    read_done: bool,
    need_flush: bool,
    done: bool,
    total: u64,
}

impl HalfCopy {
    fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(INITIAL_BUFFER),
            size: INITIAL_BUFFER,
            pos: 0,
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
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &AtomicU64,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.total));
        }
        let mut turns = 0;
        loop {
            if self.pos == self.buf.len() && !self.read_done {
                self.grow_if_saturated();
                self.buf.clear();
                self.pos = 0;
                // Reclaims the same allocation: nothing else holds it.
                self.buf.reserve(self.size);
                let read = pin!(reader.as_mut().get_mut().read_buf(&mut self.buf));
                match read.poll(cx) {
                    Poll::Ready(Ok(0)) => self.read_done = true,
                    Poll::Ready(Ok(n)) => {
                        self.full_reads = if n >= self.size {
                            self.full_reads.saturating_add(1)
                        } else {
                            0
                        };
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read now: push out what was written.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.buf.len() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.buf[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.total += n as u64;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                self.need_flush = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
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
}
