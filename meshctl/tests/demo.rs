//! Runs the README's demo command as a user would and checks what it shows.

use std::process::Command;

#[test]
fn the_demo_shows_an_allowed_tunnel_and_both_refusals() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["demo", "--loopback", "--rounds", "2"])
        .output()
        .expect("run meshctl demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("got \"HELLO CART, REQUEST 2\""), "{stdout}");
    assert!(
        stdout.contains(
            "ns/shop/sa/frontend -> spiffe://cluster.local/ns/shop/sa/cart: ALLOWED: 2 requests"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("is not the expected spiffe://cluster.local/ns/shop/sa/payments"),
        "{stdout}"
    );
    assert!(
        stdout.contains("403 Forbidden spiffe://cluster.local/ns/elsewhere/sa/scraper"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 mTLS connections, 1 tunnels, 2 refused"),
        "{stdout}"
    );
    assert!(stdout.contains("Drained (graceful)"), "{stdout}");
}
