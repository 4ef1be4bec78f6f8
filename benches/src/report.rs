//! What a run measured: one [`Sample`] per transfer, a [`Series`] of them per path,
//! a [`Row`] per scenario (direct beside mesh, with the ratio of their medians), and
//! the [`Table`] printed at the end; [`Summary`] for the figures that are not transfers.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::BenchError;
use crate::cpu::CpuUse;
use crate::load::Received;

/// One timed transfer: bytes moved and the time from the sender's first write to
/// the receiver's last byte.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub bytes: u64,
    pub elapsed: Duration,
    /// CPU use over the transfer, where `/proc` tells it.
    pub cpu: Option<CpuUse>,
}

impl Sample {
    /// The sample of a transfer of `sent` bytes started at `start`; an error if the
    /// receiver did not get them all.
    pub fn of(sent: u64, start: Instant, received: Received) -> Result<Self, BenchError> {
        if received.bytes != sent {
            return Err(BenchError::ShortTransfer {
                sent,
                got: received.bytes,
            });
        }
        Ok(Self {
            bytes: sent,
            elapsed: received.last_byte_at.saturating_duration_since(start),
            cpu: None,
        })
    }

    /// Throughput in gigabits (10^9 bits) per second.
    pub fn gbit_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs == 0.0 {
            return f64::INFINITY;
        }
        self.bytes as f64 * 8.0 / secs / 1e9
    }
}

/// The measured transfers of one path.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub samples: Vec<Sample>,
}

impl Series {
    pub fn push(&mut self, sample: Sample) {
        self.samples.push(sample);
    }

    fn rates(&self) -> Vec<f64> {
        let mut rates: Vec<f64> = self.samples.iter().map(Sample::gbit_per_s).collect();
        rates.sort_by(f64::total_cmp);
        rates
    }

    /// The median throughput (the mean of the middle two for an even count), Gbit/s.
    pub fn median(&self) -> Option<f64> {
        let rates = self.rates();
        let mid = rates.len() / 2;
        match rates.len() {
            0 => None,
            n if n % 2 == 1 => Some(rates[mid]),
            _ => Some((rates[mid - 1] + rates[mid]) / 2.0),
        }
    }

    /// The median of the cores this process used per transfer.
    pub fn median_cores(&self) -> Option<f64> {
        let mut cores: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|s| Some(s.cpu?.process))
            .collect();
        cores.sort_by(f64::total_cmp);
        cores.get(cores.len() / 2).copied()
    }

    /// The most the rest of the machine used during any one transfer, in cores.
    pub fn max_others(&self) -> Option<f64> {
        self.samples
            .iter()
            .filter_map(|s| Some(s.cpu?.others))
            .max_by(f64::total_cmp)
    }

    /// The slowest and the fastest transfer, Gbit/s.
    pub fn range(&self) -> Option<(f64, f64)> {
        let rates = self.rates();
        Some((*rates.first()?, *rates.last()?))
    }
}

/// One scenario: the direct path beside the mesh path.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub scenario: String,
    pub direct: Series,
    pub mesh: Series,
}

impl Row {
    /// Median mesh throughput over median direct throughput: 1.0 means the mesh costs
    /// nothing, 0.5 that it halves what the direct path does.
    pub fn ratio(&self) -> Option<f64> {
        Some(self.mesh.median()? / self.direct.median()?)
    }
}

/// The results of a run, printed as a plain-text table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    pub rows: Vec<Row>,
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

fn spread(s: &Series) -> String {
    s.range()
        .map_or_else(|| "-".to_string(), |(lo, hi)| format!("{lo:.2}-{hi:.2}"))
}

/// Above this many cores used by other processes during a transfer, the report
/// warns that the run shared the machine.
pub const NOISY_OTHERS: f64 = 0.1;

impl Table {
    /// The most any other process used during any transfer, in cores.
    pub fn max_others(&self) -> Option<f64> {
        self.rows
            .iter()
            .flat_map(|r| [r.direct.max_others(), r.mesh.max_others()])
            .flatten()
            .max_by(f64::total_cmp)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .rows
            .iter()
            .map(|r| r.scenario.len())
            .max()
            .unwrap_or(0)
            .max(8);
        let header = [
            "direct Gbit/s",
            "mesh Gbit/s",
            "ratio",
            "direct cores",
            "mesh cores",
            "direct range",
            "mesh range",
        ];
        write!(f, "{:<width$}", "scenario")?;
        for h in header {
            write!(f, "  {h:>13}")?;
        }
        writeln!(f)?;
        for row in &self.rows {
            let cells = [
                cell(row.direct.median(), 2),
                cell(row.mesh.median(), 2),
                cell(row.ratio(), 2),
                cell(row.direct.median_cores(), 2),
                cell(row.mesh.median_cores(), 2),
                spread(&row.direct),
                spread(&row.mesh),
            ];
            write!(f, "{:<width$}", row.scenario)?;
            for c in cells {
                write!(f, "  {c:>13}")?;
            }
            writeln!(f)?;
        }
        if let Some(others) = self.max_others().filter(|o| *o > NOISY_OTHERS) {
            writeln!(
                f,
                "warning: other processes used up to {others:.2} cores during a transfer; \
                 rerun on a quiet machine before recording these numbers"
            )?;
        }
        Ok(())
    }
}

