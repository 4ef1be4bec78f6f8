//! Another process's figures from `/proc/<pid>`: resident memory and CPU time.

/// A number field of `/proc/<pid>/status` (`VmRSS:`, `RssAnon:`, `Threads:`; KiB
/// for the memory fields); `None` when unreadable.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A process's CPU time so far (user + system), in seconds; `None` when
/// unreadable.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields resume after the command name's last ')': utime and stime are
    // fields 14 and 15. USER_HZ is 100 on every Linux this runs on.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(status_kib(me, "VmRSS:").is_some_and(|k| k > 0));
        assert!(cpu_secs(me).is_some_and(|s| s >= 0.0));
        assert_eq!(status_kib(me, "NoSuchField:"), None);
    }
}
