//! Both paths move every byte, in both topologies, and the comparison yields a full
//! row. Nothing here is timed: throughput is for the `hbone_throughput` benchmark,
//! not for tests.

use ambit_benches::{DirectPath, MeshPath, Path, Runtimes, Settings, Topology, compare};
use mesh_core::hbone::HboneConfig;
use tokio::runtime::Handle;

const BYTES: u64 = (4 << 20) + 123;
const BUFFER: usize = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_path_moves_every_byte() {
    let direct = DirectPath::new(BUFFER, BUFFER, Handle::current())
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(direct.transfer(BYTES).await.unwrap().bytes, BYTES);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_path_moves_every_byte_on_one_reused_connection() {
    let mesh = MeshPath::new(HboneConfig::default(), BUFFER, BUFFER, Handle::current())
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(mesh.transfer(BYTES).await.unwrap().bytes, BYTES);
    }
    assert_eq!(mesh.connections_opened(), 1);
}

#[test]
fn both_paths_work_with_the_receiving_end_on_its_own_runtime() {
    let runtimes = Runtimes::build(Topology::Split).unwrap();
    let receiver = runtimes.receiver();
    runtimes.sender.block_on(async move {
        let direct = DirectPath::new(BUFFER, BUFFER, receiver.clone())
            .await
            .unwrap();
        let mesh = MeshPath::new(HboneConfig::default(), BUFFER, BUFFER, receiver)
            .await
            .unwrap();
        assert_eq!(direct.transfer(BYTES).await.unwrap().bytes, BYTES);
        assert_eq!(mesh.transfer(BYTES).await.unwrap().bytes, BYTES);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_measures_each_repetition_of_both_paths() {
    let mut settings = Settings::from_lookup(|_| None).unwrap();
    settings.bytes = BYTES;
    settings.warmup_bytes = 1 << 20;
    settings.repetitions = 3;
    let (write, read) = (settings.write_buffer, settings.read_buffer);
    let direct = DirectPath::new(write, read, Handle::current())
        .await
        .unwrap();
    let mesh = MeshPath::new(settings.hbone.clone(), write, read, Handle::current())
        .await
        .unwrap();
    let row = compare("smoke", &direct, &mesh, &settings).await.unwrap();
    assert_eq!(row.direct.samples.len(), 3);
    assert_eq!(row.mesh.samples.len(), 3);
    assert!(row.ratio().is_some_and(|r| r > 0.0));
}
