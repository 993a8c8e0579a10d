//! `cargo bench --bench reload`: reload round trip, master RSS and fd count around 1,000
//! reloads. Prints numbers; asserts nothing (see docs/benchmarks.md for measured values).
//!
//! The worker is the test fixture (`examples/fixture_worker`), which sends READY=1 at once.
//! A reload's round trip is the time from SIGHUP to the master's "reload complete" record on
//! its stderr, read through a pipe.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn build_fixture() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--release", "--example", "fixture_worker"])
        .status()
        .expect("cargo build");
    assert!(st.success());
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_zdd"));
    exe.parent().unwrap().join("examples/fixture_worker")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Run `zdd COMMAND -c config` `runs` times; the sorted durations, each including the CLI
/// process.
fn time_command(command: &str, config: &std::path::Path, runs: usize) -> Vec<Duration> {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            let st = Command::new(env!("CARGO_BIN_EXE_zdd"))
                .args([command, "-c"])
                .arg(config)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "zdd {command} failed");
            t0.elapsed()
        })
        .collect();
    times.sort();
    times
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let reloads: usize = std::env::var("ZDD_BENCH_RELOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let fixture = build_fixture();
    let dir = tempfile::tempdir().unwrap();
    // `ZDD_BENCH_ONLY=many`: only the many-listeners, many-workers part.
    if std::env::var("ZDD_BENCH_ONLY").is_ok_and(|v| v == "many") {
        many(&fixture, dir.path());
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[master]\nlog_format = \"json\"\ncontrol_socket = \"run/bench.sock\"\n\
             [worker]\ncommand = [\"{}\", \"--ready\"]\nstop_timeout = \"10s\"\n\
             [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
            fixture.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_zdd"))
        .args(["start", "--foreground", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Read the master's log in a thread, so that it never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel::<(String, serde_json::Value)>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send((line, v)).is_err() {
                    break;
                }
            }
        }
    });
    let wait_for = |msg: &str, generation: Option<u64>| loop {
        let (line, v) = rx.recv().expect("master exited");
        if v["msg"] == msg && generation.is_none_or(|g| v["generation"] == g) {
            return;
        }
        if v["msg"].as_str().is_some_and(|m| m.starts_with("reload failed")) {
            panic!("{line}");
        }
    };
    wait_for("ready", None);
    // Let the first worker settle, then take the baseline.
    let (rss0, fds0) = (rss_kib(pid), fd_count(pid));
    let mut times = Vec::with_capacity(reloads);
    let hup = nix::sys::signal::Signal::SIGHUP;
    let master = nix::unistd::Pid::from_raw(pid as i32);
    let mut rss_warm = rss0;
    for i in 0..reloads {
        if i == reloads / 10 {
            rss_warm = rss_kib(pid);
        }
        let t0 = Instant::now();
        nix::sys::signal::kill(master, hup).unwrap();
        wait_for("reload complete", None);
        times.push(t0.elapsed());
    }
    // Let the last old generation exit before measuring.
    wait_for("worker exited", Some(reloads as u64));
    // Its log pipes close a moment after the exit is logged.
    let settle = Instant::now();
    while fd_count(pid) > fds0 && settle.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (rss1, fds1) = (rss_kib(pid), fd_count(pid));
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("reloads: {reloads} (worker ready at once, via SIGHUP)");
    println!(
        "reload round trip: median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.9)),
        ms(percentile(&times, 0.99)),
        ms(*times.last().unwrap())
    );
    println!(
        "master RSS: {rss0} KiB after start, {rss_warm} KiB after {} reloads, {rss1} KiB after {reloads}",
        reloads / 10
    );
    println!("master fds: {fds0} before, {fds1} after");

    // The same through the command line: `zdd reload` forks, connects, waits for the outcome.
    let cli_runs = (reloads / 5).max(10);
    let cli = time_command("reload", &config, cli_runs);
    println!(
        "`zdd reload` round trip ({cli_runs} runs, including the CLI process): median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&cli, 0.5)),
        ms(percentile(&cli, 0.9)),
        ms(percentile(&cli, 0.99)),
    );
    // Upgrades: the master re-executes itself, keeping everything.
    let fds_pre = fd_count(pid);
    let up = time_command("upgrade", &config, 100);
    println!(
        "`zdd upgrade` round trip (100 runs): median {:.2} ms, p90 {:.2} ms, max {:.2} ms; master fds {fds_pre} before, {} after; RSS {} KiB after",
        ms(percentile(&up, 0.5)),
        ms(percentile(&up, 0.9)),
        ms(*up.last().unwrap()),
        fd_count(pid),
        rss_kib(pid)
    );
    // Idle: a master with nothing to do should not wake up at all.
    let idle = Duration::from_secs(10);
    let before = context_switches(pid);
    std::thread::sleep(idle);
    let after = context_switches(pid);
    println!(
        "idle master: {} wake-ups (context switches) in {} s",
        after - before,
        idle.as_secs()
    );
    stop(&config);
    child.wait().unwrap();

    relay(&fixture, dir.path());
    many(&fixture, dir.path());
}

