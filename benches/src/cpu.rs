//! Where the CPU went during a transfer: this process's share and everything else's,
//! from `/proc/stat` and `/proc/self/stat`. A mesh path that uses one core of two is
//! bound by its pipeline, not by the machine; another process busy during a run
//! means the run is not to be trusted.

use std::fs;

/// Cumulative CPU counters at one instant, in clock ticks (both files use the same
/// unit, so no tick rate is needed).
#[derive(Clone, Copy, Debug)]
pub struct CpuSnapshot {
    /// All ticks of all CPUs, idle included.
    total: u64,
    /// Non-idle ticks of all CPUs.
    busy: u64,
    /// Ticks this process ran (user and system).
    process: u64,
    cpus: u32,
}

/// CPU use over an interval, in cores (1.0 = one core busy all the time).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuUse {
    /// This process: the path under test, both ends of it.
    pub process: f64,
    /// Every other process, and the kernel's work not charged to this one.
    pub others: f64,
}

impl CpuSnapshot {
    /// The counters now; `None` where `/proc` is missing or unreadable.
    pub fn now() -> Option<Self> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let own = fs::read_to_string("/proc/self/stat").ok()?;
        Self::parse(&stat, &own)
    }

    fn parse(stat: &str, own: &str) -> Option<Self> {
        let mut lines = stat.lines();
        let all: Vec<u64> = lines
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]: guest
        // time is already counted in user, so only the first eight add up.
        let fields = all.get(..8)?;
        let total: u64 = fields.iter().sum();
        let busy = total - fields[3] - fields[4];
        let cpus = lines
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        // The command name may hold spaces and parentheses; fields resume after the
        // last ')': state is field 3, utime and stime are fields 14 and 15.
        let after_name = &own[own.rfind(')')? + 1..];
        let mut own_fields = after_name.split_whitespace().skip(11);
        let utime: u64 = own_fields.next()?.parse().ok()?;
        let stime: u64 = own_fields.next()?.parse().ok()?;
        Some(Self {
            total,
            busy,
            process: utime + stime,
            cpus: u32::try_from(cpus).ok().filter(|n| *n > 0)?,
        })
    }

    /// CPU use from `self` to `later`; `None` if no tick passed.
    pub fn until(&self, later: &Self) -> Option<CpuUse> {
        let total = later.total.checked_sub(self.total).filter(|t| *t > 0)? as f64;
        let busy = later.busy.saturating_sub(self.busy) as f64;
        let process = later.process.saturating_sub(self.process) as f64;
        let cores = f64::from(self.cpus);
        Some(CpuUse {
            process: process / total * cores,
            others: (busy - process).max(0.0) / total * cores,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "4242 (hbone (bench)) R 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 3";

    fn stat(user: u64, idle: u64) -> String {
        format!(
            "cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0 0 0\ncpu1 1 0 0 1 0 0 0 0 0 0\nintr 5\n"
        )
    }

    #[test]
    fn parses_the_aggregate_line_and_the_own_times() {
        let s = CpuSnapshot::parse(&stat(1000, 3000), OWN).unwrap();
        assert_eq!((s.total, s.busy, s.process, s.cpus), (4000, 1000, 200, 2));
    }

    #[test]
    fn use_is_in_cores() {
        let before = CpuSnapshot::parse(&stat(1000, 3000), OWN).unwrap();
        let own_later = OWN.replace(" 150 50 ", " 250 50 ");
        // 200 ticks passed on 2 CPUs (100 each): 150 busy, 100 of them ours.
        let after = CpuSnapshot::parse(&stat(1150, 3050), &own_later).unwrap();
        let used = before.until(&after).unwrap();
        assert!((used.process - 1.0).abs() < 1e-9, "{used:?}");
        assert!((used.others - 0.5).abs() < 1e-9, "{used:?}");
    }

    #[test]
    fn garbage_is_none() {
        assert!(CpuSnapshot::parse("nonsense", OWN).is_none());
        assert!(CpuSnapshot::parse(&stat(1, 1), "no parens").is_none());
    }

    #[test]
    fn reads_this_machine() {
        if std::path::Path::new("/proc/stat").exists() {
            assert!(CpuSnapshot::now().is_some());
        }
    }
}
