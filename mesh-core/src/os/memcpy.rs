//! glibc's `memcpy` without `rep movsb` for copies below the non-temporal size,
//! on AMD processors.
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
//! `rep movsb` (`__x86_rep_movsb_stop_threshold`: the non-temporal threshold, or
//! on AMD the L2 size), so copies below it use the vector loop: as fast as
//! `rep movsb` for aligned copies on that machine, and without its misaligned
//! cliff. Other vendors keep glibc's choice (not measured here). The variable is
//! the one `GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=...` sets at start; a
//! tunable the operator set is left alone. Only where glibc 2.34 or later is linked
//! statically (this workspace's x86-64 build, `.cargo/config.toml`; `build.rs`
//! checks): the variables are internal to glibc, visible to a static link only;
//! elsewhere this does nothing (`AMBIT_NO_COPY_TUNING=1` at build time turns it
//! off).

/// What [`prefer_vector_copies`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyTuning {
    /// `rep movsb` now starts at `to` bytes instead of `from`.
    Raised { from: i64, to: i64 },
    /// Already at or above glibc's bound: nothing to change.
    Unchanged { threshold: i64 },
    /// `GLIBC_TUNABLES` names the threshold: the operator's choice stands.
    SetByOperator,
    /// Not an AMD processor: glibc's choice stands.
    OtherVendor,
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
            Self::OtherVendor => write!(f, "memcpy: not an AMD processor, left as is"),
            Self::Unsupported => write!(
                f,
                "memcpy: not a static glibc 2.34+ x86-64 build, left as is"
            ),
        }
    }
}

/// The tunable's name inside `GLIBC_TUNABLES`.
const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";

/// Whether `GLIBC_TUNABLES` (`name=value:name=value`) sets the threshold.
fn names_threshold(tunables: Option<&str>) -> bool {
    tunables.is_some_and(|t| {
        t.split(':')
            .any(|kv| kv.split_once('=').is_some_and(|(k, _)| k == TUNABLE))
    })
}

/// Whether `/proc/cpuinfo` describes an AMD processor.
fn is_amd(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("vendor_id"))
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(_, v)| v.trim() == "AuthenticAMD")
}

/// What the decision reads from the process's surroundings: `GLIBC_TUNABLES`
/// (bytes, as glibc reads it, so a non-UTF-8 value still counts), and whether the
/// processor is AMD, from the head of `/proc/cpuinfo` (the first processor's
/// `vendor_id`; the whole file grows with the core count, and this runs at start).
fn environment() -> (Option<String>, bool) {
    use std::io::Read;
    let tunables = std::env::var_os("GLIBC_TUNABLES").map(|t| t.to_string_lossy().into_owned());
    let mut head = Vec::new();
    // Unreadable: not AMD as far as we know, glibc's choice stands.
    let _ = std::fs::File::open("/proc/cpuinfo").and_then(|f| f.take(4096).read_to_end(&mut head));
    (tunables, is_amd(&String::from_utf8_lossy(&head)))
}

/// The new threshold, given the operator's `GLIBC_TUNABLES`, the processor's
/// vendor and glibc's values.
fn decide(tunables: Option<&str>, amd: bool, threshold: i64, stop: i64) -> CopyTuning {
    if names_threshold(tunables) {
        CopyTuning::SetByOperator
    } else if !amd {
        CopyTuning::OtherVendor
    } else if stop > threshold {
        CopyTuning::Raised {
            from: threshold,
            to: stop,
        }
    } else {
        CopyTuning::Unchanged { threshold }
    }
}

/// On AMD processors, makes glibc's `memcpy`/`memmove` use the vector loop
/// instead of `rep movsb` below glibc's upper bound for it. Call it first in
/// `main`; it affects the whole process, every copy after it.
pub fn prefer_vector_copies() -> CopyTuning {
    imp::apply()
}

#[cfg(ambit_glibc_copy_thresholds)]
mod imp {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::{CopyTuning, decide, environment};

    // glibc 2.34 and later, sysdeps/x86/cacheinfo.h: `long int` variables that
    // `memmove-vec-unaligned-erms` reads on every call, set once at start from the
    // CPU's cache sizes and `GLIBC_TUNABLES`.
    unsafe extern "C" {
        static __x86_rep_movsb_threshold: AtomicI64;
        static __x86_rep_movsb_stop_threshold: AtomicI64;
    }

    pub(super) fn apply() -> CopyTuning {
        // SAFETY: both symbols are glibc's `long int` globals (8 bytes, 8-aligned on
        // x86-64), the same layout as `AtomicI64`; glibc's start-up code has set
        // them before `main`, and afterwards only reads them, from its assembly,
        // with single aligned 8-byte loads, so a store here is seen whole by any
        // thread's next copy (threads copying meanwhile see the old or the new
        // value, both valid). No Rust code but this module touches them.
        let (threshold, stop) =
            unsafe { (&__x86_rep_movsb_threshold, &__x86_rep_movsb_stop_threshold) };
        let (tunables, amd) = environment();
        let decision = decide(
            tunables.as_deref(),
            amd,
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

#[cfg(not(ambit_glibc_copy_thresholds))]
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

    const AMD: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n";
    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n";

    #[test]
    fn raises_the_threshold_on_amd_unless_the_operator_set_it() {
        assert!(is_amd(AMD));
        assert!(!is_amd(INTEL));
        assert!(!is_amd(""));
        assert_eq!(
            decide(None, true, 2048, 3 << 20),
            CopyTuning::Raised {
                from: 2048,
                to: 3 << 20
            }
        );
        assert_eq!(decide(None, false, 2048, 3 << 20), CopyTuning::OtherVendor);
        assert_eq!(
            decide(Some("glibc.malloc.arena_max=2"), true, 8192, 1 << 20),
            CopyTuning::Raised {
                from: 8192,
                to: 1 << 20
            }
        );
        assert_eq!(
            decide(
                Some("glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=4096"),
                true,
                4096,
                1 << 20
            ),
            CopyTuning::SetByOperator
        );
        // A longer name that merely starts like the tunable is not it.
        assert_eq!(
            decide(
                Some("glibc.cpu.x86_rep_movsb_threshold_x=1"),
                true,
                2048,
                4096
            ),
            CopyTuning::Raised {
                from: 2048,
                to: 4096
            }
        );
        assert_eq!(
            decide(None, true, 1 << 20, 1 << 20),
            CopyTuning::Unchanged { threshold: 1 << 20 }
        );
    }

    #[test]
    fn the_static_build_moves_glibcs_threshold_on_amd() {
        let Some((before, stop)) = imp::current() else {
            eprintln!("SKIPPED: not a static glibc 2.34+ x86-64 build");
            assert_eq!(prefer_vector_copies(), CopyTuning::Unsupported);
            return;
        };
        assert!(stop > 0, "glibc's stop threshold is {stop}");
        let outcome = prefer_vector_copies();
        let (after, _) = imp::current().unwrap_or_default();
        let (tunables, amd) = environment();
        if names_threshold(tunables.as_deref()) {
            assert_eq!(outcome, CopyTuning::SetByOperator);
            assert_eq!(after, before);
        } else if !amd {
            assert_eq!(outcome, CopyTuning::OtherVendor);
            assert_eq!(after, before);
        } else {
            // Raised now, or by an earlier call in this process.
            assert_eq!(after, stop, "after {outcome:?}");
            assert_eq!(
                prefer_vector_copies(),
                CopyTuning::Unchanged { threshold: stop }
            );
        }
    }
}
