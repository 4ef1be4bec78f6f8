//! What a run moves and how, read from `AMBIT_BENCH_*` environment variables so that
//! `cargo bench` needs no arguments. Every setting has a name, a default and a line
//! of doc here; a bad value fails the run with the variable's name.

use std::env;
use std::fmt;

use mesh_core::hbone::HboneConfig;

use crate::size::{format_size, parse_size};
use crate::topology::Topology;

/// `1`: the smoke mode, which moves little data once, to check the scenario runs.
pub const QUICK: &str = "AMBIT_BENCH_QUICK";
/// Bytes moved per measured transfer (default 4 GiB, quick 64 MiB).
pub const BYTES: &str = "AMBIT_BENCH_BYTES";
/// Bytes moved by the untimed warm-up transfer of each path (default 512 MiB, quick 8 MiB).
pub const WARMUP_BYTES: &str = "AMBIT_BENCH_WARMUP_BYTES";
/// Measured transfers per path; the report shows their median (default 5, quick 1).
pub const REPETITIONS: &str = "AMBIT_BENCH_REPS";
/// Size of the buffer the sender writes again and again (default 256 KiB, the largest
/// buffer of `mesh_core::copy`, i.e. what a bulk splice hands the tunnel).
pub const WRITE_BUFFER: &str = "AMBIT_BENCH_WRITE_BUFFER";
/// Size of the buffer the receiver reads into (default 256 KiB).
pub const READ_BUFFER: &str = "AMBIT_BENCH_READ_BUFFER";
/// `direct`, `mesh` or `both` (default): which paths run; one alone is for profiling.
pub const PATHS: &str = "AMBIT_BENCH_PATHS";
/// `shared` (default) or `split`: how the two tokio workers are shared between the
/// ends of a path (see `topology`).
pub const TOPOLOGY: &str = "AMBIT_BENCH_TOPOLOGY";
/// Overrides `HboneConfig::stream_window` (bytes).
pub const STREAM_WINDOW: &str = "AMBIT_BENCH_STREAM_WINDOW";
/// Overrides `HboneConfig::connection_window` (bytes).
pub const CONNECTION_WINDOW: &str = "AMBIT_BENCH_CONNECTION_WINDOW";
/// Overrides `HboneConfig::max_frame_size` (bytes, 16 KiB to 16 MiB - 1).
pub const MAX_FRAME_SIZE: &str = "AMBIT_BENCH_MAX_FRAME_SIZE";
/// Overrides `HboneConfig::max_send_buffer` (bytes).
pub const MAX_SEND_BUFFER: &str = "AMBIT_BENCH_MAX_SEND_BUFFER";

/// Which paths a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paths {
    Both,
    DirectOnly,
    MeshOnly,
}

impl Paths {
    pub fn direct(self) -> bool {
        self != Self::MeshOnly
    }

    pub fn mesh(self) -> bool {
        self != Self::DirectOnly
    }
}

/// A setting that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?}: {expected}")]
pub struct SettingsError {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// The effective settings of a run, printed with its results.
#[derive(Clone, Debug)]
pub struct Settings {
    pub quick: bool,
    pub bytes: u64,
    pub warmup_bytes: u64,
    pub repetitions: usize,
    pub write_buffer: usize,
    pub read_buffer: usize,
    pub paths: Paths,
    pub topology: Topology,
    /// Used by both the HBONE client and the server.
    pub hbone: HboneConfig,
    /// glibc malloc tunables in the environment (`MALLOC_*`, `GLIBC_TUNABLES`), shown
    /// with the results: they move the mesh path's numbers a lot (docs/benchmarks.md).
    pub allocator_env: Vec<String>,
}

impl Settings {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        let mut settings = Self::from_lookup(|name| env::var(name).ok())?;
        settings.allocator_env = env::vars()
            .filter(|(k, _)| k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        Ok(settings)
    }

