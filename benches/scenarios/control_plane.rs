//! Scenario: the control plane under a cluster's worth of config and proxies. The
//! real istiod-lite (release build) serves a generated directory of 10,000 pods,
//! 1,000 services and 200 AuthorizationPolicies on 1,000 nodes to 1,000 delta xDS
//! clients in this process ([`ambit_benches::xds_load`]), one connection each.
//!
//! `cargo bench -p ambit-benches --bench control_plane` (`AMBIT_BENCH_QUICK=1`: 50
//! nodes; `AMBIT_BENCH_NODES=<n>`: the full config on `n` nodes, for per-client
//! costs). Measures the initial sync, then per change (one pod added, one policy
//! rewritten) the time from the file write until every client has ACKed it, the
//! bytes pushed, and istiod-lite's memory and CPU. There is no direct path for a
//! control plane: the reference is the floor set by the poll and debounce times.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use ambit_benches::Settings;
use ambit_benches::cluster_yaml::{
    Change, Scale, added_pod, changed_policy, write_atomic, write_cluster,
};
use ambit_benches::cpu::CpuSnapshot;
use ambit_benches::istiod::{self, Addrs, Istiod, metric_sum, wait_all_acked};
use ambit_benches::procfs;
use ambit_benches::xds_load::{Fleet, FleetSpec, TYPE_URLS};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::time::{Instant, sleep};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How often istiod-lite looks at the config directory (the setting).
const CONFIG_POLL: Duration = Duration::from_millis(100);
/// istiod-lite's default debounce quiet time, passed explicitly.
const DEBOUNCE_QUIET: Duration = Duration::from_millis(100);
/// After a change has reached every client: time for trailing pushes and ACKs
/// before the byte and CPU counters are read.
const SETTLE: Duration = Duration::from_millis(500);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// The aims.
const TARGET_P99: Duration = Duration::from_secs(1);
const TARGET_RSS_MIB: f64 = 300.0;
/// Overrides the number of nodes (one client each), keeping the rest of the scale.
const NODES: &str = "AMBIT_BENCH_NODES";
/// Bytes pushed, all types: resource bodies and names, as istiod-lite counts them.
const SENT_BYTES: &str = "istiod_xds_sent_bytes_total";

