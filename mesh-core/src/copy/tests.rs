//! The splice end to end: pipes, loopback TCP, and peers that fail.
use std::future::poll_fn;

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
