//! Links the `ztunnel` binary with `code-order.ld` and `code-order.txt`: the
//! functions that start-up, an idle node and the data path run are laid out
//! together at the front of the code, in the order they first run, so an idle
//! ztunnel has a fraction of its code resident instead of most of it
//! (docs/benchmarks.md, "Idle memory"). `benches/code-order.sh` regenerates both; a
//! function neither names keeps the linker's default place.

fn main() {
    println!("cargo:rerun-if-changed=code-order.ld");
    println!("cargo:rerun-if-changed=code-order.txt");
    let cfg = |key: &str, value: &str| std::env::var(key).is_ok_and(|v| v == value);
    // The profile is of x86_64 Linux, where Rust links with its own lld by default;
    // elsewhere the default layout stays. A build there that configures another
    // linker (GNU ld, mold) must set AMBIT_DEFAULT_CODE_LAYOUT=1: GNU ld knows no
    // --symbol-ordering-file.
    println!("cargo:rerun-if-env-changed=AMBIT_DEFAULT_CODE_LAYOUT");
    let opted_out = std::env::var_os("AMBIT_DEFAULT_CODE_LAYOUT").is_some();
    let profiled_target = !opted_out
        && cfg("CARGO_CFG_TARGET_ARCH", "x86_64")
        && cfg("CARGO_CFG_TARGET_OS", "linux")
        && cfg("CARGO_CFG_TARGET_ENV", "gnu");
    let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    if profiled_target {
        // A linker script with INSERT adds to the default layout; the symbol order
        // sorts the sections it gathers.
        // Separate arguments: a comma in the path would split a -Wl list.
        for arg in [
            "-Xlinker".to_owned(),
            "-T".to_owned(),
            "-Xlinker".to_owned(),
            format!("{dir}/code-order.ld"),
            "-Xlinker".to_owned(),
            format!("--symbol-ordering-file={dir}/code-order.txt"),
        ] {
            println!("cargo:rustc-link-arg-bin=ztunnel={arg}");
        }
        println!("cargo:rustc-link-arg-bin=ztunnel=-Wl,--no-warn-symbol-ordering");
    }
}
