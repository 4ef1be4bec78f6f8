//! Scenario: the real ztunnel on the e2e cluster (network namespaces, CNI, one
//! ztunnel per node), beside the direct path (pods outside the mesh) in the same run.
//!
//! `cargo bench -p ambit-benches --bench ztunnel_e2e`. Needs root (it builds network
//! namespaces) and `iperf3`; without root it says so and exits 0.
//!
//! - throughput: one iperf3 stream, client pod on node 1, server pod on node 2.
//! - memory: VmRSS of node 1's ztunnel idle with 10 enrolled pods, and its peak
//!   while it carries the iperf3 stream.
//! - connections per second: connect, one 64-byte exchange, close, in a closed loop.
//! - request/response: 64 bytes over one held connection at a fixed rate; latency
//!   percentiles, and ztunnel CPU per 1000 requests.
//!
//! The ztunnels read their state from a local file and sign with a CA root on disk;
//! `AMBIT_BENCH_CONTROL=istiod` runs them against istiod-lite (xDS and CSRs)
//! instead. Under `AMBIT_E2E_ZTUNNEL_WRAPPER` (a profiler, `benches/code-order.sh`)
//! the ztunnels are stopped with SIGTERM at the end, so the profiler writes out
//! everything they ran.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use ambit_benches::cpu::CpuSnapshot;
use ambit_benches::procfs::{cpu_secs, status_kib};
use ambit_benches::report::{Summary, verdict};
use ambit_benches::{Row, Sample, Series, Table};
use ambit_e2e::process::run_output;
use ambit_e2e::{MeshCluster, NsProcess, Pod, PodSpec, WAIT_TIMEOUT};

/// Seconds of each iperf3 run.
const IPERF_SECS: u32 = 5;
/// iperf3 runs per path, alternating direct and mesh.
const IPERF_REPS: usize = 2;
/// Seconds of each connection-rate run, and runs per path.
const CONNS_SECS: u32 = 4;
const CONNS_REPS: usize = 2;
/// Client threads opening connections.
const CONNS_THREADS: usize = 4;
/// Request/response: requests per second and seconds.
const RR_RATE: u32 = 1000;
const RR_SECS: u32 = 5;
/// Enrolled pods on node 1 while idle memory is read.
const IDLE_PODS: usize = 10;
/// Where the servers listen (`bench-load serve` also takes the next port).
const LOAD_PORT: u16 = 9000;
const IPERF_PORT: u16 = 5201;

const LOAD: &str = env!("CARGO_BIN_EXE_bench-load");
/// Runs only the scenarios named here (`stream,conns,rr`; all when unset): one
/// scenario at a time under `perf record`.
const ONLY_ENV: &str = "AMBIT_BENCH_ONLY";

/// A file to copy node 1's idle ztunnel's `/proc/<pid>/smaps` to, for a closer look
/// than the per-mapping summary.
const SMAPS_ENV: &str = "AMBIT_BENCH_SMAPS";

/// Where the ztunnels get state and certificates: `local` (default) or `istiod`.
const CONTROL_ENV: &str = "AMBIT_BENCH_CONTROL";

/// Whether `AMBIT_BENCH_ONLY` lets `scenario` run.
fn selected(scenario: &str) -> bool {
    std::env::var(ONLY_ENV).map_or(true, |only| only.split(',').any(|s| s.trim() == scenario))
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    if !is_root() {
        println!("ztunnel_e2e: skipped, needs root (it builds network namespaces); run as root");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztunnel_e2e: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel_e2e: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The effective uid is 0 (`/proc/self/status`, `Uid:` real effective saved fs).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(2).map(|uid| uid == "0")
        })
        .unwrap_or(false)
}

