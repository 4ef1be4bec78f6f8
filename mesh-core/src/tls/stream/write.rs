//! The sending half: caller bytes sealed into records in one bounded output buffer.
//!
//! A large caller slice is sealed out of place, straight from the caller's memory
//! into the buffer; small slices (an HTTP/2 frame header, a WINDOW_UPDATE) are
//! gathered by copying into one record sealed in place. The buffer is written to the
//! socket when it fills, on flush and on shutdown.

use std::io::{self, IoSlice};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite};

use super::keys::{DirectionKey, TAG_LEN};
use super::{
    ALERT, APPLICATION_DATA, HANDSHAKE, HEADER_LEN, KEY_UPDATE, MAX_PLAINTEXT, TlsStream, io_error,
};

/// Sealed bytes buffered before writes wait (rustls buffered as much: larger
/// batches of records per write).
const OUT_CAP: usize = crate::hbone::TLS_SEND_BUFFER;
/// Kept free of application data for a KeyUpdate or close_notify.
const CONTROL_RESERVE: usize = 64;
/// Bytes a record adds to its content: header, inner type, tag.
const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;
/// Slices shorter than this are copied into a shared record; longer ones are
/// sealed from where they are.
const GATHER_BELOW: usize = 2048;
/// A record this small is not worth starting when more is waiting: flush first.
const MIN_RECORD: usize = 4096;
/// Buffered bytes that are written at once rather than at the next flush.
const EAGER_WRITE: usize = 64 * 1024;
/// Records sealed before the confidentiality limit at which a KeyUpdate goes out.
const KEY_UPDATE_MARGIN: u64 = 1024;

pub(super) struct Writer {
    buf: Box<[u8]>,
    /// Sealed bytes not yet written: `buf[start..end]`.
    start: usize,
    end: usize,
    key: DirectionKey,
    /// Sequence number at which the key is replaced.
    update_at: u64,
    /// The suite's confidentiality limit, in records per key.
    limit: u64,
    /// The peer asked for a KeyUpdate and has not had it yet.
    key_update_owed: bool,
    /// close_notify is sealed: nothing more is sent.
    closed: bool,
}

impl Writer {
    pub(super) fn new(key: DirectionKey, confidentiality_limit: u64) -> Self {
        Self {
            buf: vec![0; OUT_CAP].into_boxed_slice(),
            start: 0,
            end: 0,
            key,
            update_at: confidentiality_limit.saturating_sub(KEY_UPDATE_MARGIN),
            limit: confidentiality_limit,
            key_update_owed: false,
            closed: false,
        }
    }

    #[cfg(test)]
    pub(super) fn seq(&self) -> u64 {
        self.key.seq()
    }

    #[cfg(test)]
    pub(super) fn update_keys_after(&mut self, records: u64) {
        self.update_at = self.key.seq() + records;
    }

    pub(super) fn owe_key_update(&mut self) {
        self.key_update_owed = true;
    }

    /// Room for application data at the end of the buffer.
    fn data_room(&self) -> usize {
        (OUT_CAP - CONTROL_RESERVE).saturating_sub(self.end)
    }

    /// Seals one record of `content` copied into the buffer (control messages).
    fn seal_copied(&mut self, content: &[u8], inner_type: u8) -> Result<bool, rustls::Error> {
        if OUT_CAP - self.end < content.len() + OVERHEAD {
            return Ok(false);
        }
        let at = self.end;
        self.buf[at + HEADER_LEN..at + HEADER_LEN + content.len()].copy_from_slice(content);
        self.seal_in_place(at, content.len(), inner_type)?;
        Ok(true)
    }

    /// Seals the `len` content bytes already at `buf[at + HEADER_LEN..]`.
    fn seal_in_place(
        &mut self,
        at: usize,
        len: usize,
        inner_type: u8,
    ) -> Result<(), rustls::Error> {
        let header = record_header(len);
        let record = &mut self.buf[at..at + len + OVERHEAD];
        record[..HEADER_LEN].copy_from_slice(&header);
        let (content, type_and_tag) = record[HEADER_LEN..].split_at_mut(len);
        self.key
            .seal_in_place(&header, content, inner_type, type_and_tag)
            .map_err(|_| rustls::Error::EncryptError)?;
        self.end = at + len + OVERHEAD;
        Ok(())
    }

    /// Seals `plaintext` from where it is into the buffer, as one record.
    fn seal_from(&mut self, plaintext: &[u8]) -> Result<(), rustls::Error> {
        let (at, len) = (self.end, plaintext.len());
        let header = record_header(len);
        let record = &mut self.buf[at..at + len + OVERHEAD];
        record[..HEADER_LEN].copy_from_slice(&header);
        let (out, type_and_tag) = record[HEADER_LEN..].split_at_mut(len);
        self.key
            .seal_into(&header, plaintext, out, APPLICATION_DATA, type_and_tag)
            .map_err(|_| rustls::Error::EncryptError)?;
        self.end = at + len + OVERHEAD;
        Ok(())
    }

    /// Sends the KeyUpdate the peer asked for, or the one the confidentiality
    /// limit calls for, and moves to the next key. False: no room yet.
    fn update_key_if_due(&mut self, kernel: &mut super::Kernel) -> Result<bool, rustls::Error> {
        if !self.key_update_owed && self.key.seq() < self.update_at {
            return Ok(true);
        }
        // update_not_requested: we answer, or renew our own key only.
        if !self.seal_copied(&[KEY_UPDATE, 0, 0, 1, 0], HANDSHAKE)? {
            return Ok(false);
        }
        let (seq, secrets) = kernel.update_tx()?;
        self.key = DirectionKey::new(seq, secrets)?;
        self.update_at = self.limit.saturating_sub(KEY_UPDATE_MARGIN);
        self.key_update_owed = false;
        Ok(true)
    }

