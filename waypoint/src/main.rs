//! `waypoint`: the L7 waypoint proxy: HBONE in, HTTP routing, retries, timeouts, circuit breaking, L7 policy (issue: waypoint).
//!
//! Not built yet: this binary only says what it will be.

fn main() {
    eprintln!(
        "waypoint: not built yet. It will be the L7 waypoint proxy: HBONE in, HTTP routing, retries, timeouts, circuit breaking, L7 policy (issue: waypoint)."
    );
    std::process::exit(2);
}