    /// Reads the settings from `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let quick = match lookup(QUICK).as_deref().map(str::trim) {
            None | Some("") | Some("0") => false,
            Some("1") => true,
            Some(other) => return Err(bad(QUICK, other, "1 or 0")),
        };
        let paths = match lookup(PATHS).as_deref().map(str::trim) {
            None | Some("") | Some("both") => Paths::Both,
            Some("direct") => Paths::DirectOnly,
            Some("mesh") => Paths::MeshOnly,
            Some(other) => return Err(bad(PATHS, other, "direct, mesh or both")),
        };
        let topology = match lookup(TOPOLOGY) {
            None => Topology::Shared,
            Some(v) => Topology::parse(&v).ok_or_else(|| bad(TOPOLOGY, &v, "shared or split"))?,
        };
        let size = |name: &'static str, default: u64| -> Result<u64, SettingsError> {
            match lookup(name) {
                None => Ok(default),
                Some(v) => parse_size(&v)
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad(name, &v, "a positive size such as 4GiB, 256KiB or 65536")),
            }
        };
        let buffer = |name: &'static str, default: usize| -> Result<usize, SettingsError> {
            let n = size(name, default as u64)?;
            usize::try_from(n)
                .ok()
                .filter(|n| *n <= 64 << 20)
                .ok_or_else(|| bad(name, &n.to_string(), "at most 64MiB"))
        };
        // HTTP/2 caps a flow-control window at 2^31 - 1 bytes.
        let window = |name: &'static str, default: u32| -> Result<u32, SettingsError> {
            let n = size(name, u64::from(default))?;
            u32::try_from(n)
                .ok()
                .filter(|n| *n < (1 << 31))
                .ok_or_else(|| bad(name, &n.to_string(), "below 2GiB"))
        };
        let repetitions = match lookup(REPETITIONS) {
            None => {
                if quick {
                    1
                } else {
                    5
                }
            }
            Some(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| bad(REPETITIONS, &v, "a count from 1 to 1000"))?,
        };
        let defaults = HboneConfig::default();
        // HTTP/2 allows frames from 16 KiB to 16 MiB - 1.
        let max_frame_size = size(MAX_FRAME_SIZE, u64::from(defaults.max_frame_size))?;
        let max_frame_size = u32::try_from(max_frame_size)
            .ok()
            .filter(|n| ((16 << 10)..(1 << 24)).contains(n))
            .ok_or_else(|| {
                bad(
                    MAX_FRAME_SIZE,
                    &max_frame_size.to_string(),
                    "from 16KiB to below 16MiB",
                )
            })?;
        let hbone = HboneConfig {
            stream_window: window(STREAM_WINDOW, defaults.stream_window)?,
            connection_window: window(CONNECTION_WINDOW, defaults.connection_window)?,
            max_frame_size,
            max_send_buffer: buffer(MAX_SEND_BUFFER, defaults.max_send_buffer)?,
            ..defaults
        };
        Ok(Self {
            quick,
            bytes: size(BYTES, if quick { 64 << 20 } else { 4 << 30 })?,
            warmup_bytes: size(WARMUP_BYTES, if quick { 8 << 20 } else { 512 << 20 })?,
            repetitions,
            write_buffer: buffer(WRITE_BUFFER, 256 << 10)?,
            read_buffer: buffer(READ_BUFFER, 256 << 10)?,
            paths,
            topology,
            hbone,
            allocator_env: Vec::new(),
        })
    }
}

fn bad(name: &'static str, value: &str, expected: &'static str) -> SettingsError {
    SettingsError {
        name,
        value: value.to_string(),
        expected,
    }
}

impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} measured transfers of {} per path, after warming up with {}{}{}",
            self.repetitions,
            format_size(self.bytes),
            format_size(self.warmup_bytes),
            match self.paths {
                Paths::Both => "",
                Paths::DirectOnly => " (direct path only)",
                Paths::MeshOnly => " (mesh path only)",
            },
            if self.quick { " (quick mode)" } else { "" },
        )?;
        writeln!(f, "topology {}", self.topology)?;
        writeln!(
            f,
            "sender writes {} buffers, receiver reads into {}",
            format_size(self.write_buffer as u64),
            format_size(self.read_buffer as u64),
        )?;
        if self.allocator_env.is_empty() {
            writeln!(f, "allocator: the process default, untuned")?;
        } else {
            writeln!(f, "allocator tunables: {}", self.allocator_env.join(" "))?;
        }
        write!(
            f,
            "HBONE: stream window {}, connection window {}, max frame {}, max send buffer {}",
            format_size(u64::from(self.hbone.stream_window)),
            format_size(u64::from(self.hbone.connection_window)),
            format_size(u64::from(self.hbone.max_frame_size)),
            format_size(self.hbone.max_send_buffer as u64),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_move_gibibytes_and_quick_moves_little() {
        let full = from(&[]).unwrap();
        assert!(!full.quick);
        assert_eq!(full.bytes, 4 << 30);
        assert_eq!(full.repetitions, 5);
        assert_eq!(
            full.hbone.stream_window,
            HboneConfig::default().stream_window
        );
        let quick = from(&[(QUICK, "1")]).unwrap();
        assert!(quick.quick);
        assert_eq!(quick.bytes, 64 << 20);
        assert_eq!(quick.repetitions, 1);
    }

    #[test]
    fn overrides_apply() {
        let s = from(&[
            (BYTES, "1GiB"),
            (REPETITIONS, "3"),
            (WRITE_BUFFER, "64KiB"),
            (STREAM_WINDOW, "8MiB"),
            (MAX_FRAME_SIZE, "16KiB"),
        ])
        .unwrap();
        assert_eq!(s.bytes, 1 << 30);
        assert_eq!(s.repetitions, 3);
        assert_eq!(s.write_buffer, 64 << 10);
        assert_eq!(s.hbone.stream_window, 8 << 20);
        assert_eq!(s.hbone.max_frame_size, 16 << 10);
        assert_eq!(from(&[]).unwrap().paths, Paths::Both);
        let mesh_only = from(&[(PATHS, "mesh")]).unwrap().paths;
        assert!(mesh_only.mesh() && !mesh_only.direct());
        assert_eq!(from(&[]).unwrap().topology, Topology::Shared);
        assert_eq!(
            from(&[(TOPOLOGY, "split")]).unwrap().topology,
            Topology::Split
        );
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (name, value) in [
            (QUICK, "yes"),
            (BYTES, "lots"),
            (BYTES, "0"),
            (REPETITIONS, "0"),
            (WRITE_BUFFER, "1GiB"),
            (MAX_FRAME_SIZE, "1KiB"),
            (MAX_FRAME_SIZE, "16MiB"),
            (CONNECTION_WINDOW, "4GiB"),
            (PATHS, "neither"),
            (TOPOLOGY, "diagonal"),
        ] {
            let err = from(&[(name, value)]).unwrap_err();
            assert_eq!(err.name, name, "{value}");
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }
}