/// CPU seconds each ztunnel used between two readings (NaN where unreadable).
fn used(before: [Option<f64>; 2], after: [Option<f64>; 2]) -> [f64; 2] {
    [0, 1].map(|i| after[i].zip(before[i]).map_or(f64::NAN, |(a, b)| a - b))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One pair of pods: client on node 1, server on node 2.
#[derive(Debug)]
struct PathPods {
    name: &'static str,
    client: Pod,
    server: Pod,
}

struct Bench {
    direct: PathPods,
    meshed: PathPods,
    ztunnel: [u32; 2],
}

async fn run() -> Result<(), Error> {
    println!("ztunnel_e2e");
    let have_iperf = std::process::Command::new("iperf3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_iperf {
        return Err("iperf3 not found: apt-get install -y iperf3".into());
    }
    let istiod = match std::env::var(CONTROL_ENV).as_deref() {
        Err(_) | Ok("local") => false,
        Ok("istiod") => true,
        Ok(other) => return Err(format!("{CONTROL_ENV}={other}: local or istiod").into()),
    };
    let wrapped = ambit_e2e::mesh::ztunnel_wrapper().is_some();
    // Builds ztunnel and the CNI plugin in release first if they are stale.
    let mut mesh = if istiod {
        MeshCluster::start(2).await?
    } else {
        MeshCluster::start_local(2).await?
    };
    let ztunnel = [
        mesh.nodes[0].ztunnel.pid().ok_or("ztunnel 1 has no pid")?,
        mesh.nodes[1].ztunnel.pid().ok_or("ztunnel 2 has no pid")?,
    ];
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", ztunnel[0])).unwrap_or_default();
    if comm.trim() != "ztunnel" && !wrapped {
        return Err(format!("pid {} is {comm:?}, not ztunnel", ztunnel[0]).into());
    }
    let rss_empty = status_kib(ztunnel[0], "VmRSS:").ok_or("no VmRSS for ztunnel 1")?;
    let out = |name: &str, node| {
        PodSpec::new(name, node)
            .namespace("bench")
            .cni_arg("AMBIT_ENROLL", "false")
    };
    let direct = PathPods {
        name: "direct",
        client: mesh.add_pod(out("direct-client", 1)).await?,
        server: mesh.add_pod(out("direct-server", 2)).await?,
    };
    let meshed = PathPods {
        name: "mesh",
        client: mesh
            .add_pod(PodSpec::new("mesh-client", 1).namespace("bench"))
            .await?,
        server: mesh
            .add_pod(PodSpec::new("mesh-server", 2).namespace("bench"))
            .await?,
    };
    // The mesh client is the first of the enrolled pods on node 1.
    for i in 1..IDLE_PODS {
        mesh.add_pod(PodSpec::new(format!("idle-{i}"), 1).namespace("bench"))
            .await?;
    }
    if !istiod {
        mesh.write_state("").await?;
    }
    let busy_before = CpuSnapshot::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_busy = busy_before
        .zip(CpuSnapshot::now())
        .and_then(|(a, b)| a.until(&b))
        .map(|u| u.process + u.others);
    let rss_idle = status_kib(ztunnel[0], "VmRSS:").ok_or("no VmRSS for ztunnel 1")?;
    println!(
        "ztunnel {} ({}, state from {}), node 1 VmRSS: {:.2} MiB with no pods, {:.2} MiB idle with {IDLE_PODS} enrolled pods",
        workspace_profile(),
        ambit_e2e::workspace_bin("ztunnel").display(),
        if istiod {
            "istiod-lite"
        } else {
            "a local file"
        },
        mib(rss_empty),
        mib(rss_idle),
    );
    let split =
        |field| status_kib(ztunnel[0], field).map_or("-".into(), |k| format!("{:.2}", mib(k)));
    println!(
        "ztunnel 1 idle: RssAnon {} MiB, RssFile {} MiB, RssShmem {} MiB, {} threads",
        split("RssAnon:"),
        split("RssFile:"),
        split("RssShmem:"),
        status_kib(ztunnel[0], "Threads:").unwrap_or(0),
    );
    if let Some(maps) = ambit_benches::smaps::rss_by_mapping(ztunnel[0]) {
        let maps: Vec<String> = maps.iter().map(ToString::to_string).collect();
        println!(
            "ztunnel 1 idle, RSS per mapping (count): {}",
            maps.join(", ")
        );
    }
    if let Some(path) = std::env::var_os(SMAPS_ENV) {
        std::fs::copy(format!("/proc/{}/smaps", ztunnel[0]), &path)?;
    }
    if let Some(busy) = idle_busy {
        println!("machine busy while the cluster was idle: {busy:.2} cores");
        if busy > 0.1 {
            println!(
                "warning: other processes are using the machine; rerun on a quiet machine before recording these numbers"
            );
        }
    }
    let bench = Bench {
        direct,
        meshed,
        ztunnel,
    };
    let mut servers = Vec::new();
    for pods in [&bench.direct, &bench.meshed] {
        servers.push(start_load_server(&pods.server).await?);
    }

    let stream = if selected("stream") {
        Some(throughput(&bench).await?)
    } else {
        None
    };
    let conns = if selected("conns") {
        Some(conn_rate(&bench).await?)
    } else {
        None
    };
    let rr = if selected("rr") {
        Some(request_response(&bench).await?)
    } else {
        None
    };
    drop(servers);
    if wrapped {
        for node in &mut mesh.nodes {
            node.ztunnel.terminate(Duration::from_secs(120)).await?;
        }
    }
    // The cluster goes last: every process above runs in its namespaces.
    drop(mesh);

    println!();
    let mut summary = Summary::default();
    if let Some((row, rss_bulk)) = stream {
        let table = Table { rows: vec![row] };
        print!("{table}");
        println!();
        summary.ratio_row(
            "1 stream node 1 -> 2, Gbit/s",
            table.rows[0].direct.median(),
            table.rows[0].mesh.median(),
            ">= 0.40 x direct",
            |r| r >= 0.40,
        );
        summary.line(
            "ztunnel 1 VmRSS max, 1 stream",
            "-".into(),
            format!("{:.2} MiB", mib(rss_bulk[0])),
            "< 20 MB".into(),
            verdict(rss_bulk[0] as f64 * 1024.0 < 20e6),
        );
        // The receiving end holds what its pod has not read yet: the aim is
        // for both.
        summary.line(
            "ztunnel 2 VmRSS max, 1 stream",
            "-".into(),
            format!("{:.2} MiB", mib(rss_bulk[1])),
            "< 20 MB".into(),
            verdict(rss_bulk[1] as f64 * 1024.0 < 20e6),
        );
    }
    summary.line(
        "ztunnel 1 VmRSS idle, 10 pods",
        "-".into(),
        format!("{:.2} MiB", mib(rss_idle)),
        "< 8 MB".into(),
        verdict(rss_idle as f64 * 1024.0 < 8e6),
    );
    if let Some(conns) = conns {
        summary.ratio_row(
            "new connections / s",
            Some(conns.0),
            Some(conns.1),
            ">= 0.45 x direct",
            |r| r >= 0.45,
        );
    }
    if let Some(rr) = rr {
        rr_lines(&mut summary, &rr);
    }
    print!("{summary}");
    Ok(())
}

/// The request/response lines of the summary: added latency against the targets,
/// and ztunnel CPU per 1000 requests.
fn rr_lines(summary: &mut Summary, rr: &RrResult) {
    let [d, m] = &rr.latency;
    for (label, i, limit) in [("p50", 0, 60.0), ("p99", 2, 150.0)] {
        let added = m[i] - d[i];
        summary.line(
            &format!("64 B rr at {RR_RATE}/s, {label} us"),
            format!("{:.1}", d[i]),
            format!("{:.1}", m[i]),
            format!("added < {limit:.0} us"),
            format!("{} (+{added:.1} us)", verdict(added < limit)),
        );
    }
    summary.line(
        "64 B rr, ztunnel CPU s / 1000 req",
        "-".into(),
        format!("{:.4}", rr.cpu_per_1000),
        "-".into(),
        format!(
            "node 1 {:.4} + node 2 {:.4}",
            rr.cpu_split[0], rr.cpu_split[1]
        ),
    );
}

fn workspace_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    }
}

