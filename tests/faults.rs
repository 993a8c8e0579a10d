//! Fault suite: signal storms, crash loops, a blocked log sink.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Direct children of `pid` that are zombies.
fn zombie_children(pid: i32) -> Vec<i32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .filter(|c: &i32| !alive(*c))
        .collect()
}

#[test]
fn twenty_reload_signals_in_100ms_start_at_most_two_generations() {
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready-after\", \"200\", \"--serve\"]\n\n[[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    z.wait_ready();
    for _ in 0..20 {
        z.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(5));
    }
    z.wait_msg_n("reload complete", 2);
    // Settle: were a third queued, it would be logged when the second completed.
    let generations = z.records_with("reloading").len();
    assert!(
        generations <= 2,
        "{generations} generations started for a burst of 20 signals"
    );
    ask_gen(format!("127.0.0.1:{port}").parse().unwrap(), 3);
    wait_for("old generations gone", DEADLINE, || {
        (z.records_with("worker exited").len() == 2).then_some(())
    });
    assert!(
        zombie_children(z.pid()).is_empty(),
        "zombies: {:?}",
        zombie_children(z.pid())
    );
    z.stop();
}

#[test]
fn crash_loop_is_no_fork_storm() {
    let mut z = Zdd::spawn("[worker]\ncommand = [\"{fixture}\", \"--ready\", \"--exit-after\", \"0\", \"1\"]\n");
    z.wait_msg_n("worker started", 2);
    let t0 = Instant::now();
    let before = z.records_with("worker started").len();
    std::thread::sleep(Duration::from_secs(3));
    let spawned = z.records_with("worker started").len() - before;
    let elapsed = t0.elapsed();
    // After the first restart, the back-off is at least 200, 400, 800, 1600 ms: at most 4
    // starts fit in the next ~3 s (the sum of those is exactly 3 s).
    assert!(
        spawned <= 4,
        "{spawned} workers started in {elapsed:?}: fork storm\n{}",
        z.log_text()
    );
    assert!(spawned >= 2, "only {spawned} starts: is it restarting at all?");
    let delays: Vec<u64> = z
        .records_with("worker exited unexpectedly; restarting")
        .iter()
        .map(|r| r["in_ms"].as_u64().unwrap())
        .collect();
    assert!(
        delays.windows(2).all(|w| w[1] >= w[0]),
        "back-off must not shrink: {delays:?}"
    );
    z.stop();
}

#[test]
fn blocked_log_sink_slows_the_worker_but_loses_nothing() {
    let port = free_port();
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--lines\", \"50000\"]\nrestart = \"never\"\n\n\
         [[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    let mut child = z
        .command(&["start", "--foreground"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads the master's stderr for a while: the pipe fills, the master blocks writing,
    // the worker's pipe fills, the worker blocks. Nothing may be dropped.
    std::thread::sleep(Duration::from_secs(1));
    let mut n = 0u64;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["stream"] == "stdout" {
                n += 1;
                assert_eq!(v["msg"], format!("line {n}"), "out of order or lost");
            }
        }
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(n, 50_000);
}
