//! What only the OS can do: enter network namespaces and pass file descriptors over
//! Unix sockets. Linux only. The workspace's only `unsafe` lives in this module, each
//! block with a `// SAFETY:` comment.
#![allow(unsafe_code)]

mod netns;
mod seqpacket;

pub use netns::NetNs;
pub use seqpacket::{MAX_PACKET, SeqPacket, SeqPacketListener};
