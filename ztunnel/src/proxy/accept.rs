//! The accept loop every plain-TCP listener of ztunnel shares: bounded concurrent
//! connections, a task per connection, stop accepting on drain, abandon on force.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::drain::DrainWatcher;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Serves `listener` with `handle` until drained, at most `max` connections at once.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max: usize,
    drain: DrainWatcher,
    what: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (stream, src) = tokio::select! {
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
                () = drain.forced() => {}
                () = conn => {}
            }
        });
    }
}