fn main() -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("control_plane: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("control_plane: tokio runtime");
    // Ctrl-C ends `run` early, so istiod-lite's guard still kills it.
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(&settings) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("control_plane: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: &Settings) -> Result<(), Error> {
    let mut scale = if settings.quick {
        Scale::QUICK
    } else {
        Scale::FULL
    };
    // Fewer nodes (and so clients) over the same config: per-client costs.
    if let Ok(nodes) = std::env::var(NODES) {
        scale.nodes = nodes
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{NODES}={nodes}: not a positive number"))?;
    }
    println!("control_plane");
    println!(
        "istiod-lite with {} pods, {} services, {} policies in {} namespaces on {} nodes; {} delta xDS clients in this process",
        scale.pods(),
        scale.services,
        scale.policies,
        scale.namespaces,
        scale.nodes,
        scale.nodes
    );
    raise_nofile()?;
    let binary = istiod::release_binary()?;
    let idle = machine_busy(Duration::from_secs(1)).await;
    println!("machine busy before the run: {idle:.2} cores");

    let dir = tempfile::Builder::new()
        .prefix("ambit-bench-control-plane-")
        .tempdir()?;
    let config = dir.path().join("config");
    let tokens = write_cluster(dir.path(), &config, scale)?;
    let run_start = CpuSnapshot::now();
    let started = Instant::now();
    let istiod = Istiod::start(
        &binary,
        &istiod_args(dir.path(), &config),
        &dir.path().join("log"),
    )?;
    let addrs = istiod.wait_serving(Duration::from_secs(60)).await?;
    let expected: Vec<(&str, usize)> = TYPE_URLS.into_iter().zip(scale.expected()).collect();
    istiod
        .wait_loaded(&addrs, &expected, Duration::from_secs(300))
        .await?;
    let mut rss = Rss::default();
    rss.loaded = rss.sample(&istiod);
    println!(
        "istiod-lite {}: config read and translated in {:.2} s, VmRSS {:.1} MiB, CPU {:.2} s",
        binary.display(),
        started.elapsed().as_secs_f64(),
        mib(rss.loaded),
        istiod.cpu_secs()
    );

    // The initial sync: every client connects at once and takes everything.
    let roots_pem = std::fs::read(dir.path().join("ca").join("root-cert.pem"))?;
    let spec = FleetSpec {
        address: addrs.grpc.clone(),
        identity: "spiffe://cluster.local/ns/istio-system/sa/istiod-lite".parse()?,
        roots: CertificateDer::pem_slice_iter(&roots_pem).collect::<Result<_, _>>()?,
        nodes: tokens,
        expected: scale.expected(),
        connect_timeout: Duration::from_secs(60),
    };
    let before = Counters::read(&istiod, &addrs).await?;
    let fleet = Fleet::start(spec)?;
    let initial_timeout = Duration::from_secs(if settings.quick { 60 } else { 900 });
    let initial = fleet.wait_initial(initial_timeout).await?;
    let sync_time = initial.last().copied().unwrap_or_default();
    sleep(SETTLE).await;
    let after = Counters::read(&istiod, &addrs).await?;
    let unacked = wait_all_acked(&addrs, fleet.len(), Duration::from_secs(30)).await?;
    rss.synced = rss.sample(&istiod);
    let sync_bytes = after.sent_bytes - before.sent_bytes;
    println!(
        "initial sync: {} clients in {:.2} s (per client p50 {:.2} s, p99 {:.2} s); {} pushed, {} per client; istiod CPU {:.2} s, this process {:.2} s; VmRSS {:.1} MiB{}",
        fleet.len(),
        sync_time.as_secs_f64(),
        percentile(&initial, 0.50).as_secs_f64(),
        percentile(&initial, 0.99).as_secs_f64(),
        format_bytes(sync_bytes),
        format_bytes(sync_bytes / fleet.len().max(1) as f64),
        after.istiod_cpu - before.istiod_cpu,
        after.own_cpu - before.own_cpu,
        mib(rss.synced),
        acked_note(unacked),
    );

    // The changes, alternating: one pod added, one policy rewritten.
    let (mut pod_added, mut policy_changed) = (Vec::new(), Vec::new());
    for rep in 0..settings.repetitions {
        // Writes at phases spread over the poll period: a run's cycle is otherwise
        // locked to the poll ticker and every change would wait the same.
        let phase = CONFIG_POLL.mul_f64(rep as f64 / settings.repetitions.max(1) as f64);
        sleep(phase).await;
        let m = measure_change(&istiod, &addrs, &fleet, &config, &added_pod(scale, rep)).await?;
        m.print("pod added", rep + 1, fleet.len());
        pod_added.push(m);
        let change = changed_policy(scale, rep);
        sleep(phase).await;
        let m = measure_change(&istiod, &addrs, &fleet, &config, &change).await?;
        m.print("policy changed", rep + 1, fleet.len());
        policy_changed.push(m);
        rss.sample(&istiod);
    }
    let end = rss.sample(&istiod);
    let (anon, file) = (istiod.status_kib("RssAnon:"), istiod.status_kib("RssFile:"));
    let peak = mib(rss.peak.max(istiod.status_kib("VmHWM:")));
    let load_rss = procfs::status_kib(std::process::id(), "VmRSS:").unwrap_or(0);
    drop(fleet);
    // What stays once every stream is closed: per-client state, or not.
    sleep(Duration::from_secs(2)).await;
    let left = istiod.status_kib("VmRSS:");
    let still_connected = metric_sum(&addrs, "istiod_xds_connected_clients").await?;
    let istiod_cpu = istiod.cpu_secs();
    let elapsed = started.elapsed().as_secs_f64();
    drop(istiod);
    let others = run_start
        .zip(CpuSnapshot::now())
        .and_then(|(a, b)| a.until(&b))
        .map(|u| (u.others - istiod_cpu / elapsed).max(0.0));

    println!();
    println!(
        "floor (no direct path for a control plane): the config poll every {} ms (a change waits 0-{} ms to be seen) + the debounce quiet time {} ms = {}-{} ms",
        CONFIG_POLL.as_millis(),
        CONFIG_POLL.as_millis(),
        DEBOUNCE_QUIET.as_millis(),
        DEBOUNCE_QUIET.as_millis(),
        (DEBOUNCE_QUIET + CONFIG_POLL).as_millis()
    );
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>12} {:>11} {:>12} {:>5}",
        "scenario", "p50 ms", "p99 ms", "max ms", "bytes pushed", "istiod CPU", "target", "met?"
    );
    for (name, runs) in [
        ("pod added", &pod_added),
        ("policy changed", &policy_changed),
    ] {
        println!("{}", ChangeMeasure::row(name, runs));
    }
    println!(
        "{:<28} {:>8.0} {:>8.0} {:>8.0} {:>12} {:>10.2}s",
        "initial sync, per client",
        ms(percentile(&initial, 0.50)),
        ms(percentile(&initial, 0.99)),
        ms(sync_time),
        format_bytes(sync_bytes),
        after.istiod_cpu - before.istiod_cpu,
    );
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>12} {:>10.2}s {:>12} {:>5}",
        "istiod-lite VmRSS peak, MiB",
        "",
        "",
        format!("{peak:.1}"),
        "",
        istiod_cpu,
        format!("< {TARGET_RSS_MIB:.0} MiB"),
        yes_no(peak < TARGET_RSS_MIB)
    );
    println!(
        "istiod-lite VmRSS: {:.1} MiB with the config loaded, {:.1} MiB after the initial sync, {:.1} MiB at the end (RssAnon {:.1}, RssFile {:.1}), {:.1} MiB 2 s after the clients left ({} still connected); CPU {:.2} s over the whole run",
        mib(rss.loaded),
        mib(rss.synced),
        mib(end),
        mib(anon),
        mib(file),
        mib(left),
        still_connected,
        istiod_cpu
    );
    println!("this process (the load) VmRSS: {:.1} MiB", mib(load_rss));
    if let Some(others) = others {
        println!("other processes during the run: {others:.2} cores");
        if others > 0.1 {
            println!(
                "warning: other processes used {others:.2} cores during the run: not to be recorded"
            );
        }
    }
    Ok(())
}

