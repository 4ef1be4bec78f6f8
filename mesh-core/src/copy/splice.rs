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
    // Grown past the first size, it is let go whenever the source runs dry (the
    // size it grew to stays: the next burst allocates once, at that size), so a
    // long-lived connection that once moved a bulk transfer holds no large
    // buffer while it idles.
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
                if reader.reads_into_buffer() {
                    self.buf.reserve(self.size);
                }
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
                        self.release_if_grown();
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
            // An empty `Bytes` still holds its share of the buffer: let it go, so
            // the next read reuses the buffer instead of allocating a new one.
            self.chunk = Bytes::new();
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
            if reader.reads_into_buffer() {
                self.buf.reserve(self.size);
            }
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

    /// The source has nothing more now: a buffer grown past the first size is
    /// let go, so an idle connection holds none. The size stays, and the next
    /// read allocates it anew, once.
    fn release_if_grown(&mut self) {
        if self.buf.capacity() > INITIAL_BUFFER {
            self.buf = BytesMut::new();
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
    use bytes::{Buf, BufMut};
    use std::collections::VecDeque;
    use std::task::Waker;

    /// A reader following a script of reads: `Some(n)` reads `n` bytes (at most
    /// what the buffer has room for: `usize::MAX` fills it), `None` has nothing
    /// yet (pending), the script's end is the end of the stream. It records where
    /// each chunk landed and the room it was given.
    #[derive(Default)]
    struct Script {
        reads: VecDeque<Option<usize>>,
        own_chunks: bool,
        at: Vec<usize>,
        room: Vec<usize>,
    }

    impl SpliceIo for Script {
        fn poll_read_chunk(
            &mut self,
            _: &mut Context<'_>,
            buf: &mut BytesMut,
        ) -> Poll<io::Result<Bytes>> {
            let Some(read) = self.reads.pop_front() else {
                return Poll::Ready(Ok(Bytes::new()));
            };
            let Some(n) = read else {
                return Poll::Pending;
            };
            if self.own_chunks {
                return Poll::Ready(Ok(Bytes::from(vec![7; n])));
            }
            let room = buf.capacity() - buf.len();
            self.room.push(room);
            buf.put_bytes(7, n.min(room));
            let chunk = buf.split().freeze();
            self.at.push(chunk.as_ptr() as usize);
            Poll::Ready(Ok(chunk))
        }

        fn poll_write_chunk(
            &mut self,
            _: &mut Context<'_>,
            chunk: &mut Bytes,
        ) -> Poll<io::Result<()>> {
            chunk.advance(chunk.len());
            Poll::Ready(Ok(()))
        }

        fn poll_flush_chunks(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown_chunks(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn reads_into_buffer(&self) -> bool {
            !self.own_chunks
        }

        fn abort(&mut self) {}
    }

    fn run(h: &mut HalfCopy, reader: &mut Script) -> Poll<Result<u64, HalfError>> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut sink = Script::default();
        h.poll(&mut cx, reader, &mut sink, &AtomicU64::new(0), false)
    }

    #[test]
    fn a_read_reuses_the_buffer_once_the_last_chunk_is_written() {
        let mut h = HalfCopy::new();
        let mut reader = Script {
            reads: [Some(1), Some(1), Some(1)].into(),
            ..Script::default()
        };
        assert!(matches!(run(&mut h, &mut reader), Poll::Ready(Ok(3))));
        // Each chunk lands at the start of the same allocation.
        assert_eq!(reader.at.len(), 3);
        assert!(
            reader.at.iter().all(|&at| at == reader.at[0]),
            "{:x?}",
            reader.at
        );
    }

    #[test]
    fn a_grown_buffer_is_let_go_while_idle_and_the_next_burst_reads_large_at_once() {
        let mut h = HalfCopy::new();
        let mut reads: VecDeque<_> = std::iter::repeat_n(Some(usize::MAX), 16).collect();
        reads.extend([Some(10), None]);
        let mut reader = Script {
            reads,
            ..Script::default()
        };
        assert!(run(&mut h, &mut reader).is_pending());
        assert!(
            reader.room.iter().any(|&room| room >= MAX_BUFFER),
            "the buffer never grew: {:?}",
            reader.room
        );
        assert_eq!(h.buf.capacity(), 0, "the grown buffer is held while idle");
        // The next burst, however it starts, reads at the size learned.
        reader.reads = [Some(10), None].into();
        assert!(run(&mut h, &mut reader).is_pending());
        assert!(
            *reader.room.last().unwrap() >= MAX_BUFFER,
            "{:?}",
            reader.room
        );
        assert_eq!(h.size, MAX_BUFFER);
    }

    #[test]
    fn a_small_buffer_is_kept_while_idle() {
        let mut h = HalfCopy::new();
        let mut reader = Script {
            reads: [Some(64), None, Some(64)].into(),
            ..Script::default()
        };
        assert!(run(&mut h, &mut reader).is_pending());
        assert_eq!(h.buf.capacity(), INITIAL_BUFFER, "the small buffer is kept");
        assert!(matches!(run(&mut h, &mut reader), Poll::Ready(Ok(128))));
        assert_eq!(
            reader.at[0], reader.at[1],
            "the same buffer serves both reads"
        );
    }

    #[test]
    fn a_reader_with_chunks_of_its_own_gets_no_buffer() {
        let mut h = HalfCopy::new();
        let mut reader = Script {
            reads: [Some(100), Some(100)].into(),
            own_chunks: true,
            ..Script::default()
        };
        assert!(matches!(run(&mut h, &mut reader), Poll::Ready(Ok(200))));
        assert_eq!(h.buf.capacity(), 0);
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
