//! A TLS 1.3 stream whose handshake rustls ran (every certificate check included) and
//! whose record layer for application data is ours: records are sealed from the
//! caller's buffers straight into one output buffer, and opened from large socket
//! reads straight into the caller's buffer, each byte copied once at most.
//!
//! rustls keeps the key schedule ([`rustls::kernel::KernelConnection`]): KeyUpdate in
//! both directions and the confidentiality limit are handled here with its help.

mod keys;
mod read;
mod write;

#[cfg(test)]
mod tests;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use keys::DirectionKey;
use read::Reader;
use write::Writer;

/// Largest plaintext of one record (RFC 8446, 5.1).
const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest ciphertext of one record the peer may send (RFC 8446, 5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// The record header: type, legacy version, length.
const HEADER_LEN: usize = 5;

/// Outer content type of every protected record, and inner types.
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
/// Handshake message types that may follow the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// What the handshake settled, kept once rustls hands the connection over.
#[derive(Clone, Debug)]
pub struct Session {
    peer_certificates: Vec<CertificateDer<'static>>,
    alpn: Option<Vec<u8>>,
    suite: SupportedCipherSuite,
}

impl Session {
    pub(crate) fn new(
        peer_certificates: Vec<CertificateDer<'static>>,
        alpn: Option<Vec<u8>>,
        suite: SupportedCipherSuite,
    ) -> Self {
        Self {
            peer_certificates,
            alpn,
            suite,
        }
    }

    /// The peer's verified chain, leaf first; empty when it sent none.
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer_certificates
    }

    /// The negotiated ALPN protocol.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    pub fn cipher_suite(&self) -> SupportedCipherSuite {
        self.suite
    }
}

/// rustls' half of the connection: the secrets of the next KeyUpdate.
pub(crate) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Self::Client(k) => k.update_tx_secret(),
            Self::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Self::Client(k) => k.update_rx_secret(),
            Self::Server(k) => k.update_rx_secret(),
        }
    }

    /// A NewSessionTicket, which only a server may send.
    fn new_session_ticket(&mut self, payload: &[u8]) -> Result<(), rustls::Error> {
        match self {
            Self::Client(k) => k.handle_new_session_ticket(payload),
            Self::Server(_) => Err(unexpected("NewSessionTicket from a client")),
        }
    }
}

fn unexpected(what: &str) -> rustls::Error {
    rustls::Error::General(format!("unexpected message: {what}"))
}

/// A TLS error as the I/O error tokio-rustls would give, the rustls error inside.
pub(crate) fn io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A TLS 1.3 connection over `IO` after its handshake ([`super::connect`],
/// [`super::accept`]).
pub struct TlsStream<IO> {
    io: IO,
    rx: Reader,
    tx: Writer,
    kernel: Kernel,
    session: Session,
}

impl<IO> std::fmt::Debug for TlsStream<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl<IO> TlsStream<IO> {
    /// Takes over from rustls: `plaintext` is application data rustls already
    /// decrypted, `ciphertext` what was read beyond it.
    pub(crate) fn new(
        io: IO,
        secrets: ExtractedSecrets,
        kernel: Kernel,
        session: Session,
        plaintext: &[u8],
        ciphertext: &[u8],
    ) -> Result<Self, rustls::Error> {
        let SupportedCipherSuite::Tls13(suite) = session.suite else {
            return Err(rustls::Error::General("TLS 1.3 only".into()));
        };
        let limit = suite.common.confidentiality_limit;
        let ExtractedSecrets {
            tx: (tx_seq, tx),
            rx: (rx_seq, rx),
        } = secrets;
        Ok(Self {
            io,
            rx: Reader::new(DirectionKey::new(rx_seq, rx)?, plaintext, ciphertext)?,
            tx: Writer::new(DirectionKey::new(tx_seq, tx)?, limit),
            kernel,
            session,
        })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Makes this side send a KeyUpdate after `records` more records (tests: the
    /// real limit is millions of records away).
    #[cfg(test)]
    pub(crate) fn update_keys_after(&mut self, records: u64) {
        self.tx.update_keys_after(records);
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().read_records(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_records(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_records(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().flush_records(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().shutdown_records(cx)
    }
}
