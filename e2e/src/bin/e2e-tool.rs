//! `e2e-tool`: the tiny TCP workload e2e tests run inside pod namespaces.
//!
//! - `serve <port>`: echo server on `0.0.0.0:<port>`; prints `listening <addr>` once
//!   bound, then `peer <ip:port>` for each accepted connection (what the server sees
//!   as the source, so tests can check addresses are preserved). A connection whose
//!   first bytes are `reset-me` ([`ambit_e2e::echo::RESET_REQUEST`]) is aborted
//!   with a TCP reset instead.
//! - `connect <ip:port> <message>`: sends the message, half-closes, prints the reply.
//! - `session <ip:port> <stop-file>`: a long-lived connection; prints `connected`,
//!   then every 50 ms sends `ping N` and prints `pong N` when its echo returns, until
//!   `<stop-file>` exists; then half-closes and prints `closed cleanly`. A broken
//!   connection prints `broken: <why>` and exits non-zero.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};

/// A client that cannot connect or get its reply within this gives up with an error
/// instead of hanging the test.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes, the OS's reason last, and never a backtrace
            // (RUST_BACKTRACE in the caller's environment must not change what the
            // demo and the tests read).
            eprintln!("Error: {e}");
            let causes: Vec<String> = e.chain().skip(1).map(|c| format!("    {c}")).collect();
            if !causes.is_empty() {
                eprintln!("\nCaused by:\n{}", causes.join("\n"));
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", port] => serve(port.parse().context("port")?),
        ["connect", addr, message] => connect(addr.parse().context("address")?, message),
        ["session", addr, stop] => session(addr.parse().context("address")?, stop),
        _ => bail!(
            "usage: e2e-tool serve <port> | connect <ip:port> <message> | session <ip:port> <stop-file>"
        ),
    }
}

fn serve(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).context("bind")?;
    say(&format!("listening {}", listener.local_addr()?))?;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let peer = stream.peer_addr()?;
        say(&format!("peer {peer}"))?;
        std::thread::spawn(move || {
            if let Err(e) = echo(stream) {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
    Ok(())
}

/// One line on stdout, flushed at once: the test is waiting for it.
fn say(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    let reset = ambit_e2e::echo::RESET_REQUEST.as_bytes();
    let mut first = vec![0u8; reset.len()];
    let mut got = 0;
    // Reads only while what came could still be the request: an echo must not wait
    // for bytes a client never sends.
    while got < first.len() && reset.starts_with(&first[..got]) {
        match stream.read(&mut first[got..])? {
            0 => break,
            n => got += n,
        }
    }
    if first[..got] == *reset {
        // Closing with SO_LINGER 0 sends a reset.
        return socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    stream.write_all(&first[..got])?;
    let mut reader = stream.try_clone()?;
    std::io::copy(&mut reader, &mut stream)?;
    stream.shutdown(Shutdown::Write)
}

fn connect(addr: SocketAddr, message: &str) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(message.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).context("read reply")?;
    let mut out = std::io::stdout().lock();
    out.write_all(&reply)?;
    out.flush()?;
    Ok(())
}

fn session(addr: SocketAddr, stop: &str) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    say("connected")?;
    let mut n = 0u64;
    while !std::path::Path::new(stop).exists() {
        n += 1;
        let msg = format!("ping {n}\n");
        let mut back = vec![0u8; msg.len()];
        let exchanged = stream
            .write_all(msg.as_bytes())
            .and_then(|()| stream.read_exact(&mut back));
        if let Err(e) = exchanged {
            say(&format!("broken: {e}"))?;
            bail!("session broken after {n} pings: {e}");
        }
        if back != msg.as_bytes() {
            say("broken: garbled echo")?;
            bail!("garbled echo");
        }
        say(&format!("pong {n}"))?;
        std::thread::sleep(Duration::from_millis(50));
    }
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    say("closed cleanly")
}