fn stop(config: &std::path::Path) {
    let st = Command::new(env!("CARGO_BIN_EXE_zdd"))
        .args(["stop", "-c"])
        .arg(config)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

fn context_switches(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Log relay: a worker prints 1,000,000 lines and exits; the master relays them into its log
/// file. Against the same worker piped into `cat` writing a file. Medians of 5 runs.
fn relay(fixture: &std::path::Path, dir: &std::path::Path) {
    const LINES: u64 = 1_000_000;
    let mut zdd_times = Vec::new();
    let mut cat_times = Vec::new();
    for format in ["text", "json"] {
        let config = dir.join(format!("relay-{format}.toml"));
        let log = dir.join(format!("relay-{format}.log"));
        std::fs::write(
            &config,
            format!(
                "[master]\nlog_format = \"{format}\"\nlog = \"{}\"\ncontrol_socket = \"run/relay.sock\"\n\
                 [worker]\ncommand = [\"{}\", \"--ready\", \"--lines\", \"{LINES}\"]\nrestart = \"never\"\n",
                log.display(),
                fixture.display()
            ),
        )
        .unwrap();
        let mut times = Vec::new();
        for _ in 0..5 {
            let _ = std::fs::remove_file(&log);
            let t0 = Instant::now();
            let st = Command::new(env!("CARGO_BIN_EXE_zdd"))
                .args(["start", "--foreground", "-c"])
                .arg(&config)
                .status()
                .unwrap();
            times.push(t0.elapsed());
            assert!(st.success());
            let text = std::fs::read_to_string(&log).unwrap();
            let relayed = text.lines().filter(|l| l.contains("line ")).count() as u64;
            assert_eq!(relayed, LINES, "lines lost in the relay");
        }
        times.sort();
        zdd_times.push((format, times[2], std::fs::metadata(&log).unwrap().len()));
    }
    let out = dir.join("cat.out");
    for _ in 0..5 {
        let t0 = Instant::now();
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "'{}' --lines {LINES} | cat > '{}'",
                fixture.display(),
                out.display()
            ))
            .status()
            .unwrap();
        cat_times.push(t0.elapsed());
        assert!(st.success());
    }
    cat_times.sort();
    let cat = cat_times[2];
    let raw = std::fs::metadata(&out).unwrap().len();
    println!(
        "log relay, {LINES} lines: `worker | cat > file` {:.3} s ({} MB)",
        cat.as_secs_f64(),
        raw / 1_000_000
    );
    for (format, t, bytes) in zdd_times {
        println!(
            "log relay, {LINES} lines: zdd, {format} log, {:.3} s ({} MB written, timestamped and tagged): {:.0} % of cat's throughput",
            t.as_secs_f64(),
            bytes / 1_000_000,
            100.0 * cat.as_secs_f64() / t.as_secs_f64(),
        );
    }
}

