//! The two-way copy: both directions polled in one task, each with its own
//! growing buffer, and the rules for how a failure in one ends both.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};

use super::{CopyStats, INITIAL_BUFFER, MAX_BUFFER, SpliceIo};

/// Full reads in a row before the buffer doubles.
const FULL_READS_TO_GROW: u8 = 2;
/// Loop turns without a pending read or write before yielding to other tasks.
const TURNS_BEFORE_YIELD: u32 = 32;

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
            total: 0,
        }
    }

    /// Moves what it can; never polled again once it returned `Ready`.
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