/// istiod-lite's flags, but for its listeners.
fn istiod_args(root: &Path, config: &Path) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        "--config-dir".into(),
        path(config),
        "--config-poll".into(),
        format!("{}ms", CONFIG_POLL.as_millis()),
        "--debounce-quiet".into(),
        format!("{}ms", DEBOUNCE_QUIET.as_millis()),
        "--ca-dir".into(),
        path(&root.join("ca")),
        "--node-tokens".into(),
        path(&root.join("node-tokens")),
    ]
}

/// Raises the soft limit on open files to the hard limit: 1,000 client sockets
/// here, and istiod-lite (which inherits the limit) holds the other 1,000 ends.
fn raise_nofile() -> Result<(), Error> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    println!("open files: soft limit {hard} (was {soft}), hard {hard}");
    Ok(())
}

/// Cores busy on the machine over `window`.
async fn machine_busy(window: Duration) -> f64 {
    let before = CpuSnapshot::now();
    sleep(window).await;
    before
        .zip(CpuSnapshot::now())
        .and_then(|(a, b)| a.until(&b))
        .map_or(f64::NAN, |u| u.others + u.process)
}

/// istiod-lite's resident memory at the phases of the run, in KiB.
#[derive(Debug, Default)]
struct Rss {
    loaded: u64,
    synced: u64,
    peak: u64,
}

impl Rss {
    fn sample(&mut self, istiod: &Istiod) -> u64 {
        let now = istiod.status_kib("VmRSS:");
        self.peak = self.peak.max(now);
        now
    }
}

/// The counters read around a phase.
#[derive(Debug)]
struct Counters {
    sent_bytes: f64,
    /// `istiod_xds_push_latency_seconds` sum and count: store change to the
    /// response handed to a client's stream.
    push_secs: f64,
    pushes: f64,
    istiod_cpu: f64,
    own_cpu: f64,
}

impl Counters {
    async fn read(istiod: &Istiod, addrs: &Addrs) -> Result<Self, Error> {
        Ok(Self {
            sent_bytes: metric_sum(addrs, SENT_BYTES).await?,
            push_secs: metric_sum(addrs, "istiod_xds_push_latency_seconds_sum").await?,
            pushes: metric_sum(addrs, "istiod_xds_push_latency_seconds_count").await?,
            istiod_cpu: istiod.cpu_secs(),
            own_cpu: procfs::cpu_secs(std::process::id()).unwrap_or(0.0),
        })
    }
}

