//! Runs one scenario: an untimed warm-up of each path, then measured transfers that
//! alternate direct and mesh, so drift in the machine (frequency, a noisy neighbour)
//! touches both paths alike.

use crate::cpu::CpuSnapshot;
use crate::{BenchError, Path, Row, Sample, Settings};

/// Warms both paths up, then measures `settings.repetitions` transfers of each,
/// printing every repetition as it ends. `settings.paths` may leave one path out.
pub async fn compare<D: Path, M: Path>(
    scenario: &str,
    direct: &D,
    mesh: &M,
    settings: &Settings,
) -> Result<Row, BenchError> {
    let paths = settings.paths;
    if paths.direct() {
        direct.transfer(settings.warmup_bytes).await?;
    }
    if paths.mesh() {
        mesh.transfer(settings.warmup_bytes).await?;
    }
    let mut row = Row {
        scenario: scenario.to_string(),
        direct: Default::default(),
        mesh: Default::default(),
    };
    for rep in 1..=settings.repetitions {
        let mut line = format!("  {scenario} #{rep}:");
        if paths.direct() {
            let d = measured(direct, settings.bytes).await?;
            line += &describe("direct", &d);
            row.direct.push(d);
        }
        if paths.mesh() {
            let m = measured(mesh, settings.bytes).await?;
            line += &describe("mesh", &m);
            row.mesh.push(m);
        }
        println!("{line}");
    }
    Ok(row)
}

/// One transfer, with the CPU it took.
async fn measured<P: Path>(path: &P, bytes: u64) -> Result<Sample, BenchError> {
    let before = CpuSnapshot::now();
    let mut sample = path.transfer(bytes).await?;
    sample.cpu = before
        .zip(CpuSnapshot::now())
        .and_then(|(b, a)| b.until(&a));
    Ok(sample)
}

fn describe(path: &str, s: &Sample) -> String {
    let cpu = s.cpu.map_or_else(String::new, |c| {
        format!(", {:.2} cores, others {:.2}", c.process, c.others)
    });
    format!(
        " {path} {:6.2} Gbit/s ({:.2} s{cpu})",
        s.gbit_per_s(),
        s.elapsed.as_secs_f64()
    )
}
