//! SOCKS5 (RFC 1928) on 127.0.0.1:15080 in the node's namespace, off by default:
//! explicit, non-captured use of the outbound path. The caller is the workload whose
//! address the connection comes from; only CONNECT to an IP address is served (no
//! DNS), without authentication.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use mesh_core::drain::DrainWatcher;
use mesh_core::hbone::HbonePool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Outbound, Pod, PodNet, ProxyInputs};
use crate::why::reason;
use mesh_core::accept::accept_loop;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const REP_OK: u8 = 0;
const REP_FAILURE: u8 = 1;
const REP_NOT_ALLOWED: u8 = 2;
const REP_HOST_UNREACHABLE: u8 = 4;
const REP_CMD_UNSUPPORTED: u8 = 7;
const REP_ATYP_UNSUPPORTED: u8 = 8;

#[derive(Clone, Debug)]
pub struct Socks5 {
    net: PodNet,
    pool: HbonePool<PodNet>,
    inputs: Arc<ProxyInputs>,
}

impl Socks5 {
    pub fn new(inputs: Arc<ProxyInputs>) -> Self {
        let net = PodNet::local(inputs.config.packet_mark);
        let pool = HbonePool::with_dialer(inputs.certs.clone(), inputs.hbone.clone(), net.clone());
        Self { net, pool, inputs }
    }

    pub async fn run(self, listener: TcpListener, drain: DrainWatcher) {
        let max = self.inputs.config.max_connections as usize;
        accept_loop(listener, max, drain, "socks5", |stream, src| {
            let this = self.clone();
            async move {
                if let Err(e) = this.serve(stream, src).await {
                    tracing::debug!(%src, error = %e, "SOCKS5 connection failed");
                }
            }
        })
        .await
    }

    async fn serve(&self, mut client: TcpStream, src: SocketAddr) -> std::io::Result<()> {
        // A caller that stalls mid-handshake gives its slot back (the HBONE
        // server's handshake timeout).
        let limit = self.inputs.hbone.handshake_timeout;
        let dst = match tokio::time::timeout(limit, read_request(&mut client)).await {
            Ok(request) => request?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("SOCKS5 handshake not done within {limit:?}"),
                ));
            }
        };
        let dst = match dst {
            Ok(dst) => dst,
            Err(code) => return reply(&mut client, code).await,
        };
        // The caller must be a workload of this node.
        let state = self.inputs.state.snapshot();
        let workload = state
            .workload_by_ip(src.ip())
            .filter(|w| w.node == self.inputs.config.node_name)
            .cloned();
        let Some(workload) = workload else {
            tracing::info!(%src, "SOCKS5 caller is not a workload of this node");
            return reply(&mut client, REP_NOT_ALLOWED).await;
        };
        let Ok(identity) = workload.identity() else {
            return reply(&mut client, REP_NOT_ALLOWED).await;
        };
        if self.inputs.ensure_certificate(&identity).await.is_err() {
            return reply(&mut client, REP_FAILURE).await;
        }
        let pod = Pod {
            uid: workload.uid.clone(),
            name: workload.name.clone(),
            namespace: workload.namespace.clone(),
            service_account: workload.service_account.clone(),
        };
        let outbound = Outbound::new(
            pod,
            identity,
            self.net.clone(),
            self.pool.clone(),
            self.inputs.clone(),
        );
        let (mut upstream, info) = match outbound.connect(src, dst, bytes::Bytes::new()).await {
            Ok(opened) => opened,
            Err(reason) => return reply(&mut client, refusal_reply(reason)).await,
        };
        reply(&mut client, REP_OK).await?;
        outbound.splice(&mut client, &mut upstream, info, 0).await;
        Ok(())
    }
}

/// The SOCKS5 reply for a refusal reason of the outbound path.
fn refusal_reply(reason: &str) -> u8 {
    match reason {
        reason::DENIED_BY_DESTINATION => REP_NOT_ALLOWED,
        reason::NO_ROUTE | reason::UPSTREAM_UNREACHABLE | reason::HBONE_FAILED => {
            REP_HOST_UNREACHABLE
        }
        _ => REP_FAILURE,
    }
}

async fn reply(client: &mut TcpStream, code: u8) -> std::io::Result<()> {
    // Bound address: unspecified, as the caller has no use for it.
    client
        .write_all(&[VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
}

/// Reads the greeting and the CONNECT request: the destination, or the reply
/// code that refuses the request (an unsupported command or address type).
async fn read_request(client: &mut TcpStream) -> std::io::Result<Result<SocketAddr, u8>> {
    // Greeting: version, methods.
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(std::io::Error::other(format!(
            "SOCKS version {} is not 5",
            head[0]
        )));
    }
    let mut methods = vec![0u8; head[1] as usize];
    client.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        client.write_all(&[VERSION, NO_ACCEPTABLE]).await?;
        return Err(std::io::Error::other("no acceptable SOCKS5 method"));
    }
    client.write_all(&[VERSION, NO_AUTH]).await?;
    // Request: version, command, reserved, address type, address, port.
    let mut req = [0u8; 4];
    client.read_exact(&mut req).await?;
    let ip: IpAddr = match req[3] {
        1 => {
            let mut b = [0u8; 4];
            client.read_exact(&mut b).await?;
            Ipv4Addr::from(b).into()
        }
        4 => {
            let mut b = [0u8; 16];
            client.read_exact(&mut b).await?;
            Ipv6Addr::from(b).into()
        }
        _ => return Ok(Err(REP_ATYP_UNSUPPORTED)),
    };
    let port = client.read_u16().await?;
    if req[1] != CMD_CONNECT {
        return Ok(Err(REP_CMD_UNSUPPORTED));
    }
    Ok(Ok(SocketAddr::new(ip, port)))
}
