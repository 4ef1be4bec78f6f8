//! `istiod-lite`: the control plane binary.

fn main() {
    eprintln!("istiod-lite: being built (issue 4)");
    std::process::exit(2);
}
