//! `meshctl`: the command-line tool: waypoints, config dumps, analyze, demo.
//!
//! Not built yet: this binary only says what it will be.

fn main() {
    eprintln!(
        "meshctl: not built yet. It will be the command-line tool: waypoints, config dumps, analyze, demo."
    );
    std::process::exit(2);
}
