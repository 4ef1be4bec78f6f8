//! `bench-load`: the small TCP load the `ztunnel_e2e` benchmark runs inside pods.
//!
//! - `serve <port>`: on `<port>` an echo server (echoes whatever it reads until EOF);
//!   on `<port>+1` a one-exchange server (reads 64 bytes, writes them back, closes
//!   first, so the TIME_WAIT state lands on the server and the client's ports are
//!   free again at once). Prints `listening <port>` once both are bound.
//! - `conns <ip:port> <seconds> <threads>`: new connections in a closed loop on
//!   `<threads>` threads, each connection: connect, send 64 bytes, read the 64 back,
//!   read the server's close, close. Prints `conns <count> <seconds>`.
//! - `rr <ip:port> <rate> <seconds>`: one held connection, 64-byte requests sent
//!   open-loop at `<rate>` per second, each waiting for its 64-byte reply. A request
//!   sent late (the previous reply came after it was due) is timed from when it was
//!   due, so a slow reply also counts against the requests queued behind it. Prints
//!   `rr <count> <p50_us> <p90_us> <p99_us> <max_us>`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MESSAGE: usize = 64;
const TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", port] => parse(port).and_then(serve),
        ["conns", addr, secs, threads] => (|| conns(parse(addr)?, parse(secs)?, parse(threads)?))(),
        ["rr", addr, rate, secs] => (|| rr(parse(addr)?, parse(rate)?, parse(secs)?))(),
        _ => Err(
            "usage: bench-load serve <port> | conns <ip:port> <seconds> <threads> | \
             rr <ip:port> <rate> <seconds>"
                .to_owned(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse<T: std::str::FromStr>(text: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|e| format!("{text:?}: {e}"))
}

fn say(line: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

fn serve(port: u16) -> Result<(), String> {
    let echo = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind {port}: {e}"))?;
    let once_port = port + 1;
    let once =
        TcpListener::bind(("0.0.0.0", once_port)).map_err(|e| format!("bind {once_port}: {e}"))?;
    std::thread::spawn(move || accept(&once, one_exchange));
    say(&format!("listening {port}"))?;
    accept(&echo, echo_all);
    Ok(())
}

fn accept(listener: &TcpListener, handle: fn(TcpStream) -> std::io::Result<()>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || {
                    let _ignored = handle(stream);
                });
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}

fn echo_all(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn one_exchange(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; MESSAGE];
    stream.read_exact(&mut buf)?;
    stream.write_all(&buf)?;
    // Dropping closes: the server closes first.
    Ok(())
}

fn one_connection(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let request = [b'x'; MESSAGE];
    stream.write_all(&request)?;
    let mut reply = [0u8; MESSAGE];
    stream.read_exact(&mut reply)?;
    if reply != request {
        return Err(std::io::Error::other("garbled reply"));
    }
    // Wait for the server's close, so the connection is over when it is counted.
    let mut rest = [0u8; 1];
    match stream.read(&mut rest)? {
        0 => Ok(()),
        _ => Err(std::io::Error::other("more than one reply")),
    }
}

fn conns(addr: SocketAddr, secs: f64, threads: usize) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (stop, count, failed) = (stop.clone(), count.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match one_connection(addr) {
                        Ok(()) => count.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("connection to {addr}: {e}");
                            }
                            0
                        }
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ignored = w.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        return Err(format!("{failed} connections failed"));
    }
    say(&format!(
        "conns {} {elapsed:.3}",
        count.load(Ordering::Relaxed)
    ))
}

fn rr(addr: SocketAddr, rate: f64, secs: f64) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    let setup = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(TIMEOUT)));
    setup.map_err(|e| format!("socket options: {e}"))?;
    let request = [b'r'; MESSAGE];
    let mut reply = [0u8; MESSAGE];
    let exchange = |stream: &mut TcpStream, reply: &mut [u8; MESSAGE]| {
        stream
            .write_all(&request)
            .and_then(|()| stream.read_exact(reply))
            .map_err(|e| format!("exchange: {e}"))
    };
    // A few untimed exchanges: the tunnel and the caches are warm when timing starts.
    for _ in 0..50 {
        exchange(&mut stream, &mut reply)?;
    }
    let total = (rate * secs).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut latencies = Vec::with_capacity(total as usize);
    let start = Instant::now();
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        // On time: the clock starts when the request leaves (the sleep's overshoot is
        // not the path's doing). Late: it starts when the request was due.
        let sent = if due > now {
            std::thread::sleep(due - now);
            Instant::now()
        } else {
            due
        };
        exchange(&mut stream, &mut reply)?;
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| {
        let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx].as_secs_f64() * 1e6
    };
    say(&format!(
        "rr {} {:.1} {:.1} {:.1} {:.1}",
        latencies.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0)
    ))
}
