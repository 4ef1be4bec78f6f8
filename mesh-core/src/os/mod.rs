//! What only the OS can do: enter network namespaces and pass file descriptors over
//! Unix sockets; and the one setting of the C library that has no API
//! ([`prefer_vector_copies`]). Linux only. The workspace's only `unsafe` lives in this module, each
//! block with a `// SAFETY:` comment.
#![allow(unsafe_code)]

mod memcpy;
mod netns;
mod seqpacket;

pub use memcpy::{CopyTuning, prefer_vector_copies};
pub use netns::NetNs;
pub use seqpacket::{MAX_PACKET, SeqPacket, SeqPacketListener};
