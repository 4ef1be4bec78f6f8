//! The plugin's side of the agent: a Unix stream listener, one JSON request and
//! one JSON reply per connection ([`crate::api`]), size- and time-bounded, with at
//! most a configured number of connections served at once.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::drain::DrainWatcher;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::enroller::Enroller;
use crate::api::{AgentReply, AgentRequest, FailureKind, MAX_MESSAGE};

#[derive(Clone, Copy, Debug)]
pub(crate) struct PluginLimits {
    pub(crate) io_timeout: Duration,
    pub(crate) max_connections: usize,
}

/// Serves plugin connections until the drain starts; in-flight requests finish
/// unless the drain is forced.
pub(crate) async fn serve(
    listener: UnixListener,
    enroller: Arc<Enroller>,
    limits: PluginLimits,
    drain: DrainWatcher,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            _ = drain.signaled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = drain.signaled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accepting a plugin connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let enroller = enroller.clone();
        let watcher = drain.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = serve_one(stream, &enroller, limits.io_timeout) => {}
                () = watcher.forced() => tracing::warn!("plugin request abandoned at shutdown"),
            }
        });
    }
}

async fn serve_one(mut stream: UnixStream, enroller: &Enroller, io_timeout: Duration) {
    let request = match tokio::time::timeout(io_timeout, read_request(&mut stream)).await {
        Ok(request) => request,
        Err(_) => Err(format!("no complete request within {io_timeout:?}")),
    };
    let reply = match request {
        Ok(request) => {
            tracing::debug!(?request, "plugin request");
            enroller.handle(request).await
        }
        Err(reason) => {
            tracing::warn!("bad plugin request: {reason}");
            AgentReply::failed(FailureKind::BadRequest, reason)
        }
    };
    let body = match serde_json::to_vec(&reply) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!("cannot encode a reply: {e}");
            return;
        }
    };
    let write = async {
        stream.write_all(&body).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(io_timeout, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("sending the reply to the plugin failed: {e}"),
        Err(_) => tracing::warn!("the plugin did not take its reply within {io_timeout:?}"),
    }
}

async fn read_request(stream: &mut UnixStream) -> Result<AgentRequest, String> {
    let mut body = Vec::new();
    stream
        .take(MAX_MESSAGE as u64 + 1)
        .read_to_end(&mut body)
        .await
        .map_err(|e| format!("reading the request failed: {e}"))?;
    if body.len() > MAX_MESSAGE {
        return Err(format!("request over {MAX_MESSAGE} bytes"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("undecodable request: {e}"))
}
