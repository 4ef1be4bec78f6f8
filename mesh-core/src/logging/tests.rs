//! The log buffer and its writer thread, against a sink that records each write.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::mpsc;
use std::time::Instant;

use super::*;

/// A sink that records each `write` call, and can be held shut.
#[derive(Clone, Default)]
struct Sink {
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
    gate: Arc<Mutex<()>>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _open = self.gate.lock().unwrap();
        self.writes.lock().unwrap().push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn text(&self) -> String {
        String::from_utf8(self.writes.lock().unwrap().concat()).unwrap()
    }
    fn calls(&self) -> usize {
        self.writes.lock().unwrap().len()
    }
}

/// Waits (at most 10 s) until `done` holds; `what` names it when it never does.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until the writer thread waits for lines.
fn wait_idle(writer: &LogWriter) {
    wait_until("the writer thread never waited", || {
        writer.shared.lock().idle
    });
}

fn line(writer: &LogWriter, text: &str) {
    writer.make_writer().write_all(text.as_bytes()).unwrap();
}

#[test]
fn lines_from_many_threads_arrive_whole_and_in_order_per_thread() {
    let sink = Sink::default();
    let (writer, flush) = spawn(Box::new(sink.clone()), BUFFER_LIMIT, LINGER);
    wait_idle(&writer);
    std::thread::scope(|s| {
        for t in 0..4 {
            let writer = &writer;
            s.spawn(move || {
                for i in 0..500 {
                    line(
                        writer,
                        &format!("thread {t} line {i} {}\n", "x".repeat(i % 97)),
                    );
                }
            });
        }
    });
    drop(flush);
    let text = sink.text();
    let mut next = [0usize; 4];
    for l in text.lines() {
        let words: Vec<&str> = l.split(' ').collect();
        let (t, i): (usize, usize) = (words[1].parse().unwrap(), words[3].parse().unwrap());
        assert_eq!(i, next[t], "thread {t}'s lines out of order: {l}");
        assert_eq!(words[4].len(), i % 97, "line cut: {l}");
        next[t] += 1;
    }
    assert_eq!(next, [500; 4], "every line arrives once");
}

#[test]
fn a_burst_of_lines_is_written_in_a_few_calls() {
    let sink = Sink::default();
    // A long linger, so that a slow test machine still fits the burst in it.
    let (writer, flush) = spawn(
        Box::new(sink.clone()),
        BUFFER_LIMIT,
        Duration::from_millis(300),
    );
    wait_idle(&writer);
    for i in 0..2000 {
        line(&writer, &format!("line {i}\n"));
    }
    // Written by the writer on its own, not by the flush at the end.
    wait_until("the lines were not written", || {
        sink.text().lines().count() >= 2000
    });
    drop(flush);
    // The first line wakes the writer; the rest land within its linger.
    assert!(sink.calls() <= 2, "2000 lines took {} writes", sink.calls());
}

#[test]
fn a_stalled_reader_costs_lines_not_time_and_the_loss_is_reported() {
    let sink = Sink::default();
    let shut = sink.gate.lock().unwrap();
    let (writer, flush) = spawn(Box::new(sink.clone()), 4096, Duration::from_millis(1));
    // The first line goes to the (blocked) writer thread; wait until it has it.
    line(&writer, "first\n");
    wait_until("the writer never took the first line", || {
        writer.shared.lock().pending.is_empty()
    });
    // Writing 1 MiB into a 4 KiB buffer returns at once: lines are dropped.
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..10_000 {
                line(&writer, &format!("line {i:05} {}\n", "y".repeat(90)));
            }
            done_tx.send(()).unwrap();
        });
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("writing lines blocked on a stalled reader");
    });
    drop(shut);
    drop(flush);
    let text = sink.text();
    let kept = text.lines().filter(|l| l.starts_with("line ")).count();
    assert!(
        kept > 0 && kept < 100,
        "{kept} lines kept of 10,000 in 4 KiB"
    );
    let notice = text
        .lines()
        .find(|l| l.starts_with("log: "))
        .expect("a notice of the dropped lines");
    assert_eq!(
        notice,
        format!("log: {} lines dropped, stdout too slow", 10_000 - kept)
    );
}

#[test]
fn a_half_full_buffer_is_written_without_waiting_for_the_linger() {
    let sink = Sink::default();
    // A linger far longer than the test: only the half-full wake can write.
    let (writer, flush) = spawn(Box::new(sink.clone()), 4096, Duration::from_secs(600));
    wait_idle(&writer);
    for i in 0..30 {
        line(&writer, &format!("line {i:02} {}\n", "z".repeat(90)));
    }
    wait_until("a buffer past half full waited for the linger", || {
        sink.text().lines().count() >= 20
    });
    // Close without waiting out the linger (the flush cuts it short).
    let start = Instant::now();
    drop(flush);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(sink.text().lines().count(), 30);
}

#[test]
fn exit_does_not_wait_for_a_stuck_stdout_longer_than_the_flush_deadline() {
    let sink = Sink::default();
    let shut = sink.gate.lock().unwrap();
    let (writer, flush) = spawn(Box::new(sink.clone()), 4096, Duration::from_millis(1));
    line(&writer, "stuck\n");
    let start = Instant::now();
    drop(flush);
    let waited = start.elapsed();
    assert!(
        waited >= FLUSH_WAIT && waited < FLUSH_WAIT + Duration::from_secs(5),
        "exit waited {waited:?} for a stuck stdout"
    );
    // Unstuck, the writer still writes what it had.
    drop(shut);
    wait_until("the line never reached stdout", || sink.text() == "stuck\n");
}