    /// Seals as much of `bufs` as fits; returns the bytes taken.
    fn seal(
        &mut self,
        bufs: &[IoSlice<'_>],
        kernel: &mut super::Kernel,
    ) -> Result<usize, rustls::Error> {
        let mut taken = 0;
        // The record being gathered: where it starts and the content copied so far.
        let mut gather: Option<(usize, usize)> = None;
        'slices: for slice in bufs {
            let mut rest: &[u8] = slice;
            while !rest.is_empty() {
                if rest.len() < GATHER_BELOW {
                    let (at, len) = match gather {
                        Some(g) => g,
                        None => {
                            if !self.update_key_if_due(kernel)?
                                || self.data_room() < OVERHEAD + rest.len()
                            {
                                break 'slices;
                            }
                            (self.end, 0)
                        }
                    };
                    let room = (MAX_PLAINTEXT - len)
                        .min((OUT_CAP - CONTROL_RESERVE).saturating_sub(at + OVERHEAD + len));
                    let n = rest.len().min(room);
                    let dst = at + HEADER_LEN + len;
                    self.buf[dst..dst + n].copy_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    taken += n;
                    if n < room {
                        gather = Some((at, len + n));
                        continue;
                    }
                    // Full: seal it and start another if there is room.
                    self.seal_in_place(at, len + n, APPLICATION_DATA)?;
                    gather = None;
                    continue;
                }
                if let Some((at, len)) = gather.take() {
                    self.seal_in_place(at, len, APPLICATION_DATA)?;
                }
                if !self.update_key_if_due(kernel)? {
                    break 'slices;
                }
                let n = rest
                    .len()
                    .min(MAX_PLAINTEXT)
                    .min(self.data_room().saturating_sub(OVERHEAD));
                if n < rest.len().min(MIN_RECORD) || n == 0 {
                    break 'slices;
                }
                self.seal_from(&rest[..n])?;
                rest = &rest[n..];
                taken += n;
            }
        }
        if let Some((at, len)) = gather
            && len > 0
        {
            self.seal_in_place(at, len, APPLICATION_DATA)?;
        }
        Ok(taken)
    }
}

fn record_header(content_len: usize) -> [u8; HEADER_LEN] {
    // Content, inner type and tag: at most 2^14 + 17, so it fits two bytes.
    let len = u16::try_from(content_len + 1 + TAG_LEN).unwrap_or(u16::MAX);
    let [hi, lo] = len.to_be_bytes();
    [APPLICATION_DATA, 3, 3, hi, lo]
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// Writes sealed bytes until none are left or the socket is full.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let tx = &mut self.tx;
        while tx.start < tx.end {
            let n =
                ready!(std::pin::Pin::new(&mut self.io).poll_write(cx, &tx.buf[tx.start..tx.end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            tx.start += n;
        }
        tx.start = 0;
        tx.end = 0;
        Poll::Ready(Ok(()))
    }

    /// Moves a small unwritten tail to the front, so sealing can go on while the
    /// socket is full.
    fn compact_out(&mut self) {
        let tx = &mut self.tx;
        if tx.start > 0 && tx.end - tx.start <= OUT_CAP / 8 {
            tx.buf.copy_within(tx.start..tx.end, 0);
            tx.end -= tx.start;
            tx.start = 0;
        }
    }

    pub(super) fn write_records(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.tx.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let wanted = total.min(MIN_RECORD) + OVERHEAD;
        while self.tx.data_room() < wanted {
            match self.poll_write_out(cx) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    self.compact_out();
                    if self.tx.data_room() < wanted {
                        return Poll::Pending;
                    }
                }
            }
        }
        let taken = self.tx.seal(bufs, &mut self.kernel).map_err(io_error)?;
        if self.tx.end - self.tx.start >= EAGER_WRITE {
            // Ready or not: what did not go stays buffered for the next call.
            if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
                return Poll::Ready(Err(e));
            }
        }
        if taken == 0 {
            // Only a control record waited for room; it is sealed now.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(taken))
    }

    /// Seals a KeyUpdate owed to the peer, if there is one and room for it.
    fn seal_owed(&mut self) -> io::Result<()> {
        if self.tx.key_update_owed && !self.tx.closed {
            self.tx
                .update_key_if_due(&mut self.kernel)
                .map_err(io_error)?;
        }
        Ok(())
    }

    pub(super) fn flush_records(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.seal_owed()?;
        ready!(self.poll_write_out(cx))?;
        if self.tx.key_update_owed && !self.tx.closed {
            self.seal_owed()?;
            ready!(self.poll_write_out(cx))?;
        }
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    /// After a KeyUpdate request is read: sealed now, and written if the socket
    /// takes it, so a peer that only reads still gets it.
    pub(super) fn answer_key_update(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        self.tx.owe_key_update();
        self.seal_owed()?;
        match self.poll_write_out(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }

    pub(super) fn shutdown_records(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.tx.closed {
            self.seal_owed()?;
            // A warning-level close_notify (RFC 8446, 6.1).
            while !self.tx.seal_copied(&[1, 0], ALERT).map_err(io_error)? {
                ready!(self.poll_write_out(cx))?;
            }
            self.tx.closed = true;
        }
        ready!(self.poll_write_out(cx))?;
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
