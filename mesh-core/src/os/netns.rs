//! Network namespaces: a handle to one, and running code inside it.
//!
//! A socket belongs to the namespace of the thread that created it, for its whole
//! life. So ztunnel creates a pod's sockets while the thread is inside the pod's
//! namespace (entering and leaving around the few calls that make the socket), then
//! serves them from the ordinary tokio runtime.

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

impl NetNs {
    /// Runs `f` on the calling thread inside this namespace, then moves the thread
    /// back into `home` (the namespace it was in: the caller's [`NetNs::current`]).
    /// For making sockets on an async runtime's worker: two `setns` calls instead
    /// of a hand-off to another thread and back. `f` must not block or yield: no
    /// other work may run on the thread while it is inside. If the thread cannot
    /// return to `home`, the process aborts rather than keep a worker in a pod's
    /// namespace, where every later socket would be made.
    pub fn run_here<T>(&self, home: &NetNs, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        // Returns on drop, so a panicking `f` also leaves the namespace.
        let _back = ReturnTo(home);
        Ok(f())
    }
}

/// Moves the current thread back into its namespace when dropped.
struct ReturnTo<'a>(&'a NetNs);

impl Drop for ReturnTo<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.fd.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("fatal: cannot return a thread to its network namespace: {e}");
            std::process::abort();
        }
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

    #[test]
    fn a_socket_made_inside_a_namespace_lives_there() {
        if !crate::testing::require_root("a_socket_made_inside_a_namespace_lives_there") {
            return;
        }
        let netns = crate::testing::netns::TestNetns::create("nsut");
        let ns = NetNs::open(netns.path()).unwrap();
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

        // `run_here` enters on this very thread, and comes back, also after a panic.
        let home = NetNs::current().unwrap();
        let inside_inode = ns.inode().unwrap();
        for _ in 0..3 {
            let seen = ns
                .run_here(&home, || NetNs::current().and_then(|n| n.inode()))
                .unwrap()
                .unwrap();
            assert_eq!(seen, inside_inode);
            assert_eq!(NetNs::current().unwrap().inode().unwrap(), here);
        }
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ns.run_here(&home, || panic!("inside the namespace"))
        }));
        assert!(panicked.is_err());
        assert_eq!(NetNs::current().unwrap().inode().unwrap(), here);
    }
}
