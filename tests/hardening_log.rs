//! The log under faults (issue 10): a log sink that stops draining, a full disk, control
//! characters from workers, pipes that outlive their workers. Each test runs the real binary.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// A request on the control socket: the reply lines until the master hangs up, each within
/// `timeout`.
fn request(sock: &Path, request: &str, timeout: Duration) -> std::io::Result<Vec<Value>> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// `status` over the control socket; panics if the master does not answer within 10 s.
fn status_now(sock: &Path) -> Value {
    let replies = request(sock, r#"{"cmd":"status"}"#, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("status did not answer within 10 s: {e}"));
    replies
        .into_iter()
        .find(|r| r["type"] == "result")
        .map(|r| r["data"].clone())
        .expect("a status result")
}

fn worker_pids(status: &Value) -> Vec<i64> {
    status["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["pid"].as_i64()).collect())
        .unwrap_or_default()
}

/// Check a JSON log: every line whole, and each worker's "line N" numbered from 1 without a
/// gap; `cut` lists workers killed mid-line, whose last line may be cut short. Returns the
/// worker lines per pid.
fn check_flood_lines(lines: &[Vec<u8>], cut: &[i64]) -> std::collections::BTreeMap<i64, u64> {
    let mut next: std::collections::BTreeMap<i64, u64> = Default::default();
    let mut cut_short: Vec<i64> = Vec::new();
    for raw in lines {
        let v: Value = serde_json::from_slice(raw)
            .unwrap_or_else(|e| panic!("a torn or garbled log line ({e}): {:?}", String::from_utf8_lossy(raw)));
        if v["stream"] != "stdout" {
            continue;
        }
        let pid = v["pid"].as_i64().unwrap();
        assert!(
            !cut_short.contains(&pid),
            "a line of worker {pid} after its cut-short one"
        );
        let n = next.entry(pid).or_insert(1);
        let msg = v["msg"].as_str().unwrap();
        let want = format!("line {n}");
        if msg != want {
            assert!(
                cut.contains(&pid) && want.starts_with(msg),
                "worker {pid}: {msg:?} where {want:?} was due: a line lost, torn or out of order"
            );
            cut_short.push(pid);
        }
        *n += 1;
    }
    next.into_iter().map(|(pid, n)| (pid, n - 1)).collect()
}

#[test]
fn a_log_sink_that_stops_draining_blocks_neither_control_nor_signals_nor_reaping_nor_stop() {
    // The master's stderr is a pipe this test does not read: the log sink stops draining.
    // Before the fix, the master blocked in write() once the pipe was full: status, reload,
    // reaping and stop all hung.
    let (ours, theirs) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    blocked_sink(Stdio::from(theirs), std::fs::File::from(ours));
}

#[test]
fn a_journal_socket_that_stops_draining_blocks_nothing_either() {
    // Under systemd, stderr is a stream socket to the journal.
    let (ours, theirs) = UnixStream::pair().unwrap();
    blocked_sink(Stdio::from(std::os::fd::OwnedFd::from(theirs)), ours);
}

#[test]
fn a_terminal_that_stops_scrolling_blocks_nothing_either() {
    // stderr on a terminal nobody reads (a paused terminal, XOFF): zdd writes through its own
    // non-blocking open of the terminal, never the description it shares with the shell.
    let (mut ours, mut theirs) = (0, 0);
    // SAFETY: openpty writes two fds through the pointers; the other arguments may be null.
    let r = unsafe {
        nix::libc::openpty(
            &mut ours,
            &mut theirs,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened by openpty and are owned by nothing else.
    let (ours, theirs) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(ours),
            std::os::fd::OwnedFd::from_raw_fd(theirs),
        )
    };
    // What the terminal shows of a line ends in "\r\n": JSON takes the \r as white space.
    blocked_sink(Stdio::from(theirs), ours);
}

/// Read whole lines from `r` in a thread until EOF (the master's exit closes its stderr).
fn read_lines_until_eof(r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut r = BufReader::new(r);
        loop {
            let mut line = Vec::new();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => lines.push(line),
            }
        }
        lines
    })
}

