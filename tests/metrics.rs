//! `[master] metrics`: the OpenMetrics text served from the master's loop, through the real
//! binary. Every scrape is checked by a real parser (Python's `prometheus_client`, its
//! OpenMetrics parser; `.ci/install-deps` installs it): without it these tests print a loud
//! SKIP, and fail when `CI` is set.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The OpenMetrics parser, or None (after a loud SKIP) where it is missing outside CI.
fn parser_ready(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        missing(
            test,
            "python3 with prometheus_client is missing (pip prometheus-client)",
        );
    }
    ok
}

/// One scrape: (status line, headers, body).
fn get(addr: SocketAddr, request: &str) -> (String, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// Samples of a parsed scrape: (name, labels) → value.
struct Scrape(BTreeMap<(String, BTreeMap<String, String>), f64>);

impl Scrape {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = (
            name.to_string(),
            labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        );
        *self
            .0
            .get(&key)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in {:#?}", self.0.keys().collect::<Vec<_>>()))
    }
}

/// Parse OpenMetrics text with prometheus_client's parser; panics with its complaint.
fn parse(text: &str) -> Scrape {
    let script = "import sys, json\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        out = []\n\
        for fam in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in fam.samples:\n\
        \x20       out.append([s.name, s.labels, s.value])\n\
        print(json.dumps(out))\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "the OpenMetrics parser refused the text: {}\n{text}",
        stderr(&o)
    );
    let v: Vec<(String, BTreeMap<String, String>, f64)> = serde_json::from_slice(&o.stdout).unwrap();
    Scrape(v.into_iter().map(|(n, l, x)| ((n, l), x)).collect())
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (status, headers, body) = get(addr, "GET /metrics HTTP/1.1\r\nHost: zdd\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(
        headers.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{headers}"
    );
    parse(&body)
}

/// Scrape until `f` holds (counters move as workers are reaped, a moment after a reply).
fn scrape_until(addr: SocketAddr, what: &str, f: impl Fn(&Scrape) -> bool) -> Scrape {
    wait_for(what, DEADLINE, || Some(scrape(addr)).filter(|s| f(s)))
}

/// A daemon-mode config with `[master] metrics` on `mport`.
fn config(port: u16, mport: u16, args: &[&str], worker: &str) -> String {
    daemon_config(port, args, worker).replacen("[master]\n", &format!("[master]\nmetrics = \"127.0.0.1:{mport}\"\n"), 1)
}

