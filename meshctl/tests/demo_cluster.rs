//! Runs the README's main command, `meshctl demo`, briefly (two rounds) as root, as
//! a newcomer would, and checks what it shows: the frontend's request to the
//! reviews VIP carried with both identities, the legacy client refused with the
//! policy named, and nothing left behind.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// The demo builds the mesh binaries on a first run; this bounds a hung demo.
const DEMO_TIMEOUT: Duration = Duration::from_secs(900);
/// How long a hung demo gets to tear down after its SIGINT before it is killed.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits up to `timeout` for `child` to exit.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for meshctl") {
            return Some(status);
        }
        if started.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A demo that did not finish in time: SIGINT (a user's Ctrl-C, so it tears down),
/// SIGKILL of its process group if that hangs too, then the sweep of what a dead
/// demo leaves (namespaces with their processes, temp dirs); then the test fails.
fn stop_hung_demo(child: &mut Child) -> ! {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let _gone = signal::kill(pid, Signal::SIGINT);
    let ended = match wait_bounded(child, TEARDOWN_TIMEOUT) {
        Some(status) => format!("it then exited ({status}) after SIGINT"),
        None => {
            // Its process group, and every descendant in another group: the
            // `cargo build` of a first run has a group of its own (so the demo can
            // cancel it) and would otherwise keep running, holding the build lock.
            let tree = freeze_descendants(pid);
            let _gone = signal::killpg(pid, Signal::SIGKILL);
            for p in tree {
                let _gone = signal::kill(p, Signal::SIGKILL);
            }
            let status = child.wait().expect("reap meshctl");
            format!("it ignored SIGINT for {TEARDOWN_TIMEOUT:?} and was killed ({status})")
        }
    };
    let swept = ambit_e2e::naming::sweep_stale();
    panic!("meshctl demo still running after {DEMO_TIMEOUT:?}; {ended}; swept {swept:?}");
}

/// The parent pid of `pid` (field 4 of `/proc/<pid>/stat`).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields count from after the command name's closing parenthesis (field 3).
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Stops (SIGSTOP) `root` and all its descendants, until no new one appears (a
/// stopped process cannot fork), and returns the descendants.
fn freeze_descendants(root: Pid) -> Vec<Pid> {
    let _gone = signal::kill(root, Signal::SIGSTOP);
    let mut tree: Vec<i32> = vec![root.as_raw()];
    loop {
        let found: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|p| !tree.contains(p))
            .filter(|p| parent_of(*p).is_some_and(|parent| tree.contains(&parent)))
            .collect();
        if found.is_empty() {
            return tree[1..].iter().map(|p| Pid::from_raw(*p)).collect();
        }
        for p in &found {
            let _gone = signal::kill(Pid::from_raw(*p), Signal::SIGSTOP);
        }
        tree.extend(found);
    }
}

/// Runs `meshctl` with `args`; returns its pid, exit success, stdout and stderr.
fn run_meshctl(args: &[&str]) -> (u32, bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so a hung demo can be killed with the processes it
        // started in it (its build, in a group of its own, is killed as a descendant).
        .process_group(0)
        .spawn()
        .expect("run meshctl");
    let pid = child.id();
    // Read both pipes while waiting, so a chatty demo never blocks on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).map(|_| s)
    });
    let Some(status) = wait_bounded(&mut child, DEMO_TIMEOUT) else {
        stop_hung_demo(&mut child);
    };
    let out = out.join().expect("stdout reader").unwrap_or_default();
    let err = err.join().expect("stderr reader").unwrap_or_default();
    (pid, status.success(), out, err)
}

#[test]
fn the_demo_shows_identities_and_a_refusal_and_leaves_nothing_behind() {
    if !ambit_e2e::require_root("the_demo_shows_identities_and_a_refusal_and_leaves_nothing_behind")
    {
        return;
    }
    let (pid, ok, stdout, stderr) = run_meshctl(&["demo", "--rounds", "2", "--interval", "200ms"]);
    assert!(ok, "meshctl demo failed:\n{stdout}\n--- stderr:\n{stderr}");
    let shown = format!("{stdout}\n--- stderr:\n{stderr}");

    // The frontend's requests to the reviews VIP: answered, and carried with both
    // identities (either version may serve a request).
    assert!(
        stdout.contains("frontend -> reviews (VIP): reply received"),
        "{shown}"
    );
    assert!(
        stdout.lines().any(|l| {
            l.contains(
                "ztunnel: frontend (spiffe://cluster.local/ns/shop/sa/frontend) -> reviews-v",
            ) && l.contains("(spiffe://cluster.local/ns/shop/sa/reviews)")
        }),
        "no connection from the frontend to reviews with both identities:\n{shown}"
    );
    // The legacy client, outside the mesh, is refused by the policy, named. Its
    // address is in the demo's table of pods.
    let legacy_ip = stdout
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("legacy-client"))
                .then(|| words.last())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no legacy-client in the table of pods:\n{shown}"));
    assert!(
        stdout.lines().any(|l| {
            l.contains("ztunnel REFUSED")
                && l.contains(&format!("{legacy_ip}:"))
                && l.contains("shop/reviews-callers")
        }),
        "no refusal of {legacy_ip} naming shop/reviews-callers:\n{shown}"
    );
    assert!(
        !stdout.contains("legacy-client -> reviews-v1: reply received"),
        "{shown}"
    );
    assert!(stdout.contains("-- round 2"), "{shown}");
    assert!(stdout.contains("done: nothing left behind."), "{shown}");

    // And indeed: no network namespace of the demo's process remains.
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let ours = format!("ambit-e2e-{pid}-");
    let left: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| l.starts_with(&ours))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "the demo left namespaces behind: {left:?}");
    let temp: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&ours))
                .collect()
        })
        .unwrap_or_default();
    assert!(temp.is_empty(), "the demo left files behind: {temp:?}");
}