/// What one change cost.
#[derive(Debug)]
struct ChangeMeasure {
    /// Per client, from the file write to the ACK of the last watched resource; sorted.
    latencies: Vec<Duration>,
    sent_bytes: f64,
    /// Mean time from istiod-lite's store change to a response on a stream.
    mean_push: Duration,
    responses: u64,
    istiod_cpu: f64,
    unacked: usize,
}

impl ChangeMeasure {
    fn print(&self, what: &str, rep: usize, clients: usize) {
        println!(
            "  {what} #{rep}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (istiod store change to stream: mean {:.0} ms); {} pushed ({} per client, {} responses); istiod CPU {:.3} s{}",
            ms(percentile(&self.latencies, 0.50)),
            ms(percentile(&self.latencies, 0.99)),
            ms(self.latencies.last().copied().unwrap_or_default()),
            ms(self.mean_push),
            format_bytes(self.sent_bytes),
            format_bytes(self.sent_bytes / clients.max(1) as f64),
            self.responses,
            self.istiod_cpu,
            acked_note(self.unacked)
        );
    }

    /// The summary line: medians over the runs, and the max of the maxima; the
    /// target is met when the worst run's p99 is under it.
    fn row(name: &str, runs: &[ChangeMeasure]) -> String {
        let median = |f: &dyn Fn(&ChangeMeasure) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let p99 = |m: &ChangeMeasure| ms(percentile(&m.latencies, 0.99));
        let worst_p99 = runs.iter().map(p99).fold(0.0, f64::max);
        let max = runs
            .iter()
            .filter_map(|m| m.latencies.last())
            .map(|d| ms(*d))
            .fold(0.0, f64::max);
        format!(
            "{:<28} {:>8.0} {:>8.0} {:>8.0} {:>12} {:>10.3}s {:>12} {:>5}",
            format!("{name} ({} runs)", runs.len()),
            median(&|m| ms(percentile(&m.latencies, 0.50))),
            median(&p99),
            max,
            format_bytes(median(&|m| m.sent_bytes)),
            median(&|m| m.istiod_cpu),
            format!("p99 < {} ms", TARGET_P99.as_millis()),
            yes_no(!runs.is_empty() && worst_p99 < ms(TARGET_P99)),
        )
    }
}

/// Applies one change and times it to its last client's ACK.
async fn measure_change(
    istiod: &Istiod,
    addrs: &Addrs,
    fleet: &Fleet,
    config: &Path,
    change: &Change,
) -> Result<ChangeMeasure, Error> {
    let before = Counters::read(istiod, addrs).await?;
    let responses_before = fleet.totals().responses;
    fleet.watch(&change.watched);
    write_atomic(&config.join(&change.file), &change.text)?;
    let written = Instant::now();
    let latencies = fleet.wait_watch(written, CHANGE_TIMEOUT).await?;
    sleep(SETTLE).await;
    let after = Counters::read(istiod, addrs).await?;
    let unacked = wait_all_acked(addrs, fleet.len(), Duration::from_secs(10)).await?;
    Ok(ChangeMeasure {
        latencies,
        sent_bytes: after.sent_bytes - before.sent_bytes,
        mean_push: Duration::from_secs_f64(
            (after.push_secs - before.push_secs) / (after.pushes - before.pushes).max(1.0),
        ),
        responses: fleet.totals().responses - responses_before,
        istiod_cpu: after.istiod_cpu - before.istiod_cpu,
        unacked,
    })
}

fn acked_note(unacked: usize) -> String {
    if unacked == 0 {
        "; istiod sees every client ACKed".into()
    } else {
        format!("; istiod sees {unacked} clients NOT fully ACKed")
    }
}

/// Nearest-rank percentile of sorted durations.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn format_bytes(bytes: f64) -> String {
    match bytes {
        b if b >= 1048576.0 => format!("{:.1} MiB", b / 1048576.0),
        b if b >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
        b => format!("{b:.0} B"),
    }
}

fn yes_no(met: bool) -> &'static str {
    if met { "yes" } else { "no" }
}
