//! Where a process's resident memory is, per mapping (`/proc/<pid>/smaps`): its
//! executable, each shared library, heap, stacks and anonymous mappings. VmRSS alone
//! does not say whether a change should go after code pages or allocations.

use std::fmt;
use std::fs;

/// Resident KiB of one kind of mapping, summed over its mappings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingRss {
    /// The file's name, `[heap]`, `[stack]`, or `anon` for unnamed mappings.
    pub name: String,
    pub rss_kib: u64,
    /// How many mappings were summed.
    pub mappings: usize,
}

/// Resident memory of `pid` per mapping name, largest first; `None` if the
/// process is gone or `smaps` unreadable.
pub fn rss_by_mapping(pid: u32) -> Option<Vec<MappingRss>> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(parse(&text))
}

fn parse(smaps: &str) -> Vec<MappingRss> {
    let mut out: Vec<MappingRss> = Vec::new();
    let mut current: Option<usize> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            if let Some(i) = current {
                out[i].rss_kib += kib;
            }
        } else if first.contains('-') && !first.ends_with(':') {
            // A mapping header: range perms offset dev inode [pathname].
            let path = fields.nth(4).unwrap_or("");
            let name = match path.rsplit('/').next() {
                Some(base) if !base.is_empty() => base.to_owned(),
                _ => "anon".to_owned(),
            };
            let i = out.iter().position(|m| m.name == name).unwrap_or_else(|| {
                out.push(MappingRss {
                    name,
                    rss_kib: 0,
                    mappings: 0,
                });
                out.len() - 1
            });
            out[i].mappings += 1;
            current = Some(i);
        }
    }
    out.retain(|m| m.rss_kib > 0);
    out.sort_by_key(|m| std::cmp::Reverse(m.rss_kib));
    out
}

impl fmt::Display for MappingRss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} KiB ({})", self.name, self.rss_kib, self.mappings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r--p 00000000 fd:01 123 /usr/bin/ztunnel
Size:               1024 kB
Rss:                 100 kB
55d0c0100000-55d0c0900000 r-xp 00100000 fd:01 123 /usr/bin/ztunnel
Rss:                4000 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Rss:                 300 kB
7f0000200000-7f0000300000 r-xp 00000000 fd:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 900 kB
VmFlags: rd ex mr mw me sd
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  16 kB
";

    #[test]
    fn sums_per_mapping_name() {
        let got = parse(SMAPS);
        let names: Vec<_> = got
            .iter()
            .map(|m| (m.name.as_str(), m.rss_kib, m.mappings))
            .collect();
        assert_eq!(
            names,
            [
                ("ztunnel", 4100, 2),
                ("libc.so.6", 900, 1),
                ("anon", 300, 1),
                ("[stack]", 16, 1)
            ]
        );
    }
}
