//! The admin endpoints (15000, 15020, 15021) hold no more than their limits: a
//! client that sends half a request, idles, or opens many connections cannot keep
//! the process's descriptors; an answer under way still completes.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use mesh_core::admin::{AdminLimits, Reply, serve_with_limits};
use mesh_core::drain::{self, DrainTrigger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

const REQUEST: &[u8] = b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n";

/// Long enough for nothing in these tests to reach a limit they do not set.
fn relaxed() -> AdminLimits {
    AdminLimits {
        header_read_timeout: Duration::from_secs(60),
        max_connection_age: Duration::from_secs(600),
        close_grace: Duration::from_secs(600),
        ..AdminLimits::default()
    }
}

async fn server(limits: AdminLimits, body: String) -> (SocketAddr, DrainTrigger) {
    let (trigger, watcher) = drain::channel();
    let addr = serve_with_limits(
        "127.0.0.1:0".parse().unwrap(),
        "test",
        limits,
        move |_| Reply::text(StatusCode::OK, body.clone()),
        watcher,
    )
    .await
    .unwrap();
    (addr, trigger)
}

/// Reads one whole answer whose body is `body_len` bytes long; returns the body.
async fn read_answer(stream: &mut TcpStream, body_len: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n")
            && got.len() >= end + 4 + body_len
        {
            assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
            return got[end + 4..end + 4 + body_len].to_vec();
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed before the whole answer");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Waits (at most 5 s) for the server to close `stream`; fails if it does not.
async fn closed_by_server(stream: &mut TcpStream, what: &str) {
    let mut buf = [0; 1024];
    let end = timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the server did not close {what}");
}

#[tokio::test]
async fn half_a_request_is_closed_after_the_header_read_timeout() {
    let limits = AdminLimits {
        header_read_timeout: Duration::from_millis(200),
        ..relaxed()
    };
    let (addr, _trigger) = server(limits, "ok".into()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nho")
        .await
        .unwrap();
    closed_by_server(&mut stream, "a connection sending half a request").await;
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_when_idle_for_the_header_read_timeout() {
    let limits = AdminLimits {
        header_read_timeout: Duration::from_millis(200),
        ..relaxed()
    };
    let (addr, _trigger) = server(limits, "ok".into()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(REQUEST).await.unwrap();
    assert_eq!(read_answer(&mut stream, 2).await, b"ok");
    closed_by_server(&mut stream, "an idle kept-alive connection").await;
}

#[tokio::test]
async fn a_connection_past_its_age_is_closed_although_it_keeps_asking() {
    let limits = AdminLimits {
        max_connection_age: Duration::from_millis(300),
        ..relaxed()
    };
    let (addr, _trigger) = server(limits, "ok".into()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // Each request resets the header timer: only the age can end this connection.
    let asked = timeout(Duration::from_secs(5), async {
        loop {
            if stream.write_all(REQUEST).await.is_err() {
                return;
            }
            let mut buf = [0; 1024];
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(asked.is_ok(), "the connection outlived its age");
}

/// A scraper reading a large answer slowly gets all of it, though the connection
/// reaches its age (and the buffer limit) on the way.
#[tokio::test]
async fn a_large_answer_read_slowly_completes_past_the_connection_age() {
    let limits = AdminLimits {
        max_connection_age: Duration::from_millis(200),
        ..relaxed()
    };
    let body = "m".repeat(4 << 20);
    let (addr, _trigger) = server(limits, body.clone()).await;
    let socket = TcpSocket::new_v4().unwrap();
    // A small receive window keeps most of the answer in the server's hands.
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(REQUEST).await.unwrap();
    let mut first = [0; 1];
    stream.read_exact(&mut first).await.unwrap();
    // The slow reader: it comes back for the rest after the connection's age.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut got = first.to_vec();
    let rest = timeout(Duration::from_secs(10), async {
        stream.read_to_end(&mut got).await.unwrap();
    })
    .await;
    assert!(
        rest.is_ok(),
        "the connection closes once the answer is sent"
    );
    let start = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(got.len() - start, body.len(), "the whole answer arrived");
}

/// A reader too slow to take the answer within the grace is cut at the age plus
/// the grace, whatever it has read by then.
#[tokio::test]
async fn an_answer_still_unsent_after_the_grace_is_cut() {
    let limits = AdminLimits {
        max_connection_age: Duration::from_millis(100),
        close_grace: Duration::from_millis(200),
        ..relaxed()
    };
    // At the reader's pace below, 10 s to read; the server's send buffer holds
    // at most 4 MiB (tcp_wmem), well under a second of it.
    let body = "m".repeat(64 << 20);
    let (addr, _trigger) = server(limits, body.clone()).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(REQUEST).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    let end = timeout(Duration::from_secs(30), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    // The reader's pace, not a wait for anything.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the server never cut the connection");
    assert!(got.len() < body.len(), "the answer was cut before its end");
}

#[tokio::test]
async fn a_request_head_over_the_buffer_limit_is_refused() {
    let (addr, _trigger) = server(relaxed(), "ok".into()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let cookie = "c".repeat(20 * 1024);
    let request = format!("GET /x HTTP/1.1\r\nhost: a\r\ncookie: {cookie}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
    read.unwrap().unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 431"),
        "a 20 KiB head is refused, not buffered: {:?}",
        String::from_utf8_lossy(&got[..got.len().min(40)])
    );
}

#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    let limits = AdminLimits {
        max_connections: 2,
        ..relaxed()
    };
    let (addr, _trigger) = server(limits, "ok".into()).await;
    // Two kept-alive connections, each answered once so each surely holds a slot.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(REQUEST).await.unwrap();
        assert_eq!(read_answer(&mut stream, 2).await, b"ok");
        held.push(stream);
    }
    // The third is accepted by the kernel but not served.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(REQUEST).await.unwrap();
    let mut buf = [0; 1];
    assert!(
        timeout(Duration::from_millis(300), third.read(&mut buf))
            .await
            .is_err(),
        "a connection past the cap was served"
    );
    drop(held.pop());
    let answer = timeout(Duration::from_secs(5), read_answer(&mut third, 2)).await;
    assert_eq!(
        answer.unwrap(),
        b"ok",
        "a freed slot serves the waiting one"
    );
    drop(held);
    drop(third);
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    fresh.write_all(REQUEST).await.unwrap();
    let answer = timeout(Duration::from_secs(5), read_answer(&mut fresh, 2)).await;
    assert_eq!(answer.unwrap(), b"ok", "the listener keeps serving");
}

#[tokio::test]
async fn a_drain_closes_the_listener_and_its_connections() {
    let (addr, trigger) = server(relaxed(), "ok".into()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(REQUEST).await.unwrap();
    assert_eq!(read_answer(&mut stream, 2).await, b"ok");
    let outcome = timeout(
        Duration::from_secs(5),
        trigger.drain(Duration::from_secs(60)),
    )
    .await;
    assert_eq!(outcome.unwrap(), drain::DrainOutcome::Graceful);
    closed_by_server(&mut stream, "a kept-alive connection at the drain").await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}