async fn start_load_server(pod: &Pod) -> Result<NsProcess, Error> {
    let mut cmd = pod.command(LOAD);
    cmd.arg("serve").arg(LOAD_PORT.to_string());
    let mut server = NsProcess::spawn(format!("bench-load serve in {}", pod.name()), cmd)?;
    server
        .wait_for_line("`listening`", WAIT_TIMEOUT, |l| l.starts_with("listening "))
        .await?;
    Ok(server)
}

/// Samples both ztunnels' VmRSS every 20 ms until stopped; returns the peaks in KiB.
fn sample_rss(
    pids: [u32; 2],
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<[u64; 2]>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut peak = [0u64; 2];
        loop {
            for (p, pid) in peak.iter_mut().zip(pids) {
                *p = (*p).max(status_kib(pid, "VmRSS:").unwrap_or(0));
            }
            tokio::select! {
                _ = &mut stopped => return peak,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    (stop, task)
}

async fn iperf_once(pods: &PathPods) -> Result<Sample, Error> {
    let mut cmd = pods.server.command("iperf3");
    cmd.args(["-s", "-1", "-p", &IPERF_PORT.to_string()]);
    let mut server = NsProcess::spawn(format!("iperf3 -s in {}", pods.server.name()), cmd)?;
    let addr = pods.server.ip().to_string();
    let mut last_err = String::new();
    // The server prints `Server listening` only when its stdout is flushed: retry the
    // client instead of waiting for the line.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut cmd = pods.client.command("iperf3");
        cmd.args(["-c", &addr, "-p", &IPERF_PORT.to_string(), "-J", "-t"])
            .arg(IPERF_SECS.to_string());
        let label = format!("iperf3 -c in {}", pods.client.name());
        match run_output(&label, cmd, Duration::from_secs(u64::from(IPERF_SECS) + 30)).await {
            Ok(json) => {
                let _ = server.wait(Duration::from_secs(5)).await;
                return parse_iperf(&json);
            }
            Err(e) => last_err = e.to_string(),
        }
    }
    Err(format!("iperf3 {}: {last_err}", pods.name).into())
}

fn parse_iperf(json: &str) -> Result<Sample, Error> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let sum = &v["end"]["sum_received"];
    let bytes = sum["bytes"]
        .as_u64()
        .ok_or("iperf3 JSON: no end.sum_received.bytes")?;
    let secs = sum["seconds"]
        .as_f64()
        .ok_or("iperf3 JSON: no end.sum_received.seconds")?;
    Ok(Sample {
        bytes,
        elapsed: Duration::from_secs_f64(secs),
        cpu: None,
    })
}