/// `met` or `MISSED`, for a target.
pub fn verdict(met: bool) -> String {
    if met { "met" } else { "MISSED" }.to_owned()
}

/// Scenarios that are not transfers (a rate, a latency, a memory figure), one
/// line each beside their target: `ztunnel_e2e`'s closing table.
#[derive(Debug, Default)]
pub struct Summary {
    lines: Vec<[String; 6]>,
}

impl Summary {
    /// A line with no ratio.
    pub fn line(
        &mut self,
        scenario: &str,
        direct: String,
        mesh: String,
        target: String,
        note: String,
    ) {
        self.lines
            .push([scenario.to_owned(), direct, mesh, "-".into(), target, note]);
    }

    /// A line with the ratio mesh / direct, `met` when `met(ratio)`.
    pub fn ratio_row(
        &mut self,
        scenario: &str,
        direct: Option<f64>,
        mesh: Option<f64>,
        target: &str,
        met: impl Fn(f64) -> bool,
    ) {
        let ratio = direct.zip(mesh).map(|(d, m)| m / d);
        let show = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        self.lines.push([
            scenario.to_owned(),
            show(direct),
            show(mesh),
            show(ratio),
            target.to_owned(),
            ratio.map_or_else(String::new, |r| verdict(met(r))),
        ]);
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = ["scenario", "direct", "mesh", "ratio", "target", "result"];
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for line in &self.lines {
            for (w, c) in widths.iter_mut().zip(line) {
                *w = (*w).max(c.len());
            }
        }
        let row = |f: &mut fmt::Formatter<'_>, cells: &[&str]| -> fmt::Result {
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                if i == 0 {
                    write!(f, "{c:<w$}")?;
                } else {
                    write!(f, "  {c:>w$}")?;
                }
            }
            writeln!(f)
        };
        row(f, &header)?;
        for line in &self.lines {
            let cells: Vec<&str> = line.iter().map(String::as_str).collect();
            row(f, &cells)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(secs: &[f64]) -> Series {
        Series {
            samples: secs
                .iter()
                .map(|s| Sample {
                    bytes: 1_000_000_000,
                    elapsed: Duration::from_secs_f64(*s),
                    cpu: Some(CpuUse {
                        process: 1.0 / s,
                        others: 0.0,
                    }),
                })
                .collect(),
        }
    }

    #[test]
    fn throughput_is_in_gigabits() {
        let s = Sample {
            bytes: 1_000_000_000,
            elapsed: Duration::from_secs(2),
            cpu: None,
        };
        assert!((s.gbit_per_s() - 4.0).abs() < 1e-9);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        // 8, 4, 2 Gbit/s.
        assert_eq!(series(&[1.0, 2.0, 4.0]).median(), Some(4.0));
        assert_eq!(series(&[1.0, 2.0, 4.0, 8.0]).median(), Some(3.0));
        assert_eq!(series(&[]).median(), None);
        assert_eq!(series(&[1.0, 4.0]).range(), Some((2.0, 8.0)));
    }

    #[test]
    fn a_short_transfer_is_an_error() {
        let start = Instant::now();
        let got = Received {
            bytes: 10,
            last_byte_at: start,
        };
        assert!(matches!(
            Sample::of(11, start, got),
            Err(BenchError::ShortTransfer { sent: 11, got: 10 })
        ));
    }

    #[test]
    fn the_table_shows_medians_and_the_ratio() {
        let table = Table {
            rows: vec![Row {
                scenario: "one tunnel".into(),
                direct: series(&[1.0, 1.0, 1.0]),
                mesh: series(&[2.0, 2.0, 4.0]),
            }],
        };
        let text = table.to_string();
        let line = text.lines().nth(1).unwrap();
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[2..7], ["8.00", "4.00", "0.50", "1.00", "0.50"]);
        assert!(!text.contains("warning"));
    }

    #[test]
    fn a_busy_machine_is_flagged() {
        let mut mesh = series(&[1.0]);
        mesh.samples[0].cpu = Some(CpuUse {
            process: 1.0,
            others: 0.8,
        });
        let table = Table {
            rows: vec![Row {
                scenario: "one tunnel".into(),
                direct: series(&[1.0]),
                mesh,
            }],
        };
        assert_eq!(table.max_others(), Some(0.8));
        assert!(
            table
                .to_string()
                .contains("warning: other processes used up to 0.80 cores")
        );
    }
}
