//! glibc's `memcpy` without `rep movsb` for copies below the non-temporal size.
//!
//! For a copy of at least `__x86_rep_movsb_threshold` bytes (2 KiB to 8 KiB by
//! default), glibc's x86-64 `memcpy` aligns the *source* to 64 bytes and runs
//! `rep movsb`. On AMD Zen (the machine of `docs/benchmarks.md`), `rep movsb` whose
//! destination is then not 16-byte aligned runs an order of magnitude slower than
//! the vector loop: 2.6-3.3 GB/s against 35 GB/s for 16 KiB. That is exactly the
//! copy a TLS record costs: rustls copies each record's plaintext 5 bytes after the
//! record header, and HTTP/2 DATA payloads sit 9 bytes after their frame header. On
//! the stream benchmark it was a quarter of the sending ztunnel's CPU, four times
//! the AES-GCM encryption itself.
//!
//! [`prefer_vector_copies`] raises the threshold to glibc's own upper bound for
//! `rep movsb` (`__x86_rep_movsb_stop_threshold`, where non-temporal stores take
//! over), so copies use the vector loop at every size below it: as fast as
//! `rep movsb` for aligned copies, and without its misaligned cliff. The variable is
//! the one `GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=...` sets at start;
//! a tunable the operator set is left alone. Only where glibc is linked statically
//! (this workspace's x86-64 build, `.cargo/config.toml`): the variable is internal
//! to glibc, visible to the static link only; elsewhere this does nothing.

/// What [`prefer_vector_copies`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyTuning {
    /// `rep movsb` now starts at `to` bytes instead of `from`.
    Raised { from: i64, to: i64 },
    /// Already at or above glibc's bound: nothing to change.
    Unchanged { threshold: i64 },
    /// `GLIBC_TUNABLES` names the threshold: the operator's choice stands.
    SetByOperator,
    /// Not a static glibc x86-64 build.
    Unsupported,
}

impl std::fmt::Display for CopyTuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Raised { from, to } => write!(
                f,
                "memcpy: vector loop up to {to} bytes (rep movsb threshold {from} -> {to})"
            ),
            Self::Unchanged { threshold } => {
                write!(f, "memcpy: rep movsb threshold already {threshold}")
            }
            Self::SetByOperator => write!(f, "memcpy: rep movsb threshold set by GLIBC_TUNABLES"),
            Self::Unsupported => write!(f, "memcpy: glibc not linked statically, left as is"),
        }
    }
}

/// The tunable's name inside `GLIBC_TUNABLES`.
const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";

/// The new threshold, given the operator's `GLIBC_TUNABLES` and glibc's values.
fn decide(tunables: Option<&str>, threshold: i64, stop: i64) -> CopyTuning {
    let named = tunables.is_some_and(|t| {
        t.split(':')
            .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k == TUNABLE))
    });
    if named {
        CopyTuning::SetByOperator
    } else if stop > threshold {
        CopyTuning::Raised {
            from: threshold,
            to: stop,
        }
    } else {
        CopyTuning::Unchanged { threshold }
    }
}

/// Makes glibc's `memcpy`/`memmove` use the vector loop instead of `rep movsb`
/// below the non-temporal size. Call it first in `main`; it affects the whole
/// process, every copy after it.
pub fn prefer_vector_copies() -> CopyTuning {
    imp::apply()
}

#[cfg(all(
    target_arch = "x86_64",
    target_env = "gnu",
    target_feature = "crt-static"
))]
mod imp {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::{CopyTuning, decide};

    // glibc 2.33 and later, sysdeps/x86/cacheinfo.h: `long int` variables that
    // `memmove-vec-unaligned-erms` reads on every call, set once at start from the
    // CPU's cache sizes and `GLIBC_TUNABLES`.
    unsafe extern "C" {
        static __x86_rep_movsb_threshold: AtomicI64;
        static __x86_rep_movsb_stop_threshold: AtomicI64;
    }

