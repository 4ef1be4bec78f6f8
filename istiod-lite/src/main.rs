//! `istiod-lite`: the control plane: config sources, mesh model, delta xDS server and CA (issue: istiod-lite).
//!
//! Not built yet: this binary only says what it will be.

fn main() {
    eprintln!(
        "istiod-lite: not built yet. It will be the control plane: config sources, mesh model, delta xDS server and CA (issue: istiod-lite)."
    );
    std::process::exit(2);
}