/// A master whose stderr (its log) is `theirs`, which nobody reads, with a worker flooding
/// it: returns once the log is full and the relay paused (status answers all the while).
fn start_with_a_blocked_log(theirs: Stdio) -> (Zdd, std::path::PathBuf, Value) {
    let mut z = Zdd::new(
        "[master]\nlog_format = \"json\"\ncontrol_socket = \"{dir}/ctl.sock\"\n\n\
         [worker]\ncommand = [\"{fixture}\", \"--ready\", \"--flood\"]\nstop_timeout = \"60s\"\n",
    );
    let sock = z.path("ctl.sock");
    let mut cmd = z.command(&["start", "--foreground"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(theirs);
    z.child = Some(cmd.spawn().unwrap());
    // The command holds our copy of the other end: drop it, so that EOF comes at exit.
    drop(cmd);
    // Connectable (the socket file appears at bind, before listen).
    wait_for("the control socket", DEADLINE, || UnixStream::connect(&sock).ok());
    // Status answers while the log is blocked, and says the relay waits for it (which needs
    // the log to have refused writes: it is full).
    let s = wait_for("the relay to pause", DEADLINE, || {
        let s = status_now(&sock);
        (s["log"]["relay_paused"] == true).then_some(s)
    });
    assert!(s["log"]["pending_bytes"].as_u64().unwrap() >= 1024 * 1024, "{s}");
    assert_eq!(s["log"]["dropped_lines"], 0, "{s}");
    (z, sock, s)
}

fn blocked_sink(theirs: Stdio, stderr: impl Read + Send + 'static) {
    let (mut z, sock, s) = start_with_a_blocked_log(theirs);
    let first = worker_pids(&s)[0];

    // Reaping: a worker killed now is reaped and restarted.
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let s = wait_for("the killed worker to be replaced", DEADLINE, || {
        let s = status_now(&sock);
        let pids = worker_pids(&s);
        (pids.len() == 1 && pids[0] != first).then_some(s)
    });
    let second = worker_pids(&s)[0];

    // Signals: a reload by SIGHUP completes (its new worker is ready, the old one is asked
    // to stop and stays blocked writing until the log drains).
    z.signal(Signal::SIGHUP);
    wait_for("generation 2 to serve", DEADLINE, || {
        (status_now(&sock)["generation"] == 2).then_some(())
    });

    // Stop: answered at once; it finishes once the log is read again.
    let mut stop = UnixStream::connect(&sock).unwrap();
    stop.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stop.write_all(b"{\"cmd\":\"stop\"}\n").unwrap();
    let mut stop = BufReader::new(stop);
    let mut progress = String::new();
    stop.read_line(&mut progress)
        .unwrap_or_else(|e| panic!("stop did not answer within 10 s: {e}"));
    assert!(progress.contains("stopping master pid"), "{progress}");
    let reader = read_lines_until_eof(stderr);
    stop.get_mut().set_read_timeout(Some(DEADLINE)).unwrap();
    let mut rest = String::new();
    stop.read_to_string(&mut rest).unwrap();
    let result: Value =
        serde_json::from_str(rest.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {rest:?}"));
    assert_eq!(z.wait_exit().code(), Some(0));
    let lines = reader.join().unwrap();
    let lost: Vec<String> = lines
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .filter(|l| l.contains("lost"))
        .collect();
    assert_eq!(result["ok"], true, "{rest}");
    assert_eq!(result["data"]["log_lines_lost"], 0, "{rest} {lost:?}");

    // Nothing lost, torn or reordered: back-pressure, not loss.
    let relayed = check_flood_lines(&lines, &[first]);
    assert_eq!(relayed.len(), 3, "three workers' lines: {relayed:?}");
    assert!(relayed[&second] > 0 && relayed[&first] > 0, "{relayed:?}");
    let text: Vec<Value> = lines.iter().filter_map(|l| serde_json::from_slice(l).ok()).collect();
    for msg in ["worker exited unexpectedly; restarting", "reload complete", "stopped"] {
        assert!(text.iter().any(|r| r["msg"] == msg), "no {msg:?} record");
    }
    assert!(
        !text
            .iter()
            .any(|r| r["msg"].as_str().is_some_and(|m| m.contains("lost"))),
        "no line may be reported lost"
    );
}

#[test]
fn a_log_on_a_full_disk_counts_the_lost_lines_and_says_so_once_it_can_write() {
    // /dev/full fails every write with ENOSPC, like a full disk. Before the fix, the lines
    // were lost without a word.
    let mut z = Zdd::new(
        "[master]\nlog = \"{dir}/app.log\"\nlog_format = \"json\"\ncontrol_socket = \"run/app.sock\"\n\n\
         [worker]\ncommand = [\"{fixture}\", \"--ready\", \"--tick\", \"10\"]\n",
    );
    let log = z.path("app.log");
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    z.start();
    let s = wait_for("lost lines to be counted", DEADLINE, || {
        let o = zdd(&z, &["status", "--json"]);
        let s: Value = serde_json::from_str(&stdout(&o)).ok()?;
        (s["log"]["dropped_lines"].as_u64()? >= 20).then_some(s)
    });
    assert_eq!(s["log"]["error"], "no space left on device (ENOSPC)", "{s}");
    let human = stdout(&zdd(&z, &["status"]));
    assert!(
        human.contains(" lines lost; writing fails: no space left on device (ENOSPC)"),
        "{human}"
    );
    // Space again: the log is reopened on a real file.
    std::fs::remove_file(&log).unwrap();
    let o = zdd(&z, &["reopen-logs"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let notice = wait_for("the loss notice", DEADLINE, || {
        let text = std::fs::read_to_string(&log).ok()?;
        let first = text.lines().next()?;
        Some(serde_json::from_str::<Value>(first).unwrap())
    });
    let lost = notice["lost_lines"].as_u64().unwrap();
    assert!(lost >= 20, "{notice}");
    assert_eq!(
        notice["msg"],
        format!("log: {lost} lines lost while the log could not be written: no space left on device (ENOSPC)")
    );
    assert_eq!(notice["level"], "WARN");
    let s = status(&z);
    assert_eq!(s["log"]["error"], Value::Null, "{s}");
    assert!(s["log"]["dropped_lines"].as_u64().unwrap() >= lost, "{s}");
    z.stop();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    }
}

/// A small tmpfs, unmounted (lazily) when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(path: PathBuf, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(&path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs(path))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_disk_that_fills_up_tears_no_line_and_the_log_says_what_was_lost() {
    let mut z = Zdd::new(
        "[master]\nlog = \"{dir}/fs/app.log\"\nlog_format = \"json\"\ncontrol_socket = \"run/app.sock\"\n\n\
         [worker]\ncommand = [\"{fixture}\", \"--ready\", \"--tick\", \"2\"]\n",
    );
    let Some(fs) = SmallFs::mount(z.path("fs"), "256k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root); the /dev/full test covers the counter");
        return;
    };
    // Fill most of it, so that the log fills the rest soon; once the ballast is gone, the log
    // has seconds of room before it fills the disk again.
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![0u8; 240 * 1024]).unwrap();
    z.start();
    wait_for("lines lost to the full disk", DEADLINE, || {
        let o = zdd(&z, &["status", "--json"]);
        let s: Value = serde_json::from_str(&stdout(&o)).ok()?;
        (s["log"]["dropped_lines"].as_u64()? >= 50).then_some(())
    });
    std::fs::remove_file(&ballast).unwrap();
    let log = fs.0.join("app.log");
    wait_for("the loss notice", DEADLINE, || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("lines lost while")
            .then_some(())
    });
    z.stop();
    // Every line whole, ticks in order, and the notice accounts for the gap.
    let text = std::fs::read(&log).unwrap();
    let mut last_tick = 0u64;
    let mut lost_reported = 0;
    let mut ticks_missing = 0;
    for raw in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(raw)
            .unwrap_or_else(|e| panic!("a torn log line ({e}): {:?}", String::from_utf8_lossy(raw)));
        if let Some(n) = v["lost_lines"].as_u64() {
            lost_reported += n;
        }
        if let Some(tick) = v["msg"].as_str().and_then(|m| m.strip_prefix("tick ")) {
            let tick: u64 = tick.parse().unwrap();
            assert!(tick > last_tick, "tick {tick} after {last_tick}");
            ticks_missing += tick - last_tick - 1;
            last_tick = tick;
        }
    }
    assert!(
        ticks_missing > 0 && lost_reported >= ticks_missing,
        "{ticks_missing} ticks missing, {lost_reported} lines reported lost"
    );
}

