//! Our record layer against plain tokio-rustls peers, both ways round.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::TlsStream;
use crate::testing::{TestCa, spiffe};
use crate::tls::{client_config, server_config};

struct Configs {
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
}

fn configs() -> Configs {
    let ca = TestCa::new();
    let (c, s) = (spiffe("a", "client"), spiffe("b", "server"));
    let store = ca.store_for(&[&c, &s]);
    let mut client = client_config(store.clone(), &c, vec![s.clone()]).unwrap();
    let mut server = server_config(store, &s).unwrap();
    client.enable_secret_extraction = true;
    server.enable_secret_extraction = true;
    Configs { client, server }
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}

fn name() -> ServerName<'static> {
    ServerName::try_from("127.0.0.1").unwrap()
}

/// Our client against a tokio-rustls server (which sends session tickets).
async fn ours_to_theirs() -> (
    TlsStream<TcpStream>,
    tokio_rustls::server::TlsStream<TcpStream>,
) {
    let Configs { client, mut server } = configs();
    server.send_tls13_tickets = 2;
    server.session_storage = rustls::server::ServerSessionMemoryCache::new(8);
    let (c, s) = tcp_pair().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let (ours, theirs) = tokio::join!(
        crate::tls::connect(Arc::new(client), name(), c),
        acceptor.accept(s)
    );
    (ours.unwrap(), theirs.unwrap())
}

/// A tokio-rustls client against our server.
async fn theirs_to_ours() -> (
    TlsStream<TcpStream>,
    tokio_rustls::client::TlsStream<TcpStream>,
) {
    let Configs { client, server } = configs();
    let (c, s) = tcp_pair().await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let (theirs, ours) = tokio::join!(
        connector.connect(name(), c),
        crate::tls::accept(Arc::new(server), s)
    );
    (ours.unwrap(), theirs.unwrap())
}

/// The byte at offset `i` of a test stream: no period that lines up with records.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9) >> 13) as u8 ^ (i / 4099) as u8
}

/// Writes `total` pattern bytes in chunks of varied sizes (1 byte to 256 KiB), then
/// shuts down.
async fn send<W: AsyncWrite + Unpin>(mut w: W, total: u64) -> W {
    const SIZES: [usize; 8] = [1, 9, 300, 2047, 2048, 16384, 70_001, 256 * 1024];
    let mut at = 0u64;
    let mut chunk = Vec::new();
    for size in SIZES.iter().cycle() {
        if at == total {
            break;
        }
        let n = (*size as u64).min(total - at);
        chunk.clear();
        chunk.extend((at..at + n).map(pattern));
        w.write_all(&chunk).await.unwrap();
        at += n;
    }
    w.shutdown().await.unwrap();
    w
}

/// Reads to EOF with varied buffer sizes, checking every byte; returns the count.
async fn receive<R: AsyncRead + Unpin>(mut r: R) -> u64 {
    const SIZES: [usize; 6] = [7, 1000, 16 * 1024, 16 * 1024 + 40, 64 * 1024, 300_000];
    let mut buf = vec![0u8; 300_000];
    let mut at = 0u64;
    for size in SIZES.iter().cycle() {
        let n = r.read(&mut buf[..*size]).await.unwrap();
        if n == 0 {
            break;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pattern(at + k as u64), "byte {}", at + k as u64);
        }
        at += n as u64;
    }
    at
}

/// `total` bytes each way at once; every byte checked, both ends see EOF.
async fn both_ways<A, B>(a: A, b: B, total: u64)
where
    A: AsyncRead + AsyncWrite + Send + 'static,
    B: AsyncRead + AsyncWrite + Send + 'static,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let tasks = [
        tokio::spawn(async move { receive(ar).await }),
        tokio::spawn(async move { receive(br).await }),
    ];
    let senders = [
        tokio::spawn(async move {
            send(aw, total).await;
        }),
        tokio::spawn(async move {
            send(bw, total).await;
        }),
    ];
    for s in senders {
        s.await.unwrap();
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), total);
    }
}

