//! The load both paths carry: a sender that writes one fixed buffer again and again,
//! and a receiver that reads and discards until EOF, noting when the last byte came.

use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use mesh_core::copy::SpliceIo;
use tokio::time::Instant;

/// What a receiver saw: how many bytes, and when the last one arrived.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub bytes: u64,
    pub last_byte_at: Instant,
}

/// Writes `bytes` from a `buffer_size` buffer, then ends the write side (FIN, or
/// END_STREAM on a tunnel). The buffer is filled once: the sender costs nothing but
/// the writes. Writes go through [`SpliceIo`], as ztunnel's splice writes: a socket
/// copies the buffer into the kernel, a tunnel takes it as it is.
pub async fn send<W>(writer: &mut W, bytes: u64, buffer_size: usize) -> io::Result<()>
where
    W: SpliceIo + ?Sized,
{
    let buffer: Bytes = (0..buffer_size).map(|i| (i % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(buffer.len(), |l| l.min(buffer.len()));
        let mut chunk = buffer.slice(..n);
        while !chunk.is_empty() {
            poll_fn(|cx| writer.poll_write_chunk(cx, &mut chunk)).await?;
        }
        left -= n as u64;
    }
    poll_fn(|cx| writer.poll_flush_chunks(cx)).await?;
    poll_fn(|cx| writer.poll_shutdown_chunks(cx)).await
}

/// Reads chunks of up to `buffer_size` (a socket: into one reused buffer) and drops
/// them, until EOF.
pub async fn receive<R>(reader: &mut R, buffer_size: usize) -> io::Result<Received>
where
    R: SpliceIo + ?Sized,
{
    let mut buffer = BytesMut::with_capacity(buffer_size);
    let mut bytes = 0u64;
    let mut last_byte_at = Instant::now();
    loop {
        buffer.reserve(buffer_size);
        let chunk = poll_fn(|cx| reader.poll_read_chunk(cx, &mut buffer)).await?;
        if chunk.is_empty() {
            return Ok(Received {
                bytes,
                last_byte_at,
            });
        }
        bytes += chunk.len() as u64;
        last_byte_at = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_receiver_counts_what_the_sender_wrote() {
        let (mut a, mut b) = tokio::io::duplex(64 << 10);
        let sender = tokio::spawn(async move { send(&mut a, (3 << 20) + 17, 100_000).await });
        let got = receive(&mut b, 8 << 10).await.unwrap();
        sender.await.unwrap().unwrap();
        assert_eq!(got.bytes, (3 << 20) + 17);
    }
}
