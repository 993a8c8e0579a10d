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
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready-after\", \"1500\", \"--serve\"]\n\n[[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    z.wait_ready();
    // The burst takes ~100 ms; each reload takes 1.5 s (the worker's boot): even on a loaded
    // machine every signal after the first arrives while the first reload is under way.
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
    // Nobody reads the master's stderr until it is full: the master keeps what the pipe does
    // not take, stops reading the worker's pipe, the worker blocks. Nothing may be dropped.
    // (tests/hardening_log.rs checks that the master keeps serving meanwhile.)
    let stderr = child.stderr.take().unwrap();
    wait_for("the master's stderr pipe to fill", DEADLINE, || {
        pipe_full(std::os::fd::AsRawFd::as_raw_fd(&stderr)).then_some(())
    });
    let mut n = 0u64;
    for line in BufReader::new(stderr).lines() {
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

/// One request on the control socket, the whole answer (until the master hangs up).
fn control(sock: &std::path::Path, request: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// The last `n` lines of the master's log, for a failure message.
fn log_tail(z: &Zdd, n: usize) -> String {
    let text = z.log_text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[test]
fn ten_thousand_reloads_leave_fds_and_memory_as_they_were() {
    // Text log: 10,000 reloads write ~50,000 records, which the test does not parse.
    let mut z = Zdd::spawn(
        "[master]\nlog_format = \"text\"\ncontrol_socket = \"{dir}/ctl.sock\"\n\n\
         [worker]\ncommand = [\"{fixture}\", \"--ready\"]\n",
    );
    let sock = z.path("ctl.sock");
    // Answering, not just there: the file exists a moment before the master listens on it.
    wait_for("control socket", DEADLINE, || {
        control(&sock, r#"{"cmd":"status"}"#).ok()
    });
    let reload = |n: usize| match control(&sock, r#"{"cmd":"reload"}"#) {
        Ok(answer) if answer.contains(r#""ok":true"#) => {}
        other => panic!("reload {n}: {other:?}\n{}", log_tail(&z, 40)),
    };
    // Warm up (allocator arenas, buffers reaching their working size), then measure.
    for n in 0..200 {
        reload(n);
    }
    let pid = z.pid();
    let settled = |what: &str| {
        // The last old worker may still be exiting: wait until only the serving one is left.
        wait_for(what, DEADLINE, || {
            let s = control(&sock, r#"{"cmd":"status"}"#).unwrap();
            (s.matches("\"pid\":").count() == 2).then_some(())
        });
        (fd_count(pid), rss_kib(pid))
    };
    let (fds_before, rss_before) = settled("warm-up drained");
    for n in 0..10_000 {
        reload(n);
    }
    let (fds_after, rss_after) = settled("last old worker gone");
    eprintln!("master after 10,000 reloads: fds {fds_before} -> {fds_after}, RSS {rss_before} -> {rss_after} KiB");
    assert_eq!(fds_after, fds_before, "the master's fds changed over 10,000 reloads");
    // "Unchanged" up to allocator noise: a leak of even 100 bytes per reload would be ~1 MiB.
    assert!(
        rss_after <= rss_before + 256,
        "master RSS grew from {rss_before} KiB to {rss_after} KiB over 10,000 reloads"
    );
    assert!(zombie_children(pid).is_empty(), "zombies: {:?}", zombie_children(pid));
    z.stop();
}

#[test]
fn a_million_log_lines_arrive_complete_and_in_order() {
    let mut z = Zdd::spawn(
        "[master]\nlog_format = \"text\"\ncontrol_socket = \"{dir}/ctl.sock\"\n\n\
         [worker]\ncommand = [\"{fixture}\", \"--ready\", \"--lines\", \"1000000\"]\nrestart = \"never\"\n",
    );
    assert_eq!(
        z.wait_exit().code(),
        Some(0),
        "{}",
        z.log_text().lines().take(20).collect::<Vec<_>>().join("\n")
    );
    let log = std::fs::File::open(&z.log).unwrap();
    let mut next = 1u64;
    for line in BufReader::new(log).lines() {
        let line = line.unwrap();
        let Some((_, rest)) = line.split_once(" INFO line ") else {
            continue;
        };
        let (n, tags) = rest.split_once(',').unwrap();
        assert_eq!(n.parse::<u64>().unwrap(), next, "line lost or out of order: {line}");
        assert!(tags.ends_with("generation: 1, stream: stdout"), "{line}");
        next += 1;
    }
    assert_eq!(next - 1, 1_000_000, "lines relayed");
}

#[test]
fn a_reload_asked_for_during_the_start_runs_when_the_start_is_done() {
    // Found by the 10,000-reload test: the queued reload waited for an unrelated event.
    let mut z = Zdd::spawn(
        "[master]\nlog_format = \"json\"\ncontrol_socket = \"{dir}/ctl.sock\"\n\n\
         [worker]\ncommand = [\"{fixture}\", \"--ready-after\", \"300\"]\n",
    );
    let sock = z.path("ctl.sock");
    wait_for("control socket", DEADLINE, || sock.exists().then_some(()));
    let t0 = Instant::now();
    let answer = control(&sock, r#"{"cmd":"reload"}"#).unwrap_or_else(|e| panic!("{e}\n{}", log_tail(&z, 20)));
    assert!(answer.contains(r#""ok":true"#), "{answer}");
    assert!(
        z.records_with("ready").len() == 1 && z.records_with("reload complete").len() == 1,
        "{}",
        log_tail(&z, 20)
    );
    eprintln!("reload asked for during the start answered after {:?}", t0.elapsed());
    z.stop();
}