fn started(z: &Zdd) {
    let o = zdd(z, &["start"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stderr(&o), z.log_text());
}

fn stop(z: &Zdd) {
    let o = zdd(z, &["stop"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    z.assert_clean();
}

fn maddr(mport: u16) -> SocketAddr {
    format!("127.0.0.1:{mport}").parse().unwrap()
}

#[test]
fn scrapes_count_the_start_reloads_and_a_crash_restart() {
    if !parser_ready("scrapes_count_the_start_reloads_and_a_crash_restart") {
        return;
    }
    let (port, mport) = (free_port(), free_port());
    let z = Zdd::new(&config(port, mport, &["--ready", "--serve", "--stderr-lines", "3"], ""));
    started(&z);
    let m = maddr(mport);

    // After the start: one worker spawned and ready, nothing else happened.
    let s = scrape_until(m, "the start's log lines relayed", |s| {
        s.get("zdd_log_lines_relayed_total", &[]) >= 3.0
    });
    assert_eq!(s.get("zdd_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(s.get("zdd_worker_starts_total", &[]), 1.0);
    for result in ["ok", "failed", "refused", "cancelled"] {
        assert_eq!(s.get("zdd_reloads_total", &[("result", result)]), 0.0, "{result}");
    }
    assert_eq!(s.get("zdd_workers", &[("generation", "1"), ("state", "ready")]), 1.0);
    assert_eq!(s.get("zdd_workers", &[("generation", "1"), ("state", "starting")]), 0.0);
    assert_eq!(s.get("zdd_serving_generation", &[]), 1.0);
    assert!(s.get("zdd_serving_generation_age_seconds", &[]) >= 0.0);
    assert_eq!(s.get("zdd_draining_generations", &[]), 0.0);
    assert_eq!(s.get("zdd_log_lines_dropped_total", &[]), 0.0);
    assert!(s.get("zdd_master_resident_memory_bytes", &[]) > 100_000.0);
    assert!(s.get("zdd_master_open_fds", &[]) >= 5.0);
    assert_eq!(
        s.get(
            "zdd_reload_duration_seconds_bucket",
            &[("result", "ok"), ("le", "+Inf")]
        ),
        0.0
    );

    // A reload that commits; the old worker, asked to stop, exits.
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let s = scrape_until(m, "the old worker's exit counted", |s| {
        s.get("zdd_worker_exits_total", &[("reason", "stopped")]) == 1.0
    });
    assert_eq!(s.get("zdd_reloads_total", &[("result", "ok")]), 1.0);
    assert_eq!(s.get("zdd_reload_duration_seconds_count", &[("result", "ok")]), 1.0);
    assert_eq!(
        s.get(
            "zdd_reload_duration_seconds_bucket",
            &[("result", "ok"), ("le", "+Inf")]
        ),
        1.0
    );
    assert!(s.get("zdd_reload_duration_seconds_sum", &[("result", "ok")]) > 0.0);
    assert_eq!(s.get("zdd_serving_generation", &[]), 2.0);
    assert_eq!(s.get("zdd_workers", &[("generation", "2"), ("state", "ready")]), 1.0);
    assert_eq!(s.get("zdd_worker_starts_total", &[]), 2.0);

    // A reload that fails: the new worker exits during its start-up.
    z.write_config(&config(port, mport, &["--exit", "3"], ""));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    // And one refused: generation 7 is not serving.
    let o = zdd(&z, &["reload", "--if-generation", "7"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    z.write_config(&config(port, mport, &["--ready", "--serve"], ""));
    let s = scrape(m);
    assert_eq!(s.get("zdd_reloads_total", &[("result", "failed")]), 1.0);
    assert_eq!(s.get("zdd_reloads_total", &[("result", "refused")]), 1.0);
    assert_eq!(s.get("zdd_reload_duration_seconds_count", &[("result", "failed")]), 1.0);
    assert_eq!(s.get("zdd_worker_exits_total", &[("reason", "crashed")]), 1.0);
    assert_eq!(s.get("zdd_serving_generation", &[]), 2.0);

    // A crash of the serving worker: restarted after its back-off.
    let st = status(&z);
    let pid = st["workers"][0]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let s = scrape_until(m, "the crash restart, ready", |s| {
        s.get("zdd_worker_restarts_total", &[]) == 1.0
            && s.get("zdd_workers", &[("generation", "2"), ("state", "ready")]) == 1.0
    });
    assert_eq!(s.get("zdd_worker_exits_total", &[("reason", "crashed")]), 2.0);
    assert_eq!(s.get("zdd_worker_starts_total", &[]), 4.0);
    assert_eq!(s.get("zdd_slots_restarting", &[]), 0.0);

    // status --json carries the same counters.
    let st = status(&z);
    let j = &st["metrics"];
    assert_eq!(j["address"], format!("127.0.0.1:{mport}"), "{j}");
    assert_eq!(
        j["reloads"],
        serde_json::json!({"ok": 1, "failed": 1, "refused": 1, "cancelled": 0})
    );
    assert_eq!(j["worker_starts"], 4, "{j}");
    assert_eq!(j["worker_restarts"], 1, "{j}");
    assert_eq!(j["worker_exits"]["crashed"], 2, "{j}");
    assert_eq!(j["worker_exits"]["stopped"], 1, "{j}");
    assert_eq!(j["reload_seconds"]["ok"]["count"], 1, "{j}");
    assert!(j["log_lines_relayed"].as_u64().unwrap() >= 3, "{j}");

    // An upgrade keeps the listener and the counters.
    let o = zdd(&z, &["upgrade"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stderr(&o), z.log_text());
    let s = scrape(m);
    assert_eq!(s.get("zdd_reloads_total", &[("result", "ok")]), 1.0);
    assert_eq!(s.get("zdd_worker_restarts_total", &[]), 1.0);
    assert_eq!(s.get("zdd_worker_starts_total", &[]), 4.0);
    assert!(s.get("zdd_serving_generation_age_seconds", &[]) > 0.0);

    // A reload that moves the metrics says it waits for the next start, and serves on.
    z.write_config(&config(port, free_port(), &["--ready", "--serve"], ""));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let w: Vec<Value> = z.records_with("[master] settings changed; they take effect at the next start, not on reload");
    assert_eq!(w.len(), 1, "{}", z.log_text());
    assert_eq!(w[0]["keys"], "metrics", "{}", w[0]);
    assert_eq!(scrape(m).get("zdd_reloads_total", &[("result", "ok")]), 2.0);
    stop(&z);
}

#[test]
fn a_metrics_port_in_use_fails_the_start_and_leaves_nothing() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let mport = held.local_addr().unwrap().port();
    let z = Zdd::new(&config(free_port(), mport, &["--ready", "--serve"], ""));
    let o = zdd(&z, &["start"]);
    assert_ne!(o.status.code(), Some(0));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("bind 127.0.0.1:{mport}: address already in use (EADDRINUSE)")),
        "{e}"
    );
    assert!(e.contains("[master] metrics"), "{e}");
    assert!(z.started_pids().is_empty(), "{}", z.log_text());
    z.assert_clean();
}

#[test]
fn a_silent_client_is_dropped_at_its_deadline_and_the_master_serves_meanwhile() {
    if !parser_ready("a_silent_client_is_dropped_at_its_deadline_and_the_master_serves_meanwhile") {
        return;
    }
    let mport = free_port();
    let z = Zdd::new(&config(free_port(), mport, &["--ready", "--serve"], ""));
    started(&z);
    let m = maddr(mport);
    let began = Instant::now();
    let mut silent = TcpStream::connect(m).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Meanwhile: control requests, scrapes, other answers.
    assert_eq!(status(&z)["phase"], "running");
    assert_eq!(scrape(m).get("zdd_serving_generation", &[]), 1.0);
    let (s, _, _) = get(m, "GET / HTTP/1.1\r\n\r\n");
    assert_eq!(s, "HTTP/1.1 404 Not Found");
    let (s, h, body) = get(m, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!((s.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""), "{h}");
    assert!(h.contains("Content-Length: "), "{h}");
    let (s, h, _) = get(m, "DELETE /metrics HTTP/1.1\r\n\r\n");
    assert!(
        s.starts_with("HTTP/1.1 405") && h.contains("Allow: GET, HEAD"),
        "{s}\n{h}"
    );
    // The silent one is closed by the master after its deadline (5 s), not before.
    let mut buf = [0u8; 64];
    let n = silent.read(&mut buf).unwrap_or(0);
    let waited = began.elapsed();
    assert_eq!(n, 0, "the master wrote to a client that asked nothing");
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(15),
        "dropped after {waited:?}"
    );
    stop(&z);
}

#[test]
fn a_huge_request_is_refused_and_the_master_serves_on() {
    if !parser_ready("a_huge_request_is_refused_and_the_master_serves_on") {
        return;
    }
    let mport = free_port();
    let z = Zdd::new(&config(free_port(), mport, &["--ready", "--serve"], ""));
    started(&z);
    let m = maddr(mport);
    let mut s = TcpStream::connect(m).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // 4 MiB of a request line that never ends: the master answers 431 after 8 KiB, reads (and
    // throws away) some more, then closes; the write may then fail, which is fine.
    let mut line = b"GET /metrics?".to_vec();
    line.resize(4 << 20, b'a');
    let _ = s.write_all(&line);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.is_empty() || out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{out}"
    );
    assert_eq!(scrape(m).get("zdd_serving_generation", &[]), 1.0);
    assert_eq!(status(&z)["phase"], "running");
    stop(&z);
}

#[test]
fn many_scrapes_at_once_are_all_answered() {
    if !parser_ready("many_scrapes_at_once_are_all_answered") {
        return;
    }
    let mport = free_port();
    let z = Zdd::new(&config(free_port(), mport, &["--ready", "--serve"], ""));
    started(&z);
    let m = maddr(mport);
    // 100 connections open at once (the master serves 32 at a time, the rest wait in the
    // backlog), each sends its request, then all are read.
    let mut conns: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(m).unwrap()).collect();
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    }
    assert_eq!(status(&z)["phase"], "running");
    let mut last = String::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "connection {i}: {out:?}");
        last = out;
    }
    let body = last.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(parse(body).get("zdd_serving_generation", &[]), 1.0);
    // None of them is left open in the master.
    let st = status(&z);
    let pid = st["pid"].as_i64().unwrap();
    let fds_after = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let s = scrape(m);
    assert!(
        s.get("zdd_master_open_fds", &[]) <= fds_after as f64 + 1.0,
        "{fds_after}"
    );
    stop(&z);
}