    pub(super) fn apply() -> CopyTuning {
        // SAFETY: both symbols are glibc's `long int` globals (8 bytes, 8-aligned on
        // x86-64), the same layout as `AtomicI64`; glibc's start-up code has set
        // them before `main`, and afterwards only reads them, with single aligned
        // 8-byte loads, so a store here is seen whole by any thread's next copy.
        let (threshold, stop) =
            unsafe { (&__x86_rep_movsb_threshold, &__x86_rep_movsb_stop_threshold) };
        let tunables = std::env::var("GLIBC_TUNABLES").ok();
        let decision = decide(
            tunables.as_deref(),
            threshold.load(Ordering::Relaxed),
            stop.load(Ordering::Relaxed),
        );
        if let CopyTuning::Raised { to, .. } = decision {
            threshold.store(to, Ordering::Relaxed);
        }
        decision
    }

    /// The threshold in force now (tests).
    #[cfg(test)]
    pub(super) fn current() -> Option<(i64, i64)> {
        // SAFETY: as in `apply`.
        let (threshold, stop) =
            unsafe { (&__x86_rep_movsb_threshold, &__x86_rep_movsb_stop_threshold) };
        Some((
            threshold.load(Ordering::Relaxed),
            stop.load(Ordering::Relaxed),
        ))
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_env = "gnu",
    target_feature = "crt-static"
)))]
mod imp {
    use super::CopyTuning;

    pub(super) fn apply() -> CopyTuning {
        CopyTuning::Unsupported
    }

    #[cfg(test)]
    pub(super) fn current() -> Option<(i64, i64)> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_the_threshold_to_glibcs_bound_unless_the_operator_set_it() {
        assert_eq!(
            decide(None, 2048, 3 << 20),
            CopyTuning::Raised {
                from: 2048,
                to: 3 << 20
            }
        );
        assert_eq!(
            decide(Some("glibc.malloc.arena_max=2"), 8192, 1 << 20),
            CopyTuning::Raised {
                from: 8192,
                to: 1 << 20
            }
        );
        assert_eq!(
            decide(
                Some("glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=4096"),
                4096,
                1 << 20
            ),
            CopyTuning::SetByOperator
        );
        // A longer name that merely starts like the tunable is not it.
        assert_eq!(
            decide(Some("glibc.cpu.x86_rep_movsb_threshold_x=1"), 2048, 4096),
            CopyTuning::Raised {
                from: 2048,
                to: 4096
            }
        );
        assert_eq!(
            decide(None, 1 << 20, 1 << 20),
            CopyTuning::Unchanged { threshold: 1 << 20 }
        );
    }

    #[test]
    fn the_static_build_moves_glibcs_threshold_and_copies_stay_correct() {
        let Some((_, stop)) = imp::current() else {
            eprintln!("SKIPPED: glibc is not linked statically in this build");
            assert_eq!(prefer_vector_copies(), CopyTuning::Unsupported);
            return;
        };
        let outcome = prefer_vector_copies();
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains(TUNABLE)) {
            assert_eq!(outcome, CopyTuning::SetByOperator);
            return;
        }
        assert!(stop > 0, "glibc's stop threshold is {stop}");
        let (threshold, _) = imp::current().unwrap_or_default();
        assert_eq!(threshold, stop, "after {outcome:?}");
        // A second call finds it done.
        assert_eq!(
            prefer_vector_copies(),
            CopyTuning::Unchanged { threshold: stop }
        );
        // Copies of every alignment and of sizes around the old threshold and the
        // bound still copy exactly.
        let src: Vec<u8> = (0..(stop as usize + 4096))
            .map(|i| (i * 7 + 3) as u8)
            .collect();
        for len in [
            0,
            1,
            63,
            2048,
            8191,
            16_384,
            stop as usize - 1,
            stop as usize + 1,
        ] {
            for (s, d) in [(0, 5), (5, 0), (3, 9), (0, 0)] {
                let mut dst = vec![0u8; len + 16];
                let n = len.min(src.len() - s);
                dst[d..d + n].copy_from_slice(&src[s..s + n]);
                assert_eq!(&dst[d..d + n], &src[s..s + n], "len {len} src+{s} dst+{d}");
            }
        }
    }
}
