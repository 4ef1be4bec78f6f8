//! The receiving half: large socket reads into one buffer, each record opened
//! straight into the caller's buffer when it has room for it, else in place and
//! served over several reads.

use std::io;
use std::ops::Range;
use std::task::{Context, Poll, ready};

use rustls::{AlertDescription, Error, PeerMisbehaved};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::keys::{DirectionKey, TAG_LEN};
use super::{
    ALERT, APPLICATION_DATA, HANDSHAKE, HEADER_LEN, KEY_UPDATE, MAX_CIPHERTEXT, MAX_PLAINTEXT,
    NEW_SESSION_TICKET, TlsStream, io_error, unexpected,
};

/// Bytes read from the socket at most per read, beyond room for one whole record.
const READ_SIZE: usize = 64 * 1024;
const IN_CAP: usize = READ_SIZE + HEADER_LEN + MAX_CIPHERTEXT;

#[derive(Debug)]
enum State {
    Open,
    /// close_notify came: end of stream.
    Closed,
    /// A failure, reported to every later read.
    Failed(io::ErrorKind, String),
}

pub(super) struct Reader {
    buf: Box<[u8]>,
    /// Ciphertext not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Opened application data not yet served, before `start`.
    plain: Range<usize>,
    key: DirectionKey,
    state: State,
}

/// One complete record at the front of the buffer.
struct Record {
    header: [u8; HEADER_LEN],
    /// Ciphertext bytes without the tag.
    body_len: usize,
}

impl Reader {
    /// `plaintext` and `ciphertext` are what the handshake read beyond its end.
    pub(super) fn new(
        key: DirectionKey,
        plaintext: &[u8],
        ciphertext: &[u8],
    ) -> Result<Self, Error> {
        let mut buf = vec![0; IN_CAP].into_boxed_slice();
        let (p, c) = (plaintext.len(), ciphertext.len());
        if p + c > IN_CAP {
            return Err(Error::General("handshake left too much unread".into()));
        }
        buf[..p].copy_from_slice(plaintext);
        buf[p..p + c].copy_from_slice(ciphertext);
        Ok(Self {
            buf,
            start: p,
            end: p + c,
            plain: 0..p,
            key,
            state: State::Open,
        })
    }

    /// The next record if all of it is here; an error for a malformed header.
    fn next_record(&self) -> Result<Option<Record>, Error> {
        let avail = &self.buf[self.start..self.end];
        let Some(h) = avail.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        if h[0] != APPLICATION_DATA {
            return Err(Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType,
            ));
        }
        if h[1..3] != [3, 3] {
            return Err(Error::InvalidMessage(
                rustls::InvalidMessage::UnknownProtocolVersion,
            ));
        }
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(Error::PeerSentOversizedRecord);
        }
        if len < 1 + TAG_LEN {
            return Err(Error::DecryptError);
        }
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        Ok(Some(Record {
            header: *h,
            body_len: len - TAG_LEN,
        }))
    }

    /// Makes room for at least one whole record after `end`.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if IN_CAP - self.end < HEADER_LEN + MAX_CIPHERTEXT {
            // At most one partial record: a short move.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    fn fail(&mut self, e: &io::Error) {
        self.state = State::Failed(e.kind(), e.to_string());
    }
}

/// The content type and length of an opened record: padding (zeros) stripped.
fn inner_type(opened: &[u8]) -> Result<(u8, usize), Error> {
    let Some(at) = opened.iter().rposition(|b| *b != 0) else {
        return Err(Error::PeerMisbehaved(
            PeerMisbehaved::IllegalTlsInnerPlaintext,
        ));
    };
    if at > MAX_PLAINTEXT {
        return Err(Error::PeerSentOversizedRecord);
    }
    Ok((opened[at], at))
}

/// What a non-data record asks of the connection.
enum Control {
    None,
    CloseNotify,
    /// The peer moved to its next key; it asks for ours when `true`.
    KeyUpdate(bool),
}