#[test]
fn control_characters_from_a_worker_reach_the_text_log_escaped() {
    // A worker that prints escape sequences, NUL, CR, DEL and a C1 control, then fails its
    // start: its line and the failure report's tail must hold no raw control character.
    let mut z = Zdd::spawn(
        "[master]\nlog_format = \"text\"\ncontrol_socket = \"run/app.sock\"\n\n\
         [worker]\ncommand = [\"{fixture}\", \"--echo\", \"\\\\x1b[31mred\\\\x00nul\\\\x0dcr\\\\xc2\\\\x9bc1\\\\x7fdel\\ttab\", \"--exit-after\", \"0\", \"1\"]\n",
    );
    assert_eq!(z.wait_exit().code(), Some(1));
    let log = std::fs::read(&z.log).unwrap();
    let text = String::from_utf8_lossy(&log);
    let bad: Vec<(usize, u8)> = log
        .iter()
        .enumerate()
        .filter(|&(_, &b)| (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f)
        .map(|(i, &b)| (i, b))
        .collect();
    assert!(bad.is_empty(), "raw control characters at {bad:?} in:\n{text}");
    assert!(!text.contains('\u{9b}'), "a raw C1 control in:\n{text}");
    let escaped = "\\x1b[31mred\\x00nul\\x0dcr\\u{9b}c1\\x7fdel\ttab";
    let worker_line = text
        .lines()
        .find(|l| l.contains("stream: stdout"))
        .unwrap_or_else(|| panic!("no worker line:\n{text}"));
    assert!(
        worker_line.contains(&format!(" INFO {escaped}, pid: ")),
        "{worker_line}"
    );
    assert!(
        text.lines().any(|l| l.contains(&format!("  | {escaped}"))),
        "the failure report's tail, escaped:\n{text}"
    );
}

/// Kill the processes whose pids a test's worker wrote into `file`, one a line.
fn kill_listed(file: &Path) {
    for pid in std::fs::read_to_string(file).unwrap_or_default().lines() {
        if let Ok(pid) = pid.trim().parse() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Kills the listed descendants when dropped, also when a test fails.
struct Descendants(PathBuf);

impl Drop for Descendants {
    fn drop(&mut self) {
        kill_listed(&self.0);
    }
}

/// A worker whose descendant leaves its process group and keeps its stdout and stderr open,
/// having printed `print` to stderr without a newline; the descendant's pid is appended to
/// gc.pids. The worker is ready only once its descendant has left (`setsid`), so that the
/// worker's process group being killed when it exits does not reach it.
fn worker_with_an_escaped_descendant(print: &str) -> String {
    let script = format!(
        "setsid sh -c 'printf {print} >&2; exec sleep 120' & p=$!; echo $p >> {{dir}}/gc.pids; \
         until [ \\\"$(cut -d' ' -f6 /proc/$p/stat)\\\" = $p ]; do :; done; exec {{fixture}} --ready"
    );
    format!(
        "[master]\nlog_format = \"json\"\ncontrol_socket = \"{{dir}}/ctl.sock\"\n\n\
         [worker]\ncommand = [\"/bin/sh\", \"-c\", \"{script}\"]\n"
    )
}

#[test]
fn the_unfinished_last_line_of_a_pipe_that_outlives_its_worker_is_logged_at_stop() {
    let mut z = Zdd::spawn(&worker_with_an_escaped_descendant("unfinished"));
    let pids = z.path("gc.pids");
    let _descendants = Descendants(pids.clone());
    z.wait_ready();
    wait_for("the descendant's pid", DEADLINE, || {
        std::fs::read_to_string(&pids).ok().filter(|s| s.ends_with('\n'))
    });
    z.stop();
    kill_listed(&pids);
    let line = z
        .records()
        .into_iter()
        .find(|r| r["stream"] == "stderr" && r["msg"] == "unfinished");
    assert!(line.is_some(), "the unfinished line was not logged:\n{}", z.log_text());
}

#[test]
fn pipes_held_open_by_exited_workers_descendants_are_capped() {
    // Descendants outlive their worker (holding its pipes) only where the master has no
    // cgroups; a master running as nobody has none here.
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "needs root under CI");
        missing("pipes_held_open_by_exited_workers_descendants_are_capped", "needs root");
        return;
    }
    let mut z = Zdd::new(&worker_with_an_escaped_descendant("held"));
    {
        use std::os::unix::process::CommandExt;
        let chown = std::process::Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(z.dir.path())
            .status()
            .unwrap();
        assert!(chown.success());
        let mut cmd = z.command(&["start", "--foreground"]);
        cmd.uid(65534).gid(65534);
        z.start_cmd(cmd);
    }
    z.wait_msg_containing("cgroups unavailable");
    let pids = z.path("gc.pids");
    let _descendants = Descendants(pids.clone());
    let sock = z.path("ctl.sock");
    z.wait_ready();
    let fds = |pid: i32| std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = fds(z.pid());
    // Each reload leaves the old worker's two pipes held open by its descendant.
    let reloads = 130;
    for n in 0..reloads {
        let replies = request(&sock, r#"{"cmd":"reload"}"#, DEADLINE).unwrap();
        assert!(
            replies.last().is_some_and(|r| r["ok"] == true),
            "reload {n}: {replies:?}"
        );
    }
    let closed = wait_for("the oldest pipes to be closed", DEADLINE, || {
        let n = z
            .records_with("too many log pipes held open by exited workers' descendants: closing the oldest")
            .len();
        (n >= 2 * reloads - 256).then_some(n)
    });
    assert_eq!(closed, 2 * reloads - 256);
    wait_for("the old workers to be gone", DEADLINE, || {
        (worker_pids(&status_now(&sock)).len() == 1).then_some(())
    });
    let after = fds(z.pid());
    assert!(after <= before + 256 + 4, "master fds {before} -> {after}");
    kill_listed(&pids);
    z.stop();
    // Every descendant printed "held" without a newline: every one of them is logged once,
    // when its pipe was closed (the oldest) or at stop (the rest).
    let held = z
        .records()
        .into_iter()
        .filter(|r| r["stream"] == "stderr" && r["msg"] == "held")
        .count();
    assert_eq!(
        held,
        reloads + 1,
        "{}",
        z.log_text().lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn an_upgrade_with_a_blocked_log_hands_the_pending_lines_over() {
    // The master's stderr is a pipe not read until the end: at the upgrade, a megabyte of
    // worker lines is pending. The new image must write them, not lose them.
    let (ours, theirs) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let (mut z, sock, s) = start_with_a_blocked_log(Stdio::from(theirs));
    let pid = s["pid"].clone();
    let replies = request(&sock, r#"{"cmd":"upgrade"}"#, DEADLINE).unwrap();
    let last = replies.last().unwrap();
    assert_eq!(last["ok"], true, "{replies:?}");
    let s = status_now(&sock);
    assert_eq!(s["pid"], pid);
    assert!(s["log"]["pending_bytes"].as_u64().unwrap() >= 1024 * 1024, "{s}");
    assert_eq!(s["log"]["dropped_lines"], 0, "{s}");
    // Read everything from now on, and stop.
    let reader = read_lines_until_eof(std::fs::File::from(ours));
    let replies = request(&sock, r#"{"cmd":"stop"}"#, DEADLINE).unwrap();
    assert_eq!(replies.last().unwrap()["data"]["log_lines_lost"], 0, "{replies:?}");
    assert_eq!(z.wait_exit().code(), Some(0));
    let lines = reader.join().unwrap();
    let relayed = check_flood_lines(&lines, &[]);
    assert_eq!(relayed.len(), 1, "{relayed:?}");
    let text: Vec<Value> = lines.iter().filter_map(|l| serde_json::from_slice(l).ok()).collect();
    for msg in [
        "upgrading: re-executing the master",
        "upgraded: master re-executed",
        "stopped",
    ] {
        assert!(text.iter().any(|r| r["msg"] == msg), "no {msg:?} record");
    }
    assert!(!text
        .iter()
        .any(|r| r["msg"].as_str().is_some_and(|m| m.contains("lost"))));
}
