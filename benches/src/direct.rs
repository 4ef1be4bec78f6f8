//! The direct path: one plain TCP connection over 127.0.0.1, no TLS, no HTTP/2. It
//! is what the mesh path is measured against, in the same run on the same machine.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::load;
use crate::{BenchError, Path, Sample};

/// A loopback listener; each transfer is a new connection to it.
#[derive(Debug)]
pub struct DirectPath {
    listener: Arc<TcpListener>,
    addr: SocketAddr,
    receiver: Handle,
    write_buffer: usize,
    read_buffer: usize,
}

impl DirectPath {
    /// The listener and the receiving end of every transfer run on `receiver`.
    pub async fn new(
        write_buffer: usize,
        read_buffer: usize,
        receiver: Handle,
    ) -> Result<Self, BenchError> {
        let listener = receiver
            .spawn(TcpListener::bind("127.0.0.1:0"))
            .await?
            .map_err(BenchError::io("bind the direct listener"))?;
        let addr = listener
            .local_addr()
            .map_err(BenchError::io("direct listener address"))?;
        Ok(Self {
            listener: Arc::new(listener),
            addr,
            receiver,
            write_buffer,
            read_buffer,
        })
    }
}

impl Path for DirectPath {
    async fn transfer(&self, bytes: u64) -> Result<Sample, BenchError> {
        let listener = self.listener.clone();
        let read_buffer = self.read_buffer;
        let receiver = self.receiver.spawn(async move {
            let (mut server, _) = listener
                .accept()
                .await
                .map_err(BenchError::io("direct accept"))?;
            // As the HBONE server does to its TCP connections.
            server
                .set_nodelay(true)
                .map_err(BenchError::io("set TCP_NODELAY"))?;
            load::receive(&mut server, read_buffer)
                .await
                .map_err(BenchError::io("direct receive"))
        });
        let mut client = TcpStream::connect(self.addr)
            .await
            .map_err(BenchError::io("direct connect"))?;
        client
            .set_nodelay(true)
            .map_err(BenchError::io("set TCP_NODELAY"))?;
        let start = Instant::now();
        load::send(&mut client, bytes, self.write_buffer)
            .await
            .map_err(BenchError::io("direct send"))?;
        let received = receiver.await??;
        Sample::of(bytes, start, received)
    }
}