#[test]
fn an_idle_master_with_metrics_stays_asleep_between_scrapes() {
    if !parser_ready("an_idle_master_with_metrics_stays_asleep_between_scrapes") {
        return;
    }
    let mport = free_port();
    let z = Zdd::new(&config(free_port(), mport, &["--ready", "--serve"], ""));
    started(&z);
    let m = maddr(mport);
    scrape(m);
    let pid = status(&z)["pid"].as_i64().unwrap();
    let switches = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let before = switches();
    // A window to observe, not a synchronisation: nothing is waited for here.
    std::thread::sleep(Duration::from_secs(1));
    let woke = switches() - before;
    assert!(woke < 3, "the idle master woke {woke} times in 1 s");
    stop(&z);
}

#[test]
fn metrics_on_a_unix_socket() {
    if !parser_ready("metrics_on_a_unix_socket") {
        return;
    }
    let body = daemon_config(free_port(), &["--ready", "--serve"], "").replacen(
        "[master]\n",
        "[master]\nmetrics = \"run/metrics.sock\"\n",
        1,
    );
    let z = Zdd::new(&body);
    started(&z);
    let mut s = std::os::unix::net::UnixStream::connect(z.path("run/metrics.sock")).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(parse(body).get("zdd_worker_starts_total", &[]), 1.0);
    // The socket file goes with the master.
    stop(&z);
}
