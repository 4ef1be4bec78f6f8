//! The accept loop every TCP listener shares (ztunnel's pod listeners and SOCKS5,
//! the HBONE server): bounded concurrent connections, a task per connection, stop
//! accepting on drain, abandon on force.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::drain::DrainWatcher;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Serves `listener` with `handle` until drained, at most `max` connections at once;
/// `what` names the listener in logs. Returns when the listener is closed.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max: usize,
    drain: DrainWatcher,
    what: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Locals drop in reverse order, and before parameters: the listener is closed
    // before the drain watcher goes, so a drain that has ended means its port is free.
    let drain = drain;
    let listener = listener;
    let limit = Arc::new(Semaphore::new(max));
    loop {
        // A drain stops the loop also while it waits for a free slot, and wins over
        // a connection that is ready at the same moment.
        let permit = tokio::select! {
            biased;
            () = drain.signaled() => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, src) = tokio::select! {
            biased;
            () = drain.signaled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Boxed: the task then holds a pointer, not the whole connection's state, so
        // spawning and finishing it do not copy kilobytes of future around.
        let conn = Box::pin(handle(stream, src));
        let drain = drain.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                biased;
                () = drain.forced() => {}
                () = conn => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_drain_stops_the_loop_while_it_waits_for_a_free_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, watcher) = crate::drain::channel();
        let (held_tx, mut held) = tokio::sync::mpsc::channel(1);
        let looping = tokio::spawn(accept_loop(listener, 1, watcher, "test", move |s, _| {
            let held_tx = held_tx.clone();
            async move {
                let _s = s;
                let _ = held_tx.send(()).await;
                std::future::pending::<()>().await;
            }
        }));
        let _client = TcpStream::connect(addr).await.unwrap();
        held.recv().await.unwrap();
        // The only slot is taken and its connection would run until forced, 60 s
        // from now: the loop, waiting for a slot, must still stop at once.
        let draining = tokio::spawn(trigger.drain(Duration::from_secs(60)));
        tokio::time::timeout(Duration::from_secs(5), looping)
            .await
            .expect("the accept loop stopped on the drain")
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
        draining.abort();
    }

    /// Once a drain has ended, the listener's port is free: a restarted server
    /// binds it at once (the watcher goes only after the listener is closed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn when_the_drain_ends_the_port_is_free() {
        for _ in 0..20 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (trigger, watcher) = crate::drain::channel();
            tokio::spawn(accept_loop(listener, 1, watcher, "test", |_, _| async {}));
            trigger.drain(Duration::from_secs(5)).await;
            // Without SO_REUSEADDR a socket in TIME_WAIT could stand in the way;
            // there is none here, only the listener, which must be gone.
            let again =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            again.bind(&addr.into()).unwrap();
            again.listen(1).unwrap();
        }
    }
}
