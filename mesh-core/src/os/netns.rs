//! Network namespaces: a handle to one, and running code inside it.
//!
//! A socket belongs to the namespace of the thread that created it, for its whole
//! life. So ztunnel creates a pod's sockets on a thread that has entered the pod's
//! namespace, then serves them from the ordinary tokio runtime.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sched::{CloneFlags, setns};

/// An open network namespace (the fd keeps it alive even if its name is removed).
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// The calling thread's namespace.
    pub fn current() -> io::Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// A namespace by path, e.g. `/run/netns/<name>` or `/proc/<pid>/ns/net`.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Self {
            fd: File::open(path)?.into(),
        })
    }

    /// Takes ownership of a namespace fd received from elsewhere (SCM_RIGHTS).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// The namespace's inode: two handles of the same namespace have the same one.
    pub fn inode(&self) -> io::Result<u64> {
        let st = nix::sys::stat::fstat(self.fd.as_fd()).map_err(io::Error::from)?;
        Ok(st.st_ino)
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its
    /// result. The thread ends afterwards, so no other code runs in the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| io::Error::other("thread in network namespace panicked"))?
        })
    }
}

/// A thread that stays inside one network namespace and makes sockets there on
/// request: the per-connection cost is a channel round trip, not a thread start.
/// The thread ends when the worker is dropped.
#[derive(Debug)]
pub struct NetNsWorker {
    jobs: std::sync::mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

impl NetNs {
    /// Starts a worker thread inside this namespace.
    pub fn worker(&self) -> io::Result<NetNsWorker> {
        let fd = self.fd.try_clone()?;
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("netns-worker".into())
            .spawn(move || {
                let entered = setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                while let Ok(job) = queue.recv() {
                    // A job that panics must not take the pod's socket maker with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("namespace worker did not start"))??;
        Ok(NetNsWorker { jobs })
    }
}

impl NetNsWorker {
    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
        reply: impl FnOnce(T) + Send + 'static,
    ) -> io::Result<()> {
        self.jobs
            .send(Box::new(move || reply(f())))
            .map_err(|_| io::Error::other("namespace worker is gone"))
    }

    /// Runs `f` inside the namespace and waits for its result without blocking the
    /// async runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(f, move |v| {
            let _ = tx.send(v);
        })?;
        rx.await
            .map_err(|_| io::Error::other("namespace worker dropped the job"))
    }

    /// Runs `f` inside the namespace, blocking the caller until it is done.
    pub fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit(f, move |v| {
            let _ = tx.send(v);
        })?;
        rx.recv()
            .map_err(|_| io::Error::other("namespace worker dropped the job"))
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn is_root() -> bool {
        nix::unistd::Uid::effective().is_root()
    }

    #[test]
    fn a_socket_made_inside_a_namespace_lives_there() {
        if !is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must run this test as root"
            );
            eprintln!("SKIPPED (needs root): a_socket_made_inside_a_namespace_lives_there");
            return;
        }
        let name = format!("ambit-nsut-{}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        struct Cleanup(String);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }
        let _cleanup = Cleanup(name.clone());
        let ns = NetNs::open(format!("/run/netns/{name}")).unwrap();
        assert_ne!(
            ns.inode().unwrap(),
            NetNs::current().unwrap().inode().unwrap()
        );
        // A listener made inside is not reachable from here: its port is free here.
        let inside = ns
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let port = inside.local_addr().unwrap().port();
        let err = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        // The caller's own thread never moved.
        let here = NetNs::current().unwrap().inode().unwrap();
        ns.run(|| ()).unwrap();
        assert_eq!(NetNs::current().unwrap().inode().unwrap(), here);

        // A worker stays inside: every job sees the namespace's inode.
        let worker = ns.worker().unwrap();
        let inside_inode = ns.inode().unwrap();
        for _ in 0..3 {
            let seen = worker
                .run_blocking(|| NetNs::current().and_then(|n| n.inode()))
                .unwrap()
                .unwrap();
            assert_eq!(seen, inside_inode);
        }
        // A panicking job does not end the worker.
        assert!(worker.run_blocking(|| panic!("job panics")).is_err());
        assert!(worker.run_blocking(|| 7).unwrap() == 7);
    }
}
