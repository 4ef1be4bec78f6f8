//! Which threads run which end of a path. The machine has two cores and every
//! topology uses two tokio workers; what differs is who may run where.
//!
//! - `shared` (the default): one runtime of two workers runs both ends, as one
//!   proxy process on a 2-core node would; tokio decides where each task runs.
//! - `split`: the sending end (and, on the mesh path, the HBONE client) has a
//!   1-worker runtime, the receiving end (the HBONE server) another, as two nodes
//!   with a 1-core proxy each would.

use std::fmt;
use std::io;

use tokio::runtime::{Builder, Handle, Runtime};

/// How the two workers are shared between the ends of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    Shared,
    Split,
}

impl Topology {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "" | "shared" => Some(Self::Shared),
            "split" => Some(Self::Split),
            _ => None,
        }
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Shared => "shared: one runtime of 2 workers runs both ends",
            Self::Split => "split: the sending end and the receiving end have 1 worker each",
        })
    }
}

/// The runtimes of a run: the sender's, and the receiver's when it has its own.
#[derive(Debug)]
pub struct Runtimes {
    pub sender: Runtime,
    receiver: Option<Runtime>,
}

impl Runtimes {
    pub fn build(topology: Topology) -> io::Result<Self> {
        let runtime = |name: &'static str, workers: usize| {
            Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name(name)
                .enable_all()
                .build()
        };
        Ok(match topology {
            Topology::Shared => Self {
                sender: runtime("bench-worker", 2)?,
                receiver: None,
            },
            Topology::Split => Self {
                sender: runtime("bench-sender", 1)?,
                receiver: Some(runtime("bench-receiver", 1)?),
            },
        })
    }

    /// Where the receiving ends are spawned.
    pub fn receiver(&self) -> Handle {
        self.receiver
            .as_ref()
            .unwrap_or(&self.sender)
            .handle()
            .clone()
    }
}
