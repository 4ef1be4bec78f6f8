//! `ambit-cni`: the chained CNI plugin and node agent that enroll pods (issue: ztunnel).
//!
//! Not built yet: this binary only says what it will be.

fn main() {
    eprintln!(
        "ambit-cni: not built yet. It will be the chained CNI plugin and node agent that enroll pods (issue: ztunnel)."
    );
    std::process::exit(2);
}
