//! The workspace's binaries the mesh runs (`ztunnel`, `ambit-cni`, `e2e-tool`,
//! `istiod-lite`): found next to the running executable, and built first (once per
//! process) when missing or older than their sources, so a test or the demo never
//! runs stale ones.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The checkout this library was compiled from.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The pid of the `cargo build` [`workspace_bin`] is waiting for, or 0.
static BUILDING: AtomicU32 = AtomicU32::new(0);

/// Stops the build [`workspace_bin`] may be waiting for (it then fails), for a
/// caller interrupted meanwhile: the build is not left running behind it.
pub fn cancel_build() {
    let pid = BUILDING.load(Ordering::SeqCst);
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // The build's whole process group: cargo and the compilers it runs.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// The workspace's binaries (`ztunnel`, `ambit-cni`, `e2e-tool`), built once per
/// test process so a test never runs stale ones.
pub fn workspace_bin(name: &str) -> PathBuf {
    // Tests run from target/<profile>/deps/, benchmarks from target/release/deps/
    // (and measure release binaries), `meshctl demo` from target/<profile>/.
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("target dir").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let release = dir.file_name().is_some_and(|n| n == "release");
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        // `cargo test --workspace` has built them already; a nested build would
        // resolve features without dev-dependencies and rebuild half the tree.
        let names = ["ztunnel", "ambit-cni", "e2e-tool", "istiod-lite"];
        if names.iter().all(|n| is_fresh(&dir.join(n))) {
            return Ok(());
        }
        let root = workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        // From the checkout, whatever the caller's directory: Cargo reads
        // .cargo/config.toml (the build target, hence where the binaries land)
        // from the directory it runs in, not from the manifest's.
        cmd.current_dir(&root)
            .arg("build")
            .arg("--manifest-path")
            .arg(root.join("Cargo.toml"))
            .args(["--quiet", "--bins"])
            .args(["-p", "ztunnel", "-p", "ambit-cni", "-p", "ambit-e2e"])
            .args(["-p", "istiod-lite"]);
        if release {
            cmd.arg("--release");
        }
        // A group of its own, so [`cancel_build`] stops rustc's processes too (a
        // caller that kills its own group must kill this one as well: meshctl's
        // demo test kills the hung demo's descendants).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| format!("cargo build: {e}"))?;
        BUILDING.store(child.id(), Ordering::SeqCst);
        let status = child.wait();
        BUILDING.store(0, Ordering::SeqCst);
        let status = status.map_err(|e| format!("cargo build: {e}"))?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("cargo build failed: {status}"))
    });
    if let Err(e) = built {
        panic!("building the mesh binaries: {e}");
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found after building",
        path.display()
    );
    path
}

/// What the binaries are built from, relative to the workspace root: the crates,
/// the lock file, and the workspace's manifest and Cargo config (shared versions,
/// features, profiles, target flags).
const SOURCES: [&str; 10] = [
    "ztunnel",
    "istiod-lite",
    "cni",
    "mesh-core",
    "proto",
    "e2e/src",
    "e2e/Cargo.toml",
    "Cargo.lock",
    "Cargo.toml",
    ".cargo/config.toml",
];

/// The newest modification time under `path` (a file, or a directory walked).
fn newest(path: &Path) -> Option<std::time::SystemTime> {
    if !path.is_dir() {
        return std::fs::metadata(path).and_then(|m| m.modified()).ok();
    }
    let mut latest = None;
    for entry in std::fs::read_dir(path).ok()?.filter_map(Result::ok) {
        latest = latest.max(newest(&entry.path()));
    }
    latest
}

/// Whether `bin` exists and is newer than every source file it is built from.
fn is_fresh(bin: &Path) -> bool {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return false;
    };
    let root = workspace_root();
    SOURCES
        .iter()
        .all(|s| newest(&root.join(s)).is_none_or(|t| t <= built))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_covers_the_workspace_manifest_and_cargo_config() {
        let root = workspace_root();
        for s in SOURCES {
            assert!(root.join(s).exists(), "{s} is not in the checkout");
        }
        for s in ["Cargo.toml", ".cargo/config.toml", "e2e/Cargo.toml"] {
            assert!(SOURCES.contains(&s), "{s} is not a source");
        }
        // Older than the Cargo config: stale; newer than every source: fresh.
        let dir = crate::naming::temp_dir("fresh").unwrap();
        let bin = dir.path().join("ztunnel");
        std::fs::write(&bin, "").unwrap();
        let file = std::fs::File::options().write(true).open(&bin).unwrap();
        let config = newest(&root.join(".cargo/config.toml")).unwrap();
        file.set_modified(config - std::time::Duration::from_secs(1))
            .unwrap();
        assert!(!is_fresh(&bin));
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
        file.set_modified(later).unwrap();
        assert!(is_fresh(&bin));
    }
}
