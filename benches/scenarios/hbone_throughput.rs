//! Scenario: one HBONE tunnel over loopback moving bytes as fast as it can, beside a
//! plain TCP connection over loopback moving the same bytes, in the same run.
//!
//! `cargo bench -p ambit-benches --bench hbone_throughput`; `AMBIT_BENCH_QUICK=1` for
//! a smoke run. The other settings are in `ambit_benches::settings`.

use std::process::ExitCode;

use ambit_benches::{BenchError, DirectPath, MeshPath, Runtimes, Settings, Table, compare};
use tokio::runtime::Handle;

const SCENARIO: &str = "1 tunnel, bulk one way";

// The allocator ztunnel runs with, so the mesh path is measured as deployed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // As ztunnel does at start (mesh_core::os::prefer_vector_copies).
    let copies = mesh_core::os::prefer_vector_copies();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hbone_throughput: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Two workers in all: the machine this is tuned for has two cores.
    let runtimes = match Runtimes::build(settings.topology) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hbone_throughput: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let receiver = runtimes.receiver();
    // Spawned, not run by `block_on` itself: the sender then runs on a worker too,
    // and the main thread is not a third core's worth of help.
    let outcome = runtimes
        .sender
        .block_on(async move { tokio::spawn(run(settings, receiver)).await });
    match outcome {
        Ok(Ok(table)) => {
            println!();
            print!("{table}");
            println!("{copies}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("hbone_throughput: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("hbone_throughput: the benchmark task failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings, receiver: Handle) -> Result<Table, BenchError> {
    println!("hbone_throughput");
    println!("{settings}");
    let (write, read) = (settings.write_buffer, settings.read_buffer);
    let direct = DirectPath::new(write, read, receiver.clone()).await?;
    let mesh = MeshPath::new(settings.hbone.clone(), write, read, receiver).await?;
    let row = compare(SCENARIO, &direct, &mesh, &settings).await?;
    Ok(Table { rows: vec![row] })
}
