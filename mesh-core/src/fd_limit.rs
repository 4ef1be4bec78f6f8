//! The open-file limit every Ambit process raises at start: each proxied
//! connection takes a descriptor or two, and the usual soft limit (1024) is far
//! below what a node's traffic needs (Istio's ztunnel does the same).

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs the outcome: info
/// with the new limit, or a warning if it cannot be raised (the process runs on
/// with the limit it has). Returns the soft limit in force afterwards.
pub fn raise() -> Option<u64> {
    match raise_to_hard() {
        Ok((before, after)) => {
            tracing::info!(before, soft = after, "open file limit");
            Some(after)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open file limit (RLIMIT_NOFILE)");
            None
        }
    }
}

/// Sets the soft `RLIMIT_NOFILE` to the hard one; returns the soft limit before
/// and after.
pub fn raise_to_hard() -> std::io::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // An unlimited hard limit cannot be the soft one: Linux caps descriptors at
    // fs.nr_open.
    let target = if hard == RLIM_INFINITY {
        nr_open().unwrap_or(soft.max(1 << 20))
    } else {
        hard
    };
    if target > soft {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    let (after, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok((soft, after))
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}
