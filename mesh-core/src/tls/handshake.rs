//! The TLS handshake, run by rustls' unbuffered API over a tokio stream, then handed
//! to our record layer ([`TlsStream`]).
//!
//! rustls does every check (versions, suites, certificates, the client certificate
//! on the server); only once it says the handshake is complete are the traffic
//! secrets taken. Bytes read beyond the handshake are carried over, and on failure
//! the alert rustls queued is sent before the error is returned.

use std::io;
use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, CommonState, Error, ExtractedSecrets, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::stream::{Kernel, Session, TlsStream, io_error};

/// Handshake bytes buffered from the peer at most: a flight with a certificate
/// chain, several times over.
const HANDSHAKE_IN: usize = 64 * 1024;
/// Handshake bytes buffered for the peer at most.
const HANDSHAKE_OUT: usize = 64 * 1024;

/// Connects as a client; the caller bounds it with a timeout.
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: IO,
) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedClientConnection::new(config, name).map_err(io_error)?;
    drive(conn, io).await
}

/// Accepts a client; the caller bounds it with a timeout.
pub async fn accept<IO>(config: Arc<ServerConfig>, io: IO) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(io_error)?;
    drive(conn, io).await
}

/// The two unbuffered connections, as the driver uses them.
trait Unbuffered: Sized {
    type Data;
    fn common(&self) -> &CommonState;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), Error>;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn common(&self) -> &CommonState {
        self
    }
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Client(kernel)))
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn common(&self) -> &CommonState {
        self
    }
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Server(kernel)))
    }
}

/// What to do once rustls' state is handled and its borrows are released.
enum Step {
    Continue,
    Transmit,
    Read,
    /// Traffic may be written: done, unless the peer's flight is still due (a
    /// server before the client's Finished).
    MaybeDone,
    Failed(Error),
}

async fn drive<C, IO>(mut conn: C, mut io: IO) -> io::Result<TlsStream<IO>>
where
    C: Unbuffered,
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut incoming = vec![0u8; HANDSHAKE_IN];
    let mut filled = 0;
    let mut outgoing = Vec::new();
    // Application data rustls decrypted with the handshake's last flight.
    let mut plaintext = Vec::new();
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..filled]);
        let step = match state {
            Err(e) => Step::Failed(e),
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                match encode(&mut outgoing, |out| data.encode(out)) {
                    Ok(()) => Step::Continue,
                    Err(e) => Step::Failed(e),
                }
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                Step::Transmit
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Read,
            Ok(ConnectionState::WriteTraffic(_)) => Step::MaybeDone,
            Ok(ConnectionState::ReadTraffic(mut data)) => {
                let mut step = Step::Continue;
                while let Some(record) = data.next_record() {
                    match record {
                        Ok(r) => plaintext.extend_from_slice(r.payload),
                        Err(e) => {
                            step = Step::Failed(e);
                            break;
                        }
                    }
                }
                step
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Step::Failed(
                Error::General("peer closed the connection during the handshake".into()),
            ),
            Ok(other) => Step::Failed(Error::General(format!(
                "unexpected handshake state {other:?}"
            ))),
        };
        incoming.copy_within(discard..filled, 0);
        filled -= discard;
        match step {
            Step::Continue => {}
            Step::Transmit => {
                io.write_all(&outgoing).await?;
                io.flush().await?;
                outgoing.clear();
            }
            Step::Read => read_more(&mut io, &mut incoming, &mut filled).await?,
            Step::MaybeDone if conn.common().is_handshaking() => {
                read_more(&mut io, &mut incoming, &mut filled).await?;
            }
            Step::MaybeDone => break,
            Step::Failed(e) => {
                send_alert(&mut conn, &mut io, &mut outgoing).await;
                return Err(io_error(e));
            }
        }
    }
    if !outgoing.is_empty() {
        io.write_all(&outgoing).await?;
    }
    let session = Session::new(
        conn.common()
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default(),
        conn.common().alpn_protocol().map(<[u8]>::to_vec),
        conn.common()
            .negotiated_cipher_suite()
            .ok_or_else(|| io_error(Error::HandshakeNotComplete))?,
    );
    let (secrets, kernel) = conn.into_kernel().map_err(io_error)?;
    TlsStream::new(
        io,
        secrets,
        kernel,
        session,
        &plaintext,
        &incoming[..filled],
    )
    .map_err(io_error)
}

/// Appends what `encode` writes to `out`, growing it up to [`HANDSHAKE_OUT`].
fn encode(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), Error> {
    let len = out.len();
    let mut want = 4096;
    loop {
        if len + want > HANDSHAKE_OUT {
            return Err(Error::General("handshake flight too large".into()));
        }
        out.resize(len + want, 0);
        match encode(&mut out[len..]) {
            Ok(n) => {
                out.truncate(len + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(s)) => want = s.required_size,
            Err(e) => {
                out.truncate(len);
                return Err(Error::General(e.to_string()));
            }
        }
    }
}

async fn read_more<IO: AsyncRead + Unpin>(
    io: &mut IO,
    incoming: &mut [u8],
    filled: &mut usize,
) -> io::Result<()> {
    if *filled == incoming.len() {
        return Err(io_error(Error::General(
            "handshake message too large".into(),
        )));
    }
    let n = io.read(&mut incoming[*filled..]).await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "tls handshake eof",
        ));
    }
    *filled += n;
    Ok(())
}

/// Sends the alert rustls queued for a failed handshake, if any; best effort.
///
/// rustls hands a queued record out before it looks at its input, so one call with
/// no input yields the alert; a second would deframe again (its deframer may still
/// point into bytes of the failed call) and fail anew.
async fn send_alert<C: Unbuffered, IO: AsyncWrite + Unpin>(
    conn: &mut C,
    io: &mut IO,
    outgoing: &mut Vec<u8>,
) {
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = conn.process(&mut []).state
        && encode(outgoing, |out| data.encode(out)).is_ok()
    {
        let _ = io.write_all(outgoing).await;
        let _ = io.flush().await;
    }
}
