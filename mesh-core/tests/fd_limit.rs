//! The open-file limit is raised to the hard limit. Its own test binary: the test
//! lowers the limit of the whole process first.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use nix::sys::resource::{Resource, getrlimit, setrlimit};

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Lowering the soft limit is always allowed; start below the hard one so the
    // raise has something to do.
    let low = 256.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
    let after = mesh_core::fd_limit::raise();
    let (soft, hard_after) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert_eq!(hard_after, hard, "the hard limit is left alone");
    if hard == nix::sys::resource::RLIM_INFINITY {
        assert!(soft > low, "raised towards fs.nr_open: {soft}");
    } else {
        assert_eq!(soft, hard, "the soft limit is the hard one");
    }
    assert_eq!(after, Some(soft), "raise reports the limit in force");
}