const LARGE: u64 = 24 * 1024 * 1024 + 12_345;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_moves_tens_of_mib_both_ways_with_a_tokio_rustls_server() {
    let (ours, theirs) = ours_to_theirs().await;
    assert_eq!(ours.session().alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(ours.session().peer_certificates().len(), 1);
    both_ways(ours, theirs, LARGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_server_moves_tens_of_mib_both_ways_with_a_tokio_rustls_client() {
    let (ours, theirs) = theirs_to_ours().await;
    // The client's certificate was verified before the secrets were handed over.
    assert_eq!(ours.session().peer_certificates().len(), 1);
    assert_eq!(
        ours.session().cipher_suite().suite(),
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    both_ways(ours, theirs, LARGE).await;
}

#[tokio::test]
async fn tiny_writes_each_flushed_arrive_in_order() {
    let (mut ours, mut theirs) = theirs_to_ours().await;
    for i in 0..200u8 {
        ours.write_all(&[i]).await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(theirs.read_u8().await.unwrap(), i);
        theirs.write_all(&[i, i]).await.unwrap();
        theirs.flush().await.unwrap();
        let mut two = [0u8; 2];
        ours.read_exact(&mut two).await.unwrap();
        assert_eq!(two, [i, i]);
    }
}

/// A peer's KeyUpdate (which asks for ours) mid-stream: data keeps flowing both
/// ways, over the new keys of both directions.
async fn key_updates_keep_data_flowing<T>(mut ours: TlsStream<TcpStream>, mut theirs: T)
where
    T: AsyncRead + AsyncWrite + Unpin + RefreshKeys,
{
    for round in 0..3u8 {
        theirs.refresh_keys();
        let msg = vec![round; 100_000];
        theirs.write_all(&msg).await.unwrap();
        theirs.flush().await.unwrap();
        let mut got = vec![0u8; msg.len()];
        ours.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
        // Our answer went out first: the peer reads this under our new key.
        ours.write_all(&msg).await.unwrap();
        ours.flush().await.unwrap();
        let mut back = vec![0u8; msg.len()];
        theirs.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    let before = ours.tx.seq();
    // Our own KeyUpdate, as the confidentiality limit would send it.
    ours.update_keys_after(2);
    let msg = vec![9u8; 200_000];
    ours.write_all(&msg).await.unwrap();
    ours.flush().await.unwrap();
    let mut back = vec![0u8; msg.len()];
    theirs.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
    assert!(ours.tx.seq() < before + 13, "the sequence restarted");
}

trait RefreshKeys {
    fn refresh_keys(&mut self);
}

impl RefreshKeys for tokio_rustls::client::TlsStream<TcpStream> {
    fn refresh_keys(&mut self) {
        self.get_mut().1.refresh_traffic_keys().unwrap();
    }
}

impl RefreshKeys for tokio_rustls::server::TlsStream<TcpStream> {
    fn refresh_keys(&mut self) {
        self.get_mut().1.refresh_traffic_keys().unwrap();
    }
}

#[tokio::test]
async fn key_updates_from_a_tokio_rustls_client_keep_data_flowing() {
    let (ours, theirs) = theirs_to_ours().await;
    key_updates_keep_data_flowing(ours, theirs).await;
}

#[tokio::test]
async fn key_updates_from_a_tokio_rustls_server_keep_data_flowing() {
    let (ours, theirs) = ours_to_theirs().await;
    key_updates_keep_data_flowing(ours, theirs).await;
}

#[tokio::test]
async fn close_notify_is_end_of_stream_both_ways() {
    let (mut ours, mut theirs) = theirs_to_ours().await;
    theirs.write_all(b"last words").await.unwrap();
    theirs.shutdown().await.unwrap();
    let mut got = Vec::new();
    ours.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"last words");
    // Still open our way.
    ours.write_all(b"reply").await.unwrap();
    ours.shutdown().await.unwrap();
    let mut back = Vec::new();
    theirs.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"reply");
}

#[tokio::test]
async fn a_tcp_close_without_close_notify_is_an_error() {
    let (mut ours, theirs) = theirs_to_ours().await;
    let (tcp, _) = theirs.into_inner();
    drop(tcp);
    let err = ours.read_to_end(&mut Vec::new()).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
}

/// Our server with the client's TCP and rustls state in hand, to send raw records.
async fn raw_peer() -> (TlsStream<TcpStream>, TcpStream, rustls::ClientConnection) {
    let (ours, theirs) = theirs_to_ours().await;
    let (tcp, conn) = theirs.into_inner();
    (ours, tcp, conn)
}

async fn read_error(ours: &mut TlsStream<TcpStream>) -> rustls::Error {
    let err = ours.read(&mut [0u8; 64]).await.unwrap_err();
    let tls = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    let tls = tls
        .unwrap_or_else(|| panic!("not a TLS error: {err}"))
        .clone();
    // The failure sticks.
    assert!(ours.read(&mut [0u8; 64]).await.is_err());
    tls
}

#[tokio::test]
async fn a_corrupted_record_is_an_error() {
    let (mut ours, mut tcp, mut conn) = raw_peer().await;
    conn.writer().write_all(b"hello").unwrap();
    let mut wire = Vec::new();
    conn.write_tls(&mut wire).unwrap();
    let last = wire.len() - 20;
    wire[last] ^= 0x40;
    tcp.write_all(&wire).await.unwrap();
    assert_eq!(read_error(&mut ours).await, rustls::Error::DecryptError);
}

#[tokio::test]
async fn an_intact_raw_record_is_read() {
    let (mut ours, mut tcp, mut conn) = raw_peer().await;
    conn.writer().write_all(b"hello").unwrap();
    let mut wire = Vec::new();
    conn.write_tls(&mut wire).unwrap();
    tcp.write_all(&wire).await.unwrap();
    let mut got = [0u8; 5];
    ours.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
}

#[tokio::test]
async fn an_oversized_record_is_an_error() {
    let (mut ours, mut tcp, _) = raw_peer().await;
    // 2^14 + 257 bytes of ciphertext: one more than any peer may send.
    let len: u16 = 16 * 1024 + 257;
    let mut wire = vec![23, 3, 3];
    wire.extend(len.to_be_bytes());
    wire.resize(5 + usize::from(len), 0);
    tcp.write_all(&wire).await.unwrap();
    assert_eq!(
        read_error(&mut ours).await,
        rustls::Error::PeerSentOversizedRecord
    );
}

#[tokio::test]
async fn a_record_with_a_wrong_type_or_version_is_an_error() {
    for header in [[22u8, 3, 3, 0, 20], [23, 3, 1, 0, 20]] {
        let (mut ours, mut tcp, _) = raw_peer().await;
        let mut wire = header.to_vec();
        wire.resize(25, 0);
        tcp.write_all(&wire).await.unwrap();
        assert!(
            matches!(
                read_error(&mut ours).await,
                rustls::Error::InvalidMessage(_)
            ),
            "{header:?}"
        );
    }
}

/// A client whose last handshake flight and first application data leave in one
/// write: the server's record layer gets what rustls already decrypted and what it
/// read beyond.
#[tokio::test]
async fn data_sent_with_the_clients_finished_is_not_lost() {
    let Configs { client, server } = configs();
    let (mut c, s) = tcp_pair().await;
    let server = tokio::spawn(crate::tls::accept(Arc::new(server), s));
    let mut conn = rustls::ClientConnection::new(Arc::new(client), name()).unwrap();
    // Queued now, sent encrypted right behind the client's Finished.
    conn.writer().write_all(b"first ").unwrap();
    let mut wire = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while conn.is_handshaking() {
        wire.clear();
        conn.write_tls(&mut wire).unwrap();
        c.write_all(&wire).await.unwrap();
        if !conn.is_handshaking() {
            break;
        }
        let n = c.read(&mut buf).await.unwrap();
        conn.read_tls(&mut &buf[..n]).unwrap();
        conn.process_new_packets().unwrap();
    }
    conn.writer().write_all(b"second").unwrap();
    // The Finished, both records and a partial third, in one write.
    conn.writer().write_all(b" and a third").unwrap();
    wire.clear();
    conn.write_tls(&mut wire).unwrap();
    let split = wire.len() - 7;
    c.write_all(&wire[..split]).await.unwrap();
    let mut ours = server.await.unwrap().unwrap();
    c.write_all(&wire[split..]).await.unwrap();
    let mut got = vec![0u8; b"first second and a third".len()];
    // Lost bytes would leave this read waiting.
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        ours.read_exact(&mut got),
    )
    .await
    .expect("the carried-over bytes")
    .unwrap();
    assert_eq!(got, b"first second and a third");
}