/// Throughput of both paths, and both ztunnels' peak VmRSS during the mesh runs.
async fn throughput(bench: &Bench) -> Result<(Row, [u64; 2]), Error> {
    let mut row = Row {
        scenario: "1 stream, node 1 -> node 2 (iperf3)".into(),
        direct: Series::default(),
        mesh: Series::default(),
    };
    let mut peak = [0u64; 2];
    for rep in 1..=IPERF_REPS {
        let d = iperf_once(&bench.direct).await?;
        let (stop, sampler) = sample_rss(bench.ztunnel);
        let cpu_before = bench.ztunnel.map(cpu_secs);
        let wall = std::time::Instant::now();
        let m = iperf_once(&bench.meshed).await;
        let wall = wall.elapsed().as_secs_f64();
        let cores = used(cpu_before, bench.ztunnel.map(cpu_secs)).map(|c| c / wall);
        let _ = stop.send(());
        let p = sampler.await?;
        let m = m?;
        for (a, b) in peak.iter_mut().zip(p) {
            *a = (*a).max(b);
        }
        println!(
            "  iperf3 #{rep}: direct {:.2} Gbit/s, mesh {:.2} Gbit/s, ztunnel VmRSS peak {:.2} / {:.2} MiB, \
             ztunnel cores {:.2} / {:.2} (whole mesh run, iperf3 start-up included)",
            d.gbit_per_s(),
            m.gbit_per_s(),
            mib(p[0]),
            mib(p[1]),
            cores[0],
            cores[1],
        );
        row.direct.push(d);
        row.mesh.push(m);
    }
    Ok((row, peak))
}