/// `ZDD_BENCH_LISTENERS` (1,000) listeners and `ZDD_BENCH_WORKERS` (64) workers: start, then
/// `ZDD_BENCH_MANY_RELOADS` (20) reload round trips through `zdd reload`, then stop; master RSS,
/// and where a reload's time goes, from the master's log (microsecond timestamps).
fn many(fixture: &std::path::Path, dir: &std::path::Path) {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let listeners = env("ZDD_BENCH_LISTENERS", 1000);
    let workers = env("ZDD_BENCH_WORKERS", 64);
    let runs = env("ZDD_BENCH_MANY_RELOADS", 20);
    // The master holds the sockets and two pipes per worker; each worker gets every socket.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let log = dir.join("many.log");
    let _ = std::fs::remove_file(&log);
    let mut text = format!(
        "[master]\nlog_format = \"json\"\nlog = \"{}\"\ncontrol_socket = \"run/many.sock\"\n\
         [worker]\ncommand = [\"{}\", \"--ready\"]\ncount = {workers}\nstop_timeout = \"30s\"\nstart_timeout = \"60s\"\n",
        log.display(),
        fixture.display()
    );
    // Distinct free ports: held all at once while picked, then let go for zdd to bind.
    let held: Vec<std::net::TcpListener> = (0..listeners)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    for (i, l) in held.iter().enumerate() {
        let port = l.local_addr().unwrap().port();
        text += &format!("[[listen]]\nname = \"l{i}\"\ntcp = \"127.0.0.1:{port}\"\n");
    }
    drop(held);
    let config = dir.join("many.toml");
    std::fs::write(&config, text).unwrap();
    // Reading and validating the config alone: `zdd check` runs the same function as a reload.
    let check = time_command("check", &config, 5);
    let t0 = Instant::now();
    let st = Command::new(env!("CARGO_BIN_EXE_zdd"))
        .args(["start", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "start with {listeners} listeners and {workers} workers failed"
    );
    let start = t0.elapsed();
    let pid: u32 = std::fs::read_to_string(dir.join("run/many.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let rss_start = if pid > 0 { rss_kib(pid) } else { 0 };
    let reloads = time_command("reload", &config, runs);
    let rss = if pid > 0 { rss_kib(pid) } else { 0 };
    let t0 = Instant::now();
    stop(&config);
    let stopped = t0.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{listeners} listeners, {workers} workers: start {:.1} ms; reload round trip ({runs} runs, `zdd reload`) median {:.1} ms, max {:.1} ms; stop {:.1} ms; master RSS {rss_start} KiB after start, {rss} KiB after the reloads",
        ms(start),
        ms(percentile(&reloads, 0.5)),
        ms(*reloads.last().unwrap()),
        ms(stopped),
    );
    println!(
        "  `zdd check` (config read and validated, CLI process included): median {:.1} ms",
        ms(percentile(&check, 0.5))
    );
    breakdown(&log, workers);
}

/// Where a reload's time went, from the master's log: SIGHUP or request → first "worker
/// started" (config read and validated, listeners diffed, the first fork/exec), between
/// consecutive "worker started" (one fork/exec: the master waits for each exec), last started →
/// "reload complete" (the last READY=1, old workers signalled). Medians over the reloads.
fn breakdown(log: &std::path::Path, workers: usize) {
    let Ok(text) = std::fs::read_to_string(log) else { return };
    let ts = |v: &serde_json::Value| -> Option<f64> {
        let t = v["ts"].as_str()?;
        let t = chrono_like_secs(t)?;
        Some(t)
    };
    let (mut first, mut per, mut ready, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut begin: Option<f64> = None;
    let mut started: Vec<f64> = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(t) = ts(&v) else { continue };
        let msg = v["msg"].as_str().unwrap_or("");
        if msg.starts_with("reload requested") || msg == "reloading" {
            begin = Some(t);
            started.clear();
        } else if msg == "worker started" && begin.is_some() {
            started.push(t);
        } else if msg == "reload complete" {
            if let (Some(b), Some(&f), Some(&l)) = (begin, started.first(), started.last()) {
                first.push(f - b);
                if started.len() > 1 {
                    per.push((l - f) / (started.len() - 1) as f64);
                }
                ready.push(t - l);
                total.push(t - b);
            }
            begin = None;
        }
    }
    let med = |v: &mut Vec<f64>| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2] * 1000.0
    };
    println!(
        "  breakdown (master log, medians of {} reloads): request → first worker started {:.2} ms; per further worker (fork, fds, exec) {:.3} ms × {}; last started → reload complete {:.2} ms; request → complete {:.1} ms",
        total.len(),
        med(&mut first),
        med(&mut per),
        workers.saturating_sub(1),
        med(&mut ready),
        med(&mut total),
    );
}

/// Seconds within the day of an RFC 3339 timestamp ("…T12:34:56.789012+00:00"), enough for
/// differences within a run.
fn chrono_like_secs(t: &str) -> Option<f64> {
    let time = t.split('T').nth(1)?;
    let end = time.find(['+', '-', 'Z']).unwrap_or(time.len());
    let mut parts = time[..end].split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}
