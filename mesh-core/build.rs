//! Says whether `os::memcpy` can reach glibc's copy thresholds: only where glibc is
//! linked statically (their symbols are internal to glibc, visible to a static link
//! only) and is 2.34 or later (where both exist), on x86-64.

use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ambit_glibc_copy_thresholds)");
    println!("cargo::rerun-if-env-changed=AMBIT_NO_COPY_TUNING");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var("AMBIT_NO_COPY_TUNING").is_ok_and(|v| v == "1") {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let static_glibc_x86_64 = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && var("CARGO_CFG_TARGET_FEATURE")
            .split(',')
            .any(|f| f == "crt-static");
    // The glibc asked about is the build machine's: only right when it is also the
    // target's (the workspace's static build names the host's own triple).
    if !static_glibc_x86_64 || var("HOST") != var("TARGET") {
        return;
    }
    let version = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    // "glibc 2.36"
    let mut parts = version
        .trim()
        .trim_start_matches("glibc ")
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= (2, 34) {
        println!("cargo::rustc-cfg=ambit_glibc_copy_thresholds");
    }
}