fn load_addr(pods: &PathPods, port: u16) -> SocketAddr {
    SocketAddr::from((pods.server.ip(), port))
}

async fn conns_once(pods: &PathPods) -> Result<f64, Error> {
    let mut cmd = pods.client.command(LOAD);
    cmd.arg("conns")
        .arg(load_addr(pods, LOAD_PORT + 1).to_string())
        .arg(CONNS_SECS.to_string())
        .arg(CONNS_THREADS.to_string());
    let label = format!("bench-load conns in {}", pods.client.name());
    let out = run_output(&label, cmd, Duration::from_secs(u64::from(CONNS_SECS) + 30)).await?;
    let mut f = out.split_whitespace().skip_while(|w| *w != "conns").skip(1);
    let count: f64 = f.next().ok_or("no count")?.parse()?;
    let secs: f64 = f.next().ok_or("no seconds")?.parse()?;
    Ok(count / secs)
}

/// Median connections per second, direct and mesh.
async fn conn_rate(bench: &Bench) -> Result<(f64, f64), Error> {
    let (mut direct, mut mesh) = (Vec::new(), Vec::new());
    for rep in 1..=CONNS_REPS {
        let d = conns_once(&bench.direct).await?;
        let cpu_before = bench.ztunnel.map(cpu_secs);
        let m = conns_once(&bench.meshed).await?;
        let per_conn = used(cpu_before, bench.ztunnel.map(cpu_secs))
            .map(|c| c / (m * f64::from(CONNS_SECS)) * 1e6);
        println!(
            "  conns #{rep}: direct {d:.0}/s, mesh {m:.0}/s, ztunnel CPU per mesh connection {:.0} / {:.0} us",
            per_conn[0], per_conn[1]
        );
        direct.push(d);
        mesh.push(m);
    }
    Ok((median(direct), median(mesh)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

struct RrResult {
    /// Direct, mesh: p50, p90, p99, max in microseconds.
    latency: [[f64; 4]; 2],
    cpu_per_1000: f64,
    cpu_split: [f64; 2],
}

async fn rr_once(pods: &PathPods) -> Result<(u64, [f64; 4]), Error> {
    let mut cmd = pods.client.command(LOAD);
    cmd.arg("rr")
        .arg(load_addr(pods, LOAD_PORT).to_string())
        .arg(RR_RATE.to_string())
        .arg(RR_SECS.to_string());
    let label = format!("bench-load rr in {}", pods.client.name());
    let out = run_output(&label, cmd, Duration::from_secs(u64::from(RR_SECS) + 30)).await?;
    let words: Vec<&str> = out
        .split_whitespace()
        .skip_while(|w| *w != "rr")
        .skip(1)
        .collect();
    if words.len() < 5 {
        return Err(format!("bench-load rr: unexpected output {out:?}").into());
    }
    let count: u64 = words[0].parse()?;
    let mut p = [0.0; 4];
    for (v, w) in p.iter_mut().zip(&words[1..5]) {
        *v = w.parse()?;
    }
    Ok((count, p))
}

async fn request_response(bench: &Bench) -> Result<RrResult, Error> {
    let (_, d) = rr_once(&bench.direct).await?;
    let before = bench.ztunnel.map(cpu_secs);
    let (count, m) = rr_once(&bench.meshed).await?;
    let after = bench.ztunnel.map(cpu_secs);
    let mut split = [0.0; 2];
    for (i, s) in split.iter_mut().enumerate() {
        let used = after[i].zip(before[i]).map_or(f64::NAN, |(a, b)| a - b);
        *s = used / count.max(1) as f64 * 1000.0;
    }
    let show = |p: &[f64; 4]| {
        format!(
            "p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} us",
            p[0], p[1], p[2], p[3]
        )
    };
    println!("  rr direct: {}", show(&d));
    println!("  rr mesh:   {}", show(&m));
    Ok(RrResult {
        latency: [d, m],
        cpu_per_1000: split[0] + split[1],
        cpu_split: split,
    })
}
