//! `ztunnel`: the per-node L4 proxy: in-pod capture on 15001/15006, HBONE on 15008, L4 policy, metrics on 15020 (issue: ztunnel).
//!
//! Not built yet: this binary only says what it will be.

fn main() {
    eprintln!(
        "ztunnel: not built yet. It will be the per-node L4 proxy: in-pod capture on 15001/15006, HBONE on 15008, L4 policy, metrics on 15020 (issue: ztunnel)."
    );
    std::process::exit(2);
}