/// Reads an alert or post-handshake messages (NewSessionTicket, KeyUpdate).
fn control(typ: u8, content: &[u8], kernel: &mut super::Kernel) -> Result<Control, Error> {
    match typ {
        ALERT => match content {
            [_, 0] => Ok(Control::CloseNotify),
            // user_canceled is followed by close_notify (RFC 8446, 6.1).
            [_, 90] => Ok(Control::None),
            [_, d] => Err(Error::AlertReceived(AlertDescription::from(*d))),
            _ => Err(unexpected("malformed alert")),
        },
        HANDSHAKE => {
            let mut rest = content;
            while let [t, a, b, c, body @ ..] = rest {
                let len = usize::try_from(u32::from_be_bytes([0, *a, *b, *c]))
                    .map_err(|_| unexpected("handshake length"))?;
                if body.len() < len {
                    return Err(unexpected("handshake message split across records"));
                }
                let (msg, next) = body.split_at(len);
                match (*t, msg) {
                    (NEW_SESSION_TICKET, _) => kernel.new_session_ticket(msg)?,
                    // A key change ends the record (RFC 8446, 5.1).
                    (KEY_UPDATE, [req @ (0 | 1)]) if next.is_empty() => {
                        return Ok(Control::KeyUpdate(*req == 1));
                    }
                    (KEY_UPDATE, _) => {
                        return Err(Error::PeerMisbehaved(
                            PeerMisbehaved::KeyEpochWithPendingFragment,
                        ));
                    }
                    _ => return Err(unexpected("handshake message after the handshake")),
                }
                rest = next;
            }
            if rest.is_empty() {
                Ok(Control::None)
            } else {
                Err(unexpected("truncated handshake message"))
            }
        }
        _ => Err(unexpected("content type")),
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    pub(super) fn read_records(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let filled_before = buf.filled().len();
        let r = self.read_inner(cx, buf, filled_before);
        if let Poll::Ready(Err(e)) = &r {
            self.rx.fail(e);
        }
        r
    }

    fn read_inner(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        filled_before: usize,
    ) -> Poll<io::Result<()>> {
        loop {
            let rx = &mut self.rx;
            if !rx.plain.is_empty() {
                let n = rx.plain.len().min(buf.remaining());
                buf.put_slice(&rx.buf[rx.plain.start..rx.plain.start + n]);
                rx.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            match &rx.state {
                State::Open => {}
                State::Closed => return Poll::Ready(Ok(())),
                State::Failed(kind, msg) => {
                    return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
                }
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let Some(rec) = rx.next_record().map_err(io_error)? else {
                if buf.filled().len() > filled_before {
                    return Poll::Ready(Ok(()));
                }
                rx.make_room();
                let mut into = ReadBuf::new(&mut rx.buf[rx.end..]);
                ready!(std::pin::Pin::new(&mut self.io).poll_read(cx, &mut into))?;
                let n = into.filled().len();
                if n == 0 {
                    // The peer closed TCP without close_notify: maybe truncated.
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection without sending TLS close_notify",
                    )));
                }
                rx.end += n;
                continue;
            };
            let body = rx.start + HEADER_LEN..rx.start + HEADER_LEN + rec.body_len;
            let tag = body.end..body.end + TAG_LEN;
            rx.start = tag.end;
            let action = if rec.body_len <= buf.remaining() {
                // Straight into the caller's buffer.
                let out = buf.initialize_unfilled_to(rec.body_len);
                rx.key
                    .open_into(&rec.header, &rx.buf[body], &rx.buf[tag], out)
                    .map_err(|_| io_error(Error::DecryptError))?;
                let (typ, len) = inner_type(out).map_err(io_error)?;
                if typ == APPLICATION_DATA {
                    buf.advance(len);
                    continue;
                }
                control(typ, &out[..len], &mut self.kernel).map_err(io_error)?
            } else {
                let (ct, tag) = rx.buf[body.start..tag.end].split_at_mut(rec.body_len);
                rx.key
                    .open_in_place(&rec.header, ct, tag)
                    .map_err(|_| io_error(Error::DecryptError))?;
                let (typ, len) = inner_type(ct).map_err(io_error)?;
                if typ == APPLICATION_DATA {
                    rx.plain = body.start..body.start + len;
                    continue;
                }
                control(typ, &ct[..len], &mut self.kernel).map_err(io_error)?
            };
            match action {
                Control::None => {}
                Control::CloseNotify => self.rx.state = State::Closed,
                Control::KeyUpdate(requested) => {
                    let (seq, secrets) = self.kernel.update_rx().map_err(io_error)?;
                    self.rx.key = DirectionKey::new(seq, secrets).map_err(io_error)?;
                    if requested {
                        self.answer_key_update(cx)?;
                    }
                }
            }
        }
    }
}
